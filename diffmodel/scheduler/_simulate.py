"""A continuous-batching scheduler (vLLM-like), simulated in JAX, exact or relaxed.

The simulator steps an engine through a fixed number of scheduler steps with
``lax.scan``; the clock advances by the roofline time of each step's batch
(:func:`diffmodel.step_time`). The policy is vLLM V1's with chunked prefill and FCFS:

1. Every running request that has finished its prompt decodes one token, in admission
   order, while the token budget ``max_num_batched_tokens`` lasts.
2. The remaining budget goes, in order, to running requests that are still
   prefilling (their remaining prompt, chunked to what is left) and then to waiting
   requests that have arrived, oldest first, while fewer than ``max_num_seqs``
   requests run. A waiting request is admitted when it gets at least one token; the
   first one that gets none blocks all later ones (FCFS never skips).
3. The step that completes a prompt samples the request's first token (its TTFT ends
   there); each decode step adds one token; a request leaves after its last output
   token. There is no preemption (the KV cache is taken to be large enough).
4. With nothing to run, the clock jumps to the next arrival.

Because admission is FCFS and requests are sorted by arrival, "admission order" is
index order, and every allocation is a prefix sum over requests: a request with demand
``d`` after ``C`` tokens of demand ahead of it gets ``clip(budget - C, 0, d)``.

**The relaxation** (``temperature > 0``, in tokens; requests for the seat limit).
The exact simulator is piecewise constant in the integer knobs, so its gradient with
respect to them is zero almost everywhere. The relaxed one replaces every discrete
choice by a smooth one that tends to it as ``temperature -> 0``:

- indicators ``[x > 0]`` become ``sigmoid(x / temperature)``; integer thresholds are
  taken at half-integers (``[left >= 1]`` is ``sigmoid((left - 1/2) / temperature)``),
  so at small temperature integer states give exactly 0 or 1;
- ``max(x, 0)`` becomes ``temperature * softplus(x / temperature)``, and the budget
  clip ``clip(x, 0, d) = relu(x) - relu(x - d)`` uses it (the sum over requests
  telescopes, so the budget is still respected up to ``O(temperature)``);
- request state becomes fractional: tokens prefilled and generated are real numbers,
  "admitted" is a weight in [0, 1], and "prefilling", "decoding", "finished" and
  "running" are soft indicators of that state;
- the batch statistics are those of :func:`diffmodel.from_requests` with fractional
  membership (a prefill chunk of ``n`` tokens counts ``[n >= 1]`` requests, soft);
- times are integrals rather than event times: a request's TTFT is the time, summed
  over steps, that it has been present and has not yet got its first token (and
  likewise end-to-end latency), ``sum_s overlap_s * (1 - done_before_s)``. With hard
  indicators this equals the event time exactly, so exact and relaxed metrics share
  one code path.

Arrivals and the idle jump stay hard (they do not depend on the knobs). The knobs
enter continuously: ``max_num_batched_tokens`` through the clip, ``max_num_seqs``
through the seat gate ``sigmoid((max_num_seqs - running - rank + 1/2) / temperature)``;
the factors enter through every step time. Gradients of latency objectives are then
finite; large temperatures blur the schedule (e.g. every waiting request gets a sliver
of budget).

**What the relaxed gradient is good for, and what not.** In the factors it is smooth
and exact (it matches finite differences): use it to fit or to ask what a faster
memory system is worth. In ``max_num_seqs`` it points the right way while seats are
scarce. In ``max_num_batched_tokens`` it does not: a larger budget helps because
prompts finish in fewer steps, a jump that happens once per chunk boundary, i.e.
hundreds of tokens of budget apart, while the relaxation smooths each jump over
``temperature`` tokens. The relaxed objective is therefore a sawtooth in the budget:
over a few hundred tokens it falls, as the exact one does, but between the jumps its
slope is the cost side alone (longer steps with the schedule held fixed), positive.
A pathwise gradient samples the slope between jumps almost surely. Measured on
``experiments/scheduler.py``'s workload at (512 tokens, 128 seqs): the exact
``d log objective / d log budget`` is -0.40 by a central difference of +-16 %,
the relaxed one +2.4 at temperature 0.2 and +1.6 at 1.0. A temperature wide enough to
smooth the jumps (hundreds of tokens) would blur the schedule itself (every request
prefilling a sliver at once), and ``served`` already smooths prompt completion on the
served fraction rather than in tokens without curing it.

So :func:`tune_knobs` descends a different, honest gradient: that of the exact
objective smoothed over log knobs (Gaussian-smoothing / evolution-strategy estimator:
central differences along random orthogonal directions, two antithetic pairs per
step, every simulation counted). Smoothing at the scale of the knobs (a factor of
1.35) sees the jumps the token-scale relaxation misses, costs four exact simulations
per step (each several times cheaper than a relaxed value and gradient), and, in log
space with a capped step, reaches the grid optimum's objective in three steps.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from .._model._batch import BatchStats, from_requests
from .._model._deployment import Deployment
from .._model._factors import Factors
from .._model._roofline import step_time
from ._workload import Knobs, SimResult, StepTrace, Workload

# ---------------------------------------------------------------------- relaxation


class _Ops(eqx.Module):
    """The discrete primitives, hard (``temperature is None``) or smooth."""

    temperature: Float[Array, ""] | None

    def above(self, x: Array) -> Array:
        """``[x > 0]`` (hard) or ``sigmoid(x / temperature)``."""
        if self.temperature is None:
            return (x > 0).astype(x.dtype)
        return jax.nn.sigmoid(x / self.temperature)

    def relu(self, x: Array) -> Array:
        """``max(x, 0)`` or ``temperature * softplus(x / temperature)``."""
        if self.temperature is None:
            return jnp.maximum(x, 0.0)
        return self.temperature * jax.nn.softplus(x / self.temperature)

    def clip(self, x: Array, hi: Array) -> Array:
        """``clip(x, 0, hi)`` for ``hi >= 0``, as ``relu(x) - relu(x - hi)``."""
        return self.relu(x) - self.relu(x - hi)

    def served(self, got: Array, asked: Array) -> Array:
        """Whether a request got all the tokens it asked for: ``[got >= asked]``.

        Relaxed on the served fraction ``f = (got + 1/2) / (asked + 1/2)``:
        ``sigmoid((f - 1 + r/2) / r^2)`` with ``r = temperature / 4`` (a fraction, not
        tokens), which tends to ``[f >= 1]``: the jumps it smooths (one prefill step
        more or less) lie a whole chunk apart, so a token-scale temperature would hide
        them from the gradient.
        """
        if self.temperature is None:
            return (got > asked - 0.5).astype(got.dtype)
        r = self.temperature / 4.0
        f = (got + 0.5) / (asked + 0.5)
        return jax.nn.sigmoid((f - 1.0 + 0.5 * r) / r**2)

    def floor(self, x: Array) -> Array:
        """Integer knobs in the exact simulator; continuous in the relaxed one."""
        return jnp.floor(x) if self.temperature is None else x


def _exclusive_cumsum(x: Array) -> Array:
    return jnp.cumsum(x) - x


# ------------------------------------------------------------------------ one step


class _State(eqx.Module):
    clock_us: Float[Array, ""]
    prefilled: Float[Array, " requests"]  # prompt tokens computed, tokens
    generated: Float[Array, " requests"]  # output tokens produced, tokens
    admitted: Float[Array, " requests"]  # in [0, 1]
    first: Float[Array, " requests"]  # first token produced, in [0, 1]
    ttft_us: Float[Array, " requests"]
    decode_us: Float[Array, " requests"]  # first token to last, us


def _finished(w: Workload, generated: Array, ops: _Ops) -> Array:
    """Whether all output tokens exist: ``[generated >= output]``."""
    return ops.above(generated - w.output_tokens + 0.5) * w.mask


def _step(
    state: _State,
    w: Workload,
    dep: Deployment,
    factors: Factors,
    knobs: Knobs,
    ops: _Ops,
) -> tuple[_State, StepTrace]:
    """One scheduler step: schedule, time the batch, advance the clock and requests."""
    real = w.mask.astype(state.prefilled.dtype)
    budget = ops.floor(knobs.max_num_batched_tokens)
    seats = ops.floor(knobs.max_num_seqs)

    # Idle: nothing arrived is unfinished -> jump to the next arrival (a hard choice).
    fin = _finished(w, state.generated, ops)
    arrived_now = w.mask & (w.arrival_us <= state.clock_us)
    outstanding = jnp.sum(jnp.where(arrived_now, 1.0 - fin, 0.0))
    future = w.mask & (w.arrival_us > state.clock_us)
    any_future = jnp.any(future)
    next_arrival = jnp.min(jnp.where(future, w.arrival_us, jnp.inf))
    idle = jax.lax.stop_gradient(outstanding < 0.5)
    jump = idle & any_future
    start = jnp.where(jump, jnp.where(any_future, next_arrival, 0.0), state.clock_us)
    active = ~idle | any_future
    arrived = (w.mask & (w.arrival_us <= start)).astype(real.dtype)

    # 1. Decodes, in admission (= index) order, within the budget.
    running = state.admitted * (1.0 - fin)
    decoding = running * state.first
    n_dec = ops.clip(budget - _exclusive_cumsum(decoding), decoding)
    left_budget = budget - jnp.sum(n_dec)

    # 2. Prefill chunks: running prefills, then arrived waiting requests with a seat.
    waiting = arrived * (1.0 - state.admitted)
    rank = jnp.cumsum(waiting)  # 1 for the oldest waiting request
    seat = ops.above(seats - jnp.sum(running) - rank + 0.5)
    left = w.prompt_tokens - state.prefilled
    demand = (state.admitted - state.first + waiting * seat) * left
    n_pf = ops.clip(left_budget - _exclusive_cumsum(demand), demand)
    admit = waiting * seat * ops.above(n_pf - 0.5)

    # The batch and its time.
    context = w.cached_tokens + state.prefilled
    dec_context = context + jnp.maximum(state.generated - 1.0, 0.0)
    if ops.temperature is None:
        stats = from_requests(
            n_dec + n_pf,
            jnp.where(n_dec > 0, dec_context, context),
            (n_dec + n_pf) > 0,
            is_decode=n_dec > 0,
        )
    else:
        pf_requests = ops.above(n_pf - 0.5)
        stats = BatchStats(
            prefill_tokens=jnp.sum(n_pf),
            decode_tokens=jnp.sum(n_dec),
            num_prefill=jnp.sum(pf_requests),
            num_decode=jnp.sum(n_dec),
            kv_decode=jnp.sum(n_dec * dec_context),
            attn_prefill=jnp.sum(n_pf * (context + 0.5 * n_pf)),
            kv_prefill=jnp.sum(pf_requests * context),
        )
    dt = jnp.where(active, step_time(stats, dep, factors, check=False).total, 0.0)
    end = start + dt

    # Advance requests: the chunk that covers the rest of the prompt makes the first
    # token, for the admitted share still without one (an event, so a soft "done"
    # does not linger on a sliver of prompt).
    admitted = state.admitted + admit
    completes = ops.served(n_pf, demand) * (admitted - state.first)
    first = state.first + completes
    generated = state.generated + n_dec + completes

    # Latencies as integrals of "present and not yet done" over the step.
    present = jnp.maximum(end - jnp.maximum(start, w.arrival_us), 0.0) * real
    new = _State(
        clock_us=end,
        prefilled=state.prefilled + n_pf,
        generated=generated,
        admitted=admitted,
        first=first,
        ttft_us=state.ttft_us + present * (1.0 - state.first),
        decode_us=state.decode_us + present * state.first * (1.0 - fin),
    )
    trace = StepTrace(
        start_us=start,
        duration_us=dt,
        stats=stats,
        running=jnp.sum(running + admit),
        waiting=jnp.sum(waiting - admit),
        active=active,
    )
    return new, trace


# ----------------------------------------------------------------------- simulation


def simulate(
    workload: Workload,
    dep: Deployment,
    factors: Factors,
    knobs: Knobs,
    *,
    num_steps: int,
    temperature: float | ArrayLike | None = None,
) -> SimResult:
    """Simulate ``num_steps`` scheduler steps of a vLLM-like engine serving a workload.

    Args:
        workload: requests (see :func:`make_workload`).
        dep: the deployment timing each step (e.g. ``deployment("llama-2-70b",
            "h100", 4)``).
        factors: roofline factors.
        knobs: scheduler settings (:class:`Knobs`).
        num_steps: scheduler steps to simulate (fixed: the scan length); steps after
            the last request finishes cost nothing.
        temperature: ``None`` or ``0`` for the exact simulator; a positive value
            (tokens; may be a traced array, which must then be > 0) for the
            relaxation described in the module docstring.

    Returns:
        A :class:`SimResult`. Differentiable with ``temperature > 0`` in the knobs and
        factors; the exact simulator is differentiable in the factors only.
    """
    if not isinstance(workload, Workload):
        raise ValueError(f"workload must be a Workload, got {type(workload).__name__}")
    if not isinstance(knobs, Knobs):
        raise ValueError(f"knobs must be a Knobs, got {type(knobs).__name__}")
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if temperature is not None and not isinstance(temperature, jax.core.Tracer):
        tau = np.asarray(temperature, dtype=np.float64)
        if tau.shape != () or not (tau >= 0) or not np.isfinite(tau):
            raise ValueError(
                f"temperature must be None or a finite scalar >= 0, got {temperature!r}"
            )
        if tau == 0:
            temperature = None
    if temperature is not None:
        temperature = jnp.asarray(temperature, dtype=jnp.result_type(float))
        temperature = eqx.error_if(
            temperature,
            ~(temperature > 0),
            "a traced temperature must be > 0 (pass a Python 0 for the exact "
            "simulator)",
        )
    ops = _Ops(temperature)
    zeros = jnp.zeros(workload.size, jnp.result_type(float))
    init = _State(
        clock_us=jnp.min(jnp.where(workload.mask, workload.arrival_us, jnp.inf)),
        prefilled=zeros,
        generated=zeros,
        admitted=zeros,
        first=zeros,
        ttft_us=zeros,
        decode_us=zeros,
    )

    def body(state, _):
        return _step(state, workload, dep, factors, knobs, ops)

    final, trace = jax.lax.scan(jax.checkpoint(body), init, None, length=num_steps)
    out = workload.output_tokens
    has_itl = workload.mask & (out > 1)
    itl = jnp.where(has_itl, final.decode_us / jnp.where(has_itl, out - 1.0, 1.0), 0.0)
    real = workload.mask.astype(zeros.dtype)
    done = _finished(workload, final.generated, ops)
    t0 = init.clock_us
    last = jnp.max(jnp.where(trace.active, trace.start_us + trace.duration_us, t0))
    makespan = last - t0
    produced = jnp.sum(final.generated * real)
    return SimResult(
        ttft_us=final.ttft_us,
        itl_us=itl,
        e2e_us=final.ttft_us + final.decode_us,
        finished=done,
        output_tokens_done=final.generated * real,
        throughput_tok_s=produced / jnp.maximum(makespan, 1e-9) * 1e6,
        makespan_us=makespan,
        mask=workload.mask,
        has_itl=has_itl,
        trace=trace,
    )


def serving_objective(
    result: SimResult,
    *,
    itl_weight: float = 10.0,
    unfinished_penalty_us: float = 1e7,
) -> Array:
    """``mean TTFT + itl_weight * mean ITL``, us, plus a penalty for unfinished work.

    ``unfinished_penalty_us`` (us per request) times the unfinished fraction keeps
    knobs that leave requests unserved within the horizon from looking fast (their
    latencies are cut at the last step).
    """
    unfinished = 1.0 - result.finished_fraction
    return (
        result.mean_ttft_us
        + itl_weight * result.mean_itl_us
        + unfinished_penalty_us * unfinished
    )
