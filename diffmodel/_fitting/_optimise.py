"""A jit-compiled optax minimisation loop with convergence and early stopping."""

import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, Int


class OptimResult(eqx.Module):
    """Outcome of :func:`minimise`.

    Attributes:
        params: the minimiser (the best on the validation loss when one is given).
        loss_history: training loss at each step, NaN past ``n_steps``.
        valid_history: validation loss at each step (NaN without validation).
        n_steps: optimiser steps taken.
        converged: whether a convergence test (not ``max_steps``) stopped the loop;
            early stopping on the validation loss counts as converged.
        compile_seconds: wall time to trace and compile the loop, s.
        run_seconds: wall time of the compiled loop, s.
    """

    params: Any
    loss_history: Float[Array, " max_steps"]
    valid_history: Float[Array, " max_steps"]
    n_steps: Int[Array, ""]
    converged: Bool[Array, ""]
    compile_seconds: float = eqx.field(static=True)
    run_seconds: float = eqx.field(static=True)

    @property
    def loss(self) -> float:
        """Final training loss."""
        h = np.asarray(self.loss_history)[: int(self.n_steps)]
        return float(h[-1]) if h.size else float("nan")


def make_optimizer(
    solver: str | optax.GradientTransformation,
    *,
    learning_rate: float,
    max_steps: int,
) -> optax.GradientTransformation:
    """``"adam"`` (cosine-decayed learning rate), ``"lbfgs"`` or an optax transform."""
    if isinstance(solver, optax.GradientTransformation):
        return solver
    if solver == "adam":
        schedule = optax.cosine_decay_schedule(learning_rate, max_steps, alpha=0.01)
        return optax.adam(schedule)
    if solver == "lbfgs":
        return optax.lbfgs()
    raise ValueError(
        f"solver must be 'adam', 'lbfgs' or an optax.GradientTransformation, "
        f"got {solver!r}"
    )


def minimise(
    fn: Callable[[Any], Array],
    params: Any,
    *,
    solver: str | optax.GradientTransformation = "adam",
    learning_rate: float = 0.05,
    max_steps: int = 2000,
    gtol: float = 1e-7,
    rtol: float = 1e-12,
    valid_fn: Callable[[Any], Array] | None = None,
    patience: int = 100,
    callback: Callable[[int, float], None] | None = None,
    callback_every: int = 100,
) -> OptimResult:
    """Minimise ``fn(params)`` with optax inside one ``lax.while_loop``.

    Args:
        fn: scalar loss of a pytree of parameters (arrays are optimised; other leaves,
            e.g. static labels, are kept).
        solver: ``"adam"`` (with a cosine schedule from ``learning_rate``),
            ``"lbfgs"`` (``optax.lbfgs`` with its zoom line search) or any optax
            transform.
        max_steps: step budget.
        gtol: stop when the gradient's global norm falls below this.
        rtol: stop when a step changes the loss by less than ``rtol * |loss|``
            (checked for L-BFGS, whose steps are line-searched; Adam's are not).
        valid_fn: optional validation loss; the best parameters on it are kept and
            the loop stops after ``patience`` steps without improvement.
        callback: called on the host as ``callback(step, loss)`` every
            ``callback_every`` steps (progress reporting).

    The loop is compiled once per (shapes of) inputs; histories have length
    ``max_steps``.
    """
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    opt = make_optimizer(solver, learning_rate=learning_rate, max_steps=max_steps)
    lbfgs = isinstance(solver, str) and solver == "lbfgs"
    dyn0, static = eqx.partition(params, eqx.is_inexact_array)

    def loss_of(dyn):
        return fn(eqx.combine(dyn, static))

    def valid_of(dyn):
        if valid_fn is None:
            return jnp.asarray(jnp.nan)
        return valid_fn(eqx.combine(dyn, static))

    value_and_grad = (
        optax.value_and_grad_from_state(loss_of)
        if lbfgs
        else jax.value_and_grad(loss_of)
    )

    def run(dyn):
        state = opt.init(dyn)
        dtype = jnp.result_type(float)
        hist = jnp.full(max_steps, jnp.nan, dtype)
        carry = dict(
            i=jnp.asarray(0),
            dyn=dyn,
            state=state,
            hist=hist,
            vhist=hist,
            prev=jnp.asarray(jnp.inf, dtype),
            best=jnp.asarray(jnp.inf, dtype),
            best_dyn=dyn,
            since=jnp.asarray(0),
            done=jnp.asarray(False),
        )

        def cond(c):
            return (c["i"] < max_steps) & ~c["done"]

        def body(c):
            if lbfgs:
                value, grad = value_and_grad(c["dyn"], state=c["state"])
                updates, state = opt.update(
                    grad, c["state"], c["dyn"], value=value, grad=grad, value_fn=loss_of
                )
            else:
                value, grad = value_and_grad(c["dyn"])
                updates, state = opt.update(grad, c["state"], c["dyn"])
            new = optax.apply_updates(c["dyn"], updates)
            if callback is not None:
                jax.lax.cond(
                    c["i"] % callback_every == 0,
                    lambda: jax.debug.callback(callback, c["i"], value),
                    lambda: None,
                )
            gnorm = optax.tree.norm(grad)
            done = gnorm < gtol
            if lbfgs:
                done |= jnp.abs(c["prev"] - value) <= rtol * jnp.abs(value)
            done |= ~jnp.isfinite(value)
            v = valid_of(c["dyn"])
            if valid_fn is None:
                best, best_dyn, since = c["best"], new, c["since"]
            else:
                better = v < c["best"]
                best = jnp.where(better, v, c["best"])
                best_dyn = jax.tree.map(
                    lambda a, b: jnp.where(better, a, b), c["dyn"], c["best_dyn"]
                )
                since = jnp.where(better, 0, c["since"] + 1)
                done |= since >= patience
            return dict(
                i=c["i"] + 1,
                dyn=new,
                state=state,
                hist=c["hist"].at[c["i"]].set(value),
                vhist=c["vhist"].at[c["i"]].set(v),
                prev=value,
                best=best,
                best_dyn=best_dyn,
                since=since,
                done=done,
            )

        out = jax.lax.while_loop(cond, body, carry)
        return out["best_dyn"], out["hist"], out["vhist"], out["i"], out["done"]

    t0 = time.perf_counter()
    compiled = jax.jit(run).lower(dyn0).compile()
    t1 = time.perf_counter()
    best, hist, vhist, n, done = jax.block_until_ready(compiled(dyn0))
    t2 = time.perf_counter()
    return OptimResult(
        params=eqx.combine(best, static),
        loss_history=hist,
        valid_history=vhist,
        n_steps=n,
        converged=done,
        compile_seconds=t1 - t0,
        run_seconds=t2 - t1,
    )
