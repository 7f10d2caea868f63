"""fit_joint: device curves and host costs in one objective over kernel tables and
traces, each source with its own noise."""

import warnings

import equinox as eqx
import numpy as np
import pytest

import diffmodel as dm
from diffmodel.kernels import default_kernel_curves, load_kernel_tables
from diffmodel.kernels._calibrate import family_rows, family_work
from diffmodel.kernels._step import HostCosts
from diffmodel.kernels._work import allreduce_kernel_us
from tests.helpers import host_frame, unchecked, with_host_target

TRUTH_CURVES = default_kernel_curves()
TRUTH_HOST = HostCosts(layer_us=15.0, layer_request_us=0.4)
KERNEL_NOISE, TRACE_NOISE = 0.01, 0.005
ROWS = 3000
FAMILIES = ("gemm_bf16", "prefill_attention", "decode_attention", "allreduce")


def _truth_us(tables, fam, curves):
    rows = family_rows(tables, fam)
    hw = dm.hardware(curves.hardware)
    if fam == "allreduce":
        return rows, np.asarray(
            allreduce_kernel_us(
                rows["bytes"].to_numpy(float),
                rows["num_gpus"].to_numpy(float),
                curves.allreduce,
                hw,
            )
        )
    work = family_work(fam, rows, hw)
    return rows, np.asarray(work.time_us(getattr(curves, fam)))


@pytest.fixture(scope="module")
def synthetic_tables(data_dir):
    """The H100 tables' shapes (ROWS rows a family), timed by the truth curves with
    log-normal noise of sd KERNEL_NOISE."""
    tables = load_kernel_tables(data_dir)
    rng = np.random.default_rng(0)
    out = dict(tables)
    for fam in FAMILIES:
        rows = family_rows(tables, fam)
        rows = rows.sample(min(ROWS, len(rows)), random_state=0)
        key = "gemm" if fam.startswith("gemm") else fam
        sub = {**out, key: rows}
        _, t = _truth_us(sub, fam, TRUTH_CURVES)
        out[key] = rows.assign(
            latency_us=t * np.exp(rng.normal(0.0, KERNEL_NOISE, len(rows)))
        )
    return out


def _wrong_start():
    """The truth curves moved off: GEMMs' saturated efficiency down by 1 in log-odds,
    decode attention's bandwidth half-point 4x."""
    c = TRUTH_CURVES
    c = eqx.tree_at(
        lambda z: z.gemm_bf16.flops.raw_eta_max, c, c.gemm_bf16.flops.raw_eta_max - 1.0
    )
    return eqx.tree_at(
        lambda z: z.decode_attention.bandwidth.log_half,
        c,
        c.decode_attention.bandwidth.log_half + np.log(4.0),
    )


@pytest.mark.slow
def test_joint_fit_recovers_device_and_host_from_a_wrong_start(synthetic_tables):
    frame = with_host_target(host_frame(300), TRUTH_HOST, TRUTH_CURVES, TRACE_NOISE)
    start = _wrong_start()
    with warnings.catch_warnings():
        warnings.simplefilter("error", dm.IdentifiabilityWarning)
        joint = dm.fit_joint(
            frame, target="iteration_time_us", curves=start, tables=synthetic_tables
        )
    fit = joint.host_fit
    # The kernel rows pull the curves back; the traces then price the host.
    table = joint.table()
    for term, truth in (("layer", 15.0), ("layer_request", 0.4)):
        value, sd = table.loc[term, "value_us"], table.loc[term, "sd_us"]
        assert value == pytest.approx(truth, rel=0.05)
        assert abs(value - truth) < 3.0 * sd  # the reported sd is honest
        # The joint posterior holds the device side's uncertainty too: never
        # narrower than the two-stage one, which takes the curves as exact.
        assert table.loc[term, "two_stage_sd_us"] <= sd < 0.2 * truth
    for fam in FAMILIES:
        _, got = _truth_us(synthetic_tables, fam, fit.curves)
        _, want = _truth_us(synthetic_tables, fam, TRUTH_CURVES)
        assert np.sqrt(np.mean(np.log(got / want) ** 2)) < 0.02, fam
    src = joint.sources
    assert list(src.index) == [*FAMILIES, "trace"]
    for fam in FAMILIES:
        assert src.loc[fam, "noise_sd"] == pytest.approx(KERNEL_NOISE, rel=0.25)
    assert src.loc["trace", "noise_sd"] == pytest.approx(TRACE_NOISE, rel=0.25)
    assert src.loc["trace", "n_rows"] == len(frame)
    assert joint.converged and fit.converged


def test_joint_fit_predicts_and_saves_like_a_two_stage_fit(synthetic_tables, tmp_path):
    frame = with_host_target(host_frame(200), TRUTH_HOST, TRUTH_CURVES, TRACE_NOISE)
    lines = []
    joint = dm.fit_joint(
        frame,
        target="iteration_time_us",
        curves=TRUTH_CURVES,
        tables=synthetic_tables,
        families=("gemm_bf16",),
        progress=lines.append,
    )
    assert list(joint.sources.index) == ["gemm_bf16", "trace"]
    assert len(lines) == 4 and all(x.startswith("joint: ") for x in lines)
    assert "gemm_bf16 on 3000 kernel rows alone" in lines[0]
    assert "L-BFGS steps" in lines[2] and lines[3].endswith(" s)")
    path = tmp_path / "host.json"
    dm.save_host_fit(joint.host_fit, path)
    again = dm.load_host_fit(path)
    test = host_frame(50, seed=3)
    np.testing.assert_allclose(
        again.predict(test)["predicted_us"],
        joint.host_fit.predict(test)["predicted_us"],
    )
    out = joint.host_fit.predict(test, interval=0.9)
    assert (out["predicted_lo_us"] < out["predicted_us"]).all()


def test_joint_fit_bad_input_names_what_is_wrong(synthetic_tables):
    frame = with_host_target(host_frame(50), TRUTH_HOST, TRUTH_CURVES, TRACE_NOISE)
    kw = dict(target="iteration_time_us", curves=TRUTH_CURVES)
    with pytest.raises(ValueError, match="families must be distinct names"):
        dm.fit_joint(frame, tables=synthetic_tables, families=("gemm_bf17",), **kw)
    with pytest.raises(ValueError, match="families must be distinct names"):
        dm.fit_joint(frame, tables=synthetic_tables, families=(), **kw)
    with unchecked(), pytest.raises(ValueError, match="tables must be the GPU's"):
        dm.fit_joint(frame, tables=[1, 2], **kw)
    no_ar = {k: v for k, v in synthetic_tables.items() if k != "allreduce"}
    with pytest.raises(ValueError, match="no allreduce table loaded"):
        dm.fit_joint(frame, tables=no_ar, **kw)
    with pytest.raises(ValueError, match="target 'nope'"):
        dm.fit_joint(frame, tables=synthetic_tables, target="nope", curves=TRUTH_CURVES)
    a100 = frame.assign(hardware="a100-sxm")
    with pytest.raises(ValueError, match="calibrated on 'h100-sxm'"):
        dm.fit_joint(a100, tables=synthetic_tables, **kw)
