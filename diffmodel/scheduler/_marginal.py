"""The marginal cost of each request in a batch: ``jax.grad`` of the step time with
respect to per-request membership, in microseconds per request."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float

from .._model._batch import from_requests
from .._model._deployment import Deployment
from .._model._factors import Factors
from .._model._roofline import step_time

# ------------------------------------------------------------------- marginal cost


@eqx.filter_jit
def _marginal(n, s, m, dec, dep, factors):
    def total(nn, ss):
        stats = from_requests(nn, ss, m, is_decode=dec)
        return step_time(stats, dep, factors).total

    return jax.value_and_grad(total, argnums=(0, 1))(n, s)


class MarginalCost(eqx.Module):
    """Gradient of a step's time with respect to each request's token counts.

    Attributes:
        step_us: the step's time, us.
        new_tokens: ``d step_us / d new_tokens``, us per token, per request: what one
            more token of this request's chunk costs.
        context_tokens: ``d step_us / d context_tokens``, us per token, per request:
            what one more cached token behind it costs (attention reads).
    """

    step_us: Float[Array, "*steps"]
    new_tokens: Float[Array, "*steps requests"]
    context_tokens: Float[Array, "*steps requests"]


def marginal_cost(
    new_tokens: Float[ArrayLike, " requests"],
    context_tokens: Float[ArrayLike, " requests"],
    mask: Bool[ArrayLike, " requests"] | None,
    dep: Deployment,
    factors: Factors,
    *,
    is_decode: Bool[ArrayLike, " requests"] | None = None,
) -> MarginalCost:
    """Marginal cost of each request in a batch, by ``jax.grad`` of the step time.

    Args:
        new_tokens: tokens each request processes this step (1 for a decode), tokens.
        context_tokens: tokens already in each request's KV cache, tokens.
        mask: real requests (``None``: all); padding gets zero gradient.
        dep, factors: the deployment and roofline factors.
        is_decode: which requests decode (default as :func:`diffmodel.from_requests`);
            pass it when perturbing token counts, since the default changes with
            ``new_tokens == 1``.

    The batch composition (which requests decode or prefill, how many there are) is
    held fixed: the result is the cost of a little more work, not of a new request.
    """
    n = np.asarray(new_tokens, dtype=np.float64)
    s = np.asarray(context_tokens, dtype=np.float64)
    if n.ndim != 1 or s.shape != n.shape:
        raise ValueError(
            "new_tokens and context_tokens must be 1-D of equal length, got shapes "
            f"{n.shape} and {s.shape}"
        )
    for name, v in (("new_tokens", n), ("context_tokens", s)):
        if not np.isfinite(v).all() or (v < 0).any():
            raise ValueError(f"{name} must be finite and >= 0 (tokens)")
    m = np.ones(n.shape, bool) if mask is None else np.asarray(mask, bool)
    if m.shape != n.shape:
        raise ValueError(f"mask must have shape {n.shape}, got {m.shape}")
    dec = None if is_decode is None else jnp.asarray(is_decode, bool)

    value, (dn, ds) = _marginal(jnp.asarray(n), jnp.asarray(s), m, dec, dep, factors)
    return MarginalCost(step_us=value, new_tokens=dn, context_tokens=ds)
