"""The pandas-level predict: columns, deployments from rows, errors."""

import numpy as np
import pandas as pd
import pytest

import diffmodel as dm
from diffmodel._frame import stats_from_frame

from helpers import unchecked


def frame(**extra):
    base = {
        "prefill_tokens": [0, 512, 0],
        "decode_tokens": [32, 4, 0],
        "num_prefill_reqs": [0, 1, 0],
        "num_decode_reqs": [32, 4, 0],
        "kv_tokens": [32_000, 4_000, 0],
    }
    return pd.DataFrame({**base, **extra})


def test_predict_columns_and_total():
    out = dm.predict(frame(), model="llama-2-70b", tp=4)
    comps = [f"{c}_us" for c in dm.COMPONENTS]
    assert list(out.columns[-8:]) == ["predicted_us", *comps]
    np.testing.assert_allclose(out[comps].sum(axis=1), out.predicted_us, rtol=1e-12)
    assert out.predicted_us.iloc[0] > 10_000  # weight-read floor of 70B at TP4


def test_trace_columns_and_kv_proxy(data_dir):
    steps = dm.data.load_steps(data_dir / "stepml" / "steps.parquet").head(50)
    out = dm.predict(steps)  # model and tp from the rows, hardware defaults to H100
    assert "predicted_us" in out and out.predicted_us.gt(0).all()
    kv = steps["kv.usage_gpu_ratio"] * steps["kv.blocks_total_gpu"] * 16
    by_hand = dm.predict(
        pd.DataFrame(
            {
                "prefill_tokens": steps["batch.prefill_tokens"],
                "decode_tokens": steps["batch.decode_tokens"],
                "num_prefill_reqs": steps["batch.num_prefill_reqs"],
                "num_decode_reqs": steps["batch.num_decode_reqs"],
                "kv_tokens": kv,
                "model": steps["model"],
                "tp": steps["tp"],
            }
        )
    )
    np.testing.assert_allclose(out.predicted_us, by_hand.predicted_us, rtol=1e-12)


def test_keywords_beside_columns_must_agree():
    f = frame(model=["llama-2-7b", "llama-2-70b", "llama-2-7b"], tp=[1, 4, 1])
    with pytest.raises(ValueError, match=r"^model=mixtral-8x7b contradicts the "):
        dm.predict(f, model="mixtral-8x7b")
    with pytest.raises(ValueError, match=r"^model=gpt-5: unknown model 'gpt-5'"):
        dm.predict(f, model="gpt-5")
    g = frame(model="Llama-2-70b-hf", tp=4)
    out = dm.predict(g, model="llama-2-70b", tp=4)  # the same, in other spellings
    ref = dm.predict(frame(), model="llama-2-70b", tp=4)
    np.testing.assert_allclose(out.predicted_us, ref.predicted_us, rtol=1e-12)


OK = {"model": "llama-2-7b", "tp": 1}


@pytest.mark.parametrize(
    ("mutate", "kwargs", "match"),
    [
        (
            lambda f: f.drop(columns="decode_tokens"),
            OK,
            "missing column 'decode_tokens'",
        ),
        (lambda f: f.drop(columns="kv_tokens"), OK, "missing column 'kv_tokens'"),
        (lambda f: f.assign(prefill_tokens=[0, -5, 0]), OK, "'prefill_tokens'.*>= 0"),
        (
            lambda f: f.assign(kv_tokens=[0, np.nan, 0]),
            OK,
            "'kv_tokens' must be a number .no missing values.; row 1 has nan$",
        ),
        (
            lambda f: f.assign(kv_tokens=[0, -2.5, 0]),
            OK,
            "'kv_tokens' must be a number >= 0; row 1 has -2.5$",
        ),
        (
            lambda f: f.assign(num_decode_reqs=[32, 4.5, 0]),
            OK,
            "'num_decode_reqs' must be a whole number >= 0 .requests.; row 1 has 4.5",
        ),
        (
            lambda f: f.assign(decode_tokens=[32, 4, 3]),
            OK,
            "row 2: decode_tokens is 3 but num_decode_reqs is 0",
        ),
        (lambda f: f.iloc[:0], OK, "the table of steps has no rows"),
        (lambda f: f.assign(decode_tokens=["a", "b", "c"]), OK, "must be numeric"),
        (lambda f: f, {"model": "gpt-5", "tp": 1}, "unknown model 'gpt-5'"),
        (lambda f: f, OK | {"hardware": "tpu"}, "unknown hardware 'tpu'"),
        (lambda f: f, {"model": "llama-2-70b", "tp": 3}, "tp=3 does not divide"),
        (lambda f: f, {"tp": 1}, "no model: pass model= or give the table a 'model'"),
        (lambda f: f, {"model": "llama-2-7b"}, "no tp: pass tp= or give the table"),
        # Infinite or float32-overflowing sizes gave NaN or inf predictions.
        (
            lambda f: f.assign(kv_tokens=[0, np.inf, 0]),
            OK,
            "'kv_tokens' must be at most 2\\^31 in one step; row 1 has inf$",
        ),
        (
            lambda f: f.assign(prefill_tokens=[1e20, 0, 0]),
            OK,
            "'prefill_tokens' must be at most 2\\^31 in one step; row 0 has 1e\\+20",
        ),
        # True is not a count, nor a TP degree.
        (
            lambda f: f.assign(kv_tokens=[True, False, True]),
            OK,
            "'kv_tokens' must be numeric, got a bool column",
        ),
        (
            lambda f: f.assign(kv_tokens=pd.Series([1, True, 2], dtype=object)),
            OK,
            "'kv_tokens' must be numeric; row 1 has True",
        ),
        (lambda f: f, {"model": "llama-2-70b", "tp": True}, "tp=True: tp must be a"),
        (lambda f: f.assign(tp=True), {"model": "llama-2-70b"}, "got True"),
        # Two spellings of one statistic that disagree, or a repeated column.
        (
            lambda f: f.assign(**{"batch.decode_tokens": [32, 4, 1]}),
            OK,
            "columns 'decode_tokens' and 'batch.decode_tokens' both give "
            "decode_tokens and disagree at row 2 .0 vs 1.",
        ),
        (
            lambda f: pd.concat([f, f[["kv_tokens"]]], axis=1),
            OK,
            "duplicated column 'kv_tokens'",
        ),
    ],
)
def test_bad_input_errors(mutate, kwargs, match):
    with pytest.raises(ValueError, match=match):
        dm.predict(mutate(frame()), **kwargs)


def test_not_a_frame():
    with pytest.raises(ValueError, match="DataFrame"), unchecked():
        dm.predict({"prefill_tokens": [1]}, model="llama-2-7b", tp=1)


@pytest.mark.slow
def test_hierarchical_factors_warn_once_per_unseen_deployment():
    from diffmodel._fitting._factorsets import init_factor_set

    fs = init_factor_set("hierarchical", ["llama-2-70b/h100-sxm/tp4"])
    rows = pd.concat(
        [frame(model="llama-2-70b", tp=4), frame(model="llama-2-7b", tp=1)]
    )
    with pytest.warns(dm.UnseenGroupWarning) as caught:
        out = dm.predict(rows, factors=fs)
    assert [str(w.message).split(";")[0] for w in caught] == [
        "the factors were not fitted on llama-2-7b/h100-sxm/tp1"
    ]
    # The unseen rows get the global level: here the priors, as nothing is fitted.
    np.testing.assert_allclose(
        out.predicted_us.to_numpy()[3:],
        dm.predict(frame(model="llama-2-7b", tp=1)).predicted_us.to_numpy(),
        rtol=1e-12,
    )
    # Seen groups only, or a shared set: no warning (the suite makes warnings errors).
    dm.predict(frame(model="llama-2-70b", tp=4), factors=fs)
    dm.predict(rows, factors=init_factor_set("global", []))


def _deepseek(**cols):
    base = dict(
        model="deepseek-ai/DeepSeek-V3",
        hardware="h200",
        tp=8,
        prefill_tokens=2048,
        decode_tokens=64,
        num_prefill_reqs=1,
        num_decode_reqs=64,
        kv_tokens=64 * 2048,
    )
    return pd.DataFrame([{**base, **cols}])


def test_an_ep_column_sets_expert_parallelism_per_row():
    """``ep`` rows: DeepSeek-V3 at TP 8 with whole experts per GPU (ep 8) is its
    own deployment, labelled ``.../tp8/ep8``, priced as ``deployment(ep=8)``; a
    table without the column is ep 1; bad degrees are named."""
    from diffmodel._frame import groups_from_frame, parse_group_label

    frame = pd.concat([_deepseek(ep=1), _deepseek(ep=8)], ignore_index=True)
    groups = groups_from_frame(frame)
    assert groups.labels == ("deepseek-v3/h200/tp8", "deepseek-v3/h200/tp8/ep8")
    assert parse_group_label(groups.labels[1]) == ("deepseek-v3", "h200", 8, 8)
    got = dm.predict(frame)["predicted_us"].to_numpy()
    stats = dm.from_aggregates(
        prefill_tokens=2048.0, decode_tokens=64.0, num_prefill=1.0,
        num_decode=64.0, kv_tokens=64 * 2048.0,
    )  # fmt: skip
    factors = dm.default_factors()
    for ep, value in zip((1, 8), got, strict=True):
        dep = dm.deployment("deepseek-ai/DeepSeek-V3", "h200", 8, ep=ep)
        want = float(dm.step_time(stats, dep, factors).total)
        assert value == pytest.approx(want, rel=1e-5)
    assert got[0] != got[1]
    assert groups_from_frame(_deepseek()).labels == ("deepseek-v3/h200/tp8",)
    with pytest.raises(ValueError, match="column 'ep': ep must be a positive integer"):
        groups_from_frame(_deepseek(ep=0))
    with pytest.raises(ValueError, match="ep=3 must be a multiple of tp=8"):
        groups_from_frame(_deepseek(ep=3))
    with pytest.raises(ValueError, match="expected 'model/hardware/tpN\\[/epM\\]'"):
        parse_group_label("deepseek-v3/h200/ep8")


def test_pipeline_rows_are_priced_by_pipeline_step():
    """A ``pp`` column: rows with ``pp > 1`` take ``pipeline_step``'s total, their
    columns still add up; ``pp = 1`` rows are the single-stage prediction."""
    f = frame(pp=[1, 2, 4])
    out = dm.predict(f, model="llama-3.1-70b", tp=4)
    plain = dm.predict(frame(), model="llama-3.1-70b", tp=4)
    assert out.predicted_us[0] == plain.predicted_us[0]
    assert out.pp_bubble_us[0] == 0.0 and out.pp_p2p_us[0] == 0.0
    dep = dm.deployment("llama-3.1-70b", "h100-sxm", 4)
    stats = stats_from_frame(f)
    for i, pp in ((1, 2), (2, 4)):
        one = type(stats)(
            **{k: getattr(stats, k)[i] for k in stats.__dataclass_fields__}
        )
        want = dm.serving.pipeline_step(one, dep, dm.default_factors(), pp=pp)
        np.testing.assert_allclose(out.predicted_us[i], float(want.total), rtol=1e-6)
        np.testing.assert_allclose(
            out.pp_bubble_us[i], float(want.bubble_us), rtol=1e-6
        )
    cols = [f"{c}_us" for c in dm.COMPONENTS] + ["pp_p2p_us", "pp_bubble_us"]
    np.testing.assert_allclose(out[cols].sum(axis=1), out.predicted_us, rtol=1e-6)
    # a 2-stage prefill: half the layers per stage, one bubble stage
    assert out.pp_bubble_us[1] > 0 and out.predicted_us[1] != plain.predicted_us[1]
    # the keyword gives every row the same degree
    kw = dm.predict(frame(), model="llama-3.1-70b", tp=4, pp=2)
    np.testing.assert_allclose(kw.predicted_us[1], out.predicted_us[1], rtol=1e-9)


def test_pipeline_bad_input_raises():
    with pytest.raises(ValueError, match="pp=4 contradicts the table's 'pp' column"):
        dm.predict(frame(pp=[1, 2, 2]), model="llama-2-70b", tp=4, pp=4)
    with pytest.raises(ValueError, match="column 'pp': pp must be a positive integer"):
        dm.predict(frame(pp=[1, 0, 2]), model="llama-2-70b", tp=4)
    with pytest.raises(ValueError, match=r"row 2 has pp 96 .*\(80 layers\)"):
        dm.predict(frame(pp=[1, 2, 96]), model="llama-2-70b", tp=4)
    with pytest.raises(ValueError, match="interval is not available for pipeline"):
        dm.predict(frame(pp=[1, 2, 2]), model="llama-2-70b", tp=4, interval=0.9)
