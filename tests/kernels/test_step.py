"""The kernel-sum step (device side from curves, host costs apart) and
fit_host_on_kernels."""

import dataclasses
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import diffmodel as dm
from diffmodel._fitting._laplace import IdentifiabilityWarning
from diffmodel.kernels import default_kernel_curves
from diffmodel.kernels._moe import moe_kernel_work, moe_us
from diffmodel.kernels._step import (
    HostCosts,
    _gemm_us,
    host_features,
    kernel_step_time,
    mxfp4_tile_rule,
    runs_flashinfer_mxfp4 as dk_runs,
)
from diffmodel.kernels._work import (
    _work,
    allreduce_kernel_us,
    decode_attention_work,
    gemm_kernel_work,
    gemm_us,
)
from tests.helpers import (
    assert_grad_matches_fd,
    host_frame,
    one_step,
    run_python,
    stats_and_deployments,
    with_host_target,
)

CURVES = default_kernel_curves()


def _dep(model="llama-2-70b", tp=4, hw="h100-sxm"):
    return dm.deployment(model, hw, tp)


def test_linear_is_the_four_gemms_of_every_layer_at_hand_shapes():
    # Llama-2-70B at TP 4 per GPU: 16 query and 2 KV heads of 128, FFN 28672 / 4.
    dep = _dep()
    hw = dep.hw
    stats = one_step(decode_tokens=32, num_decode=32, kv_decode=32 * 1000)
    b = kernel_step_time(stats, dep, CURVES)
    shapes = [(2560, 8192), (8192, 2048), (14336, 8192), (8192, 7168)]
    want = 80 * sum(float(gemm_us(32.0, n, k, CURVES.gemm_bf16, hw)) for n, k in shapes)
    assert float(b.linear) == pytest.approx(want, rel=1e-12)
    ar = 80 * 2 * float(allreduce_kernel_us(32 * 8192 * 2.0, 4, CURVES.allreduce, hw))
    assert float(b.allreduce) == pytest.approx(ar, rel=1e-12)
    lm = float(gemm_us(32.0, 32000 / 4, 8192, CURVES.gemm_bf16, hw))
    assert float(b.lm_head) == pytest.approx(lm, rel=1e-12)
    assert float(b.attention_prefill) == 0.0
    assert float(b.attention_decode) > 0.0
    assert float(b.overhead) == 0.0


def test_host_costs_are_paid_per_step_layer_and_request():
    dep = _dep()
    host = HostCosts(step_us=100.0, layer_us=20.0, request_us=3.0, layer_request_us=0.5)
    stats = one_step(
        prefill_tokens=64, num_prefill=1, attn_prefill=64 * 32, decode_tokens=5,
        num_decode=5, kv_decode=5 * 1000,
    )  # fmt: skip
    b = kernel_step_time(stats, dep, CURVES, host)
    assert float(b.overhead) == pytest.approx(
        100.0 + 80 * 20.0 + 6 * 3.0 + 80 * 6 * 0.5
    )
    x = np.asarray(host_features(stats, dep))
    assert x.tolist() == [1.0, 80.0, 6.0, 480.0]


def test_a_step_without_tokens_runs_no_kernel():
    host = HostCosts(step_us=100.0, layer_us=20.0, request_us=3.0)
    b = kernel_step_time(one_step(num_decode=0), _dep(), CURVES, host)
    assert float(b.total) == pytest.approx(100.0)


def test_no_allreduce_on_one_gpu():
    stats = one_step(decode_tokens=8, num_decode=8, kv_decode=8 * 500)
    b = kernel_step_time(stats, _dep("llama-3.1-8b", 1), CURVES)
    assert float(b.allreduce) == 0.0


def test_jit_vmap_and_gradient():
    dep = _dep()
    host = HostCosts(layer_us=20.0)

    def total(dec):
        stats = one_step(num_decode=1, kv_decode=1000, num_prefill=1)
        stats = dm.BatchStats(
            **{**stats.__dict__, "decode_tokens": dec, "prefill_tokens": 3 * dec}
        )
        return kernel_step_time(stats, dep, CURVES, host, check=False).total

    xs = jnp.array([4.0, 40.0, 400.0])
    eager = np.array([float(total(x)) for x in xs])
    np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(total))(xs)), eager)
    # Away from the GEMMs' slice boundaries (160 tokens is 5 slices of 32 exactly):
    # the time is piecewise smooth in the token count.
    assert_grad_matches_fd(lambda v: total(v[0]), np.array([41.0]), rtol=1e-5)
    # The host cost's derivative is exactly its multiplier, L = 80.
    g = jax.grad(
        lambda h: (
            kernel_step_time(
                one_step(decode_tokens=1, num_decode=1, kv_decode=10),
                dep,
                CURVES,
                HostCosts(layer_us=h),
            ).total
        )
    )(20.0)
    assert float(g) == pytest.approx(80.0)


_HESSIAN_CODE = """
import dataclasses
import equinox as eqx, jax, jax.flatten_util, jax.numpy as jnp, numpy as np
import diffmodel as dm
from diffmodel.kernels import default_kernel_curves
from diffmodel.kernels._step import kernel_step_time
from helpers import one_step
C = default_kernel_curves()
dep = dm.deployment("llama-2-70b", "h100-sxm", 4)
fams = (C.gemm_bf16, C.prefill_attention, C.decode_attention)
flat, unravel = jax.flatten_util.ravel_pytree(eqx.filter(fams, eqx.is_inexact_array))
rest = eqx.filter(fams, eqx.is_inexact_array, inverse=True)
steps = {
    "decode only": one_step(decode_tokens=32, num_decode=32, kv_decode=32e3),
    "prefill only": one_step(
        prefill_tokens=512, num_prefill=1, attn_prefill=512**2 / 2
    ),
}
for name, stats in steps.items():
    def log_t(p):
        g, pf, dec = eqx.combine(unravel(p), rest)
        c = dataclasses.replace(
            C, gemm_bf16=g, prefill_attention=pf, decode_attention=dec
        )
        return jnp.log(kernel_step_time(stats, dep, c, check=False).total)
    h = np.asarray(jax.hessian(log_t)(flat))
    print(name, int(np.isnan(h).sum()), float(np.abs(h).max()))
"""


def test_second_derivatives_in_the_curves_are_finite_without_prefill_or_decode():
    # A step with no prefill (or no decode) runs no such kernel; the branch its
    # `where` drops must stay finite, or the Hessian in the curves (the joint fit's
    # Laplace) is NaN everywhere though the gradient is not. In a fresh process:
    # float32, the package's default (the suite runs in float64, where it is not).
    for line in run_python(_HESSIAN_CODE).strip().splitlines():
        name, nans, biggest = line.rsplit(" ", 2)
        assert int(nans) == 0, name
        assert float(biggest) > 0.0, name


def _with_arch(dep, **fields):
    """``dep`` with some of its architecture's fields replaced."""
    arch = eqx.tree_at(
        lambda a: [getattr(a, f) for f in fields],
        dep.arch,
        [jnp.asarray(v, float) for v in fields.values()],
    )
    return dataclasses.replace(dep, arch=arch)


def test_models_it_cannot_time_are_refused():
    one = one_step(decode_tokens=1, num_decode=1)
    with pytest.raises(ValueError, match=r"sparse attention \(index_heads > 0\)"):
        kernel_step_time(one, _dep("deepseek-ai/DeepSeek-V3.2", 8), CURVES)
    with pytest.raises(ValueError, match="'diffmodel predict' without --host"):
        kernel_step_time(one, _dep("deepseek-ai/DeepSeek-V3.2", 8), CURVES)
    fp6_experts = _with_arch(
        _dep("mixtral-8x7b", 2), expert_compute_bytes=0.75, expert_weight_bytes=0.75
    )
    with pytest.raises(
        ValueError,
        match=r"expert_compute_bytes \[0.75\] \(expected one of \[0.5, 1.0, 2.0\]",
    ):
        kernel_step_time(one, fp6_experts, CURVES)


def _attention_only(dep):
    """``dep`` with one layer and no MLP: the step's linear is its projections."""
    return _with_arch(dep, n_layers=1.0, dense_layers=0.0, moe_layers=0.0)


def test_mla_layers_at_hand_shapes():
    """DeepSeek-V3 at TP 8 (16 heads per GPU, FP8 block GEMMs with one quantization
    pass). Projections: q_a + kv_a ``[T, 7168] @ [7168, 1536 + 512 + 64]``
    (replicated), q_b ``[1536, 16 x 192]``, kv_b ``[512, 16 x (128 + 128)]``, o_proj
    ``[16 x 128, 7168]``, and kv_b again over a prefill chunk's cached tokens.
    Decode attention: 16 heads read the one latent of 576 per token (``2 x 16 x (576
    + 512)`` FLOPs a pair); prefill: multi-head attention with 192/128 per head on
    16-bit up-projected keys and values."""
    dep = _attention_only(_dep("deepseek-ai/DeepSeek-V3", 8, "h200"))
    hw, a = dep.hw, dep.arch

    def gemms(rows, shapes):
        return sum(
            float(_gemm_us(rows, n, k, 1.0, 1.0, CURVES, hw, a.weight_bytes))
            for n, k in shapes
        )

    shapes = [(2112, 7168), (3072, 1536), (4096, 512), (7168, 2048)]
    dec = one_step(decode_tokens=32, num_decode=32, kv_decode=32 * 4000)
    b = kernel_step_time(dec, dep, CURVES)
    assert float(b.linear) == pytest.approx(gemms(32.0, shapes), rel=1e-12)
    k = 32 * 4000
    f = 2 * 16 * (576 + 512) * k
    by = 576 * 2.0 * k + 16 * (576 + 512) * 2.0 * 32
    want = _work(f, by, hw.flops_16, hw, 32.0).time_us(CURVES.decode_attention)
    assert float(b.attention_decode) == pytest.approx(float(want), rel=1e-12)
    # A 1000-token chunk after 3000 cached tokens: kv_b over the cached 3000 too.
    pf = one_step(
        prefill_tokens=1000, num_prefill=1, kv_prefill=3000,
        attn_prefill=1000 * (3000 + 500),
    )  # fmt: skip
    b = kernel_step_time(pf, dep, CURVES)
    extra = gemms(3000.0, [(4096, 512)])
    assert float(b.linear) == pytest.approx(gemms(1000.0, shapes) + extra, rel=1e-12)
    f = 2 * 16 * (192 + 128) * 1000 * 3500
    by = 16 * (192 + 128) * 2.0 * 4000 + 16 * (192 + 128) * 2.0 * 1000
    tiles = np.ceil(1000 / 128)
    exps = 16 * 1000 * 3500  # one per score element and head (the softmax)
    want = _work(f, by, hw.flops_16, hw, 16 * tiles, exps=exps).time_us(
        CURVES.prefill_attention
    )
    assert float(b.attention_prefill) == pytest.approx(float(want), rel=1e-12)


def test_gradient_through_mla_step():
    dep = _dep("deepseek-ai/DeepSeek-V3", 8, "h200")

    def total(x):
        stats = dm.BatchStats(
            prefill_tokens=x[0], decode_tokens=x[1], num_prefill=jnp.asarray(1.0),
            num_decode=jnp.asarray(16.0), kv_decode=x[2], attn_prefill=x[0] * x[0] / 2,
            kv_prefill=x[3],
        )  # fmt: skip
        return kernel_step_time(stats, dep, CURVES, check=False).total

    assert_grad_matches_fd(total, np.array([500.0, 16.0, 48000.0, 1000.0]), rtol=1e-5)


def test_fp8_experts_run_on_the_fp8_moe_curves_local_only():
    """Qwen3-30B-A3B with FP8 experts: its routed experts are timed by
    ``curves.moe_fp8`` (FlashInfer's kernels: local experts only) at the FP8 peak;
    16-bit experts stay on ``curves.moe`` (vLLM's Triton kernel)."""
    dep = _dep("Qwen/Qwen3-30B-A3B", 1)
    fp8 = _with_arch(dep, expert_weight_bytes=1.0, expert_compute_bytes=1.0)
    curves = dataclasses.replace(
        CURVES, moe_fp8=jax.tree.map(lambda x: x + 0.3, CURVES.moe)
    )
    stats = one_step(decode_tokens=64, num_decode=64, kv_decode=64 * 2000)
    a, hw = dep.arch, dep.hw

    def routed_per_layer(d, eff, local, w):
        b = kernel_step_time(stats, d, curves)
        none = kernel_step_time(stats, _with_arch(d, moe_layers=0.0), curves)
        want = moe_us(64.0, a.hidden, a.expert_ffn, a.top_k, a.n_experts, eff, hw,
                      tp=1.0, ep=1.0, weight_bytes=w, compute_bytes=w,
                      local_only=local)  # fmt: skip
        router = _gemm_us(64.0, a.n_experts, a.hidden, 2.0, 0.0, curves, hw, 2.0)
        got = float(b.linear - none.linear) / float(a.moe_layers)
        return got, float(want + router)

    got, want = routed_per_layer(fp8, curves.moe_fp8, 1.0, 1.0)
    assert got == pytest.approx(want, rel=1e-6)
    got, want = routed_per_layer(dep, curves.moe, 0.0, 2.0)
    assert got == pytest.approx(want, rel=1e-6)


def test_nvfp4_experts_run_on_the_fp4_moe_curves_local_only():
    """DeepSeek-V3.1 NVFP4 on B200: its routed experts (0.5625-byte weights, FP4
    operands) are timed by ``curves.moe_nvfp4`` (FlashInfer: local experts only)
    at the FP4 peak, with FP4's bytes."""
    dep = _dep("deepseek-v3.1-nvfp4", 8, "b200")
    a, hw = dep.arch, dep.hw
    assert float(a.expert_compute_bytes) == 0.5
    curves = dataclasses.replace(
        CURVES, moe_nvfp4=jax.tree.map(lambda x: x + 0.3, CURVES.moe)
    )
    stats = one_step(decode_tokens=64, num_decode=64, kv_decode=64 * 2000)
    b = kernel_step_time(stats, dep, curves)
    none = kernel_step_time(stats, _with_arch(dep, moe_layers=0.0), curves)
    t = 8.0
    routed = moe_us(64.0, a.hidden, a.expert_ffn, a.top_k, a.n_experts,
                    curves.moe_nvfp4, hw, tp=t, ep=1.0, weight_bytes=0.5625,
                    compute_bytes=0.5, local_only=1.0)  # fmt: skip
    shared = _gemm_us(64.0, 2.0 * a.shared_ffn / t, a.hidden, 0.5, a.quant_passes,
                      curves, hw, a.weight_bytes) + _gemm_us(
        64.0, a.hidden, a.shared_ffn / t, 0.5, a.quant_passes, curves, hw,
        a.weight_bytes)  # fmt: skip
    router = _gemm_us(64.0, a.n_experts, a.hidden, 2.0, 0.0, curves, hw, 2.0)
    per_layer = float(b.linear - none.linear) / float(a.moe_layers)
    assert per_layer == pytest.approx(float(routed + shared + router), rel=1e-6)
    # the same experts' time moves with the FP4 MoE curves only
    other = dataclasses.replace(
        curves, moe_fp8=jax.tree.map(lambda x: x + 1.0, CURVES.moe)
    )
    assert float(kernel_step_time(stats, dep, other).linear) == float(b.linear)


def test_sliding_window_layers_read_at_most_their_window():
    """gpt-oss (its experts in 16 bits): 18 of 36 layers see 128 tokens. Their
    decode attention is the full layers' at a context of W per request; prompts
    inside the window cost the same in both kinds of layer, long ones less in the
    windowed layers."""
    dep = _with_arch(_dep("openai/gpt-oss-120b", 1), expert_weight_bytes=2.0)
    full = _with_arch(dep, window_layers=0.0)
    assert float(dep.arch.window) == 128.0 and float(dep.arch.window_layers) == 18.0
    dec = one_step(decode_tokens=8, num_decode=8, kv_decode=8 * 4000)
    capped = one_step(decode_tokens=8, num_decode=8, kv_decode=8 * 128)
    got = float(kernel_step_time(dec, dep, CURVES).attention_decode)
    at_ctx = float(kernel_step_time(dec, full, CURVES).attention_decode) / 36
    at_w = float(kernel_step_time(capped, full, CURVES).attention_decode) / 36
    assert got == pytest.approx(18 * at_ctx + 18 * at_w, rel=1e-6)
    assert at_w < at_ctx

    def prefill(stats, d):
        return float(kernel_step_time(stats, d, CURVES).attention_prefill)

    # A 100-token chunk after 20 cached tokens stays inside the window.
    short = one_step(
        prefill_tokens=100, num_prefill=1, kv_prefill=20, attn_prefill=100 * (20 + 50)
    )
    assert prefill(short, dep) == pytest.approx(prefill(short, full), rel=1e-6)
    long = one_step(prefill_tokens=2048, num_prefill=1, attn_prefill=2048 * 1024)
    assert 0.5 * prefill(long, full) < prefill(long, dep) < prefill(long, full)


def test_weight_only_4bit_experts_read_fewer_bytes_at_the_16bit_peak():
    """gpt-oss's MXFP4 experts compute at 16 bits: the MoE work has the 16-bit peak
    and its weights 0.53125 bytes each. The kernel sum times them on their own
    curves (``moe_w4a16``: OpenAI's Triton kernel, local experts only); other
    weight-only formats have no curves and are refused, naming the field."""
    dep = _dep("openai/gpt-oss-120b", 1)
    hw = dep.hw
    kw = dict(tp=1.0, ep=1.0)
    mx = moe_kernel_work(64.0, 2880, 2880, 4, 128, hw, weight_bytes=0.53125,
                         compute_bytes=2.0, **kw)  # fmt: skip
    bf = moe_kernel_work(64.0, 2880, 2880, 4, 128, hw, weight_bytes=2.0, **kw)
    assert float(mx.peak_flops) == float(hw.flops_16) == float(bf.peak_flops)
    assert float(mx.flops) == float(bf.flops)
    assert float(mx.bytes) < 0.4 * float(bf.bytes)
    stats = one_step(decode_tokens=64, num_decode=64, kv_decode=64 * 2000)
    # Distinct curves for the MXFP4 family: its experts are timed by them alone.
    curves = dataclasses.replace(
        CURVES, moe_w4a16=jax.tree.map(lambda x: x + 0.3, CURVES.moe)
    )
    b = kernel_step_time(stats, dep, curves)
    no_moe = kernel_step_time(stats, _with_arch(dep, moe_layers=0.0), curves)
    a = dep.arch
    routed = moe_us(64.0, a.hidden, a.expert_ffn, a.top_k, a.n_experts,
                    curves.moe_w4a16, hw, tp=1.0, ep=1.0, weight_bytes=0.53125,
                    compute_bytes=2.0, local_only=1.0)  # fmt: skip
    router = _gemm_us(64.0, a.n_experts, a.hidden, 2.0, 0.0, curves, hw, 2.0)
    per_layer = float(b.linear - no_moe.linear) / float(a.moe_layers)
    assert per_layer == pytest.approx(float(routed + router), rel=1e-6)
    wide = kernel_step_time(stats, _with_arch(dep, expert_weight_bytes=2.0), curves)
    assert float(b.linear) != float(wide.linear)
    assert float(b.attention_decode) == float(wide.attention_decode)
    # Other 4-bit expert formats (int4 weight-only, 0.5 bytes) and weight-only
    # dense GEMMs have no curves.
    with pytest.raises(ValueError, match=r"expert_weight_bytes \[0.5\] below"):
        kernel_step_time(stats, _with_arch(dep, expert_weight_bytes=0.5), curves)
    with pytest.raises(ValueError, match=r"weight_bytes \[0.53125\] below"):
        kernel_step_time(stats, _with_arch(_dep(), weight_bytes=0.53125), curves)
    fp8_blocks = _with_arch(_dep(), compute_bytes=1.0, weight_bytes=1 + 4 / 16384)
    assert float(kernel_step_time(stats, fp8_blocks, CURVES).total) > 0.0


def test_gradient_through_windowed_layers():
    dep = _with_arch(_dep("openai/gpt-oss-120b", 1), expert_weight_bytes=2.0)

    base = one_step(num_prefill=1, decode_tokens=16, num_decode=16)

    def total(x):
        stats = dm.BatchStats(
            **{**base.__dict__, "prefill_tokens": x[0],
               "attn_prefill": x[0] * x[0] / 2, "kv_decode": 16 * x[1]}
        )  # fmt: skip
        return kernel_step_time(stats, dep, CURVES, check=False).total

    assert_grad_matches_fd(total, np.array([700.0, 3000.0]), rtol=1e-4)
    assert float(jax.grad(total)(jnp.array([700.0, 3000.0]))[1]) > 0.0


def test_moe_layers_are_attention_router_and_fused_experts():
    # Mixtral-8x7B at TP 2: 32 layers; QKV (16 + 2 * 4) * 128 = 3072, O 4096 x 2048;
    # router 8 x 4096; 8 experts of 14336 / 2, top 2.
    dep = _dep("mixtral-8x7b", 2)
    hw = dep.hw
    stats = one_step(decode_tokens=16, num_decode=16, kv_decode=16 * 300)
    b = kernel_step_time(stats, dep, CURVES)
    g = CURVES.gemm_bf16
    per_layer = (
        float(gemm_us(16.0, 3072, 4096, g, hw))
        + float(gemm_us(16.0, 4096, 2048, g, hw))
        + float(gemm_us(16.0, 8, 4096, g, hw))
        + float(moe_us(16.0, 4096, 14336, 2, 8, CURVES.moe, hw, tp=2.0, ep=1.0))
    )
    assert float(b.linear) == pytest.approx(32 * per_layer, rel=1e-12)
    # Whole experts per GPU (ep = t): the experts' FFN is not split.
    ep = kernel_step_time(stats, dm.deployment("mixtral-8x7b", "h100", 2, ep=2), CURVES)
    moe_ep = float(moe_us(16.0, 4096, 14336, 2, 8, CURVES.moe, hw, tp=1.0, ep=2.0))
    moe_tp = float(moe_us(16.0, 4096, 14336, 2, 8, CURVES.moe, hw, tp=2.0, ep=1.0))
    assert float(ep.linear - b.linear) == pytest.approx(32 * (moe_ep - moe_tp))


def test_fp8_models_run_their_gemms_on_the_fp8_curves_with_the_quant_pass():
    dep = _dep("nvidia/Llama-3.1-70B-Instruct-FP8", 2)
    stats = one_step(decode_tokens=8, num_decode=8, kv_decode=8 * 300)
    b = kernel_step_time(stats, dep, CURVES)
    hw = dep.hw
    # Llama-3.1-70B at TP 2: QKV (32 + 2 * 4) * 128, O, FFN 28672 / 2.
    shapes = [(5120, 8192), (8192, 4096), (28672, 8192), (8192, 14336)]
    want = _quantized_gemms_us(shapes, hw, 1.0, 1.0, CURVES.gemm_fp8)
    assert float(b.linear) == pytest.approx(80 * want, rel=1e-12)


def _quantized_gemms_us(shapes, hw, width, weight_bytes, curves):
    """Summed time of 8-row GEMMs ``[8, k] @ [k, n]`` of ``width``-byte operands
    with bf16 output and the activation quantization pass, on ``curves``, us."""
    return sum(
        float(
            gemm_kernel_work(
                8.0, n, k, hw, width, 2.0, act_quant=1.0, weight_bytes=weight_bytes
            ).time_us(curves)
        )
        for n, k in shapes
    )


def test_nvfp4_models_run_their_gemms_on_the_fp4_curves():
    """A dense NVFP4 model (4-bit weights with FP8 scales, FP4 operands, one
    activation quantization pass) times its layers' GEMMs on ``gemm_nvfp4`` at
    the FP4 peak: hand shapes of Llama-2-70B at TP 4 on B200; other curves than
    the FP4 ones do not move it, and the gradient in the curves is finite."""
    dep = _with_arch(
        _dep("llama-2-70b", 4, "b200"),
        compute_bytes=0.5,
        weight_bytes=0.5625,
        quant_passes=1.0,
    )
    stats = one_step(decode_tokens=8, num_decode=8, kv_decode=8 * 300)
    b = kernel_step_time(stats, dep, CURVES)
    hw = dep.hw
    shapes = [(2560, 8192), (8192, 2048), (14336, 8192), (8192, 7168)]
    want = _quantized_gemms_us(shapes, hw, 0.5, 0.5625, CURVES.gemm_nvfp4)
    assert float(b.linear) == pytest.approx(80 * want, rel=1e-12)
    slower = dataclasses.replace(
        CURVES, gemm_fp8=jax.tree.map(lambda x: x - 1.0, CURVES.gemm_fp8)
    )
    assert float(kernel_step_time(stats, dep, slower).linear) == float(b.linear)

    def linear(c):
        return kernel_step_time(stats, dep, c, check=False).linear

    g = jax.grad(linear)(CURVES)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g))
    assert float(jnp.abs(g.gemm_nvfp4.occupancy.raw_slope)) > 0


def test_bad_statistics_are_refused():
    with pytest.raises(ValueError, match="decode_tokens"):
        kernel_step_time(one_step(decode_tokens=-1), _dep(), CURVES)


# --------------------------------------------------------- fit_host_on_kernels


def _frame(n=400, seed=0, models=(("codellama-34b", 2),)):
    return host_frame(n, seed, models)


def _with_target(frame, host, noise=0.02, seed=1):
    return with_host_target(frame, host, CURVES, noise, seed)


def _stats_deps(frame):
    return stats_and_deployments(frame)


TRUTH = HostCosts(layer_us=15.0, layer_request_us=0.4)
"""Host costs of the synthetic traces fitted with the default terms."""


def test_fit_host_recovers_known_default_costs_and_covers():
    frame = _with_target(_frame(), TRUTH)
    with warnings.catch_warnings():
        warnings.simplefilter("error", IdentifiabilityWarning)
        fit = dm.fit_host_on_kernels(frame, target="iteration_time_us", curves=CURVES)
    table = fit.table()
    for term, truth in (("layer", 15.0), ("layer_request", 0.4)):
        value, sd = table.loc[term, "value_us"], table.loc[term, "sd_us"]
        assert 0.0 < sd < 0.3 * truth
        assert abs(value - truth) < 3.0 * sd  # the reported sd is honest
    assert fit.converged and fit.unpinned == ()
    assert fit.noise_sd[0] == pytest.approx(0.02, rel=0.25)
    test = _with_target(_frame(seed=5), TRUTH, seed=7)
    out = fit.predict(test, interval=0.9)
    y = test["iteration_time_us"]
    inside = (out["predicted_lo_us"] <= y) & (y <= out["predicted_hi_us"])
    assert 0.84 <= inside.mean() <= 0.96
    assert (out["predicted_lo_us"] < out["predicted_us"]).all()


def test_fit_host_recovers_the_default_costs_within_5_percent_at_low_noise():
    frame = _with_target(_frame(), TRUTH, noise=0.002)
    fit = dm.fit_host_on_kernels(frame, target="iteration_time_us", curves=CURVES)
    assert float(fit.host.layer_us) == pytest.approx(15.0, rel=0.05)
    assert float(fit.host.layer_request_us) == pytest.approx(0.4, rel=0.05)


def test_two_models_separate_step_and_layer_costs():
    models = (("codellama-34b", 2), ("llama-2-70b", 4))
    truth = HostCosts(step_us=600.0, layer_us=15.0)
    frame = _with_target(_frame(models=models), truth, noise=0.01)
    fit = dm.fit_host_on_kernels(
        frame, target="iteration_time_us", curves=CURVES, terms=("step", "layer")
    )
    assert float(fit.host.step_us) == pytest.approx(600.0, rel=0.05)
    assert float(fit.host.layer_us) == pytest.approx(15.0, rel=0.05)
    assert fit.unpinned == ()


def test_one_model_cannot_separate_step_and_layer_and_says_so():
    frame = _with_target(_frame(), HostCosts(step_us=600.0, layer_us=15.0))
    with pytest.warns(IdentifiabilityWarning, match="undetermined direction"):
        fit = dm.fit_host_on_kernels(
            frame, target="iteration_time_us", curves=CURVES, terms=("step", "layer")
        )
    assert len(fit.unpinned) == 1
    # Wide, not undefined: each term's sd is of the order of its value.
    for term in ("step", "layer"):
        row = fit.table().loc[term]
        assert row["sd_us"] > 0.5 * row["value_us"]


def test_a_term_the_data_do_not_support_is_flagged_at_zero():
    frame = _with_target(_frame(), HostCosts(layer_us=22.0), noise=0.001)
    with pytest.warns(IdentifiabilityWarning, match="bound 0"):
        dm.fit_host_on_kernels(
            frame,
            target="iteration_time_us",
            curves=CURVES,
            terms=("layer", "request"),
        )


def test_fit_host_bad_input():
    frame = _with_target(_frame(n=20), TRUTH)
    with pytest.raises(ValueError, match="terms"):
        dm.fit_host_on_kernels(
            frame, target="iteration_time_us", curves=CURVES, terms=("gpu",)
        )
    with pytest.raises(ValueError, match="terms"):
        dm.fit_host_on_kernels(
            frame, target="iteration_time_us", curves=CURVES, terms=()
        )
    with pytest.raises(ValueError, match="'wall_us': no such column"):
        dm.fit_host_on_kernels(frame, target="wall_us", curves=CURVES)
    bad = frame.assign(iteration_time_us=-frame["iteration_time_us"])
    with pytest.raises(ValueError, match="finite and > 0"):
        dm.fit_host_on_kernels(bad, target="iteration_time_us", curves=CURVES)
    with pytest.raises(
        ValueError,
        match=r"calibrated on 'h100-sxm'.*'diffmodel calibrate --system a100_sxm'",
    ):
        dm.fit_host_on_kernels(
            frame.assign(hardware="a100"), target="iteration_time_us", curves=CURVES
        )
    # TypeError where jaxtyping's import hook checks annotations (the test suite).
    with pytest.raises((ValueError, TypeError), match="curves"):
        dm.fit_host_on_kernels(frame, target="iteration_time_us", curves={"gemm": 1})
    fit = dm.fit_host_on_kernels(frame, target="iteration_time_us", curves=CURVES)
    with pytest.raises(ValueError, match="interval"):
        fit.predict(frame, interval=90)


def test_predicting_an_unseen_deployment_warns_about_its_interval():
    frame = _with_target(_frame(n=50), TRUTH)
    fit = dm.fit_host_on_kernels(frame, target="iteration_time_us", curves=CURVES)
    other = _with_target(_frame(n=10, models=(("llama-2-70b", 4),)), HostCosts())
    with pytest.warns(dm.UnseenGroupWarning, match="llama-2-70b"):
        fit.predict(other, interval=0.9)
    assert np.isfinite(fit.predict(other)["predicted_us"]).all()


def test_a_new_gpu_takes_its_curves_and_keeps_the_host_costs():
    frame = _with_target(_frame(n=50), TRUTH)
    fit = dm.fit_host_on_kernels(frame, target="iteration_time_us", curves=CURVES)
    a100 = dataclasses.replace(CURVES, hardware="a100")
    rows = frame.assign(hardware="a100")
    got = fit.predict(rows, curves=a100)["predicted_us"].to_numpy()
    x = np.asarray(host_features(*_stats_deps(rows)), dtype=float)
    theta = np.array([float(v) for v in fit.host.as_dict().values()])
    want = dm.kernel_device_us(rows, a100) + x @ theta
    np.testing.assert_allclose(got, want, rtol=1e-12)
    h100 = fit.predict(frame)["predicted_us"].to_numpy()
    assert (got > h100).all()  # an A100 reads the weights more slowly
    with pytest.raises(ValueError, match="calibrated on 'h100-sxm'"):
        fit.predict(rows)


@pytest.mark.parametrize("model", ["mixtral-8x7b", "llama-2-70b"])
def test_gradient_in_the_token_count_is_finite_and_right(model):
    dep = _dep(model, 2)

    def total(v):
        stats = dm.from_aggregates(
            prefill_tokens=3.0 * v[0],
            decode_tokens=v[0],
            num_prefill=1.0,
            num_decode=16.0,
            kv_tokens=16 * 500.0,
        )
        return kernel_step_time(stats, dep, CURVES, check=False).total

    # Off the tile boundaries (ceil(T / 64), ceil of the query tiles): between them
    # the time is smooth.
    assert_grad_matches_fd(total, np.array([17.3]), rtol=1e-5)


def test_steps_without_tokens_need_a_term_that_prices_them():
    rows = _frame(n=30)
    idle = rows.head(3).assign(
        prefill_tokens=0, decode_tokens=0, num_prefill_reqs=0, num_decode_reqs=0,
        kv_tokens=0.0,
    )  # fmt: skip
    truth = HostCosts(step_us=50.0, layer_us=22.0)
    both = _with_target(pd.concat([rows, idle], ignore_index=True), truth)
    with pytest.raises(ValueError, match="3 rows run no forward pass"):
        dm.fit_host_on_kernels(both, target="iteration_time_us", curves=CURVES)
    fit = dm.fit_host_on_kernels(
        both, target="iteration_time_us", curves=CURVES, terms=("step", "layer")
    )
    assert float(fit.host.step_us) == pytest.approx(50.0, rel=0.1)


def test_a_step_with_no_tokens_and_no_cost_predicts_zero_with_a_zero_interval():
    frame = _with_target(_frame(n=50), TRUTH)
    fit = dm.fit_host_on_kernels(frame, target="iteration_time_us", curves=CURVES)
    idle = frame.iloc[:1].assign(
        prefill_tokens=0, decode_tokens=0, num_prefill_reqs=0, num_decode_reqs=0,
        kv_tokens=0.0,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fit.predict(idle, interval=0.9)
    assert out.to_numpy().tolist() == [[0.0, 0.0, 0.0]]


def test_fa2_gpus_walk_multi_head_caches_in_one_block():
    # Llama-2-70B made multi-head (64 KV heads), TP 4 on A100: 16 query and KV heads
    # per GPU, 8 sequences of 4096 cached tokens: 128 blocks walking 4096 tokens.
    # The step's decode attention equals the table path's unsplit work per layer.
    a100 = dm.deployment("llama-2-70b", "a100-sxm-80gb", 4)
    mha = _with_arch(a100, n_kv_heads=64.0)
    curves = default_kernel_curves("a100-sxm-80gb", portable=True)
    dec = eqx.tree_at(lambda c: c.log_kloop_ns, curves.decode_attention, jnp.log(23.0))
    curves = eqx.tree_at(lambda c: c.decode_attention, curves, dec)
    stats = one_step(decode_tokens=8, num_decode=8, kv_decode=8 * 4096)
    got = float(kernel_step_time(stats, mha, curves).attention_decode)
    per_layer = decode_attention_work(8.0, 4096.0, 16.0, 16.0, 128.0, mha.hw, 2.0, 0.0)
    want = 80 * float(per_layer.time_us(dec))
    assert got == pytest.approx(want, rel=1e-6)
    # The same curves on a GPU that splits the KV (H100's FlashAttention-3), or
    # a grouped model on A100 (FA2 packs the group and splits): no walk.
    split = decode_attention_work(8.0, 4096.0, 16.0, 16.0, 128.0, mha.hw, 2.0, 1.0)
    as_h100 = dataclasses.replace(curves, hardware="h100-sxm")
    h100_mha = dataclasses.replace(mha, hw=a100.hw)
    got_split = float(kernel_step_time(stats, h100_mha, as_h100).attention_decode)
    assert got_split == pytest.approx(80 * float(split.time_us(dec)), rel=1e-6)
    assert got > got_split
    gqa = float(kernel_step_time(stats, a100, curves).attention_decode)
    gqa_h100 = float(kernel_step_time(stats, a100, as_h100).attention_decode)
    assert gqa == pytest.approx(gqa_h100, rel=1e-12)


def test_flashinfer_mxfp4_experts_are_timed_at_their_padded_widths():
    """gpt-oss at TP 8 on B200: vLLM's FlashInfer MXFP4 MoE holds each GPU's expert
    width 2880 / 8 = 360 as 512 and the hidden size 2880 as 3072; the same curves
    labelled for a GPU running another kernel (A100: vLLM's default tiles, no
    padding) time the widths as they are. 16-bit experts are not padded."""
    dep = dm.deployment("openai/gpt-oss-120b", "b200", 8)
    curves = default_kernel_curves("b200", portable=True)
    other = dataclasses.replace(curves, hardware="a100-sxm-80gb")
    stats = one_step(decode_tokens=64, num_decode=64, kv_decode=64 * 2000)
    a, hw = dep.arch, dep.hw
    kw = dict(tp=8.0, ep=1.0, weight_bytes=0.53125, compute_bytes=2.0, local_only=1.0)
    padded = moe_us(64.0, 3072.0, 512.0 * 8, a.top_k, a.n_experts,
                    curves.moe_w4a16, hw, **kw)  # fmt: skip
    plain = moe_us(64.0, a.hidden, a.expert_ffn, a.top_k, a.n_experts,
                   curves.moe_w4a16, hw, **kw)  # fmt: skip
    got = float(kernel_step_time(stats, dep, curves).linear)
    base = float(kernel_step_time(stats, dep, other).linear)
    want = float(a.moe_layers) * float(padded - plain)
    assert got - base == pytest.approx(want, rel=1e-5)
    assert got > base
    wide = _with_arch(dep, expert_weight_bytes=2.0)
    assert float(kernel_step_time(stats, wide, curves).linear) == pytest.approx(
        float(kernel_step_time(stats, wide, other).linear), rel=1e-12
    )
    assert dk_runs("gb300") and not dk_runs("h100-sxm") and not dk_runs("nope")

    # Under jit the padded widths give the eager time; the gradient in the MXFP4
    # curves stays finite (the padding is constant in them).
    def total(c):
        return kernel_step_time(stats, dep, c, check=False).total

    assert float(jax.jit(total)(curves)) == pytest.approx(
        float(total(curves)), rel=1e-6
    )
    grads = jax.tree.leaves(jax.grad(total)(curves).moe_w4a16)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in grads)
    assert sum(float(np.abs(np.asarray(x)).sum()) for x in grads) > 0.0


def test_mxfp4_experts_take_their_kernels_token_tiles():
    """gpt-oss-120b at TP 4 on H100, a 1000-token prefill: vLLM runs its MXFP4
    experts on OpenAI's Triton kernel, whose token tiles follow the slots per expert
    (1000 x 4 // 128 = 31 -> 32 rows), not vLLM's default tiles (64 rows above 128
    tokens): the step differs from the same curves labelled for A100 (default
    tiles) by the MoE layers' difference of the two works, and under jit gives the
    eager time."""
    from diffmodel.kernels._moe import TILE_DEFAULT, TILE_MARLIN, TILE_OAI_TRITON

    assert mxfp4_tile_rule("h200") == TILE_OAI_TRITON
    assert mxfp4_tile_rule("H100") == TILE_OAI_TRITON
    assert mxfp4_tile_rule("l40s") == TILE_MARLIN
    assert mxfp4_tile_rule("b200") == TILE_DEFAULT
    assert mxfp4_tile_rule("nope") == TILE_DEFAULT
    dep = dm.deployment("openai/gpt-oss-120b", "h100-sxm", 4)
    curves = default_kernel_curves("h100-sxm", portable=True)
    other = dataclasses.replace(curves, hardware="a100-sxm-80gb")
    stats = one_step(prefill_tokens=1000, num_prefill=1)
    a, hw = dep.arch, dep.hw
    kw = dict(tp=4.0, ep=1.0, weight_bytes=0.53125, compute_bytes=2.0, local_only=1.0)
    args = (1000.0, a.hidden, a.expert_ffn, a.top_k, a.n_experts, curves.moe_w4a16, hw)
    own = moe_us(*args, **kw, tile_rule=TILE_OAI_TRITON)
    default = moe_us(*args, **kw)
    assert float(own) != pytest.approx(float(default), rel=1e-3)
    got = float(kernel_step_time(stats, dep, curves).linear)
    base = float(kernel_step_time(stats, dep, other).linear)
    assert got - base == pytest.approx(float(a.moe_layers) * float(own - default),
                                       rel=1e-5)  # fmt: skip

    def total(c):
        return kernel_step_time(stats, dep, c, check=False).total

    assert float(jax.jit(total)(curves)) == pytest.approx(
        float(total(curves)), rel=1e-6
    )
