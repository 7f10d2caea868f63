"""The step model: one forward pass of a serving engine, per GPU, in microseconds."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._model._arch import Architecture
from .._model._batch import BatchStats
from .._model._deployment import Deployment
from .._model._factors import Factors
from .._model._physics import (
    SHARPNESS,
    allreduce_us,
    attention_work,
    gemm_work,
    moe_work,
    roofline_us,
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
        allreduce: two tensor-parallel all-reduces per layer.
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


def linear_work(tokens, a: Architecture, t) -> tuple[Array, Array]:
    """FLOPs and bytes of all linear layers of a step of ``tokens`` tokens, per GPU.

    Per layer: the QKV, O, dense gate/up and down GEMMs, shared experts, the router
    and the routed experts (:func:`~diffmodel._physics.moe_work`), plus norms,
    residual adds, RoPE and the gated activation as activation traffic; times ``L``.
    """
    qh = a.n_heads / t
    kvh = jnp.maximum(a.n_kv_heads / t, 1.0)
    d, dh, wb, ab = a.hidden, a.head_dim, a.weight_bytes, a.act_bytes
    gemms = [
        gemm_work(tokens, (qh + 2 * kvh) * dh, d, wb, ab),  # QKV projection
        gemm_work(tokens, d, qh * dh, wb, ab),  # output projection
        gemm_work(tokens, 2 * a.ffn / t, d, wb, ab),  # dense gate and up
        gemm_work(tokens, d, a.ffn / t, wb, ab),  # dense down
        gemm_work(tokens, 2 * a.shared_ffn / t, d, wb, ab),  # shared experts
        gemm_work(tokens, d, a.shared_ffn / t, wb, ab),
        gemm_work(tokens, a.n_experts, d, wb, ab),  # router (0 when dense)
        moe_work(tokens, d, a.expert_ffn / t, a.n_experts, a.top_k, wb, ab),
    ]
    flops = sum(g[0] for g in gemms)
    bytes_ = sum(g[1] for g in gemms)
    # Norms (read+write d, twice), residual adds (3 d, twice), RoPE on Q and K,
    # and the gated activation (read 2 F', write F').
    ffn_act = (a.ffn + a.shared_ffn + a.top_k * a.expert_ffn) / t
    bytes_ = bytes_ + tokens * ab * (10 * d + 2 * (qh + kvh) * dh + 3 * ffn_act)
    return a.n_layers * flops, a.n_layers * bytes_


def check_stats(stats: BatchStats) -> BatchStats:
    """Raise on negative or NaN statistics.

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
            checked[name] = eqx.error_if(x, ~(x >= 0), what)
            continue
        values = np.asarray(x)
        bad = ~(values >= 0)
        if bad.any():
            where = np.unravel_index(int(np.flatnonzero(bad)[0]), values.shape)
            at = f" at index {tuple(int(i) for i in where)}" if values.ndim else ""
            raise ValueError(f"{what}; got {float(values[where]):g}{at}")
        checked[name] = x
    return BatchStats(**checked)


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
        stats = check_stats(stats)
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
        stats = check_stats(stats)
    parts, gate = _parts(stats, dep, factors, sharpness)
    gpu = sum(parts[c] for c in _GPU_COMPONENTS)
    return gpu * gate + parts["overhead"]


# The components a step with no tokens does not run (all but the overhead).
_GPU_COMPONENTS = COMPONENTS[:-1]


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
    L, d, dh = a.n_layers, a.hidden, a.head_dim
    qh = a.n_heads / t
    kvh = jnp.maximum(a.n_kv_heads / t, 1.0)
    wb, ab, kb = a.weight_bytes, a.act_bytes, a.kv_bytes
    gemm_peak = jnp.where(wb <= 1.0, hw.flops_8, hw.flops_16)

    lin_f, lin_b = linear_work(tokens, a, t)
    linear = roofline_us(
        lin_f, lin_b, gemm_peak, hw.hbm_bw, fa.gemm_flops, fa.mem_bw, sharpness
    )

    pf_f, pf_b = attention_work(
        stats.attn_prefill,
        stats.kv_prefill + stats.prefill_tokens,
        stats.prefill_tokens,
        qh,
        kvh,
        dh,
        kb,
        ab,
    )
    attention_prefill = roofline_us(
        L * pf_f, L * pf_b, hw.flops_16, hw.hbm_bw, fa.attn_flops, fa.attn_bw, sharpness
    )
    dec_f, dec_b = attention_work(
        stats.kv_decode, stats.kv_decode, stats.decode_tokens, qh, kvh, dh, kb, ab
    )
    attention_decode = roofline_us(
        L * dec_f,
        L * dec_b,
        hw.flops_16,
        hw.hbm_bw,
        fa.attn_flops,
        fa.attn_bw,
        sharpness,
    )
    kv_write = L * 2 * kvh * dh * kb * tokens / hw.hbm_bw * 1e6 / fa.mem_bw

    head_f, head_b = gemm_work(requests, a.vocab / t, d, wb, ab)
    head_b = head_b + requests * a.vocab / t * 4.0  # fp32 logits
    lm_head = roofline_us(
        head_f, head_b, gemm_peak, hw.hbm_bw, fa.gemm_flops, fa.mem_bw, sharpness
    )

    allreduce = (
        2
        * L
        * allreduce_us(tokens * d * ab, t, hw.link_bw, fa.comm_bw, fa.comm_latency_us)
    )
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
