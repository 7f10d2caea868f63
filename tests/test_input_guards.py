"""Values that once passed silently and gave NaN, infinite or negative step times, or
were dropped: each is now a one-line error naming the field."""

import json

import numpy as np
import pandas as pd
import pytest

import diffmodel as dm
import diffmodel.kernels as dk
from diffmodel._app._cli import main as cli_main
from diffmodel._frame import stats_from_frame
from diffmodel.kernels._curves_io import curves_to_json

from helpers import needs_db, unchecked

DEP = dm.deployment("llama-2-70b", "h100-sxm", 4)


def _decode_steps(**columns) -> pd.DataFrame:
    """Two decode-only steps of 4 requests, with ``columns`` beside them."""
    base = {
        "prefill_tokens": [0, 0],
        "decode_tokens": [4, 4],
        "num_prefill_reqs": [0, 0],
        "num_decode_reqs": [4, 4],
    }
    return pd.DataFrame(base | columns)


def _stats(**change):
    base = dict(
        prefill_tokens=[0.0, 512.0],
        decode_tokens=[32.0, 4.0],
        num_prefill=[0.0, 1.0],
        num_decode=[32.0, 4.0],
        kv_tokens=[32_000.0, 4_000.0],
    )
    base.update(change)
    return dm.from_aggregates(**{k: np.asarray(v) for k, v in base.items()})


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        ("gemm_flops", -0.5, r"Factors.gemm_flops must be in \(0, 1\].*got -0.5"),
        ("gemm_flops", 0.0, r"Factors.gemm_flops must be in \(0, 1\]"),
        ("mem_bw", 1.2, r"Factors.mem_bw must be in \(0, 1\].*got 1.2"),
        ("attn_bw", np.nan, r"Factors.attn_bw must be in \(0, 1\].*got nan"),
        ("step_overhead_us", -1e6, r"Factors.step_overhead_us must be >= 0 and fin"),
        ("comm_latency_us", np.inf, r"Factors.comm_latency_us must be >= 0 and fin"),
    ],
)
def test_factors_out_of_range_are_refused(name, value, match):
    values = dm.default_factors().as_dict() | {name: value}
    with pytest.raises(ValueError, match=match):
        dm.Factors(**values)


def test_traced_factors_are_not_checked():
    # Inside jit and grad the values are tracers: nothing to check, and a fit's
    # step may pass through any value.
    import jax

    def total(eta):
        f = dm.Factors(**(dm.default_factors().as_dict() | {"gemm_flops": eta}))
        return dm.step_time(_stats(), DEP, f).total.sum()

    assert np.isfinite(float(jax.jit(total)(0.6)))
    assert np.isfinite(float(jax.grad(total)(0.6)))


def test_infinite_statistics_are_refused_by_step_time_and_predict_steps():
    bad = _stats(kv_tokens=[np.inf, 4_000.0])
    with pytest.raises(ValueError, match=r"BatchStats.kv_decode must be finite"):
        dm.step_time(bad, DEP, dm.default_factors())
    with pytest.raises(ValueError, match=r"stats.kv_decode must be finite and >= 0"):
        dm.predict_steps(bad, DEP, np.zeros(2, np.int32))


def test_a_step_time_that_overflows_float32_is_an_error():
    # A KV cache read finite in float32, at a (valid) tiny bandwidth efficiency:
    # its time is not.
    huge = _stats(kv_tokens=[32_000.0, 3e38])
    slow = dm.Factors(**(dm.default_factors().as_dict() | {"attn_bw": 1e-3}))
    with pytest.raises(ValueError, match=r"step 1 is inf \(not finite\)"):
        dm.predict_steps(huge, DEP, np.zeros(2, np.int32), slow)


def test_kv_gauge_of_no_blocks_is_refused():
    frame = _decode_steps(
        **{"kv.usage_gpu_ratio": [0.5, 0.5], "kv.blocks_total_gpu": [1000, 0]}
    )
    with pytest.raises(ValueError, match=r"'kv.blocks_total_gpu' must be > 0.*row 1"):
        dm.predict(frame, model="llama-2-70b", tp=4)


def test_deployment_refuses_boolean_degrees():
    with pytest.raises(ValueError, match="tp must be a positive integer, got True"):
        dm.deployment("llama-2-7b", "h100-sxm", True)
    with pytest.raises(ValueError, match="tp must be a positive integer, got nan"):
        dm.deployment("llama-2-7b", "h100-sxm", float("nan"))


def test_curves_with_a_nan_are_refused_by_name(tmp_path):
    obj = curves_to_json(dk.default_kernel_curves())
    obj["decode_attention"]["bandwidth"]["raw"]["log_half"] = float("nan")
    path = tmp_path / "curves.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(ValueError, match=r"decode_attention.bandwidth.log_half: exp"):
        dk.load_curves(path)


def test_cli_refuses_a_repeated_csv_column(tmp_path, capsys):
    path = tmp_path / "steps.csv"
    path.write_text(
        "prefill_tokens,decode_tokens,num_prefill_reqs,num_decode_reqs,kv_tokens,"
        "kv_tokens\n0,4,0,4,400,800\n"
    )
    argv = ["predict", "--data", str(path), "--model", "llama-2-70b", "--tp", "4"]
    assert cli_main(argv + ["--out", str(tmp_path / "p.csv")]) == 1
    assert "duplicated column 'kv_tokens'" in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.parametrize(
    ("cov", "match"),
    [
        ([[1.0, 0.5], [0.2, 1.0]], "symmetric"),
        ([[1.0, 0.0], [0.0, -1.0]], "diagonal"),
        ([[1.0, 2.0], [2.0, 1.0]], "positive semi-definite"),
    ],
)
def test_covariances_that_are_not(cov, match):
    from diffmodel._fitting._base import check_covariance

    with pytest.raises(ValueError, match=f"field 'cov_raw': .*{match}"):
        check_covariance(np.asarray(cov), "cov_raw")
    ok = np.array([[2.0, 0.5], [0.5, 1.0]])
    np.testing.assert_array_equal(check_covariance(ok, "cov_raw"), ok)


@pytest.mark.parametrize("q", [-1.0, 0.0, 0.5, float("nan"), float("inf")])
def test_step_time_refuses_a_sharpness_below_one(q):
    with pytest.raises(ValueError, match="sharpness must be a finite number >= 1"):
        dm.step_time(_stats(), DEP, dm.default_factors(), sharpness=q)


def test_metrics_refuse_rows_without_a_group():
    frame = pd.DataFrame(
        {"y": [1.0, 2.0, 3.0], "p": [1.1, 2.0, 2.9], "g": ["a", None, "a"]}
    )
    with pytest.raises(ValueError, match="column 'g' has no group at 1 rows"):
        dm.metrics_table(frame, actual="y", predicted="p", by="g")


def test_cli_refuses_out_equal_to_data(tmp_path, capsys):
    path = tmp_path / "steps.csv"
    path.write_text(
        "prefill_tokens,decode_tokens,num_prefill_reqs,num_decode_reqs,kv_tokens\n"
        "0,4,0,4,400\n"
    )
    argv = ["predict", "--data", str(path), "--out", str(path)]
    assert cli_main(argv + ["--model", "llama-2-70b", "--tp", "4"]) == 1
    assert "is --data; write the predictions elsewhere" in capsys.readouterr().err
    assert path.read_text().startswith("prefill_tokens,")  # untouched


@needs_db
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--system", "nope"], "--system nope: not a GPU system of the kernel data"),
        (["--system", "h100_sxm", "--out", "x.csv"], "expected a .json file"),
        (["--system", "h100_sxm", "--rows-per-gpu", "5"], "only pooled curves"),
        (["--system", "h100_sxm", "--no-siblings"], "--no-siblings: only pooled"),
        (["--system", "h100_sxm", "--adam-steps", "0"], "expected a positive integ"),
        (["--system", "h100_sxm", "--version", "9.9"], "no tables of version '9.9'; v"),
        (["--system", "h100_sxm", "--backend", "nope"], "backends with them: sglang"),
    ],
)
def test_cli_calibrate_checks_its_flags_before_fitting(
    extra, message, tmp_path, capsys
):
    argv = ["calibrate", "--out", str(tmp_path / "c.json"), *extra]
    assert cli_main(argv) in (1, 2)
    assert message in capsys.readouterr().err
    assert not (tmp_path / "c.json").exists()


def test_cli_out_of_memory_is_one_line(monkeypatch, capsys):
    from diffmodel._app import _cli_commands

    def boom(args):
        raise MemoryError

    monkeypatch.setattr(_cli_commands, "cmd_demo", boom)
    assert cli_main(["demo"]) == 1
    assert capsys.readouterr().err.strip() == (
        "diffmodel: error: out of memory: the work asked for does not fit this "
        "machine (fewer rows or steps)"
    )


@pytest.mark.parametrize("value", ["a", True, np.array([True, False])])
def test_from_aggregates_names_an_argument_that_is_not_numbers(value):
    with pytest.raises(ValueError, match="prefill_tokens must be numbers"), unchecked():
        dm.from_aggregates(
            prefill_tokens=value,
            decode_tokens=1.0,
            num_prefill=1.0,
            num_decode=1.0,
            kv_tokens=1.0,
        )


def test_step_time_names_an_argument_of_the_wrong_type():
    s, f = _stats(), dm.default_factors()
    with unchecked():
        for args, name in (((s, DEP, None), "factors"), ((s, "x", f), "dep")):
            with pytest.raises(ValueError, match=f"^{name} must be a diffmodel"):
                dm.step_time(*args)
        with pytest.raises(ValueError, match="^stats must be a diffmodel.BatchStats"):
            dm.step_time({}, DEP, f)


def test_json_files_refuse_a_repeated_key_and_a_folder(tmp_path):
    path = tmp_path / "curves.json"
    path.write_text('{"format_version": 1, "format_version": 2}')
    with pytest.raises(ValueError, match="key 'format_version' appears twice"):
        dk.load_curves(path)
    with pytest.raises(ValueError, match="is a folder, expected a JSON file"):
        dk.load_curves(tmp_path)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--noise", "inf", "argument --noise: expected a finite number >= 0"),
        ("--seed", "-1", "argument --seed: expected an integer >= 0"),
    ],
)
def test_cli_demo_flags_name_themselves(flag, value, message, tmp_path, capsys):
    assert cli_main(["demo", flag, value, "--out-dir", str(tmp_path / "d")]) == 2
    assert message in capsys.readouterr().err


def test_deployment_refuses_unknown_or_ignored_keywords():
    with pytest.raises(TypeError, match="deployment: unknown keyword 'foo'"):
        dm.deployment("llama-2-7b", "h100-sxm", 1, foo="x")
    arch = dm.architecture("llama-2-7b")
    with pytest.raises(ValueError, match="kv_dtype applies to a catalog model name"):
        dm.deployment(arch, "h100-sxm", 1, kv_dtype="fp8")
    fp8 = dm.deployment("llama-2-7b", "h100-sxm", 1, weight_dtype="fp8")
    assert float(fp8.arch.weight_bytes) == 1.0


def test_a_boolean_target_is_not_a_step_time(tmp_path, capsys):
    frame = _decode_steps(kv_tokens=[400, 800], y=[True, False])
    with pytest.raises(ValueError, match="target 'y' must be step times .* booleans"):
        dm.fit(frame, target="y", model="llama-2-7b", tp=1)
    path = tmp_path / "steps.csv"
    frame.to_csv(path, index=False)
    argv = ["evaluate", "--data", str(path), "--target", "y", "--dropna-target"]
    assert cli_main(argv + ["--model", "llama-2-7b", "--tp", "1"]) == 1
    assert "--target y: booleans, not step times (us)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"prefill_tokens": 512.0}, "prefill_tokens is 512 but num_prefill is 0"),
        ({"decode_tokens": 8.0}, "decode_tokens is 8 but num_decode is 0"),
        ({"attn_prefill": 1e5}, "attn_prefill is 100000 but prefill_tokens is 0"),
        ({"kv_prefill": 70.0}, "kv_prefill is 70 but num_prefill is 0"),
    ],
)
def test_step_time_refuses_statistics_that_contradict_each_other(fields, match):
    zero = dict.fromkeys(dm.BatchStats.__dataclass_fields__, 0.0)
    stats = dm.BatchStats(**(zero | fields))
    with pytest.raises(ValueError, match=f"contradict each other: {match}"):
        dm.step_time(stats, DEP, dm.default_factors())
    # Under jit the values are traced (a relaxed scheduler's): not checked.
    import jax

    total = jax.jit(lambda s: dm.step_time(s, DEP, dm.default_factors()).total)
    assert np.isfinite(float(total(stats)))


def test_contradicting_statistics_name_the_first_bad_step():
    stats = _stats(decode_tokens=[32.0, 8.0], num_decode=[32.0, 0.0])
    with pytest.raises(ValueError, match=r"at index \(1,\): decode_tokens is 8"):
        dm.step_time(stats, DEP, dm.default_factors())


@pytest.mark.parametrize("value", [1e300, 1e-300])
def test_a_target_beyond_float32_is_named_not_a_nonfinite_loss(value):
    frame = _decode_steps(kv_tokens=[400, 800], y=[value, 5_000.0])
    with pytest.raises(ValueError, match=r"target 'y' must lie within float32's"):
        dm.fit(frame, target="y", model="llama-2-7b", tp=1)


def test_a_fit_stuck_at_its_bounds_says_so_and_claims_no_certainty():
    # Steps far below the roofline and an Adam step of 1e30 raw units: the first
    # step saturates the factors, the gradient vanishes there, which is the
    # bound's doing, not an optimum's.
    rng = np.random.default_rng(0)
    n = 64
    decode = rng.integers(1, 64, n)
    frame = _decode_steps().iloc[[0] * n].reset_index(drop=True)
    frame = frame.assign(
        decode_tokens=decode,
        num_decode_reqs=decode,
        kv_tokens=decode * 900,
        y=10.0 + 0.1 * decode,
    )
    with pytest.warns(UserWarning, match="is it in microseconds"):
        res = dm.fit(
            frame,
            target="y",
            model="llama-2-7b",
            tp=1,
            solver="adam",
            learning_rate=1e30,
        )
    assert res.laplace.at_bound
    assert res.status.endswith(f"; {len(res.laplace.at_bound)} of 9 factors at a bound")
    # Saturated: the delta method's sd would be 0 (certainty); it is undefined.
    sds = dict(zip(res.laplace.names, np.asarray(res.laplace.sd), strict=True))
    assert np.isnan(sds["global.gemm_flops"]) and np.isnan(sds["global.mem_bw"])
    assert all(not (sds[b] == 0.0) for b in res.laplace.at_bound)


def test_a_host_costs_file_given_as_factors_says_where_it_goes(tmp_path, capsys):
    host = {"format": "diffmodel.kernel-host/1"}
    path = tmp_path / "host.json"
    path.write_text(json.dumps(host))
    steps = tmp_path / "steps.csv"
    _decode_steps(kv_tokens=[400, 800]).to_csv(steps, index=False)
    argv = ["predict", "--data", str(steps), "--model", "llama-2-7b", "--tp", "1"]
    argv += ["--out", str(tmp_path / "out.csv"), "--factors", str(path)]
    assert cli_main(argv) == 1
    assert "pass it as --host" in capsys.readouterr().err


def test_kv_read_without_a_decoding_request():
    # Given as K_dec, it contradicts the counts: refused, naming column and row.
    frame = pd.DataFrame(
        {
            "prefill_tokens": [512, 512],
            "decode_tokens": [4, 0],
            "num_prefill_reqs": [1, 1],
            "num_decode_reqs": [4, 0],
            "kv_tokens": [4_000, 9_000],
        }
    )
    with pytest.raises(ValueError, match=r"'kv_tokens' must be 0 where .*row 1"):
        dm.predict(frame, model="llama-2-70b", tp=4)
    # From the KV gauge (every running request's cache): no decode read there.
    gauge = frame.drop(columns="kv_tokens").assign(
        **{"kv.usage_gpu_ratio": [0.2, 0.2], "kv.blocks_total_gpu": [30_000] * 2}
    )
    stats = stats_from_frame(gauge)
    assert np.asarray(stats.kv_decode).tolist()[1] == 0.0
    assert np.asarray(stats.kv_decode)[0] > 0.0


def test_a_target_in_milliseconds_is_flagged_by_its_starting_loss():
    frame = _decode_steps(kv_tokens=[400, 800])
    us = dm.predict(frame, model="llama-2-7b", tp=1)["predicted_us"].to_numpy()
    with pytest.warns(UserWarning, match=r"target 'y' is 0.001 times .* microseconds"):
        dm.fit(
            frame.assign(y=us / 1000.0),
            target="y",
            model="llama-2-7b",
            tp=1,
            uncertainty=False,
        )
