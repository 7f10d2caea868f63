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
    "seed_fit": (
        ["experiments/seed_fit.py", "--out", "{r}/seed_fit"],
        "seed_fit/seed_fit.md",
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
        ],
        "throughput/throughput.md",
    ),
    "scheduler": (
        ["experiments/scheduler.py", "--out", "{r}/scheduler"],
        "scheduler/scheduler.md",
    ),
}


def scheduler_markdown(path: pathlib.Path) -> str:
    """A table from ``scheduler.json`` (the script writes JSON only)."""
    r = json.loads(path.read_text())
    lines = [
        "| | objective (exact simulator) | simulator evaluations |",
        "|---|---:|---:|",
    ]
    lines.append(f"| gradient | {r['grad_objective']:.1f} | {r['grad_evals']} |")
    lines.append(f"| grid search | {r['grid_objective']:.1f} | {r['grid_evals']} |")
    extra = {k: v for k, v in r.items() if k.startswith("validation")}
    out = "\n".join(lines)
    if extra:
        out += "\n\n```json\n" + json.dumps(extra, indent=2) + "\n```"
    return out


def section_text(name: str, results: pathlib.Path) -> str | None:
    md = results / SECTIONS[name][1]
    if name == "scheduler" and not md.exists():
        js = results / "scheduler" / "scheduler.json"
        return scheduler_markdown(js) if js.exists() else None
    return md.read_text().strip() if md.exists() else None


def main(*, run: bool = False, results: pathlib.Path = ROOT / "results") -> None:
    """Optionally rerun the scripts, then splice their tables into README.md."""
    results = pathlib.Path(results)
    if run:
        for name, (cmd, _) in SECTIONS.items():
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
    a = p.parse_args()
    main(run=a.run, results=a.results)
