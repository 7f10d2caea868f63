"""aiconfigurator-core's step times as a baseline."""

import numpy as np
import pandas as pd
import pytest


def test_aiconfigurator_asks_the_engine_once_per_request_shape():
    pytest.importorskip("aiconfigurator_core")
    from diffmodel.baselines import aiconfigurator_step_us
    from diffmodel.baselines._aiconfigurator import OSL, _engine

    rows = pd.DataFrame(
        {
            "prefill_tokens": [0, 512, 0, 0, 300],
            "decode_tokens": [32, 16, 32, 0, 0],
            "num_prefill_reqs": [0, 1, 0, 0, 2],
            "num_decode_reqs": [32, 16, 32, 0, 0],
            "kv_tokens": [32 * 1000, 16 * 2000, 32 * 1000, 0, 0],
            "prefill_context_tokens": [0, 0, 0, 0, 100],
        }
    )
    got = aiconfigurator_step_us(rows, model="llama-2-7b", hardware="h100", tp=1)
    e = _engine("llama-2-7b", "h100_sxm", 1)
    # Decode context per request = isl + OSL // 2 + 1; one isl for a mixed step.
    want = [
        e.decode_step_latency(32, 1000 - 2, OSL),
        e.mixed_step_latency(512, 16, 2000 - 2, OSL),
        e.decode_step_latency(32, 1000 - 2, OSL),
        np.nan,
        e.mixed_step_latency(300, 0, (300 + 100) // 2, OSL),
    ]
    np.testing.assert_allclose(got, np.array(want) * 1e3, rtol=1e-12)
    assert got[0] == got[2] and got[1] > got[0]


def test_aiconfigurator_refuses_what_it_cannot_write():
    pytest.importorskip("aiconfigurator_core")
    from diffmodel.baselines import aiconfigurator_step_us

    rows = pd.DataFrame(
        {"prefill_tokens": [0], "decode_tokens": [1], "num_prefill_reqs": [0]}
        | {"num_decode_reqs": [1], "kv_tokens": [100]}
    )
    with pytest.raises(ValueError, match="dense 16-bit GQA models only"):
        aiconfigurator_step_us(rows, model="Qwen/Qwen3-30B-A3B", tp=1)
