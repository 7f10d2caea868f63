"""Transformer architecture as array data, read from a Hugging Face ``config.json``."""

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._model._catalog import MODEL_ALIASES, MODEL_CONFIGS

_SUPPORTED_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe")

_DTYPE_BYTES = {
    "float32": 4.0,
    "float": 4.0,
    "float16": 2.0,
    "half": 2.0,
    "bfloat16": 2.0,
    "float8_e4m3fn": 1.0,
    "float8_e5m2": 1.0,
    "fp8": 1.0,
    "int8": 1.0,
    "int4": 0.5,
}


class Architecture(eqx.Module):
    """A decoder-only transformer's sizes, all as (broadcastable) float arrays.

    Every field is array data, so architectures of different models can be stacked
    (``stack``) and one compiled function serves them all.

    Attributes:
        n_layers: decoder layers ``L``.
        hidden: hidden size ``d``.
        n_heads: attention (query) heads ``H``.
        n_kv_heads: key/value heads ``Hkv`` (GQA when below ``H``).
        head_dim: per-head size ``dh``.
        ffn: dense gated-MLP intermediate size ``F`` (0 for an all-MoE model).
        vocab: vocabulary size ``V``.
        n_experts: routed experts ``E`` (0 for a dense model).
        top_k: experts per token ``k`` (0 for a dense model).
        expert_ffn: intermediate size of one routed expert.
        shared_ffn: total intermediate size of always-on shared experts (0 if none).
        weight_bytes: bytes per weight element (2 for bf16/fp16, 1 for fp8).
        kv_bytes: bytes per KV-cache element.
        act_bytes: bytes per activation element (2: activations stay in 16 bits).
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
    ):
        self.n_layers = jnp.asarray(n_layers, float)
        self.hidden = jnp.asarray(hidden, float)
        self.n_heads = jnp.asarray(n_heads, float)
        self.n_kv_heads = jnp.asarray(n_kv_heads, float)
        self.head_dim = jnp.asarray(head_dim, float)
        self.ffn = jnp.asarray(ffn, float)
        self.vocab = jnp.asarray(vocab, float)
        self.n_experts = jnp.asarray(n_experts, float)
        self.top_k = jnp.asarray(top_k, float)
        self.expert_ffn = jnp.asarray(expert_ffn, float)
        self.shared_ffn = jnp.asarray(shared_ffn, float)
        self.weight_bytes = jnp.asarray(weight_bytes, float)
        self.kv_bytes = jnp.asarray(kv_bytes, float)
        self.act_bytes = jnp.asarray(act_bytes, float)

    @staticmethod
    def from_hf_config(
        config: "Mapping[str, Any] | str | pathlib.Path", **overrides: str
    ) -> "Architecture":
        """An architecture from a Hugging Face ``config.json`` (a path, a dict, or a
        catalog name); ``weight_dtype`` / ``kv_dtype`` override the file's dtype."""
        return from_hf_config(config, **overrides)

    def attention_params(self) -> Float[Array, "..."]:
        """Weights of one layer's attention projections (Q, K, V, O), elements."""
        q_and_o = 2 * self.hidden * self.n_heads * self.head_dim
        k_and_v = 2 * self.hidden * self.n_kv_heads * self.head_dim
        return q_and_o + k_and_v

    def mlp_params(self) -> Float[Array, "..."]:
        """Weights of one layer's dense gated MLP (gate, up, down), elements."""
        return 3 * self.hidden * self.ffn

    def expert_params(self) -> Float[Array, "..."]:
        """Weights of one routed expert (gate, up, down), elements."""
        return 3 * self.hidden * self.expert_ffn

    def total_params(self) -> Float[Array, "..."]:
        """All weights: layers, embeddings and LM head, elements."""
        per_layer = (
            self.attention_params()
            + self.mlp_params()
            + self.n_experts * (self.expert_params() + self.hidden)
            + 3 * self.hidden * self.shared_ffn
        )
        return self.n_layers * per_layer + 2 * self.vocab * self.hidden


def _require(config: Mapping[str, Any], key: str, source: str) -> Any:
    if key not in config or config[key] is None:
        raise ValueError(f"model config {source!r} is missing required key {key!r}")
    return config[key]


def _dtype_bytes(name: str, what: str) -> float:
    key = str(name).lower().removeprefix("torch.")
    if key not in _DTYPE_BYTES:
        raise ValueError(
            f"unknown {what} dtype {name!r}; expected one of {sorted(_DTYPE_BYTES)}"
        )
    return _DTYPE_BYTES[key]


def from_hf_config(
    config: Mapping[str, Any] | str | pathlib.Path,
    *,
    weight_dtype: str | None = None,
    kv_dtype: str | None = None,
) -> Architecture:
    """Build an :class:`Architecture` from a Hugging Face ``config.json``.

    Args:
        config: the parsed config (a mapping), a path to ``config.json``, or a name in
            the bundled catalog (see :func:`known_models`).
        weight_dtype: override the weight dtype (e.g. ``"fp8"`` to model FP8 weights);
            default ``torch_dtype`` of the config.
        kv_dtype: override the KV-cache dtype; default the weight dtype of the config.

    Supported ``model_type``: llama, mistral, mixtral, qwen2, qwen3, qwen3_moe. The
    head dimension is ``head_dim`` when the config gives one, else ``hidden/heads``.
    """
    source = "<dict>"
    if isinstance(config, pathlib.Path) or (
        isinstance(config, str) and config.endswith(".json")
    ):
        source = str(config)
        path = pathlib.Path(config)
        if not path.is_file():
            raise ValueError(f"model config file not found: {path}")
        config = json.loads(path.read_text())
    elif isinstance(config, str):
        source = config
        config = MODEL_CONFIGS[canonical_model(config)]
    if not isinstance(config, Mapping):
        raise ValueError(
            f"config must be a mapping, a path or a model name, got {type(config)}"
        )

    model_type = _require(config, "model_type", source)
    if model_type not in _SUPPORTED_TYPES:
        raise ValueError(
            f"model config {source!r}: unsupported model_type {model_type!r}; "
            f"expected one of {_SUPPORTED_TYPES}"
        )
    hidden = int(_require(config, "hidden_size", source))
    n_heads = int(_require(config, "num_attention_heads", source))
    n_kv = int(config.get("num_key_value_heads") or n_heads)
    head_dim = int(config.get("head_dim") or hidden // n_heads)
    n_layers = int(_require(config, "num_hidden_layers", source))
    vocab = int(_require(config, "vocab_size", source))
    w_bytes = _dtype_bytes(
        weight_dtype or config.get("torch_dtype") or "bfloat16", "weight"
    )
    kv_bytes = (
        _dtype_bytes(kv_dtype, "kv")
        if kv_dtype
        else _dtype_bytes(config.get("torch_dtype") or "bfloat16", "kv")
    )

    n_experts = top_k = expert_ffn = shared_ffn = 0
    ffn = int(_require(config, "intermediate_size", source))
    if model_type == "mixtral":
        n_experts = int(_require(config, "num_local_experts", source))
        top_k = int(_require(config, "num_experts_per_tok", source))
        expert_ffn, ffn = ffn, 0
    elif model_type == "qwen3_moe":
        n_experts = int(_require(config, "num_experts", source))
        top_k = int(_require(config, "num_experts_per_tok", source))
        expert_ffn = int(_require(config, "moe_intermediate_size", source))
        if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
            raise ValueError(
                f"model config {source!r}: mixed dense/MoE layers "
                "(mlp_only_layers, decoder_sparse_step != 1) are not supported"
            )
        shared_ffn = int(config.get("shared_expert_intermediate_size") or 0)
        ffn = 0
    return Architecture(
        n_layers=n_layers,
        hidden=hidden,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        ffn=ffn,
        vocab=vocab,
        n_experts=n_experts,
        top_k=top_k,
        expert_ffn=expert_ffn,
        shared_ffn=shared_ffn,
        weight_bytes=w_bytes,
        kv_bytes=kv_bytes,
    )


def known_models() -> tuple[str, ...]:
    """Names of the bundled catalog's models (aliases such as trace names also work)."""
    return tuple(sorted(MODEL_CONFIGS))


def canonical_model(name: str) -> str:
    """Map a catalog name or alias (e.g. ``llama-2-70b-hf``) to its catalog name."""
    key = str(name).strip().lower().replace("_", "-")
    key = MODEL_ALIASES.get(key, key)
    if key not in MODEL_CONFIGS:
        raise ValueError(
            f"unknown model {name!r}; known models: {', '.join(known_models())} "
            "(or pass a config.json path or dict)"
        )
    return key


def architecture(name: str, **overrides: str) -> Architecture:
    """The bundled catalog's :class:`Architecture` for ``name`` (or an alias).

    Keyword arguments ``weight_dtype`` and ``kv_dtype`` are passed to
    :func:`from_hf_config`.
    """
    return from_hf_config(MODEL_CONFIGS[canonical_model(name)], **overrides)
