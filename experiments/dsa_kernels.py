"""Validate the package's DeepSeek sparse attention (DSA) module curves on measured
vLLM DSA modules.

Data: aiconfigurator-core's vLLM tables ``<system>/sparse_attention/vllm/<version>/
dsa_context_module_perf.parquet`` and ``dsa_generation_module_perf.parquet``
(DeepSeek-V3.2 and GLM-5 rows, ``latency`` in ms; each row's work on its model's
dimensions), for every system that has them. Context rows: ``batch_size`` requests
of ``isl`` new tokens, empty cache; generation rows: ``batch_size`` requests of one
new token reading ``step`` cached ones; ``num_heads`` the heads of one GPU.

The model (``dm.kernels.DsaCurves``, :mod:`diffmodel.kernels._dsa`): per path nine
efficiencies (GEMMs at the 16-bit, FP8 and FP4 peaks, projection and KV-write
bandwidth, sparse attention compute and bandwidth at FlashMLA's 64-head tiles, the
indexer's FP8 logits compute and bandwidth, the top-k's bandwidth with one SM per
query row), a fixed cost, and the exponent that combines device work and fixed cost
(``p = 1`` their sum, large ``p`` their maximum). One set per GPU over every
KV-cache and GEMM type with 16-bit attention math, both models.

Protocols, per (op, system, dtype): uncalibrated (the priors, fixed cost 10 us);
calibrated on 75% of the whole shapes ((num_heads, isl) for context, (num_heads,
batch_size) for generation; seed 0) with MAPE on the other 25%; and leave-one-GPU-out
(``dm.kernels.fit_module_curves_pooled`` on the other systems, its siblings alone
where it has any, ``gpus.training_systems``; up to 1,000 rows a GPU
and op, every row of the held-out one), what ``diffmodel calibrate --pool`` gives a
GPU without DSA tables; and other model (on each GPU, curves fitted on one
model's rows, every row of the other model): what the curves give a new DSA model
of other dimensions.

    python experiments/dsa_kernels.py [--out DIR] [--max-rows N]
"""

import argparse
import pathlib
import sys
import time

import jax
import numpy as np
import pandas as pd

import diffmodel as dm
import diffmodel.kernels as dk
from diffmodel import mape
from diffmodel.kernels import held_out_split
from diffmodel.kernels._dsa import DSA, DSA_FAMILIES

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from gpus import training_systems  # noqa: E402
from mla_kernels import write_results  # noqa: E402

OPS = ("context", "generation")
SHAPE_KEYS = {
    "context": ["num_heads", "isl"],
    "generation": ["num_heads", "batch_size"],
}
DTYPE_KEYS = ["mla_dtype", "kv_cache_dtype", "gemm_type"]
HELD_OUT = "held-out shapes"
LOGO = "leave-one-GPU-out"
OTHER_MODEL = "other model"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_tables(version: str | None, systems=None, max_rows=None) -> dict:
    """``{system: {family: rows}}`` of every system with both vLLM DSA module
    tables: the rows DSA curves are fitted on (``dk.dsa_rows``), at most
    ``max_rows`` of each dtype (seed 0) when given."""
    listing = dk.list_kernel_tables()
    have = listing[
        (listing["backend"] == "vllm") & listing["family"].isin(DSA_FAMILIES)
    ]
    out = {}
    for system, g in have.groupby("system"):
        if systems is not None and system not in systems:
            continue
        if set(g["family"]) != set(DSA_FAMILIES):
            continue
        tables = dk.load_system_tables(system, "vllm", version, families=DSA_FAMILIES)
        out[system] = {}
        for fam in DSA_FAMILIES:
            rows = dk.dsa_rows(tables[fam])
            if max_rows is not None:
                rows = rows.sample(frac=1.0, random_state=0)
                rows = rows.groupby(["model", *DTYPE_KEYS]).head(max_rows)
            out[system][fam] = rows.reset_index(drop=True)
    return out


def predict_us(curves, op: str, rows: pd.DataFrame, hw: dm.Hardware) -> np.ndarray:
    """Each row's module time on ``curves``, us."""
    work = dk.dsa_table_work(op, rows.reset_index(drop=True))
    return np.asarray(dk.dsa_module_us(getattr(curves, op), work, hw))


def _params(module) -> str:
    phys = module.to_json()["physical"]
    return " ".join(f"{k}={v:.3g}" for k, v in phys.items())


def _lines(op, system, protocol, rows, hw, curves) -> list[dict]:
    prior = dk.DsaCurves(context=dk.DsaModule.prior(), generation=dk.DsaModule.prior())
    out = []
    for combo, g in rows.groupby(["model", *DTYPE_KEYS]):
        y = g["latency_us"].to_numpy(float)
        out.append(
            {
                "op": op,
                "system": system,
                "dtype": " ".join((combo[0].split("/")[-1], "/".join(combo[1:]))),
                "protocol": protocol,
                "uncalibrated_mape": mape(y, predict_us(prior, op, g, hw)),
                "calibrated_mape": mape(y, predict_us(curves, op, g, hw)),
                "rows": len(y),
                "params": _params(getattr(curves, op)),
            }
        )
    return out


def evaluate(tables: dict, hardware: dict) -> pd.DataFrame:
    lines = []
    for system, fams in tables.items():
        hw = hardware[system]
        test = {
            fam: held_out_split(r, SHAPE_KEYS[op], frac=0.25, seed=0)
            for op, (fam, r) in zip(OPS, fams.items(), strict=True)
        }
        t0 = time.perf_counter()
        curves = dk.fit_module_curves(
            DSA, {f: r[~test[f]] for f, r in fams.items()}, hw
        )
        _log(f"{system}: DSA curves fitted in {time.perf_counter() - t0:.0f} s")
        for op, fam in zip(OPS, DSA_FAMILIES, strict=True):
            r = fams[fam]
            lines += _lines(op, system, HELD_OUT, r[test[fam]], hw, curves)
        models = sorted(set(fams[DSA_FAMILIES[0]]["model"]))
        for model in models if len(models) > 1 else ():
            own = {f: r[r["model"] != model] for f, r in fams.items()}
            curves = dk.fit_module_curves(DSA, own, hw)
            for op, fam in zip(OPS, DSA_FAMILIES, strict=True):
                r = fams[fam]
                lines += _lines(
                    op, system, OTHER_MODEL, r[r["model"] == model], hw, curves
                )
    if len(tables) > 1:
        for system in tables:
            others = {s: tables[s] for s in training_systems(system, tables)}
            curves = dk.fit_module_curves_pooled(
                DSA, others, {s: hardware[s] for s in others}
            )
            _log(f"{system}: DSA curves fitted on the other GPUs")
            for op, fam in zip(OPS, DSA_FAMILIES, strict=True):
                lines += _lines(
                    op, system, LOGO, tables[system][fam], hardware[system], curves
                )
    return pd.DataFrame(lines)


def main(
    *,
    out: str | pathlib.Path = "results/dsa_kernels",
    version: str | None = None,
    systems=None,
    max_rows: int | None = None,
) -> pd.DataFrame:
    """Run the validation, write ``dsa_kernels.csv``, ``dsa_kernels.md`` and its
    per-op summary ``dsa_kernels_summary.md`` to ``out``; print and return the
    table. ``max_rows`` subsamples each (system, op, dtype) table (seed 0)."""
    jax.config.update("jax_enable_x64", True)
    t0 = time.perf_counter()
    tables = load_tables(version, systems, max_rows)
    if not tables:
        raise SystemExit("no vLLM DSA module tables in the kernel database")
    _log(f"systems with vLLM DSA module tables: {', '.join(tables)}")
    hardware = {s: dm.hardware(s) for s in tables}
    table = evaluate(tables, hardware)
    return write_results(table, out, "dsa_kernels", t0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path("results/dsa_kernels")
    )
    parser.add_argument("--version", default=None, help="vLLM version folder")
    parser.add_argument("--systems", nargs="*", default=None, help="system folders")
    parser.add_argument("--max-rows", type=int, default=None, help="rows per table")
    args = parser.parse_args()
    main(
        out=args.out, version=args.version, systems=args.systems, max_rows=args.max_rows
    )
