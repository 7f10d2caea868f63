"""The bundled catalog against the shared configs, and the one canonicaliser of
model names."""

import json

import numpy as np
import pytest

import diffmodel as dm
from diffmodel import canonical_model
from diffmodel._model._catalog import CONFIG_FILES, MODEL_CONFIGS

from helpers import unchecked


@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_catalog_matches_shared_configs(name, data_dir):
    cfg = json.loads((data_dir / "model_configs" / CONFIG_FILES[name]).read_text())
    for key, value in MODEL_CONFIGS[name].items():
        assert cfg[key] == value, key
    a = dm.architecture(name)
    b = dm.Architecture.from_hf_config(data_dir / "model_configs" / CONFIG_FILES[name])
    for x, y in zip(a.__dict__.values(), b.__dict__.values(), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("llama-2-70b-hf", "llama-2-70b"),
        ("llama-2-70b", "llama-2-70b"),
        ("llama-2-7b-hf", "llama-2-7b"),
        ("mixtral-8x7b-v0-1", "mixtral-8x7b"),
        ("codellama-34b", "codellama-34b"),
        (" CodeLlama-34B ", "codellama-34b"),
        ("qwen3-14b", "qwen3-14b"),
        ("meta-llama/Llama-3.1-70B", "llama-3.1-70b"),
        ("meta-llama/Meta-Llama-3.1-70B-Instruct", "llama-3.1-70b"),
        ("llama2-70b", "llama-2-70b"),
        ("Llama_2_70b_hf", "llama-2-70b"),
        ("codellama/CodeLlama-34b-Instruct-hf", "codellama-34b"),
    ],
)
def test_canonical_model(name, expected):
    assert canonical_model(name) == expected


@pytest.mark.parametrize("bad", ["", "  ", None, 3])
def test_canonical_model_rejects_non_names(bad):
    with pytest.raises(ValueError, match="non-empty string"), unchecked():
        canonical_model(bad)
