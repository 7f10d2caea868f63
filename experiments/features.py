"""One line per architecture feature: the operator families that validate it and
their held-out error, gathered from the kernel validation scripts' results.

Reads, under ``--results`` (default ``results``), what these scripts wrote:
``gpus/gpus.csv`` (experiments/gpus.py), ``mla_kernels/mla_kernels.csv``,
``mla_bmm_kernels/mla_bmm_kernels.csv``, ``dsa_kernels/dsa_kernels.csv`` and
``quant_comm_kernels/quant_comm_kernels.csv``. Nothing is fitted here. For each
feature and operator: the median over the validated tables (one per GPU, and per
dtype combination where a script splits them) of the calibrated MAPE on held-out
shapes and leave-one-GPU-out, the number of tables, and how many meet the goal
(10% for GEMMs and attention, 15% for the rest, the issue's). A script whose
results are missing leaves its lines out and says so.

    python experiments/features.py [--results DIR] [--out DIR]
"""

import argparse
import pathlib
import sys

import pandas as pd

# The operator suffix of ``gpus.py``'s ``calibrated_grid`` variant (GEMMs and
# attention with the GPU's shape grid, ``calibrate_kernels(shape_grids=True)``;
# held-out shapes only).
GRID = " + shape grid"

# (feature, models that need it, source script, operator, goal %)
FEATURES = [
    ("16-bit dense GEMMs", "every model", "gpus", "gemm_bf16", 10.0),
    ("", "with the GPU's shape grid (opt-in)", "gpus", f"gemm_bf16{GRID}", 10.0),
    ("FP8 GEMMs, per-tensor", "Llama-3.1-70B FP8", "gpus", "gemm_fp8", 10.0),
    ("", "with the GPU's shape grid (opt-in)", "gpus", f"gemm_fp8{GRID}", 10.0),
    (
        "FP8 GEMMs, 128-blocks (tables with a host floor per call)",
        "DeepSeek-V3, Qwen3 FP8",
        "quant_comm_kernels",
        "gemm_fp8_block",
        10.0,
    ),
    ("NVFP4 GEMMs", "Qwen3-235B-A22B-NVFP4", "gpus", "gemm_nvfp4", 10.0),
    ("", "with the GPU's shape grid (opt-in)", "gpus", f"gemm_nvfp4{GRID}", 10.0),
    (
        "FP8 activation quantization (static kernel)",
        "FP8 models",
        "quant_comm_kernels",
        "scale_matrix",
        15.0,
    ),
    (
        "",
        "per-token scales (dynamic minus static kernel, a difference)",
        "quant_comm_kernels",
        "compute_scale",
        15.0,
    ),
    (
        "GQA prefill attention (full or windowed)",
        "Llama, Qwen3, Mixtral, gpt-oss",
        "gpus",
        "prefill_attention",
        10.0,
    ),
    (
        "",
        "with the GPU's shape grid (opt-in)",
        "gpus",
        f"prefill_attention{GRID}",
        10.0,
    ),
    ("GQA decode attention", "", "gpus", "decode_attention", 10.0),
    ("", "with the GPU's shape grid (opt-in)", "gpus", f"decode_attention{GRID}", 10.0),
    ("MLA prefill (module)", "DeepSeek-V3 and R1", "mla_kernels", "context", 10.0),
    ("MLA decode (module)", "", "mla_kernels", "generation", 10.0),
    ("MLA decode BMMs (absorbed)", "", "mla_bmm_kernels", "mla_gen_pre_bf16", 15.0),
    ("", "", "mla_bmm_kernels", "mla_gen_post_bf16", 15.0),
    ("", "", "mla_bmm_kernels", "mla_gen_pre_fp8", 15.0),
    ("", "", "mla_bmm_kernels", "mla_gen_post_fp8", 15.0),
    (
        "DeepSeek sparse attention prefill (DSA module)",
        "DeepSeek-V3.2, GLM-5",
        "dsa_kernels",
        "context",
        15.0,
    ),
    ("DSA decode (module)", "", "dsa_kernels", "generation", 15.0),
    (
        "fused MoE, 16-bit, balanced and power-law routing",
        "Mixtral, Qwen3 MoE",
        "gpus",
        "moe",
        15.0,
    ),
    ("MoE, FP8 experts", "DeepSeek-V3, Qwen3 FP8", "gpus", "moe_fp8", 15.0),
    ("MoE, MXFP4 experts (W4A16)", "gpt-oss", "gpus", "moe_w4a16", 15.0),
    ("MoE, NVFP4 experts", "Qwen3 and DeepSeek NVFP4", "gpus", "moe_nvfp4", 15.0),
    ("tensor-parallel all-reduce (vLLM custom)", "TP > 1", "gpus", "allreduce", 15.0),
    ("NCCL all-reduce", "", "quant_comm_kernels", "all_reduce", 15.0),
    (
        "expert-parallel dispatch/combine (NCCL)",
        "EP > 1",
        "quant_comm_kernels",
        "alltoall",
        15.0,
    ),
    ("", "", "quant_comm_kernels", "all_gather", 15.0),
    ("", "", "quant_comm_kernels", "reduce_scatter", 15.0),
]
PROTOCOLS = {
    "held-out shapes": ("held_out_shapes", "held-out shapes"),
    "leave one GPU out": ("leave_one_gpu_out", "leave-one-GPU-out"),
}
FILES = {
    "gpus": "gpus/gpus.csv",
    "mla_kernels": "mla_kernels/mla_kernels.csv",
    "mla_bmm_kernels": "mla_bmm_kernels/mla_bmm_kernels.csv",
    "dsa_kernels": "dsa_kernels/dsa_kernels.csv",
    "quant_comm_kernels": "quant_comm_kernels/quant_comm_kernels.csv",
}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load(results: pathlib.Path) -> dict[str, pd.DataFrame]:
    """The scripts' tables in one shape, ``op, protocol, mape`` (calibrated, %), by
    script; a missing file is reported and skipped."""
    out = {}
    for script, rel in FILES.items():
        path = results / rel
        if not path.is_file():
            _log(f"no {path} (run experiments/{script}.py): its lines are left out")
            continue
        t = pd.read_csv(path)
        if script == "gpus":
            grid = t["variant"] == "calibrated_grid"
            t = t.assign(family=t["family"].where(~grid, t["family"] + GRID))
            t = t[t["variant"].isin(("calibrated", "calibrated_grid"))]
            t = t.rename(columns={"family": "op"})
        else:
            t = t.rename(columns={"calibrated_mape": "mape"})
        out[script] = t[["op", "protocol", "mape"]]
    return out


def feature_table(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One line per (feature, operator) with its per-protocol median, tables, and
    tables at or below the goal."""
    lines = []
    for feature, models, script, op, goal in FEATURES:
        if script not in tables:
            continue
        t = tables[script]
        line = {"feature": feature, "models": models, "operator": op, "goal": goal}
        for name, spellings in PROTOCOLS.items():
            m = t[(t["op"] == op) & t["protocol"].isin(spellings)]["mape"]
            line[f"{name} median"] = m.median() if len(m) else float("nan")
            line[f"{name} tables"] = len(m)
            line[f"{name} met"] = int((m <= goal).sum())
        lines.append(line)
    return pd.DataFrame(lines)


def markdown(table: pd.DataFrame) -> str:
    head = [
        "| feature | models | operator | goal % | held-out shapes: median % "
        "(tables at goal / tables) | leave one GPU out: median % (at goal / tables) |",
        "|---|---|---|---:|---|---|",
    ]

    def cell(r, name):
        n = r[f"{name} tables"]
        if not n:
            return "n/a"
        return f"{r[f'{name} median']:.1f} ({r[f'{name} met']}/{n})"

    body = [
        f"| {r['feature']} | {r['models']} | {r['operator']} | {r['goal']:.0f} "
        f"| {cell(r, 'held-out shapes')} | {cell(r, 'leave one GPU out')} |"
        for _, r in table.iterrows()
    ]
    return "\n".join(head + body)


def kernel_sum_note(results: pathlib.Path) -> str:
    """A line on MLA in the kernel sum (``mla_kernels.py``'s kernel-sum protocols:
    the modules priced on GEMM and GQA curves, no MLA row fitted, and on the GPU's
    MLA module curves), or ''."""
    path = results / FILES["mla_kernels"]
    if not path.is_file():
        return ""
    t = pd.read_csv(path)
    parts = []
    for protocol, what in (
        ("kernel sum", "on the GEMM and GQA attention curves (no MLA row fitted)"),
        (
            "kernel sum + fixed cost (other GPUs)",
            "the same with a fixed cost per module from the other GPUs",
        ),
        (
            "kernel sum, MLA module curves (held-out shapes)",
            "on the GPU's MLA module curves (`KernelCurves.mla`, held-out shapes, "
            "plus the module's fitted fixed cost)",
        ),
        (
            "kernel sum, MLA module curves (other GPUs)",
            "on module curves fitted on the other GPUs (every row of the held-out GPU)",
        ),
    ):
        g = t[t["protocol"] == protocol].groupby("op")["calibrated_mape"]
        if len(g):
            ops = ", ".join(
                f"{op} {v.median():.1f}% ({int((v <= 15.0).sum())}/{len(v)} at or "
                "below 15%)"
                for op, v in g
            )
            parts.append(f"{what}: {ops}")
    if not parts:
        return ""
    return (
        "MLA in the kernel sum (`kernel_step_time`, one MLA layer), median MAPE "
        "against the measured modules: " + "; ".join(parts) + "."
    )


def main(results: pathlib.Path, out: pathlib.Path) -> pd.DataFrame:
    table = feature_table(load(results))
    if table.empty:
        raise SystemExit(f"no validation results under {results}")
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "features.csv", index=False)
    md = markdown(table)
    note = kernel_sum_note(results)
    if note:
        md += "\n\n" + note
    (out / "features.md").write_text(md + "\n")
    print(md)
    return table


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=pathlib.Path, default=pathlib.Path("results"))
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path("results/features")
    )
    a = parser.parse_args()
    main(a.results, a.out)
