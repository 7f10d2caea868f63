"""Serving features built on the step model: speculative decoding, prefix caching
and pipeline parallelism.

Each is a transform of the batch statistics or of the deployment followed by the
ordinary :func:`~diffmodel._model._roofline.step_time`, so the physics stays in one
place and every feature is array data (differentiable, one compiled function).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from .._model._arch import Architecture
from .._model._batch import BatchStats
from .._model._deployment import Deployment
from .._model._factors import Factors
from .._model._roofline import (
    COMPONENTS,
    Breakdown,
    check_stats,
    decode_attention_us,
    lm_head_us,
    step_time,
)

_GPU = COMPONENTS[:-1]  # all but the host overhead


def _gpu_us(b: Breakdown) -> Array:
    return sum(getattr(b, c) for c in _GPU)


# ----------------------------------------------------------------- speculative decoding


def speculative_stats(stats: BatchStats, k: ArrayLike) -> BatchStats:
    """The verify step's statistics with ``k`` draft tokens per decoding request.

    Each of the ``Nd`` decoding requests runs ``k + 1`` tokens (its last token and
    ``k`` drafts) through the linear layers: ``D' = D (k + 1)``. (Its attention is
    :func:`~diffmodel._model._roofline.decode_attention_us` with ``k + 1`` queries
    per request, which :func:`speculative_step` puts in.)
    """
    return eqx.tree_at(
        lambda s: s.decode_tokens, stats, stats.decode_tokens * (jnp.asarray(k) + 1.0)
    )


def mtp_draft(arch: Architecture) -> Architecture:
    """A multi-token-prediction draft: one MoE layer of ``arch`` (DeepSeek-V3's
    ``num_nextn_predict_layers = 1``), with the model's embeddings and LM head."""
    one = jnp.ones_like(arch.n_layers)
    return eqx.tree_at(
        lambda a: (a.n_layers, a.dense_layers, a.moe_layers, a.window_layers),
        arch,
        (one, jnp.zeros_like(one), one, jnp.zeros_like(one)),
    )


class SpeculativeBreakdown(eqx.Module):
    """A speculative-decoding step, us.

    Attributes:
        verify: the target model's verify step (:func:`speculative_stats`), its
            decode attention over ``k + 1`` queries and its LM head over ``k + 1``
            rows per decoding request.
        draft_us: the ``k`` sequential draft passes (GPU components only: the host's
            per-step work is counted once, in ``verify``).
    """

    verify: Breakdown
    draft_us: Float[Array, "*steps"]

    @property
    def total(self) -> Float[Array, "*steps"]:
        """Draft and verify, us."""
        return self.verify.total + self.draft_us


def speculative_step(
    stats: BatchStats,
    dep: Deployment,
    factors: Factors,
    *,
    k: ArrayLike,
    draft: Deployment,
    n_draft_steps: int,
) -> SpeculativeBreakdown:
    """One speculative-decoding step: ``k`` draft passes, then the verify.

    Args:
        stats: the step as scheduled without speculation (decodes one token each).
        dep: the target deployment; ``draft``: the draft model's (a small model, or
            :func:`mtp_draft` of the target).
        k: draft tokens per request (array: differentiable); ``n_draft_steps``: the
            same as a Python int (how many sequential draft passes run).

    Draft pass ``j`` decodes the ``Nd`` requests with ``j`` more tokens of context
    (the first also runs the step's prefill chunks through the draft model).
    """
    stats = check_stats(stats)
    q = jnp.asarray(k) + 1.0
    verify = step_time(speculative_stats(stats, k), dep, factors, check=False)
    rows = stats.num_prefill + stats.num_decode * q
    decode = decode_attention_us(stats, dep, factors, queries=q)
    decode = jnp.where(stats.tokens > 0, decode, 0.0)
    verify = eqx.tree_at(
        lambda b: (b.lm_head, b.attention_decode),
        verify,
        (jnp.where(stats.tokens > 0, lm_head_us(rows, dep, factors), 0.0), decode),
    )
    draft_us = jnp.zeros_like(verify.linear)
    for j in range(n_draft_steps):
        s = stats if j == 0 else _decode_only(stats, j)
        draft_us = draft_us + _gpu_us(step_time(s, draft, factors, check=False))
    return SpeculativeBreakdown(verify=verify, draft_us=draft_us)


def _decode_only(stats: BatchStats, extra: int) -> BatchStats:
    zero = jnp.zeros_like(stats.num_decode)
    return BatchStats(
        prefill_tokens=zero,
        decode_tokens=stats.decode_tokens,
        num_prefill=zero,
        num_decode=stats.num_decode,
        kv_decode=stats.kv_decode + extra * stats.num_decode,
        attn_prefill=zero,
        kv_prefill=zero,
    )


def accepted_tokens(k: ArrayLike, acceptance: ArrayLike) -> Array:
    """Expected tokens a request gains per speculative step, ``(1 - a^(k+1)) / (1 -
    a)`` for a per-token acceptance rate ``a`` in [0, 1) (Leviathan et al. 2023)."""
    a = jnp.asarray(acceptance)
    return (1.0 - a ** (jnp.asarray(k) + 1.0)) / (1.0 - a)


# ----------------------------------------------------------------------- prefix caching


def prefix_cached_requests(
    new_tokens: ArrayLike, context_tokens: ArrayLike, cached_tokens: ArrayLike
) -> tuple[Array, Array]:
    """Per-request ``(new_tokens, context_tokens)`` after a prefix-cache hit.

    ``h = min(cached, new - 1)`` of a chunk's prompt tokens are found in the cache
    (the last one is always computed, for its logits): they skip every GEMM and the
    KV write, and become context that attention reads. Pass the result to
    :func:`~diffmodel.from_requests`.
    """
    n, s = jnp.asarray(new_tokens, float), jnp.asarray(context_tokens, float)
    h = jnp.clip(jnp.minimum(jnp.asarray(cached_tokens, float), n - 1.0), 0.0)
    return n - h, s + h


def prefix_cached(stats: BatchStats, cached_tokens: ArrayLike) -> BatchStats:
    """Aggregate statistics after ``H`` cached prompt tokens over the prefill chunks.

    ``P -= H``, ``K_pf += H``; under the equal-chunk reading of
    :func:`~diffmodel.from_aggregates` the ``H/Np`` cached tokens of each chunk were
    its first ones, so ``A_pf -= H (K_pf + H/2) / Np``. ``H`` must stay below ``P``.
    """
    h = jnp.asarray(cached_tokens, float)
    np_ = stats.num_prefill
    safe = jnp.where(np_ > 0, np_, 1.0)
    h = eqx.error_if(h, (h < 0) | (h > stats.prefill_tokens), "0 <= cached <= P")
    removed = jnp.where(np_ > 0, h * (stats.kv_prefill + 0.5 * h) / safe, 0.0)
    return BatchStats(
        prefill_tokens=stats.prefill_tokens - h,
        decode_tokens=stats.decode_tokens,
        num_prefill=np_,
        num_decode=stats.num_decode,
        kv_decode=stats.kv_decode,
        attn_prefill=stats.attn_prefill - removed,
        kv_prefill=stats.kv_prefill + h,
    )


# ----------------------------------------------------------------- pipeline parallelism


class PipelineBreakdown(eqx.Module):
    """A pipeline-parallel step, us.

    Attributes:
        stage: one microbatch on the last (slowest: it holds the LM head) stage.
        p2p_us: sending one microbatch's activations to the next stage.
        bubble_us: ``(pp - 1)`` stage times in which some stages idle.
        overhead_us: the host's per-step work (once per step).
        microbatches: ``m``, microbatches in flight (one, or one per step).
    """

    stage: Breakdown
    p2p_us: Float[Array, "*steps"]
    bubble_us: Float[Array, "*steps"]
    overhead_us: Float[Array, "*steps"]
    microbatches: Float[Array, "..."]

    @property
    def stage_us(self) -> Float[Array, "*steps"]:
        """GPU time of one microbatch on one stage plus its send, us."""
        return _gpu_us(self.stage) + self.p2p_us

    @property
    def total(self) -> Float[Array, "*steps"]:
        """``(m + pp - 1)`` stage times and the host overhead, us."""
        return self.microbatches * self.stage_us + self.bubble_us + self.overhead_us


def pipeline_step(
    stats: BatchStats,
    dep: Deployment,
    factors: Factors,
    *,
    pp: ArrayLike,
    microbatches: ArrayLike | None = None,
) -> PipelineBreakdown:
    """A step over ``pp`` pipeline stages (each ``t``-way tensor parallel).

    The batch is split into ``m`` equal microbatches (default ``m = pp``, vLLM's
    virtual engines); a stage holds ``L/pp`` layers (dense, MoE and windowed layers
    in proportion). A microbatch's stage time is the step model's GPU time of
    ``stats/m`` on those layers plus the point-to-point send of its ``T/m d``
    activations (latency and link bandwidth of the all-reduce factors); the step
    takes ``m + pp - 1`` stage times, ``pp - 1`` of them bubble.
    """
    stats = check_stats(stats)
    p = jnp.asarray(pp, float)
    m = p if microbatches is None else jnp.asarray(microbatches, float)
    a = dep.arch
    stage_arch = eqx.tree_at(
        lambda x: (x.n_layers, x.dense_layers, x.moe_layers, x.window_layers),
        a,
        (a.n_layers / p, a.dense_layers / p, a.moe_layers / p, a.window_layers / p),
    )
    stage_dep = eqx.tree_at(lambda d: d.arch, dep, stage_arch)
    micro = jax.tree.map(lambda x: x / m, stats)
    stage = step_time(micro, stage_dep, factors, check=False)
    full = step_time(stats, dep, factors, check=False)
    send = micro.tokens * a.hidden * a.act_bytes / (dep.hw.link_bw * factors.comm_bw)
    p2p = jnp.where(p > 1, factors.comm_latency_us + send * 1e6, 0.0)
    p2p = jnp.where(micro.tokens > 0, p2p, 0.0)
    stage_us = _gpu_us(stage) + p2p
    return PipelineBreakdown(
        stage=stage,
        p2p_us=p2p,
        bubble_us=(p - 1.0) * stage_us,
        overhead_us=full.overhead,
        microbatches=m,
    )
