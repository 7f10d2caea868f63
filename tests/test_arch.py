"""Architectures, the bundled catalog, hardware and deployments."""

import json

import numpy as np
import pytest

import diffmodel as dm
from diffmodel._model._catalog import CONFIG_FILES, MODEL_CONFIGS


@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_catalog_matches_shared_configs(name, data_dir):
    cfg = json.loads((data_dir / "model_configs" / CONFIG_FILES[name]).read_text())
    for key, value in MODEL_CONFIGS[name].items():
        assert cfg[key] == value, key
    a = dm.architecture(name)
    b = dm.Architecture.from_hf_config(data_dir / "model_configs" / CONFIG_FILES[name])
    for x, y in zip(a.__dict__.values(), b.__dict__.values(), strict=True):
        np.testing.assert_array_equal(x, y)


def test_head_dim_gqa_and_moe_fields():
    nemo = dm.architecture("mistral-nemo-12b")
    assert float(nemo.head_dim) == 128  # explicit head_dim, not 5120 / 32 = 160
    l70 = dm.architecture("llama-2-70b-hf")  # trace alias
    assert (float(l70.n_heads), float(l70.n_kv_heads)) == (64, 8)
    mix = dm.architecture("mixtral-8x7b-v0-1")
    assert (float(mix.n_experts), float(mix.top_k), float(mix.expert_ffn)) == (
        8,
        2,
        14336,
    )
    assert float(mix.ffn) == 0
    q = dm.architecture("qwen3-30b-a3b")
    assert (float(q.n_experts), float(q.top_k), float(q.expert_ffn)) == (128, 8, 768)
    # Mixtral 8x7B has 46.7B parameters.
    assert float(mix.total_params()) == pytest.approx(46.7e9, rel=0.01)


def test_dtype_overrides_and_bytes():
    assert float(dm.architecture("llama-2-70b").weight_bytes) == 2
    fp8 = dm.architecture("llama-2-70b", weight_dtype="fp8", kv_dtype="float8_e4m3fn")
    assert float(fp8.weight_bytes) == 1 and float(fp8.kv_bytes) == 1
    with pytest.raises(ValueError, match="unknown weight dtype 'fp7'"):
        dm.architecture("llama-2-70b", weight_dtype="fp7")


def test_unknown_model_lists_known_ones():
    with pytest.raises(ValueError, match="unknown model 'gpt-5'.*llama-2-70b"):
        dm.architecture("gpt-5")


def test_missing_and_unsupported_config_keys():
    cfg = dict(MODEL_CONFIGS["llama-2-7b"])
    del cfg["num_hidden_layers"]
    with pytest.raises(ValueError, match="missing required key 'num_hidden_layers'"):
        dm.Architecture.from_hf_config(cfg)
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        dm.Architecture.from_hf_config(
            dict(MODEL_CONFIGS["llama-2-7b"], model_type="gpt2")
        )
    with pytest.raises(ValueError, match="not found"):
        dm.Architecture.from_hf_config("/nonexistent/config.json")


def test_shared_experts_counted():
    cfg = dict(MODEL_CONFIGS["qwen3-30b-a3b"], shared_expert_intermediate_size=2048)
    a = dm.Architecture.from_hf_config(cfg)
    assert float(a.shared_ffn) == 2048


def test_hardware_catalog_and_custom():
    h = dm.hardware("H100")
    assert float(h.flops_16) == 989.5e12 and float(h.flops_8) == 1979e12
    assert float(h.hbm_bw) == 3.35e12 and float(h.link_bw) == 450e9
    a = dm.hardware("a100-sxm-80gb")
    assert float(a.flops_8) == float(a.flops_16) == 312e12  # no FP8 tensor cores
    assert float(dm.hardware("h200").hbm_bw) == 4.8e12
    assert "l40s" in dm.known_hardware()
    mine = dm.Hardware(flops_16=1e15, hbm_bw=5e12, link_bw=900e9)
    dep = dm.deployment("llama-2-7b", mine, 1)
    assert float(dep.hw.flops_8) == 1e15
    with pytest.raises(ValueError, match="unknown hardware 'tpu'.*h100-sxm"):
        dm.hardware("tpu")


@pytest.mark.parametrize("tp", [3, 5, 0, -2, 1.5])
def test_tp_must_split_heads(tp):
    with pytest.raises(ValueError, match="tp"):
        dm.deployment("llama-2-70b", "h100", tp)


def test_tp_beyond_kv_heads_replicates():
    # 4 KV heads, TP 8: each GPU holds one (replicated) KV head.
    dep = dm.deployment("qwen2.5-7b", "h100", 4)
    assert float(dep.tp) == 4
    with pytest.raises(ValueError, match="28 attention heads"):
        dm.deployment("qwen2.5-7b", "h100", 8)
