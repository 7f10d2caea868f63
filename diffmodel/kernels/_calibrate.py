"""Calibrate efficiency curves on measured kernels, and map them to step-level factors.

Every fit minimises the log-ratio loss ``mean((ln pred - ln actual)^2)`` with
:func:`diffmodel.minimise` (Adam, then L-BFGS from Adam's end point).
"""

import dataclasses

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jaxtyping import ArrayLike

from .._fitting._optimise import minimise
from .._kernel_families import ALL_FAMILIES
from .._metrics import log_ratio_loss
from .._model._arch import architecture
from .._model._factors import FACTOR_SPECS, Factors
from .._model._hardware import Hardware, hardware
from .._model._physics import attention_work
from ..kernels._curves import (
    KERNEL_FAMILIES,
    AllReduceCurve,
    KernelCurves,
    RooflineCurves,
    default_allreduce_curve,
    default_roofline_curves,
    init_curves,
)
from ..kernels._dsa import DSA
from ..kernels._grid import fit_shape_grid
from ..kernels._mla import MLA, fit_module_curves
from ..kernels._tables import table_work
from ..kernels._work import (
    KernelWork,
    allreduce_kernel_us,
    decode_attention_work,
    gemm_kernel_work,
    prefill_attention_work,
)

# The measured attention modules the kernel sum can price on curves of their own
# (``KernelCurves.mla``, ``.dsa``), and what happens without them.
MODULE_KINDS = {"mla": MLA, "dsa": DSA}
MODULE_FALLBACK = {
    "mla": "MLA layers use the GEMM and attention curves",
    "dsa": "the kernel sum refuses sparse-attention layers",
}


@dataclasses.dataclass(frozen=True)
class FitOptions:
    """Step budgets of a curve fit: ``adam_steps`` at ``learning_rate``, then
    ``lbfgs_steps`` of L-BFGS."""

    adam_steps: int = 800
    lbfgs_steps: int = 100
    learning_rate: float = 0.1


def _unary(params, loss):
    return loss(params)


def two_stage_minimise(loss, init, options: FitOptions, args=None):
    """Adam (``options.adam_steps``), then L-BFGS polishing; the parameters.

    ``loss(params, args)`` with the data in ``args`` (one compilation per loss and
    shapes); without ``args``, ``loss(params)`` (a closure: compiles per call). A
    non-finite loss raises (``minimise``'s ``throw``)."""
    if args is None:
        loss, args = _unary, loss
    res = minimise(
        loss,
        init,
        args,
        solver="adam",
        learning_rate=options.learning_rate,
        max_steps=options.adam_steps,
    )
    if options.lbfgs_steps:
        res = minimise(
            loss, res.params, args, solver="lbfgs", max_steps=options.lbfgs_steps
        )
    return res.params


def _roofline_loss(curves, args):
    work, actual = args
    return log_ratio_loss(work.time_us(curves), actual)


def _allreduce_loss(curve, args):
    b, n, hw, actual = args
    return log_ratio_loss(allreduce_kernel_us(b, n, curve, hw), actual)


def fit_roofline_curves(
    work: KernelWork,
    latency_us: ArrayLike,
    init: RooflineCurves | None = None,
    *,
    options: FitOptions = FitOptions(),
) -> RooflineCurves:
    """Fit :class:`RooflineCurves` to measured times (us) of kernels of known work."""
    actual = jnp.asarray(latency_us, float)
    if actual.shape != work.flops.shape:
        raise ValueError(
            f"latency_us has shape {actual.shape}; expected one time per kernel "
            f"{work.flops.shape}"
        )
    init = default_roofline_curves() if init is None else init
    return two_stage_minimise(_roofline_loss, init, options, (work, actual))


def fit_allreduce_curve(
    bytes_: ArrayLike,
    n_gpus: ArrayLike,
    latency_us: ArrayLike,
    hw: Hardware,
    init: AllReduceCurve | None = None,
    *,
    options: FitOptions = FitOptions(),
) -> AllReduceCurve:
    """Fit an :class:`AllReduceCurve` to measured all-reduce times (us)."""
    b, n = jnp.asarray(bytes_, float), jnp.asarray(n_gpus, float)
    actual = jnp.asarray(latency_us, float)
    init = default_allreduce_curve() if init is None else init
    return two_stage_minimise(_allreduce_loss, init, options, (b, n, hw, actual))


def _dominant(rows: pd.DataFrame, column: str = "kernel_source") -> pd.DataFrame:
    # Where a table times several kernels for the same op (FA3 and FA4, two MoE
    # backends), keep the one measured on most rows: the one the backend runs.
    if column not in rows.columns or rows.empty:
        return rows
    return rows[rows[column] == rows[column].value_counts().index[0]]


def family_table(family: str) -> str:
    """The table (:func:`load_kernel_tables` key) a family's rows come from: GEMM
    dtypes share ``gemm``, MoE dtypes ``moe``."""
    for table in ("gemm", "moe"):
        if family.startswith(table):
            return table
    return family


# The gemm table's dtype of each GEMM family.
GEMM_DTYPES = {"gemm_bf16": "bfloat16", "gemm_fp8": "fp8", "gemm_nvfp4": "nvfp4"}


# Which rows of aiconfigurator's tables each family is calibrated on: the dtypes and
# kernels a bf16 vLLM deployment runs (the traces': bf16 weights and KV, CUDA graphs).
def family_rows(tables: dict[str, pd.DataFrame], family: str) -> pd.DataFrame:
    """The rows of the loaded tables (:func:`load_kernel_tables`) of one family.

    GEMMs by dtype (``gemm_nvfp4``: NVFP4 weights and activations at the FP4
    peak, on Blackwell); attention with bf16 KV and no sliding window; MoE in bf16
    (``moe``), FP8 (``moe_fp8``: 128-block rows, per-tensor ones where no block
    row is measured), MXFP4 weights with 16-bit activations (``moe_w4a16``) or
    NVFP4 weights and activations (``moe_nvfp4``),
    under every routing distribution; all-reduce under CUDA graphs (eager where
    only that was measured); each with its dominant ``kernel_source``. Raises
    ``ValueError`` naming the family when ``tables`` lacks it or none of its rows
    qualify (never a silent zero-row family).
    """
    known = list(ALL_FAMILIES)
    if family not in known:
        raise ValueError(f"unknown family {family!r}; expected one of {known}")
    source = family_table(family)
    if source not in tables:
        raise ValueError(f"no {source} table loaded for family {family}")
    t = tables[source]
    if family in GEMM_DTYPES:
        rows = t[t["gemm_dtype"] == GEMM_DTYPES[family]]
    elif family in ("prefill_attention", "decode_attention"):
        rows = t[t["kv_cache_dtype"] == "bfloat16"]
        if "window_size" in rows.columns:
            rows = rows[rows["window_size"].fillna(0) <= 0]
    elif family == "moe":
        rows = t[t["moe_dtype"] == "bfloat16"]
    elif family == "moe_fp8":
        block = t[t["moe_dtype"] == "fp8_block"]
        rows = block if len(block) else t[t["moe_dtype"] == "fp8"]
    elif family == "moe_w4a16":
        rows = t[t["moe_dtype"] == "w4a16_mxfp4"]
    elif family == "moe_nvfp4":
        rows = t[t["moe_dtype"] == "nvfp4"]
    else:
        graph = t[t["kernel_source"] == "vLLM_custom_graph"]
        rows = graph if len(graph) else t
    rows = _dominant(rows)
    if rows.empty:
        where = " ".join(f"{k}={v}" for k, v in t.attrs.items()) or "the tables"
        raise ValueError(f"{where} has no rows for family {family}")
    return rows


def family_work(family: str, rows: pd.DataFrame, hw: Hardware) -> KernelWork:
    """:func:`table_work` of a family's rows (GEMM dtypes share the GEMM table)."""
    return table_work(family_table(family), rows, hw)


GRID_SHAPE_KEYS: dict[str, tuple[str, ...]] = {
    "gemm_bf16": ("n", "k"),
    "gemm_fp8": ("n", "k"),
    "gemm_nvfp4": ("n", "k"),
    "prefill_attention": ("num_heads", "num_key_value_heads", "head_dim"),
    "decode_attention": ("num_heads", "num_key_value_heads", "head_dim"),
}
"""The families whose curves take a :class:`ShapeGrid`, and the table columns of
one layer's shape (a weight shape; a head layout): the grid's cross-validation
leaves whole shapes out, as a layer the tables never measured would be."""

GRID_FAMILIES: tuple[str, ...] = tuple(GRID_SHAPE_KEYS)


def shape_groups(rows: pd.DataFrame, family: str) -> np.ndarray:
    """Each row's shape (an integer per distinct :data:`GRID_SHAPE_KEYS` value)."""
    keys = list(GRID_SHAPE_KEYS[family])
    return rows.groupby(keys, sort=False, dropna=False).ngroup().to_numpy()


def with_shape_grid(
    curves: RooflineCurves, work, y, groups=None
) -> tuple[RooflineCurves, str]:
    """``curves`` with a :class:`ShapeGrid` fitted to the residuals
    ``log(y / predicted)`` of ``work`` (measured times ``y``, us; work that names
    its grid sizes: GEMMs, attention), cross-validated over ``groups`` (each row's
    shape, :func:`shape_groups`; default the GEMMs' ``(n, k)``), and a note for
    the progress line."""
    if work.grid_a is None:
        raise ValueError("with_shape_grid: the work names no grid sizes")
    plain = eqx.tree_at(
        lambda c: c.shape_grid, curves, None, is_leaf=lambda x: x is None
    )
    pred = np.asarray(work.time_us(plain), np.float64)
    grid, scores = fit_shape_grid(
        np.asarray(work.grid_a),
        np.asarray(work.grid_b),
        np.asarray(work.grid_c),
        np.log(np.asarray(y, np.float64) / pred),
        groups=groups,
    )
    moved = eqx.tree_at(
        lambda c: c.shape_grid, plain, grid, is_leaf=lambda x: x is None
    )
    chosen = (grid.step, grid.smoothing)
    note = (
        f" (shape grid {grid.values.shape}, {grid.step:g} octaves per cell, "
        f"smoothing {grid.smoothing:g}: cross-validated |log residual| "
        f"{scores[chosen]:.3f})"
        if scores
        else ""
    )
    return moved, note


def calibrate_kernels(
    tables: dict[str, pd.DataFrame],
    *,
    hardware_name: str = "h100-sxm",
    options: FitOptions = FitOptions(),
    portable: bool = False,
    progress=None,
    families: tuple[str, ...] | None = None,
    shape_grids: bool = False,
) -> KernelCurves:
    """Fit every family's curves on all its rows of ``tables``.

    ``shape_grids``: also fit the :class:`ShapeGrid` of each family of
    :data:`GRID_FAMILIES` (the GPU's shape effects: GEMM tile and split-K choices,
    attention's tiling and splits) on the residuals of its curves, its
    cell size and smoothing chosen by 5-fold cross-validation over weight shapes
    (:func:`fit_shape_grid`). It brings the curves closer on the shapes the tables
    hold out (``experiments/gpus.py``, variant ``calibrated_grid``), but it is off
    by default: on the public H100 traces (temporal split, host costs refitted) the
    kernel sum with the GEMM and attention grids priced the training rows worse
    (2.90% against 2.83% mean MAPE) and the validation rows after them too (5.51
    against 4.49%), so what it learns of isolated kernels did not carry to the
    served steps.

    ``portable``: fit curves in portable sizes (:class:`RooflineCurves`), which
    another GPU can start from. A family without rows in ``tables`` (no FP8 GEMMs
    measured on A100) keeps its uncalibrated default curves and is reported as
    skipped, never as "calibrated on 0 kernels". ``progress``: optional callable
    receiving one line of text per family. ``families``: fit only these (names of
    :data:`KERNEL_FAMILIES`, ``"allreduce"`` or ``"mla"``); the others keep their
    uncalibrated curves, reported as not asked for. ``"mla"``: vLLM's MLA module
    (:class:`MlaCurves`) where ``tables`` hold ``mla_context`` and
    ``mla_generation`` (:func:`load_system_tables` with those families); without
    them ``KernelCurves.mla`` is ``None``. ``"dsa"``: vLLM's DeepSeek sparse
    attention module (:class:`DsaCurves`) from ``dsa_context`` and
    ``dsa_generation``, likewise.
    """
    known = (*ALL_FAMILIES, *MODULE_KINDS)
    wanted = known if families is None else tuple(families)
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise ValueError(f"families {unknown} are unknown; expected some of {known}")
    hw = hardware(hardware_name)
    say = progress or (lambda _: None)
    fitted = {}
    for fam in KERNEL_FAMILIES:
        init = init_curves(fam, portable=portable)
        if fam not in wanted:
            fitted[fam] = init
            say(f"skipped {fam}: not asked for (its curves stay uncalibrated)")
            continue
        try:
            rows = family_rows(tables, fam)
        except ValueError as err:
            fitted[fam] = init
            say(f"skipped {fam}: {err} (its curves stay uncalibrated)")
            continue
        work = family_work(fam, rows, hw)
        y = rows["latency_us"].to_numpy(float)
        fitted[fam] = fit_roofline_curves(work, y, init, options=options)
        grid_note = ""
        if shape_grids and fam in GRID_FAMILIES:
            fitted[fam], grid_note = with_shape_grid(
                fitted[fam], work, y, shape_groups(rows, fam)
            )
        say(f"calibrated {fam} on {len(rows)} kernels{grid_note}")
    init = default_allreduce_curve(portable=portable, hop=True)
    try:
        ar = family_rows(tables, "allreduce") if "allreduce" in wanted else None
    except ValueError as err:
        ar, why = None, err
    else:
        why = "not asked for"
    if ar is None:
        fitted["allreduce"] = init
        say(f"skipped allreduce: {why} (its curve stays uncalibrated)")
    else:
        fitted["allreduce"] = fit_allreduce_curve(
            ar["bytes"].to_numpy(float),
            ar["num_gpus"].to_numpy(float),
            ar["latency_us"].to_numpy(float),
            hw,
            init,
            options=options,
        )
        say(f"calibrated allreduce on {len(ar)} kernels")
    for name, kind in MODULE_KINDS.items():
        if name in wanted:
            fitted[name] = fit_module_curves(kind, tables, hw, options, say)
        else:
            say(f"skipped {name}: not asked for ({MODULE_FALLBACK[name]})")
    return KernelCurves(**fitted, hardware=hardware_name)


def kernel_prior_factors(
    curves: KernelCurves,
    *,
    model: str = "llama-2-70b",
    tp: int = 4,
    prefill_tokens: float = 2048.0,
    decode_tokens: float = 64.0,
    decode_context: float = 1024.0,
) -> Factors:
    """Step-level :class:`~diffmodel.Factors` implied by kernel-calibrated curves.

    Each efficiency is the ideal time over the calibrated time of representative
    kernels of ``model`` at TP ``tp`` (so it is in (0, 1]):

    - ``gemm_flops``: the layer's four GEMMs (QKV, O, gate+up, down) at
      ``prefill_tokens`` tokens, FLOPs / (peak x time);
    - ``mem_bw``: the same GEMMs at ``decode_tokens`` tokens, bytes / (HBM bw x time);
    - ``attn_flops``: causal prefill attention of one ``prefill_tokens`` chunk, the
      step model's FLOPs (``prefill_tokens^2 / 2`` pairs, without the kernel's tile
      padding) / (peak x time);
    - ``attn_bw``: decode attention of ``decode_tokens`` sequences of
      ``decode_context`` tokens, KV bytes / (HBM bw x time);
    - ``comm_bw``, ``comm_latency_us``: the all-reduce curve's efficiency at the
      prefill activation size (``prefill_tokens d`` 16-bit values) and its latency
      over ``tp`` GPUs (with a hop term, ``tp - 1`` hops).

    Host overheads (per step, layer, request) cannot be seen in kernel timings and
    keep their priors of :data:`~diffmodel.FACTOR_SPECS`.
    """
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    a = architecture(model)
    hw = hardware(curves.hardware)
    d, dh, t = a.hidden, a.head_dim, float(tp)
    qh, kvh = a.n_heads / t, jnp.maximum(a.n_kv_heads / t, 1.0)
    ffn = (a.ffn + a.shared_ffn + a.top_k * a.expert_ffn) / t
    shapes = [((qh + 2 * kvh) * dh, d), (d, qh * dh), (2 * ffn, d), (d, ffn)]

    def layer(tokens):
        works = [gemm_kernel_work(tokens, n, k, hw) for n, k in shapes]
        time = sum(w.time_us(curves.gemm_bf16) for w in works)
        return sum(w.flops for w in works), sum(w.bytes for w in works), time

    f_pf, _, t_pf = layer(prefill_tokens)
    _, b_dec, t_dec = layer(decode_tokens)
    pf = prefill_attention_work(1.0, prefill_tokens, qh, kvh, dh, hw)
    pf_flops, _ = attention_work(
        prefill_tokens**2 / 2.0, prefill_tokens, prefill_tokens, qh, kvh, dh
    )
    dec = decode_attention_work(decode_tokens, decode_context, qh, kvh, dh, hw)
    ar = curves.allreduce
    return Factors(
        gemm_flops=f_pf / (hw.flops_16 * t_pf) * 1e6,
        mem_bw=b_dec / (hw.hbm_bw * t_dec) * 1e6,
        attn_flops=pf_flops
        / (hw.flops_16 * pf.time_us(curves.prefill_attention))
        * 1e6,
        attn_bw=dec.bytes / (hw.hbm_bw * dec.time_us(curves.decode_attention)) * 1e6,
        comm_bw=ar.bandwidth(prefill_tokens * d * a.act_bytes),
        comm_latency_us=ar.latency_at(tp),
        **{
            n: FACTOR_SPECS[n][0]
            for n in ("step_overhead_us", "layer_overhead_us", "request_overhead_us")
        },
    )


def held_out_split(
    rows: pd.DataFrame, keys: list[str], *, frac: float = 0.25, seed: int = 0
) -> np.ndarray:
    """Boolean mask of held-out rows: a random ``frac`` of the unique ``keys`` shapes.

    Whole shapes are held out (every row of a held-out shape), never rows of a shape
    that is also trained on.
    """
    missing = [k for k in keys if k not in rows.columns]
    if missing:
        raise ValueError(f"split keys {missing} are not columns of the table")
    if not 0.0 < frac < 1.0:
        raise ValueError(f"frac must be in (0, 1), got {frac}")
    shapes = rows[keys].drop_duplicates()
    test = shapes.sample(frac=frac, random_state=seed).assign(_held_out=True)
    merged = rows[keys].merge(test, on=keys, how="left")
    return merged["_held_out"].eq(True).to_numpy()
