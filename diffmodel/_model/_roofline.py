"""The step model: one forward pass of a serving engine, per GPU, in microseconds."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from .._model._arch import Architecture
from .._model._batch import BatchStats
from .._model._deployment import Deployment
from .._model._factors import Factors
from .._model._layers import (
    attention_dims,
    expert_split,
    gemm_input_bytes,
    indexer_projection_work,
    indexer_work,
    mla_context_work,
    projection_work,
    quant_pass_bytes,
    windowed_attention,
)
from .._model._physics import (
    SHARPNESS,
    all_to_all_us,
    allreduce_us,
    attention_work_dims,
    gemm_work,
    moe_work,
    roofline_us,
    tensor_peak,
)

COMPONENTS: tuple[str, ...] = (
    "linear",
    "attention_prefill",
    "attention_decode",
    "kv_write",
    "lm_head",
    "allreduce",
    "overhead",
)


class Breakdown(eqx.Module):
    """Time of a step by component, microseconds (arrays shaped like the steps).

    Attributes:
        linear: QKV/O projections and (dense or MoE) MLP, weights vs FLOPs.
        attention_prefill: causal attention of prefill chunks, FLOPs vs KV reads.
        attention_decode: attention of decode tokens over their contexts.
        kv_write: writing the step's new K and V into the cache.
        lm_head: logits of the last token of each request.
        allreduce: two tensor-parallel all-reduces per layer (and, with expert
            parallelism over data-parallel attention, the all-to-alls).
        overhead: host and launch overhead (per step, per layer, per request).
    """

    linear: Float[Array, "*steps"]
    attention_prefill: Float[Array, "*steps"]
    attention_decode: Float[Array, "*steps"]
    kv_write: Float[Array, "*steps"]
    lm_head: Float[Array, "*steps"]
    allreduce: Float[Array, "*steps"]
    overhead: Float[Array, "*steps"]

    @property
    def total(self) -> Float[Array, "*steps"]:
        """Predicted step time, us: the sum of the components."""
        return sum(getattr(self, c) for c in COMPONENTS)

    def as_dict(self) -> dict[str, Array]:
        """Components by name, us."""
        return {c: getattr(self, c) for c in COMPONENTS}


def linear_work(tokens, a: Architecture, t, ep=1.0) -> tuple[Array, Array]:
    """FLOPs and bytes of all linear layers of a step (:func:`linear_work_split`)."""
    flops, bytes_, _ = linear_work_split(tokens, a, t, ep)
    return flops, bytes_


def linear_work_split(tokens, a: Architecture, t, ep=1.0) -> tuple[Array, Array, Array]:
    """FLOPs and bytes of all linear layers of a step of ``tokens`` tokens, per GPU.

    Attention projections in every layer (GQA or MLA:
    :func:`~diffmodel._model._layers.projection_work`); the dense gate/up and down
    GEMMs in ``dense_layers`` layers; shared experts, the router and the
    routed experts (:func:`~diffmodel._physics.moe_work`, split by
    :func:`~diffmodel._model._layers.expert_split` under expert parallelism ``ep``)
    in ``moe_layers`` layers; plus norms, residual adds, RoPE, the gated activation
    and the activation quantization pass as activation traffic.

    Returns ``(flops, bytes, expert_flops)``: ``flops`` includes ``expert_flops``,
    which run at the experts' own tensor peak (``expert_compute_bytes``).
    """
    qh = a.n_heads / t
    kvh = jnp.maximum(a.n_kv_heads / t, 1.0)
    d, dh, wb, ab = a.hidden, a.head_dim, a.weight_bytes, a.act_bytes
    ib = gemm_input_bytes(a)
    L, n_dense, n_moe = a.n_layers, a.dense_layers, a.moe_layers
    attn_f, attn_b = projection_work(tokens, a, t)
    idx_f, idx_b = indexer_projection_work(tokens, a)
    dense = [
        gemm_work(tokens, 2 * a.ffn / t, d, wb, ib, ab),  # dense gate and up
        gemm_work(tokens, d, a.ffn / t, wb, ib, ab),  # dense down
    ]
    scale, experts, top_k, expert_ffn = expert_split(a, t, ep)
    moe_f, moe_b = moe_work(
        tokens * scale,
        d,
        expert_ffn,
        experts,
        top_k,
        a.expert_weight_bytes,
        ab,
    )
    moe_layer = [
        gemm_work(tokens, 2 * a.shared_ffn / t, d, wb, ib, ab),  # shared experts
        gemm_work(tokens, d, a.shared_ffn / t, wb, ib, ab),
        gemm_work(tokens, a.n_experts, d, wb, ab, ab),  # router (0 when dense)
    ]
    expert_flops = n_moe * moe_f
    flops = (
        L * attn_f
        + a.index_layers * idx_f
        + n_dense * sum(g[0] for g in dense)
        + n_moe * sum(g[0] for g in moe_layer)
        + expert_flops
    )
    bytes_ = (
        L * attn_b
        + a.index_layers * idx_b
        + n_dense * sum(g[1] for g in dense)
        + n_moe * (sum(g[1] for g in moe_layer) + moe_b)
    )
    # Norms (read+write d, twice), residual adds (3 d, twice), RoPE on Q and K,
    # and the gated activation (read 2 F', write F').
    moe_act = (a.shared_ffn + a.top_k * a.expert_ffn) / t
    acts = tokens * ab * (10 * d + 2 * (qh + kvh) * dh)
    act_bytes = (
        L * acts
        + n_dense * tokens * ab * 3 * (a.ffn / t)
        + n_moe * tokens * ab * 3 * moe_act
    )
    # GEMM inputs quantized: attention and MLP inputs (d each), the output
    # projection's and the down projections' inputs.
    q_in = 2 * d + qh * a.v_head_dim
    quant = quant_pass_bytes(
        tokens
        * (L * q_in + n_dense * a.ffn / t + n_moe * (a.shared_ffn / t + moe_act)),
        a,
    )
    return flops, bytes_ + act_bytes + quant, expert_flops


def check_types(stats, dep, factors) -> None:
    """``ValueError`` naming the argument that is not what the step model takes
    (an ``AttributeError`` deep inside otherwise)."""
    for name, value, cls in (
        ("stats", stats, BatchStats),
        ("dep", dep, Deployment),
        ("factors", factors, Factors),
    ):
        if not isinstance(value, cls):
            raise ValueError(
                f"{name} must be a diffmodel.{cls.__name__}, got {type(value).__name__}"
            )


def check_inputs(stats, dep, factors, sharpness) -> BatchStats:
    """The checks of ``step_time(check=True)``: argument types, statistics
    (:func:`check_stats`, whose result it returns) and sharpness."""
    check_types(stats, dep, factors)
    checked = check_stats(stats)
    check_sharpness(sharpness)
    return checked


def check_sharpness(sharpness) -> None:
    """``ValueError`` unless a concrete ``sharpness`` is a finite number >= 1 (the
    exponent ``q`` of ``(a^q + b^q)^(1/q)``: 1 adds the two times, larger ``q``
    tends to their maximum; below 1 the time is more than their sum, at 0 or NaN
    it is undefined). A traced one is not checked."""
    if isinstance(sharpness, jax.core.Tracer):
        return
    q = np.asarray(sharpness, dtype=float)
    if not (np.all(np.isfinite(q)) and np.all(q >= 1.0)):
        raise ValueError(f"sharpness must be a finite number >= 1, got {sharpness!r}")


def check_stats(stats: BatchStats) -> BatchStats:
    """Raise on negative, NaN or infinite statistics.

    Concrete arrays are checked here, before any tracing: a one-line ``ValueError``
    naming the field, the first bad index and its value. Traced arrays (under
    ``jit``, ``grad``, ``vmap``) are checked by ``eqx.error_if`` when the computation
    runs.
    """
    checked = {}
    for name in BatchStats.__dataclass_fields__:
        x = getattr(stats, name)
        what = f"BatchStats.{name} must be finite and >= 0 (tokens/requests)"
        if isinstance(x, jax.core.Tracer):
            checked[name] = eqx.error_if(x, ~((x >= 0) & jnp.isfinite(x)), what)
            continue
        values = np.asarray(x)
        bad = ~((values >= 0) & np.isfinite(values))
        if bad.any():
            where = np.unravel_index(int(np.flatnonzero(bad)[0]), values.shape)
            at = f" at index {tuple(int(i) for i in where)}" if values.ndim else ""
            raise ValueError(f"{what}; got {float(values[where]):g}{at}")
        checked[name] = x
    _check_consistent(stats)
    return BatchStats(**checked)


_RULES = (
    ("prefill_tokens", "num_prefill", "prefill tokens need a prefill request"),
    ("decode_tokens", "num_decode", "decode tokens need a decoding request"),
    ("kv_decode", "num_decode", "decode attention reads KV of decoding requests"),
    ("attn_prefill", "prefill_tokens", "prefill attention work needs prefill tokens"),
    ("kv_prefill", "num_prefill", "cached prefill KV needs a prefill request"),
)
"""``(a, b, why)``: a step with ``a > 0`` needs ``b > 0`` (a trace's KV gauge counts
every running request's cache: ``stats_from_frame`` takes it as 0 in steps without a
decoding request). Fewer tokens than requests is allowed here (a relaxed or
finite-differenced step passes through it); trace frames refuse it
(``diffmodel._frame.check_batch``)."""


def _check_consistent(stats: BatchStats) -> None:
    """Raise where concrete statistics contradict each other (:data:`_RULES`),
    naming both fields, their values and the first index. Traced statistics (a
    relaxed scheduler's, under ``jit``) are not checked here."""
    fields = [getattr(stats, n) for n in BatchStats.__dataclass_fields__]
    if any(isinstance(x, jax.core.Tracer) for x in fields):
        return
    values = dict(
        zip(
            BatchStats.__dataclass_fields__,
            np.broadcast_arrays(*map(np.asarray, fields)),
            strict=True,
        )
    )
    for a, b, why in _RULES:
        x, y = values[a], values[b]
        bad = (x > 0) & ~(y > 0)
        if bad.any():
            where = np.unravel_index(int(np.flatnonzero(bad)[0]), bad.shape)
            at = f" at index {tuple(int(i) for i in where)}" if bad.ndim else ""
            raise ValueError(
                f"BatchStats contradict each other{at}: {a} is "
                f"{float(x[where]):g} but {b} is {float(y[where]):g} ({why})"
            )


def step_time(
    stats: BatchStats,
    dep: Deployment,
    factors: Factors,
    *,
    sharpness: float = SHARPNESS,
    check: bool = True,
) -> Breakdown:
    """Roofline time of one step, per GPU, by component, in microseconds.

    Written for one step; every operation is elementwise, so arrays of steps (with a
    per-step :class:`Deployment` from :meth:`Deployment.take` and per-step or shared
    :class:`Factors`) broadcast, and ``jax.vmap`` gives the same result.

    Per GPU with tensor-parallel degree ``t``: query heads ``H/t``, KV heads
    ``max(Hkv/t, 1)`` (vLLM replicates KV heads when ``t > Hkv``), FFN ``F/t``.
    Each operator is ``smooth_max(f / (peak eta_f), b / (bw eta_b))``:

    - linear: per layer the QKV, O, gate/up and down GEMMs of ``T`` tokens (FP8 peak
      when weights are 1 byte), MoE experts by :func:`~diffmodel._physics.moe_work`,
      plus norms, residual adds and RoPE as activation traffic;
    - prefill attention: ``f = 4 L (H/t) dh A_pf``, KV read ``K_pf + P``;
    - decode attention: ``f = 4 L (H/t) dh K_dec``, KV read ``K_dec``;
    - KV write: ``2 L (Hkv/t) dh kv_bytes T`` bytes at ``mem_bw``;
    - LM head: a ``[Np + Nd, d] @ [d, V/t]`` GEMM and fp32 logits;
    - all-reduce: ``2 L`` ring all-reduces of ``T d`` activations (zero at ``t = 1``);
    - overhead: ``step + L layer + (Np + Nd) request``.

    These are the GQA forms; the same components cover MLA (latent cache ``c + r``
    per token, absorbed decode, :mod:`~diffmodel._model._layers`), first-k dense and
    shared-expert layers, sliding-window and DSA layers, quantized GEMMs (tensor
    peak of the operand width, the activation quantization pass) and expert
    parallelism (``dep.ep``; its all-to-alls are part of ``allreduce``).

    A step with no tokens runs no forward pass: only the per-step and per-request
    overhead remains. Between 0 and 1 token (a relaxed, fractional batch, as a
    scheduler tuned by gradients sees it) the forward pass is scaled by the token
    count: every GPU component and the per-layer overhead are multiplied by the
    *idle gate* ``min(T, 1)``. Whole token counts are unaffected (the gate is 0 or
    1), the time is continuous in ``T``, and ``jax.grad`` at ``T = 0`` sees the cost
    of starting a forward pass (not 0 or the slope of a step already running).

    Bad statistics (negative, NaN) raise a one-line ``ValueError`` when they are
    concrete arrays; under tracing they raise through ``eqx.error_if`` (use
    ``eqx.filter_jit`` rather than ``jax.jit`` for a readable message).
    """
    if check:
        stats = check_inputs(stats, dep, factors, sharpness)
    parts, gate = _parts(stats, dep, factors, sharpness)
    shape = jnp.shape(parts["linear"])
    return Breakdown(
        **{c: parts[c] * gate for c in _GPU_COMPONENTS},
        overhead=jnp.broadcast_to(parts["overhead"], shape),
    )


def step_total(
    stats: BatchStats,
    dep: Deployment,
    factors: Factors,
    *,
    sharpness: float = SHARPNESS,
    check: bool = True,
) -> Array:
    """``step_time(...).total``, us, with one ``where`` for the idle steps.

    The same value for whole token counts: the GPU components are multiplied by
    the idle gate together rather than one by one, which saves work in bulk.
    """
    if check:
        stats = check_inputs(stats, dep, factors, sharpness)
    parts, gate = _parts(stats, dep, factors, sharpness)
    gpu = sum(parts[c] for c in _GPU_COMPONENTS)
    return gpu * gate + parts["overhead"]


# The components a step with no tokens does not run (all but the overhead).
_GPU_COMPONENTS = COMPONENTS[:-1]


def lm_head_us(rows, dep: Deployment, fa: Factors, sharpness: float = SHARPNESS):
    """LM head of ``rows`` logit rows (one per request; ``K + 1`` per request when
    verifying ``K`` speculative tokens), us: a ``[rows, d] @ [d, V/t]`` GEMM and
    fp32 logits, on the FP8 peak when the head's weights are 1 byte."""
    a, hw, t = dep.arch, dep.hw, dep.tp
    head_bytes = a.head_weight_bytes
    head_peak = jnp.where(head_bytes <= 1.0, hw.flops_8, hw.flops_16)
    head_f, head_b = gemm_work(rows, a.vocab / t, a.hidden, head_bytes, a.act_bytes)
    head_b = head_b + rows * a.vocab / t * 4.0  # fp32 logits
    return roofline_us(
        head_f, head_b, head_peak, hw.hbm_bw, fa.gemm_flops, fa.mem_bw, sharpness
    )


def decode_attention_us(
    stats: BatchStats,
    dep: Deployment,
    fa: Factors,
    sharpness: float = SHARPNESS,
    queries: ArrayLike = 1.0,
) -> Array:
    """Decode attention of a step, us, with ``q = queries`` query tokens per request.

    Pairs ``q K_dec + Nd q (q - 1) / 2`` (query ``j`` also sees the ``j`` tokens
    before it), KV read once per request, ``K_dec + Nd (q - 1)``; ``q = 1`` is plain
    decoding, ``q = k + 1`` the verify of ``k`` speculative tokens. Full layers read
    the whole context, the ``window_layers`` at most ``W`` (+ sinks) per request.
    """
    a, t, ab, kb = dep.arch, dep.tp, dep.arch.act_bytes, dep.arch.kv_bytes
    dims = attention_dims(a, t)
    q = jnp.asarray(queries)
    nd, kd = stats.num_decode, stats.kv_decode
    extra = nd * (q - 1.0)
    _, _, w_dec, w_read = windowed_attention(stats, a.window, a.sink_tokens)
    new = stats.decode_tokens * q
    dec = (dims.decode_qk, dims.decode_v, dims.kv_width, kb, ab)
    f, b = attention_work_dims(
        q * kd + 0.5 * q * extra, kd + extra, new, dims.q_heads, *dec
    )
    fw, bw = attention_work_dims(
        q * w_dec + 0.5 * q * extra, w_read + extra, new, dims.q_heads, *dec
    )
    ix_f, ix_b = indexer_work(q * kd + 0.5 * q * extra, kd + extra, new, a)
    n_win = a.window_layers
    n_full = a.n_layers - n_win
    return roofline_us(
        n_full * f + n_win * fw + a.index_layers * ix_f,
        n_full * b + n_win * bw + a.index_layers * ix_b,
        dep.hw.flops_16,
        dep.hw.hbm_bw,
        fa.attn_flops,
        fa.attn_bw,
        sharpness,
    )


def expert_all_to_all_us(tokens, a: Architecture, dep: Deployment, fa: Factors):
    """Expert-parallel dispatch and combine of a step, us (0 unless ``ep > tp``).

    With data-parallel attention (``ep > t``) each MoE layer sends every token's
    hidden state to its ``k`` experts and back: two all-to-alls over the ``ep``
    GPUs of ``T k d`` elements each (dispatch at the GEMM operand width, combine in
    16 bits), at the link bandwidth and latency of the all-reduce factors.
    """
    ep, t = dep.ep, dep.tp
    elems = tokens * a.top_k * a.hidden
    n = jnp.where(ep > t, ep, 1.0)
    bw, eta, lat = dep.hw.link_bw, fa.comm_bw, fa.comm_latency_us
    dispatch = all_to_all_us(elems * gemm_input_bytes(a), n, bw, eta, lat)
    combine = all_to_all_us(elems * a.act_bytes, n, bw, eta, lat)
    return a.moe_layers * (dispatch + combine)


def _parts(stats, dep, factors, sharpness) -> tuple[dict[str, Array], Array]:
    """The components of :func:`step_time`, GPU ones not yet gated for idle steps,
    and the idle gate ``min(T, 1)``: 0 for a step without tokens, 1 for one that runs
    a forward pass, linear in between (a documented relaxation, see step_time)."""
    a, hw, t, fa = dep.arch, dep.hw, dep.tp, factors
    tokens = stats.tokens
    requests = stats.requests
    # ``where`` rather than ``minimum``: at T = 1 the gradient is the running
    # step's (``minimum`` would split the tie and add half a forward pass).
    gate = jnp.where(tokens >= 1.0, 1.0, tokens)
    L, d = a.n_layers, a.hidden
    ab, kb = a.act_bytes, a.kv_bytes
    ep = dep.ep
    dense_peak = tensor_peak(a.compute_bytes, hw.flops_16, hw.flops_8, hw.flops_4)
    expert_peak = tensor_peak(
        a.expert_compute_bytes, hw.flops_16, hw.flops_8, hw.flops_4
    )

    lin_f, lin_b, exp_f = linear_work_split(tokens, a, t, ep)
    # Expert FLOPs as FLOPs at the dense peak, so one roofline serves both.
    lin_f = lin_f + exp_f * (dense_peak / expert_peak - 1.0)
    linear = roofline_us(
        lin_f, lin_b, dense_peak, hw.hbm_bw, fa.gemm_flops, fa.mem_bw, sharpness
    )

    dims = attention_dims(a, t)
    qh, kvw = dims.q_heads, dims.kv_width
    n_win = a.window_layers
    n_full = L - n_win
    w_pf, w_pf_read, _, _ = windowed_attention(stats, a.window, a.sink_tokens)
    pf = (dims.prefill_qk, dims.prefill_v, kvw, kb, ab)
    pf_f, pf_b = attention_work_dims(
        stats.attn_prefill,
        stats.kv_prefill + stats.prefill_tokens,
        stats.prefill_tokens,
        qh,
        *pf,
    )
    pfw_f, pfw_b = attention_work_dims(w_pf, w_pf_read, stats.prefill_tokens, qh, *pf)
    up_f, up_b = mla_context_work(stats.kv_prefill, a, t)
    ix_f, ix_b = indexer_work(
        stats.attn_prefill,
        stats.kv_prefill + stats.prefill_tokens,
        stats.prefill_tokens,
        a,
    )
    attention_prefill = roofline_us(
        n_full * pf_f + n_win * pfw_f + L * up_f + a.index_layers * ix_f,
        n_full * pf_b + n_win * pfw_b + L * up_b + a.index_layers * ix_b,
        hw.flops_16,
        hw.hbm_bw,
        fa.attn_flops,
        fa.attn_bw,
        sharpness,
    )
    attention_decode = decode_attention_us(stats, dep, fa, sharpness)
    # Divided by the hardware rate before the efficiency (see roofline_us).
    kv_write = (
        (L * kvw * kb + a.index_layers * a.index_dim)
        * tokens
        / hw.hbm_bw
        * 1e6
        / fa.mem_bw
    )

    lm_head = lm_head_us(requests, dep, fa, sharpness)

    allreduce = (
        2
        * L
        * allreduce_us(tokens * d * ab, t, hw.link_bw, fa.comm_bw, fa.comm_latency_us)
    ) + expert_all_to_all_us(tokens, a, dep, fa)
    overhead = (
        fa.step_overhead_us
        + L * fa.layer_overhead_us * gate
        + requests * fa.request_overhead_us
    )

    parts = {
        "linear": linear,
        "attention_prefill": attention_prefill,
        "attention_decode": attention_decode,
        "kv_write": kv_write,
        "lm_head": lm_head,
        "allreduce": allreduce,
        "overhead": overhead,
    }
    return parts, gate


def step_time_batch(
    stats: BatchStats,
    deployments: Deployment,
    group: jax.Array,
    factors: Factors,
    **kwargs,
) -> Breakdown:
    """Many steps from several deployments: ``deployments`` stacked, ``group`` per step.

    ``factors`` is shared, or per group (leading axis = groups, indexed by ``group``).
    """
    dep = deployments.take(group)
    fac = jax.tree.map(lambda x: x if jnp.ndim(x) == 0 else x[group], factors)
    return step_time(stats, dep, fac, **kwargs)
