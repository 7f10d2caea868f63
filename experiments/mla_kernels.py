"""Validate the package's MLA attention physics on measured vLLM MLA modules.

Data: aiconfigurator-core's vLLM tables ``<system>/mla/vllm/<version>/
mla_context_module_perf.parquet`` and ``mla_generation_module_perf.parquet``
(DeepSeek-V3, ``latency`` in ms), for every system that has them.

What the module is. aiconfigurator's collector (``collector/vllm/
collect_mla_module.py``) builds one vLLM ``DeepseekV2MLAAttention`` layer at
``tp_size = 1`` with ``num_heads`` heads (the per-GPU heads ``128 / tp``) and times its
whole forward: the fused ``q_a``/``kv_a`` down-projection ``[T, 7168] @ [7168, 1536 +
512 + 64]``, the ``q_a``/``kv_a`` RMS norms, ``q_b``, RoPE, the KV-cache write, the
attention (prefill: ``kv_b`` up-projection and multi-head attention with ``qk = 192``,
``v = 128``; decode: absorbed ``W_UK``/``W_UV`` BMMs around latent multi-query
attention) and ``o_proj``. In aiconfigurator it replaces the granular
``downscale + q_b + kv_b + attention + o_proj`` ops. Context rows: ``batch_size``
requests of ``isl`` new tokens each, empty cache (``step = 0``). Generation rows:
``batch_size`` requests of one new token each whose sequence is ``step`` tokens
(``step - 1`` cached before the forward; ``isl = 1``).

Work counted, per module, by the package (``dm.kernels.mla_table_work``; per GPU at
``t = 128 / num_heads``, so ``H/t = num_heads``): the projections
``projection_work(T)`` (all four GEMMs; decode's absorbed BMMs have ``kv_b``'s FLOPs
and weights) plus the activation quantization pass ``quant_pass_bytes(T (d + H/t
v))`` (zero for bf16 GEMMs), at the dense tensor peak, ``gemm_flops`` and
``mem_bw``; attention ``attention_work_dims`` on the package's prefill dimensions
with ``A_pf = b isl^2 / 2`` pairs and ``T`` KV tokens read (context), or on its
absorbed decode dimensions with ``b step`` pairs and tokens read (generation), at
``attn_flops`` and ``attn_bw`` (the FP8 peak when the attention math is FP8); the
latent KV write ``(c + r) kv_bytes T`` bytes at ``mem_bw``. Norms and RoPE traffic
are not counted. Each part is the package's ``roofline_us`` (smooth maximum of
compute and memory time), and the module time is their sum plus a fixed latency (0
uncalibrated).

Protocols, per table and dtype combination (``mla_dtype/kv_cache_dtype/gemm_type``):
uncalibrated (the priors of ``FACTOR_SPECS``); calibrated on 75% of the whole shapes
((num_heads, isl) for context, (num_heads, batch_size) for generation; seed 0) with
``gemm_flops, mem_bw, attn_flops, attn_bw`` in [0.01, 1] and ``latency_us >= 0`` fitted
by ``scipy.optimize.least_squares`` on log ratios, MAPE on the other 25%; and
leave-one-GPU-out (one set fitted on the other systems, tested on the held-out one;
the held-out GPU's siblings alone where it has any, ``gpus.training_systems``).
Both MAPE columns of a line are on the same test rows.

The kernel sum (``dm.kernels.kernel_step_time``, one MLA layer): on each GPU's own
GEMM and GQA curves (no MLA row fitted), as is and with a fixed cost per module
fitted on the other GPUs; and on the GPU's MLA module curves (``KernelCurves.mla``,
``dm.kernels.fit_mla_curves``: one set per GPU over every KV-cache and GEMM type
with 16-bit attention math), fitted on 75% of the shapes, priced on the other 25%,
plus the fitted fixed cost per module (which the kernel sum leaves to the host); and
on module curves fitted on the other GPUs' modules (up to 1,000 a GPU and op),
pricing every row of the held-out GPU (what ``KernelCurves.ported_to`` carries).

    python experiments/mla_kernels.py [--out DIR]
"""

import argparse
import pathlib
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from gpus import training_systems  # a sibling script: whom a held-out GPU learns from
from scipy.optimize import least_squares

import diffmodel as dm
import diffmodel.kernels as dk
from diffmodel import FACTOR_SPECS, mape
from diffmodel.kernels import (
    held_out_split,
    roofline_us,
    tensor_peak,
)
from diffmodel.kernels._mla import module_arch

OPS = ("context", "generation")
SHAPE_KEYS = {
    "context": ["num_heads", "isl"],
    "generation": ["num_heads", "batch_size"],
}
DTYPE_KEYS = ["mla_dtype", "kv_cache_dtype", "gemm_type"]
ROW_KEYS = DTYPE_KEYS + ["num_heads", "batch_size", "isl", "step"]
MODEL = "deepseek-ai/DeepSeek-V3"
FULL_HEADS = 128  # DeepSeek-V3's attention heads; num_heads = 128 / tp
PARAMS = ("gemm_flops", "mem_bw", "attn_flops", "attn_bw", "latency_us")
PRIOR = np.array([FACTOR_SPECS[n][0] for n in PARAMS[:4]] + [0.0])
LOWER = np.array([0.01] * 4 + [0.0])
UPPER = np.array([1.0] * 4 + [np.inf])


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def aic_data_dir() -> pathlib.Path:
    """aiconfigurator-core's ``systems/data`` folder."""
    import aiconfigurator_core

    return pathlib.Path(aiconfigurator_core.__file__).parent / "systems" / "data"


def load_tables(
    root: pathlib.Path, version: str = "0.24.0", systems=None
) -> dict[str, dict[str, pd.DataFrame]]:
    """``{system: {op: rows}}`` of every system with vLLM MLA module tables of
    ``version``: DeepSeek-V3 rows with positive latency, duplicates averaged, and
    ``latency_us`` (us) added."""
    out = {}
    for sys_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        if systems is not None and sys_dir.name not in systems:
            continue
        folder = sys_dir / "mla" / "vllm" / version
        files = {op: folder / f"mla_{op}_module_perf.parquet" for op in OPS}
        if not all(f.is_file() for f in files.values()):
            continue
        out[sys_dir.name] = {}
        for op, f in files.items():
            d = pd.read_parquet(f)
            d = d[(d["model"] == MODEL) & (d["latency"] > 0)]
            d = d.groupby(ROW_KEYS, as_index=False)["latency"].mean()
            out[sys_dir.name][op] = d.assign(latency_us=d["latency"] * 1e3)
    return out


def module_work(op: str, rows: pd.DataFrame, hw: dm.Hardware) -> dict[str, np.ndarray]:
    """FLOPs, bytes and peaks of the measured module for each row (one dtype combo).

    Returns arrays ``proj_f`` (FLOPs) and ``proj_b`` (bytes) of the projections and
    the quantization pass, ``attn_f``/``attn_b`` of the attention, ``kv_b`` (bytes)
    of the KV-cache write, and the peaks ``dense_peak``/``attn_peak`` (FLOP/s) and
    ``bw`` (bytes/s).
    """
    (combo,) = rows[DTYPE_KEYS].drop_duplicates().itertuples(index=False)
    mla_dtype = combo[0]
    w = dk.mla_table_work(op, rows.reset_index(drop=True))
    dense_peak = tensor_peak(w.compute_bytes, hw.flops_16, hw.flops_8, hw.flops_4)
    attn_peak = hw.flops_8 if mla_dtype == "fp8" else hw.flops_16
    n = len(rows)
    full = {
        "proj_f": w.proj_flops,
        "proj_b": w.proj_bytes,
        "attn_f": w.attn_flops,
        "attn_b": w.attn_bytes,
        "kv_b": w.kv_bytes,
        "dense_peak": dense_peak,
        "attn_peak": attn_peak,
        "bw": hw.hbm_bw,
    }
    return {
        k: np.broadcast_to(np.asarray(v, float), (n,)).copy() for k, v in full.items()
    }


def predict_us(params, w: dict[str, np.ndarray]) -> np.ndarray:
    """Module time, us: projections + attention + KV write + ``latency_us``.

    ``params`` is ``(gemm_flops, mem_bw, attn_flops, attn_bw, latency_us)``.
    """
    gf, mb, af, ab, lat = (float(p) for p in params)
    proj = roofline_us(w["proj_f"], w["proj_b"], w["dense_peak"], w["bw"], gf, mb)
    attn = roofline_us(w["attn_f"], w["attn_b"], w["attn_peak"], w["bw"], af, ab)
    kv_write = w["kv_b"] / w["bw"] * 1e6 / mb
    return np.asarray(proj + attn + kv_write) + lat


def fit_params(w: dict[str, np.ndarray], y_us: np.ndarray) -> np.ndarray:
    """Least squares on ``log(predicted / measured)`` from the priors (10 us latency);
    efficiencies bounded to [0.01, 1], latency >= 0 (us)."""
    x0 = np.clip(PRIOR + np.array([0, 0, 0, 0, 10.0]), LOWER, UPPER)
    log_y = np.log(y_us)
    res = least_squares(
        lambda p: np.log(predict_us(p, w)) - log_y,
        x0,
        bounds=(LOWER, UPPER),
        x_scale=np.array([0.1] * 4 + [10.0]),
    )
    return res.x


# GEMM types the kernel sum times (FP4 tensor cores have no curves there).
KERNEL_SUM_GEMMS = ("bfloat16", "fp8_block")


def system_curves(system: str, hw_name: str):
    """The kernel sum's curves of one GPU, calibrated on its own newest vLLM tables
    (GEMMs, GQA attention, MoE, all-reduce; never an MLA row)."""
    tables = dk.load_system_tables(system, "vllm", skip_missing=True)
    return dk.calibrate_kernels(tables, hardware_name=hw_name)


def kernel_sum_us(op: str, rows: pd.DataFrame, hw: dm.Hardware, curves) -> np.ndarray:
    """The measured module of each row priced by ``dm.kernels.kernel_step_time``: one
    MLA layer without its MLP, the step's projections and attention, and its KV
    write where ``curves.mla`` times it (norms and RoPE, and on the GEMM and GQA
    curves the KV write, are the kernel sum's host cost, not counted)."""
    (combo,) = rows[DTYPE_KEYS].drop_duplicates().itertuples(index=False)
    _, kv_dtype, gemm_type = combo
    one = tuple(jnp.asarray(v, float) for v in (1.0, 0.0, 0.0))
    a = eqx.tree_at(
        lambda x: (x.n_layers, x.dense_layers, x.moe_layers),
        module_arch(gemm_type, kv_dtype),
        one,
    )
    b = rows["batch_size"].to_numpy(float)
    zero = np.zeros_like(b)
    if op == "context":
        s = rows["isl"].to_numpy(float)
        new = dict(prefill_tokens=b * s, num_prefill=b, attn_prefill=b * s * s / 2.0)
        new.update(decode_tokens=zero, num_decode=zero, kv_decode=zero)
    else:
        new = dict(
            decode_tokens=b, num_decode=b, kv_decode=b * rows["step"].to_numpy(float)
        )
        new.update(prefill_tokens=zero, num_prefill=zero, attn_prefill=zero)
    stats = dm.BatchStats(
        **{k: jnp.asarray(v) for k, v in new.items()}, kv_prefill=jnp.asarray(zero)
    )
    t = FULL_HEADS / rows["num_heads"].to_numpy(float)
    dep = dm.Deployment(
        arch=a, hw=hw, tp=jnp.asarray(t), ep=jnp.ones_like(jnp.asarray(t))
    )
    out = dk.kernel_step_time(stats, dep, curves)
    return np.asarray(
        out.linear + out.attention_prefill + out.attention_decode + out.kv_write
    )


def _module_line(op, system, protocol, g, hw, curves, mla) -> dict:
    """One line: the rows ``g`` (one dtype) priced by ``kernel_step_time`` with the
    MLA module curves ``mla`` plus their fixed cost per module."""
    with_mla = eqx.tree_at(lambda c: c.mla, curves, mla, is_leaf=_none)
    combo = "/".join(g[DTYPE_KEYS].iloc[0])
    y = g["latency_us"].to_numpy(float)
    fixed = float(getattr(mla, op).latency_us)
    ks = kernel_sum_us(op, g, hw, with_mla) + fixed
    prior = predict_us(PRIOR, module_work(op, g, hw))
    line = _line(op, system, combo, protocol, y, prior, ks, PRIOR)
    return {**line, "params": f"fixed_us={fixed:.3g}"}


def _sum_dtypes(rows: pd.DataFrame):
    """The (dtype, rows) groups the kernel sum can time (16-bit or block-FP8
    GEMMs), of at least 8 rows."""
    for combo, g in rows.groupby(DTYPE_KEYS):
        if combo[2] in KERNEL_SUM_GEMMS and len(g) >= 8:
            yield g.reset_index(drop=True)


def _module_rows(table: pd.DataFrame, max_rows=None) -> pd.DataFrame:
    """The rows module curves are fitted on (``dk.mla_rows``), at most ``max_rows``
    of each dtype (seed 0) when given."""
    rows = dk.mla_rows(table)
    if max_rows is not None:
        shuffled = rows.sample(frac=1.0, random_state=0)
        rows = shuffled.groupby(DTYPE_KEYS).head(max_rows)
    return rows.reset_index(drop=True)


def module_curves_other_gpus(
    tables, hardware, curves, max_rows=None, per_gpu=1000
) -> list[dict]:
    """The kernel sum on MLA module curves fitted on the other GPUs' modules
    (``dk.fit_mla_curves_pooled``: up to ``per_gpu`` rows a GPU and op, seed 0;
    each row at its own GPU's peaks), pricing every row of the held-out GPU: what
    ``diffmodel calibrate --pool`` and ``KernelCurves.ported_to`` give a GPU
    without MLA tables."""
    rows = {
        s: {op: _module_rows(t[op], max_rows) for op in OPS} for s, t in tables.items()
    }
    lines = []
    for system in tables:
        others = {
            s: {f"mla_{op}": rows[s][op] for op in OPS}
            for s in training_systems(system, tables)
        }
        mla = dk.fit_mla_curves_pooled(
            others, {s: hardware[s] for s in others}, per_gpu=per_gpu
        )
        _log(f"{system}: MLA module curves fitted on the other GPUs")
        for op in OPS:
            for g in _sum_dtypes(rows[system][op]):
                lines.append(
                    _module_line(
                        op,
                        system,
                        MODULE_LOGO,
                        g,
                        hardware[system],
                        curves[system],
                        mla,
                    )
                )
    return lines


def module_curve_lines(tables, hardware, curves, max_rows=None) -> list[dict]:
    """The kernel sum on the GPU's own MLA module curves (``KernelCurves.mla``,
    one set per GPU over every KV-cache and GEMM type with 16-bit attention math),
    fitted on 75% of the shapes and priced through ``kernel_step_time`` on the
    other 25%, plus the fitted fixed cost per module (which the kernel sum leaves
    to the host costs): one line per (op, system, dtype)."""
    lines = []
    for system, by_op in tables.items():
        hw = hardware[system]
        rows = {op: _module_rows(by_op[op], max_rows) for op in OPS}
        test = {
            op: held_out_split(r, SHAPE_KEYS[op], frac=0.25, seed=0)
            for op, r in rows.items()
        }
        t0 = time.perf_counter()
        fams = {f"mla_{op}": r[~test[op]] for op, r in rows.items()}
        mla = dk.fit_mla_curves(fams, hw)
        _log(f"{system}: MLA module curves fitted in {time.perf_counter() - t0:.0f} s")
        for op, r in rows.items():
            for g in _sum_dtypes(r[test[op]]):
                lines.append(
                    _module_line(
                        op, system, MODULE_PROTOCOL, g, hw, curves[system], mla
                    )
                )
    return lines


MODULE_PROTOCOL = "kernel sum, MLA module curves (held-out shapes)"
MODULE_LOGO = "kernel sum, MLA module curves (other GPUs)"


def _none(x) -> bool:
    return x is None


def fit_fixed_us(kernel_sum: np.ndarray, y_us: np.ndarray) -> float:
    """The fixed cost per module, us (>= 0), that brings the kernel sum closest to
    the measured times on log ratios: the module's work outside the kernel tables
    (norms, RoPE, the KV write, an eager forward's launches)."""
    log_y = np.log(y_us)
    res = least_squares(
        lambda c: np.log(kernel_sum + c[0]) - log_y, [10.0], bounds=([0.0], [np.inf])
    )
    return float(res.x[0])


def _cat(works: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([w[k] for w in works]) for k in works[0]}


def _take(w: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[mask] for k, v in w.items()}


def _fmt(params) -> str:
    return " ".join(f"{n}={p:.3g}" for n, p in zip(PARAMS, params, strict=True))


def _line(op, system, dtype, protocol, y, prior, fitted, params) -> dict:
    return {
        "op": op,
        "system": system,
        "dtype": dtype,
        "protocol": protocol,
        "uncalibrated_mape": mape(y, prior),
        "calibrated_mape": mape(y, fitted),
        "rows": len(y),
        "params": _fmt(params),
    }


def evaluate(
    tables, hardware: dict[str, dm.Hardware], max_rows=None, curves=None
) -> pd.DataFrame:
    """Every (op, dtype combination, system) line of both protocols, and of the
    kernel sum where ``curves`` (per system) are given."""
    lines = []
    for op in OPS:
        combos = sorted(
            {
                c
                for s in tables
                for c in tables[s][op][DTYPE_KEYS].itertuples(index=False)
            }
        )
        for combo in combos:
            dtype = "/".join(combo)
            data = {}
            for system, by_op in tables.items():
                rows = by_op[op]
                rows = rows[(rows[DTYPE_KEYS] == list(combo)).all(axis=1)]
                if max_rows is not None and len(rows) > max_rows:
                    rows = rows.sample(n=max_rows, random_state=0)
                if len(rows) < 8:
                    continue
                rows = rows.reset_index(drop=True)
                data[system] = (rows, module_work(op, rows, hardware[system]))
            for system, (rows, w) in data.items():
                t0 = time.perf_counter()
                y = rows["latency_us"].to_numpy(float)
                test = held_out_split(rows, SHAPE_KEYS[op], frac=0.25, seed=0)
                p = fit_params(_take(w, ~test), y[~test])
                wt = _take(w, test)
                lines.append(
                    _line(
                        op,
                        system,
                        dtype,
                        "held-out shapes",
                        y[test],
                        predict_us(PRIOR, wt),
                        predict_us(p, wt),
                        p,
                    )
                )
                _log(
                    f"{op} {dtype} {system}: held-out {time.perf_counter() - t0:.1f} s"
                )
            sums = {}
            if curves is not None and combo[2] in KERNEL_SUM_GEMMS:
                sums = {
                    system: kernel_sum_us(op, rows, hardware[system], curves[system])
                    for system, (rows, _) in data.items()
                }
            for system, ks in sums.items():
                rows, w = data[system]
                y = rows["latency_us"].to_numpy(float)
                prior = predict_us(PRIOR, w)
                line = _line(op, system, dtype, "kernel sum", y, prior, ks, PRIOR)
                lines.append({**line, "params": "the GPU's GEMM and GQA curves"})
                if len(sums) < 2:
                    continue
                others = [s for s in sums if s != system]
                fixed = fit_fixed_us(
                    np.concatenate([sums[s] for s in others]),
                    np.concatenate([data[s][0]["latency_us"] for s in others]),
                )
                protocol = "kernel sum + fixed cost (other GPUs)"
                line = _line(op, system, dtype, protocol, y, prior, ks + fixed, PRIOR)
                lines.append({**line, "params": f"fixed_us={fixed:.3g}"})
            if len(data) < 2:
                continue
            for system, (rows, w) in data.items():
                others = training_systems(system, data)
                w_tr = _cat([data[s][1] for s in others])
                y_tr = np.concatenate(
                    [data[s][0]["latency_us"].to_numpy(float) for s in others]
                )
                p = fit_params(w_tr, y_tr)
                y = rows["latency_us"].to_numpy(float)
                lines.append(
                    _line(
                        op,
                        system,
                        dtype,
                        "leave-one-GPU-out",
                        y,
                        predict_us(PRIOR, w),
                        predict_us(p, w),
                        p,
                    )
                )
    if curves is not None:
        lines += module_curve_lines(tables, hardware, curves, max_rows)
        if len(tables) > 1:
            lines += module_curves_other_gpus(tables, hardware, curves, max_rows)
    return pd.DataFrame(lines)


def markdown(table: pd.DataFrame) -> str:
    """The results as a markdown table, one line per op, system, dtype and protocol."""
    head = [
        "| op | system | dtype | protocol | uncalibrated MAPE % | calibrated MAPE % "
        "| rows | params |",
        "|---|---|---|---|---|---|---|---|",
    ]
    body = [
        f"| {r.op} | {r.system} | {r.dtype} | {r.protocol} | {r.uncalibrated_mape:.1f} "
        f"| {r.calibrated_mape:.1f} | {r.rows} | {r.params} |"
        for r in table.itertuples(index=False)
    ]
    return "\n".join(head + body)


def summary(table: pd.DataFrame) -> str:
    """One markdown line per op and protocol over every system and dtype: how many
    (system, dtype) tables, the median and range of the MAPEs (%), and how many are
    at or below 15% calibrated."""
    lines = [
        "| op | protocol | tables | uncalibrated MAPE %, median | calibrated MAPE %, "
        "median (range) | calibrated <= 15% |",
        "|---|---|---:|---:|---|---:|",
    ]
    for (op, protocol), g in table.groupby(["op", "protocol"], sort=True):
        c = g["calibrated_mape"]
        lines.append(
            f"| {op} | {protocol} | {len(g)} | {g['uncalibrated_mape'].median():.1f} "
            f"| {c.median():.1f} ({c.min():.1f}-{c.max():.1f}) "
            f"| {int((c <= 15.0).sum())} |"
        )
    return "\n".join(lines)


def write_results(
    table: pd.DataFrame, out, name: str, t0: float, to_markdown=None
) -> pd.DataFrame:
    """Write ``<name>.csv``, the full table ``<name>.md`` (``to_markdown``, default
    :func:`markdown`) and ``<name>_summary.md`` under ``out``; print both tables."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / f"{name}.csv", index=False)
    md = (markdown if to_markdown is None else to_markdown)(table)
    (out / f"{name}.md").write_text(md + "\n")
    short = summary(table)
    (out / f"{name}_summary.md").write_text(short + "\n")
    print(md + "\n\n" + short)
    _log(f"done in {time.perf_counter() - t0:.0f} s; wrote {out}")
    return table


def main(
    *,
    out: str | pathlib.Path = "results/mla_kernels",
    data: str | pathlib.Path | None = None,
    version: str = "0.24.0",
    systems=None,
    max_rows: int | None = None,
    kernel_sum: bool = True,
) -> pd.DataFrame:
    """Run the validation, write ``mla_kernels.csv``, ``mla_kernels.md`` and its
    per-op summary ``mla_kernels_summary.md`` to
    ``out``, print and return the table. ``max_rows`` subsamples each (system, op,
    dtype) table (seed 0), for a quick run; ``systems`` restricts the systems;
    ``kernel_sum``: also price every row with the kernel sum (calibrates each
    system's curves on its own tables first, about 30 s a system)."""
    jax.config.update("jax_enable_x64", True)
    t0 = time.perf_counter()
    root = pathlib.Path(data) if data is not None else aic_data_dir()
    tables = load_tables(root, version, systems)
    if not tables:
        raise SystemExit(f"no vLLM {version} MLA module tables under {root}")
    _log(f"systems with vLLM {version} MLA module tables: {', '.join(tables)}")
    hardware = {s: dm.hardware(s) for s in tables}
    curves = None
    if kernel_sum:
        curves = {}
        for s in tables:
            t1 = time.perf_counter()
            curves[s] = system_curves(s, s)
            _log(
                f"{s}: kernel-sum curves calibrated in {time.perf_counter() - t1:.0f} s"
            )
    table = evaluate(tables, hardware, max_rows, curves)
    return write_results(table, out, "mla_kernels", t0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path("results/mla_kernels")
    )
    parser.add_argument(
        "--data", type=pathlib.Path, default=None, help="aiconfigurator systems/data"
    )
    parser.add_argument("--version", default="0.24.0", help="vLLM version folder")
    parser.add_argument("--systems", nargs="*", default=None, help="system folders")
    parser.add_argument("--max-rows", type=int, default=None, help="rows per table")
    parser.add_argument(
        "--no-kernel-sum", action="store_true", help="skip the kernel-sum protocol"
    )
    args = parser.parse_args()
    main(
        out=args.out,
        data=args.data,
        version=args.version,
        systems=args.systems,
        max_rows=args.max_rows,
        kernel_sum=not args.no_kernel_sum,
    )
