"""A step as the sum of its kernels, each timed by calibrated curves (the device side),
plus the serving stack's host costs (the host side).

The roofline of :func:`diffmodel.step_time` prices a step with a handful of
efficiencies taken at one representative shape. Here every operator of every layer
is timed at the step's own shapes by the GPU's :class:`KernelCurves` (each with its
kernel floor), as aiconfigurator sums its kernel tables:

- linear: per layer the QKV and O GEMMs of ``T = P + D`` tokens, and the dense
  gate+up and down GEMMs, or (MoE layers) the shared experts, the router and the
  fused routed experts (``curves.moe``, :func:`~diffmodel.kernels.moe_us`, uniform
  routing; FP8 experts ``curves.moe_fp8``, MXFP4 ones ``curves.moe_w4a16``, NVFP4
  ones ``curves.moe_nvfp4``);
  ``curves.gemm_bf16`` or, for FP8 models, ``curves.gemm_fp8`` (NVFP4 models:
  ``curves.gemm_nvfp4``) with the activation quantization pass where the model has
  one;
- MLA (DeepSeek): the replicated ``q_a + kv_a`` down-projection, ``q_b``, ``kv_b``
  (in decode the absorbed BMMs, the same FLOPs and weights; prefill chunks also
  up-project their cached tokens' latents) and ``o_proj`` on the GEMM curves;
  prefill attention as multi-head attention on the up-projected 16-bit keys and
  values, decode attention as every head reading the one latent ``c + r`` of each
  cached token, on the attention curves; where the GPU's curves hold vLLM's measured
  MLA modules (:attr:`KernelCurves.mla`), instead each layer's prefill and decode
  paths on those (:mod:`~diffmodel.kernels._mla`: projections, attention and the
  latent KV write; the modules' fixed cost is host time). Both validated against
  the measured modules in ``experiments/mla_kernels.py``;
- DSA (DeepSeek-V3.2, GLM-5: MLA with a top-k indexer): only on the GPU's measured
  DSA modules (:attr:`KernelCurves.dsa`, :mod:`~diffmodel.kernels._dsa`): each
  layer's projections (the indexer's too), sparse latent attention over each
  query's ``index_topk`` tokens, the indexer's logits and top-k (in its
  ``index_layers``) and the KV writes; without DSA curves such models are refused;
- prefill attention: per layer causal attention of the step's chunks, ``A_pf``
  query-key pairs per head over ``K_pf + P`` KV tokens, ``Np`` chunks, one
  exponential per pair and head (``curves.prefill_attention``, whose compute side
  overlaps tensor-core and special-function time); sliding-window layers
  (gpt-oss) the pairs and tokens within their window (+ sink tokens), as the
  roofline counts them
  (:func:`~diffmodel._model._layers.windowed_attention`);
- decode attention: per layer ``Nd`` sequences of mean context ``K_dec / Nd``
  (``curves.decode_attention``), in windowed layers at most ``W`` (+ sinks) each;
- all-reduce: two per layer of ``T d`` 16-bit activations (``curves.allreduce``;
  zero at TP 1);
- LM head: ``[Np + Nd, d] @ [d, V / t]`` once.

What no kernel table times (the engine's Python between kernels, the graph breaks
around attention, elementwise kernels, sampling) is the host side,
:class:`HostCosts`: per step, per layer, per request and per request in each layer,
in microseconds. Those are
properties of the serving stack, not of the GPU, so a fit of them on one GPU's
traces carries to another GPU with that GPU's curves
(:func:`diffmodel.fit_host_on_kernels`).

GQA or MLA models, full or sliding-window attention, with dense or MoE MLPs in
16-bit, FP8 or NVFP4, and MXFP4 routed experts at the 16-bit peak (the Llama family
of the public traces, Mixtral, Qwen3 MoE, Llama FP8 and NVFP4, DeepSeek-V3 and its
NVFP4 checkpoint, gpt-oss). Sparse attention and other weight-only quantized GEMMs
raise a ``ValueError``: use :func:`diffmodel.step_time` for them.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from .._model._batch import BatchStats
from .._model._deployment import Deployment
from .._model._hardware import canonical_hardware
from .._model._layers import attention_dims, is_mla, windowed_attention
from .._model._physics import (
    MXFP4_BYTES,
    attention_work_dims,
)
from .._model._roofline import Breakdown, check_stats
from ._curves import KernelCurves
from ._dsa import dsa_module_work, dsa_parts_us
from ._mla import mla_module_work, mla_parts_us
from ._moe import (
    MXFP4_PAD,
    TILE_DEFAULT,
    TILE_MARLIN,
    TILE_OAI_TRITON,
    moe_kernel_work,
)
from ._work import (
    _work,
    allreduce_kernel_us,
    gemm_kernel_work,
)

ATTN_TILE = 128.0
"""Query rows per FlashAttention tile (thread blocks of a prefill chunk)."""

HOST_TERMS: tuple[str, ...] = ("step", "layer", "request", "layer_request")
"""The host costs by what they are paid for: each step, each layer of a step that
runs a forward pass, each request in the batch, each request in each layer."""


class HostCosts(eqx.Module):
    """Host-side costs of a serving stack, microseconds (each ``>= 0``).

    Attributes:
        step_us: per step (scheduling, input preparation, sampling), us.
        layer_us: per layer of a step that runs a forward pass (the engine's work
            between the captured kernels, elementwise kernels), us.
        request_us: per request in the batch, us.
        layer_request_us: per request in each layer of a step (the per-sequence
            work of a layer that no kernel table times: attention metadata and
            split-KV reduction per sequence, the KV-cache write and the
            elementwise kernels of a batch's rows), us.
    """

    step_us: Float[Array, "*g"]
    layer_us: Float[Array, "*g"]
    request_us: Float[Array, "*g"]
    layer_request_us: Float[Array, "*g"]

    def __init__(
        self,
        step_us: ArrayLike = 0.0,
        layer_us: ArrayLike = 0.0,
        request_us: ArrayLike = 0.0,
        layer_request_us: ArrayLike = 0.0,
    ):
        dtype = jnp.result_type(float)
        self.step_us = jnp.asarray(step_us, dtype)
        self.layer_us = jnp.asarray(layer_us, dtype)
        self.request_us = jnp.asarray(request_us, dtype)
        self.layer_request_us = jnp.asarray(layer_request_us, dtype)

    def as_dict(self) -> dict[str, Array]:
        """The costs by term name (:data:`HOST_TERMS`), us."""
        return {t: getattr(self, f"{t}_us") for t in HOST_TERMS}


def _mxfp4_experts(weight_bytes, compute_bytes) -> Array:
    # Experts timed by ``curves.moe_w4a16``: MXFP4 weights at the 16-bit peak.
    w, c = jnp.asarray(weight_bytes), jnp.asarray(compute_bytes)
    return (jnp.abs(w - MXFP4_BYTES) <= 0.01) & (c == 2.0)


def check_supported(dep: Deployment, curves: KernelCurves | None = None) -> None:
    """Raise ``ValueError`` unless :func:`kernel_step_time` can time every deployment
    in ``dep`` on ``curves``: GQA or MLA attention (full or sliding-window), sparse
    attention (DSA) only on curves with DSA modules (``curves.dsa``),
    dense or MoE MLPs, GEMMs at the 16-bit or FP8 peak with weights of that width
    (GEMMs and routed experts also NVFP4 at the FP4 peak, routed experts MXFP4 at
    the 16-bit peak), experts tensor-parallel or one
    expert group per GPU (``ep`` 1 or ``t``). Skipped under tracing."""
    a = dep.arch
    found = []
    if isinstance(a.index_heads, jax.core.Tracer):
        return
    if np.any(np.asarray(a.index_heads) > 0) and (curves is None or curves.dsa is None):
        found.append(
            "sparse attention (index_heads > 0) without DSA module curves "
            "(calibrate on a GPU's dsa_context and dsa_generation tables: "
            "'diffmodel calibrate --families ... dsa')"
        )
    # Dense GEMMs and routed experts run at the 16-bit, FP8 or (NVFP4) FP4 peak.
    for field, widths in (
        ("compute_bytes", (0.5, 1.0, 2.0)),
        ("expert_compute_bytes", (0.5, 1.0, 2.0)),
    ):
        value = np.asarray(getattr(a, field))
        if not np.isin(value, widths).all():
            found.append(
                f"{field} {np.unique(value).tolist()} (expected one of {list(widths)})"
            )
    # Weight-only quantized GEMMs (4-bit weights, 16-bit operands) run kernels of
    # their own: the 16-bit MoE curves with MXFP4's bytes miss H100's measured MXFP4
    # MoE rows by 73% (2-3x too slow from 256 tokens). MXFP4 experts at the 16-bit
    # peak (gpt-oss) have curves of their own (``curves.moe_w4a16``); dense
    # weight-only GEMMs (Marlin) and other expert formats have none.
    for field, width in (
        ("weight_bytes", "compute_bytes"),
        ("expert_weight_bytes", "expert_compute_bytes"),
    ):
        w, c = np.asarray(getattr(a, field)), np.asarray(getattr(a, width))
        if field == "expert_weight_bytes":
            w = np.where(np.asarray(_mxfp4_experts(w, c)), c, w)
        if np.any(w < 0.9 * c):
            found.append(
                f"{field} {np.unique(w).tolist()} below {width} "
                "(weight-only quantization, no calibrated kernel)"
            )
    ep, tp = np.asarray(dep.ep), np.asarray(dep.tp)
    if np.any((ep != 1.0) & (ep != tp)):
        found.append("expert parallelism over data-parallel attention (ep > tp)")
    if found:
        raise ValueError(
            f"kernel_step_time: the architecture has {', '.join(found)}; it times "
            "GQA or MLA models with dense or MoE MLPs on 16-bit, FP8 or (dense) "
            "NVFP4 tensor cores, "
            "use diffmodel.step_time (the roofline: 'diffmodel predict' without "
            "--host)"
        )


# GPUs whose vLLM decode attention is FlashAttention-2 (the ``kernel_source`` of
# aiconfigurator-core 0.12.0's vLLM ``generation_attention`` tables:
# ``vllm_flash_attn`` on A100, ``vllm_flash_attn_fa2`` on L40S and RTX PRO 6000;
# Hopper runs FlashAttention-3, datacenter Blackwell FlashInfer).
FA2_DECODE_GPUS: frozenset[str] = frozenset({"a100-sxm-80gb", "l40s", "rtx-pro-6000"})


def _among(gpu: str, gpus: frozenset[str]) -> bool:
    """Whether ``gpu`` (a catalog name or alias) is one of ``gpus``; unknown names:
    ``False``."""
    try:
        return canonical_hardware(gpu) in gpus
    except ValueError:
        return False


def runs_fa2_decode(gpu: str) -> bool:
    """Whether vLLM decodes with FlashAttention-2 on ``gpu`` (a catalog name or
    alias; unknown names: ``False``), which walks each sequence's whole cache in
    one block for multi-head attention
    (:func:`~diffmodel.kernels._work.fa2_splits_kv`)."""
    return _among(gpu, FA2_DECODE_GPUS)


# GPUs whose vLLM times MXFP4 experts (gpt-oss) on FlashInfer's TRT-LLM MoE, which
# holds them padded to widths of 256 (``_tables.mxfp4_alignment``; the
# ``kernel_source`` of aiconfigurator-core 0.12.0's ``w4a16_mxfp4`` vLLM MoE tables:
# ``..._flashinfer_trtllm_mxfp4...`` on datacenter Blackwell; Hopper runs OpenAI's
# Triton kernel, L40S and RTX PRO 6000 Marlin).
MXFP4_FLASHINFER_GPUS: frozenset[str] = frozenset({"b200", "b300", "gb200", "gb300"})


def runs_flashinfer_mxfp4(gpu: str) -> bool:
    """Whether vLLM runs MXFP4 experts on FlashInfer's padded kernel on ``gpu`` (a
    catalog name or alias; unknown names: ``False``)."""
    return _among(gpu, MXFP4_FLASHINFER_GPUS)


# GPUs whose vLLM times MXFP4 experts on OpenAI's Triton kernel (Hopper) or on
# Marlin (L40S, RTX PRO 6000): aiconfigurator-core 0.12.0's ``w4a16_mxfp4`` vLLM
# MoE tables' ``kernel_source``. Each sizes its token tiles by its own rule
# (``_moe.moe_block_m``).
MXFP4_OAI_TRITON_GPUS: frozenset[str] = frozenset({"h100-sxm", "h200"})
MXFP4_MARLIN_GPUS: frozenset[str] = frozenset({"l40s", "rtx-pro-6000"})


def mxfp4_tile_rule(gpu: str) -> float:
    """The token-tile rule (``moe_kernel_work``'s ``tile_rule``) of the kernel vLLM
    runs MXFP4 experts on, on ``gpu`` (a catalog name or alias): OpenAI's Triton
    kernel's, Marlin's, or vLLM's default tiles for every other GPU (FlashInfer's
    and unknown ones)."""
    if _among(gpu, MXFP4_OAI_TRITON_GPUS):
        return TILE_OAI_TRITON
    if _among(gpu, MXFP4_MARLIN_GPUS):
        return TILE_MARLIN
    return TILE_DEFAULT


def kernel_step_time(
    stats: BatchStats,
    dep: Deployment,
    curves: KernelCurves,
    host: HostCosts | None = None,
    *,
    check: bool = True,
) -> Breakdown:
    """Time of each step as the sum of its kernels plus host costs, us, by component.

    Args:
        stats: the steps' batch statistics (any shape; see :class:`BatchStats`).
        dep: the deployment, shared or per step (:meth:`Deployment.take`).
        curves: calibrated kernel curves of the deployment's GPU
            (:func:`diffmodel.kernels.calibrate_kernels`).
        host: the stack's host costs (default: none, the device time alone).
        check: validate ``stats`` and the architecture (concrete values only).

    Returns:
        A :class:`~diffmodel.Breakdown`: ``linear`` (every layer's projections and
        its dense MLP or MoE),
        ``attention_prefill``, ``attention_decode``, ``allreduce``, ``lm_head`` and
        ``overhead`` (the host costs); ``kv_write`` is 0 (the KV write is an
        elementwise kernel, paid in ``host.layer_us`` and
        ``host.layer_request_us``) except for MLA and DSA layers timed on
        measured modules (``curves.mla``, ``curves.dsa``), whose KV writes the
        modules time. A
        step with no tokens runs no kernel and pays ``host.step_us`` and its
        requests' cost.

    Decode attention on a GPU that runs FlashAttention-2 (:func:`runs_fa2_decode`
    of ``curves.hardware``) walks each sequence's cache in one block where the
    layer has as many KV heads as query heads on each GPU (a main loop of the mean
    context, for curves with one); everywhere else the kernel splits the KV.

    Differentiable in ``stats``, the curves and ``host``; ``jax.vmap`` and
    ``jax.jit`` apply (pass ``check=False`` under tracing for speed).
    """
    if check:
        stats = check_stats(stats)
        check_supported(dep, curves)
    host = HostCosts() if host is None else host
    a, hw = dep.arch, dep.hw
    t = jnp.asarray(dep.tp, float)
    d, dh, n_layers = a.hidden, a.head_dim, a.n_layers
    qh = a.n_heads / t
    kvh = jnp.maximum(a.n_kv_heads / t, 1.0)
    ffn = a.ffn / t  # 0 for MoE-only models
    p, dec = stats.prefill_tokens, stats.decode_tokens
    n_pf, n_dec = stats.num_prefill, stats.num_decode
    tokens = p + dec
    runs = tokens > 0
    gate = jnp.where(runs, 1.0, 0.0)
    m = jnp.maximum(tokens, 1.0)  # a GEMM of no rows is not run (gated below)
    width = a.compute_bytes  # the model's GEMMs' operand width: 2, 1 (FP8), 0.5

    def gemm(n, k, width, w=a.weight_bytes):  # m rows, 0 where absent (n k = 0)
        return _gemm_us(m, n, k, width, a.quant_passes, curves, hw, w)

    def gemm_rows(rows, n, k):  # the model's GEMM of other rows (> 0 where used)
        rows = jnp.maximum(rows, 1.0)
        return _gemm_us(rows, n, k, width, a.quant_passes, curves, hw, a.weight_bytes)

    mla = is_mla(a)
    gqa_attn = gemm((qh + 2.0 * kvh) * dh, d, width) + gemm(d, qh * dh, width)
    # MLA (as vLLM runs it): the replicated q_a + kv_a down-projection, q_b, kv_b
    # (in decode the absorbed W_UK / W_UV BMMs: the same FLOPs and weights), o_proj;
    # prefill chunks after cached tokens up-project those tokens' latents too.
    c, r, ql, v = a.kv_lora_rank, a.qk_rope_dim, a.q_lora_rank, a.v_head_dim
    up = qh * (dh - r + v)
    cached = stats.kv_prefill
    cached_up = jnp.where(cached > 0, gemm_rows(cached, up, c), 0.0)
    module = _mla_module_parts(stats, dep, curves) if curves.mla is not None else None
    if module is None:  # on the GEMM curves
        mla_attn = (
            gemm(jnp.where(ql > 0, ql, qh * dh) + c + r, d, width)
            + gemm(qh * dh, ql, width)
            + gemm(up, c, width)
            + gemm(d, qh * v, width)
        )
    else:  # on the GPU's measured MLA modules
        mla_attn = module["linear"]
    attn = jnp.where(mla, mla_attn + cached_up, gqa_attn)
    # DSA layers (MLA with a top-k indexer) on the GPU's measured DSA modules:
    # latent-space attention in both paths, so no cached-token up-projection.
    dsa = jnp.asarray(a.index_heads) > 0  # the indexer runs in its index_layers
    sparse = _dsa_module_parts(stats, dep, curves) if curves.dsa is not None else None
    if sparse is not None:
        attn = jnp.where(dsa, sparse["linear"], attn)
    mlp = gemm(2.0 * ffn, d, width) + gemm(d, ffn, width)
    # MoE layers: shared experts, the router (16-bit) and the fused routed experts
    # (whole experts per GPU when ep = t, else each expert split t ways).
    shared = a.shared_ffn / t
    whole = dep.ep > 1.0
    has_experts = a.n_experts > 0
    # Which MoE family times the experts: MXFP4 ones OpenAI's Triton kernel, FP8
    # and NVFP4 ones FlashInfer's (all on the local experts' tokens only), 16-bit
    # ones vLLM's Triton fused MoE. A dense model's experts are stand-ins (selected
    # out below).
    mxfp4 = _mxfp4_experts(a.expert_weight_bytes, a.expert_compute_bytes)
    fp8_experts = jnp.asarray(a.expert_compute_bytes) == 1.0
    fp4_experts = jnp.asarray(a.expert_compute_bytes) == 0.5
    padded = runs_flashinfer_mxfp4(curves.hardware)  # the widths its kernel holds
    work = moe_kernel_work(
        m,
        d,
        jnp.where(has_experts, a.expert_ffn, 1.0),
        jnp.where(has_experts, a.top_k, 1.0),
        jnp.where(has_experts, a.n_experts, 1.0),
        hw,
        tp=jnp.where(whole, 1.0, t),
        ep=dep.ep,
        weight_bytes=a.expert_weight_bytes,
        compute_bytes=a.expert_compute_bytes,
        local_only=jnp.where(mxfp4 | fp8_experts | fp4_experts, 1.0, 0.0),
        width_align=jnp.where(mxfp4 & padded, MXFP4_PAD, 0.0),
        tile_rule=jnp.where(mxfp4, mxfp4_tile_rule(curves.hardware), TILE_DEFAULT),
    )
    experts = jnp.where(
        mxfp4,
        work.time_us(curves.moe_w4a16),
        jnp.where(
            fp8_experts,
            work.time_us(curves.moe_fp8),
            jnp.where(
                fp4_experts, work.time_us(curves.moe_nvfp4), work.time_us(curves.moe)
            ),
        ),
    )
    moe = (
        gemm(2.0 * shared, d, width)
        + gemm(d, shared, width)
        + gemm(a.n_experts, d, 2.0, 2.0)
        + jnp.where(has_experts, experts, 0.0)
    )
    linear = n_layers * attn + a.dense_layers * mlp + a.moe_layers * moe

    # Prefill: A_pf pairs per query head over K_pf + P tokens; the kernel's thread
    # blocks are the chunks' query tiles (GQA heads packed into the tile).
    chunks = jnp.maximum(n_pf, 1.0)
    group = qh / kvh
    tiles = jnp.ceil(p / chunks * group / ATTN_TILE)
    # Windowed layers: the pairs and KV tokens inside the window (+ sinks).
    n_win = a.window_layers
    w_pairs, w_read, w_dec, _ = windowed_attention(stats, a.window, a.sink_tokens)

    # MLA prefill is multi-head attention on up-projected 16-bit keys and values
    # (query-key size dh, value size v, every head its own KV); MLA decode is
    # absorbed: every head reads the one latent (c + r) of each cached token.
    dims = attention_dims(a, t)
    pf_width = jnp.where(mla, qh * (dims.prefill_qk + dims.prefill_v), dims.kv_width)
    pf_kv_bytes = jnp.where(mla, a.act_bytes, a.kv_bytes)

    def prefill_us(pairs, kv_tokens):
        # A step with no prefill runs no kernel (0 below). It times one token there
        # instead of none, so that the branch the `where` drops stays finite: an
        # infinite one gives NaN second derivatives (the joint fit's Laplace).
        on = p > 0
        ps, tl = jnp.where(on, p, 1.0), jnp.where(on, tiles, 1.0)
        pairs, kv_tokens = jnp.where(on, pairs, 1.0), jnp.where(on, kv_tokens, 1.0)
        f, b = attention_work_dims(
            pairs, kv_tokens, ps, qh, dims.prefill_qk, dims.prefill_v, pf_width,
            pf_kv_bytes,
        )  # fmt: skip
        # One exponential per score element and query head (the softmax).
        work = _work(
            f,
            b,
            hw.flops_16,
            hw,
            chunks * kvh * tl,
            exps=qh * pairs,
            grid=(chunks * qh, ps / chunks, group),  # the tables' shape-grid sizes
        )
        return jnp.where(on, work.time_us(curves.prefill_attention), 0.0)

    prefill = (n_layers - n_win) * prefill_us(
        stats.attn_prefill, stats.kv_prefill + p
    ) + n_win * prefill_us(w_pairs, w_read)

    seqs = jnp.maximum(n_dec, 1.0)
    fa2_decode = runs_fa2_decode(curves.hardware)

    def decode_us(kv_tokens):
        kv_tokens = jnp.where(n_dec > 0, kv_tokens, 1.0)  # finite where unused
        f, b = attention_work_dims(
            kv_tokens, kv_tokens, seqs, qh, dims.decode_qk, dims.decode_v,
            dims.kv_width, a.kv_bytes,
        )  # fmt: skip
        depth = None
        if fa2_decode:  # multi-head attention: one block walks a whole cache
            walk = jnp.logical_not(mla) & (qh <= kvh)
            depth = jnp.where(walk, kv_tokens / seqs, 0.0)
        units = seqs * jnp.where(mla, 1.0, kvh)
        grid = (seqs * qh, kv_tokens / seqs, qh / jnp.where(mla, 1.0, kvh))
        work = _work(f, b, hw.flops_16, hw, units, depth=depth, grid=grid)
        return jnp.where(n_dec > 0, work.time_us(curves.decode_attention), 0.0)

    decode = (n_layers - n_win) * decode_us(stats.kv_decode) + n_win * decode_us(w_dec)
    kv_write = jnp.zeros_like(decode)
    if module is not None:
        prefill = jnp.where(mla, n_layers * module["prefill"], prefill)
        decode = jnp.where(mla, n_layers * module["decode"], decode)
        kv_write = jnp.where(mla, n_layers * module["kv_write"], kv_write)
    if sparse is not None:
        ix = a.index_layers
        prefill = jnp.where(
            dsa, n_layers * sparse["prefill"] + ix * sparse["prefill_index"], prefill
        )
        decode = jnp.where(
            dsa, n_layers * sparse["decode"] + ix * sparse["decode_index"], decode
        )
        kv_write = jnp.where(dsa, n_layers * sparse["kv_write"], kv_write)
    allreduce = 2.0 * allreduce_kernel_us(m * d * a.act_bytes, t, curves.allreduce, hw)
    requests = n_pf + n_dec
    lm_head = gemm_kernel_work(
        jnp.maximum(requests, 1.0), a.vocab / t, d, hw, weight_bytes=a.head_weight_bytes
    ).time_us(curves.gemm_bf16)
    overhead = (
        host.step_us
        + n_layers * (host.layer_us + requests * host.layer_request_us) * gate
        + requests * host.request_us
    )
    shape = jnp.shape(linear * overhead)
    zero = jnp.zeros(shape)
    return Breakdown(
        linear=linear * gate + zero,
        attention_prefill=prefill * gate + zero,
        attention_decode=decode * gate + zero,
        kv_write=kv_write * gate + zero,
        lm_head=lm_head * gate * (requests > 0) + zero,
        allreduce=n_layers * allreduce * gate + zero,
        overhead=overhead + zero,
    )


def _mla_module_parts(
    stats: BatchStats, dep: Deployment, curves: KernelCurves
) -> dict[str, Array]:
    """One MLA layer's attention on the GPU's measured-module curves, us, by part
    (:mod:`~diffmodel.kernels._mla`): the prefill path over the step's prefill
    tokens, the decode path over its decode tokens, each only where it has tokens;
    ``linear`` both paths' projections, ``prefill``/``decode`` their attention,
    ``kv_write`` their latent KV writes. The modules' fixed cost (the eager
    module's launches, norms and RoPE) is left to the host costs."""
    a, t = dep.arch, jnp.asarray(dep.tp, float)
    p, dec = stats.prefill_tokens, stats.decode_tokens
    # Paths without tokens are not run; their work is taken at one token so that
    # the roofline's gradient stays finite, and gated out.
    p1, d1 = jnp.maximum(p, 1.0), jnp.maximum(dec, 1.0)
    ctx = mla_module_work(
        "context",
        p1,
        jnp.maximum(stats.attn_prefill, 1.0),
        stats.kv_prefill + p1,
        a,
        t,
    )
    gen_read = jnp.maximum(stats.kv_decode, 1.0)
    gen = mla_module_work("generation", d1, gen_read, gen_read, a, t)
    c_proj, c_attn, c_kv = mla_parts_us(curves.mla.context, ctx, dep.hw)
    g_proj, g_attn, g_kv = mla_parts_us(curves.mla.generation, gen, dep.hw)
    has_p, has_d = p > 0, dec > 0
    return {
        "linear": jnp.where(has_p, c_proj, 0.0) + jnp.where(has_d, g_proj, 0.0),
        "prefill": jnp.where(has_p, c_attn, 0.0),
        "decode": jnp.where(has_d, g_attn, 0.0),
        "kv_write": jnp.where(has_p, c_kv, 0.0) + jnp.where(has_d, g_kv, 0.0),
    }


def _dsa_module_parts(
    stats: BatchStats, dep: Deployment, curves: KernelCurves
) -> dict[str, Array]:
    """One DSA layer's attention on the GPU's measured-module curves, us, by part
    (:mod:`~diffmodel.kernels._dsa`), as :func:`_mla_module_parts`: ``linear``
    both paths' projections (the indexer's too), ``prefill``/``decode`` their
    sparse attention, ``prefill_index``/``decode_index`` their indexer (logits and
    top-k; paid only in the ``index_layers``), ``kv_write`` their KV writes."""
    a, t = dep.arch, jnp.asarray(dep.tp, float)
    has_p, has_d = stats.prefill_tokens > 0, stats.decode_tokens > 0
    parts = {}
    for op, has in (("context", has_p), ("generation", has_d)):
        m = getattr(curves.dsa, op)
        work = dsa_module_work(op, stats, a, t)
        proj, attn, index, kv = dsa_parts_us(m, work, dep.hw)
        parts[op] = [jnp.where(has, x, 0.0) for x in (proj, attn, index, kv)]
    (c_proj, c_attn, c_index, c_kv), (g_proj, g_attn, g_index, g_kv) = (
        parts["context"],
        parts["generation"],
    )
    return {
        "linear": c_proj + g_proj,
        "prefill": c_attn,
        "decode": g_attn,
        "prefill_index": c_index,
        "decode_index": g_index,
        "kv_write": c_kv + g_kv,
    }


def _gemm_us(
    m, n, k, width, quant_passes, curves: KernelCurves, hw, weight_bytes=None
) -> Array:
    """A GEMM ``[m, k] @ [k, n]`` with operands of ``width`` bytes on that width's
    curves (2: ``gemm_bf16``, 1: ``gemm_fp8``, 0.5: ``gemm_nvfp4``), us, reading
    ``weight_bytes`` per weight (default the operand width); FP8 and FP4 GEMMs of a
    model with activation quantization passes pay the unfused pass; 0 where
    ``n k = 0`` (a part the model does not have)."""
    present = n * k > 0
    n1, k1 = jnp.where(present, n, 1.0), jnp.where(present, k, 1.0)
    # One work at the width's peak and bytes (bf16 output), with the activation
    # quantization where the model has it; only the curves that time it depend on
    # the width. 16-bit GEMMs quantize nothing.
    quantizes = (quant_passes > 0) & (width < 2.0)
    work = gemm_kernel_work(
        m,
        n1,
        k1,
        hw,
        width,
        out_bytes=2.0,
        act_quant=jnp.where(quantizes, 1.0, 0.0),
        weight_bytes=weight_bytes,
    )
    t = jnp.where(
        width == 1.0,
        work.time_us(curves.gemm_fp8),
        jnp.where(
            width == 0.5,
            work.time_us(curves.gemm_nvfp4),
            work.time_us(curves.gemm_bf16),
        ),
    )
    return jnp.where(present, t, 0.0)


def host_features(stats: BatchStats, dep: Deployment) -> Float[Array, "*steps 4"]:
    """What each host cost is paid per: ``[1, L (T > 0), Np + Nd, L (Np + Nd)]`` per
    step (the multipliers of ``step_us``, ``layer_us``, ``request_us`` and
    ``layer_request_us`` in :func:`kernel_step_time`)."""
    tokens = stats.prefill_tokens + stats.decode_tokens
    layers = dep.arch.n_layers * jnp.where(tokens > 0, 1.0, 0.0)
    requests = stats.num_prefill + stats.num_decode
    ones = jnp.ones(jnp.shape(layers * requests))
    columns = [ones, layers + 0.0 * ones, requests + 0.0 * ones, layers * requests]
    return jnp.stack(columns, axis=-1)


def device_us(
    stats: BatchStats, dep: Deployment, curves: KernelCurves, *, check: bool = True
) -> Float[Array, "*steps"]:
    """The device time of each step, us: :func:`kernel_step_time` without host."""
    return kernel_step_time(stats, dep, curves, check=check).total


__all__ = [
    "HOST_TERMS",
    "HostCosts",
    "check_supported",
    "device_us",
    "host_features",
    "kernel_step_time",
]
