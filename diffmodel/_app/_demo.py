"""The demo: a synthetic trace drawn from the roofline with known factors, fitted back.

No data is needed. Steps of several deployments on H100 are drawn (decode-heavy and
prefill-heavy), their step times computed with :data:`TRUE_FACTORS` and multiplied by
log-normal noise; a global factor set is fitted to them from the physical priors and
compared with the truth.
"""

import pathlib
import sys
import time
from collections.abc import Callable

import numpy as np
import pandas as pd

from .._app._plots import diagnostic_figure, parity_plot, save_figure
from .._fitting._fit import FitResult, fit
from .._fitting._io import save_factors
from .._metrics import mape
from .._model._arch import architecture
from .._model._factors import FACTOR_NAMES, FACTOR_SPECS, Factors, default_factors
from .._model._roofline import COMPONENTS
from .._predict import predict

DEMO_DEPLOYMENTS: tuple[tuple[str, str, int], ...] = (
    ("llama-2-70b", "h100-sxm", 4),
    ("codellama-34b", "h100-sxm", 2),
    ("llama-3.1-8b", "h100-sxm", 1),
    ("llama-3.1-8b", "h100-sxm", 2),
)
"""``(model, hardware, tp)`` of the synthetic trace. Overheads that are constant per
step (per step, per layer, per all-reduce) are told apart only across deployments:
the 8B model at TP1 and TP2 separates the all-reduce latency from the per-layer
overhead, the different depths (80, 48, 32 layers) the per-layer from the per-step
one."""

TRUE_FACTORS: dict[str, float] = {
    "gemm_flops": 0.62,
    "mem_bw": 0.85,
    "attn_flops": 0.42,
    "attn_bw": 0.60,
    "comm_bw": 0.55,
    "comm_latency_us": 12.0,
    "step_overhead_us": 1500.0,
    "layer_overhead_us": 15.0,
    "request_overhead_us": 15.0,
}
"""The factors the synthetic trace is drawn with (units in ``FACTOR_SPECS``); each
differs from its physical prior so that the fit has somewhere to go."""

TARGET = "step_time_us"


def synthetic_trace(
    *,
    steps_per_deployment: int = 250,
    noise: float = 0.05,
    seed: int = 0,
    factors: dict[str, float] | None = None,
) -> pd.DataFrame:
    """Steps of :data:`DEMO_DEPLOYMENTS` with roofline times and noisy measurements.

    Per deployment, 60 % decode-heavy steps (1-256 decoding requests, log-uniform,
    100-4000 context tokens each; sometimes one prefill chunk under 512 tokens) and
    40 % prefill-heavy ones (1-4 prompts of 512-8192 tokens in total, half with up to
    3000 cached tokens each, and 0-16 decodes).

    Returns:
        One row per step with the canonical columns of :func:`diffmodel.predict`,
        ``model``, ``hardware``, ``tp``, ``experiment_id`` and ``step.id`` (so it can
        be split in time), ``kind`` (``decode-heavy`` / ``prefill-heavy``),
        ``true_us`` (roofline at ``factors``, default :data:`TRUE_FACTORS`) and
        ``step_time_us`` = ``true_us`` times log-normal noise of log-sd ``noise``,
        all times in microseconds.
    """
    if steps_per_deployment < 1:
        raise ValueError(
            f"steps_per_deployment must be >= 1, got {steps_per_deployment}"
        )
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0 (log-sd), got {noise}")
    rng = np.random.default_rng(seed)
    n = steps_per_deployment
    parts = []
    for model, hw, tp in DEMO_DEPLOYMENTS:
        decode_heavy = rng.random(n) < 0.6
        n_dec = np.where(
            decode_heavy,
            np.round(np.exp(rng.uniform(0, np.log(256), n))),
            rng.integers(0, 17, n),
        ).astype(np.int64)
        n_pf = np.where(
            decode_heavy, rng.random(n) < 0.2, rng.integers(1, 5, n)
        ).astype(np.int64)
        p = np.where(decode_heavy, rng.integers(1, 512, n), rng.integers(512, 8193, n))
        p = np.where(n_pf > 0, np.maximum(p, n_pf), 0).astype(np.int64)
        cached = (rng.random(n) < 0.5) * n_pf * rng.uniform(0, 3000, n)
        parts.append(
            pd.DataFrame(
                {
                    "experiment_id": f"demo-{model}-tp{tp}",
                    "step.id": np.arange(n),
                    "model": model,
                    "hardware": hw,
                    "tp": tp,
                    "kind": np.where(decode_heavy, "decode-heavy", "prefill-heavy"),
                    "prefill_tokens": p,
                    "decode_tokens": n_dec,
                    "num_prefill_reqs": n_pf,
                    "num_decode_reqs": n_dec,
                    "kv_tokens": np.round(n_dec * rng.uniform(100, 4000, n)),
                    "prefill_context_tokens": np.round(cached),
                }
            )
        )
    frame = pd.concat(parts, ignore_index=True)
    true = predict(frame, factors=Factors(**(factors or TRUE_FACTORS)))
    frame["true_us"] = true["predicted_us"].to_numpy()
    frame[TARGET] = frame["true_us"] * rng.lognormal(0.0, noise, len(frame))
    return frame


def _fixed_cost(f: dict[str, float], model: str, tp: int) -> float:
    """Time per step that does not depend on the batch, us (see the overhead and
    all-reduce terms of :func:`diffmodel.step_time`)."""
    layers = float(architecture(model).n_layers)
    allreduce = 2 * layers * f["comm_latency_us"] if tp > 1 else 0.0
    return f["step_overhead_us"] + layers * f["layer_overhead_us"] + allreduce


def _factor_lines(true: dict[str, float], fitted: dict[str, float]) -> list[str]:
    prior = {n: float(v) for n, v in default_factors().as_dict().items()}
    lines = [
        f"{'factor':<20} {'unit':<26} {'prior':>9} {'true':>9} {'recovered':>10} "
        f"{'error':>8}"
    ]
    for n in FACTOR_NAMES:
        err = (fitted[n] - true[n]) / true[n] * 100
        lines.append(
            f"{n:<20} {FACTOR_SPECS[n][1]:<26} {prior[n]:>9.4g} {true[n]:>9.4g} "
            f"{fitted[n]:>10.4g} {err:>+7.1f}%"
        )
    return lines


def _example_step(result: FitResult, true: dict[str, float]) -> list[str]:
    model, hw, tp = DEMO_DEPLOYMENTS[0]
    step = pd.DataFrame(
        {
            "prefill_tokens": [2048],
            "decode_tokens": [48],
            "num_prefill_reqs": [1],
            "num_decode_reqs": [48],
            "kv_tokens": [48 * 1500],
            "prefill_context_tokens": [0],
        }
    )
    fitted = predict(step, model=model, hardware=hw, tp=tp, factors=result)
    real = predict(step, model=model, hardware=hw, tp=tp, factors=Factors(**true))
    total = float(fitted["predicted_us"].iloc[0])
    lines = [
        f"example step: {model} TP{tp} on {hw}, one 2048-token prompt chunk and 48 "
        "decodes over 72,000 context tokens",
        f"  {'component':<18} {'fitted (us)':>12} {'share':>7} {'true (us)':>11}",
    ]
    for c in COMPONENTS:
        v = float(fitted[f"{c}_us"].iloc[0])
        t = float(real[f"{c}_us"].iloc[0])
        lines.append(f"  {c:<18} {v:>12,.0f} {v / total:>7.1%} {t:>11,.0f}")
    t_total = float(real["predicted_us"].iloc[0])
    lines.append(f"  {'total':<18} {total:>12,.0f} {1:>7.0%} {t_total:>11,.0f}")
    return lines


def run_demo(
    *,
    out: str | pathlib.Path,
    seed: int = 0,
    rows_per_deployment: int = 250,
    noise: float = 0.05,
    solver: str = "lbfgs",
    max_iterations: int = 500,
    progress_every: int = 25,
    echo: Callable[[str], None] = print,
) -> FitResult:
    """Draw the synthetic trace, fit global factors back, report and plot.

    Writes ``demo_trace.csv`` (the trace), ``demo_factors.json`` (the fit),
    ``demo_parity.png`` and ``demo_diagnostics.png`` under ``out`` (created if
    needed); prints the true against the recovered factors, the fixed cost per step
    of each deployment, an example step's breakdown and the accuracy through
    ``echo``. Progress lines go to stderr.

    Returns:
        The :class:`FitResult`.
    """
    out = pathlib.Path(out)
    start = time.perf_counter()
    frame = synthetic_trace(
        steps_per_deployment=rows_per_deployment, noise=noise, seed=seed
    )
    deps = ", ".join(f"{m} TP{t}" for m, _, t in DEMO_DEPLOYMENTS)
    counts = frame["kind"].value_counts()
    echo(
        f"synthetic trace: {len(frame)} steps of {deps} on H100-SXM "
        f"({counts.get('decode-heavy', 0)} decode-heavy, "
        f"{counts.get('prefill-heavy', 0)} prefill-heavy), log-normal noise "
        f"sigma {noise:g}, seed {seed}"
    )
    echo(f"fitting 9 global factors from the physical priors with {solver}")

    def tick(step, loss):
        print(
            f"fit: iteration {int(step):>4d}  loss {float(loss):.6g}", file=sys.stderr
        )

    result = fit(
        frame,
        target=TARGET,
        factors="global",
        solver=solver,
        max_steps=max_iterations,
        callback=tick if progress_every > 0 else None,
        callback_every=max(progress_every, 1),
    )
    fitted = {n: float(v) for n, v in result.factors_for(("global",)).as_dict().items()}
    status = result.status
    echo(
        f"fit: {result.n_steps} iterations, {result.wall_seconds:.1f} s with "
        f"compilation ({status}); loss {result.loss:.5f} vs noise floor sigma^2 = "
        f"{noise**2:.5f}"
    )
    echo("")
    echo("\n".join(_factor_lines(TRUE_FACTORS, fitted)))
    echo("")
    echo(
        "fixed cost per step, us (step + layers x layer + 2 layers x all-reduce "
        "latency; these overheads trade off against each other, and their sum is "
        "what the data pins down best):"
    )
    for model, _, tp in DEMO_DEPLOYMENTS:
        t, f = _fixed_cost(TRUE_FACTORS, model, tp), _fixed_cost(fitted, model, tp)
        echo(f"  {model} TP{tp}: true {t:,.0f}, recovered {f:,.0f} ({f / t - 1:+.1%})")
    echo("")
    echo("\n".join(_example_step(result, TRUE_FACTORS)))
    pred = predict(frame, factors=result)
    pred["deployment"] = [
        f"{m}/{h}/tp{t}"
        for m, h, t in zip(pred["model"], pred["hardware"], pred["tp"], strict=True)
    ]
    echo("")
    echo(
        f"accuracy on the noisy trace: MAPE {mape(pred[TARGET], pred.predicted_us):.2f}"
        f" % fitted, {mape(pred[TARGET], pred.true_us):.2f} % with the true factors "
        "(the noise alone)"
    )
    parity = parity_plot(
        pred[TARGET],
        pred["predicted_us"],
        groups=pred["deployment"],
        title="demo, fitted global factors",
    )
    diag = diagnostic_figure(
        pred, actual=TARGET, by="deployment", title="demo, fitted global factors"
    )
    # Written last, once everything is computed: a failed run leaves no files.
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "demo_trace.csv", index=False)
    save_factors(result, out / "demo_factors.json")
    save_figure(parity, out / "demo_parity.png")
    save_figure(diag, out / "demo_diagnostics.png")
    echo(
        f"wrote {out / 'demo_trace.csv'}, {out / 'demo_factors.json'}, "
        f"{out / 'demo_parity.png'}, {out / 'demo_diagnostics.png'} "
        f"({time.perf_counter() - start:.1f} s in all)"
    )
    echo(
        f"next: diffmodel evaluate --data {out / 'demo_trace.csv'} --factors "
        f"{out / 'demo_factors.json'} --target {TARGET}"
    )
    return result
