"""Predictive intervals of step times: parameter uncertainty plus residual noise.

On the log scale a prediction is ``log t(raw)``. With the posterior of the raw
parameters from :func:`~diffmodel._fitting._laplace.laplace` (covariance ``C``) and a
residual noise of sd ``s_k`` for the step's regime ``k`` (prefill-carrying or
decode-only; their residuals differ in size), the predictive sd of ``log t`` is

    sd = sqrt(g^T C g + s_k^2),    g = d log t / d raw,

and the central ``level`` interval is ``t * exp(+-z sd)`` with ``z`` the normal
quantile of ``(1 + level) / 2``. ``g`` for every step comes from one forward-mode
Jacobian (one JVP per raw parameter), so the whole computation is a few passes of the
step model, in JAX, with no sampling loop.
"""

from collections.abc import Callable
from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

REGIMES: tuple[str, str] = ("prefill", "decode_only")
"""Residual-noise regimes: steps that carry prefill tokens, and decode-only steps."""


def regime_noise_sd(
    log_residuals: Float[np.ndarray, " steps"],
    has_prefill: Bool[np.ndarray, " steps"],
) -> dict[str, float]:
    """Root-mean-square log-ratio residual per regime (unitless).

    A regime with no rows takes the pooled value.
    """
    r = np.asarray(log_residuals, dtype=np.float64)
    m = np.asarray(has_prefill, dtype=bool)
    if r.shape != m.shape or r.ndim != 1:
        raise ValueError(
            f"log_residuals and has_prefill must be 1-D of one length, got "
            f"{r.shape} and {m.shape}"
        )
    if r.size == 0 or not np.all(np.isfinite(r)):
        raise ValueError("log_residuals must be non-empty and finite")
    pooled = float(np.sqrt(np.mean(r**2)))
    out = {}
    for name, sel in (("prefill", m), ("decode_only", ~m)):
        out[name] = float(np.sqrt(np.mean(r[sel] ** 2))) if sel.any() else pooled
    return out


def interval(
    log_predict: Callable[[Array], Float[Array, " steps"]],
    raw: Float[Array, " p"],
    cov_raw: Float[Array, "p p"],
    noise_sd: Float[Array, " steps"],
    *,
    level: float = 0.9,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prediction and its central ``level`` interval, in the units of ``exp`` of
    ``log_predict`` (microseconds for step times).

    Args:
        log_predict: ``raw -> log t`` for every step (natural log of microseconds).
        raw: the fitted raw parameters (flat).
        cov_raw: their posterior covariance.
        noise_sd: residual log-scale sd of each step (e.g. by regime).
        level: the interval's probability, in (0, 1).

    Returns:
        ``(predicted, lo, hi)`` as NumPy arrays.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"interval level must lie in (0, 1), got {level!r}")
    raw = jnp.asarray(raw)
    log_t, jac = _value_and_jacobian(log_predict, raw)
    cov = jnp.asarray(cov_raw, log_t.dtype)
    var_param = jnp.einsum("si,ij,sj->s", jac, cov, jac)
    sd = jnp.sqrt(jnp.maximum(var_param, 0.0) + jnp.asarray(noise_sd) ** 2)
    z = NormalDist().inv_cdf(0.5 * (1.0 + level))
    t = np.asarray(jnp.exp(log_t))
    return t, np.asarray(jnp.exp(log_t - z * sd)), np.asarray(jnp.exp(log_t + z * sd))


def _value_and_jacobian(f, raw):
    """``f(raw)`` and its Jacobian (steps x p), by one JVP per parameter."""
    basis = jnp.eye(raw.shape[0], dtype=raw.dtype)

    def column(v):
        return jax.jvp(f, (raw,), (v,))

    values, cols = jax.vmap(column)(basis)
    return values[0], cols.T
