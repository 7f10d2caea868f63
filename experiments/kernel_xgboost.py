"""A black box beside the kernel curves: XGBoost on the same rows and splits.

``experiments/gpus.py`` scores the physics-based curves per GPU on held-out shapes
and on a GPU left out. This module gives both protocols a gradient-boosted tree
ensemble (``xgboost.XGBRegressor`` on log latency) that sees the same work as the
curves, as features:

- the work's sizes, log: FLOPs, HBM bytes, parallel work units (thread blocks),
  and where the family has them the scheduled blocks, serial main-loop depth,
  quantization-pass bytes, activation rows, exponentials, the expert-parallel and
  tuned-configuration marks;
- the same work in portable units, log: time at the compute peak and at HBM
  bandwidth (us), waves of the SM count, bytes over the L2 size;
- the GPU's published specs, log: compute peak of the kernel's dtype, HBM
  bandwidth, SM count, L2 size, and for attention the exponential rate
  (``sms x clock`` times the exponentials per SM and clock).

All-reduce rows have their message bytes, GPU count, link and HBM bandwidth.

So on held-out shapes it shows how far a flexible fit of the GPU's own rows gets
(the noise and irregularity of the tables themselves), and on a GPU left out how
well a black box with the same specs ports: the references the curves' figures sit
beside. Hyperparameters: tree depth 4 or 6 (500 trees, learning rate 0.05), chosen
per fit by a split of its training rows (whole shapes, or whole GPUs).
"""

import numpy as np

# Candidate settings; the depth is chosen per fit on an inner split.
DEPTHS = (4, 6)
N_TREES = 500
LEARNING_RATE = 0.05


def _log(x) -> np.ndarray:
    return np.log(np.maximum(np.asarray(x, float), 1e-12))


def work_features(work) -> np.ndarray:
    """``[rows, features]`` of one family's :class:`~diffmodel.kernels.KernelWork`
    (every GPU's rows concatenated): its sizes, portable sizes and the GPU's
    specs, log (see the module docstring). Optional fields the work lacks are
    left out; those it has enter as ``log(x + 1)`` where they can be 0."""
    cols = [
        _log(work.flops),
        _log(work.bytes),
        _log(work.units),
        _log(work.peak_flops),
        _log(work.bandwidth),
        _log(np.asarray(work.flops) / np.asarray(work.peak_flops) * 1e6),
        _log(np.asarray(work.bytes) / np.asarray(work.bandwidth) * 1e6),
    ]
    if work.sms is not None:
        cols += [_log(work.sms), _log(np.asarray(work.units) / np.asarray(work.sms))]
    if work.l2 is not None:
        cols += [_log(work.l2), _log(np.asarray(work.bytes) / np.asarray(work.l2))]
    for name in (
        "blocks",
        "depth",
        "pre_bytes",
        "rows",
        "exps",
        "expert_parallel",
        "tuned",
    ):
        x = getattr(work, name)
        if x is not None:
            cols.append(np.log1p(np.asarray(x, float)))
    if work.exp_rate is not None:
        cols.append(_log(work.exp_rate))
    return np.column_stack(cols)


def allreduce_features(message_bytes, num_gpus, hw_rows) -> np.ndarray:
    """``[rows, 4]``: log message bytes, GPU count, link and HBM bandwidth."""
    return np.column_stack(
        [
            _log(message_bytes),
            _log(num_gpus),
            _log(hw_rows.link_bw),
            _log(hw_rows.hbm_bw),
        ]
    )


def _model(depth: int, seed: int):
    import xgboost

    return xgboost.XGBRegressor(
        n_estimators=N_TREES,
        max_depth=depth,
        learning_rate=LEARNING_RATE,
        subsample=0.8,
        colsample_bytree=0.8,
        random_state=seed,
        n_jobs=2,
    )


def fit_predict(
    x: np.ndarray,
    y_us: np.ndarray,
    train: np.ndarray,
    groups: np.ndarray,
    seed: int = 0,
) -> tuple[np.ndarray, int]:
    """Predictions (us) on every row of ``x``, and the node count, of an ensemble
    fitted on the rows ``train`` marks, on log latency. The depth is the one of
    :data:`DEPTHS` with the lower MAPE when a quarter of the training ``groups``
    (whole shapes, or whole GPUs; at least one) is held out of the training rows.

    Raises ``ValueError`` when fewer than two groups are in training or a latency
    is not positive."""
    y_us = np.asarray(y_us, float)
    if not (y_us[train] > 0).all():
        raise ValueError("kernel latencies must be positive (us)")
    g = np.unique(groups[train])
    if g.size < 2:
        raise ValueError("the black box needs at least two training groups")
    rng = np.random.default_rng(seed)
    inner_test = rng.choice(g, size=max(1, g.size // 4), replace=False)
    ival = train & np.isin(groups, inner_test)
    itrain = train & ~ival
    ly = np.log(y_us)
    scores = []
    for depth in DEPTHS:
        m = _model(depth, seed).fit(x[itrain], ly[itrain])
        p = np.exp(m.predict(x[ival]))
        scores.append(np.mean(np.abs(p - y_us[ival]) / y_us[ival]))
    depth = DEPTHS[int(np.argmin(scores))]
    m = _model(depth, seed).fit(x[train], ly[train])
    nodes = len(m.get_booster().trees_to_dataframe())
    return np.exp(m.predict(x).astype(float)), nodes
