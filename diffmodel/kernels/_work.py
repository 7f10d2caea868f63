"""The work each measured kernel does (FLOPs, bytes, parallel units) and its predicted
time, from the step model's own operator formulas (:mod:`diffmodel._model._physics`),
with efficiencies either constants or curves (:mod:`diffmodel.kernels._curves`).

GEMMs, tiled causal prefill attention, paged decode attention, vLLM's fused MoE (its
tiles, tuned configurations and routing distributions) and all-reduce.
"""

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jaxtyping import Array, ArrayLike, Float

from .._model._hardware import Hardware
from .._model._physics import (
    act_quant_bytes,
    allreduce_us,
    attention_work,
    gemm_work,
    moe_work,
    roofline_us,
    routed_slots,
    touched_experts,
)
from ..kernels._curves import AllReduceCurve, RooflineCurves

# --------------------------------------------------------------- operator work and time


Efficiency = RooflineCurves | tuple[ArrayLike, ArrayLike]


class KernelWork(eqx.Module):
    """Work of a set of kernels, and the peaks it runs against (arrays, one per kernel).

    Attributes:
        flops: floating-point operations.
        bytes: bytes moved to or from HBM.
        peak_flops: FLOP/s of the tensor cores used (16-bit or FP8).
        bandwidth: HBM bandwidth, bytes/s.
        units: independent units of parallel work (thread blocks), for occupancy.
        blocks: optional thread blocks scheduled, for the per-block cost, where they
            differ from ``units`` (blocks that exit at once do no parallel work).
        tuned: optional 1 where the kernel runs a tuned tile configuration, else 0.
        pre_bytes: optional HBM bytes of memory-bound passes the operator runs before
            its kernel, serially (an unfused quantization of its activation), bytes.
        sms: optional SM count of the GPU, for portable curves (waves of blocks).
        l2: optional L2 cache size of the GPU, bytes, for curves with a ``cache``.
    """

    flops: Float[Array, "*kernels"]
    bytes: Float[Array, "*kernels"]
    peak_flops: Float[Array, "*kernels"]
    bandwidth: Float[Array, "*kernels"]
    units: Float[Array, "*kernels"]
    blocks: Float[Array, "*kernels"] | None = None
    tuned: Float[Array, "*kernels"] | None = None
    pre_bytes: Float[Array, "*kernels"] | None = None
    sms: Float[Array, "*kernels"] | None = None
    l2: Float[Array, "*kernels"] | None = None

    def time_us(self, eff: Efficiency) -> Float[Array, "*kernels"]:
        """Time, us: ``roofline_us`` with constant ``(eta_flops, eta_bw)``, or with
        :class:`RooflineCurves` (efficiencies of the work plus the kernel floor).

        ``pre_bytes`` add ``pre_bytes / (bw eta_pre)``: ``eta_pre`` is the curves'
        ``prologue`` efficiency at ``pre_bytes`` (their ``bandwidth`` curve without
        one), or the constant ``eta_bw``. Portable curves see the work as its time
        at peak (us) and blocks as waves of ``sms`` (:class:`RooflineCurves`).

        Raises ``ValueError`` for portable curves on work without ``sms``."""
        if isinstance(eff, RooflineCurves):
            blocks = self.units if self.blocks is None else self.blocks
            f, b, u, pre_b = self.flops, self.bytes, self.units, self.pre_bytes
            if eff.portable:
                if self.sms is None:
                    raise ValueError(
                        "portable curves need the GPU's SM count: "
                        "Hardware(sm_count=...) or a catalog GPU"
                    )
                f = f / self.peak_flops * 1e6
                b = b / self.bandwidth * 1e6
                u, blocks = u / self.sms, blocks / self.sms
                if pre_b is not None:
                    pre_b = pre_b / self.bandwidth * 1e6
            eta_f, eta_b = eff.efficiencies(f, b, u, self.tuned)
            mem_bytes = self.bytes
            if eff.cache is not None:
                if self.l2 is None or not eff.portable:
                    raise ValueError(
                        "curves with a cache need portable=True and the GPU's L2 "
                        "size: Hardware(l2_bytes=...) or a catalog GPU"
                    )
                mem_bytes = mem_bytes * eff.cache(self.bytes / self.l2)
            floor = eff.latency_us + blocks * eff.unit_ns * 1e-3
            if self.pre_bytes is not None:
                pre = eff.bandwidth if eff.prologue is None else eff.prologue
                eta_pre = pre(pre_b)
        else:
            eta_f, eta_b = (jnp.asarray(e) for e in eff)
            floor = 0.0
            eta_pre = eta_b
            mem_bytes = self.bytes
        if self.pre_bytes is not None:
            floor = floor + self.pre_bytes / (self.bandwidth * eta_pre) * 1e6
        return floor + roofline_us(
            self.flops, mem_bytes, self.peak_flops, self.bandwidth, eta_f, eta_b
        )


def _peak(hw: Hardware, dtype_bytes: ArrayLike) -> Array:
    return jnp.where(jnp.asarray(dtype_bytes) <= 1.0, hw.flops_8, hw.flops_16)


def gemm_kernel_work(
    m: ArrayLike,
    n: ArrayLike,
    k: ArrayLike,
    hw: Hardware,
    dtype_bytes: ArrayLike = 2.0,
    out_bytes: ArrayLike | None = None,
    act_quant: ArrayLike | None = None,
) -> KernelWork:
    """A GEMM ``[m, k] @ [k, n]`` in ``dtype_bytes`` (1: FP8 peak) on ``hw``.

    ``f = 2 m n k``; ``b = (k n + m k) dtype_bytes + m n out_bytes`` (``gemm_work``;
    ``out_bytes`` defaults to ``dtype_bytes``). ``act_quant`` (1 or 0 per GEMM,
    ``None``: none) marks GEMMs that first quantize their bf16 activation to FP8 in
    separate passes (dynamic per-tensor FP8): ``pre_bytes = act_quant m k (2 2 + 1)``
    (``act_quant_bytes``).

    Raises ``ValueError`` naming ``act_quant`` if it holds a value other than 0 or 1.
    """
    f, b = gemm_work(m, n, k, dtype_bytes, dtype_bytes, out_bytes)
    tiles = jnp.ceil(jnp.asarray(m) / 64.0) * jnp.ceil(jnp.asarray(n) / 128.0)
    pre = None
    if act_quant is not None:
        q = np.asarray(act_quant, float)
        if not np.isin(q, (0.0, 1.0)).all():
            raise ValueError(
                f"act_quant must be 0 or 1 per GEMM, got {np.unique(q).tolist()}"
            )
        pre = jnp.asarray(q) * act_quant_bytes(m, k)
    return _work(f, b, _peak(hw, dtype_bytes), hw, tiles, pre=pre)


# FlashAttention-3 (vLLM's ``vllm_flash_attn`` on H100) tiles head_dim-128 causal
# attention in 128 x 128 blocks (query rows x keys).
ATTN_TILE = 128.0


def causal_tile_pairs(
    isl: ArrayLike, group: ArrayLike, tile: float = ATTN_TILE
) -> tuple[Array, Array]:
    """Query-key pairs a tiled causal kernel computes for one sequence and KV head.

    FlashAttention packs the ``group = H / Hkv`` query heads that share a KV head into
    its query tiles (``isl group`` rows in ``n_q = ceil(isl group / tile)`` tiles);
    query tile ``i`` covers positions below ``(i + 1) tile / group`` and computes
    ``ceil(min(isl / tile, (i + 1) / group))`` full ``tile x tile`` key blocks,
    masked or not. Summed in closed form over the ``J = min(n_q, floor(isl group /
    tile))`` full tiles (``sum_{j<=J} ceil(j / group) = g q (q + 1) / 2 + r (q + 1)``
    with ``J = q g + r``), the rest reading all ``ceil(isl / tile)`` blocks.

    Returns ``(pairs, tiles)``: computed pairs over all ``group`` heads (about
    ``group isl (isl + tile) / 2`` for long sequences, ``tile^2`` at least), and the
    query tiles ``n_q`` (thread blocks).
    """
    isl, g = jnp.asarray(isl), jnp.asarray(group)
    n_q = jnp.ceil(isl * g / tile)
    full = jnp.minimum(n_q, jnp.floor(isl * g / tile))
    q = jnp.floor(full / g)
    r = full - q * g
    blocks = g * q * (q + 1.0) / 2.0 + r * (q + 1.0)
    blocks = blocks + (n_q - full) * jnp.ceil(isl / tile)
    return tile * tile * blocks, n_q


def prefill_attention_work(
    batch: ArrayLike,
    isl: ArrayLike,
    heads: ArrayLike,
    kv_heads: ArrayLike,
    head_dim: ArrayLike,
    hw: Hardware,
    kv_bytes: ArrayLike = 2.0,
) -> KernelWork:
    """Causal attention of ``batch`` sequences of ``isl`` new tokens (per-GPU heads).

    FLOPs count the pairs the tiled kernel computes (:func:`causal_tile_pairs`:
    ``isl^2 / 2`` per head plus the masked halves of the diagonal blocks and the
    padding of short sequences to a full tile); KV read ``batch isl``; queries
    ``batch isl`` (``attention_work``). Thread blocks: ``batch Hkv n_q``.
    """
    batch, isl = jnp.asarray(batch), jnp.asarray(isl)
    heads, kv_heads = jnp.asarray(heads), jnp.asarray(kv_heads)
    group = heads / kv_heads
    pairs, tiles = causal_tile_pairs(isl, group)
    tokens = batch * isl
    f, b = attention_work(
        batch * pairs / group, tokens, tokens, heads, kv_heads, head_dim, kv_bytes
    )
    return _work(f, b, hw.flops_16, hw, batch * kv_heads * tiles)


def decode_attention_work(
    batch: ArrayLike,
    kv_len: ArrayLike,
    heads: ArrayLike,
    kv_heads: ArrayLike,
    head_dim: ArrayLike,
    hw: Hardware,
    kv_bytes: ArrayLike = 2.0,
) -> KernelWork:
    """One query token for each of ``batch`` sequences over ``kv_len`` cached tokens.

    Pairs and KV read ``batch kv_len``; queries ``batch`` (``attention_work``).
    """
    k_dec = jnp.asarray(batch) * jnp.asarray(kv_len)
    f, b = attention_work(k_dec, k_dec, batch, heads, kv_heads, head_dim, kv_bytes)
    return _work(f, b, hw.flops_16, hw, jnp.asarray(batch) * kv_heads)


# vLLM's Triton fused MoE: token tiles of 64 (its default for large batches) and
# 128-column tiles of the gate+up output, for the blocks it schedules.
MOE_TILE_M = 64.0
MOE_TILE_N = 128.0
# vLLM's default tile configuration (``get_default_config``, bf16, no tuned file):
# ``BLOCK_SIZE_M x BLOCK_SIZE_N`` = 16 x 32 while the tokens are at most the experts
# on the GPU, 64 x 64 above.
MOE_DEFAULT_TILES = ((16.0, 32.0), (64.0, 64.0))

# The shapes for which vLLM 0.14.0 ships a tuned tile configuration of its Triton
# fused MoE (``fused_moe/configs/E={E},N={N},device_name={device}.json``, E: experts
# on the GPU, N: expert FFN width on the GPU; bf16 files carry no ``dtype=``), by
# (device name, MoE dtype). Listed from the vllm-0.14.0 wheel (Apache-2.0).
VLLM_TUNED_MOE: dict[tuple[str, str], frozenset[tuple[int, int]]] = {
    ("NVIDIA H100 80GB HBM3", "bfloat16"): frozenset(
        {
            (1, 3072),
            (8, 1792),
            (8, 2048),
            (8, 3584),
            (8, 4096),
            (8, 7168),
            (16, 1344),
            (16, 1792),
            (16, 2688),
            (62, 256),
            (62, 512),
            (64, 320),
            (64, 640),
            (64, 1280),
            (72, 384),
            (72, 768),
            (128, 192),
            (128, 512),
            (128, 928),
            (128, 1856),
            (256, 512),
            (512, 128),
            (512, 256),
            (512, 512),
        }
    )
}


def vllm_tuned_moe(table: pd.DataFrame, *, strict: bool = True) -> np.ndarray:
    """1.0 for the rows of an aiconfigurator MoE table whose (device, ``moe_dtype``,
    ``num_experts / moe_ep_size``, ``inter_size / moe_tp_size``) has a tuned vLLM
    configuration (:data:`VLLM_TUNED_MOE`), else 0.0.

    Raises ``ValueError`` for a (device, dtype) the catalogue does not cover; with
    ``strict=False`` those rows are 0.0 (no tuned configuration known), and so are
    rows of kernels other than vLLM's Triton fused MoE (``kernel_source`` without
    ``triton``/``fused_moe``), which do not read the tuned files.
    """
    keys = set(zip(table["device"], table["moe_dtype"], strict=True))
    unknown = sorted(keys - set(VLLM_TUNED_MOE))
    if unknown and strict:
        raise ValueError(
            f"columns 'device', 'moe_dtype': no catalogue of tuned vLLM MoE "
            f"configurations for {unknown}; known: {sorted(VLLM_TUNED_MOE)}"
        )
    e_local = table["num_experts"].to_numpy(int) // table["moe_ep_size"].to_numpy(int)
    n_local = table["inter_size"].to_numpy(int) // table["moe_tp_size"].to_numpy(int)
    tuned = np.array(
        [
            float((e, n) in VLLM_TUNED_MOE.get((dev, dt), ()))
            for dev, dt, e, n in zip(
                table["device"], table["moe_dtype"], e_local, n_local, strict=True
            )
        ]
    )
    if "kernel_source" in table.columns:
        src = table["kernel_source"].astype(str).str.lower()
        tuned = tuned * (src.str.contains("triton") | src.str.contains("fused_moe"))
    return tuned.to_numpy(float) if hasattr(tuned, "to_numpy") else tuned


class ExpertLoads(eqx.Module):
    """What a skewed routing gives the GPU measured (arrays, one per kernel).

    Attributes:
        touched: local experts that receive at least one slot.
        tiles_small, tiles_large: token tiles ``sum_j ceil(n_j / BM)`` over the local
            experts' slots ``n_j`` at the small and large default ``BM``
            (:data:`MOE_DEFAULT_TILES`).
    """

    touched: Float[Array, "*n"]
    tiles_small: Float[Array, "*n"]
    tiles_large: Float[Array, "*n"]


def power_law_loads(tokens, n_experts, top_k, ep, alpha) -> ExpertLoads:
    """Expected per-expert slots of aiconfigurator's power-law routing, on the GPU it
    measures (NumPy, per row; table inputs, not traced).

    The collector (``power_law_logits_v3``) draws each of the ``E`` experts' loads
    from a power law of exponent ``alpha`` on ``[1, 0.8 T]`` (``[0.01, 2]`` when
    ``T k <= E``), scales them to ``T k`` slots and rounds them (the shortfall to
    the largest, one slot each), then moves the expert-parallel group holding the
    busiest expert to the measured GPU. Here the draws are replaced by the
    ``(j - 1/2) / E`` quantiles (their expected order statistics, about), and the
    measured GPU holds every ``ep``-th of the sorted loads starting with the
    largest (a stratified ``E / ep`` of them).
    """
    t, e, k, ep, a = (
        np.broadcast_to(np.asarray(x, float), np.shape(tokens))
        for x in (tokens, n_experts, top_k, ep, alpha)
    )
    out = np.zeros((3, t.size))
    (bm_s, _), (bm_l, _) = MOE_DEFAULT_TILES
    for i, (ti, ei, ki, pi, ai) in enumerate(
        zip(t.ravel(), e.ravel(), k.ravel(), ep.ravel(), a.ravel(), strict=True)
    ):
        lo, hi = (1.0, 0.8 * ti) if ti * ki > ei else (0.01, 2.0)
        hi = max(hi, lo * (1.0 + 1e-9))
        u = (np.arange(int(ei)) + 0.5) / ei
        x = ((hi ** (1 - ai) - lo ** (1 - ai)) * u + lo ** (1 - ai)) ** (1 / (1 - ai))
        n = np.sort(np.round(x / x.sum() * ti * ki))[::-1]
        # As the collector: the rounding's shortfall (or excess) goes to the largest
        # experts, one slot each, so the loads sum to T k.
        delta = int(round(ti * ki - n.sum()))
        n[: abs(delta)] += np.sign(delta)
        n = np.sort(n)[::-1][:: int(pi)]
        out[:, i] = ((n >= 1).sum(), np.ceil(n / bm_s).sum(), np.ceil(n / bm_l).sum())
    return ExpertLoads(*(jnp.asarray(o.reshape(t.shape)) for o in out))


def moe_kernel_work(
    tokens: ArrayLike,
    hidden: ArrayLike,
    inter: ArrayLike,
    top_k: ArrayLike,
    n_experts: ArrayLike,
    hw: Hardware,
    *,
    tp: ArrayLike = 1.0,
    ep: ArrayLike = 1.0,
    weight_bytes: ArrayLike = 2.0,
    act_bytes: ArrayLike = 2.0,
    routing: str = "uniform",
    tuned: ArrayLike = 0.0,
    loads: "ExpertLoads | None" = None,
) -> KernelWork:
    """Fused MoE on one GPU holding ``E/ep`` experts of ``inter/tp``.

    Tokens are routed top-``k`` over all ``E`` experts (``routing``: ``"uniform"``
    random, or the benchmarks' ``"balanced"`` round-robin; see
    :func:`~diffmodel._physics.touched_experts`), so this GPU computes ``k/ep``
    expert slots per token among ``E/ep`` experts: FLOPs and weight bytes are
    ``moe_work`` with a fractional top-k. Activations count every routed slot, as
    vLLM's kernel runs over all ``T k`` slots and writes zeros for those of experts
    on other GPUs (``moe_work``'s activations at the full ``k``), plus the unfused
    gated intermediate: the ``[T k, 2 F/tp]`` gate+up output is written, read by the
    activation, which writes ``F/tp`` read by the down GEMM (``6 F/tp`` per slot,
    ``moe_work`` counts ``3 F/tp``), and the ``[T, k, H]`` down output read back by
    the sum over the ``k`` slots (``H`` per slot). FP8 weights use the FP8 peak.

    The tiles of vLLM's default configuration (:data:`MOE_DEFAULT_TILES`, ``BM x
    BN``; tuned kernels too, whose own tiles are not recorded here): each touched
    expert's slots fill ``ceil(slots / BM)`` token tiles, and FLOPs count the ``BM``
    rows of every tile computed (padding included). Units of parallel work
    (occupancy): the gate+up tiles that compute, token tiles times
    ``ceil(2 F/tp / BN)``. Scheduled blocks (per-block cost): the grid over the
    slots padded per (global) expert, ``(T k / 64 + E) ceil(2 F/tp / 128)``; most
    of those of an idle expert exit at once, but each is scheduled. ``tuned``: 1
    where vLLM runs a tuned configuration (:func:`vllm_tuned_moe`).

    ``loads``: the slots, touched experts and token tiles of this GPU given by a
    skewed routing (:func:`power_law_loads`), in place of ``routing``'s.
    """
    ep, tokens = jnp.asarray(ep), jnp.asarray(tokens)
    top_k, n_experts = jnp.asarray(top_k), jnp.asarray(n_experts)
    e_local, k_local = n_experts / ep, top_k / ep
    f_local = jnp.asarray(inter) / tp
    work = (tokens, hidden, f_local, e_local, k_local)
    f, b = moe_work(*work, weight_bytes, act_bytes, routing)
    _, acts_local = moe_work(*work, 0.0, act_bytes, routing)
    _, acts_all = moe_work(
        tokens, hidden, f_local, n_experts, top_k, 0.0, act_bytes, routing
    )
    unfused = tokens * top_k * (3.0 * f_local + hidden) * act_bytes
    b = b - acts_local + acts_all + unfused
    small = tokens <= e_local
    (bm_s, bn_s), (bm_l, bn_l) = MOE_DEFAULT_TILES
    bm, bn = jnp.where(small, bm_s, bm_l), jnp.where(small, bn_s, bn_l)
    if loads is None:
        touched = touched_experts(tokens, e_local, k_local, routing)
        slots = routed_slots(tokens, k_local, touched, routing)
        per_expert = slots / jnp.where(touched > 0, touched, 1.0)
        # The tolerance keeps an exact multiple of the tile from rounding up.
        token_tiles = touched * jnp.ceil(per_expert / bm - 1e-9)
    else:
        # The weights of the experts the skewed routing touches, not routing's.
        touched = jnp.asarray(loads.touched)
        token_tiles = jnp.where(small, loads.tiles_small, loads.tiles_large)
        w_routing = touched_experts(tokens, e_local, k_local, routing)
        slots = routed_slots(tokens, k_local, w_routing, routing)
        per_w = 3.0 * jnp.asarray(hidden) * f_local * weight_bytes
        b = b + (touched - w_routing) * per_w
    f = f * token_tiles * bm / jnp.where(slots > 0, slots, 1.0)
    units = token_tiles * jnp.ceil(2.0 * f_local / bn)
    blocks = (tokens * top_k / MOE_TILE_M + n_experts) * jnp.ceil(
        2.0 * f_local / MOE_TILE_N
    )
    return _work(f, b, _peak(hw, weight_bytes), hw, units, blocks, tuned)


def _work(f, b, peak, hw, units=1.0, blocks=None, tuned=None, pre=None) -> KernelWork:
    core = jnp.broadcast_arrays(
        *(jnp.asarray(x, float) for x in (f, b, peak, hw.hbm_bw, units))
    )

    def opt(x):  # an optional per-kernel field, on the kernels' shape
        return (
            None
            if x is None
            else jnp.broadcast_to(jnp.asarray(x, float), core[0].shape)
        )

    return KernelWork(
        *core,
        blocks=opt(blocks),
        tuned=opt(tuned),
        pre_bytes=opt(pre),
        sms=opt(hw.sm_count),
        l2=opt(hw.l2_bytes),
    )


def gemm_us(m, n, k, eff: Efficiency, hw: Hardware, dtype_bytes=2.0) -> Array:
    """Predicted GEMM time, us (see :func:`gemm_kernel_work`)."""
    return gemm_kernel_work(m, n, k, hw, dtype_bytes).time_us(eff)


def prefill_attention_us(
    batch, isl, heads, kv_heads, head_dim, eff: Efficiency, hw: Hardware, kv_bytes=2.0
) -> Array:
    """Predicted prefill attention time, us (see :func:`prefill_attention_work`)."""
    work = prefill_attention_work(batch, isl, heads, kv_heads, head_dim, hw, kv_bytes)
    return work.time_us(eff)


def decode_attention_us(
    batch,
    kv_len,
    heads,
    kv_heads,
    head_dim,
    eff: Efficiency,
    hw: Hardware,
    kv_bytes=2.0,
) -> Array:
    """Predicted decode attention time, us (see :func:`decode_attention_work`)."""
    work = decode_attention_work(batch, kv_len, heads, kv_heads, head_dim, hw, kv_bytes)
    return work.time_us(eff)


def moe_us(
    tokens, hidden, inter, top_k, n_experts, eff: Efficiency, hw: Hardware, **kwargs
) -> Array:
    """Predicted fused MoE time, us (see :func:`moe_kernel_work`)."""
    work = moe_kernel_work(tokens, hidden, inter, top_k, n_experts, hw, **kwargs)
    return work.time_us(eff)


def allreduce_kernel_us(
    bytes_: ArrayLike,
    n_gpus: ArrayLike,
    eff: AllReduceCurve | tuple[ArrayLike, ArrayLike],
    hw: Hardware,
) -> Array:
    """Predicted all-reduce time, us: ``allreduce_us`` with a curve or ``(eta, lat)``.

    ``eff`` is an :class:`AllReduceCurve` or a pair (link efficiency, latency in us);
    a portable curve takes the message's time on the link, ``bytes / link_bw`` (us).
    """
    if isinstance(eff, AllReduceCurve):
        x = jnp.asarray(bytes_) / hw.link_bw * 1e6 if eff.portable else bytes_
        eta, latency = eff.bandwidth(x), eff.latency_us
    else:
        eta, latency = eff
    return allreduce_us(bytes_, n_gpus, hw.link_bw, eta, latency)
