"""Throughput of bulk step-time prediction, against a NumPy reference, XGBoost and the
memory-bandwidth limit of the machine, all measured in one run on the same inputs.

Usage: ``python experiments/throughput.py [--n-steps N] [--repeats R] [--json PATH]
[--markdown PATH]``. Progress goes to stderr; the table to stdout.
"""

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

import diffmodel as dm
from diffmodel._app import _bench_fit
from diffmodel._app._numpy_reference import numpy_step_time, numpy_tables
from diffmodel._bulk._bulk import predict_requests, predict_steps
from diffmodel._bulk._feeder import _ALIGN_BYTES, _chunk, _stats_kernel
from diffmodel._bulk._rewrite import _group_tables, _table_plan, step_time_fast
from diffmodel.baselines._baselines import _FIXED_PARAMS, study_features

DEPLOYMENTS = (("llama-2-70b", 4), ("codellama-34b", 2), ("mixtral-8x7b", 2))


def _log(msg: str) -> None:
    print(f"[throughput] {msg}", file=sys.stderr, flush=True)


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up: compilation, page faults, caches
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _interleaved_times(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each of ``fns``, timed in ``repeats`` interleaved rounds.

    Each round times every function once, so the methods whose rates are compared
    see the same machine (a 2-core VM's speed drifts by tens of percent over a
    minute); each is warmed up once first.
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats):
        _log(f"round {r + 1}/{repeats}")
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def make_steps(n: int, seed: int = 0) -> tuple[dm.BatchStats, np.ndarray]:
    """A realistic random mix of ``n`` steps (float32 statistics, int32 groups)."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    n_dec = rng.integers(0, 257, n).astype(f32)
    n_pf = np.where(rng.random(n) < 0.3, rng.integers(1, 5, n), 0).astype(f32)
    p = np.where(n_pf > 0, rng.integers(1, 8193, n), 0).astype(f32)
    k_pf = (n_pf * rng.uniform(0, 2000, n)).astype(f32)
    safe = np.where(n_pf > 0, n_pf, 1)
    a_pf = np.where(n_pf > 0, p * (k_pf + 0.5 * p) / safe, 0).astype(f32)
    k_dec = (n_dec * rng.uniform(200, 4000, n)).astype(f32)
    stats = dm.BatchStats(
        prefill_tokens=p,
        decode_tokens=n_dec.copy(),
        num_prefill=n_pf,
        num_decode=n_dec,
        kv_decode=k_dec,
        attn_prefill=a_pf,
        kv_prefill=k_pf,
    )
    group = rng.integers(0, len(DEPLOYMENTS), n).astype(np.int32)
    return stats, group


def make_requests(steps: int, width: int, seed: int = 1):
    """Padded per-request batches: ``[steps, width]`` new/context tokens and mask."""
    rng = np.random.default_rng(seed)
    real = rng.integers(1, width + 1, steps)
    mask = np.arange(width)[None, :] < real[:, None]
    decode = rng.random((steps, width)) < 0.95
    new = np.where(decode, 1, rng.integers(1, 1024, (steps, width))).astype(np.float32)
    ctx = rng.integers(1, 4000, (steps, width)).astype(np.float32)
    new = np.where(mask, new, np.float32(0))
    ctx = np.where(mask, ctx, np.float32(0))
    return new, ctx, mask


def baseline_features(cols, group, rows) -> np.ndarray:
    """The XGBoost baseline's input for ``rows`` steps: ``study_features``, float64.

    The real baseline (``diffmodel.XGBoostBaseline``) reads a trace frame; the KV
    gauge columns it also needs are derived here from the statistics (KV tokens in
    16-token blocks of a 40,000-block cache), the queue depth is the batch size.
    """
    p, dtok, n_pf, n_dec, k_dec, _, k_pf = (np.asarray(c[rows], float) for c in cols)
    g = group[rows]
    total = np.full(p.shape, 40_000.0)
    used = np.minimum(np.ceil((k_dec + k_pf) / 16.0), total)
    frame = pd.DataFrame(
        {
            "batch.prefill_tokens": p,
            "batch.decode_tokens": dtok,
            "batch.scheduled_tokens": p + dtok,
            "batch.num_prefill_reqs": n_pf,
            "batch.num_decode_reqs": n_dec,
            "kv.usage_gpu_ratio": used / total,
            "kv.blocks_total_gpu": total,
            "kv.blocks_free_gpu": total - used,
            "queue.running_depth": n_pf + n_dec,
            "model": np.asarray([m for m, _ in DEPLOYMENTS])[g],
            "tp": np.asarray([t for _, t in DEPLOYMENTS], float)[g],
        }
    )
    return study_features(frame).to_numpy()


def stream_bound(cols, group, out, block: int = 1 << 15) -> None:
    """Read every input array once and write one output: a sum, in cache blocks."""
    for s in range(0, out.shape[0], block):
        o = out[s : s + block]
        np.add(cols[0][s : s + block], cols[1][s : s + block], out=o)
        for c in cols[2:]:
            np.add(o, c[s : s + block], out=o)
        np.add(o, group[s : s + block], out=o, casting="unsafe")


def aiconfigurator_rate(
    stats: dm.BatchStats, group: np.ndarray, n: int, repeats: int
) -> dict:
    """aiconfigurator-core's per-step estimate (its SDK's ``mixed_step_latency`` /
    ``decode_step_latency``, via :func:`diffmodel.baselines.aiconfigurator_step_us`)
    timed on the first ``n`` steps of the dense deployments (it cannot express the
    MoE one): steps/s, median of ``repeats`` after a warm-up call that builds its
    engines. ``aic_steps_per_s`` is None without the ``aic`` extra."""
    from ..baselines import aiconfigurator_step_us
    from ..baselines._aiconfigurator import _need_aic

    try:
        _need_aic()
    except ValueError as err:
        _log(f"aiconfigurator: skipped ({err})")
        return {"aic_steps_per_s": None, "aic_timed_steps": 0}
    dense = np.flatnonzero(
        np.isin(
            group, [i for i, (m, _) in enumerate(DEPLOYMENTS) if m != "mixtral-8x7b"]
        )
    )[:n]
    frame = pd.DataFrame(
        {
            "prefill_tokens": np.asarray(stats.prefill_tokens)[dense],
            "decode_tokens": np.asarray(stats.decode_tokens)[dense],
            "num_prefill_reqs": np.asarray(stats.num_prefill)[dense],
            "num_decode_reqs": np.asarray(stats.num_decode)[dense],
            "kv_tokens": np.asarray(stats.kv_decode)[dense],
            "prefill_context_tokens": np.asarray(stats.kv_prefill)[dense],
            "model": [DEPLOYMENTS[g][0] for g in group[dense]],
            "tp": [DEPLOYMENTS[g][1] for g in group[dense]],
            "hardware": "h100-sxm",
        }
    )
    _log(f"aiconfigurator-core on {len(frame)} steps (engines built first)")
    aiconfigurator_step_us(frame.head(2 * len(DEPLOYMENTS)))  # build the engines
    # Every call asks afresh (its cache lives within one call).
    t = _median_time(lambda: aiconfigurator_step_us(frame), repeats)
    return {"aic_steps_per_s": len(frame) / t, "aic_timed_steps": len(frame)}


def describe_device() -> str:
    d = jax.devices()
    cpu = platform.processor() or platform.machine()
    return (
        f"{len(d)} x {d[0].device_kind} ({d[0].platform}); "
        f"{os.cpu_count()} CPU cores, {cpu}"
    )


def main(
    *,
    n_steps: int = 10_000_000,
    repeats: int = 5,
    json_path: str | None = None,
    markdown_path: str | None = None,
    request_steps: int = 200_000,
    request_width: int = 256,
    numpy_steps: int = 2_000_000,
    xgb_rows: int = 1_000_000,
    grad_steps: int = 1_000_000,
    chunk_size: int = 2**18,
    aic_steps: int = 400,
    scale: bool = False,
    synthetic_steps: int = 10_000_000,
) -> dict:
    """Measure and print steps/s of every method; return (and optionally save) them.

    Args:
        n_steps: steps of the aggregate diffmodel run and of the bandwidth bound.
        repeats: timed repeats (median reported) after one warm-up.
        json_path: write the figures as JSON here.
        markdown_path: write the proposed README section (paragraph + table) here.
        request_steps, request_width: the per-request input, ``[steps, width]``.
        numpy_steps: steps the NumPy reference is timed on (rate scaled).
        xgb_rows: rows XGBoost's ``predict`` is timed on (rate scaled).
        grad_steps: steps of the value-and-gradient evaluation.
        chunk_size: diffmodel's steps per compiled call.
        aic_steps: steps of the dense deployments aiconfigurator-core is timed on
            (rate scaled; skipped without the ``aic`` extra).
        scale: also time the loss and gradient at 1e4 to 1e7 rows and on one and
            two (forced host) devices, and fit ``synthetic_steps`` synthetic steps
            of 20 deployments (wall time, peak memory, recovered factors); ~2 min.
    """
    import xgboost  # deferred: only this benchmark needs it

    dtype = np.float32
    deps = dm.stack_deployments(
        [dm.deployment(m, "h100-sxm", tp) for m, tp in DEPLOYMENTS]
    )
    fac = dm.default_factors()
    _log(f"device: {describe_device()}")
    _log(f"generating {n_steps:,} steps")
    stats, group = make_steps(n_steps)
    cols = [getattr(stats, f) for f in stats.__dataclass_fields__]
    res: dict = {"n_steps": n_steps, "device": describe_device(), "dtype": "float32"}

    # Compile time: tracing and XLA compilation of the per-chunk function.
    dep32 = jax.tree.map(lambda x: jnp.asarray(x, dtype), deps)
    fac32 = jax.tree.map(lambda x: jnp.asarray(x, dtype), fac)
    t0 = time.perf_counter()
    tables = _group_tables(dep32, fac32, components=False, dtype=np.dtype(dtype))
    # What predict_steps compiles: 7 statistics and the group as flat windows.
    pad = _ALIGN_BYTES // 4
    windows = (*(jnp.zeros(chunk_size + pad, dtype) for _ in cols),)
    windows += (jnp.zeros(chunk_size + pad, jnp.int32),)
    distinct, plan = _table_plan(tables)
    _chunk.lower(
        windows,
        np.zeros(len(windows), np.int32),
        distinct,
        dep32,
        fac32,
        kernel=_stats_kernel,
        plan=plan,
        shapes=((chunk_size,),) * len(windows),
        components=False,
    ).compile()
    res["compile_s"] = time.perf_counter() - t0
    _log(f"compile: {res['compile_s']:.2f} s")

    # Like the bound below, diffmodel writes into one output array reused across
    # calls; a new array per call (page faults on 40 MB) is timed as its own row.
    pred = np.empty(n_steps, dtype)

    def run_diffmodel():
        predict_steps(stats, deps, group, fac, chunk_size=chunk_size, out=pred)

    def run_diffmodel_new_array():
        predict_steps(stats, deps, group, fac, chunk_size=chunk_size)

    _log("diffmodel aggregate (first call, for the NumPy check and XGBoost's labels)")
    run_diffmodel()

    buf = np.empty(n_steps, dtype)

    def run_stream():
        stream_bound(cols, group, buf)

    dep_np, fac_np = numpy_tables(deps, fac, dtype)
    m = min(numpy_steps, n_steps)
    check = numpy_step_time([c[:20_000] for c in cols], group[:20_000], dep_np, fac_np)
    np.testing.assert_allclose(check, pred[:20_000], rtol=1e-4)  # once, not timed
    block = 1 << 16

    def run_numpy():
        o = np.empty(m, dtype)
        for s in range(0, m, block):
            sl = slice(s, min(s + block, m))
            o[sl] = numpy_step_time([c[sl] for c in cols], group[sl], dep_np, fac_np)

    _log("fitting XGBoost (the study baseline's 30 features, float64)")
    rng = np.random.default_rng(2)
    train = rng.choice(n_steps, size=min(20_000, n_steps), replace=False)
    rows = min(xgb_rows, n_steps)
    model = xgboost.XGBRegressor(
        **_FIXED_PARAMS,
        max_depth=6,
        n_estimators=300,
        learning_rate=0.1,
        n_jobs=2,
        random_state=0,
    )
    model.fit(baseline_features(cols, group, train), np.log(pred[train]))
    # Feature engineering is not timed: only predict on ready features.
    x_pred = baseline_features(cols, group, slice(0, rows))

    _log(
        "timing diffmodel, the bandwidth bound, NumPy and XGBoost in interleaved "
        f"rounds ({repeats})"
    )
    times = _interleaved_times(
        {
            "diffmodel": run_diffmodel,
            "diffmodel_new_array": run_diffmodel_new_array,
            "stream": run_stream,
            "numpy": run_numpy,
            "xgboost": lambda: model.predict(x_pred),
        },
        repeats,
    )
    per_call = {"diffmodel": n_steps, "diffmodel_new_array": n_steps}
    per_call.update(stream=n_steps, numpy=m, xgboost=rows)
    rates = {k: per_call[k] / np.asarray(t) for k, t in times.items()}
    res["steps_per_s"] = float(np.median(rates["diffmodel"]))
    res["new_array_steps_per_s"] = float(np.median(rates["diffmodel_new_array"]))
    res["stream_steps_per_s"] = float(np.median(rates["stream"]))
    res["stream_bytes_per_s"] = res["stream_steps_per_s"] * (4 * len(cols) + 4 + 4)
    res["numpy_steps_per_s"] = float(np.median(rates["numpy"]))
    res["numpy_timed_steps"] = m
    res["xgboost_steps_per_s"] = float(np.median(rates["xgboost"]))
    res["xgboost_timed_rows"] = rows
    res["repeats"] = repeats
    for k in ("stream", "numpy", "xgboost"):
        per_round = rates["diffmodel"] / rates[k]
        res[f"ratio_{k}_rounds"] = [float(x) for x in per_round]

    res.update(aiconfigurator_rate(stats, group, aic_steps, repeats=min(repeats, 3)))
    if res["aic_steps_per_s"]:
        res["ratio_aic"] = res["steps_per_s"] / res["aic_steps_per_s"]

    _log(f"per-request batches: {request_steps:,} steps x {request_width} slots")
    new, ctx, mask = make_requests(request_steps, request_width)
    rgroup = group[:request_steps]
    t = _median_time(
        lambda: predict_requests(new, ctx, mask, deps, rgroup, fac), repeats
    )
    res["request_steps_per_s"] = request_steps / t
    res["requests_per_s"] = float(mask.sum()) / t
    res["request_slots_per_s"] = mask.size / t

    # A simulator's call: one small batch of steps at a time, same deployments.
    small = jax.tree.map(lambda c: c[:16], stats)
    small_out = np.empty(16, dtype)
    predict_steps(small, deps, group[:16], fac, out=small_out)
    t = _median_time(
        lambda: predict_steps(small, deps, group[:16], fac, out=small_out), 50
    )
    res["small_call_us"] = t * 1e6

    _log(f"value and gradient over {grad_steps:,} steps")
    gs = min(grad_steps, n_steps)
    st = jax.tree.map(lambda x: jnp.asarray(x[:gs]), stats)
    gg = jnp.asarray(group[:gs])
    actual = jnp.asarray(pred[:gs] * rng.lognormal(0, 0.2, gs).astype(dtype))

    @jax.jit
    def value_and_grad(f):
        def loss(f):
            p_ = step_time_fast(st, dep32, gg, f)
            return jnp.mean((jnp.log(p_) - jnp.log(actual)) ** 2)

        return jax.value_and_grad(loss)(f)

    t = _median_time(lambda: jax.block_until_ready(value_and_grad(fac32)), repeats)
    res["grad_steps_per_s"] = gs / t

    _log("fitting: fresh-process fit times, scipy, bulk loss + gradient")
    res.update(_bench_fit.measure(grad_steps=gs))
    if scale:
        _log("fitting: loss + gradient by rows and devices (fresh processes)")
        res["scaling"] = _bench_fit.scaling()
        _log(f"fitting: {synthetic_steps:,} synthetic steps of 20 deployments")
        res["synthetic_fit"] = _bench_fit.synthetic_fit(synthetic_steps)

    res["ratio_stream"] = res["steps_per_s"] / res["stream_steps_per_s"]
    res["ratio_numpy"] = res["steps_per_s"] / res["numpy_steps_per_s"]
    res["ratio_xgboost"] = res["steps_per_s"] / res["xgboost_steps_per_s"]
    table = markdown_table(res)
    print(table)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(res, fh, indent=2)
    if markdown_path:
        with open(markdown_path, "w") as fh:
            fh.write(readme_section(res, table))
    return res


def _spread(r: dict, key: str, fmt: str, unit: str) -> str:
    """`` (rounds lo-hi)``: the range of a ratio over the interleaved rounds."""
    if key not in r:
        return ""
    lo, hi = min(r[key]), max(r[key])
    return f" (rounds {lo:{fmt}}{unit}-{hi:{fmt}}{unit})"


def markdown_table(r: dict) -> str:
    """The results as a markdown table (steps/s and ratios)."""
    rows = [
        ("diffmodel, aggregate statistics", r["steps_per_s"], "1"),
        (
            "diffmodel, aggregate, new output array per call",
            r["new_array_steps_per_s"],
            "",
        ),
        (
            "memory-bandwidth bound (NumPy reads inputs once)",
            r["stream_steps_per_s"],
            f"diffmodel / bound = {r['ratio_stream']:.2f}"
            + _spread(r, "ratio_stream_rounds", ".2f", ""),
        ),
        (
            f"NumPy reference, same formula ({r['numpy_timed_steps']:,} steps)",
            r["numpy_steps_per_s"],
            f"diffmodel / NumPy = {r['ratio_numpy']:.1f}x"
            + _spread(r, "ratio_numpy_rounds", ".1f", "x"),
        ),
        (
            f"XGBoost predict, 300 trees depth 6, 30 features "
            f"({r['xgboost_timed_rows']:,} rows)",
            r["xgboost_steps_per_s"],
            f"diffmodel / XGBoost = {r['ratio_xgboost']:.0f}x"
            + _spread(r, "ratio_xgboost_rounds", ".0f", "x"),
        ),
        (
            "diffmodel, per-request batches",
            r["request_steps_per_s"],
            f"{r['requests_per_s']:.3g} requests/s",
        ),
        (
            "plain jax.value_and_grad of the loss over step_time_fast, all rows in "
            "one array (no chunks; the fitter's bulk path is below)",
            r["grad_steps_per_s"],
            "",
        ),
    ]
    if r.get("aic_steps_per_s"):
        rows.insert(
            5,
            (
                "aiconfigurator-core per-step estimate, its SDK "
                f"({r['aic_timed_steps']:,} steps of the dense deployments)",
                r["aic_steps_per_s"],
                f"diffmodel / aiconfigurator = {r['ratio_aic']:.2g}x",
            ),
        )
    lines = ["| method | steps/s | ratio |", "|---|---:|---|"]
    lines += [f"| {m} | {v:.3g} | {c} |" for m, v, c in rows]
    if "small_call_us" in r:
        lines.append(
            "| diffmodel, one call of 16 steps (a simulator's batch), latency | "
            f"{r['small_call_us']:.0f} us | |"
        )
    lines.append(f"| compile time (one chunk shape) | {r['compile_s']:.2f} s | |")
    if "fit_second_s" in r:
        lines += ["", *_bench_fit.fitting_table(r)]
    if "scaling" in r:
        lines += ["", *_bench_fit.scaling_table(r["scaling"])]
    if "synthetic_fit" in r:
        lines += ["", *_bench_fit.synthetic_table(r["synthetic_fit"])]
    return "\n".join(lines)


def readme_section(r: dict, table: str) -> str:
    """The proposed README section: a short paragraph and the table."""
    return (
        "## Throughput\n\n"
        "`diffmodel.predict_steps` evaluates the roofline over arrays of steps from "
        "several deployments with one compiled function over fixed-size chunks "
        "(inputs validated once, in NumPy). Measured by "
        f"`python experiments/throughput.py` on {r['device']}, float32, "
        f"{r['n_steps']:,} steps mixed from llama-2-70b TP4, codellama-34b TP2 and "
        "mixtral-8x7b TP2. Median of repeats after warm-up; diffmodel, the bound, "
        "NumPy and XGBoost are timed in interleaved rounds (each round times each "
        "once, so all see the same machine), and each ratio's range over the rounds "
        "is shown. diffmodel and the bound write into an output array reused across "
        "calls (`predict_steps(..., out=buf)`); the row below shows a new array per "
        "call. The bandwidth bound is "
        "NumPy reading the same input arrays once and writing one output; XGBoost "
        "and NumPy rates are timed on the row counts shown and scaled. "
        "aiconfigurator-core (the field's estimator, table lookups in Python per "
        "step) is timed in the same run after its engines are built, on the first "
        "steps of the two dense deployments (it has no Mixtral path here).\n\n"
        f"{table}\n"
    )


def _cli(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-steps", type=int, default=10_000_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", dest="json_path", default=None, metavar="PATH")
    ap.add_argument("--markdown", dest="markdown_path", default=None, metavar="PATH")
    ap.add_argument(
        "--scale",
        action="store_true",
        help="also loss + gradient by rows (1e4-1e7) and devices, and a fit of "
        "10M synthetic steps (~2 min more)",
    )
    args = ap.parse_args(argv)
    return main(
        n_steps=args.n_steps,
        repeats=args.repeats,
        json_path=args.json_path,
        markdown_path=args.markdown_path,
        scale=args.scale,
    )


if __name__ == "__main__":
    _cli()
