"""vLLM's MLA attention module (DeepSeek) as one calibrated unit of the kernel sum.

aiconfigurator-core measures MLA not kernel by kernel but as vLLM's whole
``DeepseekV2MLAAttention`` forward (``mla/<backend>/<version>/mla_context_module_perf``
and ``mla_generation_module_perf``): the fused ``q_a``/``kv_a`` down-projection, the
norms, ``q_b``, RoPE, the KV-cache write, the attention (prefill: the ``kv_b``
up-projection and multi-head attention with ``qk = 192``, ``v = 128``; decode: the
absorbed ``W_UK``/``W_UV`` BMMs around latent multi-query attention) and ``o_proj``.
The GEMM and GQA curves price those modules 21-45% off (``experiments/mla_kernels.py``),
so the kernel sum times an MLA layer's attention on curves fitted to the modules
themselves where the GPU's tables have them (:attr:`KernelCurves.mla`).

The module's time is the package's roofline of its three parts plus a fixed cost:

    t = roofline(proj_f, proj_b; dense peak eta_gemm, HBM mem_bw)
      + roofline(attn_f, attn_b; 16-bit peak attn_flops, HBM attn_bw)
      + kv_b / (HBM mem_bw) + latency_us,

with the work counted by the step model's own functions (``projection_work`` and the
activation quantization pass, ``attention_work_dims`` on the MLA prefill or absorbed
decode dimensions, the latent KV write) and ``eta_gemm`` one efficiency per GEMM
operand width (16-bit, FP8, FP4 peaks). ``latency_us`` (~40-100 us) is the eager
module's launches and small kernels (norms, RoPE), timed without CUDA graphs: the
kernel sum leaves it to the host costs, as it does the same small kernels of GQA
layers, and reports the rest.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jaxtyping import Array, ArrayLike, Float

from .._model._arch import Architecture, architecture
from .._model._factors import FACTOR_SPECS
from .._model._hardware import Hardware
from .._model._layers import attention_dims, projection_work, quant_pass_bytes
from .._model._physics import attention_work_dims, roofline_us, tensor_peak

MLA_OPS: tuple[str, ...] = ("context", "generation")
MLA_FAMILIES: tuple[str, ...] = ("mla_context", "mla_generation")
MLA_MODEL = "deepseek-ai/DeepSeek-V3"
MLA_COLUMNS = (
    "model",
    "mla_dtype",
    "kv_cache_dtype",
    "gemm_type",
    "num_heads",
    "batch_size",
    "isl",
    "step",
    "latency",
)
DTYPE_KEYS = ["mla_dtype", "kv_cache_dtype", "gemm_type"]
# DeepSeek-V3's attention heads; a module of ``num_heads`` heads is one GPU of TP
# ``128 / num_heads``.
FULL_HEADS = 128.0
# The GEMM operand widths of each table ``gemm_type``, from the catalog's checkpoints
# of DeepSeek-V3's dimensions.
GEMM_CHECKPOINTS = {"fp8_block": "deepseek-v3", "nvfp4": "deepseek-v3.1-nvfp4"}
EFFICIENCIES: tuple[str, ...] = (
    "gemm_16",
    "gemm_8",
    "gemm_4",
    "mem_bw",
    "attn_flops",
    "attn_bw",
)
_PRIOR = {
    "gemm_16": FACTOR_SPECS["gemm_flops"][0],
    "gemm_8": FACTOR_SPECS["gemm_flops"][0],
    "gemm_4": FACTOR_SPECS["gemm_flops"][0],
    "mem_bw": FACTOR_SPECS["mem_bw"][0],
    "attn_flops": FACTOR_SPECS["attn_flops"][0],
    "attn_bw": FACTOR_SPECS["attn_bw"][0],
    # DSA's indexer (its FP8 logits and top-k), priced like attention.
    "index_flops": FACTOR_SPECS["attn_flops"][0],
    "index_bw": FACTOR_SPECS["attn_bw"][0],
    "topk_bw": FACTOR_SPECS["attn_bw"][0],
}


class MlaModule(eqx.Module):
    """Efficiencies and fixed cost of one path (prefill or decode) of the MLA module.

    Attributes:
        raw: logits of the efficiencies :attr:`NAMES` (fractions of the peak or of
            HBM bandwidth, in (0, 1)): the GEMMs at the 16-bit, FP8 and FP4 peaks,
            the projections' and KV write's bandwidth, the attention's compute and
            bandwidth.
        log_latency_us: log of the module's fixed cost, us.
    """

    NAMES: ClassVar[tuple[str, ...]] = EFFICIENCIES
    raw: Float[Array, " n"]
    log_latency_us: Float[Array, ""]

    @classmethod
    def prior(cls, latency_us: float = 10.0) -> "MlaModule":
        """The physical priors of :data:`~diffmodel.FACTOR_SPECS`, ``latency_us``."""
        p = np.array([_PRIOR[k] for k in cls.NAMES])
        f = jnp.result_type(float)
        return cls(
            raw=jnp.asarray(np.log(p / (1.0 - p)), f),
            log_latency_us=jnp.asarray(np.log(latency_us), f),
        )

    def efficiency(self, name: str) -> Array:
        """One of :attr:`NAMES`, in (0, 1)."""
        return jax.nn.sigmoid(self.raw[self.NAMES.index(name)])

    @property
    def latency_us(self) -> Array:
        """The fixed cost of one module, us."""
        return jnp.exp(self.log_latency_us)

    def to_json(self) -> dict:
        return {
            "raw": {
                "raw": [float(x) for x in np.asarray(self.raw)],
                "log_latency_us": float(self.log_latency_us),
            },
            "physical": {
                **{k: float(self.efficiency(k)) for k in self.NAMES},
                "latency_us": float(self.latency_us),
            },
        }

    @classmethod
    def from_json(cls, obj: dict) -> "MlaModule":
        raw = obj.get("raw") if isinstance(obj, dict) else None
        name = cls.__name__
        if not isinstance(raw, dict) or "raw" not in raw or "log_latency_us" not in raw:
            raise ValueError(f"{name} JSON needs 'raw' with 'raw', 'log_latency_us'")
        vals = np.asarray(raw["raw"], float)
        if vals.shape != (len(cls.NAMES),) or not np.isfinite(vals).all():
            raise ValueError(
                f"{name} 'raw.raw': {len(cls.NAMES)} finite numbers expected "
                f"({', '.join(cls.NAMES)}), got {raw['raw']!r}"
            )
        f = jnp.result_type(float)
        return cls(
            raw=jnp.asarray(vals, f),
            log_latency_us=jnp.asarray(float(raw["log_latency_us"]), f),
        )


class MlaCurves(eqx.Module):
    """The MLA module of one GPU: its prefill (``context``) and decode
    (``generation``) paths."""

    MODULE: ClassVar[type] = MlaModule
    context: MlaModule
    generation: MlaModule

    def to_json(self) -> dict:
        return {op: getattr(self, op).to_json() for op in MLA_OPS}

    @classmethod
    def from_json(cls, obj: dict) -> "MlaCurves":
        if not isinstance(obj, dict) or any(op not in obj for op in MLA_OPS):
            raise ValueError(f"{cls.__name__} JSON needs keys {list(MLA_OPS)}")
        return cls(**{op: cls.MODULE.from_json(obj[op]) for op in MLA_OPS})


class MlaWork(eqx.Module):
    """What one MLA module does (per GPU): FLOPs and HBM bytes of its projections
    (with the activation quantization pass), of its attention, and bytes of its
    latent KV write; ``compute_bytes``, the GEMM operand width (selects the peak)."""

    proj_flops: Array
    proj_bytes: Array
    attn_flops: Array
    attn_bytes: Array
    kv_bytes: Array
    compute_bytes: Array


def mla_module_work(
    op: str,
    tokens: ArrayLike,
    pairs: ArrayLike,
    kv_read: ArrayLike,
    a: Architecture,
    t: ArrayLike,
) -> MlaWork:
    """:class:`MlaWork` of one module of ``a`` at tensor-parallel degree ``t``.

    Args:
        op: ``"context"`` (prefill: multi-head attention on the up-projected keys
            and values) or ``"generation"`` (decode: absorbed, every head reads the
            one latent of each cached token).
        tokens: new tokens through the module.
        pairs: query-key pairs per head (prefill ``A_pf``; decode the cached
            tokens read, one query each).
        kv_read: KV tokens read.
    """
    if op not in MLA_OPS:
        raise ValueError(f"op must be one of {MLA_OPS}, got {op!r}")
    dims = attention_dims(a, t)
    tokens = jnp.asarray(tokens, float)
    proj_f, proj_b = projection_work(tokens, a, t)
    proj_b = proj_b + quant_pass_bytes(
        tokens * (a.hidden + dims.q_heads * a.v_head_dim), a
    )
    if op == "context":
        shape = (dims.prefill_qk, dims.prefill_v)
    else:
        shape = (dims.decode_qk, dims.decode_v)
    attn_f, attn_b = attention_work_dims(
        pairs,
        kv_read,
        tokens,
        dims.q_heads,
        *shape,
        dims.kv_width,
        a.kv_bytes,
        a.act_bytes,
    )
    shape_ = jnp.shape(proj_f + attn_f)
    return MlaWork(
        *(
            jnp.broadcast_to(jnp.asarray(x, float), shape_)
            for x in (
                proj_f,
                proj_b,
                attn_f,
                attn_b,
                dims.kv_width * a.kv_bytes * tokens,
                a.compute_bytes,
            )
        )
    )


def mla_parts_us(m: MlaModule, w: MlaWork, hw: Hardware) -> tuple[Array, Array, Array]:
    """``(projections, attention, KV write)`` of a module, us, without its fixed
    cost."""
    cb = w.compute_bytes
    peak = tensor_peak(cb, hw.flops_16, hw.flops_8, hw.flops_4)
    # The efficiency of the same peak (tensor_peak's choice by operand width).
    gemm_eff = tensor_peak(
        cb, m.efficiency("gemm_16"), m.efficiency("gemm_8"), m.efficiency("gemm_4")
    )
    mem = m.efficiency("mem_bw")
    proj = roofline_us(w.proj_flops, w.proj_bytes, peak, hw.hbm_bw, gemm_eff, mem)
    attn = roofline_us(
        w.attn_flops,
        w.attn_bytes,
        hw.flops_16,
        hw.hbm_bw,
        m.efficiency("attn_flops"),
        m.efficiency("attn_bw"),
    )
    kv = w.kv_bytes / (hw.hbm_bw * mem) * 1e6
    return proj, attn, kv


def mla_module_us(m: MlaModule, w: MlaWork, hw: Hardware) -> Array:
    """Time of one measured module, us: its parts plus its fixed cost."""
    proj, attn, kv = mla_parts_us(m, w, hw)
    return proj + attn + kv + m.latency_us


# --------------------------------------------------------------------------- tables


def load_module_table(
    path, model: str | tuple[str, ...] | None = None, what: str = "MLA module"
):
    """An aiconfigurator attention-module table (latency in ms) with ``latency_us``
    added, the rows of ``model`` (one name or several; default DeepSeek-V3) only.

    The work of a row is counted on that model's dimensions (newer tables also hold
    other models' modules, which the module curves do not use). Raises
    ``ValueError`` when the table has none."""
    from ._tables import _read, _with_us

    models = (MLA_MODEL,) if model is None else model
    models = (models,) if isinstance(models, str) else tuple(models)
    frame = _read(path, MLA_COLUMNS, what)
    ours = frame[frame["model"].isin(models)]
    if ours.empty:
        raise ValueError(
            f"{what} file {path}: no {' or '.join(models)} rows (models: "
            f"{sorted(set(frame['model']))})"
        )
    return _with_us(ours.reset_index(drop=True), "latency", what)


def load_mla_module(path) -> pd.DataFrame:
    """:func:`load_module_table` of an MLA module table (DeepSeek-V3's rows)."""
    return load_module_table(path)


def mla_rows(
    table: pd.DataFrame, checkpoints: dict[str, str] = GEMM_CHECKPOINTS
) -> pd.DataFrame:
    """The rows the kernel sum's module curves are fitted on: 16-bit attention
    math (the step model's), every KV-cache type and every GEMM type with a
    checkpoint in ``checkpoints`` (or 16-bit), duplicates averaged. Raises
    ``ValueError`` when none qualify."""
    rows = table[table["mla_dtype"] == "bfloat16"]
    rows = rows[rows["gemm_type"].isin(["bfloat16", *checkpoints])]
    keys = [*DTYPE_KEYS, "num_heads", "batch_size", "isl", "step"]
    rows = rows.groupby(keys, as_index=False)["latency_us"].mean()
    if rows.empty:
        raise ValueError("the module table has no rows with 16-bit attention math")
    return rows


def module_arch(
    gemm_type: str,
    kv_cache_dtype: str,
    base: str = "deepseek-v3",
    checkpoints: dict[str, str] = GEMM_CHECKPOINTS,
) -> Architecture:
    """``base`` (DeepSeek-V3) from the catalog with the GEMM widths of a table's
    ``gemm_type`` (those of the catalog model ``checkpoints`` names for it) and its
    KV-cache width (``fp8``: 1 byte, else 2)."""
    a = architecture(base)
    if gemm_type == "bfloat16":
        wb, cb, qp = 2.0, 2.0, 0.0
    elif gemm_type in checkpoints:
        src = architecture(checkpoints[gemm_type])
        wb, cb, qp = (
            float(x) for x in (src.weight_bytes, src.compute_bytes, src.quant_passes)
        )
    else:
        raise ValueError(
            f"gemm_type {gemm_type!r}: expected bfloat16 or one of {list(checkpoints)}"
        )
    kb = 1.0 if kv_cache_dtype == "fp8" else 2.0
    vals = tuple(jnp.asarray(v, float) for v in (wb, cb, qp, kb))
    return eqx.tree_at(
        lambda x: (x.weight_bytes, x.compute_bytes, x.quant_passes, x.kv_bytes), a, vals
    )


def mla_table_work(op: str, rows: pd.DataFrame) -> MlaWork:
    """:class:`MlaWork` of every row of a module table (any mix of dtypes):
    context rows ``batch_size`` requests of ``isl`` new tokens, empty cache;
    generation rows ``batch_size`` requests of one new token after ``step - 1``
    cached ones (``step`` read)."""
    parts, order = [], []
    for combo, r in rows.groupby(DTYPE_KEYS[1:], sort=False):
        a = module_arch(combo[1], combo[0])
        b = r["batch_size"].to_numpy(float)
        t = FULL_HEADS / r["num_heads"].to_numpy(float)
        if op == "context":
            s = r["isl"].to_numpy(float)
            w = mla_module_work(op, b * s, b * s * s / 2.0, b * s, a, t)
        else:
            read = b * r["step"].to_numpy(float)
            w = mla_module_work(op, b, read, read, a, t)
        parts.append(w)
        order.append(r.index.to_numpy())
    idx = np.argsort(np.concatenate(order), kind="stable")
    return jax.tree.map(lambda *xs: jnp.concatenate(xs)[idx], *parts)


@dataclasses.dataclass(frozen=True)
class ModuleKind:
    """A measured attention module the kernel sum prices on curves of its own.

    Attributes:
        name: ``"mla"`` or ``"dsa"`` (the :class:`KernelCurves` field, the
            ``--families`` name).
        families: its context and generation table families.
        curves: the curves class (``context``/``generation`` modules).
        rows: table -> the rows the curves are fitted on.
        table_work: ``(op, rows)`` -> the work of each row.
        module_us: ``(module, work, hw)`` -> each row's time, us.
        prior: ``op`` -> the module a fit starts from (default: the module class's
            :meth:`~MlaModule.prior`).
    """

    name: str
    families: tuple[str, str]
    curves: type
    rows: Callable[[pd.DataFrame], pd.DataFrame]
    table_work: Callable[[str, pd.DataFrame], Any]
    module_us: Callable[[Any, Any, Hardware], Array]
    prior: Callable[[str], Any] | None = None


def fit_module(
    kind: ModuleKind,
    op: str,
    rows: pd.DataFrame,
    hw: Hardware,
    options=None,
    init=None,
):
    """Fit one path's module (of ``kind``) to measured module rows
    (``latency_us``) on the log-ratio loss
    (:func:`~diffmodel.kernels.two_stage_minimise`). Efficiencies of GEMM widths
    the rows lack keep their priors' values up to the fit's (vanishing)
    gradient."""
    from .._metrics import log_ratio_loss
    from ._calibrate import FitOptions, two_stage_minimise

    work = kind.table_work(op, rows.reset_index(drop=True))
    actual = jnp.asarray(rows["latency_us"].to_numpy(float))
    if init is None:
        init = kind.curves.MODULE.prior() if kind.prior is None else kind.prior(op)

    def loss(m, args):
        w, y = args
        return log_ratio_loss(kind.module_us(m, w, hw), y)

    return two_stage_minimise(loss, init, options or FitOptions(), (work, actual))


# An efficiency this close to 1 has run into its bound: the data would take it higher.
AT_BOUND = 0.99


def _at_bound(m) -> str:
    """``"; at the bound of 1: ..."`` naming the efficiencies a fit left at their
    bound (weakly identified: the parts' times grow together), else ``""``."""
    hit = [k for k in m.NAMES if float(m.efficiency(k)) > AT_BOUND]
    if not hit:
        return ""
    return f"; at the bound of 1 (weakly identified): {', '.join(hit)}"


def fit_module_curves(
    kind: ModuleKind, tables: dict, hw: Hardware, options=None, progress=None
):
    """Curves of ``kind`` (e.g. :class:`MlaCurves`) from its loaded context and
    generation tables (:func:`~diffmodel.kernels.load_system_tables`); ``None``
    (reported through ``progress``) when either is missing."""
    say = progress or (lambda _: None)
    missing = [f for f in kind.families if f not in tables]
    if missing:
        say(f"skipped {kind.name}: no {', '.join(missing)} table loaded")
        return None
    fitted = {}
    for op, fam in zip(MLA_OPS, kind.families, strict=True):
        rows = kind.rows(tables[fam])
        fitted[op] = fit_module(kind, op, rows, hw, options)
        say(
            f"calibrated {kind.name} {op} on {len(rows)} modules{_at_bound(fitted[op])}"
        )
    return kind.curves(**fitted)


def _repeat(hw: Hardware, n: int) -> Hardware:
    """``hw`` with every field repeated for ``n`` rows."""
    return jax.tree.map(lambda x: jnp.full(n, x), hw)


def fit_module_curves_pooled(
    kind: ModuleKind,
    tables: dict,
    hardware: dict,
    *,
    per_gpu: int = 1000,
    options=None,
    progress=None,
):
    """Curves of ``kind`` fitted on several GPUs' module tables at once, each row
    at its own GPU's peaks and bandwidth: curves for a GPU without such tables
    (``diffmodel calibrate --pool``; ``experiments/mla_kernels.py`` measures them
    on a held-out GPU).

    Args:
        tables: ``{gpu: loaded tables}``; GPUs without both module tables are left
            out (and said through ``progress``).
        hardware: ``{gpu: Hardware}`` for the same keys.
        per_gpu: at most this many rows a GPU and path (sampled, seed 0), so that
            no GPU outweighs the others.

    Returns:
        The curves, or ``None`` (said through ``progress``) when no GPU has both
        tables.
    """
    say = progress or (lambda _: None)
    have = [g for g, t in tables.items() if all(f in t for f in kind.families)]
    for g in tables:
        if g not in have:
            say(f"{kind.name}: {g} has no {kind.name.upper()} module tables")
    if not have:
        say(f"skipped {kind.name}: no pooled GPU has its module tables")
        return None
    fitted = {}
    for op, fam in zip(MLA_OPS, kind.families, strict=True):
        parts = []
        for g in have:
            r = kind.rows(tables[g][fam])
            parts.append(r.sample(min(per_gpu, len(r)), random_state=0))
        hw_rows = jax.tree.map(
            lambda *xs: jnp.concatenate(xs),
            *(_repeat(hardware[g], len(p)) for g, p in zip(have, parts, strict=True)),
        )
        rows = pd.concat(parts, ignore_index=True)
        fitted[op] = fit_module(kind, op, rows, hw_rows, options)
        say(
            f"calibrated {kind.name} {op} on {len(rows)} modules of "
            f"{', '.join(have)}{_at_bound(fitted[op])}"
        )
    return kind.curves(**fitted)


MLA = ModuleKind(
    "mla", MLA_FAMILIES, MlaCurves, mla_rows, mla_table_work, mla_module_us
)
"""vLLM's MLA module (DeepSeek-V3's rows)."""


def fit_mla_module(
    op: str, rows: pd.DataFrame, hw: Hardware, options=None, init=None
) -> MlaModule:
    """:func:`fit_module` of the MLA module."""
    return fit_module(MLA, op, rows, hw, options, init)


def fit_mla_curves(tables: dict, hw: Hardware, options=None, progress=None):
    """:func:`fit_module_curves` of the MLA module: :class:`MlaCurves` from loaded
    ``mla_context`` and ``mla_generation`` tables, or ``None``."""
    return fit_module_curves(MLA, tables, hw, options, progress)


def fit_mla_curves_pooled(tables: dict, hardware: dict, **kw):
    """:func:`fit_module_curves_pooled` of the MLA module."""
    return fit_module_curves_pooled(MLA, tables, hardware, **kw)
