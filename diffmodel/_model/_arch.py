"""Transformer architecture as array data, read from a Hugging Face ``config.json``."""

import functools
import pathlib
from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._arrays import device_array, on_host
from .._model._catalog import (
    MODEL_CONFIGS,
    canonical_key,
    installed_configs,
    read_config_file,
)


class Architecture(eqx.Module):
    """A decoder-only transformer's sizes, all as (broadcastable) float arrays.

    Every field is array data, so architectures of different models can be stacked
    (``stack``) and one compiled function serves them all. Fields beyond the dense
    GQA transformer default to values that switch their feature off, so a Llama or
    Mixtral step costs what it always did.

    Attributes:
        n_layers: decoder layers ``L``.
        hidden: hidden size ``d``.
        n_heads: attention (query) heads ``H``.
        n_kv_heads: key/value heads ``Hkv`` (GQA when below ``H``; ``H`` for MLA).
        head_dim: per-head query/key size ``dh`` (MLA: ``qk_nope + qk_rope``).
        ffn: dense gated-MLP intermediate size ``F`` (0 for an all-MoE model).
        vocab: vocabulary size ``V``.
        n_experts: routed experts ``E`` (0 for a dense model).
        top_k: experts per token ``k`` (0 for a dense model).
        expert_ffn: intermediate size of one routed expert.
        shared_ffn: total intermediate size of always-on shared experts (0 if none).
        weight_bytes: bytes per weight element of the attention and dense/shared MLP
            GEMMs, scales included (2 bf16, 1 FP8 per-tensor, ``1 + 4/16384`` FP8
            with 128x128 fp32 block scales, 0.5625 NVFP4: 0.5 + one FP8 scale per 16).
        kv_bytes: bytes per KV-cache element.
        act_bytes: bytes per activation element (2: activations stay in 16 bits).
        dense_layers: layers with the dense ``F`` MLP (default ``L``; DeepSeek's
            ``first_k_dense_replace``: 3).
        moe_layers: layers with the MoE block, shared + routed experts and router
            (default ``L``; DeepSeek: ``L - 3``). A dense model's MoE block and an
            all-MoE model's dense MLP have zero width.
        expert_weight_bytes: bytes per routed-expert weight (default
            ``weight_bytes``; gpt-oss: 0.53125, MXFP4 experts with bf16 attention).
        head_weight_bytes: bytes per LM-head weight (default ``weight_bytes``;
            quantized checkpoints keep the head in 16 bits).
        compute_bytes: operand width the linear layers' tensor cores run at, bytes:
            2 selects the 16-bit peak, 1 the FP8 peak, 0.5 the FP4 peak
            (``Hardware.flops_4``: the FP8 one on GPUs without FP4 tensor cores).
            Default 1 when ``weight_bytes < 1.5`` (8-bit or narrower, scales
            included) else 2 (a weight-only FP8 override runs on the FP8 peak).
        expert_compute_bytes: the same for routed experts (default
            ``compute_bytes`` when ``expert_weight_bytes`` is not given, else by
            that width as above; W4A16 MXFP4: 2).
        quant_passes: activation quantization before each quantized GEMM: 0 none
            (16-bit activations, or weight-only), 1 one fused pass (static scale or
            per-token-group scales: read ``act_bytes``, write ``compute_bytes``), 2
            dynamic per-tensor (one more read for the absolute maximum).
        q_lora_rank: MLA query compression rank (0: queries projected directly).
        kv_lora_rank: MLA latent KV rank ``c`` (0: not MLA, the GQA cache).
        qk_rope_dim: MLA decoupled RoPE key size ``r`` (cached beside the latent).
        v_head_dim: per-head value size (default ``head_dim``).
        window: sliding-window size ``W``, tokens (0: no window).
        window_layers: layers with the sliding window (gpt-oss: every other one).
        sink_tokens: tokens every query of a windowed layer also attends (attention
            sinks kept in the cache; 0 for gpt-oss, whose sinks are one learned logit
            per head and cost nothing measurable).
        index_heads: DeepSeek sparse attention (DSA) indexer heads (0: dense
            attention). A DSA layer attends its ``index_topk`` highest-scoring
            tokens, costed as a window of that size (``window``, ``window_layers``:
            the same pair and token counts), plus the indexer itself.
        index_dim: indexer head size; its keys are cached in FP8 (1 byte).
        index_layers: layers that run the indexer (GLM-5.3 shares one layer's
            top-k with the next ones: ``indexer_types`` ``"shared"``).
    """

    n_layers: Float[Array, ""]
    hidden: Float[Array, ""]
    n_heads: Float[Array, ""]
    n_kv_heads: Float[Array, ""]
    head_dim: Float[Array, ""]
    ffn: Float[Array, ""]
    vocab: Float[Array, ""]
    n_experts: Float[Array, ""]
    top_k: Float[Array, ""]
    expert_ffn: Float[Array, ""]
    shared_ffn: Float[Array, ""]
    weight_bytes: Float[Array, ""]
    kv_bytes: Float[Array, ""]
    act_bytes: Float[Array, ""]
    dense_layers: Float[Array, ""]
    moe_layers: Float[Array, ""]
    expert_weight_bytes: Float[Array, ""]
    head_weight_bytes: Float[Array, ""]
    compute_bytes: Float[Array, ""]
    expert_compute_bytes: Float[Array, ""]
    quant_passes: Float[Array, ""]
    q_lora_rank: Float[Array, ""]
    kv_lora_rank: Float[Array, ""]
    qk_rope_dim: Float[Array, ""]
    v_head_dim: Float[Array, ""]
    window: Float[Array, ""]
    window_layers: Float[Array, ""]
    sink_tokens: Float[Array, ""]
    index_heads: Float[Array, ""]
    index_dim: Float[Array, ""]
    index_layers: Float[Array, ""]

    def __init__(
        self,
        *,
        n_layers,
        hidden,
        n_heads,
        n_kv_heads,
        head_dim,
        ffn,
        vocab,
        n_experts=0.0,
        top_k=0.0,
        expert_ffn=0.0,
        shared_ffn=0.0,
        weight_bytes=2.0,
        kv_bytes=2.0,
        act_bytes=2.0,
        dense_layers=None,
        moe_layers=None,
        expert_weight_bytes=None,
        head_weight_bytes=None,
        compute_bytes=None,
        expert_compute_bytes=None,
        quant_passes=0.0,
        q_lora_rank=0.0,
        kv_lora_rank=0.0,
        qk_rope_dim=0.0,
        v_head_dim=None,
        window=0.0,
        window_layers=0.0,
        sink_tokens=0.0,
        index_heads=0.0,
        index_dim=0.0,
        index_layers=0.0,
    ):
        f = functools.partial(device_array, dtype=float)

        # 8-bit weights run at the FP8 peak, their block scales included (FP8 with
        # 128x128 fp32 scales is 1 + 4/16384 bytes per weight).
        def compute_bytes_of(weight_bytes):
            if on_host(weight_bytes):
                return f(np.where(np.asarray(weight_bytes) < 1.5, 1.0, 2.0))
            return jnp.where(weight_bytes < 1.5, 1.0, 2.0)

        self.n_layers = f(n_layers)
        self.hidden = f(hidden)
        self.n_heads = f(n_heads)
        self.n_kv_heads = f(n_kv_heads)
        self.head_dim = f(head_dim)
        self.ffn = f(ffn)
        self.vocab = f(vocab)
        self.n_experts = f(n_experts)
        self.top_k = f(top_k)
        self.expert_ffn = f(expert_ffn)
        self.shared_ffn = f(shared_ffn)
        self.weight_bytes = f(weight_bytes)
        self.kv_bytes = f(kv_bytes)
        self.act_bytes = f(act_bytes)
        self.dense_layers = f(n_layers if dense_layers is None else dense_layers)
        self.moe_layers = f(n_layers if moe_layers is None else moe_layers)
        self.expert_weight_bytes = f(
            weight_bytes if expert_weight_bytes is None else expert_weight_bytes
        )
        self.head_weight_bytes = f(
            weight_bytes if head_weight_bytes is None else head_weight_bytes
        )
        self.compute_bytes = (
            compute_bytes_of(self.weight_bytes)
            if compute_bytes is None
            else f(compute_bytes)
        )
        # Experts stored like the other weights run like them (an NVFP4 model's
        # experts at the FP4 peak); other expert weights take their width's peak.
        if expert_compute_bytes is not None:
            self.expert_compute_bytes = f(expert_compute_bytes)
        elif expert_weight_bytes is None:
            self.expert_compute_bytes = self.compute_bytes
        else:
            self.expert_compute_bytes = compute_bytes_of(self.expert_weight_bytes)
        self.quant_passes = f(quant_passes)
        self.q_lora_rank = f(q_lora_rank)
        self.kv_lora_rank = f(kv_lora_rank)
        self.qk_rope_dim = f(qk_rope_dim)
        self.v_head_dim = f(head_dim if v_head_dim is None else v_head_dim)
        self.window = f(window)
        self.window_layers = f(window_layers)
        self.sink_tokens = f(sink_tokens)
        self.index_heads = f(index_heads)
        self.index_dim = f(index_dim)
        self.index_layers = f(index_layers)

    @staticmethod
    def from_hf_config(
        config: "Mapping[str, Any] | str | pathlib.Path", **options: Any
    ) -> "Architecture":
        """An architecture from a Hugging Face ``config.json`` (a path, a dict, or a
        model name / Hugging Face id); see :func:`from_hf_config` for the options."""
        return from_hf_config(config, **options)

    def attention_params(self) -> Float[Array, "..."]:
        """Weights of one layer's attention projections, elements.

        GQA: Q, K, V, O. MLA: ``q_a`` (``d x q_lora``), ``q_b`` (``q_lora x H dh``,
        or ``d x H dh`` without ``q_lora``), ``kv_a`` (``d x (c + r)``), ``kv_b``
        (``c x H (dh - r + v)``) and O (``H v x d``); a DSA indexer adds ``q_lora x
        Hi di`` and ``d x (di + Hi)`` in the layers that run it (averaged here).
        """
        d, h, dh, v = self.hidden, self.n_heads, self.head_dim, self.v_head_dim
        c, qr = self.kv_lora_rank, self.q_lora_rank
        q_in = jnp.where(qr > 0, qr, d)
        gqa = 2 * d * h * dh + 2 * d * self.n_kv_heads * dh
        mla = (
            d * qr
            + q_in * h * dh
            + d * (c + self.qk_rope_dim)
            + c * h * (dh - self.qk_rope_dim + v)
            + h * v * d
        )
        index = jnp.where(
            self.index_heads > 0,
            qr * self.index_heads * self.index_dim
            + d * (self.index_dim + self.index_heads),
            0.0,
        )
        per_layer = jnp.where(c > 0, mla, gqa)
        return per_layer + index * self.index_layers / self.n_layers

    def mlp_params(self) -> Float[Array, "..."]:
        """Weights of one layer's dense gated MLP (gate, up, down), elements."""
        return 3 * self.hidden * self.ffn

    def expert_params(self) -> Float[Array, "..."]:
        """Weights of one routed expert (gate, up, down), elements."""
        return 3 * self.hidden * self.expert_ffn

    def total_params(self) -> Float[Array, "..."]:
        """All weights: layers, embeddings and LM head, elements."""
        moe_layer = self.n_experts * (
            self.expert_params() + self.hidden
        ) + 3 * self.hidden * (self.shared_ffn)
        return (
            self.n_layers * self.attention_params()
            + self.dense_layers * self.mlp_params()
            + self.moe_layers * moe_layer
            + 2 * self.vocab * self.hidden
        )


def from_hf_config(
    config: Mapping[str, Any] | str | pathlib.Path,
    *,
    weight_dtype: str | None = None,
    kv_dtype: str | None = None,
    text_only: bool = False,
) -> Architecture:
    """Build an :class:`Architecture` from a Hugging Face ``config.json``.

    Args:
        config: the parsed config (a mapping), a path to ``config.json``, or a model
            name (catalog name, alias or Hugging Face id; see :func:`known_models`).
        weight_dtype: override the weight dtype of every GEMM (e.g. ``"fp8"``: FP8
            weights on the FP8 peak, no activation quantization pass); default the
            config's ``quantization_config`` / ``hf_quant_config``, else its dtype.
        kv_dtype: override the KV-cache dtype; default the checkpoint's KV
            quantization, else the config's dtype.
        text_only: accept a multimodal config (``text_config`` + ``vision_config``)
            and model its language model only (the vision encoder is not costed).

    Families: llama, mistral, qwen2, qwen3, mimo (dense GQA); mixtral, qwen3_moe,
    minimax_m2, gpt_oss (MoE; gpt-oss with its sliding-window layers and MXFP4
    experts); deepseek_v3 and kimi_k2 (MLA, shared + routed experts, first-k dense
    layers, FP8 blocks); deepseek_v32 and glm_moe_dsa (the same with DeepSeek sparse
    attention); wrappers whose ``text_config`` is one of these. Keys the physics
    cannot use yet (linear-attention or Mamba layers, interleaved MoE, chunked
    attention, ...) raise a ``ValueError`` naming them.
    """
    from .._model._hfconfig import parse_hf_config

    return parse_hf_config(
        config, weight_dtype=weight_dtype, kv_dtype=kv_dtype, text_only=text_only
    )


def known_models() -> tuple[str, ...]:
    """Canonical names of the catalog: the bundled models and the configs of an
    installed ``aiconfigurator-core`` (aliases and Hugging Face ids also work)."""
    return tuple(sorted({*MODEL_CONFIGS, *installed_configs()}))


def canonical_model(name: str) -> str:
    """THE model-name canonicaliser: a catalog name, alias, trace spelling or Hugging
    Face id (``meta-llama/Llama-3.1-70B``, ``Llama_2_70b_hf``, ``llama2-70b``) to its
    catalog name; a ``ValueError`` for a name that is not a known model."""
    key = canonical_key(name)
    if key not in MODEL_CONFIGS and key not in installed_configs():
        bundled = ", ".join(sorted(MODEL_CONFIGS))
        more = len(installed_configs())
        raise ValueError(
            f"unknown model {name!r}; known models: {bundled}"
            + (f" and {more} from aiconfigurator-core" if more else "")
            + " (see diffmodel.known_models(); or pass a config.json path or dict)"
        )
    return key


def model_config(name: str) -> dict:
    """The Hugging Face config of a catalog model (bundled, or read in place from the
    installed ``aiconfigurator-core``), as a dict."""
    key = canonical_model(name)
    if key in MODEL_CONFIGS:
        return dict(MODEL_CONFIGS[key], _name=key)
    return dict(read_config_file(installed_configs()[key]), _name=key)


def architecture(name: str, **options: Any) -> Architecture:
    """The catalog's :class:`Architecture` for ``name`` (an alias or Hugging Face id
    works too); keyword arguments as :func:`from_hf_config`."""
    return from_hf_config(model_config(name), **options)
