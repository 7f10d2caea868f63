"""The optimiser contract: results, failure modes, any optax solver, compile reuse."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
import pytest

import diffmodel as dm
from diffmodel._fitting._factorsets import init_factor_set
from diffmodel._fitting._fit import fit_arrays, step_data
from diffmodel._fitting._optimise import COMPILE_CLOCK, make_optimizer


def quadratic(p, args):
    """``sum((p - target)^2 * scale)``: minimum at ``target``."""
    target, scale = args
    return jnp.sum(scale * (p - target) ** 2)


def log_loss(p, args):
    """NaN once ``p`` goes negative."""
    return jnp.sum(jnp.log(p) ** 2) + jnp.sum(args * p)


ARGS = (jnp.array([1.0, -2.0, 3.0]), jnp.array([1.0, 2.0, 0.5]))


def test_lbfgs_converges_successfully():
    res = dm.minimise(quadratic, jnp.zeros(3), ARGS, solver="lbfgs", max_steps=100)
    assert res.result == "successful" and res.converged
    np.testing.assert_allclose(res.params, ARGS[0], atol=1e-6)
    assert res.loss == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize(
    "solver",
    [
        optax.lbfgs(),
        optax.lbfgs(memory_size=3),
        optax.adam(0.1),
        optax.chain(optax.clip_by_global_norm(10.0), optax.adam(0.1)),
        optax.sgd(0.1),
    ],
    ids=["lbfgs", "lbfgs-m3", "adam", "chain", "sgd"],
)
def test_any_optax_solver_object(solver):
    res = dm.minimise(quadratic, jnp.zeros(3), ARGS, solver=solver, max_steps=2000)
    np.testing.assert_allclose(res.params, ARGS[0], atol=1e-3)
    assert res.result in ("successful", "max_steps_reached")


def test_plain_gradient_transformation_is_accepted():
    inner = optax.scale(-0.1)
    plain = optax.GradientTransformation(inner.init, inner.update)
    assert not isinstance(plain, optax.GradientTransformationExtraArgs)
    res = dm.minimise(quadratic, jnp.zeros(3), ARGS, solver=plain, max_steps=500)
    np.testing.assert_allclose(res.params, ARGS[0], atol=1e-4)


def test_lbfgs_is_recognised_by_its_state_not_its_name():
    # A line-searched solver gets value_fn: with it L-BFGS solves this in few steps.
    res = dm.minimise(quadratic, jnp.zeros(3), ARGS, solver=optax.lbfgs())
    assert res.converged and int(res.n_steps) < 30


def test_string_shorthands_are_the_same_objects():
    a = make_optimizer("lbfgs", learning_rate=0.1, max_steps=10)
    assert a is make_optimizer("lbfgs", learning_rate=0.1, max_steps=10)
    with pytest.raises(ValueError, match="solver must be"):
        dm.minimise(quadratic, jnp.zeros(3), ARGS, solver="newton")


def test_max_steps_reached_is_reported_not_raised():
    res = dm.minimise(quadratic, jnp.zeros(3), ARGS, solver="adam", max_steps=3)
    assert res.result == "max_steps_reached" and not res.converged
    assert int(res.n_steps) == 3


def test_nan_start_is_nonfinite_and_raises_by_default():
    start = jnp.array([jnp.nan, 1.0, 1.0])
    with pytest.raises(ValueError, match="not finite at step 0"):
        dm.minimise(quadratic, start, ARGS, solver="lbfgs")
    res = dm.minimise(quadratic, start, ARGS, solver="lbfgs", throw=False)
    assert res.result == "nonfinite" and not res.converged
    assert int(res.n_steps) == 1 and np.isnan(res.loss)


def test_nan_midway_returns_the_last_finite_parameters():
    # Plain SGD with a large step jumps to p < 0, where log is NaN.
    args = jnp.array([100.0])
    res = dm.minimise(
        log_loss, jnp.array([1.0]), args, solver=optax.sgd(0.1), throw=False
    )
    assert res.result == "nonfinite"
    assert np.isfinite(float(log_loss(res.params, args)))
    with pytest.raises(ValueError, match="not finite"):
        dm.minimise(log_loss, jnp.array([1.0]), args, solver=optax.sgd(0.1))


def test_infinite_gradient_is_nonfinite():
    def sqrt_loss(p, args):
        return jnp.sum(jnp.sqrt(p))  # gradient +inf at 0

    res = dm.minimise(sqrt_loss, jnp.zeros(2), None, solver="adam", throw=False)
    assert res.result == "nonfinite"


def test_validation_early_stopping_is_successful_and_keeps_the_best():
    def valid(p, args):  # best at p = 0.5, the training minimum is 1
        return jnp.sum((p - 0.5) ** 2)

    res = dm.minimise(
        quadratic,
        jnp.zeros(1),
        (jnp.ones(1), jnp.ones(1)),
        solver=optax.sgd(0.01),
        valid_fn=valid,
        patience=5,
        max_steps=5000,
    )
    assert res.result == "successful" and int(res.n_steps) < 5000
    assert float(res.params[0]) == pytest.approx(0.5, abs=0.02)


def test_prepare_runs_once_on_the_start_for_both_losses():
    """``prepare`` turns raw data into ``fn``'s form inside the compiled call: the
    fit equals one on prepared data, the validation data are prepared too, and the
    optimised values carry no gradient through it."""

    def prepare(p, args):  # the rows' mean as the target; p only at the start
        rows, scale = args
        return rows.mean(0) + 0.0 * p, scale

    rows = jnp.stack([ARGS[0] - 1.0, ARGS[0] + 1.0])
    res = dm.minimise(
        quadratic,
        jnp.zeros(3),
        (rows, ARGS[1]),
        solver="lbfgs",
        max_steps=100,
        prepare=prepare,
        valid_fn=quadratic,
        valid_args=(rows, ARGS[1]),
    )
    ref = dm.minimise(quadratic, jnp.zeros(3), ARGS, solver="lbfgs", max_steps=100)
    np.testing.assert_allclose(res.params, ref.params, atol=1e-6)
    # The validation loss saw the prepared rows (the raw ones do not broadcast
    # against the parameters): the same data, so the same history.
    n = int(res.n_steps)
    np.testing.assert_allclose(res.valid_history[:n], res.loss_history[:n])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_steps": 0}, "max_steps"),
        ({"patience": 0}, "patience"),
        ({"callback_every": 0}, "callback_every"),
        ({"solver": "adam", "learning_rate": -1.0}, "learning_rate"),
    ],
)
def test_bad_options_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dm.minimise(quadratic, jnp.zeros(3), ARGS, **kwargs)


def test_new_data_of_the_same_shape_compiles_nothing():
    traces = []

    def counted(p, args):
        traces.append(1)
        return quadratic(p, args)

    solver = optax.lbfgs()
    first = dm.minimise(counted, jnp.zeros(3), ARGS, solver=solver)
    before = COMPILE_CLOCK.compiles()
    other = (jnp.array([4.0, 5.0, 6.0]), jnp.array([1.0, 1.0, 1.0]))
    second = dm.minimise(counted, jnp.ones(3), other, solver=solver)
    assert COMPILE_CLOCK.compiles() == before
    n_traces = len(traces)
    dm.minimise(counted, jnp.ones(3), other, solver=solver)
    assert len(traces) == n_traces  # no new trace either
    np.testing.assert_allclose(second.params, other[0], atol=1e-6)
    assert first.compile_seconds > 0 and second.compile_seconds == 0.0


def _frame(seed):
    rng = np.random.default_rng(seed)
    n = 40
    nd = rng.integers(1, 64, n)
    f = pd.DataFrame(
        {
            "prefill_tokens": rng.choice([0, 128], n),
            "decode_tokens": nd,
            "num_decode_reqs": nd,
            "kv_tokens": nd * 500,
            "model": np.where(np.arange(n) % 2, "llama-2-7b", "llama-2-70b"),
            "tp": np.where(np.arange(n) % 2, 1, 4),
        }
    )
    f["num_prefill_reqs"] = (f.prefill_tokens > 0).astype(int)
    f["t_us"] = dm.predict(f).predicted_us * rng.uniform(1.0, 1.3, n)
    return f


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["global", "per-model", "study-9"])
def test_second_fit_on_same_shape_data_compiles_nothing(kind):
    first = dm.fit(_frame(0), target="t_us", factors=kind, max_steps=50)
    before = COMPILE_CLOCK.compiles()
    second = dm.fit(_frame(1), target="t_us", factors=kind, max_steps=50)
    assert COMPILE_CLOCK.compiles() == before
    assert second.compile_seconds == 0.0 < first.compile_seconds
    assert second.loss != first.loss  # new data, same compiled loop


@pytest.mark.slow
def test_fit_with_nan_start_is_nonfinite():
    f = _frame(0)
    data, labels = step_data(f)
    fs = init_factor_set("global", labels)
    bad = eqx.tree_at(lambda s: s.raw, fs, jnp.full(fs.raw.shape, jnp.nan))
    y = f["t_us"].to_numpy()
    with pytest.raises(ValueError, match="not finite at step 0"):
        fit_arrays(bad, data, y)
    res = fit_arrays(bad, data, y, throw=False)
    assert res.result == "nonfinite" and not res.converged
    res = dm.fit(f, target="t_us", solver=optax.lbfgs(), max_steps=100)
    h = np.asarray(res.loss_history)[: res.n_steps]
    assert res.result != "nonfinite" and np.isfinite(h).all() and h[-1] < h[0] / 2


def test_jit_of_minimise_result_params_equal_eager_loss():
    res = dm.minimise(quadratic, jnp.zeros(3), ARGS, solver="lbfgs")
    assert float(jax.jit(quadratic)(res.params, ARGS)) == pytest.approx(
        float(quadratic(res.params, ARGS)), abs=1e-12
    )
