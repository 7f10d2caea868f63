"""Per-layer work of today's architectures: MLA or GQA projections and attention
sizes, sliding windows, the activation quantization pass, expert parallelism.

Written on array fields of :class:`~diffmodel._model._arch.Architecture` with
``where`` between the variants, so one compiled step function serves GQA and MLA,
windowed and full attention, quantized and 16-bit models alike. All sizes per GPU
with tensor-parallel degree ``t``.
"""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from .._model._arch import Architecture
from .._model._physics import gemm_work

# Stand-in window for models without one: large enough that no context reaches it,
# finite so that the unused windowed terms stay finite (they are multiplied by 0).
_NO_WINDOW = 1e12


class AttentionDims(eqx.Module):
    """Per-GPU attention sizes of one layer, for prefill and for decode.

    Attributes:
        q_heads: query heads on this GPU, ``H/t``.
        prefill_qk, prefill_v: query-key and value sizes per head in prefill (MLA
            runs prefill as multi-head attention on up-projected keys and values:
            ``qk_nope + qk_rope`` and ``v_head_dim``).
        decode_qk, decode_v: the same for decode (absorbed MLA works in the latent
            space: ``c + r`` and ``c``).
        kv_width: cached elements per token and layer on this GPU (GQA ``2 Hkv/t
            dh``; MLA ``c + r``, the latent replicated on every tensor-parallel GPU).
    """

    q_heads: Float[Array, "..."]
    prefill_qk: Float[Array, "..."]
    prefill_v: Float[Array, "..."]
    decode_qk: Float[Array, "..."]
    decode_v: Float[Array, "..."]
    kv_width: Float[Array, "..."]


def is_mla(a: Architecture) -> Array:
    """Whether the architecture caches an MLA latent (``kv_lora_rank > 0``)."""
    return a.kv_lora_rank > 0


def kv_heads(a: Architecture, t: ArrayLike) -> Array:
    """KV heads per GPU, ``max(Hkv/t, 1)`` (vLLM replicates them when ``t > Hkv``)."""
    return jnp.maximum(a.n_kv_heads / t, 1.0)


def attention_dims(a: Architecture, t: ArrayLike) -> AttentionDims:
    """:class:`AttentionDims` of ``a`` at tensor-parallel degree ``t``."""
    mla = is_mla(a)
    dh, c, r = a.head_dim, a.kv_lora_rank, a.qk_rope_dim
    latent = c + r
    return AttentionDims(
        q_heads=a.n_heads / t,
        prefill_qk=dh,
        prefill_v=a.v_head_dim,
        decode_qk=jnp.where(mla, latent, dh),
        decode_v=jnp.where(mla, c, a.v_head_dim),
        kv_width=jnp.where(mla, latent, 2.0 * kv_heads(a, t) * dh),
    )


def projection_work(tokens: ArrayLike, a: Architecture, t: ArrayLike):
    """FLOPs and bytes of one layer's attention projections for ``tokens`` tokens.

    GQA: a fused QKV GEMM ``[T, d] @ [d, (H/t + 2 Hkv') dh]`` and the output GEMM
    ``[T, H/t v] @ [H/t v, d]``. MLA (vLLM/SGLang): the replicated ``[T, d] @ [d,
    q_lora + c + r]`` (``q_a`` and ``kv_a`` fused; without ``q_lora`` the query
    projection ``H/t dh`` takes its place), ``q_b`` ``[T, q_lora] @ [q_lora, H/t
    dh]``, ``kv_b`` ``[T, c] @ [c, H/t (dh - r + v)]`` (in decode the absorbed
    per-head BMMs ``W_UK``/``W_UV``: the same FLOPs and weights) and the output GEMM.
    Activations enter at the GEMM operand width (``compute_bytes`` once quantized).
    """
    d, dh, wb, ab = a.hidden, a.head_dim, a.weight_bytes, a.act_bytes
    ib = gemm_input_bytes(a)
    qh, kvh = a.n_heads / t, kv_heads(a, t)
    c, r, ql, v = a.kv_lora_rank, a.qk_rope_dim, a.q_lora_rank, a.v_head_dim
    mla = is_mla(a)
    has_ql = ql > 0
    # GQA, exactly as the step model always wrote it.
    g_f, g_b = _add(
        gemm_work(tokens, (qh + 2 * kvh) * dh, d, wb, ib, ab),
        gemm_work(tokens, d, qh * dh, wb, ib, ab),
    )
    first = jnp.where(has_ql, ql, qh * dh) + c + r
    m_f, m_b = _add(
        gemm_work(tokens, first, d, wb, ib, ab),
        _scale(gemm_work(tokens, qh * dh, ql, wb, ib, ab), has_ql),
        gemm_work(tokens, qh * (dh - r + v), c, wb, ib, ab),
        gemm_work(tokens, d, qh * v, wb, ib, ab),
    )
    return jnp.where(mla, m_f, g_f), jnp.where(mla, m_b, g_b)


def indexer_projection_work(tokens: ArrayLike, a: Architecture):
    """FLOPs and bytes of one DSA indexer's projections (replicated on every GPU):
    its queries from the compressed query ``[T, q_lora] @ [q_lora, Hi di]``, its key
    and head weights ``[T, d] @ [d, di + Hi]``. Zero without an indexer."""
    on = a.index_heads > 0
    wb, ab, ib = a.weight_bytes, a.act_bytes, gemm_input_bytes(a)
    q = gemm_work(tokens, a.index_heads * a.index_dim, a.q_lora_rank, wb, ib, ab)
    k = gemm_work(tokens, a.index_dim + a.index_heads, a.hidden, wb, ib, ab)
    return _scale(_add(q, k), on)


def indexer_work(pairs: ArrayLike, kv_read: ArrayLike, new_tokens: ArrayLike, a):
    """FLOPs and bytes of one DSA indexer scoring ``pairs`` query-key pairs: ``2 Hi
    di`` FLOPs a pair, FP8 keys (``di`` bytes a token) read once, queries read at
    ``act_bytes``. Zero without an indexer (``Hi = 0``)."""
    hi, di = a.index_heads, a.index_dim
    flops = 2.0 * hi * di * jnp.asarray(pairs)
    keys = di * 1.0 * jnp.asarray(kv_read)
    return flops, keys + hi * di * a.act_bytes * jnp.asarray(new_tokens)


def mla_context_work(cached_tokens: ArrayLike, a: Architecture, t: ArrayLike):
    """FLOPs and bytes of up-projecting the cached latent of prefill chunks, per layer.

    MLA prefill attends in the up-projected space, so the ``K_pf`` cached tokens'
    latents go through ``kv_b`` again: ``2 K_pf c H/t (dh - r + v)`` FLOPs and the
    expanded keys and values written (16-bit). Zero for GQA (``c = 0``).
    """
    qh, c = a.n_heads / t, a.kv_lora_rank
    width = qh * (a.head_dim - a.qk_rope_dim + a.v_head_dim)
    n = jnp.asarray(cached_tokens)
    return 2.0 * n * c * width, jnp.where(c > 0, n * width * a.act_bytes, 0.0)


def gemm_input_bytes(a: Architecture) -> Array:
    """Bytes per activation element a GEMM reads: ``compute_bytes`` once activations
    are quantized (``quant_passes > 0``), else ``act_bytes``."""
    return jnp.where(a.quant_passes > 0, a.compute_bytes, a.act_bytes)


def quant_pass_bytes(elements: ArrayLike, a: Architecture) -> Array:
    """HBM bytes of quantizing ``elements`` activation elements before GEMMs.

    ``elements (passes act_bytes + compute_bytes)``: each pass reads the 16-bit
    activation (a dynamic per-tensor scale needs one more read for the absolute
    maximum), the last writes the quantized copy. Zero without quantization.
    """
    p = a.quant_passes
    return jnp.where(p > 0, elements * (p * a.act_bytes + a.compute_bytes), 0.0)


def windowed_attention(
    stats, window: ArrayLike, sinks: ArrayLike = 0.0
) -> tuple[Array, Array, Array, Array]:
    """Query-key pairs and KV tokens read by a sliding-window layer of ``W`` tokens.

    Returns ``(prefill_pairs, prefill_kv_read, decode_pairs, decode_kv_read)``.
    Decode: ``min(K_dec, Nd W)``, the pairs of ``Nd`` requests of mean context
    ``K_dec/Nd``, each capped at ``W``. Prefill (equal chunks of ``n = P/Np`` new
    tokens after ``s = K_pf/Np`` cached, as :func:`~diffmodel.from_aggregates`):
    ``Np int_0^n min(s + x, W) dx`` pairs and ``Np min(s + n, n + W)`` tokens read.
    Both are upper bounds when contexts differ (``min`` is concave). Every query also
    attends ``sinks`` tokens. ``W = 0`` means no window (the full-layer values).
    """
    w = jnp.where(jnp.asarray(window) > 0, window, _NO_WINDOW)
    p, np_, kpf = stats.prefill_tokens, stats.num_prefill, stats.kv_prefill
    has = np_ > 0
    safe = jnp.where(has, np_, 1.0)
    n, s = p / safe, kpf / safe
    below = n * (s + 0.5 * n)
    crossing = 0.5 * (w - s) * (s + w) + (s + n - w) * w
    per_chunk = jnp.where(s >= w, n * w, jnp.where(s + n <= w, below, crossing))
    pf_pairs = jnp.where(has, np_ * per_chunk, 0.0) + p * sinks
    pf_read = jnp.where(has, np_ * jnp.minimum(s + n, n + w), 0.0)
    nd = stats.num_decode
    dec = jnp.minimum(stats.kv_decode, nd * w)
    return pf_pairs, pf_read + np_ * sinks, dec + nd * sinks, dec + nd * sinks


def expert_split(a: Architecture, t: ArrayLike, ep: ArrayLike):
    """How routed experts are split per GPU: ``(token_scale, experts, top_k, ffn)``.

    ``ep = 1``: every expert tensor-parallel (``F_e / t``), the step's ``T`` tokens.
    ``ep > 1``: ``E/ep`` whole experts per GPU; the ``ep/t`` data-parallel attention
    ranks (1 when ``ep = t``) each bring ``T`` tokens, so a GPU sees ``T ep/t``
    tokens routed top-``k/ep`` into its experts (``T k / t`` slots in all).
    """
    on = ep > 1
    scale = jnp.where(on, ep / t, 1.0)
    ffn = jnp.where(on, a.expert_ffn, a.expert_ffn / t)
    return scale, a.n_experts / ep, a.top_k / ep, ffn


def _add(*works):
    return sum(w[0] for w in works), sum(w[1] for w in works)


def _scale(work, on):
    return jnp.where(on, work[0], 0.0), jnp.where(on, work[1], 0.0)
