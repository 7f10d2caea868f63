"""Which host costs a serving stack's trace supports, chosen by cross-validation.

:func:`select_host_terms` scores each candidate set of host costs
(:data:`HOST_FORMS`) over the kernel-sum device time by leaving one deployment of the
rows out at a time (fit on the others, MAPE on it), or, with a single deployment, by
fitting on one half of the rows (in their order) and scoring the other, both ways.
The set with the lowest mean is the choice (``diffmodel fit-host --terms auto``).
A stack whose steps carry a fixed cost of their own picks ``step``; vLLM's piecewise
CUDA graphs pick per-layer costs (the public traces: ``layer + layer_request``).
"""

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from .._metrics import mape
from ..kernels._curves import KernelCurves
from ..kernels._step import HOST_TERMS
from ._kernel_host import _fit_arrays, _idle, _prepare, target_values

HOST_FORMS: tuple[tuple[str, ...], ...] = (
    ("layer",),
    ("step",),
    ("request",),
    ("step", "request"),
    ("layer", "request"),
    ("step", "layer"),
    ("step", "layer", "request"),
    ("layer_request",),
    ("layer", "layer_request"),
    ("step", "layer_request"),
    ("step", "layer", "layer_request"),
)
"""The candidate host-cost sets :func:`select_host_terms` compares, in the order
that breaks ties (a per-layer cost before a per-step one: on one deployment the two
are the same column, and the per-layer cost is what carries to other models)."""

TIE_PP = 0.01
"""Held-out MAPEs within this many percentage points of the lowest tie; the set
with the fewest terms, then the earliest in ``forms``, wins."""


@dataclasses.dataclass(frozen=True)
class HostTermsChoice:
    """The outcome of :func:`select_host_terms`.

    Attributes:
        terms: the chosen host costs (lowest mean held-out MAPE).
        table: one row per candidate (index: terms joined by ``+``), MAPE % per
            held-out fold and their ``mean``; NaN for a set that cannot price the
            rows (steps without tokens need ``step`` or ``request``).
        folds: what each fold held out (deployment labels, or halves of the rows).
    """

    terms: tuple[str, ...]
    table: pd.DataFrame
    folds: tuple[str, ...]


def select_host_terms(
    frame: pd.DataFrame,
    *,
    target: str,
    curves: KernelCurves,
    forms: Sequence[Sequence[str]] = HOST_FORMS,
    max_steps: int = 500,
    progress: Callable[[str], None] | None = None,
) -> HostTermsChoice:
    """Choose the host costs to fit over the kernel sum by held-out error.

    Args:
        frame: steps (the columns of :func:`diffmodel.predict`) with ``target``.
        target: the measured step time column, us (finite, > 0 on every row).
        curves: calibrated kernel curves of the GPU the rows ran on.
        forms: candidate sets of :data:`~diffmodel.kernels.HOST_TERMS` names.
        max_steps: L-BFGS steps at most per fit.
        progress: optional callable receiving one line per candidate.

    Returns:
        A :class:`HostTermsChoice`: the set with the lowest mean held-out MAPE
        (ties, :data:`TIE_PP`: the fewest terms, then the earliest). Folds: each
        deployment of the rows held out in turn when there are several; else the
        first and second half of the rows (as ordered), each fitted on the other.

    Raises:
        ValueError: a bad frame, target or form, or fewer than 4 rows per fold.
    """
    forms = [tuple(f) for f in forms]
    bad = [f for f in forms if not f or any(t not in HOST_TERMS for t in f)]
    if not forms or bad:
        raise ValueError(
            f"forms must be non-empty sets of {HOST_TERMS}; got {bad or 'none'}"
        )
    y = target_values(frame, target)
    dev, x, labels, _, group = _prepare(frame, curves)
    if len(labels) >= 2:
        codes = np.unique(group)
        folds = [(group != g, group == g) for g in codes]
        names = tuple(labels)
    else:
        first = np.arange(len(y)) < len(y) // 2
        folds = [(~first, first), (first, ~first)]
        names = ("first half", "second half")
    small = [
        n
        for n, (tr, te) in zip(names, folds, strict=True)
        if min(tr.sum(), te.sum()) < 4
    ]
    if small:
        raise ValueError(f"fewer than 4 rows to fit or score with {small} held out")
    rows = {}
    for terms in forms:
        cols = [HOST_TERMS.index(t) for t in terms]
        xf = x[:, cols]
        scores = []
        if _idle(dev, xf).any():
            scores = [float("nan")] * len(folds)
        else:
            for train, test in folds:
                res, _ = _fit_arrays(dev[train], xf[train], y[train], max_steps)
                theta = np.exp(np.asarray(res.params, dtype=np.float64))
                scores.append(mape(y[test], dev[test] + xf[test] @ theta))
        name = " + ".join(terms)
        rows[name] = [*scores, float(np.mean(scores))]
        if progress:
            progress(f"host terms {name}: held-out MAPE {rows[name][-1]:.2f}%")
    table = pd.DataFrame.from_dict(rows, orient="index", columns=[*names, "mean"])
    table.index.name = "terms"
    means = table["mean"]
    if means.isna().all():
        raise ValueError(
            "no candidate form prices every row (steps without tokens need 'step' "
            "or 'request')"
        )
    near = means[means <= means.min() + TIE_PP]
    best = min(near.index, key=lambda n: (n.count("+"), list(table.index).index(n)))
    return HostTermsChoice(terms=tuple(best.split(" + ")), table=table, folds=names)
