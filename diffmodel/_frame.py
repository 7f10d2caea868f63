"""From a pandas frame of steps to array data: statistics, deployments, groups."""

from collections.abc import Mapping

import equinox as eqx
import numpy as np
import pandas as pd

from ._model._arch import canonical_model
from ._model._batch import (
    VLLM_BLOCK_SIZE,
    BatchStats,
    from_aggregates,
    kv_tokens_from_usage,
)
from ._model._deployment import Deployment, deployment, stack_deployments
from ._model._hardware import canonical_hardware

# Canonical column -> accepted trace spellings.
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "prefill_tokens": ("batch.prefill_tokens",),
    "decode_tokens": ("batch.decode_tokens",),
    "num_prefill_reqs": ("batch.num_prefill_reqs",),
    "num_decode_reqs": ("batch.num_decode_reqs",),
    "kv_tokens": (),
    "prefill_context_tokens": (),
}
DEFAULT_HARDWARE = "h100-sxm"


def group_label(model: str, hardware: str, tp: int) -> str:
    """The label of a deployment group, e.g. ``llama-2-70b/h100-sxm/tp4``."""
    return f"{model}/{hardware}/tp{int(tp)}"


def _column(frame: pd.DataFrame, name: str) -> np.ndarray | None:
    for col in (name, *COLUMN_ALIASES.get(name, ())):
        if col in frame.columns:
            return _numeric(frame[col], col)
    return None


def _numeric(series: pd.Series, col: str) -> np.ndarray:
    if not pd.api.types.is_numeric_dtype(series.dtype):
        raise ValueError(f"column {col!r} must be numeric, got dtype {series.dtype}")
    values = series.to_numpy(dtype=float, na_value=np.nan)
    bad = ~(values >= 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"column {col!r} must be finite and >= 0; row {series.index[i]!r} "
            f"has {values[i]!r}"
        )
    return values


def _required(frame: pd.DataFrame, name: str) -> np.ndarray:
    values = _column(frame, name)
    if values is None:
        names = " or ".join(repr(c) for c in (name, *COLUMN_ALIASES[name]))
        raise ValueError(f"missing column {names}")
    return values


def stats_from_frame(
    frame: pd.DataFrame, *, block_size: int = VLLM_BLOCK_SIZE
) -> BatchStats:
    """Batch statistics from a frame with canonical or trace column names.

    ``kv_tokens`` (``K_dec``) comes from a ``kv_tokens`` column, else from the KV gauge
    ``kv.usage_gpu_ratio * kv.blocks_total_gpu * block_size`` (see
    :func:`diffmodel.kv_tokens_from_usage` for what that proxy approximates).
    ``prefill_context_tokens`` (``K_pf``) is 0 when absent; prefill chunks are taken as
    equal (see :func:`diffmodel.from_aggregates`).
    """
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"expected a pandas DataFrame, got {type(frame).__name__}")
    kv = _column(frame, "kv_tokens")
    if kv is None:
        usage = _column(frame, "kv.usage_gpu_ratio")
        blocks = _column(frame, "kv.blocks_total_gpu")
        if usage is None or blocks is None:
            raise ValueError(
                "missing column 'kv_tokens' (or both 'kv.usage_gpu_ratio' and "
                "'kv.blocks_total_gpu' to derive it)"
            )
        kv = np.asarray(kv_tokens_from_usage(usage, blocks, block_size))
    k_pf = _column(frame, "prefill_context_tokens")
    return from_aggregates(
        prefill_tokens=_required(frame, "prefill_tokens"),
        decode_tokens=_required(frame, "decode_tokens"),
        num_prefill=_required(frame, "num_prefill_reqs"),
        num_decode=_required(frame, "num_decode_reqs"),
        kv_tokens=kv,
        prefill_context_tokens=np.zeros(len(frame)) if k_pf is None else k_pf,
    )


class Groups(eqx.Module):
    """Deployments of a frame: stacked deployments, labels and each row's group."""

    deployments: Deployment
    labels: tuple[str, ...] = eqx.field(static=True)
    index: np.ndarray


def _per_row(frame: pd.DataFrame, col: str, default, what: str) -> np.ndarray:
    if col in frame.columns:
        values = frame[col]
        if values.isna().any():
            raise ValueError(f"column {col!r} has missing values")
        return values.to_numpy()
    if default is None:
        raise ValueError(f"{what}: pass {col}= or give the frame a {col!r} column")
    return np.full(len(frame), default, dtype=object)


def _tp(value) -> int:
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"tp must be a positive integer, got {value!r}") from None
    if not t.is_integer() or t < 1:
        raise ValueError(f"tp must be a positive integer, got {value!r}")
    return int(t)


def groups_from_frame(
    frame: pd.DataFrame,
    *,
    model: str | None = None,
    hardware: str | None = None,
    tp: int | None = None,
    overrides: Mapping[str, str] | None = None,
) -> Groups:
    """Each row's deployment: per-row ``model``/``hardware``/``tp`` columns override
    the keyword arguments; hardware defaults to H100-SXM when neither says anything.
    """
    if "hardware" not in frame.columns and hardware is None:
        hardware = DEFAULT_HARDWARE
    models = _per_row(frame, "model", model, "model")
    hws = _per_row(frame, "hardware", hardware, "hardware")
    tps = _per_row(frame, "tp", tp, "tensor-parallel degree")
    raw = pd.MultiIndex.from_arrays([models, hws, np.asarray(tps)])
    codes, uniques = pd.factorize(raw)
    ulabels = np.asarray(
        [
            group_label(canonical_model(m), canonical_hardware(h), _tp(t))
            for m, h, t in uniques
        ],
        dtype=object,
    )
    keys = ulabels[codes]
    index, labels = pd.factorize(keys, sort=True)
    deps = []
    for label in labels:
        m, h, t = label.split("/")
        deps.append(deployment(m, h, int(t[2:]), **(overrides or {})))
    return Groups(
        deployments=stack_deployments(deps),
        labels=tuple(labels),
        index=index.astype(np.int32),
    )
