"""vLLM's DeepSeek sparse attention (DSA) module as one calibrated unit of the
kernel sum (DeepSeek-V3.2, GLM-5).

aiconfigurator-core measures DSA as vLLM's whole attention forward
(``sparse_attention/vllm/<version>/dsa_context_module_perf`` and
``dsa_generation_module_perf``, ``FLASHMLA_SPARSE``): the MLA projections, the
indexer (its ``wq_b``, ``wk`` and head-weight projections, FP8 MQA logits over every
cached token, top-k), the sparse MLA attention over each query's ``index_topk``
selected tokens, and the KV writes. The module's time is the roofline of its parts
under a fixed host cost (:func:`dsa_module_us`), with the parts of the MLA module
(:mod:`~diffmodel.kernels._mla`) and the indexer's:

    device = roofline(proj; GEMM peak eta_gemm, HBM mem_bw)
           + roofline(sparse attention; 16-bit peak attn_flops, HBM attn_bw)
           + roofline(indexer logits; FP8 peak index_flops, HBM index_bw)
           + top-k / (HBM topk_bw x min(rows / SMs, 1)) + KV writes / (HBM mem_bw)
    t = smooth_max(device, latency_us) (prefill) or device + latency_us (decode).

Both paths run FlashMLA's sparse kernels in the latent space (queries absorbed
through ``W_UK``, every head reading the one ``c + r`` latent of each selected
token), so both take the MLA decode dimensions. The work comes from the step
model's own functions: ``projection_work`` and ``indexer_projection_work`` (the
indexer's projections are replicated on every GPU), ``windowed_attention`` for the
top-k as a window of ``index_topk`` tokens (as the roofline costs it),
``indexer_work`` for the logits over every causal pair, plus the top-k's pass over
those logits (FP32, written and read: 8 bytes a pair).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jaxtyping import Array, Float

from .._model._arch import Architecture
from .._model._batch import BatchStats, from_aggregates
from .._model._hardware import Hardware
from .._model._layers import indexer_projection_work, indexer_work, windowed_attention
from .._model._physics import power_max, roofline_us
from ._mla import (
    DTYPE_KEYS,
    EFFICIENCIES,
    MLA_OPS,
    MlaCurves,
    MlaModule,
    MlaWork,
    ModuleKind,
    load_module_table,
    mla_module_work,
    mla_parts_us,
    mla_rows,
    module_arch,
)

DSA_FAMILIES: tuple[str, ...] = ("dsa_context", "dsa_generation")
DSA_MODEL = "deepseek-ai/DeepSeek-V3.2"
DSA_BASE = "deepseek-v3.2"
# The models of the measured modules, and their catalog names: the work of a row is
# counted on its model's dimensions (GLM-5: 64 heads of 256 + 64, 32 indexer heads).
DSA_MODELS = {DSA_MODEL: DSA_BASE, "zai-org/GLM-5": "glm-5"}
# The FP8-block GEMM widths (and quantization pass) of DeepSeek-V3.2's checkpoint.
DSA_CHECKPOINTS = {"fp8_block": DSA_BASE}
DSA_EFFICIENCIES: tuple[str, ...] = (
    *EFFICIENCIES,
    "index_flops",
    "index_bw",
    "topk_bw",
)
# Query heads FlashMLA's sparse kernels process together (Hopper).
HEAD_TILE = 64.0
# FP32 logits: written by the indexer, read by the top-k; bytes a pair each.
LOGIT_BYTES = 4.0


class DsaModule(MlaModule):
    """Efficiencies and fixed cost of one path of the DSA module: the MLA module's
    (:class:`~diffmodel.kernels.MlaModule`), the indexer's compute (at the FP8
    peak) and bandwidth, the top-k's bandwidth, and how far the device work runs
    under the fixed cost.

    Attributes:
        log_overlap: ``log(p - 1)`` of the exponent ``p`` that combines device
            work ``d`` and fixed cost ``c`` as ``(d^p + c^p)^(1/p)``: ``p = 1`` is
            their sum (the work after the host side), large ``p`` their maximum
            (the work hidden under it; the prefill path's ~1.2 ms host floor hides
            thousands of tokens' work).
    """

    NAMES = DSA_EFFICIENCIES
    log_overlap: Float[Array, ""] = eqx.field(
        default_factory=lambda: jnp.asarray(0.0, jnp.result_type(float))
    )

    @property
    def overlap(self) -> Array:
        """The exponent ``p >= 1`` of :attr:`log_overlap`."""
        return 1.0 + jnp.exp(self.log_overlap)

    def to_json(self) -> dict:
        out = super().to_json()
        out["raw"]["log_overlap"] = float(self.log_overlap)
        out["physical"]["overlap"] = float(self.overlap)
        return out

    @classmethod
    def from_json(cls, obj: dict) -> "DsaModule":
        base = super().from_json(obj)
        value = obj["raw"].get("log_overlap", 0.0)
        if not isinstance(value, int | float) or not np.isfinite(value):
            raise ValueError(
                f"DsaModule 'raw.log_overlap': a finite number, got {value!r}"
            )
        return eqx.tree_at(
            lambda m: m.log_overlap, base, jnp.asarray(float(value), base.raw.dtype)
        )


class DsaCurves(MlaCurves):
    """The DSA module of one GPU: its prefill (``context``) and decode
    (``generation``) paths (:class:`DsaModule` each)."""

    MODULE = DsaModule


class DsaWork(eqx.Module):
    """What one DSA module does (per GPU): the MLA part (projections with the
    indexer's, sparse attention, KV writes with the indexer's keys), the
    indexer's logits (FLOPs, HBM bytes: keys, queries, logits written) and the
    top-k's pass over the logits (bytes, and the query rows it runs on)."""

    mla: MlaWork
    index_flops: Array
    index_bytes: Array
    topk_bytes: Array
    topk_rows: Array


def dsa_module_work(
    op: str, stats: BatchStats, a: Architecture, t: jax.typing.ArrayLike
) -> DsaWork:
    """:class:`DsaWork` of one module of ``a`` at tensor-parallel degree ``t`` over
    the prefill tokens (``op="context"``) or the decode tokens (``"generation"``)
    of ``stats``; a path without tokens is taken at one token (finite gradients;
    the caller gates it out)."""
    if op not in MLA_OPS:
        raise ValueError(f"op must be one of {MLA_OPS}, got {op!r}")
    sparse_pf, read_pf, sparse_dec, read_dec = windowed_attention(
        stats, a.window, a.sink_tokens
    )
    if op == "context":
        tokens = jnp.maximum(stats.prefill_tokens, 1.0)
        pairs, read = stats.attn_prefill, stats.kv_prefill + stats.prefill_tokens
        sparse, sparse_read = sparse_pf, read_pf
    else:
        tokens = jnp.maximum(stats.decode_tokens, 1.0)
        pairs = read = stats.kv_decode
        sparse, sparse_read = sparse_dec, read_dec
    pairs, read = jnp.maximum(pairs, 1.0), jnp.maximum(read, 1.0)
    sparse, sparse_read = jnp.maximum(sparse, 1.0), jnp.maximum(sparse_read, 1.0)
    # Latent-space (absorbed) attention in both paths.
    w = mla_module_work("generation", tokens, sparse, sparse_read, a, t)
    # FlashMLA's sparse kernels run whole tiles of HEAD_TILE query heads (vLLM
    # pads the heads of a GPU up to them): the attention's work at those heads.
    heads = a.n_heads / jnp.asarray(t, float)
    padded = jnp.ceil(heads / HEAD_TILE) * HEAD_TILE
    tiled = mla_module_work(
        "generation", tokens, sparse, sparse_read, a, a.n_heads / padded
    )
    w = eqx.tree_at(
        lambda x: (x.attn_flops, x.attn_bytes), w, (tiled.attn_flops, tiled.attn_bytes)
    )
    ip_f, ip_b = indexer_projection_work(tokens, a)
    ix_f, ix_b = indexer_work(pairs, read, tokens, a)
    w = eqx.tree_at(
        lambda x: (x.proj_flops, x.proj_bytes, x.kv_bytes),
        w,
        (w.proj_flops + ip_f, w.proj_bytes + ip_b, w.kv_bytes + a.index_dim * tokens),
    )
    shape = jnp.shape(w.proj_flops)
    return DsaWork(
        w,
        *(
            jnp.broadcast_to(x, shape)
            for x in (ix_f, ix_b + LOGIT_BYTES * pairs, LOGIT_BYTES * pairs, tokens)
        ),
    )


def dsa_parts_us(
    m: DsaModule, w: DsaWork, hw: Hardware
) -> tuple[Array, Array, Array, Array]:
    """``(projections, sparse attention, indexer, KV writes)`` of a module, us,
    without its fixed cost. The indexer is its logits' roofline plus the top-k,
    which selects each query row's tokens on one SM: with fewer rows than SMs the
    GPU runs at ``rows / SMs`` of its bandwidth (decode of a small batch)."""
    proj, attn, kv = mla_parts_us(m, w.mla, hw)
    logits = roofline_us(
        w.index_flops,
        w.index_bytes,
        hw.flops_8,
        hw.hbm_bw,
        m.efficiency("index_flops"),
        m.efficiency("index_bw"),
    )
    fill = jnp.maximum(w.topk_rows, hw.sm_count) / w.topk_rows
    topk = fill * w.topk_bytes / (hw.hbm_bw * m.efficiency("topk_bw")) * 1e6
    return proj, attn, logits + topk, kv


def dsa_module_us(m: DsaModule, w: DsaWork, hw: Hardware) -> Array:
    """Time of one measured module, us: its parts' sum and its fixed cost, combined
    by :attr:`DsaModule.overlap`. The fixed cost (~1.2 ms on H200 for the prefill
    path, ~0.2 ms for decode) is the eager module's host side: launches and the
    indexer's synchronisations. The measured prefill modules stay flat at it up to
    thousands of tokens: the GPU's work runs under it (their smooth maximum)."""
    proj, attn, index, kv = dsa_parts_us(m, w, hw)
    return power_max(proj + attn + index + kv, m.latency_us, m.overlap)


# --------------------------------------------------------------------------- tables


def load_dsa_module(path) -> pd.DataFrame:
    """An aiconfigurator DSA module table (latency in ms) with ``latency_us``
    added, the rows of the models of :data:`DSA_MODELS` (DeepSeek-V3.2, GLM-5).
    Raises ``ValueError`` when the table has none."""
    return load_module_table(path, tuple(DSA_MODELS), "DSA module")


def dsa_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The rows DSA curves are fitted on: the models of :data:`DSA_MODELS`,
    16-bit attention math, 16-bit or FP8 block GEMMs, every KV-cache type,
    duplicates averaged (per model). Raises ``ValueError`` when none qualify."""
    if "model" not in table:
        return mla_rows(table, DSA_CHECKPOINTS)
    ours = table[table["model"].isin(DSA_MODELS)]
    if ours.empty:
        raise ValueError(f"the DSA module table has no rows of {list(DSA_MODELS)}")
    return pd.concat(
        [
            mla_rows(r, DSA_CHECKPOINTS).assign(model=model)
            for model, r in ours.groupby("model", sort=True)
        ],
        ignore_index=True,
    )


def dsa_table_work(op: str, rows: pd.DataFrame) -> DsaWork:
    """:class:`DsaWork` of every row of a DSA module table: context rows
    ``batch_size`` requests of ``isl`` new tokens, empty cache; generation rows
    ``batch_size`` requests of one new token reading ``step`` cached ones; each on
    its ``model``'s dimensions (DeepSeek-V3.2 without a ``model`` column), with
    ``num_heads`` heads on the GPU."""
    if "model" not in rows:
        rows = rows.assign(model=DSA_MODEL)
    unknown = sorted(set(rows["model"]) - set(DSA_MODELS))
    if unknown:
        raise ValueError(f"DSA module rows of {unknown}: expected {list(DSA_MODELS)}")
    parts, order = [], []
    for combo, r in rows.groupby(["model", *DTYPE_KEYS[1:]], sort=False):
        a = module_arch(combo[2], combo[1], DSA_MODELS[combo[0]], DSA_CHECKPOINTS)
        b = r["batch_size"].to_numpy(float)
        t = jnp.asarray(a.n_heads / r["num_heads"].to_numpy(float))
        zero = np.zeros_like(b)
        if op == "context":
            stats = from_aggregates(
                prefill_tokens=b * r["isl"].to_numpy(float),
                decode_tokens=zero,
                num_prefill=b,
                num_decode=zero,
                kv_tokens=zero,
            )
        else:
            stats = from_aggregates(
                prefill_tokens=zero,
                decode_tokens=b,
                num_prefill=zero,
                num_decode=b,
                kv_tokens=b * r["step"].to_numpy(float),
            )
        parts.append(dsa_module_work(op, stats, a, t))
        order.append(r.index.to_numpy())
    idx = np.argsort(np.concatenate(order), kind="stable")
    return jax.tree.map(lambda *xs: jnp.concatenate(xs)[idx], *parts)


DSA = ModuleKind(
    "dsa", DSA_FAMILIES, DsaCurves, dsa_rows, dsa_table_work, dsa_module_us
)
"""vLLM's DSA module (DeepSeek-V3.2's rows)."""
