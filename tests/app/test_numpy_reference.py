"""The benchmark's NumPy copy of the roofline agrees with ``step_time`` (float64)."""

import jax.numpy as jnp
import numpy as np
import pytest

import diffmodel as dm
from diffmodel._app._numpy_reference import numpy_step_time, numpy_tables

DEPLOYMENTS = (("llama-2-70b", 4), ("codellama-34b", 2), ("mixtral-8x7b", 2))


def _columns(stats: dm.BatchStats) -> list[np.ndarray]:
    return [
        np.asarray(getattr(stats, f), float) for f in dm.BatchStats.__dataclass_fields__
    ]


@pytest.mark.slow
def test_hand_checkable_steps_agree():
    """An idle step, one decode token, a fractional (relaxed) step, a mixed batch
    and a big prefill, on a dense and an MoE model."""
    stats = dm.from_aggregates(
        prefill_tokens=np.array([0.0, 0.0, 0.0, 512.0, 2048.0, 0.0]),
        decode_tokens=np.array([0.0, 1.0, 0.5, 32.0, 0.0, 64.0]),
        num_prefill=np.array([0.0, 0.0, 0.0, 1.0, 2.0, 0.0]),
        num_decode=np.array([0.0, 1.0, 1.0, 32.0, 0.0, 64.0]),
        kv_tokens=np.array([0.0, 900.0, 900.0, 32_000.0, 0.0, 64_000.0]),
        prefill_context_tokens=np.array([0.0, 0.0, 0.0, 100.0, 0.0, 0.0]),
    )
    group = np.array([0, 0, 0, 0, 1, 2], dtype=np.int32)
    deps = dm.stack_deployments(
        [dm.deployment(m, "h100-sxm", t) for m, t in DEPLOYMENTS]
    )
    fac = dm.default_factors()
    want = dm.step_time(stats, deps.take(jnp.asarray(group)), fac).total
    dep_np, fac_np = numpy_tables(deps, fac, np.float64)
    got = numpy_step_time(_columns(stats), group, dep_np, fac_np)
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-12)
    # The idle step is the per-step overhead alone (1000 us at the priors).
    assert got[0] == pytest.approx(float(fac.step_overhead_us))


@pytest.mark.slow
def test_random_steps_agree():
    from diffmodel._app._bench import make_steps

    stats, group = make_steps(2_000, seed=4)
    stats = dm.BatchStats(*(jnp.asarray(c, float) for c in _columns(stats)))
    deps = dm.stack_deployments(
        [dm.deployment(m, "h100-sxm", t) for m, t in DEPLOYMENTS]
    )
    fac = dm.default_factors()
    want = np.asarray(dm.step_time(stats, deps.take(jnp.asarray(group)), fac).total)
    dep_np, fac_np = numpy_tables(deps, fac, np.float64)
    got = numpy_step_time(_columns(stats), group, dep_np, fac_np)
    np.testing.assert_allclose(got, want, rtol=1e-12)
