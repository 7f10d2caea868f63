"""The study's baselines: the linear blackbox and per-experiment XGBoost.

- ``BlackBox``: ``t = b0 + b1 * prefill_tokens + b2 * decode_tokens``, by least
  squares; the model the roofline is meant to replace.
- ``XGBoostBaseline``: one gradient-boosted tree ensemble per experiment on the 30
  features of ``study_features``, hyperparameters chosen on the validation split.
- ``load_study_xgboost``: the study's own XGBoost test predictions.

Targets are in microseconds (``step_duration_us`` or ``iteration_time_us``), and so
are predictions.
"""

import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .._metrics import mape
from .._model._arch import architecture, canonical_model
from .._paths import default_data_dir

# --------------------------------------------------------------------------- blackbox


class BlackBox:
    """Ordinary least squares ``t = b0 + b1 * prefill_tokens + b2 * decode_tokens``.

    ``t`` is in the target's unit (microseconds); ``b0`` in microseconds, ``b1`` and
    ``b2`` in microseconds per token. One fit for all rows given: fit per experiment
    for the study's per-experiment blackbox.
    """

    n_params: int = 3

    def __init__(self) -> None:
        self.coef: np.ndarray | None = None

    def fit(self, frame: pd.DataFrame, target: str) -> "BlackBox":
        """Fit to column `target` of `frame` (no NaN allowed); returns ``self``."""
        y = _target(frame, target)
        x = self._design(frame)
        if len(y) < self.n_params:
            raise ValueError(f"BlackBox.fit needs at least 3 rows, got {len(y)}")
        self.coef = np.linalg.lstsq(x, y, rcond=None)[0]
        return self

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        """Predicted step time per row, in the target's unit (microseconds)."""
        if self.coef is None:
            raise ValueError("BlackBox.predict called before fit")
        return self._design(frame) @ self.coef

    @staticmethod
    def _design(frame: pd.DataFrame) -> np.ndarray:
        tokens = _columns(frame, ["batch.prefill_tokens", "batch.decode_tokens"])
        return np.column_stack([np.ones(len(frame)), tokens])


# --------------------------------------------------------------------------- features


def _study_arch(name: str) -> tuple[int, int, int, int, int, int, int]:
    """Hidden size, layers, KV heads, head dim, FFN size (per expert for MoE),
    experts and experts per token (1 and 1 when dense), from the model catalog."""
    a = architecture(name)
    moe = float(a.n_experts) > 0
    return tuple(
        int(x)
        for x in (
            a.hidden,
            a.n_layers,
            a.n_kv_heads,
            a.head_dim,
            a.expert_ffn if moe else a.ffn,
            a.n_experts if moe else 1,
            a.top_k if moe else 1,
        )
    )


# The study's four models (its features know no others).
_ARCH: dict[str, tuple[int, int, int, int, int, int, int]] = {
    name: _study_arch(name)
    for name in ("codellama-34b", "llama-2-7b", "llama-2-70b", "mixtral-8x7b")
}
_MODEL_ID: dict[str, int] = {name: i for i, name in enumerate(sorted(_ARCH))}
_BYTES_PER_PARAM = 2.0  # fp16/bf16 weights and KV cache
_BLOCK_TOKENS = 16  # vLLM KV block size
_MACHINE_BALANCE = 989.5e12 / 3.35e12  # H100 SXM dense bf16 FLOP/s per byte/s

STUDY_FEATURES: tuple[str, ...] = (
    # batch (5)
    "prefill_tokens",
    "decode_tokens",
    "scheduled_tokens",
    "num_prefill_reqs",
    "num_decode_reqs",
    # KV cache and queue (5)
    "kv_usage",
    "kv_blocks_used",
    "kv_blocks_free",
    "running_depth",
    "kv_pressure",
    # phase (4)
    "prefill_fraction",
    "decode_fraction",
    "is_mixed",
    "is_pure_prefill",
    # physics (8)
    "gemm_flops",
    "prefill_flops",
    "decode_flops",
    "weight_bytes",
    "kv_bytes",
    "arithmetic_intensity",
    "compute_bound",
    "active_param_ratio",
    # architecture (3)
    "model_id",
    "tp",
    "is_moe",
    # interactions (5)
    "prefill_x_decode",
    "kv_pressure_x_decode_reqs",
    "intensity_x_moe",
    "prefill_x_kv_usage",
    "batch_size_x_kv_pressure",
)


def study_features(frame: pd.DataFrame) -> pd.DataFrame:
    """The study's 30 engineered features, one row per step.

    A re-implementation with the study's themes (its feature code is not part of
    the public data); all per GPU where that matters, i.e. divided by ``tp``.

    - Batch (5): ``prefill_tokens``, ``decode_tokens``, ``scheduled_tokens`` (tokens),
      ``num_prefill_reqs``, ``num_decode_reqs`` (requests).
    - KV cache and queue (5): ``kv_usage`` (fraction), ``kv_blocks_used``,
      ``kv_blocks_free`` (16-token blocks), ``running_depth`` (requests),
      ``kv_pressure`` = used / total blocks.
    - Phase (4): ``prefill_fraction``, ``decode_fraction`` (of scheduled tokens; 0
      for an empty batch), ``is_mixed`` (prefill and decode requests), and
      ``is_pure_prefill`` (no decode request) flags.
    - Physics (8): ``gemm_flops`` = ``2 * tokens * L * (d (d + 2 d_kv) + d^2 + 3 d
      d_ff k) / tp`` (FLOP; ``k`` experts per token), its ``prefill_flops`` and
      ``decode_flops`` parts, ``weight_bytes`` = ``2 * L * (d (d + 2 d_kv) + d^2 + 3 d
      d_ff E) / tp`` (bytes, all ``E`` experts), ``kv_bytes`` = ``kv_blocks_used * 16
      * 2 d_kv * L * 2 / tp`` (bytes of resident KV cache), ``arithmetic_intensity``
      = ``gemm_flops / weight_bytes`` (FLOP per byte), ``compute_bound`` =
      intensity above H100's machine balance (989.5 TFLOP/s / 3.35 TB/s),
      ``active_param_ratio`` = ``k / E``.
    - Architecture (3): ``model_id`` (label code of the catalog name), ``tp`` (GPUs),
      ``is_moe``.
    - Interactions (5): ``prefill_x_decode`` (tokens^2), ``kv_pressure_x_decode_reqs``,
      ``intensity_x_moe``, ``prefill_x_kv_usage``, ``batch_size_x_kv_pressure``
      (requests x pressure).

    **Returns:** a float64 frame with the columns of ``STUDY_FEATURES``, on `frame`'s
    index. **Raises:** ``ValueError`` for missing columns or a model outside the
    study's four (Llama-2-7B/70B, CodeLlama-34B, Mixtral-8x7B).
    """
    needed = [
        "batch.prefill_tokens",
        "batch.decode_tokens",
        "batch.scheduled_tokens",
        "batch.num_prefill_reqs",
        "batch.num_decode_reqs",
        "kv.usage_gpu_ratio",
        "kv.blocks_total_gpu",
        "kv.blocks_free_gpu",
        "queue.running_depth",
        "model",
        "tp",
    ]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise ValueError(f"study_features: frame is missing columns {missing}")
    col = {c: frame[c].to_numpy(dtype=np.float64) for c in needed if c != "model"}
    arch = _arch_columns(frame["model"])
    f: dict[str, np.ndarray] = {}
    p, d = col["batch.prefill_tokens"], col["batch.decode_tokens"]
    s = col["batch.scheduled_tokens"]
    n_p, n_d = col["batch.num_prefill_reqs"], col["batch.num_decode_reqs"]
    f["prefill_tokens"], f["decode_tokens"], f["scheduled_tokens"] = p, d, s
    f["num_prefill_reqs"], f["num_decode_reqs"] = n_p, n_d

    total, free = col["kv.blocks_total_gpu"], col["kv.blocks_free_gpu"]
    used = total - free
    f["kv_usage"] = col["kv.usage_gpu_ratio"]
    f["kv_blocks_used"], f["kv_blocks_free"] = used, free
    f["running_depth"] = col["queue.running_depth"]
    f["kv_pressure"] = used / np.maximum(total, 1.0)

    f["prefill_fraction"] = p / np.maximum(s, 1.0)
    f["decode_fraction"] = d / np.maximum(s, 1.0)
    f["is_mixed"] = ((n_p > 0) & (n_d > 0)).astype(np.float64)
    f["is_pure_prefill"] = (n_d == 0).astype(np.float64)

    tp = col["tp"]
    hidden, layers, kv_dim, ffn = (
        arch["hidden"],
        arch["layers"],
        arch["kv_dim"],
        arch["ffn"],
    )
    attn_params = hidden * (hidden + 2 * kv_dim) + hidden * hidden
    flops_per_token = (
        2 * layers * (attn_params + 3 * hidden * ffn * arch["active"]) / tp
    )
    weight_params = layers * (attn_params + 3 * hidden * ffn * arch["experts"]) / tp
    f["gemm_flops"] = s * flops_per_token
    f["prefill_flops"] = p * flops_per_token
    f["decode_flops"] = d * flops_per_token
    f["weight_bytes"] = weight_params * _BYTES_PER_PARAM
    f["kv_bytes"] = used * _BLOCK_TOKENS * 2 * kv_dim * layers * _BYTES_PER_PARAM / tp
    f["arithmetic_intensity"] = f["gemm_flops"] / f["weight_bytes"]
    f["compute_bound"] = (f["arithmetic_intensity"] > _MACHINE_BALANCE).astype(float)
    f["active_param_ratio"] = arch["active"] / arch["experts"]

    f["model_id"] = arch["model_id"]
    f["tp"] = tp
    f["is_moe"] = (arch["experts"] > 1).astype(np.float64)

    f["prefill_x_decode"] = p * d
    f["kv_pressure_x_decode_reqs"] = f["kv_pressure"] * n_d
    f["intensity_x_moe"] = f["arithmetic_intensity"] * f["is_moe"]
    f["prefill_x_kv_usage"] = p * f["kv_usage"]
    f["batch_size_x_kv_pressure"] = (n_p + n_d) * f["kv_pressure"]
    return pd.DataFrame(f, index=frame.index, columns=list(STUDY_FEATURES))


def _arch_columns(models: pd.Series) -> dict[str, np.ndarray]:
    """Per-row architecture numbers for the model column."""
    names = models.map(canonical_model).to_numpy(dtype=object)
    unknown = sorted(set(names) - set(_ARCH))
    if unknown:
        raise ValueError(
            f"study_features: unknown models {unknown}; known: {sorted(_ARCH)}"
        )
    table = np.array([_ARCH[n] for n in names], dtype=np.float64).reshape(-1, 7)
    hidden, layers, kv_heads, head_dim, ffn, experts, active = table.T
    return {
        "hidden": hidden,
        "layers": layers,
        "kv_dim": kv_heads * head_dim,
        "ffn": ffn,
        "experts": experts,
        "active": active,
        "model_id": np.array([_MODEL_ID[n] for n in names], dtype=np.float64),
    }


# --------------------------------------------------------------------------- XGBoost

STUDY_GRID: Mapping[str, tuple] = {
    "max_depth": (4, 6, 8),
    "n_estimators": (100, 300),
    "learning_rate": (0.05, 0.1),
}
"""The study's hyperparameter grid (12 combinations)."""

_FIXED_PARAMS: Mapping[str, Any] = {
    "min_child_weight": 5,
    "subsample": 0.8,
    "colsample_bytree": 0.8,
    "tree_method": "hist",
    "verbosity": 0,
}


class XGBoostBaseline:
    """Per-experiment ``xgboost.XGBRegressor`` on ``study_features``.

    For each group of `by` (one experiment by default), every combination of `grid`
    is fitted on the training rows and the one with the lowest MAPE on that group's
    validation rows is kept (first in grid order on ties). Fixed settings follow the
    study: ``min_child_weight=5``, ``subsample=0.8``, ``colsample_bytree=0.8``;
    plus ``tree_method="hist"``, `n_jobs` threads and a fixed `random_state`.

    **Arguments:**

    - `grid`: name -> candidate values; default ``STUDY_GRID``.
    - `by`: the grouping column, or ``None`` for one model over all rows.
    - `random_state`, `n_jobs`: passed to XGBoost.

    After ``fit``, ``best_params[group]`` and ``valid_mape[group]`` (percent) record
    the choice, and ``n_params`` counts the leaves of all kept trees: each leaf holds
    one fitted constant (microseconds), the tree's split thresholds aside.
    """

    def __init__(
        self,
        *,
        grid: Mapping[str, Sequence] | None = None,
        by: str | None = "experiment_id",
        random_state: int = 42,
        n_jobs: int = 2,
    ) -> None:
        self.grid = dict(STUDY_GRID if grid is None else grid)
        unknown = sorted(set(self.grid) - set(STUDY_GRID))
        if unknown or not all(len(v) for v in self.grid.values()):
            raise ValueError(
                f"grid: keys must be among {sorted(STUDY_GRID)} with at least one "
                f"value each, got {self.grid!r}"
            )
        self.by = by
        self.random_state = random_state
        self.n_jobs = n_jobs
        self.models: dict[Any, Any] = {}
        self.best_params: dict[Any, dict] = {}
        self.valid_mape: dict[Any, float] = {}

    def fit(
        self, train_frame: pd.DataFrame, valid_frame: pd.DataFrame, target: str
    ) -> "XGBoostBaseline":
        """Grid-search and fit one model per group; returns ``self``.

        `target` is a column of both frames (microseconds, positive, no NaN); every
        group of `train_frame` needs rows in `valid_frame`.
        """
        train_groups = dict(self._groups(train_frame))
        valid_groups = dict(self._groups(valid_frame))
        absent = [g for g in train_groups if g not in valid_groups]
        if absent:
            raise ValueError(f"XGBoostBaseline.fit: no validation rows for {absent}")
        self.models, self.best_params, self.valid_mape = {}, {}, {}
        for group, train in train_groups.items():
            valid = valid_groups[group]
            x_train, y_train = study_features(train).to_numpy(), _target(train, target)
            x_valid, y_valid = study_features(valid).to_numpy(), _target(valid, target)
            best = None
            for params in _combinations(self.grid):
                model = self._regressor(params).fit(x_train, y_train)
                score = mape(y_valid, model.predict(x_valid))
                if best is None or score < best[0]:
                    best = (score, params, model)
            self.valid_mape[group], self.best_params[group], self.models[group] = best
        return self

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        """Predicted target per row of `frame` (microseconds), in row order."""
        if not self.models:
            raise ValueError("XGBoostBaseline.predict called before fit")
        out = np.full(len(frame), np.nan)
        positions = pd.Series(np.arange(len(frame)), index=frame.index)
        for group, rows in self._groups(frame):
            if group not in self.models:
                raise ValueError(
                    f"XGBoostBaseline.predict: no model fitted for {group!r}"
                )
            x = study_features(rows).to_numpy()
            out[positions.loc[rows.index].to_numpy()] = self.models[group].predict(x)
        return out

    @property
    def n_params(self) -> int:
        """Leaves of all trees of all kept models (one fitted value each)."""
        if not self.models:
            raise ValueError("XGBoostBaseline.n_params needs a fitted model")
        return sum(
            dump.count("leaf=")
            for model in self.models.values()
            for dump in model.get_booster().get_dump()
        )

    def _groups(self, frame: pd.DataFrame):
        if frame.index.has_duplicates:
            raise ValueError("XGBoostBaseline: frame index has duplicate labels")
        if self.by is None:
            return [(None, frame)] if len(frame) else []
        if self.by not in frame.columns:
            raise ValueError(f"XGBoostBaseline: frame has no column {self.by!r}")
        return list(frame.groupby(self.by, sort=True))

    def _regressor(self, params: Mapping[str, Any]):
        import xgboost

        return xgboost.XGBRegressor(
            **_FIXED_PARAMS,
            **params,
            n_jobs=self.n_jobs,
            random_state=self.random_state,
        )


def _combinations(grid: Mapping[str, Sequence]) -> list[dict[str, Any]]:
    combos: list[dict[str, Any]] = [{}]
    for name, values in grid.items():
        combos = [{**c, name: v} for c in combos for v in values]
    return combos


# --------------------------------------------------------------------------- helpers


def _columns(frame: pd.DataFrame, names: list[str]) -> np.ndarray:
    missing = [c for c in names if c not in frame.columns]
    if missing:
        raise ValueError(f"frame is missing columns {missing}")
    return frame[names].to_numpy(dtype=np.float64)


def _target(frame: pd.DataFrame, target: str) -> np.ndarray:
    y = _columns(frame, [target])[:, 0]
    bad = ~np.isfinite(y)
    if bad.any():
        raise ValueError(
            f"target {target!r} has NaN or infinite values (first at row "
            f"{int(np.flatnonzero(bad)[0])}); select the rows where it is defined"
        )
    return y


# --------------------------------------------------------------------------- study


STUDY_PREDICTION_COLUMNS: tuple[str, ...] = (
    "experiment_id",
    "model",
    "workload",
    "step.id",
    "step.duration_us",
    "predicted_us",
    "model_type",
)


def load_study_xgboost(path: str | os.PathLike | None = None) -> pd.DataFrame:
    """The study's per-experiment XGBoost test predictions.

    **Arguments:**

    - `path`: ``seed_xgboost_test_predictions.csv``; default the copy under
      ``default_data_dir()/stepml``.

    **Returns:** columns ``STUDY_PREDICTION_COLUMNS`` (``step.duration_us`` actual,
    ``predicted_us`` the study's prediction, both microseconds, float64), sorted by
    ``(experiment_id, step.id)``.

    **Raises:** ``ValueError`` for missing columns or missing values.
    """
    if path is None:
        path = default_data_dir() / "stepml" / "seed_xgboost_test_predictions.csv"
    frame = pd.read_csv(pathlib.Path(path))
    missing = [c for c in STUDY_PREDICTION_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"study predictions are missing columns {missing}")
    for name in STUDY_PREDICTION_COLUMNS:
        isna = frame[name].isna().to_numpy()
        if isna.any():
            raise ValueError(
                f"study predictions: column {name!r} has a missing value at row "
                f"{int(np.flatnonzero(isna)[0])}"
            )
    frame = frame.astype(
        {
            "step.id": np.int64,
            "step.duration_us": np.float64,
            "predicted_us": np.float64,
        }
    )
    return frame.sort_values(["experiment_id", "step.id"], kind="stable").reset_index(
        drop=True
    )
