"""The Laplace approximation: exact on a linear-Gaussian problem, honest when the data
leaves a direction open."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmodel._fitting._laplace import flat, laplace


def _ols_problem(x: np.ndarray, y: np.ndarray):
    xj, yj = jnp.asarray(x), jnp.asarray(y)

    def objective(b):
        return jnp.mean((xj @ b - yj) ** 2)

    b_hat = np.linalg.lstsq(x, y, rcond=None)[0]
    return objective, jnp.asarray(b_hat)


def test_linear_gaussian_matches_the_ols_covariance():
    rng = np.random.default_rng(0)
    n = 200
    x = np.column_stack([np.ones(n), rng.normal(size=n), rng.normal(size=n)])
    y = x @ np.array([1.0, -0.5, 2.0]) + 0.3 * rng.normal(size=n)
    objective, b = _ols_problem(x, y)
    s2 = float(objective(b))
    lap = laplace(
        objective,
        b,
        n,
        raw_names=("a", "b", "c"),
        physical=lambda r: (("a", "b", "c"), r),
    )
    expected = s2 * np.linalg.inv(x.T @ x)
    np.testing.assert_allclose(np.asarray(lap.cov_raw), expected, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(lap.sd), np.sqrt(np.diag(expected)))
    assert lap.unpinned == ()
    assert lap.noise_sd == pytest.approx(np.sqrt(s2))


def test_delta_method_through_the_physical_map():
    rng = np.random.default_rng(1)
    n = 100
    x = np.column_stack([np.ones(n), rng.normal(size=n)])
    y = x @ np.array([0.2, 1.0]) + 0.1 * rng.normal(size=n)
    objective, b = _ols_problem(x, y)
    lap = laplace(
        objective,
        b,
        n,
        raw_names=("u", "v"),
        physical=lambda r: (("eu", "v"), jnp.stack([jnp.exp(r[0]), r[1]])),
    )
    cov = np.asarray(lap.cov_raw)
    assert float(lap.sd[0]) == pytest.approx(np.exp(float(b[0])) * np.sqrt(cov[0, 0]))


def test_collinear_columns_are_reported_as_a_trade_off():
    rng = np.random.default_rng(2)
    n = 50
    z = rng.normal(size=n)
    x = np.column_stack([np.ones(n), z, z])  # b and c enter only as b + c
    y = 1.0 + 2.0 * z + 0.1 * rng.normal(size=n)
    objective, b = _ols_problem(x, y)
    lap = laplace(
        objective,
        b,
        n,
        raw_names=("a", "b", "c"),
        physical=lambda r: (("a", "b", "c"), r),
    )
    assert len(lap.unpinned) == 1
    assert "b vs c" in lap.unpinned[0] or "c vs b" in lap.unpinned[0]
    assert "trade off" in lap.unpinned[0]
    sd = np.asarray(lap.sd)
    assert np.isfinite(sd[0]) and np.isinf(sd[1]) and np.isinf(sd[2])


def test_a_weak_prior_turns_infinite_into_large_and_named():
    rng = np.random.default_rng(3)
    n = 50
    z = rng.normal(size=n)
    x = np.column_stack([z, z])
    y = 2.0 * z + 0.1 * rng.normal(size=n)
    xj, yj = jnp.asarray(x), jnp.asarray(y)

    def objective(b):
        return jnp.mean((xj @ b - yj) ** 2) + 1e-6 * jnp.sum(b**2)

    b = jnp.asarray([1.0, 1.0])
    lap = laplace(
        objective,
        b,
        n,
        raw_names=("p", "q"),
        physical=lambda r: (("p", "q"), r),
        bounds=lambda r: r > 0.99,
    )
    assert np.all(np.isfinite(np.asarray(lap.sd)))
    assert np.all(np.asarray(lap.sd) > 1.0)
    assert len(lap.unpinned) == 1 and "trade off" in lap.unpinned[0]
    assert lap.at_bound == ("p", "q")


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="one entry per raw name"):
        laplace(
            lambda r: jnp.sum(r**2),
            jnp.zeros(3),
            10,
            raw_names=("a",),
            physical=lambda r: (("a",), r),
        )
    with pytest.raises(ValueError, match="n_rows"):
        laplace(
            lambda r: jnp.sum(r**2),
            jnp.zeros(1),
            0,
            raw_names=("a",),
            physical=lambda r: (("a",), r),
        )
    with pytest.raises(ValueError, match="not finite"):
        laplace(
            lambda r: jnp.log(r[0] - 1.0),
            jnp.zeros(1),
            5,
            raw_names=("a",),
            physical=lambda r: (("a",), r),
        )


def test_flat_round_trips_an_equinox_module():
    import equinox as eqx

    class M(eqx.Module):
        a: jax.Array
        b: jax.Array
        tag: str = eqx.field(static=True, default="x")

    m = M(a=jnp.arange(3.0), b=jnp.ones((2, 2)))
    vec, unflat = flat(m)
    assert vec.shape == (7,)
    back = unflat(vec + 1.0)
    np.testing.assert_allclose(np.asarray(back.b), 2.0)
    assert back.tag == "x"
