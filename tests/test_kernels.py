"""Kernel loaders, operator predictions, efficiency curves and a small calibration."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from diffmodel import mape
from diffmodel._model._factors import FACTOR_NAMES, Factors
from diffmodel._model._hardware import hardware
from diffmodel._model._physics import balanced_experts, touched_experts
from diffmodel.kernels._calibrate import (
    FitOptions,
    family_rows,
    family_work,
    fit_roofline_curves,
    held_out_split,
    init_curves,
    kernel_prior_factors,
)
from diffmodel.kernels._curves import (
    KernelCurves,
    SaturationCurve,
    default_kernel_curves,
    default_roofline_curves,
)
from diffmodel.kernels._curves_io import (
    curves_from_json,
    curves_to_json,
    load_curves,
    save_curves,
)
from diffmodel.kernels._moe import (
    moe_kernel_work,
    moe_us,
    power_law_loads,
    vllm_tuned_moe,
)
from diffmodel.kernels._tables import (
    load_allreduce,
    load_attention,
    load_gemm,
    load_kernel_tables,
    load_vidur_allreduce,
    load_vidur_operators,
    table_work,
    vidur_work,
)
from diffmodel.kernels._work import (
    allreduce_kernel_us,
    causal_tile_pairs,
    decode_attention_us,
    gemm_kernel_work,
    gemm_us,
    prefill_attention_us,
)

H100 = hardware("h100-sxm")


@pytest.fixture(scope="module")
def tables(data_dir):
    return load_kernel_tables(data_dir)


# ------------------------------------------------------------------------- loaders


def test_gemm_loader_converts_ms_to_us(data_dir):
    g = load_gemm(data_dir / "kernels/h100_sxm/gemm_perf.parquet")
    np.testing.assert_allclose(g["latency_us"], g["latency"] * 1e3)
    big = g[
        (g.m == 8192) & (g.n == 16384) & (g.k == 16384) & (g.gemm_dtype == "bfloat16")
    ]
    # 4.4 TFLOP at 0.3-1.0 of the 989.5 TFLOP/s peak: 4.4-15 ms (a unit check).
    assert 4400 < float(big["latency_us"].iloc[0]) < 15000


def test_allreduce_loader_counts_bytes(data_dir):
    a = load_allreduce(data_dir / "kernels/h100_sxm/custom_allreduce_perf.parquet")
    np.testing.assert_array_equal(a["bytes"], 2 * a["message_size"])  # bf16 elements
    v = load_vidur_allreduce(data_dir / "vidur/h100/all_reduce_dgx.csv")
    assert set(v["num_gpus"]) == {2.0, 4.0, 8.0} and (v["latency_us"] > 0).all()


def test_vidur_loader_long_form(data_dir):
    v = load_vidur_operators(data_dir / "vidur/h100/llama-2-7b-hf_mlp.csv", "7b")
    assert v["operator"].nunique() == 10 and (v["model"] == "7b").all()
    assert (v["latency_us"] > 0).all()


def test_loader_names_missing_columns(tmp_path):
    path = tmp_path / "gemm.parquet"
    pd.DataFrame({"m": [1], "n": [2], "latency": [0.1]}).to_parquet(path)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['k', 'gemm_dtype'\]"):
        load_gemm(path)
    with pytest.raises(ValueError, match="not found"):
        load_attention(tmp_path / "nope.parquet")


def test_loader_rejects_bad_values(tmp_path):
    path = tmp_path / "gemm.csv"
    pd.DataFrame(
        {"m": [1], "n": [2], "k": [3], "gemm_dtype": ["bfloat16"], "latency": [-1.0]}
    ).to_csv(path)
    with pytest.raises(ValueError, match="positive times"):
        load_gemm(path)


# --------------------------------------------------------------- operator predictions


def test_gemm_prediction_by_hand():
    m, n, k = 4096, 4096, 4096
    got = gemm_us(m, n, k, (0.5, 1e-3), H100)
    compute = 2 * m * n * k / (989.5e12 * 0.5) * 1e6
    memory = (k * n + m * k + m * n) * 2 / (3.35e12 * 1e-3) * 1e6
    np.testing.assert_allclose(got, (compute**4 + memory**4) ** 0.25, rtol=1e-12)
    # FP8 uses the FP8 peak and one byte per element.
    fp8 = gemm_us(m, n, k, (0.5, 1.0), H100, dtype_bytes=1.0)
    mem8 = (k * n + m * k + m * n) / 3.35e12 * 1e6
    c8 = 2 * m * n * k / (1979e12 * 0.5) * 1e6
    np.testing.assert_allclose(fp8, (c8**4 + mem8**4) ** 0.25, rtol=1e-12)


def test_attention_predictions_by_hand():
    b, s, h, kvh, dh = 2, 1024, 16, 2, 128
    pf = prefill_attention_us(b, s, h, kvh, dh, (1.0, 1.0), H100)
    # 8 query heads per KV head packed into 64 query tiles of 128 rows; tile i
    # computes ceil((i + 1) / 8) key blocks of 128: 288 blocks per KV head
    # (1.125 x the 256 blocks of the ideal isl^2 / 2 per head).
    flops = 4 * dh * kvh * b * 288 * 128 * 128
    bytes_ = 2 * kvh * dh * 2 * b * s + 2 * h * dh * 2 * b * s
    want = ((flops / 989.5e12) ** 4 + (bytes_ / 3.35e12) ** 4) ** 0.25 * 1e6
    np.testing.assert_allclose(pf, want, rtol=1e-12)
    dec = decode_attention_us(b, s, h, kvh, dh, (1.0, 1.0), H100)
    flops = 4 * h * dh * b * s
    bytes_ = 2 * kvh * dh * 2 * b * s + 2 * h * dh * 2 * b
    want = ((flops / 989.5e12) ** 4 + (bytes_ / 3.35e12) ** 4) ** 0.25 * 1e6
    np.testing.assert_allclose(dec, want, rtol=1e-12)


def test_moe_prediction_by_hand():
    # Mixtral: one token, 8 experts top-2, EP 2: 1 expert slot per GPU on average.
    d, f = 4096, 14336
    got = moe_us(1, d, f, 2, 8, (1.0, 1.0), H100, ep=2.0)
    # 1 token <= 4 local experts: vLLM's default 16-row token tile, all computed.
    flops = 2 * 16 * 1 * 3 * d * f
    touched = 4 * (1 - (1 - 2 / 8) ** 1)
    # Activations of both routed slots (vLLM zero-fills the off-GPU one), with the
    # unfused gate+up intermediate (6 f per slot) and the down output read back by
    # the sum over the slots (d per slot).
    bytes_ = touched * 3 * d * f * 2 + (2 * (3 * d + 6 * f) + d) * 2
    want = ((flops / 989.5e12) ** 4 + (bytes_ / 3.35e12) ** 4) ** 0.25 * 1e6
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_moe_balanced_work_by_hand():
    # DeepSeek-V3-like experts (H 7168, F 2048), 256 experts top-8, EP 256: under
    # balanced routing the first GPU's single expert always gets the first token.
    h, f = 7168.0, 2048.0
    w = moe_kernel_work(1.0, h, f, 8.0, 256.0, H100, ep=256.0, routing="balanced")
    # One slot in one 16-row tile (1 token <= 1 local expert), one expert's weights.
    np.testing.assert_allclose(w.flops, 2 * 16 * 3 * h * f, rtol=1e-12)
    acts = 8 * (2 * h + 3 * f) + h + 8 * (3 * f + h)
    np.testing.assert_allclose(w.bytes, 3 * h * f * 2 + acts * 2, rtol=1e-12)
    assert float(w.units) == 1 * (2 * f / 32)  # gate+up tiles of 32 columns
    np.testing.assert_allclose(w.blocks, (8 / 64 + 256) * (2 * f / 128))
    # Mixtral, 4096 tokens: 1024 slots per expert fill 16 tiles of 64 exactly.
    d, fm = 4096.0, 14336.0
    w = moe_kernel_work(4096.0, d, fm, 2.0, 8.0, H100, routing="balanced", tuned=1.0)
    np.testing.assert_allclose(w.flops, 2 * 4096 * 2 * 3 * d * fm, rtol=1e-12)
    assert float(w.units) == 8 * 16 * (2 * fm / 64) and float(w.tuned) == 1.0
    with pytest.raises(ValueError, match="routing"):
        moe_kernel_work(1.0, h, f, 8.0, 256.0, H100, routing="zipf")


def _round_robin_touched(tokens, n_experts, top_k, ep):
    """Distinct experts of the first of ``ep`` GPUs hit by the benchmarks' balanced
    routing: token t takes experts (t + i s) mod E, s = ceil(E / k), once the
    tokens reach s, else floor(t s / T + i s) mod E."""
    s = -(-n_experts // top_k)
    hit = set()
    for t in range(tokens):
        for i in range(top_k):
            e = (t + i * s if tokens >= s else int(t * s / tokens + i * s)) % n_experts
            hit.add(e)
    return sum(e < n_experts // ep for e in hit)


@pytest.mark.parametrize(
    "n_experts,top_k,ep",
    [(8, 2, 1), (8, 2, 2), (8, 2, 8), (256, 8, 1), (256, 8, 8), (256, 8, 256)],
)
@pytest.mark.parametrize("tokens", [1, 2, 3, 5, 16, 31, 32, 100, 1000])
def test_balanced_experts_match_round_robin(tokens, n_experts, top_k, ep):
    got = balanced_experts(float(tokens), n_experts / ep, top_k / ep)
    assert float(got) == _round_robin_touched(tokens, n_experts, top_k, ep)


def test_touched_experts_by_routing():
    assert float(balanced_experts(1.0, 256.0, 8.0)) == 8.0
    assert float(balanced_experts(64.0, 256.0, 8.0)) == 256.0
    assert float(balanced_experts(0.0, 8.0, 2.0)) == 0.0
    assert float(balanced_experts(5.0, 0.0, 0.0)) == 0.0  # dense model
    assert float(touched_experts(1.0, 8.0, 2.0)) == pytest.approx(2.0)  # uniform
    # Uniform routing misses experts that round-robin routing touches: 4 tokens on
    # Mixtral touch 8(1 - 0.75^4) = 5.47 experts on average, balanced all 8.
    np.testing.assert_allclose(touched_experts(4.0, 8.0, 2.0), 8 * (1 - 0.75**4))
    assert float(touched_experts(4.0, 8.0, 2.0, "balanced")) == 8.0
    with pytest.raises(ValueError, match="routing"):
        touched_experts(1.0, 8.0, 2.0, "power_law")


def test_vllm_tuned_moe_lookup():
    table = pd.DataFrame(
        {
            "device": "NVIDIA H100 80GB HBM3",
            "moe_dtype": "bfloat16",
            "num_experts": [8, 8, 256, 256],
            "inter_size": [14336, 14336, 2048, 2048],
            "moe_tp_size": [1, 2, 4, 1],
            "moe_ep_size": [1, 1, 1, 32],
        }
    )
    # Mixtral TP2 (E=8, N=7168), DeepSeek TP4 (E=256, N=512) and EP32 (E=8, N=2048)
    # have tuned files; Mixtral TP1 (E=8, N=14336) does not.
    np.testing.assert_array_equal(vllm_tuned_moe(table), [0.0, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="'device', 'moe_dtype'"):
        vllm_tuned_moe(table.assign(moe_dtype="fp8"))


@pytest.mark.slow
def test_moe_table_work_models_power_law_routing(tables):
    rows = tables["moe"]
    rows = rows[(rows["moe_dtype"] == "bfloat16") & (rows["num_experts"] == 8)]
    bal = rows[rows["distribution"] == "balanced"]
    w = table_work("moe", bal, H100)
    assert w.tuned is not None and float(w.tuned.max()) == 1.0
    # Mixed routings in one table: the balanced rows keep their balanced work.
    mixed = table_work("moe", rows, H100)
    is_bal = (rows["distribution"] == "balanced").to_numpy()
    np.testing.assert_allclose(mixed.flops[is_bal], w.flops, rtol=1e-12)
    np.testing.assert_allclose(mixed.bytes[is_bal], w.bytes, rtol=1e-12)
    with pytest.raises(ValueError, match="'distribution'"):
        table_work("moe", bal.assign(distribution="zipf"), H100)


def test_power_law_loads_by_hand():
    # 4 experts, 1 token top-1: T k = 1 <= E, draws on [0.01, 2]; the quantiles'
    # largest takes the one slot after rounding, so one expert is touched.
    loads = power_law_loads(1.0, 4.0, 1.0, 1.0, 1.2)
    assert float(loads.touched) == 1.0
    assert float(loads.tiles_small) == 1.0 and float(loads.tiles_large) == 1.0
    # Many tokens: every expert is touched; skewed loads need more tiles than the
    # balanced ceil(T k / E / BM) per expert.
    t, e, k = 4096.0, 8.0, 2.0
    loads = power_law_loads(t, e, k, 1.0, 1.01)
    assert float(loads.touched) == e
    assert float(loads.tiles_large) >= e * np.ceil(t * k / e / 64.0)
    # Expert parallelism: the measured GPU holds E / ep experts, the busiest first.
    half = power_law_loads(t, e, k, 2.0, 1.01)
    assert float(half.touched) == e / 2
    assert float(half.tiles_large) > float(loads.tiles_large) / 2


@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("isl", [1, 16, 100, 128, 129, 1000, 4096])
def test_causal_tile_pairs_match_a_loop(isl, group):
    pairs, tiles = causal_tile_pairs(float(isl), float(group))
    n_q = -(-isl * group // 128)
    blocks = sum(-(-min(isl, -(-128 * (i + 1) // group)) // 128) for i in range(n_q))
    assert float(tiles) == n_q
    assert float(pairs) == 128 * 128 * blocks
    assert float(pairs) >= group * isl * isl / 2  # never fewer than the ideal


def test_allreduce_prediction_by_hand():
    got = allreduce_kernel_us(1e6, 4, (0.5, 7.0), H100)
    np.testing.assert_allclose(got, 7.0 + 2 * 3 / 4 * 1e6 / (450e9 * 0.5) * 1e6)
    assert float(allreduce_kernel_us(1e6, 1, (0.5, 7.0), H100)) == 0.0


def test_vidur_work_shapes():
    table = pd.DataFrame(
        {
            "operator": ["attn_pre_proj", "add", "mlp_act"],
            "n_head": 64,
            "n_kv_head": 8,
            "n_embd": 8192,
            "n_expanded_embd": 28672,
            "num_tokens": 16,
            "num_tensor_parallel_workers": 8,
        }
    )
    w = vidur_work(table, H100)
    # QKV at TP8: 8 query heads + 2 x 1 KV head of 128 -> n = 1280.
    np.testing.assert_allclose(w.flops[0], 2 * 16 * 1280 * 8192)
    np.testing.assert_allclose(w.bytes[1:], [16 * 3 * 8192 * 2, 16 * 3 * 3584 * 2])
    assert float(w.flops[1]) == 0.0


# -------------------------------------------------------------------------- curves


def test_curves_monotone_and_below_one():
    curves = default_kernel_curves()
    x = jnp.logspace(0, 16, 200)
    for fam in ("gemm_bf16", "decode_attention"):
        c = getattr(curves, fam)
        for curve in (c.flops, c.bandwidth):
            eta = curve(x)
            assert jnp.all(eta > 0) and jnp.all(eta <= 1)
            assert jnp.all(jnp.diff(eta) >= 0)
    # Even extreme raw values stay in (0, 1].
    wild = SaturationCurve(jnp.asarray(50.0), jnp.asarray(50.0), jnp.asarray(-50.0))
    assert float(wild(1e20)) <= 1.0
    # Time x / eta(x) never decreases with the work (slope <= 1).
    t = x / curves.gemm_bf16.flops(x)
    assert jnp.all(jnp.diff(t) >= 0)


@pytest.mark.slow
def test_gradient_matches_finite_differences():
    work = family_work_small()
    actual = jnp.asarray([3.0, 10.0, 50.0, 400.0])
    curves = init_curves("decode_attention")

    def loss(c):
        return jnp.mean((jnp.log(work.time_us(c)) - jnp.log(actual)) ** 2)

    grads = jax.grad(loss)(curves)
    for path in (
        lambda c: c.flops.log_half,
        lambda c: c.bandwidth.raw_eta_max,
        lambda c: c.occupancy.raw_slope,
        lambda c: c.raw_latency,
        lambda c: c.raw_unit_ns,
    ):
        h = 1e-6
        x0 = path(curves)
        up = loss(eqx.tree_at(path, curves, x0 + h))
        down = loss(eqx.tree_at(path, curves, x0 - h))
        np.testing.assert_allclose(path(grads), (up - down) / (2 * h), rtol=1e-5)


def family_work_small():
    from diffmodel.kernels._work import decode_attention_work

    return decode_attention_work(
        jnp.asarray([1.0, 8.0, 64.0, 256.0]),
        jnp.asarray([16.0, 1024.0, 4096.0, 32768.0]),
        8.0,
        1.0,
        128.0,
        H100,
    )


def test_json_round_trip_is_exact(tmp_path):
    curves = default_kernel_curves()
    curves = jax.tree.map(lambda x: x + 0.1234567890123, curves)
    path = save_curves(curves, tmp_path / "curves.json")
    back = load_curves(path)
    assert isinstance(back, KernelCurves) and back.hardware == curves.hardware
    for a, b in zip(jax.tree.leaves(curves), jax.tree.leaves(back), strict=True):
        assert float(a) == float(b)
    assert jax.tree.structure(curves) == jax.tree.structure(back)
    obj = curves_to_json(curves)
    assert obj["gemm_bf16"]["flops"]["physical"]["x_half_unit"] == "FLOP"
    assert "latency_us" in obj["decode_attention"]["physical"]
    assert "tuned_eta_max" in obj["moe"]["physical"]
    assert "raw_tuned" not in obj["gemm_bf16"].get("raw", {})
    assert obj["gemm_fp8"]["prologue"]["physical"]["x_half_unit"] == "byte"
    assert "prologue" not in obj["gemm_bf16"]
    del obj["moe"]
    with pytest.raises(ValueError, match="missing key 'moe'"):
        curves_from_json(obj)


def test_tuned_shift_raises_compute_efficiency_only():
    c = default_roofline_curves(tuned=True)
    c = eqx.tree_at(lambda c: c.raw_tuned, c, jnp.asarray(2.0))
    f, b, u = jnp.asarray([1e9, 1e12]), jnp.asarray([4e6, 4e9]), jnp.asarray([64.0])
    plain_f, plain_b = c.efficiencies(f, b, u)
    fast_f, fast_b = c.efficiencies(f, b, u, jnp.asarray([1.0, 1.0]))
    # Saturated efficiency sigmoid(logit(0.8) + 2), occupancy 1/2 at 64 units.
    eta_max = 1 / (1 + np.exp(-(np.log(0.8 / 0.2) + 2.0)))
    want = eta_max / (1 + np.exp(-0.8 * (np.log(f) - np.log(1e9)))) * 0.5
    np.testing.assert_allclose(fast_f, want, rtol=1e-12)
    assert jnp.all(fast_f > plain_f) and jnp.all(fast_f < 1.0)
    np.testing.assert_array_equal(fast_b, plain_b)
    # tuned = 0 or None is the plain curve, bit for bit.
    np.testing.assert_array_equal(c.efficiencies(f, b, u, jnp.zeros(2))[0], plain_f)
    assert default_roofline_curves().tuned_logit == 0.0


def test_scheduled_blocks_cost_time():
    c = eqx.tree_at(
        lambda c: c.raw_unit_ns,
        default_roofline_curves(occupancy=False),
        jnp.asarray(np.log(np.expm1(2.0))),  # 2 ns per block
    )
    w = moe_kernel_work(64.0, 4096.0, 14336.0, 2.0, 8.0, H100)
    no_blocks = eqx.tree_at(lambda w: w.blocks, w, replace=None)
    extra = w.time_us(c) - no_blocks.time_us(c)
    np.testing.assert_allclose(extra, (w.blocks - w.units) * 2e-3, rtol=1e-9)


def test_physical_constructor_checks():
    with pytest.raises(ValueError, match="eta_max"):
        SaturationCurve.from_physical(eta_max=1.5, slope=0.5, x_half=1.0, unit="B")
    c = SaturationCurve.from_physical(eta_max=0.8, slope=0.5, x_half=1e6, unit="B")
    np.testing.assert_allclose(c(1e6), 0.4)


# ---------------------------------------------------------------------- calibration


def test_held_out_split_keeps_shapes_whole():
    rows = pd.DataFrame({"n": [1, 1, 2, 2, 3, 3, 4, 4], "k": [1] * 8, "m": range(8)})
    test = held_out_split(rows, ["n", "k"], frac=0.5)
    for _, g in rows.assign(t=test).groupby("n"):
        assert g["t"].nunique() == 1
    assert test.sum() == 4
    with pytest.raises(ValueError, match="not columns"):
        held_out_split(rows, ["q"])


@pytest.mark.slow
def test_small_calibration_improves_gemm(tables):
    rows = family_rows(tables, "gemm_bf16")
    rows = rows[rows["n"].isin([1024, 4096]) & rows["k"].isin([1024, 4096, 8192])]
    work = family_work("gemm_bf16", rows, H100)
    y = rows["latency_us"].to_numpy(float)
    before = mape(y, work.time_us((0.7, 0.8)))
    curves = fit_roofline_curves(
        work,
        y,
        init_curves("gemm_bf16"),
        options=FitOptions(adam_steps=150, lbfgs_steps=20),
    )
    after = mape(y, work.time_us(curves))
    assert after < 0.5 * before
    assert after < 15.0
    assert float(curves.flops.eta_max) <= 1.0 and float(curves.bandwidth.eta_max) <= 1.0


def test_kernel_prior_factors_are_physical():
    prior = kernel_prior_factors(default_kernel_curves())
    assert isinstance(prior, Factors)
    values = prior.as_dict()
    assert set(values) == set(FACTOR_NAMES)
    for name in ("gemm_flops", "mem_bw", "attn_flops", "attn_bw", "comm_bw"):
        assert 0.0 < float(values[name]) <= 1.0, name
    assert float(values["comm_latency_us"]) > 0
    with pytest.raises(ValueError, match="tp"):
        kernel_prior_factors(default_kernel_curves(), tp=0)


# ------------------------------------------------------- FP8 activation quantization


def test_fp8_gemm_work_counts_bf16_output_and_quantization_pass():
    # m=4, n=8, k=16 FP8 GEMM, bf16 output, dynamic activation quantization:
    # bytes = 16*8*1 + 4*16*1 + 4*8*2 = 128 + 64 + 64 = 256;
    # pre_bytes = 4*16*(2*2 + 1) = 320 (absmax read, re-read, FP8 write);
    # the same GEMM in bf16: 256 + 128 + 64 = 448 bytes.
    w = gemm_kernel_work(4.0, 8.0, 16.0, H100, 1.0, out_bytes=2.0, act_quant=1.0)
    assert float(w.flops) == 2 * 4 * 8 * 16
    assert float(w.bytes) == 256.0
    assert float(w.pre_bytes) == 320.0
    assert float(w.peak_flops) == H100.flops_8
    # constant efficiencies: the pass runs at eta_bw, serially, before the GEMM
    plain = gemm_kernel_work(4.0, 8.0, 16.0, H100, 1.0, out_bytes=2.0)
    assert plain.pre_bytes is None
    extra = float(w.time_us((0.5, 0.25)) - plain.time_us((0.5, 0.25)))
    assert extra == pytest.approx(320.0 / (float(H100.hbm_bw) * 0.25) * 1e6, rel=1e-6)


def test_fp8_gemm_act_quant_must_be_0_or_1():
    with pytest.raises(ValueError, match="act_quant"):
        gemm_kernel_work(4.0, 8.0, 16.0, H100, 1.0, act_quant=2.0)


def test_prologue_curve_sets_the_quantization_pass_efficiency():
    curves = default_roofline_curves(prologue=True)
    w = gemm_kernel_work(
        jnp.array([1.0, 1024.0]), 64.0, 65536.0, H100, 1.0, 2.0, act_quant=1.0
    )
    base = gemm_kernel_work(jnp.array([1.0, 1024.0]), 64.0, 65536.0, H100, 1.0, 2.0)
    eta = curves.prologue(w.pre_bytes)
    assert bool(jnp.all((eta > 0) & (eta < 1)))
    want = w.pre_bytes / (H100.hbm_bw * eta) * 1e6
    got = w.time_us(curves) - base.time_us(curves)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-9)
    # more bytes: a higher efficiency but a longer pass (monotone time)
    assert float(eta[1]) > float(eta[0]) and float(got[1]) > float(got[0])


def test_table_work_quantizes_only_per_tensor_fp8_rows():
    t = pd.DataFrame(
        dict(m=[4, 4, 4], n=[8, 8, 8], k=[16, 16, 16]),
    ).assign(gemm_dtype=["bfloat16", "fp8", "fp8_block"])
    w = table_work("gemm", t, H100)
    np.testing.assert_array_equal(np.asarray(w.pre_bytes), [0.0, 320.0, 0.0])
    np.testing.assert_array_equal(np.asarray(w.bytes), [448.0, 256.0, 256.0])
    bf = table_work("gemm", t.iloc[:1], H100)
    assert bf.pre_bytes is None
