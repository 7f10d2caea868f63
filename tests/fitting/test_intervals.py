"""Prediction intervals: exact for a linear log model, covering their level on
simulated data, errors named."""

import jax.numpy as jnp
import numpy as np
import pytest

from helpers import unchecked


def test_interval_is_exact_for_a_linear_log_model():
    from diffmodel._fitting._intervals import interval

    x = jnp.asarray([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]])
    raw = jnp.asarray([0.5, -0.2])
    cov = jnp.asarray([[0.04, 0.01], [0.01, 0.09]])
    noise = jnp.asarray([0.1, 0.2, 0.3])
    t, lo, hi = interval(lambda r: x @ r, raw, cov, noise, level=0.9)
    mu = np.asarray(x @ raw)
    sd = np.sqrt(np.einsum("si,ij,sj->s", x, cov, x) + np.asarray(noise) ** 2)
    z = 1.6448536269514722
    np.testing.assert_allclose(t, np.exp(mu), rtol=1e-12)
    np.testing.assert_allclose(lo, np.exp(mu - z * sd), rtol=1e-10)
    np.testing.assert_allclose(hi, np.exp(mu + z * sd), rtol=1e-10)


def test_interval_covers_its_level_on_simulated_data():
    from diffmodel._fitting._intervals import interval, regime_noise_sd

    rng = np.random.default_rng(4)
    n = 4000
    prefill = rng.random(n) < 0.4
    noise = np.where(prefill, 0.3, 0.05)
    log_y = 1.0 + noise * rng.normal(size=n)
    sds = regime_noise_sd(log_y - 1.0, prefill)
    assert sds["prefill"] == pytest.approx(0.3, rel=0.05)
    assert sds["decode_only"] == pytest.approx(0.05, rel=0.05)
    per_row = np.where(prefill, sds["prefill"], sds["decode_only"])
    t, lo, hi = interval(
        lambda r: jnp.full(n, r[0]), jnp.asarray([1.0]), jnp.zeros((1, 1)), per_row
    )
    y = np.exp(log_y)
    for sel in (prefill, ~prefill):
        cover = np.mean((y[sel] >= lo[sel]) & (y[sel] <= hi[sel]))
        assert 0.87 < cover < 0.93


def test_interval_errors():
    from diffmodel._fitting._intervals import interval, regime_noise_sd

    with pytest.raises(ValueError, match="level"):
        interval(lambda r: r, jnp.zeros(1), jnp.zeros((1, 1)), jnp.zeros(1), level=1.5)
    with unchecked(), pytest.raises(ValueError, match="1-D of one length"):
        regime_noise_sd(np.zeros(3), np.zeros(2, bool))
    with pytest.raises(ValueError, match="finite"):
        regime_noise_sd(np.array([np.nan]), np.array([True]))
