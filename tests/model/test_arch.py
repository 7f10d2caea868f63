"""Architectures by name: unknown names, published parameter counts, the known
models."""

import pytest

import diffmodel as dm


def test_unknown_model_lists_known_ones():
    with pytest.raises(ValueError, match="unknown model 'gpt-5'.*llama-2-70b"):
        dm.architecture("gpt-5")


@pytest.mark.parametrize(
    ("name", "billions"),
    [
        ("deepseek-ai/DeepSeek-V3", 671.0),
        ("deepseek-r1", 671.0),
        ("moonshotai/Kimi-K2-Instruct", 1026.4),
        ("openai/gpt-oss-120b", 116.8),
        ("Qwen/Qwen3-235B-A22B", 235.1),
        ("meta-llama/Meta-Llama-3.1-405B", 405.8),
        ("mistralai/Mixtral-8x22B-v0.1", 140.6),
    ],
)
def test_hf_ids_and_parameter_counts(bundle, name, billions):
    # Published totals: DeepSeek-V3 671B (without its 14B MTP module), Kimi K2 1.04T
    # (with embeddings), gpt-oss-120b 116.8B, Qwen3-235B, Llama 405B, Mixtral 141B.
    a = dm.architecture(name)
    assert float(a.total_params()) / 1e9 == pytest.approx(billions, abs=0.05)


def test_known_models_include_the_bundle(bundle):
    names = dm.known_models()
    assert {"deepseek-v3", "gpt-oss-120b", "llama-2-70b"} <= set(names)
    with pytest.raises(ValueError, match="unknown model 'meta-llama/Llama-9-1T'"):
        dm.canonical_model("meta-llama/Llama-9-1T")
