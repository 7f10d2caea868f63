"""The model catalog: a small bundled set, and the configs an installed
``aiconfigurator-core`` ships, read in place.

The bundled numbers are taken from the Hugging Face ``config.json`` files in
inference-sim's ``model_configs/`` (Apache-2.0; copies in
``shared/data/model_configs/``), reduced to the keys the roofline reads.
``tests/model/test_catalog.py`` checks them against those
files. ``aiconfigurator-core`` (PyPI, Apache-2.0; the ``aic`` extra) bundles ~100 more
in ``aiconfigurator_core/model_configs/<org>--<name>_config.json`` (with an optional
``..._hf_quant_config.json`` beside a quantized checkpoint); :func:`installed_configs`
finds them, nothing is copied.

Names go through ONE canonicaliser, :func:`canonical_key`: Hugging Face ids
(``meta-llama/Llama-3.1-70B``), trace spellings (``Llama_2_70b_hf``, ``llama2-70b``)
and catalog names all map to one key.
"""

import functools
import importlib.resources
import importlib.util
import json
import pathlib
import re

MODEL_CONFIGS: dict[str, dict] = {
    "codellama-34b": {
        "model_type": "llama",
        "hidden_size": 8192,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "intermediate_size": 22016,
        "num_hidden_layers": 48,
        "vocab_size": 32000,
        "torch_dtype": "bfloat16",
    },
    "llama-2-70b": {
        "model_type": "llama",
        "hidden_size": 8192,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "vocab_size": 32000,
        "torch_dtype": "float16",
    },
    "llama-2-7b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "vocab_size": 32000,
        "torch_dtype": "float16",
    },
    "llama-3.1-70b": {
        "model_type": "llama",
        "hidden_size": 8192,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "vocab_size": 128256,
        "torch_dtype": "bfloat16",
    },
    "llama-3.1-8b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "vocab_size": 128256,
        "torch_dtype": "bfloat16",
    },
    "mistral-nemo-12b": {
        "model_type": "mistral",
        "hidden_size": 5120,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 14336,
        "num_hidden_layers": 40,
        "vocab_size": 131072,
        "torch_dtype": "bfloat16",
    },
    "mixtral-8x7b": {
        "model_type": "mixtral",
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "vocab_size": 32000,
        "torch_dtype": "bfloat16",
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
    },
    "qwen2.5-7b": {
        "model_type": "qwen2",
        "hidden_size": 3584,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "vocab_size": 152064,
        "torch_dtype": "bfloat16",
    },
    "qwen3-14b": {
        "model_type": "qwen3",
        "hidden_size": 5120,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 17408,
        "num_hidden_layers": 40,
        "vocab_size": 151936,
        "torch_dtype": "bfloat16",
    },
    "qwen3-30b-a3b": {
        "model_type": "qwen3_moe",
        "hidden_size": 2048,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "intermediate_size": 6144,
        "num_hidden_layers": 48,
        "vocab_size": 151936,
        "torch_dtype": "bfloat16",
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    },
    "yi-34b": {
        "model_type": "llama",
        "hidden_size": 7168,
        "num_attention_heads": 56,
        "num_key_value_heads": 8,
        "intermediate_size": 20480,
        "num_hidden_layers": 60,
        "vocab_size": 64000,
        "torch_dtype": "bfloat16",
    },
}

# Spellings the generic rules of :func:`canonical_key` do not reach, keyed by the
# normalised form.
MODEL_ALIASES: dict[str, str] = {
    "mistral-nemo-2407": "mistral-nemo-12b",
    "mistral-nemo": "mistral-nemo-12b",
}

# Catalog name -> file name in shared/data/model_configs (for the consistency test).
CONFIG_FILES: dict[str, str] = {
    "codellama-34b": "codellama-34b-instruct-hf.json",
    "llama-2-70b": "llama-2-70b-hf.json",
    "llama-2-7b": "llama-2-7b-hf.json",
    "llama-3.1-70b": "llama-3.1-70b-instruct.json",
    "llama-3.1-8b": "llama-3.1-8b-instruct.json",
    "mistral-nemo-12b": "mistral-nemo-instruct-2407.json",
    "mixtral-8x7b": "mixtral-8x7b-v0.1.json",
    "qwen2.5-7b": "qwen2.5-7b-instruct.json",
    "qwen3-14b": "qwen3-14b.json",
    "qwen3-30b-a3b": "qwen3-30b-a3b.json",
    "yi-34b": "yi-34b.json",
}


def canonical_key(name: str) -> str:
    """The normalised form of a model name (not checked against the catalog).

    Rules, in order: blanks stripped; a Hugging Face organisation (``org/``) or the
    aiconfigurator file prefix (``org--``) dropped; lower case, ``_`` and spaces as
    ``-``; ``meta-llama-`` as ``llama-``; ``llama2``/``codellama2`` as ``llama-2``;
    the suffixes ``-hf``, ``-instruct`` and Mixtral's ``-v0.1``/``-v0-1`` dropped
    (the same weights' shapes); finally :data:`MODEL_ALIASES`.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    key = name.strip()
    key = key.rsplit("/", 1)[-1]
    key = key.split("--", 1)[-1]
    key = re.sub(r"[_\s]+", "-", key.lower())
    key = re.sub(r"^meta-(?=llama)", "", key)
    key = re.sub(r"^(code)?llama(\d)", r"\1llama-\2", key)
    key = re.sub(r"-(hf|instruct)(?=-|$)", "", key)
    key = re.sub(r"^(mixtral-.*)-v0[.-]1$", r"\1", key)
    return MODEL_ALIASES.get(key, key)


_AIC_PACKAGE = "aiconfigurator_core"


@functools.cache
def installed_configs() -> dict[str, pathlib.Path]:
    """Canonical key -> ``config.json`` path of each model config that an installed
    ``aiconfigurator-core`` ships (empty when it is not installed).

    Bundled catalog names take precedence (the same model under the same key).
    """
    if importlib.util.find_spec(_AIC_PACKAGE) is None:
        return {}
    root = pathlib.Path(str(importlib.resources.files(_AIC_PACKAGE) / "model_configs"))
    found: dict[str, pathlib.Path] = {}
    for path in sorted(root.glob("*_config.json")):
        if path.name.endswith("_hf_quant_config.json"):
            continue
        key = canonical_key(path.name.removesuffix("_config.json"))
        if key not in MODEL_CONFIGS:
            found.setdefault(key, path)
    return found


def hf_id(path: pathlib.Path) -> str:
    """The Hugging Face id of an aiconfigurator config file (``org/name``)."""
    return path.name.removesuffix("_config.json").replace("--", "/", 1)


def read_config_file(path: pathlib.Path) -> dict:
    """A ``config.json`` as a dict; a ``<stem>_hf_quant_config.json`` or
    ``hf_quant_config.json`` beside it (ModelOpt's quantization record) is merged in
    under ``"hf_quant_config"``."""
    config = json.loads(path.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"model config {str(path)!r} is not a JSON object")
    stem = path.name.removesuffix("config.json")
    for quant in (path.with_name(stem + "hf_quant_config.json"),):
        if stem and quant.is_file():
            config = dict(config, hf_quant_config=json.loads(quant.read_text()))
    plain = path.with_name("hf_quant_config.json")
    if path.name == "config.json" and plain.is_file():
        config = dict(config, hf_quant_config=json.loads(plain.read_text()))
    return config
