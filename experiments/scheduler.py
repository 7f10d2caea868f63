"""Tune vLLM scheduler knobs by gradient descent through the relaxed simulator.

Three parts, written to ``<out>/scheduler.json``:

1. **Factors.** The 9 global roofline factors fitted to the iteration time of one public
   trace (``stepml/steps.parquet``, default Llama-2-70B TP4 "general"; pairs of
   consecutive ``step.id``), with ``diffmodel.fit`` on the log-ratio loss.
2. **Validation.** The exact simulator driven by a workload whose arrival rates and
   lengths are read off that trace (two load phases, see
   :func:`trace_workload_spec`) under the trace's vLLM settings
   (``max_num_batched_tokens`` 2048, ``max_num_seqs`` 128): median and p90 of the
   simulated iteration time and running depth against the measured ones.
3. **Tuning.** For a synthetic Poisson workload on the same deployment, three ways to
   pick ``(max_num_batched_tokens, max_num_seqs)``, all scored by the exact
   simulator's objective ``mean TTFT + itl_weight * mean ITL``:

   - ``grad``: :func:`diffmodel.scheduler.tune_knobs`, gradient descent on the log
     objective of the exact simulator smoothed over log knobs (antithetic pairs along
     random orthogonal directions; every simulation is counted in ``grad_evals``);
   - ``grid``: a 6 x 6 grid of the exact simulator;
   - ``relaxed``: Adam on the log knobs through the relaxed simulator (temperature
     annealed), kept as the negative result it is: its pathwise gradient in
     ``max_num_batched_tokens`` has the wrong sign (``budget_gradient_check`` in the
     output compares it with the exact simulator's slope; the module docstring of
     ``diffmodel.scheduler._simulate`` says why).

Run: ``python experiments/scheduler.py --out results/scheduler`` (about 1 minute on
2 CPU cores).
"""

import argparse
import json
import pathlib
import time
from typing import Any

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pandas as pd  # noqa: E402

import diffmodel  # noqa: E402
from diffmodel.data import add_targets, load_steps  # noqa: E402
from diffmodel.scheduler import (  # noqa: E402
    Knobs,
    Workload,
    make_workload,
    serving_objective,
    simulate,
    tune_knobs,
)

EXPERIMENT = "20260217-202857-llama-2-70b-tp4-general"
MODEL, HARDWARE, TP = "llama-2-70b", "h100-sxm", 4
TRACE_KNOBS = (2048.0, 128.0)  # the traces' vLLM settings
BLOCK_SIZE = 16  # vLLM KV block, tokens
MAX_MODEL_LEN = 4096  # the traces' max_model_len, tokens
OUTPUT_SIGMA = 0.8  # log-normal spread of output lengths (no per-request data)


# --------------------------------------------------------------------------- factors


def fit_factors(frame: pd.DataFrame) -> tuple[diffmodel.Factors, dict[str, Any]]:
    """9 global factors fitted to ``iteration_time_us`` of a one-deployment frame."""
    rows = frame[np.isfinite(frame["iteration_time_us"])].reset_index(drop=True)
    res = diffmodel.fit(rows, target="iteration_time_us", factors="global")
    fa = res.factor_set.physical()
    return fa, {"method": "diffmodel.fit", "rows": len(rows), "loss": res.loss}


# ------------------------------------------------------------------------ validation


def trace_workload_spec(exp: pd.DataFrame, *, window_s: float = 60.0) -> list[dict]:
    """Arrival rate and request lengths of each load phase of a step trace.

    The trace samples about 10% of steps. Per window of ``window_s`` seconds: steps
    per second from ``step.id`` over time; arrival rate = finished requests per
    sampled step times steps per second (steady state). Windows are split into a low
    and a high phase at the midpoint of their rates. Per phase, by Little's law over
    its sampled steps: output tokens per request = decode tokens / finished + 1 (the
    prefill step makes the first); uncached prompt tokens = prefill tokens /
    finished; cached (prefix) tokens = KV-cache tokens per running request (from
    ``kv.usage_gpu_ratio``) less the prompt and the mean tokens generated so far
    by a running request, ``E[o^2] / (2 E[o])`` for the output-length law used.
    """
    ts = (exp["step.ts_start_ns"] - exp["step.ts_start_ns"].min()).to_numpy() / 1e9
    win = np.floor(ts / window_s).astype(int)
    rates, keys = [], []
    for k in np.unique(win):
        sel = exp[win == k]
        span = (sel["step.ts_start_ns"].max() - sel["step.ts_start_ns"].min()) / 1e9
        if len(sel) < 20 or span <= 0:
            continue
        steps_per_s = (sel["step.id"].max() - sel["step.id"].min()) / span
        rates.append(sel["batch.num_finished"].mean() * steps_per_s)
        keys.append(k)
    rates = np.asarray(rates)
    cut = 0.5 * (rates.min() + rates.max())
    phases = []
    for name, chosen in (("low", rates < cut), ("high", rates >= cut)):
        ks = np.asarray(keys)[chosen]
        sel = exp[np.isin(win, ks)]
        fin = sel["batch.num_finished"].mean()
        out_mean = sel["batch.decode_tokens"].mean() / fin + 1.0
        prompt_mean = max(sel["batch.prefill_tokens"].mean() / fin, 1.0)
        kv = sel["kv.usage_gpu_ratio"] * sel["kv.blocks_total_gpu"] * BLOCK_SIZE
        per_running = float((kv / sel["queue.running_depth"].clip(lower=1)).mean())
        generated = 0.5 * out_mean * np.exp(OUTPUT_SIGMA**2)
        phases.append(
            {
                "phase": name,
                "windows": int(chosen.sum()),
                "duration_s": float(chosen.sum() * window_s),
                "rate_per_s": float(rates[chosen].mean()),
                "output_mean": float(out_mean),
                "prompt_mean": float(prompt_mean),
                "cached_mean": float(max(per_running - prompt_mean - generated, 0.0)),
                "steps_fraction": float(len(sel) / len(exp)),
            }
        )
    return phases


def phased_workload(
    phases: list[dict],
    *,
    seconds: float,
    warmup_s: float,
    rng: np.random.Generator,
) -> Workload:
    """Poisson arrivals phase after phase (``seconds`` in all, split as the trace's
    phase durations, plus ``warmup_s`` more of the first phase in front);
    log-normal output lengths, geometric uncached prompts (>= 1), cached prefixes at
    the phase's mean, rounded down to whole KV blocks."""
    total = sum(p["duration_s"] for p in phases)
    arrivals, prompts, outputs, cached = [], [], [], []
    t0 = 0.0
    for i, p in enumerate(phases):
        span = seconds * p["duration_s"] / total + (warmup_s if i == 0 else 0.0)
        n = rng.poisson(p["rate_per_s"] * span)
        a = t0 + np.sort(rng.uniform(0.0, span, n))
        mu = np.log(p["output_mean"] - 1.0) - 0.5 * OUTPUT_SIGMA**2
        o = 1.0 + np.round(np.exp(mu + OUTPUT_SIGMA * rng.standard_normal(n)))
        pr = rng.geometric(1.0 / p["prompt_mean"], n).astype(float)
        c = np.full(n, BLOCK_SIZE * np.floor(p["cached_mean"] / BLOCK_SIZE))
        o = np.minimum(o, MAX_MODEL_LEN - pr - c)
        arrivals.append(a * 1e6)
        prompts.append(pr)
        outputs.append(o)
        cached.append(c)
        t0 += span
    return make_workload(
        np.concatenate(arrivals),
        np.concatenate(prompts),
        np.concatenate(outputs),
        cached_tokens=np.concatenate(cached),
    )


def _q(x: np.ndarray) -> dict[str, float]:
    return {
        "median": float(np.median(x)),
        "p90": float(np.percentile(x, 90)),
        "mean": float(np.mean(x)),
        "n": int(x.size),
    }


def validate(
    exp: pd.DataFrame,
    factors: diffmodel.Factors,
    *,
    seconds: float,
    warmup_s: float,
    seed: int,
) -> dict[str, Any]:
    """Exact simulation of the trace's workload vs the trace's measured distributions.

    Simulated steps from ``warmup_s`` after the first arrival to the last arrival
    (steady serving, no drain) are compared with the trace's sampled steps:
    iteration time (consecutive ``step.id`` pairs) and running depth.
    """
    phases = trace_workload_spec(exp)
    w = phased_workload(
        phases, seconds=seconds, warmup_s=warmup_s, rng=np.random.default_rng(seed)
    )
    dep = diffmodel.deployment(MODEL, HARDWARE, TP)
    # Enough steps for the whole workload: the trace's median step is ~19 ms.
    num_steps = int((seconds + warmup_s) / 0.012) + 2000
    t = time.perf_counter()
    res = jax.jit(
        lambda w: simulate(w, dep, factors, Knobs(*TRACE_KNOBS), num_steps=num_steps)
    )(w)
    res = jax.block_until_ready(res)
    sim_seconds = time.perf_counter() - t
    tr = res.trace
    start = np.asarray(tr.start_us)
    a = np.asarray(w.arrival_us)
    keep = (
        np.asarray(tr.active) & (start >= a.min() + warmup_s * 1e6) & (start <= a.max())
    )
    sim_iter = np.asarray(tr.duration_us)[keep]
    sim_depth = np.asarray(tr.running)[keep]
    measured_iter = exp["iteration_time_us"].dropna().to_numpy(float)
    measured_depth = exp["queue.running_depth"].to_numpy(float)
    sim_prefill_share = float(np.mean(np.asarray(tr.stats.prefill_tokens)[keep] > 0))
    return {
        "phases": phases,
        "requests": int(w.size),
        "simulated_seconds": seconds,
        "warmup_seconds": warmup_s,
        "num_steps": num_steps,
        "finished_fraction": float(res.finished_fraction),
        "wall_seconds": sim_seconds,
        "iteration_time_us": {"measured": _q(measured_iter), "simulated": _q(sim_iter)},
        "running_depth": {
            "measured": _q(measured_depth),
            "simulated": _q(sim_depth),
        },
        "steps_with_prefill": {
            "measured": float(np.mean(exp["batch.prefill_tokens"] > 0)),
            "simulated": sim_prefill_share,
        },
        "sim_mean_ttft_ms": float(res.mean_ttft_us) / 1e3,
        "sim_mean_itl_ms": float(res.mean_itl_us) / 1e3,
    }


# ---------------------------------------------------------------------------- tuning


def poisson_workload(n: int, rate_per_s: float, rng: np.random.Generator) -> Workload:
    """``n`` Poisson arrivals; log-normal prompts (median 600) and outputs (median
    150), tokens."""
    arrivals = np.cumsum(rng.exponential(1e6 / rate_per_s, n))
    prompts = np.clip(np.round(rng.lognormal(np.log(600), 0.8, n)), 1, 3000)
    outputs = np.clip(np.round(rng.lognormal(np.log(150), 0.8, n)), 1, 1000)
    return make_workload(arrivals, prompts, outputs)


def tune(
    w: Workload,
    factors: diffmodel.Factors,
    *,
    num_steps: int,
    itl_weight: float,
    init: tuple[float, float],
    grad_iters: int,
    learning_rate: float,
    temperatures: tuple[float, float],
    grid_tokens: tuple[float, ...],
    grid_seqs: tuple[float, ...],
    smooth_iters: int,
    seed: int,
) -> dict[str, Any]:
    """Smoothed exact gradient, a grid of the exact simulator, and Adam through the
    relaxed simulator."""
    dep = diffmodel.deployment(MODEL, HARDWARE, TP)

    @jax.jit
    def exact(knobs):
        r = simulate(w, dep, factors, knobs, num_steps=num_steps)
        return serving_objective(r, itl_weight=itl_weight), r

    def relaxed(theta, tau, fa):
        knobs = Knobs(jnp.exp(theta[0]), jnp.exp(theta[1]))
        r = simulate(w, dep, fa, knobs, num_steps=num_steps, temperature=tau)
        return serving_objective(r, itl_weight=itl_weight)

    value_and_grad = jax.jit(jax.value_and_grad(relaxed, argnums=(0, 2)))

    def exact_objective(b, s):
        return float(exact(Knobs(b, s))[0])

    t = time.perf_counter()
    grid = []
    for b in grid_tokens:
        for s in grid_seqs:
            grid.append({"max_num_batched_tokens": b, "max_num_seqs": s})
            grid[-1]["objective_us"] = exact_objective(b, s)
    grid_seconds = time.perf_counter() - t
    best_grid = min(grid, key=lambda g: g["objective_us"])

    t = time.perf_counter()
    smoothed = tune_knobs(
        w,
        dep,
        factors,
        Knobs(*init),
        num_steps=num_steps,
        itl_weight=itl_weight,
        iterations=smooth_iters,
        seed=seed,
    )
    smooth_seconds = time.perf_counter() - t
    smooth_path = np.exp(np.asarray(smoothed.log_knobs))

    # The relaxed gradient in the budget against the exact simulator's slope, at
    # the start budget with seats to spare: a central difference of +-0.15 in log.
    b0, s_free = init[0], 128.0
    h = 0.15
    exact_slope = (
        np.log(exact_objective(b0 * np.exp(h), s_free))
        - np.log(exact_objective(b0 * np.exp(-h), s_free))
    ) / (2 * h)
    budget_check = {
        "knobs": [b0, s_free],
        "exact_dlog_objective_dlog_budget": float(exact_slope),
        "relaxed": [],
    }
    for tau in (0.2, 1.0):
        v, (g, _) = value_and_grad(jnp.log(jnp.asarray([b0, s_free])), tau, factors)
        budget_check["relaxed"].append(
            {"temperature": tau, "dlog_objective_dlog_budget": float(g[0] / v)}
        )

    t = time.perf_counter()
    theta = jnp.log(jnp.asarray(init, dtype=jnp.float64))
    opt = optax.adam(learning_rate)
    state = opt.init(theta)
    tau0, tau1 = temperatures
    history = []
    for i in range(grad_iters):
        tau = tau0 * (tau1 / tau0) ** (i / max(grad_iters - 1, 1))
        value, (g, g_factors) = value_and_grad(theta, tau, factors)
        history.append(
            {
                "iter": i,
                "temperature": tau,
                "relaxed_objective_us": float(value),
                "max_num_batched_tokens": float(jnp.exp(theta[0])),
                "max_num_seqs": float(jnp.exp(theta[1])),
                "grad_log_knobs": [float(x) for x in g],
            }
        )
        if i == 0:
            factor_grad = {k: float(v) for k, v in g_factors.as_dict().items()}
        updates, state = opt.update(g, state)
        theta = optax.apply_updates(theta, updates)
    b, s = (float(np.round(x)) for x in np.exp(np.asarray(theta)))
    relaxed_objective = exact_objective(b, s)
    relaxed_seconds = time.perf_counter() - t
    start_objective = exact_objective(*init)
    default_objective = exact_objective(*TRACE_KNOBS)
    return {
        "itl_weight": itl_weight,
        "grad_objective": float(smoothed.objective_us),
        "grid_objective": best_grid["objective_us"],
        "grad_evals": smoothed.evaluations,
        "grad_evals_note": "exact simulations: 4 per gradient step (two antithetic "
        "pairs), plus one at the final knobs",
        "grid_evals": len(grid),
        "grad_knobs": {
            "max_num_batched_tokens": float(smoothed.knobs.max_num_batched_tokens),
            "max_num_seqs": float(smoothed.knobs.max_num_seqs),
        },
        "grad_path": [[float(x) for x in k] for k in smooth_path],
        "grad_smoothed_gradients": [
            [float(x) for x in g] for g in np.asarray(smoothed.gradients)
        ],
        "grad_seconds": smooth_seconds,
        "relaxed_objective": relaxed_objective,
        "relaxed_evals": grad_iters + 1,
        "relaxed_evals_note": "relaxed value+gradient evaluations, plus one exact "
        "evaluation at the final (rounded) knobs",
        "relaxed_knobs": {"max_num_batched_tokens": b, "max_num_seqs": s},
        "relaxed_seconds": relaxed_seconds,
        "budget_gradient_check": budget_check,
        "grid_knobs": {
            "max_num_batched_tokens": best_grid["max_num_batched_tokens"],
            "max_num_seqs": best_grid["max_num_seqs"],
        },
        "start_knobs": list(init),
        "start_objective": start_objective,
        "vllm_default_objective": default_objective,
        "grid_seconds": grid_seconds,
        "objective_grad_wrt_factors_at_start": factor_grad,
        "history": history,
        "grid": grid,
    }


# ------------------------------------------------------------------------------ main


def main(
    *,
    out: str | pathlib.Path = "results/scheduler",
    data_dir: str | pathlib.Path | None = None,
    experiment: str = EXPERIMENT,
    seed: int = 0,
    validation_seconds: float = 150.0,
    warmup_seconds: float = 20.0,
    n_requests: int = 400,
    rate_per_s: float = 12.0,
    num_steps: int = 2600,
    itl_weight: float = 10.0,
    smooth_iters: int = 3,
    grad_iters: int = 30,
    learning_rate: float = 0.15,
    temperatures: tuple[float, float] = (1.0, 0.2),
    init: tuple[float, float] = (512.0, 16.0),
) -> dict[str, Any]:
    """Fit, validate and tune; write ``<out>/scheduler.json`` and return its content.

    Args:
        out: output folder.
        data_dir: the shared data folder (default:
            :func:`diffmodel.data.default_data_dir`).
        experiment: the trace to fit and validate on.
        seed: workload seed.
        validation_seconds, warmup_seconds: simulated time of the trace's workload,
            and the start-up period left out of the comparison, s.
        n_requests, rate_per_s, num_steps: the tuning workload (Poisson arrivals,
            requests/s) and the scan length.
        itl_weight: weight of mean ITL against mean TTFT in the objective.
        smooth_iters: gradient steps of :func:`tune_knobs` (4 simulations each);
            ``seed`` also seeds its directions.
        grad_iters, learning_rate, temperatures: the relaxed comparison: Adam steps
            on the log knobs, its step size, and the temperature annealed
            geometrically from the first to the second value (tokens).
        init: starting ``(max_num_batched_tokens, max_num_seqs)`` of both descents.
    """
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = pathlib.Path(data_dir) if data_dir else diffmodel.data.default_data_dir()
    frame = add_targets(load_steps(data / "stepml" / "steps.parquet"))
    exp = frame[frame["experiment_id"] == experiment].reset_index(drop=True)
    if exp.empty:
        raise ValueError(f"experiment {experiment!r} is not in the step table")

    t = time.perf_counter()
    factors, fit_info = fit_factors(exp)
    fit_info["seconds"] = time.perf_counter() - t
    fit_info["factors"] = {k: float(v) for k, v in factors.as_dict().items()}
    print(
        f"factors ({fit_info['method']}, {fit_info['rows']} pairs, "
        f"loss {fit_info['loss']:.4f}, {fit_info['seconds']:.1f} s):"
    )
    for k, v in fit_info["factors"].items():
        print(f"  {k:22s} {v:10.4g}")

    val = validate(
        exp, factors, seconds=validation_seconds, warmup_s=warmup_seconds, seed=seed
    )
    print(
        f"\nvalidation on {experiment} ({val['requests']} requests, "
        f"{val['wall_seconds']:.1f} s)"
    )
    for p in val["phases"]:
        print(
            f"  phase {p['phase']}: {p['rate_per_s']:.2f} req/s, output "
            f"{p['output_mean']:.0f}, prompt {p['prompt_mean']:.1f} + cached "
            f"{p['cached_mean']:.0f} tokens"
        )
    print(f"  {'':22s} {'measured':>18s} {'simulated':>18s}")
    for key in ("iteration_time_us", "running_depth"):
        m, s = val[key]["measured"], val[key]["simulated"]
        print(f"  {key + ' median':22s} {m['median']:18.1f} {s['median']:18.1f}")
        print(f"  {key + ' p90':22s} {m['p90']:18.1f} {s['p90']:18.1f}")
    sp = val["steps_with_prefill"]
    print(
        f"  {'steps with prefill':22s} {sp['measured']:18.3f} {sp['simulated']:18.3f}"
    )

    w = poisson_workload(n_requests, rate_per_s, np.random.default_rng(seed))
    tuned = tune(
        w,
        factors,
        num_steps=num_steps,
        itl_weight=itl_weight,
        init=init,
        grad_iters=grad_iters,
        learning_rate=learning_rate,
        temperatures=temperatures,
        grid_tokens=(256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0),
        grid_seqs=(8.0, 16.0, 32.0, 64.0, 128.0, 256.0),
        smooth_iters=smooth_iters,
        seed=seed,
    )
    print(
        f"\ntuning ({n_requests} requests at {rate_per_s} req/s, objective mean "
        f"TTFT + {itl_weight} x mean ITL, exact simulator, ms)"
    )
    print(
        f"  {'method':10s} {'tokens':>8s} {'seqs':>6s} {'objective':>10s} "
        f"{'evals':>6s} {'wall s':>7s}"
    )
    for name, k, o, n, sec in (
        (
            "start",
            {"max_num_batched_tokens": init[0], "max_num_seqs": init[1]},
            tuned["start_objective"],
            1,
            0.0,
        ),
        (
            "gradient",
            tuned["grad_knobs"],
            tuned["grad_objective"],
            tuned["grad_evals"],
            tuned["grad_seconds"],
        ),
        (
            "grid",
            tuned["grid_knobs"],
            tuned["grid_objective"],
            tuned["grid_evals"],
            tuned["grid_seconds"],
        ),
        (
            "relaxed",
            tuned["relaxed_knobs"],
            tuned["relaxed_objective"],
            tuned["relaxed_evals"],
            tuned["relaxed_seconds"],
        ),
    ):
        print(
            f"  {name:10s} {k['max_num_batched_tokens']:8.0f} "
            f"{k['max_num_seqs']:6.0f} {o / 1e3:10.1f} {n:6d} {sec:7.1f}"
        )
    print(f"  vLLM default (2048, 128): {tuned['vllm_default_objective'] / 1e3:.1f}")
    bc = tuned["budget_gradient_check"]
    print(
        f"  d log objective / d log budget at {bc['knobs']}: exact "
        f"{bc['exact_dlog_objective_dlog_budget']:+.3f}, relaxed "
        + ", ".join(
            f"{r['dlog_objective_dlog_budget']:+.3f} (T={r['temperature']})"
            for r in bc["relaxed"]
        )
    )

    result = {
        "deployment": {"model": MODEL, "hardware": HARDWARE, "tp": TP},
        "grad_objective": tuned["grad_objective"],
        "grid_objective": tuned["grid_objective"],
        "grad_evals": tuned["grad_evals"],
        "grid_evals": tuned["grid_evals"],
        "fit": fit_info,
        "validation": val,
        "tuning": tuned,
    }
    path = out / "scheduler.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {path}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/scheduler", help="output folder")
    parser.add_argument("--data-dir", default=None, help="shared data folder")
    parser.add_argument("--experiment", default=EXPERIMENT, help="trace to use")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-requests", type=int, default=400)
    parser.add_argument("--rate", type=float, default=12.0, help="requests/s")
    parser.add_argument("--itl-weight", type=float, default=10.0)
    parser.add_argument("--smooth-iters", type=int, default=3)
    parser.add_argument("--grad-iters", type=int, default=30)
    args = parser.parse_args()
    main(
        out=args.out,
        data_dir=args.data_dir,
        experiment=args.experiment,
        seed=args.seed,
        n_requests=args.n_requests,
        rate_per_s=args.rate,
        itl_weight=args.itl_weight,
        smooth_iters=args.smooth_iters,
        grad_iters=args.grad_iters,
    )
