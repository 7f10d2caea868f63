"""Fitting throughput: loss + gradient against prediction, fit wall times in fresh
processes against scipy, scaling with rows and devices, and a large synthetic fit.

Usage: ``python -m diffmodel._app._bench_fit [--grad-steps N] [--json PATH]
[--synthetic-steps N]``; :func:`measure` is what ``diffmodel bench`` adds to its
figures. Every number is measured in the run that prints it.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import diffmodel as dm
from diffmodel._bulk._loss import bulk_data, bulk_value_and_grad, fit_steps
from diffmodel._fitting._factorsets import init_factor_set, to_physical, to_raw

# One fit of the study's 9-parameter model on the public traces, in float64 (as
# scipy), timed from the call of ``fit`` (the frame already loaded): the parameters
# only, as scipy gives (``uncertainty=False``); then the same fit again in the same
# process (the compiled loop reused: the run alone); then with the posterior (the
# Laplace step: Hessian, identifiability, residual noise), timed on its own.
_STUDY_FIT = r"""
import json, sys, time
import jax
jax.config.update("jax_enable_x64", True)
import diffmodel as dm
from diffmodel._fitting._optimise import COMPILE_CLOCK
col = "step_duration_us"
frame = dm.data.add_targets(dm.data.load_steps(sys.argv[1]))
frame = frame[frame[col].notna() & (frame[col] > 0)]
kw = dict(target=col, factors="study-9", max_steps=2000)
t0 = time.perf_counter()
r = dm.fit(frame, uncertainty=False, **kw)
wall = time.perf_counter() - t0
compile_s = COMPILE_CLOCK.seconds()
again = dm.fit(frame, uncertainty=False, **kw)
t0 = time.perf_counter()
dm.fit(frame, **kw)
posterior = time.perf_counter() - t0
json.dump({"wall_s": wall, "loss": r.loss, "n_steps": r.n_steps,
           "result": r.result, "compile_s": compile_s,
           "run_s": again.wall_seconds, "with_posterior_s": posterior,
           "rows": len(frame)}, sys.stdout)
"""

# scipy's trf (box bounds, log residuals: the study's own fitter) on the same rows
# and components, float64, from the same start; timed from the call.
_SCIPY_FIT = r"""
import json, sys
import jax
jax.config.update("jax_enable_x64", True)
import diffmodel as dm
col = "step_duration_us"
frame = dm.data.add_targets(dm.data.load_steps(sys.argv[1]))
frame = frame[frame[col].notna() & (frame[col] > 0)]
fit = dm.baselines.study_least_squares(frame, col)
json.dump({"wall_s": fit.seconds, "loss": fit.loss}, sys.stdout)
"""

_GRAD_RATE = r"""
import json, sys
import jax
from diffmodel._app._bench_fit import grad_rate
n = int(sys.argv[1])
json.dump({"devices": len(jax.devices()), **grad_rate(n, repeats=3)}, sys.stdout)
"""


def _log(msg: str) -> None:
    print(f"[bench-fit] {msg}", file=sys.stderr, flush=True)


def _python(code: str, *args: str, env: dict | None = None) -> dict:
    """Run ``code`` in a fresh Python process; its JSON output."""
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if out.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout)


def study_fit_times(steps_path: str) -> dict:
    """``fit_first_s`` / ``fit_second_s``: the study's 9-parameter fit (parameters
    only) in two fresh processes sharing a new, empty compilation cache;
    ``fit_run_s``: a refit in the second (nothing compiled);
    ``fit_with_posterior_first_s`` / ``..._second_s``: a fit with its Laplace
    posterior after those, in each process; ``scipy_fit_s``: scipy's trf on the
    same problem."""
    res: dict = {}
    with tempfile.TemporaryDirectory(prefix="diffmodel-cache-") as cache:
        env = {"DIFFMODEL_COMPILATION_CACHE": cache}
        first = _python(_STUDY_FIT, steps_path, env=env)
        second = _python(_STUDY_FIT, steps_path, env=env)
    res["fit_first_s"] = first["wall_s"]
    res["fit_second_s"] = second["wall_s"]
    res["fit_run_s"] = second["run_s"]
    res["fit_with_posterior_first_s"] = first["with_posterior_s"]
    res["fit_with_posterior_second_s"] = second["with_posterior_s"]
    res["fit_loss"] = second["loss"]
    res["fit_optimiser_steps"] = second["n_steps"]
    res["fit_rows"] = second["rows"]

    scipy = _python(_SCIPY_FIT, steps_path)
    res["scipy_fit_s"] = scipy["wall_s"]
    res["scipy_fit_loss"] = scipy["loss"]
    res["ratio_fit_second_scipy"] = res["fit_second_s"] / res["scipy_fit_s"]
    res["ratio_scipy_fit_run"] = res["scipy_fit_s"] / res["fit_run_s"]
    return res


def synthetic(n: int, n_deployments: int, seed: int = 0):
    """``n`` random steps over ``n_deployments`` catalogue deployments (float32):
    one per model, the TP degree cycling through 1, 2, 4, 8 (the next that divides
    the model's heads), so that the all-reduce factors have data to fit."""
    from diffmodel._app._bench import make_steps

    degrees = (1, 2, 4, 8)
    deps, labels = [], []
    for i, m in enumerate(dm.known_models()):
        for t in degrees[i % 4 :] + degrees[: i % 4]:
            try:
                deps.append(dm.deployment(m, "h100-sxm", t))
            except ValueError:  # a TP degree the model's heads do not divide by
                continue
            labels.append(f"{m}/h100-sxm/tp{t}")
            break
        if len(deps) == n_deployments:
            break
    stats, _ = make_steps(n, seed)
    group = np.random.default_rng(seed + 1).integers(0, len(deps), n).astype(np.int32)
    return stats, dm.stack_deployments(deps), group, tuple(labels)


def grad_rate(n: int, repeats: int = 5, chunk_size: int = 2**11) -> dict:
    """Loss + gradient and prediction steps/s on ``n`` synthetic steps of three
    deployments (float32), timed in interleaved rounds."""
    stats, deps, group, labels = synthetic(n, 3)
    pred = np.empty(n, np.float32)
    dm.predict_steps(stats, deps, group, out=pred)
    y = pred * np.random.default_rng(2).lognormal(0, 0.2, n).astype(np.float32)
    data = bulk_data(stats, deps, group, y, chunk_size=chunk_size)
    fs = init_factor_set("per-model", labels)
    t0 = time.perf_counter()
    jax.block_until_ready(bulk_value_and_grad(fs, data))
    first = time.perf_counter() - t0
    times: dict[str, list[float]] = {"grad": [], "forward": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(bulk_value_and_grad(fs, data))
        times["grad"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        dm.predict_steps(stats, deps, group, out=pred)
        times["forward"].append(time.perf_counter() - t0)
    grad = n / np.asarray(times["grad"])
    fwd = n / np.asarray(times["forward"])
    return {
        "rows": n,
        "loss_grad_steps_per_s": float(np.median(grad)),
        "forward_steps_per_s": float(np.median(fwd)),
        "ratio_loss_grad_forward": float(np.median(grad / fwd)),
        "loss_grad_first_call_s": first,
    }


def scaling(rows=(10_000, 100_000, 1_000_000, 10_000_000), devices=(1, 2)) -> list:
    """Loss + gradient steps/s by rows (one device) and by devices (forced host
    devices at 1e6 rows), each in a fresh process."""
    out = []
    for n in rows:
        _log(f"scaling: {n:,} rows")
        out.append(_python(_GRAD_RATE, str(n)))
    for d in devices:
        _log(f"scaling: {d} device(s)")
        flags = f"--xla_force_host_platform_device_count={d}"
        env = {"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()}
        out.append(_python(_GRAD_RATE, str(1_000_000), env=env))
    return out


def synthetic_fit(n: int, n_deployments: int = 20, max_steps: int = 100) -> dict:
    """Fit global factors to ``n`` synthetic steps of ``n_deployments`` deployments
    generated from known factors (2% log-normal noise); wall time, peak memory
    (this process's maximum resident set), and the recovered factors."""
    import resource

    stats, deps, group, labels = synthetic(n, n_deployments)
    prior = tuple(dm.FACTOR_SPECS[k][0] for k in dm.FACTOR_NAMES)
    truth_raw = jnp.asarray(
        np.random.default_rng(3).normal(0, 0.3, len(prior)), jnp.float32
    )
    truth = to_physical(truth_raw, prior)
    y = dm.predict_steps(stats, deps, group, truth)
    y = y * np.random.default_rng(4).lognormal(0, 0.02, n).astype(np.float32)
    t0 = time.perf_counter()
    res = fit_steps(
        init_factor_set("global", labels),
        stats,
        deps,
        group,
        y,
        max_steps=max_steps,
        throw=False,
    )
    wall = time.perf_counter() - t0
    fitted = res.factor_set.physical()
    rows = {
        k: [float(getattr(truth, k)), float(getattr(fitted, k))]
        for k in dm.FACTOR_NAMES
    }
    return {
        "rows": n,
        "deployments": len(labels),
        "wall_s": wall,
        "compile_s": res.compile_seconds,
        "optimiser_steps": res.n_steps,
        "result": res.result,
        "loss": res.loss,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "truth_vs_fitted": rows,
        "max_rel_error": max(abs(f / t - 1) for t, f in rows.values()),
        "raw_error": float(jnp.max(jnp.abs(to_raw(fitted, prior) - truth_raw))),
    }


def measure(steps_path: str | None = None, grad_steps: int = 1_000_000) -> dict:
    """The figures ``diffmodel bench`` adds: fit times, loss + gradient rate."""
    steps_path = steps_path or str(
        dm.data.default_data_dir() / "stepml" / "steps.parquet"
    )
    _log("study 9-parameter fit: two fresh processes, and scipy")
    res = study_fit_times(steps_path)
    _log(f"loss + gradient over {grad_steps:,} steps")
    g = grad_rate(grad_steps)
    res.update({k: v for k, v in g.items() if k != "rows"})
    res["loss_grad_rows"] = grad_steps
    return res


def fitting_table(r: dict) -> list[str]:
    """Markdown lines of the fitting figures (``_bench_fit.measure``)."""
    sp = r["scipy_fit_s"]
    rows = [
        (
            f"bulk loss + gradient, {r['loss_grad_rows']:,} steps (chunked, "
            "per-model factors)",
            f"{r['loss_grad_steps_per_s']:.3g} steps/s",
            f"{r['ratio_loss_grad_forward']:.2f} x prediction "
            f"({r['forward_steps_per_s']:.3g} steps/s, same rows, same rounds)",
        ),
        (
            "study 9-parameter fit, first fresh process (compiles)",
            f"{r['fit_first_s']:.2f} s",
            f"{r['fit_first_s'] / sp:.2f} x scipy",
        ),
        (
            "same, second fresh process (the loop kept on disk, compilation cache)",
            f"{r['fit_second_s']:.2f} s",
            f"{r['ratio_fit_second_scipy']:.2f} x scipy",
        ),
        (
            "same, refit in that process (the run alone)",
            f"{r['fit_run_s']:.3f} s",
            f"scipy / run = {r['ratio_scipy_fit_run']:.1f}x",
        ),
        (
            "then a fit with its posterior (Laplace) in that process",
            f"{r['fit_with_posterior_second_s']:.2f} s",
            f"in the first process {r['fit_with_posterior_first_s']:.2f} s",
        ),
        (
            f"scipy trf, the study's fitter ({r['fit_rows']:,} steps)",
            f"{sp:.2f} s",
            f"loss {r['scipy_fit_loss']:.8f} vs ours {r['fit_loss']:.8f}",
        ),
    ]
    return [
        "| fitting | time or rate | ratio |",
        "|---|---:|---|",
        *(f"| {a} | {b} | {c} |" for a, b, c in rows),
    ]


def scaling_table(rows: list[dict]) -> list[str]:
    """Markdown lines of :func:`scaling`'s figures."""
    out = [
        "| loss + gradient (fresh process) | steps/s | x prediction, same rows |",
        "|---|---:|---:|",
    ]
    for r in rows:
        what = f"{r['rows']:,} rows, {r['devices']} device"
        what += "s (forced host devices)" if r["devices"] > 1 else ""
        out.append(
            f"| {what} | {r['loss_grad_steps_per_s']:.3g} "
            f"| {r['ratio_loss_grad_forward']:.2f} |"
        )
    return out


def synthetic_table(r: dict) -> list[str]:
    """Markdown lines of :func:`synthetic_fit`'s figures: the cost, then each
    factor's truth and fit."""
    out = [
        f"Global fit of {r['rows']:,} synthetic steps of {r['deployments']} "
        f"deployments (2% noise): {r['wall_s']:.1f} s wall ({r['compile_s']:.1f} s "
        f"compile), {r['optimiser_steps']} optimiser steps, peak memory "
        f"{r['peak_rss_bytes'] / 2**30:.2f} GiB (the process's maximum resident set, "
        "data generation included).",
        "",
        "| factor | truth | fitted | error |",
        "|---|---:|---:|---:|",
    ]
    for k, (t, f) in r["truth_vs_fitted"].items():
        out.append(f"| {k} | {t:.4g} | {f:.4g} | {100 * (f / t - 1):+.2f}% |")
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grad-steps", type=int, default=1_000_000)
    ap.add_argument("--synthetic-steps", type=int, default=0, help="0: skip")
    ap.add_argument("--scaling", action="store_true", help="rows and devices")
    ap.add_argument("--json", dest="json_path", default=None)
    a = ap.parse_args(argv)
    res = measure(grad_steps=a.grad_steps)
    if a.scaling:
        res["scaling"] = scaling()
    if a.synthetic_steps:
        _log(f"synthetic fit: {a.synthetic_steps:,} steps, 20 deployments")
        res["synthetic_fit"] = synthetic_fit(a.synthetic_steps)
    text = json.dumps(res, indent=2)
    print(text)
    if a.json_path:
        with open(a.json_path, "w") as fh:
            fh.write(text + "\n")
    return res


if __name__ == "__main__":
    main()
