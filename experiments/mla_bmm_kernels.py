"""Validate the package's GEMM physics on aiconfigurator-core's measured MLA BMM
kernels (the absorbed ``W_UK``/``W_UV`` batched matmuls of DeepSeek MLA decode).

Data: aiconfigurator-core's ``systems/data/<system>/mla_bmm/<backend>/<version>/
mla_bmm_perf.parquet`` (``latency`` in ms), the newest version folder, for every
system that has the table and that maps to a package GPU (``SYSTEMS`` of
``experiments/gpus.py``). Per system and ``bmm_dtype`` (``bfloat16``, ``fp8``) the
first backend with rows of that dtype is taken, vLLM, else SGLang, else TRT-LLM (the
``backend`` column says which): vLLM's collector measures bf16 only (NVIDIA vLLM runs
both BMMs as bf16 ``torch.bmm``; its fp8 BMM is ROCm-only), so the fp8 rows are
SGLang's. Rows of one shape are averaged.

What the op is. aiconfigurator's collectors (``collector/vllm/collect_mla_bmm.py``,
``collector/sglang/collect_mla_bmm.py``, ``collector/trtllm/collect_mla_bmm.py``) time,
for ``num_heads`` heads (the per-GPU heads) and ``num_tokens`` decode tokens:

- ``mla_gen_pre``: the ``W_UK`` absorb, per head ``[T, 128 (qk_nope)] @ [128, 512
  (kv_lora_rank)]`` (``torch.bmm(q_nope.transpose(0, 1), w_uk_t)``);
- ``mla_gen_post``: the ``W_UV`` projection, per head ``[T, 512] @ [512, 128
  (v_head)]``.

bf16 rows (``kernel_source`` ``vllm_torch_bmm``, ``sglang_torch_bmm``, ``default``,
``trtllm_bmm_out``) are one bf16 ``torch.bmm``; TRT-LLM's fp8 rows on Blackwell
(``trtllm_bmm_out_dequant_bf16``) are too (weights dequantized at load). SGLang's fp8
rows (``sglang_sgl_kernel_bmm_fp8``) time ``per_tensor_quant_mla_fp8`` of the bf16
activation (a dynamic per-tensor scale) followed by ``sgl_kernel.bmm_fp8`` with fp8
operands and a bf16 output; TRT-LLM's ``trtllm_fp8_block_scaling_bmm_out`` (SM89/90/120)
quantizes the activation in 1x128 groups (one pass) before a 128x128-block-scaled fp8
BMM.

Work counted per row, with the package's own formulas: per head the GEMM ``gemm_work(T,
n, k, weight_bytes, act_bytes, out_bytes)`` (``2 T n k`` FLOPs; ``k n wb + T k ab + T n
ob`` bytes), times ``num_heads``; 2-byte operands and output for bf16, 1-byte fp8
operands (plus one fp32 scale per 128x128 weight block and per 1x128 activation group
for TRT-LLM's block scaling) and a 2-byte output for fp8; peak ``tensor_peak(cb,
flops_16, flops_8, flops_4)`` (the FP8 peak for fp8 compute), HBM bandwidth
``hbm_bw`` of ``diffmodel.hardware(SYSTEMS[system])``. The timed activation
quantization of the fp8 kernels is a serial memory pass: ``act_quant_bytes(heads T,
k)`` (``5`` bytes an element: two bf16 reads, one fp8 write) for SGLang's per-tensor
scale, ``heads T k (2 + 1 + 4/128)`` for TRT-LLM's 1x128 groups. Time:
``roofline_us(flops, bytes, peak, hbm_bw, gemm_flops, mem_bw) + pre_bytes / (hbm_bw
mem_bw) + latency_us`` (0 uncalibrated).

Protocols, as ``experiments/quant_comm_kernels.py`` (whose parameter family ``gemm``,
loaders and line format this reuses), per (op, dtype) and system: uncalibrated
(``gemm_flops``, ``mem_bw`` at the priors of ``FACTOR_SPECS``, latency 0); calibrated
on 75% of the whole shapes (``held_out_split`` seed 0 on ``(num_heads, num_tokens)``)
with the efficiencies in [0.01, 1] and ``latency_us >= 0`` fitted by
``scipy.optimize.least_squares`` on log ratios, MAPE on the other 25%; and
leave-one-GPU-out (one set fitted on the other systems' tables of the same op and
dtype, whatever their backend, tested on the held-out one; the held-out GPU's
siblings alone where it has any, ``gpus.training_systems``). Ops are named
``<op_name>_<bf16|fp8>`` so that the per-op summary keeps the dtypes apart.

    python experiments/mla_bmm_kernels.py [--out DIR] [--systems S ...]
"""

import argparse
import pathlib
import time
from typing import NamedTuple

import jax
import numpy as np
import pandas as pd
from gpus import (  # a sibling script: system -> package GPU, whom a GPU learns from
    SYSTEMS,
    training_systems,
)
from mla_kernels import _cat, _log, _take, aic_data_dir, markdown, write_results
from quant_comm_kernels import (  # a sibling script: its loaders, family and lines
    BLOCK,
    FAMILIES,
    _line,
    _positive_mean,
    newest,
)
from scipy.optimize import least_squares

import diffmodel as dm
from diffmodel._model._physics import act_quant_bytes, gemm_work
from diffmodel.kernels import held_out_split, roofline_us, tensor_peak

# op_name -> (k, n) of each head's [T, k] @ [k, n]: qk_nope 128, kv_lora_rank 512,
# v_head 128 (DeepSeek-V3; the collectors' constants).
OPS = {"mla_gen_pre": (128, 512), "mla_gen_post": (512, 128)}
BACKENDS = ("vllm", "sglang", "trtllm")  # preference order per (system, dtype)
DTYPES = {"bfloat16": "bf16", "fp8": "fp8"}
SHAPE_KEYS = ["num_heads", "num_tokens"]
FILENAME = "mla_bmm_perf.parquet"
GEMM = FAMILIES["gemm"]  # gemm_flops, mem_bw, latency_us: priors, start, scales


class Kernel(NamedTuple):
    """Bytes per element of one measured kernel and its tensor-core operand width."""

    weight_bytes: float
    act_bytes: float
    out_bytes: float
    compute_bytes: float
    act_quant: str  # "": none; "per_tensor": act_quant_bytes; "1x128": one pass


BF16 = Kernel(2.0, 2.0, 2.0, 2.0, "")
# (kernel_source, bmm_dtype) -> Kernel, from the collectors' timed functions.
KERNELS = {
    ("vllm_torch_bmm", "bfloat16"): BF16,
    ("sglang_torch_bmm", "bfloat16"): BF16,
    ("default", "bfloat16"): BF16,
    ("trtllm_bmm_out", "bfloat16"): BF16,
    ("trtllm_bmm_out_dequant_bf16", "fp8"): BF16,
    ("sglang_sgl_kernel_bmm_fp8", "fp8"): Kernel(1.0, 1.0, 2.0, 1.0, "per_tensor"),
    ("trtllm_fp8_block_scaling_bmm_out", "fp8"): Kernel(
        1.0 + 4.0 / BLOCK**2, 1.0 + 4.0 / BLOCK, 2.0, 1.0, "1x128"
    ),
}


def op_label(op_name: str, dtype: str) -> str:
    return f"{op_name}_{DTYPES[dtype]}"


def load_tables(root: pathlib.Path, systems=None) -> dict[tuple, dict[str, tuple]]:
    """``{(op_name, bmm_dtype): {system: (rows, backend)}}``: per system and dtype the
    newest MLA BMM table of the first backend of ``BACKENDS`` with rows of that dtype
    and known kernels; rows with positive latency, duplicates averaged, ``latency_us``
    (us) added. ``backend`` reads ``"<backend> <version>"``.

    Raises ``ValueError`` for a requested system that is not in ``SYSTEMS`` or has no
    MLA BMM table under ``root``.
    """
    if systems is not None:
        unknown = sorted(set(systems) - set(SYSTEMS))
        if unknown:
            raise ValueError(
                f"systems {unknown} have no package GPU; known: {sorted(SYSTEMS)}"
            )
    out: dict[tuple, dict[str, tuple]] = {}
    for system in SYSTEMS:
        if systems is not None and system not in systems:
            continue
        files = {b: newest(root / system / "mla_bmm" / b, FILENAME) for b in BACKENDS}
        files = {b: f for b, f in files.items() if f is not None}
        if not files:
            if systems is not None:
                raise ValueError(f"no MLA BMM table for system {system!r} under {root}")
            continue
        frames = {b: pd.read_parquet(f) for b, f in files.items()}
        for dtype in DTYPES:
            for backend, d in frames.items():
                d = d[d["bmm_dtype"] == dtype]
                if d.empty:
                    continue
                sources = set(d["kernel_source"])
                unknown = sorted(s for s in sources if (s, dtype) not in KERNELS)
                if unknown:
                    _log(f"{system} {backend} {dtype}: skipped (kernels {unknown})")
                    continue
                label = f"{backend} {files[backend].parent.name}"
                for op_name in OPS:
                    g = d[d["op_name"] == op_name]
                    rows = _positive_mean(g, ["kernel_source", *SHAPE_KEYS])
                    if len(rows):
                        rows = rows.assign(bmm_dtype=dtype, backend=label)
                        out.setdefault((op_name, dtype), {})[system] = (rows, label)
                break
    return dict(sorted(out.items()))


def bmm_work(
    op_name: str, rows: pd.DataFrame, hw: dm.Hardware
) -> dict[str, np.ndarray]:
    """FLOPs, bytes, serial quantization bytes, peak (FLOP/s) and bandwidth (bytes/s)
    of each MLA BMM row (columns ``kernel_source``, ``bmm_dtype``, ``num_heads``,
    ``num_tokens``)."""
    k, n = OPS[op_name]
    pairs = zip(rows["kernel_source"], rows["bmm_dtype"], strict=True)
    kern = [KERNELS[pair] for pair in pairs]
    wb, ab, ob, cb = (np.array([x[i] for x in kern], float) for i in range(4))
    heads = rows["num_heads"].to_numpy(float)
    tokens = rows["num_tokens"].to_numpy(float)
    f, b = gemm_work(tokens, n, k, wb, ab, ob)  # one head
    per_tensor = np.array([x.act_quant == "per_tensor" for x in kern])
    groups = np.array([x.act_quant == "1x128" for x in kern])
    pre = np.where(per_tensor, np.asarray(act_quant_bytes(heads * tokens, k)), 0.0)
    pre = pre + np.where(groups, heads * tokens * k * (2.0 + 1.0 + 4.0 / BLOCK), 0.0)
    peak = np.asarray(tensor_peak(cb, hw.flops_16, hw.flops_8, hw.flops_4), float)
    return {
        "flops": heads * np.asarray(f, float),
        "bytes": heads * np.asarray(b, float),
        "pre_bytes": pre,
        "peak": np.broadcast_to(peak, heads.shape).copy(),
        "bw": np.full(len(rows), float(hw.hbm_bw)),
    }


def predict_us(params, w: dict[str, np.ndarray]) -> np.ndarray:
    """Time of each row, us: the roofline of the BMM, the quantization pass at
    ``mem_bw`` and ``latency_us``; ``params = (gemm_flops, mem_bw, latency_us)``."""
    gf, mb, lat = (float(p) for p in params)
    t = roofline_us(w["flops"], w["bytes"], w["peak"], w["bw"], gf, mb)
    return np.asarray(t) + w["pre_bytes"] / w["bw"] * 1e6 / mb + lat


def fit_params(w: dict[str, np.ndarray], y_us: np.ndarray) -> np.ndarray:
    """Least squares on ``log(predicted / measured)``; efficiencies in [0.01, 1],
    latency >= 0 (us)."""
    log_y = np.log(y_us)
    res = least_squares(
        lambda p: np.log(predict_us(p, w)) - log_y,
        np.clip(GEMM.x0, GEMM.lower, GEMM.upper),
        bounds=(GEMM.lower, GEMM.upper),
        x_scale=GEMM.x_scale,
    )
    return res.x


def _bmm_line(op, system, dtype, protocol, y, w, params, backend) -> dict:
    line = _line(
        op,
        system,
        dtype,
        protocol,
        y,
        predict_us(GEMM.prior, w),
        predict_us(params, w),
        "gemm",
        params,
    )
    return {**line, "backend": backend}


def evaluate(tables, hardware: dict[str, dm.Hardware], max_rows=None) -> pd.DataFrame:
    """Every (op, dtype, system) line of both protocols."""
    lines = []
    for (op_name, dtype), by_system in tables.items():
        op = op_label(op_name, dtype)
        data = {}
        for system, (rows, backend) in by_system.items():
            if max_rows is not None and len(rows) > max_rows:
                rows = rows.sample(n=max_rows, random_state=0)
            if len(rows) < 8:
                continue
            rows = rows.reset_index(drop=True)
            data[system] = (rows, bmm_work(op_name, rows, hardware[system]), backend)
        for system, (rows, w, backend) in data.items():
            t0 = time.perf_counter()
            y = rows["latency_us"].to_numpy(float)
            test = held_out_split(rows, SHAPE_KEYS, frac=0.25, seed=0)
            p = fit_params(_take(w, ~test), y[~test])
            lines.append(
                _bmm_line(
                    op,
                    system,
                    dtype,
                    "held-out shapes",
                    y[test],
                    _take(w, test),
                    p,
                    backend,
                )
            )
            _log(
                f"{op} {system} ({backend}): held-out {time.perf_counter() - t0:.1f} s"
            )
        if len(data) < 2:
            continue
        for system, (rows, w, backend) in data.items():
            others = training_systems(system, data)
            w_tr = _cat([data[s][1] for s in others])
            y_tr = np.concatenate(
                [data[s][0]["latency_us"].to_numpy(float) for s in others]
            )
            p = fit_params(w_tr, y_tr)
            y = rows["latency_us"].to_numpy(float)
            lines.append(
                _bmm_line(op, system, dtype, "leave-one-GPU-out", y, w, p, backend)
            )
    return pd.DataFrame(lines)


def table_markdown(table: pd.DataFrame) -> str:
    """``mla_kernels.markdown`` with each system's backend and version beside it."""
    return markdown(
        table.assign(system=table["system"] + " (" + table["backend"] + ")")
    )


def main(
    *,
    out: str | pathlib.Path = "results/mla_bmm_kernels",
    data: str | pathlib.Path | None = None,
    systems=None,
    max_rows: int | None = None,
) -> pd.DataFrame:
    """Run the validation, write ``mla_bmm_kernels.csv``, ``mla_bmm_kernels.md`` and
    its per-op summary ``mla_bmm_kernels_summary.md`` to ``out``, print and return the
    table. ``max_rows`` subsamples each (system, op, dtype) table (seed 0);
    ``systems`` restricts the system folders."""
    jax.config.update("jax_enable_x64", True)
    t0 = time.perf_counter()
    root = pathlib.Path(data) if data is not None else aic_data_dir()
    tables = load_tables(root, systems)
    if not tables:
        raise SystemExit(f"no MLA BMM tables under {root}")
    for (op_name, dtype), by_system in tables.items():
        where = ", ".join(f"{s} ({b})" for s, (_, b) in by_system.items())
        _log(f"{op_label(op_name, dtype)}: {where}")
    used = sorted({s for by_system in tables.values() for s in by_system})
    hardware = {s: dm.hardware(SYSTEMS[s]) for s in used}
    table = evaluate(tables, hardware, max_rows)
    return write_results(table, out, "mla_bmm_kernels", t0, table_markdown)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path("results/mla_bmm_kernels")
    )
    parser.add_argument(
        "--data", type=pathlib.Path, default=None, help="aiconfigurator systems/data"
    )
    parser.add_argument("--systems", nargs="*", default=None, help="system folders")
    parser.add_argument(
        "--max-rows", type=int, default=None, help="rows per table (seed 0)"
    )
    args = parser.parse_args()
    main(out=args.out, data=args.data, systems=args.systems, max_rows=args.max_rows)
