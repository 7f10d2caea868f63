"""What the public traces pin, what only kernel data pins, and what nothing pins.

Iteration-time rows of the three public deployments (vLLM 0.15.1 on H100-SXM:
Llama-2-70B TP4 general and codegen, CodeLlama-34B TP2 general), fitted with
host-device factors (one GPU, one serving stack): the device efficiencies of
``h100-sxm`` and the host costs of the stack. Two fits:

- ``traces``: the traces alone (no prior);
- ``traces + kernels``: a Gaussian prior on the device efficiencies around the
  kernel-calibrated factors (``calibrate_kernels`` + ``kernel_prior_factors`` on the
  H100 kernel tables), with a sd per efficiency from the calibration's own residuals:
  the root-mean-square log-ratio residual ``s`` of the family's kernels around its
  fitted curve (GEMM bf16 for ``gemm_flops`` and ``mem_bw``, prefill attention for
  ``attn_flops``, decode attention for ``attn_bw``, the all-reduce for ``comm_bw``),
  mapped to the raw (log-odds) scale as ``s / (1 - eta)``.

A factor is *pinned* when its posterior sd (Laplace) is below ``10%`` of its value:
pinned by the traces when the ``traces`` fit pins it, by kernels only when only the
``traces + kernels`` fit does, and by nothing otherwise. Host costs have no kernel
prior (kernel timings cannot see them).

    python experiments/identifiability.py [--data DIR] [--max-steps N] [--out DIR]
"""

import argparse
import pathlib
import time
import warnings

import jax.numpy as jnp
import numpy as np
import pandas as pd

import diffmodel as dm
from diffmodel import data as dmd, kernels as dmk

TARGET = "iteration_time_us"
DEVICE_FACTORS = tuple(
    n for n in dm.FACTOR_NAMES if dm.FACTOR_SPECS[n][2] == "efficiency"
)
PINNED = 0.10
STACK = "vllm-0.15.1"
_FAMILY_OF = {
    "gemm_flops": "gemm_bf16",
    "mem_bw": "gemm_bf16",
    "attn_flops": "prefill_attention",
    "attn_bw": "decode_attention",
    "comm_bw": "allreduce",
}


def calibration_scatter(tables, curves) -> dict[str, float]:
    """RMS log-ratio residual of each family's kernels around its calibrated curve."""
    hw = dm.hardware(curves.hardware)
    out = {}
    g = tables["gemm"]
    g = g[g["gemm_dtype"] == "bfloat16"]
    pred = dmk.table_work("gemm", g, hw).time_us(curves.gemm_bf16)
    out["gemm_bf16"] = _rms(pred, g["latency_us"])
    for fam in ("prefill_attention", "decode_attention"):
        a = tables[fam]
        a = a[a["kv_cache_dtype"] == "bfloat16"]
        pred = dmk.table_work(fam, a, hw).time_us(getattr(curves, fam))
        out[fam] = _rms(pred, a["latency_us"])
    ar = tables["allreduce"]
    ar = ar[ar["kernel_source"] == "vLLM_custom_graph"]
    pred = dmk.allreduce_kernel_us(
        jnp.asarray(ar["bytes"].to_numpy(float)),
        jnp.asarray(ar["num_gpus"].to_numpy(float)),
        curves.allreduce,
        hw,
    )
    out["allreduce"] = _rms(pred, ar["latency_us"])
    return out


def _rms(pred, actual) -> float:
    r = np.log(np.asarray(pred)) - np.log(actual.to_numpy(float))
    return float(np.sqrt(np.mean(r**2)))


def _fit(frame, max_steps, **prior):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", dm.IdentifiabilityWarning)
        result = dm.fit_host_device(frame, target=TARGET, max_steps=max_steps, **prior)
    return result, [str(w.message) for w in caught]


def _pinned(name: str, lap) -> bool:
    """sd under ``PINNED`` of the value, not at a bound, in no open direction (an
    efficiency saturated at 1 has a vanishing delta-method sd: not a pin)."""
    value, sd = lap.summary()[name]
    if name in lap.at_bound:
        return False
    if any(name in line for line in lap.unpinned):
        return False
    return sd < PINNED * abs(value)


def _where(name: str, traces, both) -> str:
    if _pinned(name, traces):
        return "traces"
    if _pinned(name, both):
        return "kernels only"
    return "nothing"


def main(
    *,
    data: pathlib.Path | None = None,
    max_steps: int = 500,
    out: pathlib.Path | None = None,
) -> pd.DataFrame:
    """Fit both ways, print the markdown table and the open directions (and write
    them to ``out/identifiability.md``)."""
    data = dmd.default_data_dir() if data is None else pathlib.Path(data)
    steps = dmd.add_targets(dmd.load_steps(data / "stepml" / "steps.parquet"))
    frame = steps[steps[TARGET].notna()].assign(stack=STACK)

    tick = time.perf_counter()
    tables = dmk.load_kernel_tables(data)
    curves = dmk.calibrate_kernels(tables)
    kprior = dmk.kernel_prior_factors(curves)
    scatter = calibration_scatter(tables, curves)
    sd_raw = tuple(
        scatter[_FAMILY_OF[n]] / (1.0 - float(getattr(kprior, n)))
        for n in DEVICE_FACTORS
    )
    print(
        f"kernel calibration: {time.perf_counter() - tick:.0f} s; RMS log residual "
        + ", ".join(f"{k} {v:.3f}" for k, v in scatter.items())
    )

    plain, w_plain = _fit(frame, max_steps)
    both, w_both = _fit(frame, max_steps, prior=kprior, device_prior_sd=sd_raw)
    a, b = plain.laplace.summary(), both.laplace.summary()
    prior_sd = dict(zip(DEVICE_FACTORS, sd_raw, strict=True))
    rows = []
    for name in a:
        factor = name.rsplit(".", 1)[1]
        unit = dm.FACTOR_SPECS[factor][1]
        (va, sa), (vb, sb) = a[name], b[name]
        kp = getattr(kprior, factor) if factor in DEVICE_FACTORS else None
        rows.append(
            {
                "factor": name,
                "unit": unit,
                "traces: value ± sd": f"{va:.4g} ± {sa:.2g}",
                "kernel prior (raw sd)": "-"
                if kp is None
                else f"{float(kp):.3g} ({prior_sd[factor]:.2f})",
                "traces+kernels: value ± sd": f"{vb:.4g} ± {sb:.2g}",
                "pinned by": _where(name, plain.laplace, both.laplace),
            }
        )
    table = pd.DataFrame(rows)
    lines = [
        "Iteration-time rows of the three public deployments (vLLM 0.15.1 on "
        "H100-SXM), host-device factors; a factor is pinned where its posterior sd "
        f"is below {PINNED:.0%} of its value.",
        "",
        markdown(table),
    ]
    for title, res, warns in (
        ("traces", plain, w_plain),
        ("traces + kernels", both, w_both),
    ):
        lines.append(
            f"\n{title}: loss {res.loss:.5g}, {res.n_steps} steps, "
            f"noise sd {res.laplace.noise_sd:.3f}; {len(warns)} warnings:\n"
        )
        lines += [f"- {line}" for line in warns]
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "identifiability.md").write_text(text)
    return table


def markdown(table: pd.DataFrame) -> str:
    """A pipe table of ``table`` (floats to one decimal), without extra packages."""
    cells = [
        [f"{v:.1f}" if isinstance(v, float) else str(v) for v in row]
        for row in table.itertuples(index=False)
    ]
    lines = ["| " + " | ".join(map(str, table.columns)) + " |"]
    lines.append("|" + "---|" * table.shape[1])
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=pathlib.Path, default=None)
    parser.add_argument("--max-steps", type=int, default=500)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()
    main(data=args.data, max_steps=args.max_steps, out=args.out)
