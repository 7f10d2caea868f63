"""Operator-level physics: FLOPs, bytes and roofline times of single operators.

The single source of truth for the formulas: the step model (``_roofline``) adds these
operators up, and kernel calibration predicts measured kernels with the same functions.
All sizes are per GPU. Work is in FLOPs and bytes; times are in microseconds.
"""

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike

# Sharpness ``p`` of the smooth maximum ``(a^p + b^p)^(1/p)``: 4 overestimates an
# operator exactly at its ridge point by 2^(1/4) = 19% and by under 1% once one side
# is twice the other.
SHARPNESS = 4.0


def smooth_max(a: ArrayLike, b: ArrayLike, sharpness: float = SHARPNESS) -> Array:
    """``(a^p + b^p)^(1/p)`` for ``a, b >= 0``: a scale-free, smooth maximum.

    Evaluated as ``hi (1 + (lo / hi)^p)^(1/p)`` with ``hi = max(a, b)``, ``lo =
    min(a, b)``: the same value (it cannot overflow where ``a^p`` would), one
    division instead of two. Exact when either side is zero; gradients are finite
    everywhere, including at ``a = b = 0`` (where the value is 0). A NaN on either
    side gives NaN.

    Its derivative is written out (a ``custom_jvp``): with ``r = lo / hi`` and ``u =
    1 + r^p``, ``ds = u^(1/p) / u (dhi + r^(p-1) dlo)``, from the values the forward
    pass has already formed. Left to autodiff, the two square roots and the ratio
    each add divisions to the reverse pass; the bulk loss and gradient
    (``diffmodel._bulk._loss.bulk_value_and_grad``) ran ~15% slower.
    """
    return _smooth_max(jnp.asarray(a), jnp.asarray(b), float(sharpness))


def _ordered(a: Array, b: Array, sharpness: float):
    # One comparison orders the pair (a NaN lands in ``lo`` or ``hi`` and spreads):
    # cheaper than NaN-propagating max and min, which XLA:CPU expands into several
    # instructions each. At a tie the gradient is the same either way.
    first = a >= b
    hi, lo = jnp.where(first, a, b), jnp.where(first, b, a)
    r = lo / jnp.where(hi > 0, hi, 1.0)  # in [0, 1]; 0 where a = b = 0
    if sharpness == 4.0:  # r^4 as (r^2)^2: as ((r r) r) r, XLA:CPU fused the bulk
        r2 = r * r  # prediction's step loop into more pieces and ran it ~2x slower
        u, rp1 = 1.0 + r2 * r2, r2 * r
    else:
        rp1 = _power(r, sharpness - 1.0)
        u = 1.0 + rp1 * r
    return first, hi, u, rp1


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _smooth_max(a: Array, b: Array, sharpness: float) -> Array:
    _, hi, u, _ = _ordered(a, b, sharpness)
    return hi * _root(u, sharpness)


@_smooth_max.defjvp
def _smooth_max_jvp(sharpness, primals, tangents):
    (a, b), (da, db) = primals, tangents
    first, hi, u, rp1 = _ordered(a, b, sharpness)
    q = _root(u, sharpness)
    dhi, dlo = jnp.where(first, da, db), jnp.where(first, db, da)
    return hi * q, q / u * (dhi + rp1 * dlo)


def power_max(a: ArrayLike, b: ArrayLike, p: ArrayLike) -> Array:
    """``(a^p + b^p)^(1/p)`` for ``a, b > 0`` and a traced (fitted) ``p >= 1``:
    :func:`smooth_max` with a learnable sharpness (``p = 1``: the sum, ``p -> inf``:
    the maximum). Gradients in ``p`` stay finite where one side vanishes, and
    where both do (the value is then 0); a NaN on either side gives NaN."""
    hi, lo = jnp.maximum(a, b), jnp.minimum(a, b)
    some = hi != 0  # True for NaN: it spreads
    h = jnp.where(some, hi, 1.0)
    r = jnp.maximum(lo / h, 1e-30)
    return jnp.where(some, h * jnp.exp(jnp.log1p(jnp.exp(p * jnp.log(r))) / p), 0.0)


# XLA:CPU evaluates ``pow`` ~10x slower than ``exp``: the default sharpness 4 uses
# multiplications and square roots instead.
def _power(x: Array, p: float) -> Array:
    if p == 4.0:
        x2 = x * x
        return x2 * x2
    return x**p


def _root(x: Array, p: float) -> Array:
    if p == 4.0:
        return jnp.sqrt(jnp.sqrt(x))
    return x ** (1.0 / p)


def roofline_us(
    flops: ArrayLike,
    bytes_: ArrayLike,
    peak_flops: ArrayLike,
    bandwidth: ArrayLike,
    eta_flops: ArrayLike,
    eta_bw: ArrayLike,
    sharpness: float = SHARPNESS,
) -> Array:
    """Time of one operator, us: ``smooth_max(f / (peak eta_f), b / (bw eta_b))``.

    Args:
        flops: floating-point operations.
        bytes_: bytes moved to or from device memory.
        peak_flops: FLOP/s; bandwidth: bytes/s; eta_*: efficiencies in (0, 1].
    """
    # Work over the hardware's rate first, then the efficiency: dividing by
    # ``peak eta`` would put ``(peak eta)^3 ~ 1e45`` into the second derivative in
    # ``eta`` and overflow float32 (float32 Hessians were wrong by 40%).
    compute = flops / peak_flops * 1e6 / eta_flops
    memory = bytes_ / bandwidth * 1e6 / eta_bw
    return smooth_max(compute, memory, sharpness)


def gemm_work(
    m: ArrayLike,
    n: ArrayLike,
    k: ArrayLike,
    weight_bytes: ArrayLike = 2.0,
    act_bytes: ArrayLike = 2.0,
    out_bytes: ArrayLike | None = None,
) -> tuple[Array, Array]:
    """FLOPs and bytes of ``[m, k] @ [k, n]`` with an ``[k, n]`` weight.

    ``f = 2 m n k``; ``b = k n weight_bytes + m k act_bytes + m n out_bytes`` (bytes
    per element; ``out_bytes`` defaults to ``act_bytes``: an FP8 GEMM reads 1-byte
    operands but writes a 16-bit output, ``out_bytes = 2``).
    """
    m, n, k = jnp.asarray(m), jnp.asarray(n), jnp.asarray(k)
    ob = act_bytes if out_bytes is None else out_bytes
    return 2.0 * m * n * k, k * n * weight_bytes + m * k * act_bytes + m * n * ob


def act_quant_bytes(
    m: ArrayLike,
    k: ArrayLike,
    act_bytes: ArrayLike = 2.0,
    quant_bytes: ArrayLike = 1.0,
    passes: ArrayLike = 2.0,
) -> Array:
    """HBM bytes of dynamically quantizing an ``[m, k]`` activation, unfused.

    ``m k (passes act_bytes + quant_bytes)``. Per-tensor FP8 takes two passes: one
    reads the activation for its absolute maximum (the tensor's scale), a second
    reads it again and writes the quantized copy (``act_bytes``: 2 for bf16;
    ``quant_bytes``: 1 for FP8). Group-scaled formats take one: NVFP4 reads the
    activation once and writes 4-bit values with an FP8 scale per 16
    (``passes=1``, ``quant_bytes=NVFP4_BYTES``).
    """
    m, k = jnp.asarray(m), jnp.asarray(k)
    return m * k * (passes * act_bytes + quant_bytes)


NVFP4_BYTES = 0.5 + 1.0 / 16
"""Bytes per NVFP4 element: 4 bits and an FP8 (E4M3) scale per 16 elements."""

MXFP4_BYTES = 0.5 + 1.0 / 32
"""Bytes per MXFP4 element: 4 bits and an 8-bit (E8M0) scale per 32 elements."""


def gemm_act_quant_bytes(m: ArrayLike, k: ArrayLike, compute_bytes: ArrayLike) -> Array:
    """:func:`act_quant_bytes` of a GEMM's bf16 activation quantized to its operand
    width: two passes to per-tensor FP8 (``compute_bytes`` 1), one to NVFP4 (0.5)."""
    fp4 = jnp.asarray(compute_bytes) < 1.0
    return jnp.where(
        fp4,
        act_quant_bytes(m, k, quant_bytes=NVFP4_BYTES, passes=1.0),
        act_quant_bytes(m, k),
    )


def expected_experts(
    tokens: ArrayLike, n_experts: ArrayLike, top_k: ArrayLike
) -> Array:
    """Expected distinct experts touched by ``tokens`` tokens routed top-``k`` of ``E``.

    ``E (1 - (1 - k/E)^T)`` under uniform independent routing; 0 for a dense model
    (``E = 0``). Each token touches exactly ``k`` experts, so 1 token gives ``k`` and
    many tokens give ``E``.
    """
    t, e, k = jnp.asarray(tokens), jnp.asarray(n_experts), jnp.asarray(top_k)
    moe = e > 0
    base = 1.0 - k / jnp.where(moe, e, 1.0)
    pos = base > 0
    # (1 - k/E)^T as exp(T log(1 - k/E)); exactly 0 or 1 when every expert is chosen.
    miss = jnp.where(
        pos, jnp.exp(t * jnp.log(jnp.where(pos, base, 1.0))), jnp.where(t > 0, 0.0, 1.0)
    )
    return jnp.where(moe, e * (1.0 - miss), 0.0)


def balanced_experts(
    tokens: ArrayLike, n_experts: ArrayLike, top_k: ArrayLike
) -> Array:
    """Distinct experts touched by ``tokens`` tokens under balanced routing.

    Balanced (round-robin) routing spreads the ``T k`` routed slots evenly over the
    experts, starting at expert 0, so ``min(ceil(T k), E)`` experts are touched: the
    ``T k`` slots while they are fewer than the experts, all ``E`` after. With a
    fractional top-k (``k / ep``: the experts of one of ``ep`` GPUs, the first one
    being the block that holds expert 0) at least one expert is touched once a token
    is routed. 0 for a dense model (``E = 0``) or no tokens.
    """
    t, e, k = jnp.asarray(tokens), jnp.asarray(n_experts), jnp.asarray(top_k)
    # The tolerance keeps an exact integer T k (e.g. 16384 * 8 / 256) from rounding up.
    return jnp.minimum(jnp.ceil(t * k - 1e-9), e).clip(0.0)


ROUTINGS = ("uniform", "balanced")


def touched_experts(
    tokens: ArrayLike,
    n_experts: ArrayLike,
    top_k: ArrayLike,
    routing: str = "uniform",
) -> Array:
    """Distinct experts touched: :func:`expected_experts` under ``"uniform"`` random
    routing (a served model), :func:`balanced_experts` under ``"balanced"``."""
    if routing == "uniform":
        return expected_experts(tokens, n_experts, top_k)
    if routing == "balanced":
        return balanced_experts(tokens, n_experts, top_k)
    raise ValueError(f"routing must be one of {list(ROUTINGS)}, got {routing!r}")


def routed_slots(
    tokens: ArrayLike, top_k: ArrayLike, touched: ArrayLike, routing: str = "uniform"
) -> Array:
    """(token, expert) slots an MoE layer computes: ``T k``, and under balanced
    routing at least one per touched expert (a fractional top-k can touch more
    experts than it routes slots, by the ceiling of :func:`balanced_experts`).

    Under uniform routing ``E (1 - (1 - k/E)^T) <= T k`` already, so no floor is
    taken and the per-step model stays affine in ``T`` (cheaper in bulk, see
    ``diffmodel._bulk``).
    """
    slots = jnp.asarray(tokens) * top_k
    return jnp.maximum(slots, touched) if routing == "balanced" else slots


def moe_work(
    tokens: ArrayLike,
    hidden: ArrayLike,
    expert_ffn: ArrayLike,
    n_experts: ArrayLike,
    top_k: ArrayLike,
    weight_bytes: ArrayLike = 2.0,
    act_bytes: ArrayLike = 2.0,
    routing: str = "uniform",
    up_projections: ArrayLike = 2.0,
) -> tuple[Array, Array]:
    """FLOPs and bytes of a fused gated-MLP MoE layer (per GPU: pass ``F_e / t``).

    FLOPs count the ``k`` experts of each token (at least one slot per touched
    expert); weight bytes count the distinct experts touched (:func:`touched_experts`
    under ``routing``, ``"uniform"`` by default); activations are read once per
    (token, expert) pair and the gated intermediate written and read back.
    ``up_projections``: the expert's projections before its activation, 2 for a
    gated MLP (gate and up: ``3 H F_e`` weights), 1 for a plain one (Nemotron-H's
    squared ReLU: ``2 H F_e``).
    """
    t = jnp.asarray(tokens)
    matrices = jnp.asarray(up_projections) + 1.0
    per_expert = matrices * hidden * expert_ffn
    touched = touched_experts(t, n_experts, top_k, routing)
    flops = 2.0 * routed_slots(t, top_k, touched, routing) * per_expert
    acts = t * top_k * (2.0 * hidden + matrices * expert_ffn) + t * hidden
    return flops, touched * per_expert * weight_bytes + acts * act_bytes


def attention_work(
    pairs: ArrayLike,
    kv_read: ArrayLike,
    new_tokens: ArrayLike,
    q_heads: ArrayLike,
    kv_heads: ArrayLike,
    head_dim: ArrayLike,
    kv_bytes: ArrayLike = 2.0,
    act_bytes: ArrayLike = 2.0,
) -> tuple[Array, Array]:
    """FLOPs and bytes of one layer's attention (per GPU heads).

    Args:
        pairs: query-key pairs (``A_pf`` for prefill, ``K_dec`` for decode).
        kv_read: KV tokens read from the cache (``K_pf + P`` or ``K_dec``).
        new_tokens: query tokens (``P`` or ``D``): Q read and output written.

    ``f = 4 H dh pairs`` (QK^T and PV); ``b = 2 Hkv dh kv_bytes kv_read + 2 H dh
    act_bytes new_tokens``.
    """
    flops = 4.0 * q_heads * head_dim * pairs
    bytes_ = 2.0 * kv_heads * head_dim * kv_bytes * kv_read
    return flops, bytes_ + 2.0 * q_heads * head_dim * act_bytes * new_tokens


def allreduce_us(
    bytes_: ArrayLike,
    n_gpus: ArrayLike,
    link_bw: ArrayLike,
    eta: ArrayLike,
    latency_us: ArrayLike,
) -> Array:
    """Time of one ring all-reduce of ``bytes_`` over ``n_gpus``, us.

    ``latency + 2 (t-1)/t bytes / (link_bw eta)``; zero on one GPU.
    """
    t = jnp.asarray(n_gpus)
    ring = 2.0 * (t - 1.0) / t * bytes_ / link_bw * 1e6 / eta  # see roofline_us
    return jnp.where(t > 1, latency_us + ring, 0.0)


def attention_work_dims(
    pairs: ArrayLike,
    kv_read: ArrayLike,
    new_tokens: ArrayLike,
    q_heads: ArrayLike,
    qk_dim: ArrayLike,
    v_dim: ArrayLike,
    kv_width: ArrayLike,
    kv_bytes: ArrayLike = 2.0,
    act_bytes: ArrayLike = 2.0,
) -> tuple[Array, Array]:
    """FLOPs and bytes of one layer's attention with separate query-key and value
    sizes and a cache of ``kv_width`` elements per token (per GPU).

    ``f = 2 H (qk + v) pairs``; ``b = kv_width kv_bytes kv_read + H (qk + v)
    act_bytes new_tokens``. GQA is ``qk = v = dh``, ``kv_width = 2 Hkv dh`` (then
    equal to :func:`attention_work`); absorbed MLA decode is ``qk = c + r``, ``v =
    c``, ``kv_width = c + r`` (one latent shared by all heads).
    """
    width = jnp.asarray(q_heads) * (jnp.asarray(qk_dim) + v_dim)
    flops = 2.0 * width * pairs
    kv = jnp.asarray(kv_width) * kv_bytes * kv_read
    return flops, kv + width * act_bytes * new_tokens


def tensor_peak(
    compute_bytes: ArrayLike,
    flops_16: ArrayLike,
    flops_8: ArrayLike,
    flops_4: ArrayLike,
):
    """Tensor-core peak for operands of ``compute_bytes`` bytes, FLOP/s: the 16-bit
    peak above 1 byte, the FP8 peak above 0.5, else the FP4 peak (which
    :class:`~diffmodel.Hardware` sets to the FP8 peak on GPUs without FP4 tensor
    cores)."""
    cb = jnp.asarray(compute_bytes)
    return jnp.where(cb > 1.0, flops_16, jnp.where(cb > 0.5, flops_8, flops_4))


def all_to_all_us(
    bytes_: ArrayLike,
    n_gpus: ArrayLike,
    link_bw: ArrayLike,
    eta: ArrayLike,
    latency_us: ArrayLike,
) -> Array:
    """Time of one all-to-all in which each GPU holds ``bytes_`` for all ``n_gpus``, us.

    ``latency + (n-1)/n bytes / (link_bw eta)``: the share bound for other GPUs
    leaves over the GPU's link; zero on one GPU.
    """
    n = jnp.asarray(n_gpus)
    wire = (n - 1.0) / n * bytes_ / link_bw * 1e6 / eta  # see roofline_us
    return jnp.where(n > 1, latency_us + wire, 0.0)
