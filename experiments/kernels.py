"""Calibrate and validate the operator physics on measured H100 kernels.

For each aiconfigurator kernel family, fits efficiency curves on 75% of the shapes
and reports MAPE on the held-out 25% (whole shapes), beside the uncalibrated roofline
(the constant efficiencies of ``FACTOR_SPECS``). For each Vidur operator, fits on two
models and tests on the third (leave-one-model-out). Writes ``kernels.csv``,
``kernels.md``, the curves fitted on all kernels (``kernel_curves.json``) and the
step-level prior factors they imply (``kernel_prior_factors.json``).

    python experiments/kernels.py [--data DIR] [--out DIR]
"""

import argparse
import json
import pathlib
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from diffmodel import FACTOR_SPECS, hardware, mape
from diffmodel.data import default_data_dir
from diffmodel.kernels import (
    VIDUR_OPERATORS,
    FitOptions,
    allreduce_kernel_us,
    calibrate_kernels,
    default_roofline_curves,
    family_rows,
    family_work,
    fit_allreduce_curve,
    fit_roofline_curves,
    held_out_split,
    init_curves,
    kernel_prior_factors,
    load_kernel_tables,
    load_vidur,
    save_curves,
    two_stage_minimise,
    vidur_work,
)

SHAPE_KEYS = {
    "gemm_bf16": ["n", "k"],
    "gemm_fp8": ["n", "k"],
    "prefill_attention": ["num_heads", "num_key_value_heads"],
    "decode_attention": ["num_heads", "num_key_value_heads"],
    "moe": ["hidden_size", "inter_size", "topk", "num_experts"],
    "allreduce": ["message_size"],
}
VIDUR_GEMMS = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj")
UNCALIBRATED = {
    "compute": (FACTOR_SPECS["gemm_flops"][0], FACTOR_SPECS["mem_bw"][0]),
    "attention": (FACTOR_SPECS["attn_flops"][0], FACTOR_SPECS["attn_bw"][0]),
    "comm": (FACTOR_SPECS["comm_bw"][0], FACTOR_SPECS["comm_latency_us"][0]),
}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _n_params(tree) -> int:
    return sum(int(np.size(x)) for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array)))


def kernel_rows(tables, options: FitOptions) -> list[dict]:
    """Held-out-shape MAPE of every aiconfigurator family, both variants."""
    hw = hardware("h100-sxm")
    out = []
    for fam, keys in SHAPE_KEYS.items():
        t0 = time.perf_counter()
        rows = family_rows(tables, fam).reset_index(drop=True)
        test = held_out_split(rows, keys)
        tr, te = rows[~test], rows[test]
        y_te = te["latency_us"].to_numpy(float)
        if fam == "allreduce":
            args = [te[c].to_numpy(float) for c in ("bytes", "num_gpus")]
            unc = allreduce_kernel_us(*args, UNCALIBRATED["comm"], hw)
            curve = fit_allreduce_curve(
                tr["bytes"].to_numpy(float),
                tr["num_gpus"].to_numpy(float),
                tr["latency_us"].to_numpy(float),
                hw,
                options=options,
            )
            cal = allreduce_kernel_us(*args, curve, hw)
        else:
            w_te = family_work(fam, te, hw)
            consts = UNCALIBRATED["attention" if "attention" in fam else "compute"]
            unc = w_te.time_us(consts)
            curve = fit_roofline_curves(
                family_work(fam, tr, hw),
                tr["latency_us"].to_numpy(float),
                init_curves(fam),
                options=options,
            )
            cal = w_te.time_us(curve)
        n_test_shapes = len(te[keys].drop_duplicates())
        for variant, pred, n in (("uncalibrated", unc, 0), ("calibrated", cal, None)):
            out.append(
                dict(
                    family=fam,
                    variant=variant,
                    protocol="held_out_shapes",
                    mape=mape(y_te, pred),
                    n_params=_n_params(curve) if n is None else n,
                    n_test=len(te),
                    n_test_shapes=n_test_shapes,
                )
            )
        _log(
            f"{fam}: held-out {n_test_shapes} shapes / {len(te)} kernels, "
            f"MAPE {out[-2]['mape']:.1f}% -> {out[-1]['mape']:.1f}% "
            f"({time.perf_counter() - t0:.0f} s)"
        )
    return out


def fit_lomo_folds(work, rows, folds, init, options: FitOptions):
    """Fit one curve set per fold (trained where the fold's mask is False) in a single
    :func:`minimise` call: the curves are stacked and the fold losses summed, which
    leaves the folds independent (one compilation instead of one per fold)."""
    train = jnp.asarray(~np.stack(folds), float)
    log_y = jnp.log(jnp.asarray(rows["latency_us"].to_numpy(float)))
    stacked = jax.tree.map(lambda x: jnp.stack([x] * len(folds)), init)

    def loss(curves):
        pred = jax.vmap(work.time_us)(curves)
        err = (jnp.log(pred) - log_y) ** 2
        return jnp.sum(jnp.sum(err * train, axis=1) / jnp.sum(train, axis=1))

    return two_stage_minimise(loss, stacked, options)


def vidur_rows(vidur: pd.DataFrame, options: FitOptions) -> list[dict]:
    """Leave-one-model-out MAPE of every Vidur operator, both variants."""
    hw = hardware("h100-sxm")
    out = []
    models = sorted(vidur["model"].unique())
    for op in VIDUR_OPERATORS:
        t0 = time.perf_counter()
        rows = vidur[vidur["operator"] == op].reset_index(drop=True)
        gemm = op in VIDUR_GEMMS
        init = default_roofline_curves(occupancy=gemm, latency=not gemm)
        folds = [rows["model"].to_numpy() == held for held in models]
        curves = fit_lomo_folds(vidur_work(rows, hw), rows, folds, init, options)
        w_all = vidur_work(rows, hw)
        pred_unc, pred_cal, actual = [], [], []
        for i, test in enumerate(folds):
            w_te = jax.tree.map(lambda x, t=test: x[t], w_all)
            curve = jax.tree.map(lambda x, i=i: x[i], curves)
            pred_unc.append(np.asarray(w_te.time_us(UNCALIBRATED["compute"])))
            pred_cal.append(np.asarray(w_te.time_us(curve)))
            actual.append(rows["latency_us"].to_numpy(float)[test])
        actual = np.concatenate(actual)
        for variant, pred, n in (
            ("uncalibrated", pred_unc, 0),
            ("calibrated", pred_cal, _n_params(init)),
        ):
            out.append(
                dict(
                    family=f"vidur_{op}",
                    variant=variant,
                    protocol="lomo",
                    mape=mape(actual, np.concatenate(pred)),
                    n_params=n,
                    n_test=len(actual),
                    n_test_shapes=len(models),
                )
            )
        _log(
            f"vidur_{op}: LOMO over {len(models)} models, MAPE "
            f"{out[-2]['mape']:.1f}% -> {out[-1]['mape']:.1f}% "
            f"({time.perf_counter() - t0:.0f} s)"
        )
    return out


def markdown(table: pd.DataFrame) -> str:
    """The results as a markdown table: one line per family and protocol."""
    wide = table.pivot_table(
        index=["family", "protocol"], columns="variant", values="mape", sort=False
    )
    n = table[table["variant"] == "calibrated"].set_index(["family", "protocol"])
    lines = [
        "| family | protocol | uncalibrated MAPE % | calibrated MAPE % | params |",
        "|---|---|---|---|---|",
    ]
    for (fam, prot), r in wide.iterrows():
        lines.append(
            f"| {fam} | {prot} | {r['uncalibrated']:.1f} | {r['calibrated']:.1f} | "
            f"{int(n.loc[(fam, prot), 'n_params'])} |"
        )
    return "\n".join(lines)


def main(
    *,
    data: str | pathlib.Path | None = None,
    out: str | pathlib.Path = "results/kernels",
    options: FitOptions | None = None,
) -> pd.DataFrame:
    """Run the validation, write the outputs to ``out``, print and return the table."""
    options = FitOptions() if options is None else options
    jax.config.update("jax_enable_x64", True)
    data = pathlib.Path(data) if data is not None else default_data_dir()
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    _log(f"loading kernels and Vidur profiles from {data}")
    tables = load_kernel_tables(data)
    vidur = load_vidur(data)
    rows = kernel_rows(tables, options) + vidur_rows(vidur, options)
    table = pd.DataFrame(rows)
    table.to_csv(out / "kernels.csv", index=False)
    md = markdown(table)
    (out / "kernels.md").write_text(md + "\n")

    _log("calibrating curves on all kernels")
    curves = calibrate_kernels(tables, options=options, progress=_log)
    save_curves(curves, out / "kernel_curves.json")
    prior = {k: float(v) for k, v in kernel_prior_factors(curves).as_dict().items()}
    (out / "kernel_prior_factors.json").write_text(json.dumps(prior, indent=2) + "\n")
    print(md)
    print("\nkernel-calibrated prior factors (Llama-2-70B, TP4):")
    for k, v in prior.items():
        print(f"  {k}: {v:.4g} ({FACTOR_SPECS[k][1]})")
    _log(f"done in {time.perf_counter() - t0:.0f} s; wrote {out}")
    return table


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=pathlib.Path, default=None)
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path("results/kernels")
    )
    args = parser.parse_args()
    main(data=args.data if args.data else default_data_dir(), out=args.out)
