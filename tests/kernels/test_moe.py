"""MoE kernels: predictions and work by hand, vLLM's tuned configs, power-law
routing."""

import equinox as eqx
import jax
import numpy as np
import pandas as pd
import pytest

import diffmodel.kernels as dk
from diffmodel._model._hardware import hardware
from diffmodel._model._physics import moe_work
from diffmodel.kernels._moe import (
    moe_kernel_work,
    moe_local_only,
    moe_up_projections,
    moe_us,
    plain_moe_shapes,
    power_law_loads,
    vllm_tuned_moe,
)

from helpers import needs_db

H100 = hardware("h100-sxm")


def test_moe_prediction_by_hand():
    # Mixtral: one token, 8 experts top-2, EP 2: 1 expert slot per GPU on average.
    d, f = 4096, 14336
    got = moe_us(1, d, f, 2, 8, (1.0, 1.0), H100, ep=2.0)
    # 1 token <= 4 local experts: vLLM's default 16-row token tile, all computed.
    flops = 2 * 16 * 1 * 3 * d * f
    touched = 4 * (1 - (1 - 2 / 8) ** 1)
    # Activations of both routed slots (vLLM zero-fills the off-GPU one: input and
    # down output, 2 d per slot) with the unfused gate+up intermediate (6 f per
    # slot), and the token's output (d); then, serially, the pass over both slots'
    # down outputs (d bf16 each) at the same bandwidth.
    bytes_ = touched * 3 * d * f * 2 + (2 * (2 * d + 6 * f) + d) * 2
    slot_pass = 2 * d * 2
    want = ((flops / 989.5e12) ** 4 + (bytes_ / 3.35e12) ** 4) ** 0.25 * 1e6
    want += slot_pass / 3.35e12 * 1e6
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_moe_balanced_work_by_hand():
    # DeepSeek-V3-like experts (H 7168, F 2048), 256 experts top-8, EP 256: under
    # balanced routing the first GPU's single expert always gets the first token.
    h, f = 7168.0, 2048.0
    w = moe_kernel_work(1.0, h, f, 8.0, 256.0, H100, ep=256.0, routing="balanced")
    # One slot in one 16-row tile (1 token <= 1 local expert), one expert's weights.
    np.testing.assert_allclose(w.flops, 2 * 16 * 3 * h * f, rtol=1e-12)
    acts = 8 * (2 * h + 3 * f) + h + 8 * 3 * f
    np.testing.assert_allclose(w.bytes, 3 * h * f * 2 + acts * 2, rtol=1e-12)
    np.testing.assert_allclose(w.pre_bytes, 8 * h * 2, rtol=1e-12)  # the slot pass
    assert float(w.units) == 1 * (2 * f / 32)  # gate+up tiles of 32 columns
    np.testing.assert_allclose(w.blocks, (8 / 64 + 256) * (2 * f / 128))
    # Mixtral, 4096 tokens: 1024 slots per expert fill 16 tiles of 64 exactly.
    d, fm = 4096.0, 14336.0
    w = moe_kernel_work(4096.0, d, fm, 2.0, 8.0, H100, routing="balanced", tuned=1.0)
    np.testing.assert_allclose(w.flops, 2 * 4096 * 2 * 3 * d * fm, rtol=1e-12)
    assert float(w.units) == 8 * 16 * (2 * fm / 64) and float(w.tuned) == 1.0
    with pytest.raises(ValueError, match="routing"):
        moe_kernel_work(1.0, h, f, 8.0, 256.0, H100, routing="zipf")


def test_plain_mlp_experts_by_hand():
    """Nemotron-H's experts: one up projection and a squared ReLU, so two matrices
    of weights and FLOPs, an ``F`` intermediate and gate+up tiles over ``F``
    columns, where a gated MLP has three, ``2 F`` and ``2 F``."""
    h, f = 2688.0, 1856.0
    w = moe_kernel_work(
        1.0, h, f, 6.0, 128.0, H100, ep=128.0, routing="balanced", up_projections=1.0
    )
    # One slot in one 16-row tile, one expert's two matrices.
    np.testing.assert_allclose(w.flops, 2 * 16 * 2 * h * f, rtol=1e-12)
    acts = 6 * (2 * h + 2 * f) + h + 6 * 2 * f  # the unfused intermediate: 2 F
    np.testing.assert_allclose(w.bytes, 2 * h * f * 2 + acts * 2, rtol=1e-12)
    assert float(w.units) == 1 * np.ceil(f / 32)
    np.testing.assert_allclose(w.blocks, (6 / 64 + 128) * np.ceil(f / 128))
    f3, b3 = moe_work(64.0, h, f, 128.0, 6.0, 2.0, 2.0, "balanced", 2.0)
    f2, b2 = moe_work(64.0, h, f, 128.0, 6.0, 2.0, 2.0, "balanced", 1.0)
    np.testing.assert_allclose(f2 / f3, 2.0 / 3.0, rtol=1e-12)
    assert float(b2) < float(b3)

    def nbytes(up):
        return moe_kernel_work(
            64.0, h, f, 6.0, 128.0, H100, routing="balanced", up_projections=up
        ).bytes

    np.testing.assert_allclose(jax.jit(nbytes)(1.0), nbytes(1.0), rtol=1e-6)


def test_moe_up_projections_from_a_column_or_the_shape():
    rows = pd.DataFrame(
        {"hidden_size": [2688, 4096], "inter_size": [1856, 14336], "topk": [6, 2]}
    ).assign(num_experts=[128, 8])
    np.testing.assert_array_equal(
        moe_up_projections(rows.assign(up_projections=[1, 2])), [1.0, 2.0]
    )
    with pytest.raises(ValueError, match="up_projections"):
        moe_up_projections(rows.assign(up_projections=[1, 3]))
    if plain_moe_shapes():  # read from aiconfigurator-core's model configs
        # Nemotron-3 Nano (relu2) is plain; Mixtral gated.
        np.testing.assert_array_equal(moe_up_projections(rows), [1.0, 2.0])
        # The older collector timed every shape gated.
        old = rows.assign(kernel_source="vllm_fused_moe")
        np.testing.assert_array_equal(moe_up_projections(old), [2.0, 2.0])


@needs_db
def test_plain_moe_shapes_are_nemotron_h():
    shapes = plain_moe_shapes()
    assert (2688, 1856, 6, 128) in shapes  # Nemotron-3 Nano
    assert (1024, 2688, 22, 512) in shapes  # Super, in its latent width
    assert (4096, 1536, 8, 128) not in shapes  # Qwen3-235B: SwiGLU


def test_vllm_tuned_moe_lookup():
    table = pd.DataFrame(
        {
            "version": "0.14.0",
            "device": "NVIDIA H100 80GB HBM3",
            "moe_dtype": "bfloat16",
            "num_experts": [8, 8, 256, 256],
            "inter_size": [14336, 14336, 2048, 2048],
            "moe_tp_size": [1, 2, 4, 1],
            "moe_ep_size": [1, 1, 1, 32],
        }
    )
    # Mixtral TP2 (E=8, N=7168), DeepSeek TP4 (E=256, N=512) and EP32 (E=8, N=2048)
    # have tuned files in vLLM 0.14.0; Mixtral TP1 (E=8, N=14336) does not.
    np.testing.assert_array_equal(vllm_tuned_moe(table), [0.0, 1.0, 1.0, 1.0])
    # Kernels that do not read the files (FlashInfer, CUTLASS) are never tuned.
    flashinfer = table.assign(kernel_source="vllm_flashinfer_cutlass_moe")
    np.testing.assert_array_equal(vllm_tuned_moe(flashinfer), [0.0] * 4)
    # Another GPU and version: L40S in vLLM 0.24.0 has Mixtral TP4 (E=8, N=3584).
    l40s = table.assign(
        version="0.24.0", device="NVIDIA L40S", moe_tp_size=[4, 2, 4, 1]
    )
    np.testing.assert_array_equal(vllm_tuned_moe(l40s), [1.0, 0.0, 0.0, 0.0])
    # A device vLLM has no files for: its default tiles everywhere.
    other = table.assign(device="NVIDIA Imaginary GPU")
    np.testing.assert_array_equal(vllm_tuned_moe(other), [0.0] * 4)


def test_moe_local_only_by_kernel_source():
    sources = [
        "vllm_unquantizedfusedmoe_triton_tritonexperts",
        "vllm_unquantizedfusedmoe_flashinfer_trtllm_trtllmbf16experts",
        "vllm_modeloptfp8moe_flashinfer_cutlass_flashinferexperts",
        "vllm_compressedtensorswna16marlinmoe_marlin_marlinexperts",
        "vllm_xpu_moe",
        "vllm_fused_moe",
    ]
    table = pd.DataFrame({"kernel_source": sources})
    np.testing.assert_array_equal(moe_local_only(table), [0, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(moe_local_only(pd.DataFrame({"x": [1]})), [0])


def test_local_only_kernels_by_hand():
    # DeepSeek-V3-like experts at EP 8: 4096 tokens top-8 over 256 experts.
    t, h, f, k, e, ep = 4096.0, 7168.0, 2048.0, 8.0, 256.0, 8.0
    triton = moe_kernel_work(t, h, f, k, e, H100, ep=ep, routing="balanced")
    local = moe_kernel_work(
        t, h, f, k, e, H100, ep=ep, routing="balanced", local_only=1.0
    )
    # Same FLOPs and units; blocks over the local slots and experts only.
    np.testing.assert_allclose(local.flops, triton.flops, rtol=1e-12)
    np.testing.assert_allclose(local.units, triton.units, rtol=1e-12)
    n_tiles = np.ceil(2 * f / 128)
    np.testing.assert_allclose(triton.blocks, (t * k / 64 + e) * n_tiles)
    np.testing.assert_allclose(local.blocks, (t * k / ep / 64 + e / ep) * n_tiles)
    # Bytes: no zero-filled slots of other GPUs, no unfused [T k, 2F] intermediate.
    acts = [
        float(moe_work(t, h, f, e_, k_, 0.0, 2.0, "balanced")[1])
        for e_, k_ in ((e, k), (e / ep, k / ep))
    ]
    unfused = t * k * 3 * f * 2.0
    np.testing.assert_allclose(
        triton.bytes - local.bytes, acts[0] - acts[1] + unfused, rtol=1e-9
    )
    # Both pass over every routed slot outside their GEMMs (T k H bf16).
    np.testing.assert_allclose(triton.pre_bytes, t * k * h * 2.0, rtol=1e-12)
    np.testing.assert_allclose(local.pre_bytes, triton.pre_bytes, rtol=1e-12)


def test_vllm_tuned_moe_needs_a_known_version():
    table = pd.DataFrame(
        {
            "version": "0.1.0",
            "device": "NVIDIA H100 80GB HBM3",
            "moe_dtype": "bfloat16",
            "num_experts": [8],
            "inter_size": [14336],
            "moe_tp_size": [2],
            "moe_ep_size": [1],
        }
    )
    with pytest.raises(ValueError, match=r"vLLM '0.1.0'.*known: \['0.14.0'"):
        vllm_tuned_moe(table)
    np.testing.assert_array_equal(vllm_tuned_moe(table, strict=False), [0.0])
    with pytest.raises(ValueError, match="column 'version'"):
        vllm_tuned_moe(table.drop(columns="version"))
    no_version = table.drop(columns="version")
    np.testing.assert_array_equal(vllm_tuned_moe(no_version, strict=False), [0.0])


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


def test_expert_parallel_calls_pay_the_curves_fixed_cost_once():
    """At EP > 1 the work is marked expert-parallel and the curves' ``ep_latency_us``
    adds to its time exactly once, whatever the batch; at EP 1 nothing; curves
    without the term (16-bit MoE) ignore the mark. The gradient in its log is the
    cost itself (d t / d log c = c), finite-difference checked."""
    curves = dk.init_curves("moe_w4a16", portable=True)
    assert float(curves.ep_latency_us) == pytest.approx(5.0)
    plain = dk.init_curves("moe", portable=True)
    assert plain.log_ep_latency_us is None
    kw = dict(weight_bytes=0.53125, compute_bytes=2.0, local_only=1.0)
    tokens = np.array([1.0, 64.0, 4096.0])
    for ep, marked in ((4.0, 1.0), (1.0, 0.0)):
        work = moe_kernel_work(tokens, 2880.0, 2880.0, 4.0, 128.0, H100, ep=ep, **kw)
        np.testing.assert_array_equal(work.expert_parallel, marked)
        unmarked = eqx.tree_at(lambda w: w.expert_parallel, work, None,
                               is_leaf=lambda x: x is None)  # fmt: skip
        np.testing.assert_allclose(
            work.time_us(curves) - unmarked.time_us(curves), 5.0 * marked, rtol=1e-9
        )
        np.testing.assert_allclose(
            work.time_us(plain), unmarked.time_us(plain), rtol=1e-12
        )
    work = moe_kernel_work(64.0, 2880.0, 2880.0, 4.0, 128.0, H100, ep=8.0, **kw)

    def t(log_c):
        return work.time_us(eqx.tree_at(lambda c: c.log_ep_latency_us, curves, log_c))

    x = curves.log_ep_latency_us
    grad = float(jax.grad(t)(x))
    h = 1e-4
    fd = (float(t(x + h)) - float(t(x - h))) / (2 * h)
    assert grad == pytest.approx(5.0, rel=1e-6)
    assert grad == pytest.approx(fd, rel=1e-4)
