"""Hugging Face ``config.json`` -> :class:`Architecture`: families, quantization, and
strict refusal of what the physics cannot use yet.

One reader for every family: a dense GQA core, MoE fields, MLA fields, sliding-window
layers, and the checkpoint's quantization (``quantization_config`` in the config, or
ModelOpt's ``hf_quant_config.json`` merged in under ``"hf_quant_config"`` by
:func:`~diffmodel._model._catalog.read_config_file`).
"""

import json
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

from .._model._arch import Architecture, model_config
from .._model._physics import MXFP4_BYTES, NVFP4_BYTES

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

DENSE_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mimo")
MOE_TYPES = ("mixtral", "qwen3_moe", "minimax_m2", "gpt_oss")
MLA_TYPES = ("deepseek_v3", "kimi_k2", "deepseek_v32", "glm_moe_dsa")
DSA_TYPES = ("deepseek_v32", "glm_moe_dsa")
SUPPORTED_TYPES = DENSE_TYPES + MOE_TYPES + MLA_TYPES
# Language models of multimodal wrappers, costed as their text family (M-RoPE costs
# what RoPE does).
_TEXT_TYPES = {"qwen3_vl_text": "qwen3", "qwen3_vl_moe_text": "qwen3_moe"}

# Bytes per weight element with the scales each format stores.
FP8_BLOCK_BYTES = 1.0 + 4.0 / (128 * 128)  # fp32 scale per 128x128 block


def _never(_: Any) -> bool:
    return False


def _falsy(value: Any) -> bool:
    return not value


def _is_one(value: Any) -> bool:
    return value in (None, 1)


# Keys that change a step's cost in ways the physics does not model yet, each with
# the values that mean "feature off" (then the key is harmless).
_UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "index_topk_pattern": (_falsy, "a per-layer indexer pattern"),
    "linear_num_value_heads": (_never, "linear-attention (Gated DeltaNet) layers"),
    "full_attention_interval": (_never, "hybrid linear/full attention"),
    "linear_attn_config": (_never, "linear-attention layers"),
    "hybrid_override_pattern": (_never, "Mamba hybrid layers"),
    "ssm_state_size": (_never, "state-space (Mamba) layers"),
    "interleave_moe_layer_step": (_is_one, "MoE only every n-th layer"),
    "attention_chunk_size": (_falsy, "chunked attention"),
    "no_rope_layers": (_falsy, "per-layer attention patterns"),
    "mlp_only_layers": (_falsy, "mixed dense/MoE layers"),
    "decoder_sparse_step": (_is_one, "MoE only every n-th layer"),
    "moe_layer_freq": (_is_one, "MoE only every n-th layer"),
    "use_sliding_window": (_falsy, "Qwen-style sliding window above max_window_layers"),
    "block_configs": (_never, "per-layer pruned blocks (Nemotron NAS)"),
    "vision_config": (_never, "a vision encoder (pass text_only=True)"),
    "audio_config": (_never, "an audio encoder (pass text_only=True)"),
}


def _require(config: Mapping[str, Any], key: str, source: str) -> Any:
    if key not in config or config[key] is None:
        raise ValueError(f"model config {source!r} is missing required key {key!r}")
    return config[key]


def dtype_bytes(name: str, what: str) -> float:
    """Bytes per element of a dtype name (``bfloat16``, ``torch.float16``, ``fp8``)."""
    key = str(name).lower().removeprefix("torch.")
    if key not in _DTYPE_BYTES:
        raise ValueError(
            f"unknown {what} dtype {name!r}; expected one of {sorted(_DTYPE_BYTES)}"
        )
    return _DTYPE_BYTES[key]


def _load(config, text_only: bool) -> tuple[Mapping[str, Any], str]:
    source = "<dict>"
    if isinstance(config, pathlib.Path) or (
        isinstance(config, str) and config.endswith(".json")
    ):
        from .._model._catalog import read_config_file

        source = str(config)
        path = pathlib.Path(config)
        if not path.is_file():
            raise ValueError(f"model config file not found: {path}")
        try:
            config = read_config_file(path)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"model config {source!r} is not valid JSON: {err}"
            ) from err
    elif isinstance(config, str):
        source = config
        config = model_config(config)
    elif isinstance(config, Mapping) and "_name" in config:
        source = str(config["_name"])
    if not isinstance(config, Mapping):
        raise ValueError(
            f"config must be a mapping, a path or a model name, got {type(config)}"
        )
    if "text_config" in config:
        if not text_only and ("vision_config" in config or "audio_config" in config):
            raise ValueError(
                f"model config {source!r} is multimodal (vision_config): the vision "
                "encoder is not modelled; pass text_only=True to model the language "
                "model alone"
            )
        text = dict(config["text_config"])
        for key in ("quantization_config", "hf_quant_config", "torch_dtype", "dtype"):
            if key in config and key not in text:
                text[key] = config[key]
        config = text
    return config, source


def _check_supported(config: Mapping[str, Any], source: str, text_only: bool) -> None:
    bad = []
    for key, (neutral, what) in _UNSUPPORTED.items():
        if key not in config or neutral(config[key]):
            continue
        if text_only and key in ("vision_config", "audio_config"):
            continue
        bad.append(f"{key} ({what})")
    if bad:
        raise ValueError(
            f"model config {source!r} uses fields the step model cannot cost yet: "
            + "; ".join(bad)
        )


def _quantization(config: Mapping[str, Any], source: str) -> dict[str, float]:
    """Weight/compute bytes, activation passes and KV bytes of a checkpoint."""
    qc = config.get("quantization_config") or {}
    hq = (config.get("hf_quant_config") or {}).get("quantization") or {}
    method = str(qc.get("quant_method") or "").lower()
    algo = str(hq.get("quant_algo") or qc.get("quant_algo") or "").upper()
    out: dict[str, float] = {}
    kv_algo = str(hq.get("kv_cache_quant_algo") or qc.get("kv_cache_scheme") or "")
    if kv_algo.upper() == "FP8":
        out["kv_bytes"] = 1.0
    elif kv_algo and kv_algo.lower() != "none":
        raise ValueError(
            f"model config {source!r}: KV-cache quantization {kv_algo!r} is not "
            "modelled; expected FP8"
        )
    groups = qc.get("config_groups") or {}
    if groups and not algo:
        weights = next(iter(groups.values())).get("weights") or {}
        bits = weights.get("num_bits")
        algo = {8: "FP8", 4: "NVFP4"}.get(bits, f"{bits}-bit config_groups")
    if not (qc or hq):
        return out
    head16 = {"head_weight_bytes": 2.0}
    if algo == "NVFP4":
        w = dict(weight_bytes=NVFP4_BYTES, compute_bytes=0.5, quant_passes=1.0)
        return {**out, **w, **head16}
    if algo == "FP8":
        # ModelOpt / compressed-tensors FP8: per-tensor weights, static input scale
        # (one fused quantization pass) unless marked dynamic.
        dynamic = any(
            (g.get("input_activations") or {}).get("dynamic") for g in groups.values()
        )
        w = dict(
            weight_bytes=1.0, compute_bytes=1.0, quant_passes=2.0 if dynamic else 1
        )
        return {**out, **w, **head16}
    if method == "fp8":
        block = qc.get("weight_block_size")
        if block:
            w = dict(
                weight_bytes=1.0 + 4.0 / (block[0] * block[1]),
                compute_bytes=1.0,
                quant_passes=1.0,  # per-token-group scales: one fused pass
            )
        else:
            dynamic = qc.get("activation_scheme", "dynamic") == "dynamic"
            w = dict(
                weight_bytes=1.0, compute_bytes=1.0, quant_passes=2.0 if dynamic else 1
            )
        return {**out, **w, **head16}
    if method == "mxfp4":
        # gpt-oss: MXFP4 routed experts, everything else (modules_to_not_convert:
        # attention, router, embeddings, head) in 16 bits; W4A16 on Hopper.
        return {
            **out,
            "expert_weight_bytes": MXFP4_BYTES,
            "expert_compute_bytes": 2.0,
        }
    if method == "modelopt" and not algo:
        return out  # the algorithm lives in hf_quant_config.json, absent here
    raise ValueError(
        f"model config {source!r}: quantization {method or algo!r} is not modelled; "
        "expected fp8 (per-tensor or block), FP8/NVFP4 (ModelOpt) or mxfp4"
    )


def _dsa(config: Mapping[str, Any], source: str, n_layers: int) -> dict[str, Any]:
    """DeepSeek sparse attention: every layer attends its ``index_topk`` best tokens
    (a window of that size), the indexer runs in the ``"full"`` ``indexer_types``
    layers (all layers when the key is absent)."""
    types = config.get("indexer_types")
    if types is None:
        extra = [
            k for k in ("index_topk_freq", "index_skip_topk_offset") if k in config
        ]
        if extra:
            raise ValueError(
                f"model config {source!r} uses fields the step model cannot cost "
                f"yet: {', '.join(extra)} (indexer sharing without indexer_types)"
            )
        index_layers = n_layers
    else:
        if sorted(set(types) - {"full", "shared"}) or len(types) != n_layers:
            raise ValueError(
                f"model config {source!r}: indexer_types must list 'full' or "
                f"'shared' for each of the {n_layers} layers"
            )
        index_layers = types.count("full")
    layer_types = config.get("layer_types")
    if layer_types is not None and set(layer_types) != {"deepseek_sparse_attention"}:
        raise ValueError(
            f"model config {source!r} uses fields the step model cannot cost yet: "
            f"layer_types {sorted(set(layer_types))}"
        )
    return dict(
        window=int(_require(config, "index_topk", source)),
        window_layers=n_layers,
        index_heads=int(_require(config, "index_n_heads", source)),
        index_dim=int(_require(config, "index_head_dim", source)),
        index_layers=index_layers,
    )


def parse_hf_config(
    config: Mapping[str, Any] | str | pathlib.Path,
    *,
    weight_dtype: str | None = None,
    kv_dtype: str | None = None,
    text_only: bool = False,
) -> Architecture:
    """See :func:`diffmodel._model._arch.from_hf_config`."""
    config, source = _load(config, text_only)
    model_type = _require(config, "model_type", source)
    model_type = _TEXT_TYPES.get(model_type, model_type)
    if model_type not in SUPPORTED_TYPES:
        raise ValueError(
            f"model config {source!r}: unsupported model_type {model_type!r}; "
            f"expected one of {SUPPORTED_TYPES}"
        )
    _check_supported(config, source, text_only)
    hidden = int(_require(config, "hidden_size", source))
    n_heads = int(_require(config, "num_attention_heads", source))
    n_kv = int(config.get("num_key_value_heads") or n_heads)
    head_dim = int(config.get("head_dim") or hidden // n_heads)
    n_layers = int(_require(config, "num_hidden_layers", source))
    vocab = int(_require(config, "vocab_size", source))
    dtype = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    fields: dict[str, Any] = dict(
        weight_bytes=dtype_bytes(dtype, "weight"),
        kv_bytes=dtype_bytes(dtype, "kv"),
    )
    fields.update(_quantization(config, source))

    ffn = int(_require(config, "intermediate_size", source))
    moe: dict[str, Any] = {}
    if model_type in ("mixtral", "minimax_m2", "gpt_oss"):
        moe = dict(
            n_experts=int(_require(config, "num_local_experts", source)),
            top_k=int(_require(config, "num_experts_per_tok", source)),
            expert_ffn=ffn,
            shared_ffn=int(config.get("shared_intermediate_size") or 0),
        )
        ffn = 0
        attn = config.get("attn_type_list")
        if attn is not None and any(x != 1 for x in attn):
            raise ValueError(
                f"model config {source!r} uses fields the step model cannot cost "
                "yet: attn_type_list (non-softmax attention layers)"
            )
    elif model_type == "qwen3_moe":
        moe = dict(
            n_experts=int(_require(config, "num_experts", source)),
            top_k=int(_require(config, "num_experts_per_tok", source)),
            expert_ffn=int(_require(config, "moe_intermediate_size", source)),
            shared_ffn=int(config.get("shared_expert_intermediate_size") or 0),
        )
        ffn = 0
    elif model_type in MLA_TYPES:
        expert_ffn = int(_require(config, "moe_intermediate_size", source))
        first_dense = int(config.get("first_k_dense_replace") or 0)
        nope = int(_require(config, "qk_nope_head_dim", source))
        rope = int(_require(config, "qk_rope_head_dim", source))
        moe = dict(
            n_experts=int(_require(config, "n_routed_experts", source)),
            top_k=int(_require(config, "num_experts_per_tok", source)),
            expert_ffn=expert_ffn,
            shared_ffn=int(config.get("n_shared_experts") or 0) * expert_ffn,
            dense_layers=first_dense,
            moe_layers=n_layers - first_dense,
            q_lora_rank=int(config.get("q_lora_rank") or 0),
            kv_lora_rank=int(_require(config, "kv_lora_rank", source)),
            qk_rope_dim=rope,
            v_head_dim=int(_require(config, "v_head_dim", source)),
        )
        head_dim = nope + rope
        n_kv = n_heads
        mlp_types = config.get("mlp_layer_types")
        if mlp_types is not None and (
            mlp_types != ["dense"] * first_dense + ["sparse"] * (n_layers - first_dense)
        ):
            raise ValueError(
                f"model config {source!r} uses fields the step model cannot cost "
                "yet: mlp_layer_types (other than first_k_dense_replace dense layers)"
            )
        if model_type in DSA_TYPES:
            moe.update(_dsa(config, source, n_layers))
    for key in ("index_topk", "index_n_heads"):
        if model_type not in DSA_TYPES and config.get(key):
            raise ValueError(
                f"model config {source!r} uses fields the step model cannot cost yet "
                f"for model_type {model_type!r}: {key} (sparse-attention indexer)"
            )
    for key in (
        "q_lora_rank",
        "kv_lora_rank",
        "first_k_dense_replace",
        "mlp_layer_types",
    ):
        if model_type not in MLA_TYPES and config.get(key):
            raise ValueError(
                f"model config {source!r} uses fields the step model cannot cost yet "
                f"for model_type {model_type!r}: {key}"
            )
    window = config.get("sliding_window")
    layer_types = config.get("layer_types")
    if layer_types is not None and model_type not in DSA_TYPES:
        other = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
        if other:
            raise ValueError(
                f"model config {source!r} uses fields the step model cannot cost "
                f"yet: layer_types {other}"
            )
        if len(layer_types) != n_layers:
            raise ValueError(
                f"model config {source!r}: layer_types has {len(layer_types)} entries "
                f"for {n_layers} layers"
            )
        n_window = layer_types.count("sliding_attention")
        if n_window and not window:
            raise ValueError(
                f"model config {source!r}: sliding_attention layers need sliding_window"
            )
        moe.update(window=window or 0, window_layers=n_window)
    elif window and model_type in ("mistral", "mixtral"):
        moe.update(window=window, window_layers=n_layers)  # every layer windowed
    if weight_dtype:
        wb = dtype_bytes(weight_dtype, "weight")
        for key in ("compute_bytes", "expert_compute_bytes", "quant_passes"):
            fields.pop(key, None)
        fields.update(weight_bytes=wb, expert_weight_bytes=wb, head_weight_bytes=wb)
    if kv_dtype:
        fields["kv_bytes"] = dtype_bytes(kv_dtype, "kv")
    return Architecture(
        n_layers=n_layers,
        hidden=hidden,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        ffn=ffn,
        vocab=vocab,
        **moe,
        **fields,
    )
