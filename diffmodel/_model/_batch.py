"""Sufficient statistics of a batch: what the roofline needs to know about a step."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float

from .._arrays import device_array, on_host

# vLLM's default KV-cache block size, tokens per block (the traces' setting).
VLLM_BLOCK_SIZE = 16


class BatchStats(eqx.Module):
    """The sufficient statistics of one step (or, with a leading axis, of many).

    Attributes:
        prefill_tokens: ``P``, new prompt tokens this step, tokens.
        decode_tokens: ``D``, decode tokens this step (one per decoding request).
        num_prefill: ``Np``, requests with a prefill chunk this step.
        num_decode: ``Nd``, decoding requests this step.
        kv_decode: ``K_dec``, sum of context lengths of decoding requests: KV tokens
            read by decode attention.
        attn_prefill: ``A_pf``, sum over prefill chunks of ``n * (s + n/2)`` for a
            chunk of ``n`` new tokens after ``s`` cached ones: causal attention work,
            token pairs.
        kv_prefill: ``K_pf``, sum of ``s`` over prefill chunks: cached KV tokens read
            by prefill attention.
    """

    prefill_tokens: Float[ArrayLike, "*steps"]
    decode_tokens: Float[ArrayLike, "*steps"]
    num_prefill: Float[ArrayLike, "*steps"]
    num_decode: Float[ArrayLike, "*steps"]
    kv_decode: Float[ArrayLike, "*steps"]
    attn_prefill: Float[ArrayLike, "*steps"]
    kv_prefill: Float[ArrayLike, "*steps"]

    @property
    def tokens(self) -> Float[Array, "*steps"]:
        """``T = P + D``, tokens processed this step."""
        return self.prefill_tokens + self.decode_tokens

    @property
    def requests(self) -> Float[Array, "*steps"]:
        """``Np + Nd``, requests in the batch."""
        return self.num_prefill + self.num_decode


def _f(x: ArrayLike, name: str, xp=jnp) -> Array | np.ndarray:
    """``x`` as a float array of ``xp`` (``jnp``, or ``np`` for host values); a
    ``ValueError`` naming argument ``name`` for text, booleans or other values that
    are not numbers."""
    if isinstance(x, jax.core.Tracer):
        return jnp.asarray(x, dtype=jnp.result_type(float))
    a = np.asarray(x)
    if a.dtype.kind not in "fiu":
        raise ValueError(
            f"{name} must be numbers (tokens or requests), got {a.dtype} values"
        )
    return xp.asarray(a, dtype=jnp.result_type(float))


def _namespace(*xs):
    """NumPy where every value is known now (the result is then moved to the device
    once, with nothing compiled: a fresh process pays no trace per operation), else
    ``jax.numpy``."""
    return np if on_host(*xs) else jnp


def _on_device(x):
    return device_array(x) if isinstance(x, np.ndarray | np.generic) else x


def from_aggregates(
    *,
    prefill_tokens: ArrayLike,
    decode_tokens: ArrayLike,
    num_prefill: ArrayLike,
    num_decode: ArrayLike,
    kv_tokens: ArrayLike,
    prefill_context_tokens: ArrayLike = 0.0,
) -> BatchStats:
    """Statistics from per-step aggregates (what aggregate traces record).

    Args:
        prefill_tokens: ``P``, tokens.
        decode_tokens: ``D``, tokens.
        num_prefill: ``Np``, requests.
        num_decode: ``Nd``, requests.
        kv_tokens: ``K_dec``, context tokens read by decode attention.
        prefill_context_tokens: ``K_pf``, tokens already cached before this step's
            prefill chunks (0 when unknown).

    Approximation: the prefill chunks are taken as equal, ``n = P/Np`` new tokens after
    ``s = K_pf/Np`` cached ones each, so ``A_pf = Np * n * (s + n/2) = P (K_pf + P/2) /
    Np``. Unequal chunks have more causal work than this (it is convex in ``n``).
    """
    xp = _namespace(
        prefill_tokens,
        decode_tokens,
        num_prefill,
        num_decode,
        kv_tokens,
        prefill_context_tokens,
    )
    p = _f(prefill_tokens, "prefill_tokens", xp)
    np_ = _f(num_prefill, "num_prefill", xp)
    k_pf = _f(prefill_context_tokens, "prefill_context_tokens", xp)
    safe_np = xp.where(np_ > 0, np_, xp.asarray(1.0, np_.dtype))
    a_pf = xp.where(np_ > 0, p * (k_pf + 0.5 * p) / safe_np, xp.zeros_like(p))
    return jax.tree.map(
        _on_device,
        BatchStats(
            prefill_tokens=p,
            decode_tokens=_f(decode_tokens, "decode_tokens", xp),
            num_prefill=np_,
            num_decode=_f(num_decode, "num_decode", xp),
            kv_decode=_f(kv_tokens, "kv_tokens", xp),
            attn_prefill=a_pf,
            kv_prefill=xp.broadcast_to(k_pf, xp.shape(a_pf)),
        ),
    )


def from_requests(
    new_tokens: Float[ArrayLike, "*steps requests"],
    context_tokens: Float[ArrayLike, "*steps requests"],
    mask: Bool[ArrayLike, "*steps requests"] | None = None,
    *,
    is_decode: Bool[ArrayLike, "*steps requests"] | None = None,
) -> BatchStats:
    """Statistics of a per-request batch (the exact form; reduces over the last axis).

    Args:
        new_tokens: tokens each request processes this step (1 for a decode).
        context_tokens: tokens already in the request's KV cache before this step.
        mask: ``True`` for real requests, ``False`` for padding (default all real).
        is_decode: which requests decode; default ``new_tokens == 1`` with a non-empty
            context (a one-token prompt chunk after nothing cached is a prefill).

    Differentiable in ``new_tokens`` and ``context_tokens`` (the decode/prefill split is
    a discrete choice and carries no gradient), so ``jax.grad`` gives each request's
    marginal cost.
    """
    terms = request_terms(new_tokens, context_tokens, mask, is_decode=is_decode)
    return BatchStats(*(x.sum(-1) for x in terms))


def request_terms(
    new_tokens: Float[ArrayLike, "*steps requests"],
    context_tokens: Float[ArrayLike, "*steps requests"],
    mask: Bool[ArrayLike, "*steps requests"] | None = None,
    *,
    is_decode: Bool[ArrayLike, "*steps requests"] | None = None,
) -> tuple[Float[Array, "*steps requests"], ...]:
    """Each request's share of every :class:`BatchStats` field, in field order.

    Arguments as :func:`from_requests`, which sums these over the last axis; the bulk
    path reduces them in one pass instead (see ``diffmodel._bulk``). Padding and the
    other kind of request contribute exactly 0.
    """
    n, s = _f(new_tokens, "new_tokens"), _f(context_tokens, "context_tokens")
    n, s = jnp.broadcast_arrays(n, s)
    m = jnp.ones(n.shape, bool) if mask is None else jnp.asarray(mask, bool)
    dec = (
        (n == 1) & (s > 0)
        if is_decode is None
        else jnp.broadcast_to(jnp.asarray(is_decode, bool), n.shape)
    )
    dec = dec & m
    pre = (~dec) & m & (n > 0)
    zero, one = jnp.zeros_like(n), jnp.ones_like(n)
    return (
        jnp.where(pre, n, zero),
        jnp.where(dec, n, zero),
        jnp.where(pre, one, zero),
        jnp.where(dec, one, zero),
        jnp.where(dec, s, zero),
        jnp.where(pre, n * (s + 0.5 * n), zero),
        jnp.where(pre, s, zero),
    )


def kv_tokens_from_usage(
    usage_ratio: ArrayLike,
    blocks_total: ArrayLike,
    block_size: int = VLLM_BLOCK_SIZE,
) -> Array:
    """Proxy for ``K_dec`` from vLLM's KV-cache gauge: ``usage * blocks * block_size``.

    Approximations this proxy makes (tokens):
    - it counts whole allocated blocks, so it over-counts by up to ``block_size - 1``
      tokens per running request (about 8 on average);
    - it includes the context of requests that are prefilling this step (their cached
      prefix, ``K_pf``), which the traces do not separate: all of it goes to ``K_dec``;
    - the gauge is sampled around the step, so it may include or exclude the step's own
      new tokens;
    - prefix-cached blocks shared by several requests are counted once, though each
      request's decode attention reads them.
    """
    return _on_device(kv_product(usage_ratio, blocks_total, block_size))


def kv_product(usage_ratio, blocks_total, block_size: int = VLLM_BLOCK_SIZE):
    """:func:`kv_tokens_from_usage` left where it was computed: a NumPy array for
    host values (for callers that go on working on the host), else traced."""
    xp = _namespace(usage_ratio, blocks_total)
    kv = _f(usage_ratio, "usage_ratio", xp) * _f(blocks_total, "blocks_total", xp)
    return kv * block_size
