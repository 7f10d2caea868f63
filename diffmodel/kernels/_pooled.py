"""Curves fitted on several GPUs at once: shared shape parameters, per-GPU offsets.

Partial pooling: every GPU ``g`` runs the shared curves with its saturated compute
and bandwidth efficiencies, its kernel floor and its per-unit cost moved by an
offset ``o_g`` (logit shifts of ``eta_max``, log factors on the kernel floor and
the per-unit cost), and the loss is

    sum_g mean_{i in g} (ln t_i - ln y_i)^2 / G  +  penalty * mean(o^2),

so the shared curves describe a typical GPU (what an unseen GPU gets, offset 0) and
each GPU's own data moves only its offsets, by as much as its data warrant.

Many fits that differ only in which rows they train on (folds: leave one GPU out,
held-out shapes) run as one stacked optimisation: curves and offsets carry a leading
fold axis and the folds' losses are summed, which keeps them independent.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from ._calibrate import FitOptions, two_stage_minimise
from ._curves import AllReduceCurve, RooflineCurves

N_OFFSETS = 4  # compute eta_max, bandwidth eta_max, kernel floor, per-unit cost


def shifted(curves: RooflineCurves | AllReduceCurve, offset: ArrayLike):
    """``curves`` moved by ``offset = (compute logit, bandwidth logit, latency,
    log per-unit cost)``.

    Each entry broadcasts (one per kernel is fine); an all-reduce curve takes the
    bandwidth and latency entries. Parameters a curve lacks are left alone.
    """
    o = jnp.asarray(offset)
    o_f, o_b, o_l, o_u = o[..., 0], o[..., 1], o[..., 2], o[..., 3]

    def move(sat, by):
        return eqx_replace(sat, raw_eta_max=sat.raw_eta_max + by)

    if isinstance(curves, AllReduceCurve):
        return eqx_replace(
            curves,
            raw_latency=curves.raw_latency + o_l,
            bandwidth=move(curves.bandwidth, o_b),
        )
    return eqx_replace(
        curves,
        flops=move(curves.flops, o_f),
        bandwidth=move(curves.bandwidth, o_b),
        log_latency_us=None
        if curves.log_latency_us is None
        else curves.log_latency_us + o_l,
        log_unit_ns=None if curves.log_unit_ns is None else curves.log_unit_ns + o_u,
    )


def eqx_replace(module, **changes):
    """A copy of an ``eqx.Module`` with some fields replaced."""
    import equinox as eqx

    names = list(changes)
    return eqx.tree_at(
        lambda m: [getattr(m, n) for n in names],
        module,
        [changes[n] for n in names],
        is_leaf=lambda x: x is None,
    )


def fold_weights(
    train: np.ndarray, gpu: np.ndarray, n_gpus: int
) -> Float[Array, "folds n"]:
    """Row weights of each fold: ``1 / (rows of g in the fold x GPUs in the fold)``
    on training rows, 0 elsewhere, so each GPU counts once whatever its rows.

    ``train``: boolean ``[folds, n]``; ``gpu``: integer GPU index per row.
    """
    train = np.asarray(train, bool)
    if train.ndim != 2 or train.shape[1] != len(gpu):
        raise ValueError(f"train must be [folds, {len(gpu)}], got {train.shape}")
    w = np.zeros(train.shape)
    for f in range(train.shape[0]):
        counts = np.bincount(gpu[train[f]], minlength=n_gpus)
        if not counts.any():
            raise ValueError(f"fold {f} has no training rows")
        per = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)
        w[f] = np.where(train[f], per[gpu], 0.0) / (counts > 0).sum()
    return jnp.asarray(w)


def fit_folds(
    predict: Callable,
    latency_us: ArrayLike,
    train: np.ndarray,
    gpu: np.ndarray,
    init,
    *,
    n_gpus: int,
    offsets: bool = True,
    penalty: float = 1.0,
    options: FitOptions | None = None,
):
    """Fit one (shared curves, per-GPU offsets) per fold in a single optimisation.

    ``predict(curves_per_row)`` returns the time (us) of every row for curves whose
    parameters broadcast per row. ``train``: ``[folds, n]`` training rows of each
    fold; ``gpu``: the GPU index (``0..n_gpus-1``) of each row. ``offsets=False``
    fits the shared curves alone (complete pooling; one GPU: its own curves).

    Returns ``(curves, offsets)`` with a leading fold axis; offsets
    ``[folds, n_gpus, 4]`` (zeros without ``offsets``).
    """
    gpu = np.asarray(gpu, int)
    weights = fold_weights(train, gpu, n_gpus)
    log_y = jnp.log(jnp.asarray(latency_us, float))
    n_folds = weights.shape[0]
    stacked = jax.tree.map(lambda x: jnp.stack([x] * n_folds), init)
    zeros = jnp.zeros((n_folds, n_gpus, N_OFFSETS))
    g = jnp.asarray(gpu)

    def fold_loss(curves, off, w):
        pred = predict(shifted(curves, off[g]))
        return jnp.sum(w * (jnp.log(pred) - log_y) ** 2)

    def loss(params):
        curves, off = params
        off = off if offsets else jnp.zeros_like(off)
        fits = jax.vmap(fold_loss)(curves, off, weights)
        return jnp.sum(fits) + penalty * jnp.sum(jnp.mean(off**2, axis=(1, 2)))

    options = FitOptions() if options is None else options
    curves, off = two_stage_minimise(loss, (stacked, zeros), options)
    return curves, (off if offsets else jnp.zeros_like(off))


def fold(tree, i: int):
    """The ``i``-th fold of stacked curves or offsets."""
    return jax.tree.map(lambda x: x[i], tree)
