"""Knob tuning by gradient descent on the exact objective smoothed over log knobs
(see :mod:`diffmodel.scheduler._simulate` for why not the relaxed gradient)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._model._deployment import Deployment
from .._model._factors import Factors
from ._simulate import serving_objective, simulate
from ._workload import Knobs, Workload

# ---------------------------------------------------------------------------- tuning


class TuneResult(eqx.Module):
    """Knobs tuned by :func:`tune_knobs`.

    Attributes:
        knobs: the tuned knobs, whole numbers.
        objective_us: the exact simulator's :func:`serving_objective` at ``knobs``, us.
        start_objective_us: the same at the starting knobs, us.
        evaluations: exact simulations run, the final one included (the start's is
            not: it is reported, not used).
        log_knobs: ``log(max_num_batched_tokens), log(max_num_seqs)`` before each
            step and after the last, rounded as simulated.
        gradients: the smoothed gradient of ``log objective`` estimated at each step,
            per unit of log knob.
    """

    knobs: Knobs
    objective_us: Float[Array, ""]
    start_objective_us: Float[Array, ""]
    evaluations: int = eqx.field(static=True)
    log_knobs: Float[Array, "iterations+1 2"]
    gradients: Float[Array, "iterations 2"]


def tune_knobs(
    workload: Workload,
    dep: Deployment,
    factors: Factors,
    init: Knobs,
    *,
    num_steps: int,
    itl_weight: float = 10.0,
    unfinished_penalty_us: float = 1e7,
    iterations: int = 3,
    sigma: float = 0.3,
    learning_rate: float = 2.0,
    max_step: float = 1.2,
    seed: int = 0,
) -> TuneResult:
    """Tune the knobs by gradient descent on the smoothed exact objective.

    The variable is ``theta = log knobs`` and the loss ``f(theta) = log
    serving_objective`` of the exact simulator at ``round(exp(theta))`` (logs, because
    the objective spans orders of magnitude between a seat-starved and a good
    setting and the knobs act multiplicatively). Each step estimates the gradient of
    ``f`` smoothed over a circle of radius ``sigma`` with two antithetic pairs along
    random orthogonal directions ``e1, e2`` (4 simulations):
    ``g = sum_k (f(theta + sigma e_k) - f(theta - sigma e_k)) / (2 sigma) e_k``, then
    moves ``theta -= learning_rate * g`` with the step's length capped at
    ``max_step`` (a trust region: a seat-starved start has a steep gradient). See the
    module docstring for why this, not the relaxed simulator's pathwise gradient,
    steers the knobs.

    Args:
        workload, dep, factors: as :func:`simulate`.
        init: starting knobs.
        num_steps: scan length of each simulation.
        itl_weight, unfinished_penalty_us: as :func:`serving_objective`.
        iterations: gradient steps; ``4 * iterations + 1`` simulations in all.
        sigma: smoothing radius, in log knob units (0.3: a factor of 1.35).
        learning_rate: step per unit of gradient, log knob units.
        max_step: longest step, log knob units.
        seed: seed of the random directions.

    Raises:
        ValueError: for non-positive ``iterations``, ``sigma``, ``learning_rate`` or
            ``max_step``.
    """
    if not isinstance(init, Knobs):
        raise ValueError(f"init must be a Knobs, got {type(init).__name__}")
    if int(iterations) != iterations or iterations < 1:
        raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
    for name, v in (
        ("sigma", sigma),
        ("learning_rate", learning_rate),
        ("max_step", max_step),
    ):
        if not (np.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be finite and > 0, got {v!r}")

    @jax.jit
    def exact(knobs):
        r = simulate(workload, dep, factors, knobs, num_steps=num_steps)
        return serving_objective(
            r, itl_weight=itl_weight, unfinished_penalty_us=unfinished_penalty_us
        )

    def knobs_at(theta):
        # Knobs are whole numbers >= 1: round, and keep to the domain.
        b, s = np.maximum(np.round(np.exp(theta)), 1.0)
        return Knobs(b, s)

    def f(theta):
        return float(np.log(exact(knobs_at(theta))))

    def log_of(knobs):
        return np.log([float(knobs.max_num_batched_tokens), float(knobs.max_num_seqs)])

    rng = np.random.default_rng(seed)
    theta = log_of(init)
    path, grads = [], []
    for _ in range(int(iterations)):
        a = rng.uniform(0.0, 2.0 * np.pi)
        directions = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
        g = np.zeros(2)
        for e in directions:
            g += (f(theta + sigma * e) - f(theta - sigma * e)) / (2.0 * sigma) * e
        step = -learning_rate * g
        length = np.linalg.norm(step)
        if length > max_step:
            step *= max_step / length
        path.append(log_of(knobs_at(theta)))
        grads.append(g)
        theta = theta + step
    final = knobs_at(theta)
    path.append(log_of(final))
    return TuneResult(
        knobs=final,
        objective_us=exact(final),
        start_objective_us=exact(init),
        evaluations=4 * int(iterations) + 1,
        log_knobs=jnp.asarray(np.array(path)),
        gradients=jnp.asarray(np.array(grads)),
    )
