"""The throughput benchmark's pieces: aiconfigurator-core's rate."""

import pytest

from diffmodel._app._bench import aiconfigurator_rate, make_steps


@pytest.mark.slow
def test_aiconfigurator_rate_times_the_dense_deployments_only():
    stats, group = make_steps(400)
    r = aiconfigurator_rate(stats, group, 20, repeats=1)
    assert r["aic_timed_steps"] == 20 and r["aic_steps_per_s"] > 0
