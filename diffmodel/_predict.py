"""The pandas-level prediction entry point."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from ._fitting._base import AbstractFactorSet
from ._fitting._fit import FitResult
from ._fitting._io import load_factors
from ._frame import groups_from_frame, stats_from_frame
from ._model._factors import Factors, default_factors
from ._model._roofline import COMPONENTS, step_time_batch


@functools.partial(jax.jit, static_argnames=("check",))
def _evaluate(stats, deployments, group, factors, check=True):
    b = step_time_batch(stats, deployments, group, factors, check=check)
    return b.total, b.as_dict()


def resolve_factors(factors, labels: tuple[str, ...]) -> Factors:
    """Physical :class:`Factors` for the groups ``labels`` from what a user passed.

    ``None`` gives the physical priors; a :class:`Factors` is used as is (shared by
    all groups, or one row per group in ``labels`` order). Fitted factor sets and fit
    results resolve themselves (``factors_for(labels)``); a path to a saved JSON
    file is loaded first.
    """
    if factors is None:
        return default_factors()
    if isinstance(factors, Factors):
        return factors
    if isinstance(factors, str | os.PathLike):
        factors = load_factors(factors)
    if isinstance(factors, FitResult):
        factors = factors.factor_set
    if isinstance(factors, AbstractFactorSet):
        return factors.factors_for(labels)
    raise ValueError(
        "factors must be None, a diffmodel.Factors, a fitted factor set or fit result, "
        f"or a path to a saved factors JSON file; got {type(factors).__name__}"
    )


def predict(
    frame: pd.DataFrame,
    *,
    model: str | None = None,
    hardware: str | None = None,
    tp: int | None = None,
    factors=None,
) -> pd.DataFrame:
    """Predict the step time of every row of ``frame``, microseconds per GPU.

    Args:
        frame: one row per step, with ``prefill_tokens``, ``decode_tokens``,
            ``num_prefill_reqs``, ``num_decode_reqs`` (or the trace names
            ``batch.prefill_tokens``, ...) and ``kv_tokens`` (``K_dec``, context tokens
            read by decode attention; else derived from ``kv.usage_gpu_ratio *
            kv.blocks_total_gpu * 16``); optionally ``prefill_context_tokens``
            (``K_pf``, tokens cached before this step's prefill chunks; 0 when
            absent). With only these aggregates, prefill attention assumes equal
            chunks: ``n = P/Np`` new tokens after ``s = K_pf/Np`` cached ones each.
        model, hardware, tp: the deployment, unless the frame has per-row ``model``,
            ``hardware``, ``tp`` columns (which win). Hardware defaults to H100-SXM
            only when neither gives one.
        factors: ``None`` (physical priors), :class:`Factors`, a fitted factor set or
            fit result, or a path to a saved factors JSON file.

    Returns:
        A copy of ``frame`` with ``predicted_us`` and one ``<component>_us`` column per
        component (see :class:`diffmodel.Breakdown`).
    """
    stats = stats_from_frame(frame)
    groups = groups_from_frame(frame, model=model, hardware=hardware, tp=tp)
    fac = resolve_factors(factors, groups.labels)
    total, parts = _evaluate(stats, groups.deployments, jnp.asarray(groups.index), fac)
    out = frame.copy()
    out["predicted_us"] = np.asarray(total)
    for c in COMPONENTS:
        out[f"{c}_us"] = np.asarray(parts[c])
    return out
