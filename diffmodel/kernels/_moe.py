"""vLLM's Triton fused MoE as measured kernels: its tiles, its tuned configurations,
routing distributions over the experts, and the work and time of one call (the
generic work-and-time machinery is :mod:`diffmodel.kernels._work`)."""

import functools

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jaxtyping import Array, ArrayLike, Float

from .._model._hardware import Hardware
from .._model._physics import moe_work, routed_slots, touched_experts
from ..kernels._vllm_tuned_moe import TUNED
from ..kernels._work import Efficiency, KernelWork, _peak, _work

# vLLM's Triton fused MoE: token tiles of 64 (its default for large batches) and
# 128-column tiles of the gate+up output, for the blocks it schedules.
MOE_TILE_M = 64.0
MOE_TILE_N = 128.0
# vLLM's default tile configuration (``get_default_config``, bf16, no tuned file):
# ``BLOCK_SIZE_M x BLOCK_SIZE_N`` = 16 x 32 while the tokens are at most the experts
# on the GPU, 64 x 64 above.
MOE_DEFAULT_TILES = ((16.0, 32.0), (64.0, 64.0))
# FlashInfer's MXFP4 MoE (gpt-oss on datacenter Blackwell): vLLM pads each GPU's
# expert width and the hidden size to multiples of 256 (``Mxfp4MoEMethod.
# create_weights``; ``moe_kernel_work``'s ``width_align``).
MXFP4_PAD = 256.0
# Token-tile rules of the MoE kernels whose tile rows follow the batch (``tile_rule``
# of :func:`moe_kernel_work`, per kernel): 0 vLLM's Triton fused MoE (its default
# tiles, :data:`MOE_DEFAULT_TILES`), 1 OpenAI's Triton ``matmul_ogs`` (gpt-oss's
# MXFP4 experts on Hopper), 2 Marlin (MXFP4 on L40S, RTX PRO 6000); see
# :func:`moe_block_m`.
TILE_DEFAULT, TILE_OAI_TRITON, TILE_MARLIN = 0.0, 1.0, 2.0
_MARLIN_BLOCK_M = (8.0, 16.0, 32.0, 48.0, 64.0)


def moe_block_m(rule: ArrayLike, tokens, top_k, n_experts, ep=1.0) -> Array:
    """Rows of a token tile of an MoE kernel (``BLOCK_M``), per kernel, by its rule:

    - vLLM's Triton fused MoE (:data:`TILE_DEFAULT`): its default tiles
      (:data:`MOE_DEFAULT_TILES`), 16 rows while the tokens are at most the
      ``E / ep`` experts on the GPU, 64 above.
    - OpenAI's Triton ``matmul_ogs`` (:data:`TILE_OAI_TRITON`; ``triton_kernels``'
      ``opt_flags``): the routed slots per expert over all ``E`` experts, ``T k //
      E``, to the next power of 2, within [16, 128]. The H200 tables step where it
      does (``E`` 32, ``k`` 4: 191 us flat from 8 to 128 tokens, 233 from 160, 283
      from 320, 400 from 768).
    - Marlin (:data:`TILE_MARLIN`; vLLM's ``fused_marlin_moe``): the first of 8, 16,
      32, 48, 64 with ``T k / (E / ep) / BM < 0.9``, else 64.
    """
    rule, tokens = jnp.asarray(rule, float), jnp.asarray(tokens, float)
    e_local = jnp.asarray(n_experts, float) / jnp.asarray(ep, float)
    (bm_s, _), (bm_l, _) = MOE_DEFAULT_TILES
    default = jnp.where(tokens <= e_local, bm_s, bm_l)
    per = tokens * jnp.asarray(top_k, float)
    oai = jnp.maximum(jnp.floor(per / jnp.asarray(n_experts, float)), 1.0)
    oai = jnp.clip(2.0 ** jnp.ceil(jnp.log2(oai) - 1e-9), 16.0, 128.0)
    marlin = jnp.full(jnp.shape(per), _MARLIN_BLOCK_M[-1])
    for bm in _MARLIN_BLOCK_M[::-1]:
        marlin = jnp.where(per / e_local / bm < 0.9, bm, marlin)
    return jnp.where(
        rule == TILE_OAI_TRITON, oai, jnp.where(rule == TILE_MARLIN, marlin, default)
    )


def moe_tile_rule(table: pd.DataFrame) -> np.ndarray:
    """Per row of an aiconfigurator MoE table, its kernel's token-tile rule from
    ``kernel_source`` (:data:`TILE_OAI_TRITON` for ``oaitriton``,
    :data:`TILE_MARLIN` for ``marlin``, else :data:`TILE_DEFAULT`)."""
    if "kernel_source" not in table.columns:
        return np.zeros(len(table))
    src = table["kernel_source"].astype(str).str.lower()
    return np.where(
        src.str.contains("oaitriton").to_numpy(bool),
        TILE_OAI_TRITON,
        np.where(src.str.contains("marlin").to_numpy(bool), TILE_MARLIN, TILE_DEFAULT),
    )


@functools.cache
def vllm_tuned_shapes(version: str, device: str, dtype: str) -> frozenset:
    """The ``(E, N)`` (experts and expert FFN width on the GPU) for which vLLM
    ``version`` ships a tuned Triton fused-MoE tile configuration on CUDA ``device``
    (its name as ``torch.cuda.get_device_name`` gives it) in MoE ``dtype``
    (``bfloat16``, ``fp8``, ``fp8_block``), from the catalogue generated from vLLM's
    wheels (:mod:`diffmodel.kernels._vllm_tuned_moe`). Empty where the catalogue has
    the version but not the device or dtype (vLLM then runs its default tiles).

    Raises ``ValueError`` for a version the catalogue lacks, naming those it has.
    """
    if version not in TUNED:
        raise ValueError(
            f"no catalogue of tuned vLLM MoE configurations for vLLM {version!r}; "
            f"known: {sorted(TUNED)} (experiments/vllm_moe_configs.py adds versions)"
        )
    text = TUNED[version].get(device.replace(" ", "_"), {}).get(dtype, "")
    return frozenset(tuple(int(v) for v in s.split("x")) for s in text.split())


# Kernel sources (aiconfigurator's ``kernel_source``) of MoE kernels that take only
# the local experts' tokens (see ``moe_kernel_work``'s ``local_only``).
# OpenAI's Triton MXFP4 kernel (gpt-oss) too: chosen on H100's MXFP4 rows by held-out
# shapes, 20% MAPE local-only against 27% over every routed slot.
LOCAL_ONLY_MOE = ("flashinfer", "cutlass", "marlin", "trtllm", "oaitriton")


def moe_local_only(table: pd.DataFrame) -> np.ndarray:
    """1.0 for the rows of an aiconfigurator MoE table whose ``kernel_source`` is a
    kernel that takes only the local experts' tokens (:data:`LOCAL_ONLY_MOE`), 0.0
    for vLLM's Triton fused MoE and unknown sources (and without the column)."""
    if "kernel_source" not in table.columns:
        return np.zeros(len(table))
    src = table["kernel_source"].astype(str).str.lower()
    hit = np.zeros(len(table), bool)
    for name in LOCAL_ONLY_MOE:
        hit |= src.str.contains(name).to_numpy(bool)
    return hit.astype(float)


def vllm_tuned_moe(table: pd.DataFrame, *, strict: bool = True) -> np.ndarray:
    """1.0 for the rows of an aiconfigurator MoE table whose (``version``, ``device``,
    ``moe_dtype``, ``num_experts / moe_ep_size``, ``inter_size / moe_tp_size``) has a
    tuned vLLM configuration (:func:`vllm_tuned_shapes`), else 0.0; 0.0 also for
    rows of kernels other than vLLM's Triton fused MoE (``kernel_source`` without
    ``triton``/``fused_moe``: FlashInfer, CUTLASS, Marlin, XPU), which do not read
    the tuned files.

    Raises ``ValueError`` for a table without a ``version`` column or with a vLLM
    version the catalogue lacks; with ``strict=False`` those rows are 0.0 (no tuned
    configuration known).
    """
    if "version" not in table.columns:
        if strict:
            raise ValueError(
                "column 'version' (the vLLM version of the table) is missing: the "
                "tuned MoE configurations differ between vLLM versions"
            )
        return np.zeros(len(table))
    e_local = table["num_experts"].to_numpy(int) // table["moe_ep_size"].to_numpy(int)
    n_local = table["inter_size"].to_numpy(int) // table["moe_tp_size"].to_numpy(int)
    tuned = np.zeros(len(table))
    keys = zip(table["version"], table["device"], table["moe_dtype"], strict=True)
    for i, (key, e, n) in enumerate(zip(keys, e_local, n_local, strict=True)):
        try:
            tuned[i] = float((e, n) in vllm_tuned_shapes(*map(str, key)))
        except ValueError:
            if strict:
                raise
    if "kernel_source" in table.columns:
        src = table["kernel_source"].astype(str).str.lower()
        tuned = tuned * (src.str.contains("triton") | src.str.contains("fused_moe"))
    return tuned.to_numpy(float) if hasattr(tuned, "to_numpy") else tuned


# Nemotron-H's experts: one up projection, then a squared ReLU (``mlp_hidden_act``).
PLAIN_MLP_ACTIVATIONS = ("relu2",)


@functools.cache
def plain_moe_shapes() -> frozenset:
    """``(hidden, inter, topk, experts)`` of the MoE models whose experts are a plain
    MLP (:data:`PLAIN_MLP_ACTIVATIONS`), from the model configs an installed
    ``aiconfigurator-core`` ships (empty without it). ``hidden`` is the config's
    ``hidden_size`` and, where it has one, its ``moe_latent_size`` (the experts of a
    latent MoE, Nemotron-3 Super and Ultra, work in that width; the database's
    tables time both)."""
    from .._model._catalog import installed_configs, read_config_file

    shapes = set()
    for path in installed_configs().values():
        c = read_config_file(path)
        c = c.get("text_config", c)
        if c.get("mlp_hidden_act") not in PLAIN_MLP_ACTIVATIONS:
            continue
        experts = c.get("n_routed_experts") or c.get("num_experts")
        inter, topk = c.get("moe_intermediate_size"), c.get("num_experts_per_tok")
        if not (experts and inter and topk):
            continue
        for hidden in (c.get("hidden_size"), c.get("moe_latent_size")):
            if hidden:
                shapes.add((int(hidden), int(inter), int(topk), int(experts)))
    return frozenset(shapes)


# aiconfigurator's older vLLM collector (``kernel_source`` ``vllm_fused_moe``, the
# vLLM 0.14.0 tables of A100 and H100) timed every shape with vLLM's default gated
# activation: fitted on all rows, its Nemotron rows fit as gated (H100: 13.6%
# in-sample MAPE against 17.9% as plain MLPs; A100 likewise), the newer tables' as
# plain.
GATED_COLLECTORS = ("vllm_fused_moe",)


def moe_up_projections(table: pd.DataFrame) -> np.ndarray:
    """Per MoE row, the experts' projections before their activation: the row's
    ``up_projections`` column where the table has one (1 or 2), else 1 for the
    shapes of :func:`plain_moe_shapes` and 2 (gate and up) for every other, and 2
    for rows of :data:`GATED_COLLECTORS`. ``ValueError`` naming the column for any
    other value."""
    if "up_projections" in table:
        up = table["up_projections"].to_numpy(float)
        if not np.isin(up, (1.0, 2.0)).all():
            raise ValueError(
                "column 'up_projections' must be 1 (plain MLP) or 2 (gated MLP); "
                f"got {sorted(set(up[~np.isin(up, (1.0, 2.0))].tolist()))[:5]}"
            )
        return up
    plain = plain_moe_shapes()
    shape = ("hidden_size", "inter_size", "topk", "num_experts")
    keys = zip(*(table[c].to_numpy(int) for c in shape), strict=True)
    up = np.array([1.0 if k in plain else 2.0 for k in keys])
    if "kernel_source" in table:
        up[table["kernel_source"].isin(GATED_COLLECTORS).to_numpy()] = 2.0
    return up


class ExpertLoads(eqx.Module):
    """What a skewed routing gives the GPU measured (arrays, one per kernel).

    Attributes:
        touched: local experts that receive at least one slot.
        tiles_small, tiles_large: token tiles ``sum_j ceil(n_j / BM)`` over the local
            experts' slots ``n_j`` at the small and large default ``BM``
            (:data:`MOE_DEFAULT_TILES`).
        tiles_own: optional token tiles at the measured kernel's own rows
            (:func:`moe_block_m`); where given, they are the ones counted.
    """

    touched: Float[Array, "*n"]
    tiles_small: Float[Array, "*n"]
    tiles_large: Float[Array, "*n"]
    tiles_own: Float[Array, "*n"] | None = None


def power_law_loads(tokens, n_experts, top_k, ep, alpha, block_m=None) -> ExpertLoads:
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

    ``block_m`` (per row, optional): the measured kernel's tile rows
    (:func:`moe_block_m`), for ``tiles_own``.
    """
    t, e, k, ep, a = (
        np.broadcast_to(np.asarray(x, float), np.shape(tokens))
        for x in (tokens, n_experts, top_k, ep, alpha)
    )
    own = np.broadcast_to(
        np.asarray(0.0 if block_m is None else block_m, float), np.shape(tokens)
    )
    out = np.zeros((4, t.size))
    (bm_s, _), (bm_l, _) = MOE_DEFAULT_TILES
    for i, (ti, ei, ki, pi, ai, oi) in enumerate(
        zip(
            *(x.ravel() for x in (t, e, k, ep, a, own)),
            strict=True,
        )
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
        out[:, i] = (
            (n >= 1).sum(),
            np.ceil(n / bm_s).sum(),
            np.ceil(n / bm_l).sum(),
            np.ceil(n / oi).sum() if block_m is not None else 0.0,
        )
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
    local_only: ArrayLike = 0.0,
    compute_bytes: ArrayLike | None = None,
    up_projections: ArrayLike = 2.0,
    width_align: ArrayLike = 0.0,
    tile_rule: ArrayLike = TILE_DEFAULT,
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
    ``moe_work`` counts ``3 F/tp``). Every kernel also makes a pass over all ``T k``
    routed slots outside its GEMMs, serially: the ``[T, k, H]`` down output read
    back by the sum over the ``k`` slots (Triton), or FlashInfer's expand and
    finalize of the slots; ``pre_bytes = T k H act_bytes``, timed on the family's
    prologue curve (``experiments/gpus.py``, held-out shapes, median over the GPUs:
    FP8 experts 20.0% inside the maximum, 15.1% apart; MXFP4 22.9 and 17.7%;
    16-bit 18.1 and 18.7%). ``compute_bytes`` (default
    ``weight_bytes``) is the operand width of the tensor cores: 1 the FP8 peak, 2 the
    16-bit one (weight-only 4-bit experts, MXFP4 W4A16, read ``weight_bytes`` per
    weight and compute at the 16-bit peak).

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

    ``local_only`` (1 or 0 per kernel): kernels that take only this GPU's experts
    and their tokens (FlashInfer's TRT-LLM and CUTLASS MoE, Marlin: the dispatch
    happens outside them) neither zero-fill the other GPUs' slots nor schedule a
    grid over the global experts, and fuse the gated activation into the gate+up
    GEMM's epilogue: their activations are the local slots' without the unfused
    intermediate, and their blocks ``(T k/ep / 64 + E/ep) ceil(2 F/tp / 128)``. 0
    is vLLM's Triton kernel.

    ``up_projections`` (per kernel): the experts' projections before their
    activation, 2 for a gated MLP (gate and up, the default), 1 for a plain one
    (Nemotron-H's squared ReLU; :func:`moe_up_projections`): weights, FLOPs, the
    intermediate and the gate+up GEMM's tiles count ``up_projections F/tp`` columns
    where a gated MLP counts ``2 F/tp``.

    ``width_align`` (per kernel, 0: none): the multiple the kernel pads this GPU's
    expert width ``F/tp`` and the hidden size ``H`` to, computed over the padding
    (:data:`MXFP4_PAD` for FlashInfer's MXFP4 MoE: gpt-oss's 2880 -> 3072, its
    width at TP 32, 90 -> 256).
    """
    ep, tokens = jnp.asarray(ep), jnp.asarray(tokens)
    top_k, n_experts = jnp.asarray(top_k), jnp.asarray(n_experts)
    e_local, k_local = n_experts / ep, top_k / ep
    f_local = _round_up(jnp.asarray(inter) / tp, width_align)
    hidden = _round_up(jnp.asarray(hidden, float), width_align)
    up = jnp.asarray(up_projections, float)
    work = (tokens, hidden, f_local, e_local, k_local)
    f, b = moe_work(*work, weight_bytes, act_bytes, routing, up)
    _, acts_local = moe_work(*work, 0.0, act_bytes, routing, up)
    _, acts_all = moe_work(
        tokens, hidden, f_local, n_experts, top_k, 0.0, act_bytes, routing, up
    )
    unfused = tokens * top_k * (up + 1.0) * f_local * act_bytes
    # The pass over every routed slot outside the grouped GEMMs (the sum of each
    # token's k outputs; FlashInfer's expand and finalize): a kernel of its own,
    # serial with them, so timed on its own (``KernelWork.pre_bytes``).
    slot_pass = tokens * top_k * jnp.asarray(hidden) * act_bytes
    local = jnp.asarray(local_only, float)
    b = b + (1.0 - local) * (acts_all - acts_local + unfused)
    small = tokens <= e_local
    (_, bn_s), (_, bn_l) = MOE_DEFAULT_TILES
    bn = jnp.where(small, bn_s, bn_l)
    bm = moe_block_m(tile_rule, tokens, top_k, n_experts, ep)
    if loads is None:
        touched = touched_experts(tokens, e_local, k_local, routing)
        slots = routed_slots(tokens, k_local, touched, routing)
        per_expert = slots / jnp.where(touched > 0, touched, 1.0)
        # The tolerance keeps an exact multiple of the tile from rounding up.
        token_tiles = touched * jnp.ceil(per_expert / bm - 1e-9)
    else:
        # The weights of the experts the skewed routing touches, not routing's.
        touched = jnp.asarray(loads.touched)
        if loads.tiles_own is not None:  # counted at the kernel's own rows
            token_tiles = jnp.asarray(loads.tiles_own)
        else:
            token_tiles = jnp.where(small, loads.tiles_small, loads.tiles_large)
        w_routing = touched_experts(tokens, e_local, k_local, routing)
        slots = routed_slots(tokens, k_local, w_routing, routing)
        per_w = (up + 1.0) * jnp.asarray(hidden) * f_local * weight_bytes
        b = b + (touched - w_routing) * per_w
    f = f * token_tiles * bm / jnp.where(slots > 0, slots, 1.0)
    units = token_tiles * jnp.ceil(up * f_local / bn)
    grid_slots = jnp.where(local > 0, tokens * k_local, tokens * top_k)
    grid_experts = jnp.where(local > 0, e_local, n_experts)
    blocks = (grid_slots / MOE_TILE_M + grid_experts) * jnp.ceil(
        up * f_local / MOE_TILE_N
    )
    width = weight_bytes if compute_bytes is None else compute_bytes
    return _work(
        f,
        b,
        _peak(hw, width),
        hw,
        units,
        blocks,
        tuned,
        pre=slot_pass,
        expert_parallel=jnp.where(ep > 1.0, 1.0, 0.0),
    )


def _round_up(x: Array, align: ArrayLike) -> Array:
    """``x`` up to a multiple of ``align`` where ``align > 0``, else ``x``."""
    align = jnp.asarray(align, float)
    safe = jnp.where(align > 0, align, 1.0)
    return jnp.where(align > 0, jnp.ceil(x / safe) * safe, x)


def moe_us(
    tokens, hidden, inter, top_k, n_experts, eff: Efficiency, hw: Hardware, **kwargs
) -> Array:
    """Predicted fused MoE time, us (see :func:`moe_kernel_work`)."""
    work = moe_kernel_work(tokens, hidden, inter, top_k, n_experts, hw, **kwargs)
    return work.time_us(eff)
