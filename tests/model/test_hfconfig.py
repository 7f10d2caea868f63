"""Hugging Face configs: fields, dtypes, quantized checkpoints, multimodal wrappers,
and what the physics cannot model named."""

import json

import pytest

import diffmodel as dm
from diffmodel._model._catalog import MODEL_CONFIGS


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


def test_deepseek_v3_fields(bundle):
    a = dm.architecture("deepseek-ai/DeepSeek-V3")
    got = {k: float(getattr(a, k)) for k in a.__dict__}
    assert got["kv_lora_rank"] == 512 and got["qk_rope_dim"] == 64
    assert got["q_lora_rank"] == 1536 and got["head_dim"] == 192
    assert got["v_head_dim"] == 128 and got["dense_layers"] == 3
    assert got["moe_layers"] == 58
    assert (got["n_experts"], got["top_k"], got["expert_ffn"]) == (256, 8, 2048)
    assert got["shared_ffn"] == 2048 and got["ffn"] == 18432
    # FP8 with 128x128 fp32 block scales, per-token-group activation quantization.
    assert got["weight_bytes"] == 1 + 4 / 128**2 and got["compute_bytes"] == 1
    # Its routed experts are the same block FP8: the FP8 peak, not the 16-bit one.
    assert got["expert_weight_bytes"] == got["weight_bytes"]
    assert got["expert_compute_bytes"] == 1
    assert got["quant_passes"] == 1 and got["head_weight_bytes"] == 2
    assert got["kv_bytes"] == 2


def test_gpt_oss_fields(bundle):
    a = dm.architecture("gpt-oss-120b")
    assert float(a.window) == 128 and float(a.window_layers) == 18
    assert float(a.expert_weight_bytes) == 0.5 + 1 / 32  # MXFP4 experts
    assert float(a.expert_compute_bytes) == 2 and float(a.weight_bytes) == 2
    assert (float(a.n_experts), float(a.top_k)) == (128, 4)


def test_quantized_checkpoints(bundle, tmp_path):
    q = dm.architecture("Qwen/Qwen3-30B-A3B-FP8")
    assert float(q.weight_bytes) == 1 + 4 / 128**2
    assert float(q.expert_compute_bytes) == 1 == float(q.compute_bytes)
    # ModelOpt FP8: the algorithm and FP8 KV in the hf_quant_config.json beside it.
    ll = dm.architecture("nvidia/Llama-3.1-70B-Instruct-FP8")
    assert (float(ll.weight_bytes), float(ll.kv_bytes)) == (1, 1)
    assert float(ll.quant_passes) == 1 and float(ll.head_weight_bytes) == 2
    nv = dm.architecture("nvidia/Qwen3-235B-A22B-NVFP4")
    assert float(nv.weight_bytes) == 0.5625 and float(nv.compute_bytes) == 0.5
    # ... experts too: NVFP4 like the rest, at the FP4 peak (not the FP8 one their
    # 0.5625 bytes alone would pick).
    assert float(nv.expert_weight_bytes) == 0.5625
    assert float(nv.expert_compute_bytes) == 0.5
    # A user's own folder: config.json plus hf_quant_config.json.
    cfg = dict(dm._model._arch.model_config("llama-3.1-8b"))
    cfg.pop("_name")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    quant = {"quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"}}
    (tmp_path / "hf_quant_config.json").write_text(json.dumps(quant))
    mine = dm.Architecture.from_hf_config(tmp_path / "config.json")
    assert (float(mine.weight_bytes), float(mine.kv_bytes)) == (1, 1)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("nvidia/Nemotron-H-56B-Base-8K", "unsupported model_type 'nemotron_h'"),
        ("Qwen/Qwen3-VL-8B-Instruct", "vision encoder is not modelled"),
    ],
)
def test_unsupported_bundle_models_name_why(bundle, name, message):
    with pytest.raises(ValueError, match=message):
        dm.architecture(name)


def test_fields_the_physics_cannot_use_are_named():
    ds = dict(MODEL_CONFIGS["llama-2-7b"], attention_chunk_size=8192)
    with pytest.raises(ValueError, match="attention_chunk_size"):
        dm.Architecture.from_hf_config(ds)
    ix = dict(MODEL_CONFIGS["llama-2-7b"], index_topk=2048)
    with pytest.raises(ValueError, match="index_topk"):
        dm.Architecture.from_hf_config(ix)
    lt = dict(MODEL_CONFIGS["llama-2-7b"], layer_types=["linear_attention"] * 32)
    with pytest.raises(ValueError, match=r"layer_types \['linear_attention'\]"):
        dm.Architecture.from_hf_config(lt)
    q = dict(MODEL_CONFIGS["llama-2-7b"], quantization_config={"quant_method": "awq"})
    with pytest.raises(ValueError, match="quantization 'awq' is not modelled"):
        dm.Architecture.from_hf_config(q)
    # Neutral values of the same keys are harmless.
    ok = dict(MODEL_CONFIGS["qwen3-30b-a3b"], use_sliding_window=False)
    dm.Architecture.from_hf_config(ok)


def test_text_only_wrappers(bundle):
    a = dm.architecture("Qwen/Qwen3-VL-30B-A3B-Instruct", text_only=True)
    b = dm.architecture("qwen3-30b-a3b")
    assert float(a.total_params()) == float(b.total_params())


def test_dsa_configs(bundle_deepseek):
    v32 = dm.architecture("deepseek-ai/DeepSeek-V3.2")
    assert (float(v32.window), float(v32.index_heads), float(v32.index_dim)) == (
        2048,
        64,
        128,
    )
    assert float(v32.index_layers) == 61 == float(v32.window_layers)
    glm = dm.architecture("zai-org/GLM-5.3")  # 'shared' layers reuse the top-k
    assert float(glm.index_layers) == 21 and float(glm.dense_layers) == 3
    assert float(glm.total_params()) / 1e9 == pytest.approx(743.4, abs=0.1)
