import json

import numpy as np
import pandas as pd
import pytest

from diffmodel._metrics import mape, metrics_table
from diffmodel.baselines._baselines import (
    _ARCH,
    STUDY_FEATURES,
    BlackBox,
    XGBoostBaseline,
    load_study_xgboost,
    study_features,
)
from diffmodel.data._splits import temporal_split
from diffmodel.data._traces import add_targets, load_steps

SMALL_GRID = {"max_depth": (2, 3), "n_estimators": (10,), "learning_rate": (0.3,)}


def _steps(n: int = 60, seed: int = 0) -> pd.DataFrame:
    """Synthetic steps of two experiments; target linear in the decode tokens."""
    rng = np.random.default_rng(seed)
    prefill = rng.integers(0, 512, n) * (rng.random(n) < 0.3)
    decode = rng.integers(1, 128, n)
    total = np.full(n, 1000)
    free = total - rng.integers(10, 500, n)
    frame = pd.DataFrame(
        {
            "experiment_id": np.where(np.arange(n) % 2 == 0, "e1", "e2"),
            "step.id": np.arange(n),
            "model": np.where(np.arange(n) % 2 == 0, "llama-2-70b-hf", "codellama-34b"),
            "tp": np.where(np.arange(n) % 2 == 0, 4, 2),
            "batch.prefill_tokens": prefill,
            "batch.decode_tokens": decode,
            "batch.scheduled_tokens": prefill + decode,
            "batch.num_prefill_reqs": (prefill > 0).astype(int),
            "batch.num_decode_reqs": decode,
            "kv.usage_gpu_ratio": (total - free) / total,
            "kv.blocks_total_gpu": total,
            "kv.blocks_free_gpu": free,
            "queue.running_depth": decode + (prefill > 0),
        }
    )
    frame["t_us"] = 500.0 + 3.0 * decode + 0.5 * prefill + rng.normal(0, 1.0, n)
    return frame


# --------------------------------------------------------------------------- blackbox


def test_blackbox_recovers_exact_coefficients():
    frame = _steps()
    frame["t_us"] = (
        100.0
        + 0.25 * frame["batch.prefill_tokens"]
        + 7.0 * frame["batch.decode_tokens"]
    )
    model = BlackBox().fit(frame, "t_us")
    np.testing.assert_allclose(model.coef, [100.0, 0.25, 7.0], rtol=1e-9)
    np.testing.assert_allclose(model.predict(frame), frame["t_us"], rtol=1e-9)
    assert model.n_params == 3 == BlackBox.n_params


def test_blackbox_hand_computed():
    # Three points with prefill = 0: intercept and decode slope from two of them,
    # prefill slope from the third.
    frame = pd.DataFrame(
        {
            "batch.prefill_tokens": [0, 0, 10],
            "batch.decode_tokens": [1, 3, 1],
            "t_us": [12.0, 16.0, 32.0],
        }
    )
    np.testing.assert_allclose(BlackBox().fit(frame, "t_us").coef, [10.0, 2.0, 2.0])


def test_blackbox_errors():
    frame = _steps()
    with pytest.raises(ValueError, match="before fit"):
        BlackBox().predict(frame)
    with pytest.raises(ValueError, match=r"missing columns \['nope'\]"):
        BlackBox().fit(frame, "nope")
    with pytest.raises(ValueError, match=r"missing columns \['batch.decode_tokens'\]"):
        BlackBox().fit(frame.drop(columns="batch.decode_tokens"), "t_us")
    frame.loc[3, "t_us"] = np.nan
    with pytest.raises(ValueError, match="'t_us' has NaN.*row 3"):
        BlackBox().fit(frame, "t_us")
    with pytest.raises(ValueError, match="at least 3 rows"):
        BlackBox().fit(_steps().iloc[:2], "t_us")


# --------------------------------------------------------------------------- features


def test_study_features_has_30_columns():
    features = study_features(_steps())
    assert len(STUDY_FEATURES) == 30 == len(set(STUDY_FEATURES))
    assert list(features.columns) == list(STUDY_FEATURES)
    assert (features.dtypes == np.float64).all()
    assert np.isfinite(features.to_numpy()).all()


def test_study_features_hand_computed():
    frame = _steps().iloc[:1].copy()
    frame[["batch.prefill_tokens", "batch.decode_tokens", "batch.scheduled_tokens"]] = [
        [2046, 2, 2048]
    ]
    frame[["batch.num_prefill_reqs", "batch.num_decode_reqs"]] = [[8, 2]]
    frame[["kv.blocks_total_gpu", "kv.blocks_free_gpu"]] = [[1000, 750]]
    row = study_features(frame).iloc[0]
    # Llama-2-70B at TP4: d 8192, 80 layers, d_kv 1024, d_ff 28672.
    per_layer = 8192 * (8192 + 2 * 1024) + 8192 * 8192 + 3 * 8192 * 28672
    assert row["gemm_flops"] == pytest.approx(2 * 2048 * 80 * per_layer / 4)
    assert row["decode_flops"] == pytest.approx(2 * 2 * 80 * per_layer / 4)
    assert row["weight_bytes"] == pytest.approx(2 * 80 * per_layer / 4)
    assert row["arithmetic_intensity"] == pytest.approx(2048.0)
    assert row["compute_bound"] == 1.0
    assert row["kv_blocks_used"] == 250 and row["kv_pressure"] == 0.25
    assert row["kv_bytes"] == pytest.approx(250 * 16 * 2 * 1024 * 80 * 2 / 4)
    assert row["prefill_fraction"] == pytest.approx(2046 / 2048)
    assert (row["is_mixed"], row["is_pure_prefill"], row["is_moe"]) == (1.0, 0.0, 0.0)
    assert row["prefill_x_decode"] == 4092
    assert row["batch_size_x_kv_pressure"] == pytest.approx(10 * 0.25)
    # Label codes in sorted name order: codellama-34b, llama-2-70b, llama-2-7b, ...
    assert row["model_id"] == 1 and row["tp"] == 4


def test_study_features_moe_and_empty_batch():
    frame = _steps().iloc[:1].copy()
    frame["model"] = "mixtral-8x7b-v0-1"
    frame[["batch.prefill_tokens", "batch.decode_tokens", "batch.scheduled_tokens"]] = 0
    row = study_features(frame).iloc[0]
    assert (row["is_moe"], row["active_param_ratio"]) == (1.0, 0.25)
    assert row["prefill_fraction"] == 0.0 and row["gemm_flops"] == 0.0


def test_study_features_aliases_agree():
    frame = _steps()
    other = frame.assign(model=frame["model"].replace("llama-2-70b-hf", "llama-2-70b"))
    pd.testing.assert_frame_equal(study_features(frame), study_features(other))


def test_study_features_errors():
    with pytest.raises(ValueError, match=r"unknown model 'gpt-9'"):
        study_features(_steps().assign(model="gpt-9"))
    with pytest.raises(ValueError, match=r"missing columns \['tp'\]"):
        study_features(_steps().drop(columns="tp"))


@pytest.mark.parametrize(
    ("name", "file"),
    [
        ("codellama-34b", "codellama-34b-instruct-hf.json"),
        ("llama-2-7b", "llama-2-7b-hf.json"),
        ("llama-2-70b", "llama-2-70b-hf.json"),
        ("mixtral-8x7b", "mixtral-8x7b-v0.1.json"),
    ],
)
def test_arch_table_matches_configs(data_dir, name, file):
    cfg = json.loads((data_dir / "model_configs" / file).read_text())
    heads = cfg["num_attention_heads"]
    assert _ARCH[name] == (
        cfg["hidden_size"],
        cfg["num_hidden_layers"],
        cfg["num_key_value_heads"],
        cfg["hidden_size"] // heads,
        cfg["intermediate_size"],
        cfg.get("num_local_experts", 1),
        cfg.get("num_experts_per_tok", 1),
    )


# --------------------------------------------------------------------------- XGBoost


def _fitted(frame: pd.DataFrame) -> XGBoostBaseline:
    labels = temporal_split(frame)
    return XGBoostBaseline(grid=SMALL_GRID).fit(
        frame[labels == "train"], frame[labels == "valid"], "t_us"
    )


@pytest.mark.slow
def test_xgboost_fits_per_experiment():
    frame = _steps(200)
    model = _fitted(frame)
    assert sorted(model.models) == ["e1", "e2"]
    for group, params in model.best_params.items():
        assert params["max_depth"] in (2, 3) and params["n_estimators"] == 10
        valid = frame[
            (temporal_split(frame) == "valid") & (frame.experiment_id == group)
        ]
        prediction = model.models[group].predict(study_features(valid).to_numpy())
        assert model.valid_mape[group] == pytest.approx(mape(valid["t_us"], prediction))
    prediction = model.predict(frame)
    assert prediction.shape == (200,) and np.isfinite(prediction).all()
    assert mape(frame["t_us"], prediction) < 20.0


def test_xgboost_predict_follows_row_order_and_is_deterministic():
    frame = _steps(200)
    model = _fitted(frame)
    shuffled = frame.sample(frac=1.0, random_state=1)
    np.testing.assert_array_equal(
        model.predict(shuffled), model.predict(frame)[shuffled.index.to_numpy()]
    )
    np.testing.assert_array_equal(_fitted(frame).predict(frame), model.predict(frame))


def test_xgboost_n_params_counts_leaves():
    model = _fitted(_steps(200))
    leaves = 0
    for regressor in model.models.values():
        trees = regressor.get_booster().trees_to_dataframe()
        leaves += int((trees["Feature"] == "Leaf").sum())
    assert model.n_params == leaves > 0


def test_xgboost_single_model():
    frame = _steps(200)
    labels = temporal_split(frame)
    model = XGBoostBaseline(grid=SMALL_GRID, by=None).fit(
        frame[labels == "train"], frame[labels == "valid"], "t_us"
    )
    assert list(model.models) == [None]
    assert np.isfinite(model.predict(frame)).all()


def test_xgboost_errors():
    frame = _steps(200)
    labels = temporal_split(frame)
    train, valid = frame[labels == "train"], frame[labels == "valid"]
    with pytest.raises(ValueError, match="grid: keys must be among"):
        XGBoostBaseline(grid={"gamma": (0.0,)})
    with pytest.raises(ValueError, match="at least one value"):
        XGBoostBaseline(grid={"max_depth": ()})
    model = XGBoostBaseline(grid=SMALL_GRID)
    with pytest.raises(ValueError, match="before fit"):
        model.predict(frame)
    with pytest.raises(ValueError, match="needs a fitted model"):
        _ = model.n_params
    with pytest.raises(ValueError, match=r"no validation rows for \['e2'\]"):
        model.fit(train, valid[valid.experiment_id == "e1"], "t_us")
    with pytest.raises(ValueError, match="no column 'experiment_id'"):
        model.fit(train.drop(columns="experiment_id"), valid, "t_us")
    bad = train.copy()
    bad.loc[bad.index[0], "t_us"] = np.nan
    with pytest.raises(ValueError, match="'t_us' has NaN"):
        model.fit(bad, valid, "t_us")
    with pytest.raises(ValueError, match="duplicate labels"):
        model.fit(pd.concat([train, train]), valid, "t_us")
    model.fit(train[train.experiment_id == "e1"], valid, "t_us")
    with pytest.raises(ValueError, match="no model fitted for 'e2'"):
        model.predict(frame)


def test_xgboost_on_real_subset(data_dir):
    """A reduced grid on the first 600 steps of each public experiment."""
    frame = add_targets(load_steps(data_dir / "stepml" / "steps.parquet"))
    frame = frame.groupby("experiment_id").head(600)
    labels = temporal_split(frame)
    model = XGBoostBaseline(grid=SMALL_GRID).fit(
        frame[labels == "train"], frame[labels == "valid"], "step_duration_us"
    )
    test = frame[labels == "test"].assign(predicted=lambda f: model.predict(f))
    table = metrics_table(test, actual="step_duration_us", predicted="predicted")
    assert len(table) == 3 and (table["n"] == 120).all()
    assert np.isfinite(table["mape"]).all()


# --------------------------------------------------------------------------- seed


def test_load_study_xgboost(data_dir):
    seed = load_study_xgboost(data_dir / "stepml" / "seed_xgboost_test_predictions.csv")
    assert seed["experiment_id"].nunique() == 16
    assert seed["predicted_us"].dtype == np.float64
    assert seed["step.id"].dtype == np.int64
    table = metrics_table(seed, actual="step.duration_us", predicted="predicted_us")
    assert table["mape"].mean() == pytest.approx(34.0, abs=0.05)


def test_load_study_xgboost_default_path(data_dir, monkeypatch):
    monkeypatch.setattr(
        "diffmodel.baselines._baselines.default_data_dir", lambda: data_dir
    )
    assert len(load_study_xgboost()) == 24_550


def test_load_study_xgboost_errors(tmp_path):
    frame = pd.DataFrame(
        {
            "experiment_id": ["e", "e"],
            "model": ["m", "m"],
            "workload": ["w", "w"],
            "step.id": [2, 1],
            "step.duration_us": [10, 20],
            "predicted_us": [11.0, 19.0],
            "model_type": ["xgboost_per_exp"] * 2,
        }
    )
    frame.to_csv(tmp_path / "ok.csv", index=False)
    assert list(load_study_xgboost(tmp_path / "ok.csv")["step.id"]) == [1, 2]
    frame.drop(columns="predicted_us").to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(ValueError, match=r"missing columns \['predicted_us'\]"):
        load_study_xgboost(tmp_path / "short.csv")
    frame.assign(predicted_us=[1.0, None]).to_csv(tmp_path / "nan.csv", index=False)
    with pytest.raises(ValueError, match="'predicted_us' has a missing value at row 1"):
        load_study_xgboost(tmp_path / "nan.csv")
