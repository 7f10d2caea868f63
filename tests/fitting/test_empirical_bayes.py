"""The hierarchical prior's between-group scale by empirical Bayes."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffmodel as dm
from diffmodel._fitting._empirical_bayes import (
    PriorScaleChoice,
    choose_prior_scale,
    log_evidence,
)

from helpers import host_frame, unchecked


def _random_effects(seed=0, groups=6, per=40, tau=0.3, s=0.1):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(groups), per)
    y = 1.0 + rng.normal(0.0, tau, groups)[g] + rng.normal(0.0, s, g.size)
    return g, y


def _exact_log_marginal(g, y, tau, s):
    """log p(y | tau) of ``y = mu + o_g + e`` (``o ~ N(0, tau^2)``, ``e ~ N(0,
    s^2)``, flat prior on ``mu``), up to a constant independent of ``tau``."""
    z = np.eye(g.max() + 1)[g]
    cov = s**2 * np.eye(len(y)) + tau**2 * z @ z.T
    inv = np.linalg.inv(cov)
    one = np.ones(len(y))
    mu = one @ inv @ y / (one @ inv @ one)
    r = y - mu
    return float(
        -0.5 * np.linalg.slogdet(cov)[1]
        - 0.5 * r @ inv @ r
        - 0.5 * np.log(one @ inv @ one)
    )


def _laplace_log_evidence(g, y, tau, s):
    """``log_evidence`` from the fit's objective ``J = mean(r^2) + s^2 / N
    sum(o^2) / tau^2`` at its optimum and its Hessian's eigenvalues."""
    n, m = len(y), int(g.max()) + 1
    gj, yj = jnp.asarray(g), jnp.asarray(y)

    def objective(p):
        mu, o = p[0], p[1:]
        return jnp.mean((yj - mu - o[gj]) ** 2) + s**2 / n * jnp.sum(o**2) / tau**2

    # Quadratic: one Newton step from 0 is the optimum.
    p0 = jnp.zeros(m + 1)
    hess = jax.hessian(objective)(p0)
    p = p0 - jnp.linalg.solve(hess, jax.grad(objective)(p0))
    return log_evidence(
        float(objective(p)),
        np.linalg.eigvalsh(np.asarray(hess)),
        n_rows=n,
        n_offsets=m,
        noise_sd=s,
        prior_scale=tau,
    )


def test_the_laplace_evidence_is_exact_on_a_linear_gaussian_model():
    g, y = _random_effects(groups=30, per=20)
    taus = (0.03, 0.1, 0.3, 1.0, 3.0)
    exact = np.array([_exact_log_marginal(g, y, t, 0.1) for t in taus])
    laplace = np.array([_laplace_log_evidence(g, y, t, 0.1) for t in taus])
    # Equal up to one constant: the differences between scales agree.
    np.testing.assert_allclose(laplace - laplace[0], exact - exact[0], atol=1e-6)
    # And the best scale is near the truth (0.3).
    assert taus[int(np.argmax(laplace))] == 0.3


def test_choose_prior_scale_takes_the_highest_evidence_and_checks_its_input():
    g, y = _random_effects(seed=1, tau=0.05)
    taus = (0.01, 0.05, 0.3, 1.0)

    class _Fit:  # what choose_prior_scale reads of a FitResult
        def __init__(self, tau, s):
            n, m = len(y), int(g.max()) + 1
            z = np.column_stack([np.ones(n), np.eye(m)[g]])
            hess = 2.0 / n * z.T @ z
            hess[1:, 1:] += 2.0 * s**2 / n / tau**2 * np.eye(m)
            p = np.linalg.solve(hess, 2.0 / n * z.T @ y)
            self.loss = (
                float(np.mean((y - z @ p) ** 2))
                + s**2 / n * float(np.sum(p[1:] ** 2)) / tau**2
            )
            self.laplace = type("L", (), {"eigenvalues": np.linalg.eigvalsh(hess)})
            self.factor_set = type("F", (), {"offsets": p[1:]})

    choice = choose_prior_scale(_Fit, n_rows=len(y), noise_sd=0.1, grid=taus)
    assert isinstance(choice, PriorScaleChoice)
    assert list(choice.table.index) == list(taus)
    assert choice.prior_scale == choice.table["log_evidence"].idxmax() == 0.05
    assert choice.table.loc[1.0, "offset_rms"] > choice.table.loc[0.01, "offset_rms"]
    with pytest.raises(ValueError, match="grid must hold scales > 0"):
        choose_prior_scale(_Fit, n_rows=len(y), noise_sd=0.1, grid=(0.1, -1.0))
    with pytest.raises(ValueError, match="noise_sd must be > 0"):
        choose_prior_scale(_Fit, n_rows=len(y), noise_sd=0.0)


def _two_deployments():
    frame = host_frame(60, models=(("codellama-34b", 2), ("llama-2-70b", 4)))
    pred = dm.predict(frame, factors=None)["predicted_us"].to_numpy()
    scale = np.where(frame["model"] == "llama-2-70b", 1.15, 0.9)
    rng = np.random.default_rng(2)
    return frame.assign(
        iteration_time_us=pred * scale * np.exp(rng.normal(0, 0.02, len(frame)))
    )


def test_fit_with_auto_prior_scale_records_the_comparison():
    frame = _two_deployments()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dm.IdentifiabilityWarning)
        res = dm.fit(
            frame,
            target="iteration_time_us",
            factors="hierarchical",
            prior_scale="auto",
            max_steps=100,
        )
    taus, values = zip(*res.prior_scale_evidence, strict=True)
    assert len(taus) == 7 and np.all(np.isfinite(values))
    chosen = taus[int(np.argmax(values))]
    assert float(jnp.exp(res.factor_set.log_prior_scale)) == pytest.approx(chosen)
    assert res.factor_set.noise_scale < 0.1  # the first fit's noise, not the default


def test_auto_prior_scale_bad_input():
    frame = _two_deployments()
    kw = dict(target="iteration_time_us", max_steps=5)
    with pytest.raises(ValueError, match="factors='hierarchical'; factors is 'global'"):
        dm.fit(frame, factors="global", prior_scale="auto", **kw)
    with pytest.raises(ValueError, match="choose one"):
        dm.fit(
            frame,
            factors="hierarchical",
            prior_scale="auto",
            learn_prior_scale=True,
            **kw,
        )
    with unchecked(), pytest.raises(ValueError, match="a number > 0 or 'auto'"):
        dm.fit(frame, factors="hierarchical", prior_scale="best", **kw)
