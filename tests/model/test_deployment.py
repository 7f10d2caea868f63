"""Deployments: tensor parallelism must split the attention heads."""

import pytest

import diffmodel as dm


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
