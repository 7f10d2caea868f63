"""A step as the sum of its kernels, each timed by calibrated curves (the device side),
plus the serving stack's host costs (the host side).

The roofline of :func:`diffmodel.step_time` prices a step with a handful of
efficiencies taken at one representative shape. Here every operator of every layer
is timed at the step's own shapes by the GPU's :class:`KernelCurves` (each with its
kernel floor), as aiconfigurator sums its kernel tables:

- linear: per layer the QKV, O, gate+up and down GEMMs of ``T = P + D`` tokens
  (``curves.gemm_bf16``);
- prefill attention: per layer causal attention of the step's chunks, ``A_pf``
  query-key pairs per head over ``K_pf + P`` KV tokens, ``Np`` chunks
  (``curves.prefill_attention``);
- decode attention: per layer ``Nd`` sequences of mean context ``K_dec / Nd``
  (``curves.decode_attention``);
- all-reduce: two per layer of ``T d`` 16-bit activations (``curves.allreduce``;
  zero at TP 1);
- LM head: ``[Np + Nd, d] @ [d, V / t]`` once.

What no kernel table times (the engine's Python between kernels, the graph breaks
around attention, elementwise kernels, sampling) is the host side,
:class:`HostCosts`: per step, per layer and per request, in microseconds. Those are
properties of the serving stack, not of the GPU, so a fit of them on one GPU's
traces carries to another GPU with that GPU's curves
(:func:`diffmodel.fit_host_on_kernels`).

Dense 16-bit GQA models only (the Llama family of the public traces): MoE, MLA,
sliding-window, sparse-attention and quantized models raise a ``ValueError``; use
:func:`diffmodel.step_time` for them.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from .._model._batch import BatchStats
from .._model._deployment import Deployment
from .._model._roofline import Breakdown, check_stats
from ._curves import KernelCurves
from ._work import (
    _work,
    allreduce_kernel_us,
    attention_work,
    decode_attention_us,
    gemm_us,
)

ATTN_TILE = 128.0
"""Query rows per FlashAttention tile (thread blocks of a prefill chunk)."""

HOST_TERMS: tuple[str, ...] = ("step", "layer", "request")
"""The host costs by what they are paid for: each step, each layer of a step that
runs a forward pass, each request in the batch."""


class HostCosts(eqx.Module):
    """Host-side costs of a serving stack, microseconds (each ``>= 0``).

    Attributes:
        step_us: per step (scheduling, input preparation, sampling), us.
        layer_us: per layer of a step that runs a forward pass (the engine's work
            between the captured kernels, elementwise kernels), us.
        request_us: per request in the batch, us.
    """

    step_us: Float[Array, "*g"]
    layer_us: Float[Array, "*g"]
    request_us: Float[Array, "*g"]

    def __init__(
        self,
        step_us: ArrayLike = 0.0,
        layer_us: ArrayLike = 0.0,
        request_us: ArrayLike = 0.0,
    ):
        dtype = jnp.result_type(float)
        self.step_us = jnp.asarray(step_us, dtype)
        self.layer_us = jnp.asarray(layer_us, dtype)
        self.request_us = jnp.asarray(request_us, dtype)

    def as_dict(self) -> dict[str, Array]:
        """The costs by term name (``step``, ``layer``, ``request``), us."""
        return {t: getattr(self, f"{t}_us") for t in HOST_TERMS}


def check_dense(dep: Deployment) -> None:
    """Raise ``ValueError`` unless every deployment in ``dep`` is a dense 16-bit GQA
    model (what :func:`kernel_step_time` can time). Skipped under tracing."""
    a = dep.arch
    checks = {
        "n_experts": (a.n_experts, "MoE"),
        "kv_lora_rank": (a.kv_lora_rank, "MLA"),
        "window_layers": (a.window_layers, "sliding-window attention"),
        "index_layers": (a.index_layers, "sparse attention"),
    }
    found = []
    for field, (value, what) in checks.items():
        if isinstance(value, jax.core.Tracer):
            return
        if np.any(np.asarray(value) > 0):
            found.append(f"{what} ({field} > 0)")
    if found:
        raise ValueError(
            f"kernel_step_time: the architecture has {', '.join(found)}; it times "
            "dense GQA models only, use diffmodel.step_time"
        )
    for field in ("weight_bytes", "compute_bytes"):
        value = np.asarray(getattr(a, field))
        if np.any(value != 2.0):
            raise ValueError(
                f"kernel_step_time: {field} must be 2 (16-bit weights), got "
                f"{np.unique(value).tolist()}; quantized models use diffmodel.step_time"
            )


def kernel_step_time(
    stats: BatchStats,
    dep: Deployment,
    curves: KernelCurves,
    host: HostCosts | None = None,
    *,
    check: bool = True,
) -> Breakdown:
    """Time of each step as the sum of its kernels plus host costs, us, by component.

    Args:
        stats: the steps' batch statistics (any shape; see :class:`BatchStats`).
        dep: the deployment, shared or per step (:meth:`Deployment.take`).
        curves: calibrated kernel curves of the deployment's GPU
            (:func:`diffmodel.kernels.calibrate_kernels`).
        host: the stack's host costs (default: none, the device time alone).
        check: validate ``stats`` and the architecture (concrete values only).

    Returns:
        A :class:`~diffmodel.Breakdown`: ``linear`` (the four GEMMs of every layer),
        ``attention_prefill``, ``attention_decode``, ``allreduce``, ``lm_head`` and
        ``overhead`` (the host costs); ``kv_write`` is 0 (the KV write is an
        elementwise kernel, paid per layer in ``host.layer_us``). A step with no
        tokens runs no kernel and pays ``host.step_us`` and its requests' cost.

    Differentiable in ``stats``, the curves and ``host``; ``jax.vmap`` and
    ``jax.jit`` apply (pass ``check=False`` under tracing for speed).
    """
    if check:
        stats = check_stats(stats)
        check_dense(dep)
    host = HostCosts() if host is None else host
    a, hw = dep.arch, dep.hw
    t = jnp.asarray(dep.tp, float)
    d, dh, n_layers = a.hidden, a.head_dim, a.n_layers
    qh = a.n_heads / t
    kvh = jnp.maximum(a.n_kv_heads / t, 1.0)
    ffn = a.ffn / t
    p, dec = stats.prefill_tokens, stats.decode_tokens
    n_pf, n_dec = stats.num_prefill, stats.num_decode
    tokens = p + dec
    runs = tokens > 0
    gate = jnp.where(runs, 1.0, 0.0)
    m = jnp.maximum(tokens, 1.0)  # a GEMM of no rows is not run (gated below)

    shapes = (((qh + 2.0 * kvh) * dh, d), (d, qh * dh), (2.0 * ffn, d), (d, ffn))
    linear = sum(gemm_us(m, n, k, curves.gemm_bf16, hw) for n, k in shapes)

    # Prefill: A_pf pairs per query head over K_pf + P tokens; the kernel's thread
    # blocks are the chunks' query tiles (GQA heads packed into the tile).
    chunks = jnp.maximum(n_pf, 1.0)
    group = qh / kvh
    tiles = jnp.ceil(p / chunks * group / ATTN_TILE)
    f, b = attention_work(
        stats.attn_prefill, stats.kv_prefill + p, p, qh, kvh, dh, a.kv_bytes
    )
    pf_work = _work(f, b, hw.flops_16, hw, chunks * kvh * tiles)
    prefill = jnp.where(p > 0, pf_work.time_us(curves.prefill_attention), 0.0)

    seqs = jnp.maximum(n_dec, 1.0)
    decode = jnp.where(
        n_dec > 0,
        decode_attention_us(
            seqs,
            stats.kv_decode / seqs,
            qh,
            kvh,
            dh,
            curves.decode_attention,
            hw,
            a.kv_bytes,
        ),
        0.0,
    )
    allreduce = 2.0 * allreduce_kernel_us(m * d * a.act_bytes, t, curves.allreduce, hw)
    requests = n_pf + n_dec
    lm_head = gemm_us(jnp.maximum(requests, 1.0), a.vocab / t, d, curves.gemm_bf16, hw)
    overhead = (
        host.step_us + n_layers * host.layer_us * gate + requests * host.request_us
    )
    shape = jnp.shape(linear * overhead)
    zero = jnp.zeros(shape)
    return Breakdown(
        linear=n_layers * linear * gate + zero,
        attention_prefill=n_layers * prefill * gate + zero,
        attention_decode=n_layers * decode * gate + zero,
        kv_write=zero,
        lm_head=lm_head * gate * (requests > 0) + zero,
        allreduce=n_layers * allreduce * gate + zero,
        overhead=overhead + zero,
    )


def host_features(stats: BatchStats, dep: Deployment) -> Float[Array, "*steps 3"]:
    """What each host cost is paid per: ``[1, L (T > 0), Np + Nd]`` per step (the
    multipliers of ``step_us``, ``layer_us``, ``request_us`` in
    :func:`kernel_step_time`)."""
    tokens = stats.prefill_tokens + stats.decode_tokens
    layers = dep.arch.n_layers * jnp.where(tokens > 0, 1.0, 0.0)
    requests = stats.num_prefill + stats.num_decode
    ones = jnp.ones(jnp.shape(layers * requests))
    return jnp.stack([ones, layers + 0.0 * ones, requests + 0.0 * ones], axis=-1)


def device_us(
    stats: BatchStats, dep: Deployment, curves: KernelCurves, *, check: bool = True
) -> Float[Array, "*steps"]:
    """The device time of each step, us: :func:`kernel_step_time` without host."""
    return kernel_step_time(stats, dep, curves, check=check).total


__all__ = [
    "HOST_TERMS",
    "HostCosts",
    "check_dense",
    "device_us",
    "host_features",
    "kernel_step_time",
]
