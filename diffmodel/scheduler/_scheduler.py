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
import numpy.typing as npt
from jaxtyping import Array, ArrayLike, Bool, Float

from .._model._batch import BatchStats, from_requests
from .._model._deployment import Deployment
from .._model._factors import Factors
from .._model._roofline import step_time

# ---------------------------------------------------------------------------- inputs


class Workload(eqx.Module):
    """Requests to serve, sorted by arrival and padded to a fixed count.

    Attributes:
        arrival_us: arrival time of each request, us.
        prompt_tokens: prompt tokens each request must prefill (not prefix-cached),
            tokens, >= 1.
        output_tokens: tokens each request generates (the first comes from the
            prefill step), tokens, >= 1.
        cached_tokens: prompt tokens found in the prefix cache (in the KV cache from
            the start, never computed), tokens.
        mask: ``True`` for real requests, ``False`` for padding.
    """

    arrival_us: Float[Array, " requests"]
    prompt_tokens: Float[Array, " requests"]
    output_tokens: Float[Array, " requests"]
    cached_tokens: Float[Array, " requests"]
    mask: Bool[Array, " requests"]

    @property
    def size(self) -> int:
        """Padded number of requests."""
        return int(self.arrival_us.shape[0])


def _vector(name: str, x: npt.ArrayLike, n: int | None) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {a.shape}")
    if n is not None and a.shape[0] != n:
        raise ValueError(f"{name} has {a.shape[0]} entries, expected {n}")
    bad = ~np.isfinite(a)
    if bad.any():
        raise ValueError(f"{name} must be finite; index {int(np.argmax(bad))} is not")
    return a


def _at_least(name: str, a: np.ndarray, low: float, unit: str) -> None:
    bad = a < low
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{name} must be >= {low} ({unit}); index {i} has {a[i]}")


def make_workload(
    arrival_us: npt.ArrayLike,
    prompt_tokens: npt.ArrayLike,
    output_tokens: npt.ArrayLike,
    *,
    cached_tokens: npt.ArrayLike | None = None,
    pad_to: int | None = None,
) -> Workload:
    """Validate, sort by arrival and pad a workload.

    Args:
        arrival_us: arrival times, us, >= 0.
        prompt_tokens: uncached prompt tokens per request, integers >= 1.
        output_tokens: output tokens per request, integers >= 1.
        cached_tokens: prefix-cached prompt tokens per request, integers >= 0
            (default 0).
        pad_to: pad with masked requests to this count (default: no padding), so
            workloads of different sizes share one compiled simulator.

    Raises:
        ValueError: naming the field, for wrong shapes, non-finite, negative or
            fractional token counts, or ``pad_to`` below the number of requests.
    """
    a = _vector("arrival_us", arrival_us, None)
    n = a.shape[0]
    if n == 0:
        raise ValueError("arrival_us is empty: a workload needs at least one request")
    p = _vector("prompt_tokens", prompt_tokens, n)
    o = _vector("output_tokens", output_tokens, n)
    c = (
        np.zeros(n)
        if cached_tokens is None
        else _vector("cached_tokens", cached_tokens, n)
    )
    _at_least("arrival_us", a, 0.0, "us")
    _at_least("prompt_tokens", p, 1.0, "tokens")
    _at_least("output_tokens", o, 1.0, "tokens")
    _at_least("cached_tokens", c, 0.0, "tokens")
    for name, v in (("prompt_tokens", p), ("output_tokens", o), ("cached_tokens", c)):
        if (v != np.round(v)).any():
            raise ValueError(f"{name} must be whole numbers of tokens")
    size = n if pad_to is None else int(pad_to)
    if size < n:
        raise ValueError(f"pad_to={pad_to} is below the number of requests ({n})")
    order = np.argsort(a, kind="stable")
    pad = size - n

    def padded(v, fill):
        return jnp.asarray(np.concatenate([v[order], np.full(pad, fill)]))

    return Workload(
        arrival_us=padded(a, a.max()),
        prompt_tokens=padded(p, 1.0),
        output_tokens=padded(o, 1.0),
        cached_tokens=padded(c, 0.0),
        mask=jnp.asarray(np.concatenate([np.ones(n, bool), np.zeros(pad, bool)])),
    )


class Knobs(eqx.Module):
    """Scheduler settings, as continuous values (the exact simulator floors them).

    Attributes:
        max_num_batched_tokens: token budget per step, tokens (vLLM's
            ``max_num_batched_tokens``), >= 1.
        max_num_seqs: most requests running at once, requests (vLLM's
            ``max_num_seqs``), >= 1.
    """

    max_num_batched_tokens: Float[Array, ""]
    max_num_seqs: Float[Array, ""]

    def __init__(self, max_num_batched_tokens: ArrayLike, max_num_seqs: ArrayLike):
        for name, v in (
            ("max_num_batched_tokens", max_num_batched_tokens),
            ("max_num_seqs", max_num_seqs),
        ):
            if not isinstance(v, jax.core.Tracer):
                x = np.asarray(v, dtype=np.float64)
                if x.shape != () or not np.isfinite(x) or x < 1:
                    raise ValueError(f"{name} must be a finite scalar >= 1, got {v!r}")
        self.max_num_batched_tokens = jnp.asarray(
            max_num_batched_tokens, dtype=jnp.result_type(float)
        )
        self.max_num_seqs = jnp.asarray(max_num_seqs, dtype=jnp.result_type(float))


# --------------------------------------------------------------------------- outputs


class StepTrace(eqx.Module):
    """What each simulated step did (leading axis: steps).

    Attributes:
        start_us: clock at the start of the step, us.
        duration_us: roofline time of the step, us (0 once the workload is done).
        stats: the step's batch statistics (tokens, requests).
        running: requests running after this step's admissions, requests.
        waiting: arrived requests still waiting after admissions, requests.
        active: whether the step ran (``False`` after the last request finished).
    """

    start_us: Float[Array, "*steps"]
    duration_us: Float[Array, "*steps"]
    stats: BatchStats
    running: Float[Array, "*steps"]
    waiting: Float[Array, "*steps"]
    active: Bool[Array, "*steps"]


class SimResult(eqx.Module):
    """Per-request latencies, throughput and the step trace of one simulation.

    Attributes:
        ttft_us: time to first token, arrival to the end of the prompt's last step, us.
        itl_us: mean inter-token latency of each request, ``(e2e - ttft) / (output -
            1)``, us (0 for one-token outputs, which have none).
        e2e_us: end-to-end latency, arrival to the last token, us.
        finished: 1 for requests that finished within the simulated steps (soft in
            the relaxed simulator); latencies of unfinished ones are cut at the end.
        output_tokens_done: output tokens generated per request, tokens.
        throughput_tok_s: output tokens per second, from the first arrival to the end
            of the last step.
        makespan_us: first arrival to the end of the last active step, us.
        mask: real (unpadded) requests.
        has_itl: real requests with at least two output tokens.
        trace: the per-step :class:`StepTrace`.
    """

    ttft_us: Float[Array, " requests"]
    itl_us: Float[Array, " requests"]
    e2e_us: Float[Array, " requests"]
    finished: Float[Array, " requests"]
    output_tokens_done: Float[Array, " requests"]
    throughput_tok_s: Float[Array, ""]
    makespan_us: Float[Array, ""]
    mask: Bool[Array, " requests"]
    has_itl: Bool[Array, " requests"]
    trace: StepTrace

    @property
    def mean_ttft_us(self) -> Array:
        """Mean TTFT over real requests, us."""
        return _masked_mean(self.ttft_us, self.mask)

    @property
    def mean_itl_us(self) -> Array:
        """Mean over requests (with >= 2 output tokens) of their mean ITL, us."""
        return _masked_mean(self.itl_us, self.has_itl)

    @property
    def mean_e2e_us(self) -> Array:
        """Mean end-to-end latency over real requests, us."""
        return _masked_mean(self.e2e_us, self.mask)

    @property
    def finished_fraction(self) -> Array:
        """Fraction of real requests finished within the simulated steps."""
        return _masked_mean(self.finished, self.mask)


def _masked_mean(x: Array, m: Array) -> Array:
    return jnp.sum(jnp.where(m, x, 0.0)) / jnp.maximum(jnp.sum(m), 1)


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
    new_tokens: npt.ArrayLike,
    context_tokens: npt.ArrayLike,
    mask: npt.ArrayLike | None,
    dep: Deployment,
    factors: Factors,
    *,
    is_decode: npt.ArrayLike | None = None,
) -> MarginalCost:
    """Marginal cost of each request in a batch, by ``jax.grad`` of the step time.

    Args:
        new_tokens: tokens each request processes this step (1 for a decode), tokens;
            1-D, shape ``(requests,)`` (any array-like: lists too).
        context_tokens: tokens already in each request's KV cache, tokens; shape
            ``(requests,)``.
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
    # gradients first: the runtime shape check binds `iterations` before it reads
    # the symbolic `iterations+1`.
    gradients: Float[Array, "iterations 2"]
    log_knobs: Float[Array, "iterations+1 2"]


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
