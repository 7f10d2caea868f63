import numpy as np
import pandas as pd
import pytest

from diffmodel._app._reproduce import (
    METHODS,
    RESULT_COLUMNS,
    _folds,
    data_root,
    reproduce,
    results_markdown,
    short_name,
)
from diffmodel._app._reproduce_methods import _blackbox, _study_xgboost
from diffmodel._metrics import mape
from diffmodel.baselines._baselines import load_study_xgboost
from diffmodel.data._splits import temporal_split
from diffmodel.data._traces import add_targets, load_steps


@pytest.fixture(scope="module")
def steps(data_dir):
    return add_targets(load_steps(data_dir / "stepml" / "steps.parquet"))


def test_temporal_split_matches_seed_sizes(steps, data_dir):
    sizes = pd.read_csv(data_dir / "stepml" / "seed_split_sizes.csv")
    sizes = sizes.set_index("experiment_id")
    (fold,) = _folds(steps, "temporal")
    for exp in steps["experiment_id"].unique():
        assert (fold.train["experiment_id"] == exp).sum() == sizes.loc[exp, "n_train"]
        assert (fold.test["experiment_id"] == exp).sum() == sizes.loc[exp, "n_test"]


def test_iteration_time_rows_and_transfer_folds(steps):
    defined = steps[steps["iteration_time_us"].notna()]
    assert len(defined) == 1967
    lomo = _folds(defined, "lomo")
    assert [f.name for f in lomo] == ["codellama-34b", "llama-2-70b"]
    for fold in lomo:
        # Train and valid come from the other model, test is all of the held-out one.
        assert len(fold.train) + len(fold.valid) + len(fold.test) == len(defined)
        assert abs(len(fold.valid) / (len(fold.train) + len(fold.valid)) - 0.2) < 0.01
        held = fold.test["model"].str.replace("-hf", "").unique()
        assert list(held) == [fold.name]
        assert fold.name not in set(fold.train["model"].str.replace("-hf", ""))
    lowo = _folds(defined, "lowo")
    assert [f.name for f in lowo] == ["codegen", "general"]
    assert all((f.test["workload"] == f.name).all() for f in lowo)


def test_blackbox_is_least_squares_per_experiment(steps):
    (fold,) = _folds(steps, "temporal")
    outcome = _blackbox(fold, "step_duration_us")
    predicted = pd.Series(outcome.predicted, index=fold.test.index)
    for exp, test in fold.test.groupby("experiment_id"):
        train = fold.train[fold.train["experiment_id"] == exp]
        x = np.column_stack(
            [
                np.ones(len(train)),
                train["batch.prefill_tokens"],
                train["batch.decode_tokens"],
            ]
        )
        coef = np.linalg.lstsq(x, train["step_duration_us"], rcond=None)[0]
        by_hand = (
            coef[0]
            + coef[1] * test["batch.prefill_tokens"]
            + coef[2] * test["batch.decode_tokens"]
        )
        np.testing.assert_allclose(predicted[test.index], by_hand, rtol=1e-9)
        assert outcome.n_params[exp] == 3


def test_study_xgboost_matches_the_temporal_test_split(steps, data_dir):
    seed = load_study_xgboost(data_dir / "stepml" / "seed_xgboost_test_predictions.csv")
    (fold,) = _folds(steps, "temporal")
    outcome = _study_xgboost(fold, seed)
    assert np.isfinite(outcome.predicted).all()
    test = fold.test.assign(p=outcome.predicted)
    for exp, rows in seed.groupby("experiment_id"):
        if exp in set(test["experiment_id"]):
            ours = test[test["experiment_id"] == exp]
            assert mape(ours["step_duration_us"], ours["p"]) == pytest.approx(
                mape(rows["step.duration_us"], rows["predicted_us"])
            )


@pytest.mark.slow
def test_quick_end_to_end(data_dir, tmp_path, steps):
    assert data_root(data_dir / "stepml") == data_dir
    results = reproduce(
        data=data_dir / "stepml",  # the traces' folder stands for the data root
        out=tmp_path,
        quick=True,
        targets=("iteration_time",),
        protocols=("temporal", "lowo"),
        # The kernel-calibrated methods: see the tests below.
        methods=[m for m in METHODS if "kernels" not in m and "other-gpus" not in m],
        progress=None,
    )
    assert list(results.columns) == list(RESULT_COLUMNS)
    on_disk = pd.read_csv(tmp_path / "results.csv")
    assert on_disk.shape == results.shape
    methods = [
        m
        for m in METHODS
        if m != "study-xgboost" and "kernels" not in m and "other-gpus" not in m
    ]
    assert list(results["method"].unique()) == methods
    # One row per (protocol, method, experiment): each experiment is tested once.
    assert len(results) == 2 * len(methods) * 3
    assert not results.duplicated(["protocol", "method", "experiment_id"]).any()

    per_group = ["diffmodel-per-model", "study-36", "diffmodel-host-per-model"]
    per_model = results[results["method"].isin(per_group)]
    unseen = (per_model["protocol"] == "lowo") & per_model[
        "experiment_id"
    ].str.contains("codellama")
    assert per_model.loc[unseen, "mape"].isna().all()
    assert per_model.loc[unseen, "note"].str.startswith("not applicable").all()
    assert per_model.loc[~unseen, "mape"].notna().all()
    others = results[~results["method"].isin(per_group)]
    assert others["mape"].notna().all() and (others["mape"] > 0).all()
    assert (
        results.loc[results["method"] == "diffmodel-roofline", "n_params"] == 0
    ).all()
    # Intervals: scored for the fitted factor sets, absent for the others.
    with_interval = results["method"].isin(
        ["diffmodel-global", "diffmodel-per-model", "diffmodel-hierarchical"]
        + ["study-9", "study-36", "diffmodel-kernel-sum-host"]
    )
    scored = results[with_interval & results["mape"].notna()]
    assert scored["coverage90"].between(0, 1).all() and (scored["width90"] > 0).all()
    assert results.loc[~with_interval, ["coverage90", "width90"]].isna().all().all()

    # The black box of the table is the hand-made one on the same quick split.
    quick = _quick_rows(data_dir)
    split = temporal_split(quick)
    table = results[
        (results["method"] == "blackbox") & (results["protocol"] == "temporal")
    ]
    for exp, row in table.set_index("experiment_id").iterrows():
        rows = quick[quick["experiment_id"] == exp]
        train, test = (
            rows[split[rows.index] == "train"],
            rows[split[rows.index] == "test"],
        )

        def design(f):
            return np.column_stack(
                [np.ones(len(f)), f["batch.prefill_tokens"], f["batch.decode_tokens"]]
            )

        coef = np.linalg.lstsq(design(train), train["iteration_time_us"], rcond=None)[0]
        expected = mape(test["iteration_time_us"], design(test) @ coef)
        assert row["mape"] == pytest.approx(expected, rel=1e-9)
        assert row["n_test"] == len(test)

    text = (tmp_path / "results.md").read_text()
    assert text == results_markdown(results)
    assert (
        "### iteration_time — temporal" in text and "### iteration_time — lowo" in text
    )
    assert "llama-2-70b-tp4-general" in text and "(2/3)" in text
    assert "### iteration_time — 90% intervals" in text


def test_markdown_table_layout():
    rows = []
    for method, values in (("a", [10.0, 20.0]), ("b", [30.0, np.nan])):
        for exp, v in zip(
            ["20260101-000000-x-general", "20260101-000001-y"], values, strict=True
        ):
            rows.append(
                dict.fromkeys(RESULT_COLUMNS, np.nan)
                | dict(
                    target="step_duration",
                    protocol="temporal",
                    method=method,
                    experiment_id=exp,
                    mape=v,
                    n_params=3,
                    note="",
                )
            )
    text = results_markdown(pd.DataFrame(rows))
    lines = text.splitlines()
    assert lines[2] == "| method | x-general | y | mean | <15% | <25% | params |"
    assert lines[4] == "| a | 10.0 | 20.0 | 15.0 | 1 | 2 | 3 |"
    assert lines[5] == "| b | 30.0 | n/a | 30.0 (1/2) | 0 | 0 | 3 |"
    assert short_name("20260217-202857-llama-2-70b-tp4-general") == (
        "llama-2-70b-tp4-general"
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(targets=("latency",)),
        dict(protocols=("random",)),
        dict(methods=("linear",)),
        dict(experiments=("no-such-experiment",)),
        dict(workers=0),
    ],
)
def test_bad_arguments_raise(data_dir, tmp_path, kwargs):
    with pytest.raises(ValueError):
        reproduce(data=data_dir, out=tmp_path, progress=None, **kwargs)


def test_missing_data_raises(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        reproduce(data=tmp_path, out=tmp_path / "out", progress=None)


@pytest.mark.slow
def test_kernel_rows_use_each_deployments_kernel_factors(data_dir, tmp_path):
    # Cached curves (what a previous run leaves) skip the ~1 minute calibration;
    # the unfitted kernel row must then equal predict() with each deployment's own
    # kernel-calibrated factors, at its model's shapes and TP degree.
    import diffmodel as dm
    import diffmodel.kernels as dk
    from diffmodel.kernels._curves_io import save_curves

    curves = dk.default_kernel_curves()
    save_curves(curves, tmp_path / "kernel_curves.json")
    results = reproduce(
        data=data_dir,
        out=tmp_path,
        quick=True,
        targets=("iteration_time",),
        protocols=("temporal",),
        methods=("diffmodel-kernels",),
        progress=None,
    )
    quick = _quick_rows(data_dir)
    test = quick[temporal_split(quick) == "test"]
    got = results.set_index("experiment_id")["mape"]
    priors = {}
    for exp, rows in test.groupby("experiment_id"):
        model, tp = dm.canonical_model(rows["model"].iloc[0]), int(rows["tp"].iloc[0])
        priors[model] = dk.kernel_prior_factors(curves, model=model, tp=tp)
        pred = dm.predict(rows, factors=priors[model]).predicted_us
        want = 100 * (pred / rows["iteration_time_us"] - 1).abs().mean()
        np.testing.assert_allclose(got.loc[exp], want, rtol=1e-4)
    a, b = (priors[m] for m in ("llama-2-70b", "codellama-34b"))
    assert float(a.mem_bw) != float(b.mem_bw)  # the shapes differ, so do the priors
    assert (results["n_params"] == 0).all()


@pytest.mark.slow
def test_other_gpu_rows_price_the_steps_on_the_pooled_curves(
    data_dir, tmp_path, monkeypatch
):
    # Cached pooled curves (what a previous run leaves) skip the pooled calibration;
    # the kernel sum's row must then be the kernel sum on exactly those curves.
    import diffmodel as dm
    import diffmodel.kernels as dk
    import diffmodel.kernels._database as database
    from diffmodel.kernels._curves_io import save_curves

    curves = dk.default_kernel_curves(portable=True)
    save_curves(curves, tmp_path / "kernel_curves_other_gpus.json")
    kw = dict(
        data=data_dir,
        quick=True,
        targets=("iteration_time",),
        protocols=("temporal",),
        methods=("diffmodel-kernel-sum-other-gpus",),
        progress=None,
    )
    results = reproduce(out=tmp_path, **kw)
    quick = _quick_rows(data_dir)
    test = quick[temporal_split(quick) == "test"]
    got = results.set_index("experiment_id")["mape"]
    for exp, rows in test.groupby("experiment_id"):
        want = mape(rows["iteration_time_us"], dm.kernel_device_us(rows, curves))
        np.testing.assert_allclose(got.loc[exp], want, rtol=1e-4)
    # Without the database (and no cache) the rows say so instead of failing.
    monkeypatch.setattr(database, "database_available", lambda: False)
    empty = reproduce(out=tmp_path / "fresh", **kw)
    assert empty["mape"].isna().all()
    assert empty["note"].str.contains("kernel database").all()


def _quick_rows(data_dir):
    """The steps a quick run uses (1500 per experiment) with an iteration time."""
    return add_targets(
        load_steps(data_dir / "stepml" / "steps.parquet")
        .groupby("experiment_id", sort=False)
        .head(1500)
        .reset_index(drop=True)
    ).dropna(subset=["iteration_time_us"])
