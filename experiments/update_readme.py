"""Paste the tables the experiment scripts wrote into README.md (never by hand).

Each README section between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` is
replaced by the markdown file the matching script wrote under ``results/``. With
``--run``, the scripts are run first (about 20 minutes on 2 cores).

    python experiments/update_readme.py [--run] [--results results]
"""

import argparse
import json
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

# name -> (command run by --run, markdown file it leaves under results/)
SECTIONS: dict[str, tuple[list[str], str]] = {
    "reproduce": (
        ["experiments/reproduce.py", "--out", "{r}/reproduce"],
        "reproduce/results.md",
    ),
    "host_terms": (
        ["experiments/host_terms.py", "--out", "{r}/host_terms"],
        "host_terms/host_terms.md",
    ),
    "identifiability": (
        ["experiments/identifiability.py", "--out", "{r}/identifiability"],
        "identifiability/identifiability.md",
    ),
    "joint": (
        ["experiments/joint.py", "--out", "{r}/joint"],
        "joint/joint.md",
    ),
    "prior_scale": (
        ["experiments/prior_scale.py", "--out", "{r}/prior_scale"],
        "prior_scale/prior_scale.md",
    ),
    "other_gpu_curves": (
        ["experiments/other_gpu_curves.py", "--out", "{r}/other_gpu_curves"],
        "other_gpu_curves/other_gpu_curves.md",
    ),
    "study_fit": (
        ["experiments/study_fit.py", "--out", "{r}/study_fit"],
        "study_fit/study_fit.md",
    ),
    "kernels": (
        ["experiments/kernels.py", "--out", "{r}/kernels"],
        "kernels/kernels.md",
    ),
    "throughput": (
        [
            "experiments/throughput.py",
            "--json",
            "{r}/throughput/throughput.json",
            "--markdown",
            "{r}/throughput/throughput.md",
            "--scale",
        ],
        "throughput/throughput.md",
    ),
    "scheduler": (
        ["experiments/scheduler.py", "--out", "{r}/scheduler"],
        "scheduler/scheduler.md",
    ),
    "gpus": (
        ["experiments/gpus.py", "--out", "{r}/gpus"],
        "gpus/gpus.md",
    ),
    "mla_kernels": (
        ["experiments/mla_kernels.py", "--out", "{r}/mla_kernels"],
        "mla_kernels/mla_kernels_summary.md",
    ),
    "dsa_kernels": (
        ["experiments/dsa_kernels.py", "--out", "{r}/dsa_kernels"],
        "dsa_kernels/dsa_kernels_summary.md",
    ),
    "quant_comm_kernels": (
        ["experiments/quant_comm_kernels.py", "--out", "{r}/quant_comm_kernels"],
        "quant_comm_kernels/quant_comm_kernels_summary.md",
    ),
    "mla_bmm_kernels": (
        ["experiments/mla_bmm_kernels.py", "--out", "{r}/mla_bmm_kernels"],
        "mla_bmm_kernels/mla_bmm_kernels_summary.md",
    ),
    "features": (
        ["experiments/features.py", "--results", "{r}", "--out", "{r}/features"],
        "features/features.md",
    ),
    "models": (
        ["experiments/models.py", "--out", "{r}/models"],
        "models/models.md",
    ),
}


def scheduler_markdown(path: pathlib.Path) -> str:
    """Tables from ``scheduler.json`` (the script writes JSON only)."""
    r = json.loads(path.read_text())
    lines = [
        "Knob tuning: objective (mean TTFT + w x mean ITL, ms) of the exact simulator "
        "at each method's knobs.",
        "",
        "| method | objective, ms | simulator evaluations |",
        "|---|---:|---:|",
        f"| gradient | {r['grad_objective'] / 1e3:.1f} | {r['grad_evals']} |",
        f"| grid search | {r['grid_objective'] / 1e3:.1f} | {r['grid_evals']} |",
    ]
    v = r.get("validation")
    if v:
        lines += [
            "",
            "Validation against the Llama-2-70B TP4 general trace: "
            f"{v['requests']} requests simulated with factors fitted to it.",
            "",
            "| quantity | measured | simulated |",
            "|---|---:|---:|",
        ]
        for key, unit in (("iteration_time_us", "us"), ("running_depth", "requests")):
            for stat in ("median", "p90"):
                m, sim = v[key]["measured"][stat], v[key]["simulated"][stat]
                lines.append(f"| {key} {stat} ({unit}) | {m:.1f} | {sim:.1f} |")
        sp = v.get("steps_with_prefill")
        if sp:
            lines.append(
                f"| share of steps with prefill | {sp['measured']:.3f} "
                f"| {sp['simulated']:.3f} |"
            )
    return "\n".join(lines)


def section_text(name: str, results: pathlib.Path) -> str | None:
    md = results / SECTIONS[name][1]
    if name == "scheduler" and not md.exists():
        js = results / "scheduler" / "scheduler.json"
        return scheduler_markdown(js) if js.exists() else None
    if not md.exists():
        return None
    # Drop a script's own top heading: the README gives each section its heading.
    lines = md.read_text().strip().splitlines()
    if lines and lines[0].startswith("## "):
        lines = lines[1:]
    return "\n".join(lines).strip()


def main(
    *,
    run: bool = False,
    results: pathlib.Path = ROOT / "results",
    only: tuple[str, ...] = (),
) -> None:
    """Optionally rerun the scripts, then splice their tables into README.md."""
    results = pathlib.Path(results)
    if run:
        for name, (cmd, _) in SECTIONS.items():
            if only and name not in only:
                continue
            argv = [sys.executable, *(c.format(r=results) for c in cmd)]
            (results / name).mkdir(parents=True, exist_ok=True)
            print(f"running {name}: {' '.join(argv[1:])}", file=sys.stderr)
            subprocess.run(argv, cwd=ROOT, check=True)
    readme = ROOT / "README.md"
    text = readme.read_text()
    for name in SECTIONS:
        body = section_text(name, results)
        if body is None:
            print(f"no results for {name}; section left as it is", file=sys.stderr)
            continue
        pattern = re.compile(
            rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", flags=re.DOTALL
        )
        text, n = pattern.subn(
            lambda m, b=body: m.group(1) + b + "\n" + m.group(2), text
        )
        if n != 1:
            raise SystemExit(f"README.md has no section markers for {name!r}")
        print(f"updated {name}", file=sys.stderr)
    readme.write_text(text)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="store_true", help="rerun every script first")
    p.add_argument("--results", type=pathlib.Path, default=ROOT / "results")
    p.add_argument(
        "--only",
        nargs="+",
        default=(),
        choices=sorted(SECTIONS),
        help="with --run: rerun only these scripts (every section is still pasted)",
    )
    a = p.parse_args()
    main(run=a.run, results=a.results, only=tuple(a.only))
