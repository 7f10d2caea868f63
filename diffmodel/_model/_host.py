"""The host side of a step: what the serving engine's CPU does, in microseconds.

A vLLM (V1 engine) step on the host, in the order the engine runs it, and the term of
the model that stands for each part:

- ``schedule_us`` (per step): ``Scheduler.schedule()`` picks the requests, allocates
  KV blocks and builds the ``SchedulerOutput``; the engine core's bookkeeping around it.
- ``prepare_us`` (per request per step): ``GPUModelRunner._prepare_inputs`` and the
  attention-metadata builders: a row of the block table, positions, slot mapping and
  sampling parameters per scheduled request, copied to the GPU.
- ``replay_us`` (per step, graph regime): a decode batch whose size fits a captured
  size (``compilation_config.cudagraph_capture_sizes``) is padded to it and replayed
  as one CUDA graph: inputs copied into the graph's static buffers and one
  ``cudaGraphLaunch``, asynchronous on the host.
- ``launch_us`` (per kernel launch, eager regime): a batch that does not fit a graph
  runs eagerly (PyTorch ops, ``enforce_eager`` or sizes above the largest capture):
  every kernel of every layer is launched from Python,
  ``launches = L * kernels_per_layer + 8`` (:func:`kernels_per_layer`).
- ``eager_request_us`` (per request per step, eager regime): host work that grows with
  the batch only outside graphs (per-request attention metadata that a graph keeps in
  static buffers, and the host blocking on the device queue once launches run ahead).
- ``graph_limit`` and ``gate_width``: where the engine switches from replay to eager,
  as a smooth gate ``g = sigmoid((x - graph_limit) / gate_width)`` on the gate
  variable ``x`` (requests in the batch, or the decode KV tokens in thousands; see
  :data:`GATE_VARIABLES`). A learnable, bounded location per deployment; a hard
  switch would have no gradient.

The host timer of a step (what the study's ``step.duration_us`` records) is
``schedule + prepare N + (1 - g) replay + g (launch launches + eager_request N)``.

**Iteration time** (start to start) combines host and device work. Under vLLM's
asynchronous scheduling the host prepares and launches a step while the GPU runs, so
the timed host work and the device work overlap: their smooth maximum
``smooth_max(device, host)`` (:func:`~diffmodel._model._physics.smooth_max`). What does
not overlap (the roofline's ``overhead``: output transfer and processing, the
synchronisation between steps) adds on top:
``iteration = smooth_max(roofline GPU components, host timed) + roofline overhead``.
While the GPU is the slower side (every step of the public traces) this is the
roofline's total plus a small smooth-max excess.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._model._arch import Architecture
from .._model._batch import BatchStats
from .._model._factors import set_named_fields
from .._model._physics import SHARPNESS, smooth_max
from .._model._roofline import Breakdown

# name -> (prior, unit, low, high). Times are >= 0 (low 0, high None: a softplus);
# the gate's location and width are bounded (a sigmoid in log space). Priors: vLLM's
# scheduler and input preparation cost tens to hundreds of us per step and a few us
# per request; a CUDA kernel launch from PyTorch costs ~5 us of CPU time; a graph
# replay ~tens of us.
HOST_SPECS: dict[str, tuple[float, str, float, float | None]] = {
    "schedule_us": (100.0, "us per step", 0.0, None),
    "prepare_us": (5.0, "us per request per step", 0.0, None),
    "replay_us": (30.0, "us per step (graph regime)", 0.0, None),
    "launch_us": (5.0, "us per kernel launch (eager regime)", 0.0, None),
    "eager_request_us": (20.0, "us per request per step (eager regime)", 0.0, None),
    "graph_limit": (64.0, "gate variable units (see gate_on)", 1.0, 512.0),
    "gate_width": (4.0, "gate variable units", 0.25, 64.0),
}
HOST_NAMES: tuple[str, ...] = tuple(HOST_SPECS)

GATE_VARIABLES: dict[str, str] = {
    "requests": "requests in the batch, Np + Nd",
    "kv_tokens": "decode KV tokens K_dec, thousands",
}
"""What the regime gate is a function of: ``requests`` (what vLLM's graph dispatch
looks at: the padded batch size) or ``kv_tokens`` (the decode context the step reads,
in thousands of tokens)."""

# Kernels outside the layers: embedding, final norm, LM head, logits processing and
# sampling (a handful of small kernels).
_STEP_KERNELS = 8.0


class HostFactors(eqx.Module):
    """Physical host parameters (see the module doc); each field an array, a scalar
    for one set or with a leading axis (one set per step or per group).

    Attributes:
        schedule_us: scheduling and engine bookkeeping, us per step.
        prepare_us: input preparation, us per request per step.
        replay_us: CUDA-graph replay, us per step (graph regime).
        launch_us: one kernel launch, us (eager regime).
        eager_request_us: extra host work per request, us (eager regime).
        graph_limit: gate location, in units of the gate variable.
        gate_width: gate width, same units.
    """

    schedule_us: Float[Array, "*g"]
    prepare_us: Float[Array, "*g"]
    replay_us: Float[Array, "*g"]
    launch_us: Float[Array, "*g"]
    eager_request_us: Float[Array, "*g"]
    graph_limit: Float[Array, "*g"]
    gate_width: Float[Array, "*g"]

    def __init__(self, **values):
        set_named_fields(self, values, HOST_SPECS, "host factor")

    def as_dict(self) -> dict[str, Array]:
        """The host factors by name."""
        return {n: getattr(self, n) for n in HOST_NAMES}


class HostBreakdown(eqx.Module):
    """Host time of a step by part, microseconds (arrays shaped like the steps).

    Attributes:
        schedule: scheduling, per step.
        prepare: input preparation, per request.
        replay: CUDA-graph replay, weighted by ``1 - gate``.
        launch: eager kernel launches and per-request eager work, weighted by ``gate``.
        gate: share of the eager regime, in (0, 1) (unitless).
    """

    schedule: Float[Array, "*steps"]
    prepare: Float[Array, "*steps"]
    replay: Float[Array, "*steps"]
    launch: Float[Array, "*steps"]
    gate: Float[Array, "*steps"]

    @property
    def timed(self) -> Float[Array, "*steps"]:
        """Host time the engine's step timer sees, us."""
        return self.schedule + self.prepare + self.replay + self.launch


def kernels_per_layer(arch: Architecture, tp) -> Float[Array, "*g"]:
    """Kernels one decoder layer launches in eager mode (vLLM, fused ops), per GPU.

    Attention block: input RMSNorm, QKV GEMM, rotary embedding, KV-cache write,
    attention, output GEMM, fused residual-add + RMSNorm (7). Dense MLP: gate/up GEMM,
    SiLU-and-mul, down GEMM (3); shared experts the same (3); routed experts: router
    GEMM, top-k softmax, token sort/align, two grouped GEMMs, activation, weighted sum
    (7). Tensor parallelism adds two all-reduces (``tp > 1``).
    """
    dense = jnp.where(arch.ffn > 0, 3.0, 0.0)
    shared = jnp.where(arch.shared_ffn > 0, 3.0, 0.0)
    moe = jnp.where(arch.n_experts > 0, 7.0, 0.0)
    comm = jnp.where(jnp.asarray(tp) > 1, 2.0, 0.0)
    return 7.0 + dense + shared + moe + comm


def eager_launches(arch: Architecture, tp) -> Float[Array, "*g"]:
    """Kernel launches of one eager forward pass: ``L * kernels_per_layer + 8``."""
    return arch.n_layers * kernels_per_layer(arch, tp) + _STEP_KERNELS


def gate_variable(stats: BatchStats, gate_on: str) -> Float[Array, "*steps"]:
    """The variable the regime gate reads (see :data:`GATE_VARIABLES`)."""
    if gate_on == "requests":
        return stats.requests
    if gate_on == "kv_tokens":
        return stats.kv_decode / 1000.0
    raise ValueError(f"gate_on must be one of {list(GATE_VARIABLES)}, got {gate_on!r}")


def host_time(
    stats: BatchStats,
    arch: Architecture,
    tp,
    host: HostFactors,
    *,
    gate_on: str = "requests",
) -> HostBreakdown:
    """Host time of one step by part, us (see the module doc for each term).

    Written for one step; every operation is elementwise, so arrays of steps with a
    per-step architecture (``Deployment.take``) and per-step or shared factors
    broadcast.
    """
    n = stats.requests
    gate = jax.nn.sigmoid(
        (gate_variable(stats, gate_on) - host.graph_limit) / host.gate_width
    )
    launches = eager_launches(arch, tp)
    eager = host.launch_us * launches + host.eager_request_us * n
    shape = jnp.shape(gate)
    return HostBreakdown(
        schedule=jnp.broadcast_to(host.schedule_us, shape),
        prepare=host.prepare_us * n,
        replay=(1.0 - gate) * host.replay_us,
        launch=gate * eager,
        gate=gate,
    )


def iteration_us(
    device: Breakdown, host_timed: Array, *, sharpness: float = SHARPNESS
) -> Array:
    """Start-to-start time of a step, us: ``smooth_max(GPU, host) + overhead``.

    ``device`` is the roofline's breakdown; its GPU components (all but ``overhead``)
    overlap the timed host work, its ``overhead`` (what does not overlap) adds.
    """
    gpu = device.total - device.overhead
    return smooth_max(gpu, host_timed, sharpness) + device.overhead
