"""Inputs and outputs of the scheduler simulation: the workload (requests), the
scheduler knobs, the per-step trace and the simulation result."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float

from .._model._batch import BatchStats

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


def _vector(name: str, x: ArrayLike, n: int | None) -> np.ndarray:
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
    arrival_us: ArrayLike,
    prompt_tokens: ArrayLike,
    output_tokens: ArrayLike,
    *,
    cached_tokens: ArrayLike | None = None,
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

    start_us: Float[Array, " steps"]
    duration_us: Float[Array, " steps"]
    stats: BatchStats
    running: Float[Array, " steps"]
    waiting: Float[Array, " steps"]
    active: Bool[Array, " steps"]


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
