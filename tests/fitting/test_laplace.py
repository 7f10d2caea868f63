"""The Laplace approximation: exact on a linear-Gaussian problem, honest when the data
leaves a direction open."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmodel._fitting._laplace import flat, laplace

from helpers import unchecked


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


def test_a_collinear_pair_leaves_the_other_factors_finite_in_float32():
    # The flat direction is (0, 3, -1, 0) / sqrt(10) exactly; a float32 Hessian's
    # eigenvector carries rounding on every parameter, which must not make a and d
    # unbounded.
    rng = np.random.default_rng(5)
    n = 400
    z = rng.normal(size=n)
    w = z + 0.5 * rng.normal(size=n)
    x = np.column_stack([np.ones(n), z, 3.0 * z, w]).astype(np.float32)
    y = (1.0 + 2.0 * z - 0.7 * w + 0.1 * rng.normal(size=n)).astype(np.float32)
    objective, b = _ols_problem(x, y)
    lap = laplace(
        objective,
        b.astype(jnp.float32),
        n,
        raw_names=("a", "b", "c", "d"),
        physical=lambda r: (("a", "b", "c", "d"), r),
    )
    sd = np.asarray(lap.sd)
    assert np.isinf(sd[1]) and np.isinf(sd[2])
    # a and d: their OLS sd with b + 3 c as one column.
    x3 = x[:, [0, 1, 3]].astype(np.float64)
    s2 = float(objective(b))
    expected = np.sqrt(np.diag(s2 * np.linalg.inv(x3.T @ x3)))
    np.testing.assert_allclose(sd[[0, 3]], expected[[0, 2]], rtol=1e-2)


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
    with unchecked(), pytest.raises(ValueError, match="one entry per raw name"):
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


# ------------------------------------------------------------------ on factor sets


def _synthetic(n=120, noise=0.03, seed=0):
    from diffmodel._app._demo import synthetic_trace

    return synthetic_trace(steps_per_deployment=n, noise=noise, seed=seed)


@pytest.mark.slow
def test_fit_reports_sds_that_cover_the_true_factors():
    import diffmodel as dm
    from diffmodel._app._demo import TRUE_FACTORS

    frame = _synthetic()
    res = dm.fit(frame, target="step_time_us", factors="global")
    lap = res.laplace
    assert lap is not None and lap.noise_sd == pytest.approx(0.03, rel=0.3)
    summary = lap.summary()
    for name, true in TRUE_FACTORS.items():
        value, sd = summary[f"global.{name}"]
        if np.isfinite(sd) and sd > 0:
            assert abs(value - true) < 4 * sd + 1e-6 * abs(true), name
    table = res.table()
    assert any(c.endswith(" sd") for c in table.columns)


@pytest.mark.slow
def test_one_deployment_cannot_split_step_from_layer_overhead():
    import diffmodel as dm

    frame = _synthetic()
    one = frame[frame["experiment_id"] == frame["experiment_id"].iloc[0]]
    with pytest.warns(dm.IdentifiabilityWarning) as record:
        res = dm.fit(one, target="step_time_us", factors="global")
    text = " ".join(str(w.message) for w in record)
    assert "step_overhead_us" in text and "layer_overhead_us" in text
    assert "step_overhead_us" in res.identifiability()


@pytest.mark.slow
def test_predict_interval_from_a_fit_and_from_its_file(tmp_path):
    import diffmodel as dm

    frame = _synthetic(n=80, noise=0.05)
    res = dm.fit(frame, target="step_time_us", factors="global")
    out = dm.predict(frame, factors=res, interval=0.9)
    lo, mid, hi = (
        out[c].to_numpy()
        for c in ("predicted_lo_us", "predicted_us", "predicted_hi_us")
    )
    assert np.all(lo < mid) and np.all(mid < hi)
    y = frame["step_time_us"].to_numpy()
    cover = np.mean((y >= lo) & (y <= hi))
    assert 0.8 < cover < 0.98  # in-sample, 320 rows, nominal 0.9
    path = dm.save_factors(res, tmp_path / "f.json")
    again = dm.predict(frame, factors=path, interval=0.9)
    np.testing.assert_allclose(
        again["predicted_hi_us"], out["predicted_hi_us"], rtol=1e-9
    )
    narrow = dm.predict(frame, factors=res, interval=0.5)
    assert np.all(narrow["predicted_hi_us"] < out["predicted_hi_us"])


@pytest.mark.slow
def test_predict_interval_errors(tmp_path):
    import diffmodel as dm

    frame = _synthetic(n=40)
    with pytest.raises(ValueError, match="interval must be a probability"):
        dm.predict(frame, interval=1.2)
    with pytest.raises(ValueError, match="needs factors from a fit"):
        dm.predict(frame, interval=0.9)
    res = dm.fit(frame, target="step_time_us", factors="global", uncertainty=False)
    with pytest.raises(ValueError, match="uncertainty=False"):
        dm.predict(frame, factors=res, interval=0.9)
    path = dm.save_factors(res, tmp_path / "f.json")
    with pytest.raises(ValueError, match="'uncertainty' is missing"):
        dm.predict(frame, factors=path, interval=0.9)
