"""Minimise a scalar loss with any optax transformation, in one compiled loop.

The contract follows optimistix: ``minimise(fn, params, args)`` runs ``fn(params,
args)`` in a ``lax.while_loop`` compiled once per (function, solver, shapes): the data
travel as ``args``, so a refit on new data of the same shapes compiles nothing. It
returns an :class:`OptimResult` whose ``result`` says why the loop stopped
(``successful``, ``max_steps_reached``, ``nonfinite``); with ``throw=True`` (the
default) a non-finite loss or gradient raises.
"""

import functools
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int

from .._arrays import device_array
from ._aot import compiled_call, loop_key

Result = Literal["successful", "max_steps_reached", "nonfinite"]
RESULTS: tuple[str, ...] = ("successful", "max_steps_reached", "nonfinite")
_SUCCESSFUL, _MAX_STEPS, _NONFINITE = range(3)


class OptimResult(eqx.Module):
    """Outcome of :func:`minimise`.

    Attributes:
        params: the minimiser (the best on the validation loss when one is given; the
            last parameters with a finite loss when the loop met a non-finite one).
        result: ``"successful"`` (a convergence test or early stopping on the
            validation loss stopped the loop), ``"max_steps_reached"`` or
            ``"nonfinite"`` (the loss or its gradient became NaN or infinite).
        loss_history: training loss at each step, NaN past ``n_steps``.
        valid_history: validation loss at each step (NaN without validation).
        n_steps: optimiser steps taken.
        compile_seconds: wall time spent tracing and compiling in this call, s
            (0 when the compiled loop was reused).
        run_seconds: the rest of the call's wall time, s.
    """

    params: Any
    result: Result = eqx.field(static=True)
    loss_history: Float[Array, " max_steps"]
    valid_history: Float[Array, " max_steps"]
    n_steps: Int[Array, ""]
    compile_seconds: float = eqx.field(static=True)
    run_seconds: float = eqx.field(static=True)

    @property
    def converged(self) -> bool:
        """Whether ``result`` is ``"successful"``."""
        return self.result == "successful"

    @property
    def loss(self) -> float:
        """Final training loss (of the last step taken)."""
        h = np.asarray(self.loss_history)[: int(self.n_steps)]
        return float(h[-1]) if h.size else float("nan")


@functools.lru_cache(maxsize=64)
def make_optimizer(
    solver: str, *, learning_rate: float, max_steps: int
) -> optax.GradientTransformationExtraArgs:
    """The optax transformation a solver name stands for (cached: the same name and
    settings give the same object, so the compiled loop is reused).

    ``"adam"``: ``optax.adam`` with a cosine-decayed learning rate over
    ``max_steps``; ``"lbfgs"``: ``optax.lbfgs()`` (zoom line search).
    """
    if solver == "adam":
        schedule = optax.cosine_decay_schedule(learning_rate, max_steps, alpha=0.01)
        return optax.with_extra_args_support(optax.adam(schedule))
    if solver == "lbfgs":
        return optax.lbfgs()
    raise ValueError(
        f"solver must be 'adam', 'lbfgs' or an optax.GradientTransformation, "
        f"got {solver!r}"
    )


def _resolve_solver(solver, learning_rate: float, max_steps: int):
    if isinstance(solver, optax.GradientTransformationExtraArgs):
        return solver
    if isinstance(solver, optax.GradientTransformation):
        return optax.with_extra_args_support(solver)
    if isinstance(solver, str):
        if not (np.isfinite(learning_rate) and learning_rate > 0):
            raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}")
        return make_optimizer(
            solver, learning_rate=float(learning_rate), max_steps=int(max_steps)
        )
    raise ValueError(
        "solver must be 'adam', 'lbfgs' or an optax.GradientTransformation, got "
        f"{type(solver).__name__}"
    )


def _is_linesearch(x) -> bool:
    return isinstance(
        x, optax.ScaleByZoomLinesearchState | optax.ScaleByBacktrackingLinesearchState
    )


def _has_linesearch(state) -> bool:
    """Whether an optax state holds a line search's state (L-BFGS and the like):
    such solvers need ``value_fn`` and keep the last value and gradient."""
    return any(
        _is_linesearch(x) for x in jax.tree.leaves(state, is_leaf=_is_linesearch)
    )


def _no_valid(params, args):
    return jnp.asarray(jnp.nan)


def _no_callback(step, loss):
    pass


def _no_prepare(params, args):
    return args


def _loop_body(
    fn,
    valid_fn,
    callback,
    prepare,
    opt,
    max_steps: int,
    callback_every: int,
    dyn0,
    static,
    args,
    valid_args,
    tol,
):
    """The optimisation loop; the functions, ``opt``, ``static`` and the integers
    are static (part of the compile key), everything else is traced."""
    gtol, rtol, patience = tol
    has_valid = valid_fn is not _no_valid
    if prepare is not _no_prepare:  # once, before the first step; not differentiated
        start = eqx.combine(dyn0, static)
        args = prepare(start, args)
        if has_valid:
            valid_args = prepare(start, valid_args)
    state0 = opt.init(dyn0)
    linesearch = _has_linesearch(state0)

    def loss_of(dyn):
        return fn(eqx.combine(dyn, static), args)

    def valid_of(dyn):
        return valid_fn(eqx.combine(dyn, static), valid_args)

    value_and_grad = (
        optax.value_and_grad_from_state(loss_of)
        if linesearch
        else jax.value_and_grad(loss_of)
    )
    dtype = jnp.result_type(float)
    hist = jnp.full(max_steps, jnp.nan, dtype)
    carry = dict(
        i=jnp.asarray(0),
        dyn=dyn0,
        state=state0,
        hist=hist,
        vhist=hist,
        prev=jnp.asarray(jnp.inf, dtype),
        best=jnp.asarray(jnp.inf, dtype),
        best_dyn=dyn0,
        since=jnp.asarray(0),
        last_ok=dyn0,
        code=jnp.asarray(-1),
    )

    def cond(c):
        return (c["i"] < max_steps) & (c["code"] < 0)

    def body(c):
        if linesearch:
            value, grad = value_and_grad(c["dyn"], state=c["state"])
        else:
            value, grad = value_and_grad(c["dyn"])
        updates, state = opt.update(
            grad, c["state"], c["dyn"], value=value, grad=grad, value_fn=loss_of
        )
        new = optax.apply_updates(c["dyn"], updates)
        if callback is not _no_callback:
            jax.lax.cond(
                c["i"] % callback_every == 0,
                lambda: jax.debug.callback(callback, c["i"], value),
                lambda: None,
            )
        gnorm = optax.tree.norm(grad)
        finite = jnp.isfinite(value) & jnp.isfinite(gnorm)
        ok = gnorm < gtol
        if linesearch:  # line-searched steps: a negligible decrease means converged
            ok |= jnp.abs(c["prev"] - value) <= rtol * jnp.abs(value)
        v = valid_of(c["dyn"])
        if has_valid:
            better = v < c["best"]
            best = jnp.where(better, v, c["best"])
            best_dyn = jax.tree.map(
                lambda a, b: jnp.where(better, a, b), c["dyn"], c["best_dyn"]
            )
            since = jnp.where(better, 0, c["since"] + 1)
            ok |= since >= patience
        else:
            best, best_dyn, since = c["best"], new, c["since"]
        last_ok = jax.tree.map(
            lambda a, b: jnp.where(finite, a, b), c["dyn"], c["last_ok"]
        )
        code = jnp.where(~finite, _NONFINITE, jnp.where(ok, _SUCCESSFUL, -1))
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
            last_ok=last_ok,
            code=code,
        )

    out = jax.lax.while_loop(cond, body, carry)
    code = jnp.where(out["code"] < 0, _MAX_STEPS, out["code"])
    # After a non-finite loss: the last parameters whose loss was finite.
    params = jax.tree.map(
        lambda a, b: jnp.where(code == _NONFINITE, a, b),
        out["last_ok"],
        out["best_dyn"],
    )
    return params, out["hist"], out["vhist"], out["i"], code


_loop = eqx.filter_jit(_loop_body)


def _run_loop(call: tuple, solver, learning_rate: float):
    """``_loop(*call)``: through the compiled loop kept on disk where its key is
    complete (see :mod:`diffmodel._fitting._aot`), else jitted."""
    fn, valid_fn, callback, prepare, opt, max_steps, every = call[:7]
    tree = call[7:]
    if isinstance(solver, str) and callback is _no_callback:
        key = loop_key(
            (fn, valid_fn, prepare),
            ("minimise", solver, float(learning_rate), max_steps, every),
            tree,
        )
        if key is not None:
            outdef = jax.tree.structure((tree[0], 0, 0, 0, 0))
            flat = compiled_call(
                functools.partial(_loop_body, *call[:7]), *key, outdef.num_leaves
            )
            if flat is not None:
                return jax.tree.unflatten(outdef, flat)
    return _loop(*call)


class _CompileClock:
    """Seconds JAX spends tracing, lowering and compiling (from ``jax.monitoring``),
    per thread, and the number of backend compilations."""

    _EVENTS = (
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
    )

    def __init__(self):
        self.local = threading.local()
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event: str, duration: float, **kwargs) -> None:
        if event in self._EVENTS:
            self.local.seconds = self.seconds() + duration
            if event == self._EVENTS[-1]:
                self.local.compiles = self.compiles() + 1

    def seconds(self) -> float:
        """Compile seconds in this thread so far."""
        return getattr(self.local, "seconds", 0.0)

    def compiles(self) -> int:
        """Backend compilations in this thread so far."""
        return getattr(self.local, "compiles", 0)


COMPILE_CLOCK = _CompileClock()


def minimise(
    fn: Callable[[Any, Any], Array],
    params: Any,
    args: Any = None,
    *,
    solver: str | optax.GradientTransformation = "adam",
    learning_rate: float = 0.05,
    max_steps: int = 2000,
    gtol: float = 1e-7,
    rtol: float = 1e-12,
    valid_fn: Callable[[Any, Any], Array] | None = None,
    valid_args: Any = None,
    prepare: Callable[[Any, Any], Any] | None = None,
    patience: int = 100,
    callback: Callable[[int, float], None] | None = None,
    callback_every: int = 100,
    throw: bool = True,
) -> OptimResult:
    """Minimise ``fn(params, args)`` with optax inside one compiled ``while_loop``.

    Args:
        fn: scalar loss of a pytree of parameters and the data ``args``. Arrays in
            ``params`` are optimised; other leaves (e.g. static labels) are kept.
            Pass the data as ``args``, not in a closure: the loop is compiled once
            per ``fn`` (by identity), solver, ``max_steps`` and shapes, and reused
            for new data of the same shapes.
        params: the start.
        args: the data (any pytree of arrays), traced.
        solver: any optax transformation (``optax.lbfgs()``, ``optax.adam(1e-2)``,
            a chain); a transformation whose state holds a line search (L-BFGS) gets
            the loss function and value it needs. ``"adam"`` (cosine schedule from
            ``learning_rate``) and ``"lbfgs"`` are shorthands for the same objects.
            Pass the same transformation object again to reuse the compiled loop.
        max_steps: step budget (the histories' length).
        gtol: converged when the gradient's global norm falls below this.
        rtol: for line-searched solvers, converged when a step changes the loss by
            less than ``rtol * |loss|``.
        valid_fn, valid_args: optional validation loss ``valid_fn(params,
            valid_args)``; the best parameters on it are kept and the loop stops
            (successfully) after ``patience`` steps without improvement.
        prepare: optional ``prepare(params, args)`` giving the data in the form
            ``fn`` takes (features that do not depend on the optimised values, such
            as a factor set's ``prepare``): run once, on the start, inside the
            compiled call and before the first step, on ``args`` and on
            ``valid_args``; not differentiated. Compiled with the loop, so a
            process that loads a kept loop traces neither.
        callback: called on the host as ``callback(step, loss)`` every
            ``callback_every`` steps (progress reporting).
        throw: raise ``ValueError`` when the loss or gradient becomes non-finite
            (a NaN start, a poisoned model); with ``False`` the result says
            ``"nonfinite"``. Reaching ``max_steps`` is reported, never raised: a
            first-order solver with a fixed budget ends there by design.
    """
    if int(max_steps) != max_steps or max_steps < 1:
        raise ValueError(f"max_steps must be an integer >= 1, got {max_steps!r}")
    if int(patience) != patience or patience < 1:
        raise ValueError(f"patience must be an integer >= 1, got {patience!r}")
    if int(callback_every) != callback_every or callback_every < 1:
        raise ValueError(
            f"callback_every must be an integer >= 1, got {callback_every}"
        )
    opt = _resolve_solver(solver, learning_rate, max_steps)
    dyn0, static = eqx.partition(params, eqx.is_inexact_array)
    dtype = jnp.result_type(float)
    tol = (
        device_array(gtol, dtype),
        device_array(rtol, dtype),
        device_array(patience),
    )
    t0, c0 = time.perf_counter(), COMPILE_CLOCK.seconds()
    call = (
        fn,
        _no_valid if valid_fn is None else valid_fn,
        _no_callback if callback is None else callback,
        _no_prepare if prepare is None else prepare,
        opt,
        int(max_steps),
        int(callback_every),
        dyn0,
        static,
        args,
        valid_args,
        tol,
    )
    best, hist, vhist, n, code = jax.block_until_ready(
        _run_loop(call, solver, learning_rate)
    )
    wall = time.perf_counter() - t0
    compile_s = min(COMPILE_CLOCK.seconds() - c0, wall)
    result = RESULTS[int(code)]
    if throw and result == "nonfinite":
        raise ValueError(
            f"minimise: the loss or its gradient is not finite at step "
            f"{int(n) - 1} (loss {float(hist[int(n) - 1])!r}); check the start "
            "values, the data and the step size (learning_rate), or pass "
            "throw=False to get the result"
        )
    return OptimResult(
        params=eqx.combine(best, static),
        result=result,
        loss_history=hist,
        valid_history=vhist,
        n_steps=n,
        compile_seconds=compile_s,
        run_seconds=wall - compile_s,
    )
