"""The kernel database of every GPU, the hardware catalog, portable curves and pooled
fits across GPUs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffmodel as dm
import diffmodel.kernels as dk
from diffmodel._app._cli import main as cli_main
from diffmodel._model._hardware import (
    SPECS,
    Hardware,
    canonical_hardware,
    spec_from_yaml,
    system_info,
)
from diffmodel.kernels._curves import (
    Occupancy,
    SaturationCurve,
    default_kernel_curves,
)
from diffmodel.kernels._curves_io import (
    curves_from_json,
    curves_to_json,
)
from diffmodel.kernels._pooled import fold_weights
from diffmodel.kernels._work import gemm_kernel_work

needs_db = pytest.mark.skipif(
    not dk.database_available(),
    reason="aiconfigurator-core is not installed (pip install 'diffmodel[aic]')",
)
H100 = dm.hardware("h100-sxm")


# ------------------------------------------------------------------ hardware catalog


def test_h100_numbers_unchanged_and_specs_attached():
    assert float(H100.flops_16) == 989.5e12 and float(H100.flops_8) == 1979e12
    assert float(H100.hbm_bw) == 3.35e12 and float(H100.link_bw) == 450e9
    assert float(H100.sm_count) == 132 and float(H100.l2_bytes) == 50 * 2**20
    for alias in ("H100", "h100_sxm", "h100-sxm5"):
        assert canonical_hardware(alias) == "h100-sxm"
    assert canonical_hardware("rtx_pro_6000_server") == "rtx-pro-6000"
    assert all(s.source and s.sm_count > 0 and s.l2_mib > 0 for s in SPECS.values())


def test_spec_from_yaml_by_hand():
    spec = {
        "gpu": {"bfloat16_tc_flops": 312e12, "mem_bw": 2.039e12},
        "node": {"intra_node_bw": 300e9},
    }
    # No FP8 tensor cores: the FP8 peak is the 16-bit one, and the FP4 one with it.
    assert spec_from_yaml(spec) == dict(
        flops_16=312e12, flops_8=312e12, flops_4=312e12, hbm_bw=2.039e12, link_bw=300e9
    )
    with pytest.raises(ValueError, match="'mem_bw'"):
        spec_from_yaml({"gpu": {"bfloat16_tc_flops": 1.0}, "node": {}})


def test_user_hardware_needs_no_specs():
    hw = Hardware(flops_16=1e12, hbm_bw=1e12, link_bw=1e9)
    assert hw.sm_count is None and hw.l2_bytes is None
    work = gemm_kernel_work(64.0, 64.0, 64.0, hw)
    with pytest.raises(ValueError, match="SM count"):
        work.time_us(dk.default_roofline_curves(portable=True))
    assert np.isfinite(float(work.time_us(dk.default_roofline_curves())))


@needs_db
def test_catalog_reads_the_yamls():
    b200 = dm.hardware("b200")
    assert float(b200.flops_16) == 2.25e15 and float(b200.hbm_bw) == 7.7e12
    # FP4 tensor cores on Blackwell (b300's 14 PFLOP/s is not twice its FP8 4.5);
    # none on Hopper, where FP4 runs at the FP8 peak.
    assert float(b200.flops_4) == 9e15 and float(dm.hardware("b300").flops_4) == 14e15
    assert float(dm.hardware("h200").flops_4) == float(dm.hardware("h200").flops_8)
    a100 = dm.hardware("a100")
    yaml_a100 = spec_from_yaml(dk.system_spec("a100_sxm"))
    assert float(a100.flops_16) == yaml_a100["flops_16"]
    assert float(a100.hbm_bw) == yaml_a100["hbm_bw"]
    info = system_info("gb200")
    assert info["gpus_per_node"] == 4 and info["peaks_source"] == "gb200.yaml"


# ------------------------------------------------------------------------- database


@needs_db
def test_listing_and_one_line_errors():
    listing = dk.list_kernel_tables()
    assert {"system", "family", "backend", "version", "path"} <= set(listing.columns)
    h100 = listing[(listing["system"] == "h100_sxm") & (listing["backend"] == "vllm")]
    assert {"gemm", "prefill_attention", "moe", "allreduce"} <= set(h100["family"])
    for args, match in (
        (("nope", "vllm", "gemm"), "system 'nope'"),
        (("h100_sxm", "nope", "gemm"), "backend|backends"),
        (("h100_sxm", "vllm", "gemm", "9.9.9"), "version '9.9.9'"),
        (("h100_sxm", "vllm", "mla"), "unknown family"),
    ):
        with pytest.raises(ValueError, match=match) as err:
            dk.find_table(*args)
        assert "\n" not in str(err.value)
    # Newest version by number, not by string: 0.24.0 after 0.19.0.
    assert dk.find_table("h100_sxm", "vllm", "allreduce").version == "0.24.0"


@pytest.mark.slow
@needs_db
def test_empty_family_is_an_error_and_calibration_says_skipped():
    tables = dk.load_system_tables("a100_sxm", "vllm")
    assert tables["gemm"].attrs["version"] == "0.14.0"
    with pytest.raises(ValueError, match="no rows for family gemm_fp8"):
        dk.family_rows(tables, "gemm_fp8")
    lines = []
    small = {k: t.sample(min(len(t), 60), random_state=0) for k, t in tables.items()}
    curves = dk.calibrate_kernels(
        small,
        hardware_name="a100",
        options=dk.FitOptions(adam_steps=3, lbfgs_steps=0),
        portable=True,
        progress=lines.append,
    )
    assert any(line.startswith("skipped gemm_fp8") for line in lines)
    assert not any("on 0 kernels" in line for line in lines)
    assert curves.gemm_bf16.portable and curves.hardware == "a100"


@needs_db
def test_power_law_rows_have_more_work_than_balanced():
    tables = dk.load_system_tables("h100_sxm", "vllm", families=("moe",))
    rows = dk.family_rows(tables, "moe")
    assert {"balanced", "power_law_1.2"} <= set(rows["distribution"])
    keys = ["num_tokens", "hidden_size", "inter_size", "topk", "num_experts"]
    keys += ["moe_tp_size", "moe_ep_size"]
    big = rows[(rows["num_tokens"] >= 4096) & (rows["moe_ep_size"] == 1)]
    bal = big[big["distribution"] == "balanced"].drop_duplicates(keys)
    pl = big[big["distribution"] == "power_law_1.2"].drop_duplicates(keys)
    both = bal.merge(pl, on=keys, suffixes=("_b", "_p"))
    assert len(both) > 0
    w_b = dk.family_work(
        "moe", bal.set_index(keys).loc[both.set_index(keys).index].reset_index(), H100
    )
    w_p = dk.family_work(
        "moe", pl.set_index(keys).loc[both.set_index(keys).index].reset_index(), H100
    )
    # Skew pads more token tiles than round-robin on most shapes (not all: a
    # balanced load that is no multiple of the tile pads too), as the measured
    # times are longer.
    assert np.median(np.asarray(w_p.flops / w_b.flops)) > 1.0
    assert np.median(both["latency_us_p"] / both["latency_us_b"]) > 1.0


# ---------------------------------------------------------------------- portable form


def _gemm_batch(hw):
    m = jnp.array([1.0, 16.0, 256.0, 4096.0])
    return gemm_kernel_work(m, 4096.0, 4096.0, hw)


def test_portable_is_a_reparameterisation_on_one_gpu():
    """Absolute curves with x_half = (portable x_half) x peak x 1 us, u_half = (waves)
    x SMs give the same times."""
    port = dk.default_roofline_curves(latency=False, portable=True)
    peak, bw, sms = float(H100.flops_16), float(H100.hbm_bw), float(H100.sm_count)
    absolute = type(port)(
        flops=SaturationCurve(
            port.flops.raw_eta_max,
            port.flops.raw_slope,
            port.flops.log_half + math.log(peak * 1e-6),
        ),
        bandwidth=SaturationCurve(
            port.bandwidth.raw_eta_max,
            port.bandwidth.raw_slope,
            port.bandwidth.log_half + math.log(bw * 1e-6),
            unit="byte",
        ),
        occupancy=Occupancy(
            port.occupancy.raw_slope, port.occupancy.log_half + math.log(sms)
        ),
    )
    work = _gemm_batch(H100)
    np.testing.assert_allclose(work.time_us(port), work.time_us(absolute), rtol=1e-12)


def test_portable_curves_transfer_by_specs():
    """The same work on a GPU twice as fast everywhere (peaks, bandwidth, SMs) takes
    half the time under portable curves without a floor."""
    fast = Hardware(
        flops_16=2 * H100.flops_16,
        hbm_bw=2 * H100.hbm_bw,
        link_bw=H100.link_bw,
        sm_count=2 * H100.sm_count,
        l2_bytes=2 * H100.l2_bytes,
    )
    curves = dk.default_roofline_curves(latency=False, portable=True, cache=True)
    t_slow = _gemm_batch(H100).time_us(curves)
    # Twice the work in every size on the fast GPU: the same portable sizes.
    m = jnp.array([1.0, 16.0, 256.0, 4096.0])
    w2 = gemm_kernel_work(m, 4096.0, 4096.0, fast)
    w2 = type(w2)(
        flops=w2.flops * 2,
        bytes=w2.bytes * 2,
        peak_flops=w2.peak_flops,
        bandwidth=w2.bandwidth,
        units=w2.units * 2,
        sms=w2.sms,
        l2=w2.l2,
    )
    np.testing.assert_allclose(w2.time_us(curves), t_slow, rtol=1e-12)


def test_cache_lowers_memory_time_below_l2_only():
    port = dk.default_roofline_curves(latency=False, portable=True)
    cached = dk.default_roofline_curves(latency=False, portable=True, cache=True)
    small = gemm_kernel_work(1.0, 1024.0, 1024.0, H100)  # 2 MB of weights: in L2
    huge = gemm_kernel_work(1.0, 65536.0, 16384.0, H100)  # 2 GB: from HBM
    assert float(small.time_us(cached)) < float(small.time_us(port))
    np.testing.assert_allclose(huge.time_us(cached), huge.time_us(port), rtol=0.1)
    with pytest.raises(ValueError, match="portable"):
        dk.default_roofline_curves(cache=True)


def test_portable_gradient_matches_finite_differences_and_jit():
    work = _gemm_batch(H100)
    curves = dk.default_roofline_curves(latency=True, portable=True, cache=True)

    def total(log_half):
        c = dk.shifted(curves, jnp.zeros(3))
        c = type(c)(
            flops=SaturationCurve(c.flops.raw_eta_max, c.flops.raw_slope, log_half),
            bandwidth=c.bandwidth,
            occupancy=c.occupancy,
            raw_latency=c.raw_latency,
            raw_unit_ns=c.raw_unit_ns,
            cache=c.cache,
            portable=True,
        )
        return jnp.sum(jnp.log(work.time_us(c)))

    x0 = curves.flops.log_half
    g = jax.grad(total)(x0)
    h = 1e-6
    fd = (total(x0 + h) - total(x0 - h)) / (2 * h)
    np.testing.assert_allclose(g, fd, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(total)(x0), total(x0), rtol=1e-12)
    eta_f, eta_b = curves.efficiencies(1e3, 1e3, 1e3)
    assert float(eta_f) < 1.0 and float(eta_b) < 1.0


def test_portable_json_round_trip_is_exact(tmp_path):
    curves = default_kernel_curves("b200", portable=True)
    curves = type(curves)(
        **{
            f: getattr(curves, f)
            for f in ("gemm_fp8", "prefill_attention", "decode_attention", "moe")
        },
        gemm_bf16=dk.default_roofline_curves(portable=True, cache=True),
        allreduce=curves.allreduce,
        hardware="b200",
    )
    back = curves_from_json(curves_to_json(curves))
    assert back.gemm_bf16.portable and back.gemm_bf16.cache is not None
    assert back.allreduce.portable
    for a, b in zip(jax.tree.leaves(curves), jax.tree.leaves(back), strict=True):
        assert float(a) == float(b)
    path = dk.save_curves(curves, tmp_path / "c.json")
    assert dk.load_curves(path).gemm_bf16.portable


# --------------------------------------------------------------------- pooled fits


def test_fold_weights_count_each_gpu_once():
    gpu = np.array([0, 0, 0, 1, 2, 2])
    train = np.array([[True] * 6, [False, False, False, True, True, True]])
    w = np.asarray(fold_weights(train, gpu, 3))
    np.testing.assert_allclose(w[0], [1 / 9] * 3 + [1 / 3] + [1 / 6] * 2)
    np.testing.assert_allclose(w[1], [0, 0, 0, 1 / 2, 1 / 4, 1 / 4])
    with pytest.raises(ValueError, match="no training rows"):
        fold_weights(np.zeros((1, 6), bool), gpu, 3)


def test_shifted_moves_only_eta_max_and_latency():
    c = dk.default_roofline_curves(latency=True)
    s = dk.shifted(c, jnp.array([0.5, -0.25, 1.0]))
    np.testing.assert_allclose(s.flops.raw_eta_max - c.flops.raw_eta_max, 0.5)
    np.testing.assert_allclose(s.bandwidth.raw_eta_max - c.bandwidth.raw_eta_max, -0.25)
    np.testing.assert_allclose(s.raw_latency - c.raw_latency, 1.0)
    assert float(s.flops.log_half) == float(c.flops.log_half)


@pytest.mark.slow
def test_pooled_fit_recovers_shared_curves_from_two_gpus():
    """Times drawn from known portable curves on two GPUs (one 20% less efficient):
    leaving each out, the pooled fit on the other predicts it within the gap."""
    true = dk.default_roofline_curves(latency=False, portable=True)
    hw_b = Hardware(
        flops_16=2.25e15, hbm_bw=7.7e12, link_bw=9e11, sm_count=148, l2_bytes=1e8
    )
    m = jnp.geomspace(1.0, 8192.0, 24)
    works = [gemm_kernel_work(m, 4096.0, 4096.0, hw) for hw in (H100, hw_b)]
    ys = [works[0].time_us(true), works[1].time_us(true)]
    work = jax.tree.map(lambda *x: jnp.concatenate(x), *works)
    y = np.concatenate(ys)
    gpu = np.repeat([0, 1], len(m))
    curves, off = dk.fit_folds(
        work.time_us,
        y,
        np.stack([gpu == 1, gpu == 0]),
        gpu,
        dk.default_roofline_curves(latency=False, portable=True),
        n_gpus=2,
        options=dk.FitOptions(adam_steps=200, lbfgs_steps=50),
    )
    for f, held in enumerate((0, 1)):
        pred = np.asarray(work.time_us(dk.fold(curves, f)))[gpu == held]
        assert dm.mape(y[gpu == held], pred) < 1.0
    assert off.shape == (2, 2, 3)


# ------------------------------------------------------------------------------ CLI


@pytest.mark.slow
@needs_db
def test_cli_kernels_list_and_calibrate(tmp_path, capsys):
    assert cli_main(["kernels", "list", "--system", "l40s", "--backend", "vllm"]) == 0
    out = capsys.readouterr().out
    assert "l40s" in out and "gemm" in out and "0.24.0" in out
    path = tmp_path / "curves.json"
    argv = ["calibrate", "--system", "a100_sxm", "--out", str(path)]
    assert cli_main(argv + ["--adam-steps", "2", "--lbfgs-steps", "0"]) == 0
    err = capsys.readouterr().err
    assert "calibrated gemm_bf16 on 9240 kernels" in err
    assert "skipped gemm_fp8" in err
    curves = dk.load_curves(path)
    assert curves.hardware == "a100-sxm-80gb" and curves.gemm_bf16.portable
    # The step model loads them: step-level factors from the portable curves.
    factors = dk.kernel_prior_factors(curves, tp=8)
    assert all(np.isfinite(float(v)) for v in factors.as_dict().values())
    assert 0.0 < float(factors.gemm_flops) <= 1.0
    assert cli_main(["calibrate", "--system", "nope", "--out", str(path)]) == 1
