"""The rewritten evaluator: step_time_fast's value and gradient, affine folding and
per-group tables."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffmodel as dm
from diffmodel._bulk._bulk import step_time_fast
from diffmodel._model._roofline import step_time_batch

from helpers import direct_step_time, random_stats


@pytest.mark.slow
def test_step_time_fast_value_and_grad(deps):
    stats = jax.tree.map(jnp.asarray, random_stats(200, seed=6))
    group = jnp.asarray(np.random.default_rng(7).integers(0, 3, 200))
    fac = dm.default_factors()
    actual = direct_step_time(stats, deps, group)["total"] * 1.3

    def loss(f, fast):
        if fast:
            pred = step_time_fast(stats, deps, group, f)
        else:
            pred = step_time_batch(stats, deps, group, f, check=False).total
        return jnp.mean((jnp.log(pred) - jnp.log(actual)) ** 2)

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    v0, g0 = value_and_grad(fac, False)
    v1, g1 = value_and_grad(fac, True)
    np.testing.assert_allclose(v1, v0, rtol=1e-10)
    for name in dm.FACTOR_NAMES:
        np.testing.assert_allclose(
            getattr(g1, name), getattr(g0, name), rtol=1e-8, atol=1e-14, err_msg=name
        )


def test_affine_folding_combines_coefficients_per_group():
    from diffmodel._bulk._rewrite import _Evaluator, _PerGroup

    # (w1 + x a1) + (w2 - x a2), divided by a1, plus 2 y: the coefficients of x and
    # the constants combine per group, so two tables meet the steps (x's
    # coefficient and the constant) and y's constant factor needs none.
    def f(x, y, w1, a1, w2, a2):
        return ((w1 + x * a1) + (w2 - x * a2)) / a1 + y * 2.0

    rng = np.random.default_rng(4)
    n, groups = 64, 3
    x, y = rng.uniform(0, 10, n), rng.uniform(0, 10, n)
    tabs = [rng.uniform(1, 2, groups) for _ in range(4)]
    g = rng.integers(0, groups, n)
    closed = jax.make_jaxpr(f)(x, y, *(t[g] for t in tabs))
    ev = _Evaluator(jnp.asarray(g), groups)
    args = [jnp.asarray(x), jnp.asarray(y), *(_PerGroup(jnp.asarray(t)) for t in tabs)]
    (got,) = ev.eval(closed.jaxpr, closed.consts, args)
    np.testing.assert_allclose(got, f(x, y, *(t[g] for t in tabs)), rtol=1e-12)
    assert len(ev.collected) == 2


def test_nested_jit_and_spread_constants_stay_per_group():
    from diffmodel._bulk._rewrite import _Evaluator, _PerGroup

    # jnp.where is a nested jit that broadcasts its scalar: with per-group inputs its
    # result, and the log of it, are still computed once per group, so one table
    # (the log) meets the steps and no log runs per step.
    def f(x, e, k):
        return x * jnp.log(jnp.where(e > 0, 1.0 - k / jnp.where(e > 0, e, 1.0), 1.0))

    rng = np.random.default_rng(5)
    n, groups = 32, 3
    x = rng.uniform(0, 10, n)
    e, k = np.array([0.0, 8.0, 64.0]), np.array([0.0, 2.0, 6.0])
    g = rng.integers(0, groups, n)
    closed = jax.make_jaxpr(f)(x, e[g], k[g])
    ev = _Evaluator(jnp.asarray(g), groups)
    args = [jnp.asarray(x), _PerGroup(jnp.asarray(e)), _PerGroup(jnp.asarray(k))]
    (got,) = ev.eval(closed.jaxpr, closed.consts, args)
    np.testing.assert_allclose(got, f(x, e[g], k[g]), rtol=1e-12)
    assert len(ev.collected) == 1
    lowered = jax.jit(
        lambda x: _Evaluator(jnp.asarray(g), groups).eval(
            closed.jaxpr, closed.consts, [x, *args[1:]]
        )[0]
    ).lower(jnp.asarray(x))
    logs = [ln for ln in lowered.as_text().splitlines() if "stablehlo.log" in ln]
    assert logs and all("tensor<3xf64>" in ln for ln in logs)  # per group only


def test_terms_with_a_zero_coefficient_in_every_group_are_left_out():
    from diffmodel._bulk._rewrite import _Evaluator, _PerGroup, _table_plan

    # x a + (y / (y + 1)) b + w: b is 0 in every group (a sliding window no model of
    # the call has), so its term goes, and with it the division that formed it; the
    # value is unchanged. Without the zero marks in the plan the division stays.
    def f(x, y, a, b, w):
        return x * a + (y / (y + 1.0)) * b + w

    rng = np.random.default_rng(8)
    n, groups = 32, 3
    x, y = rng.uniform(0, 10, n), rng.uniform(0, 10, n)
    a, b, w = rng.uniform(1, 2, groups), np.zeros(groups), rng.uniform(1, 2, groups)
    g = rng.integers(0, groups, n)
    closed = jax.make_jaxpr(f)(x, y, a[g], b[g], w[g])
    tables = [_PerGroup(jnp.asarray(t)) for t in (a, b, w)]
    first = _Evaluator(jnp.asarray(g), groups)
    first.eval(closed.jaxpr, closed.consts, [jnp.asarray(x), jnp.asarray(y), *tables])
    distinct, plan = _table_plan(first.collected)
    assert [p[2] for p in plan] == [False, True, False]

    def run(plan):
        def fn(x, y):
            ev = _Evaluator(jnp.asarray(g), groups, (distinct, plan))
            return ev.eval(closed.jaxpr, closed.consts, [x, y, *tables])[0]

        return jax.jit(fn), (jnp.asarray(x), jnp.asarray(y))

    want = f(x, y, a[g], b[g], w[g])
    for p, divisions in ((plan, 0), (tuple((s, j, False) for s, j, _ in plan), 1)):
        fn, args = run(p)
        np.testing.assert_allclose(fn(*args), want, rtol=1e-12)
        hlo = fn.lower(*args).compile().as_text()
        assert hlo.count(" divide(") == divisions
