"""The subcommands of the ``diffmodel`` command line (parsed by :mod:`._cli`).

Each ``cmd_<name>(args)`` checks every input and output first, computes, and
writes its files last; it returns the exit status and raises ``ValueError`` /
``OSError`` with a one-line message on bad input.
"""

import pathlib

import jax

from ._cli_io import (
    check_temporal_columns,
    defined_target,
    deployment_groups,
    factor_table,
    figure,
    load_data,
    load_factor_file,
    metrics_text,
    need,
    note,
    out_dir,
    out_file,
    plot_file,
    read_table,
    row_labels,
    save,
    write_table,
)

# The command line computes in float64 (times of 1e-1..1e6 us, sums of millions).
jax.config.update("jax_enable_x64", True)


def cmd_demo(args) -> int:
    from ._demo import run_demo

    folder = out_dir(args.out_dir)
    need("matplotlib", "demo (its plots)")
    run_demo(
        out=folder,
        seed=args.seed,
        rows_per_deployment=args.rows_per_deployment,
        noise=args.noise,
        solver=args.solver,
        max_iterations=args.max_iterations,
        progress_every=args.progress_every,
    )
    return 0


def pipeline_column(frame, args):
    """The frame with ``--pp`` as its ``pp`` column (checked against a ``pp``
    column the table has); pipeline rows are priced by the roofline alone."""
    from .._frame import pipeline_degrees

    stages = pipeline_degrees(frame, args.pp, spell=lambda name: f"--{name} ")
    if stages is None:
        return frame
    if args.host is not None and (stages > 1).any():
        raise ValueError(
            "--pp (or a 'pp' column) > 1 is priced by the roofline: not with --host"
        )
    return frame.assign(pp=stages)


def cmd_predict(args) -> int:
    from .._predict import predict

    output = out_file(args.out, "--out", (".csv", ".parquet", ".pq"))
    if output.resolve() == pathlib.Path(args.data).resolve():
        raise ValueError(
            f"--out {args.out}: is --data; write the predictions elsewhere"
        )
    plot = plot_file(args.plot)
    if args.host is not None and args.factors is not None:
        raise ValueError("--host and --factors: give one (host costs or factors)")
    if args.curves is not None and args.host is None:
        raise ValueError("--curves gives the device side of --host predictions")
    if args.interval is not None and args.factors is None and args.host is None:
        raise ValueError(
            "--interval needs --factors: a factors file saved by 'diffmodel fit' "
            "(the physical priors carry no posterior), or --host"
        )
    if args.transfer != "auto" and (args.interval is None or args.host is not None):
        raise ValueError(
            f"--transfer {args.transfer} selects --interval's noise of --factors"
        )
    frame = read_table(args.data)
    frame, flags, groups = deployment_groups(frame, args)
    frame = pipeline_column(frame, args)
    if args.host is not None:
        from ._host_cmd import predict_host

        out = predict_host(args, frame, flags)
    elif args.interval is None:
        factors = load_factor_file(args.factors)
        out = predict(frame, factors=factors, **flags)
    else:
        load_factor_file(args.factors)  # a missing or bad file: one clear line
        transfer = {"auto": None, "all": True, "none": False}[args.transfer]
        out = predict(
            frame,
            factors=args.factors,
            interval=args.interval,
            transfer=transfer,
            **flags,
        )
    fig = None if plot is None else figure(out, row_labels(groups), actual=None)
    write_table(out, output)
    t = out["predicted_us"]
    print(
        f"wrote {len(out)} rows to {output} with predicted_us and the component "
        f"columns; predicted step time median {t.median():,.0f} us "
        f"(min {t.min():,.0f}, max {t.max():,.0f})"
    )
    if args.interval is not None:
        rel = (out["predicted_hi_us"] - out["predicted_lo_us"]) / t
        print(
            f"{args.interval:g} interval in predicted_lo_us / predicted_hi_us; "
            f"median width {100 * rel.median():.1f} % of the prediction"
        )
    if fig is not None:
        save(fig, plot)
    return 0


def _check_rows(kind: str, labels, n_rows: int, n_factors: int) -> None:
    """At least one training row per fitted factor: per deployment for per-model
    factors, overall for global and hierarchical ones (whose per-deployment offsets
    are held near zero by their prior)."""
    import numpy as np

    if kind == "per-model":
        names, counts = np.unique(labels, return_counts=True)
        few = [(n, int(c)) for n, c in zip(names, counts, strict=True) if c < n_factors]
        if few:
            name, count = few[0]
            raise ValueError(
                f"--kind per-model fits {n_factors} factors per deployment and "
                f"{name} has {count} training rows; give it at least {n_factors} "
                "or use --kind hierarchical"
            )
    elif n_rows < n_factors:
        raise ValueError(
            f"--kind {kind} fits {n_factors} factors from {n_rows} training rows; "
            f"give at least {n_factors}"
        )


def cmd_fit(args) -> int:
    from .._fitting._fit import fit
    from .._fitting._io import save_factors
    from .._model._factors import FACTOR_NAMES
    from .._predict import predict
    from ..data._splits import temporal_split

    output = out_file(args.out, "--out", (".json",))
    plot = plot_file(args.plot)
    if args.learning_rate is not None and args.solver != "adam":
        raise ValueError("--learning-rate is the step size of --solver adam only")
    if args.prior_scale is not None and args.kind != "hierarchical":
        raise ValueError(
            f"--prior-scale is the spread of --kind hierarchical's per-deployment "
            f"offsets; --kind {args.kind} has none"
        )
    frame = load_data(args.data)
    if args.split == "temporal":
        check_temporal_columns(frame)
    frame, dropped = defined_target(frame, args.target, dropna=args.dropna_target)
    frame, flags, groups = deployment_groups(frame, args)
    labels = row_labels(groups)
    valid = test = split_note = None
    if args.split == "temporal":
        split = temporal_split(frame)
        train, valid, test = (frame[split == s] for s in ("train", "valid", "test"))
        split_note = (
            f"temporal split per experiment: {len(train)} train, {len(valid)} valid, "
            f"{len(test)} test rows"
        )
        if len(train) == 0 or len(test) == 0:
            raise ValueError("--split temporal left no training or no test rows")
        valid = valid if len(valid) else None
        train_labels = labels[(split == "train")]
    else:
        train, train_labels = frame, labels
    _check_rows(args.kind, train_labels, len(train), len(FACTOR_NAMES))
    for line in (dropped, split_note):
        if line:
            note(line)

    def progress(step, loss):
        note(f"fit: iteration {int(step):>5d}  loss {float(loss):.6g}")

    result = fit(
        train,
        target=args.target,
        factors=args.kind,
        valid=valid,
        solver=args.solver,
        max_steps=args.max_iterations,
        learning_rate=0.05 if args.learning_rate is None else args.learning_rate,
        callback=progress if args.progress_every > 0 else None,
        callback_every=max(args.progress_every, 1),
        transfer_by=args.transfer_by,
        prior_scale=0.1 if args.prior_scale is None else args.prior_scale,
        **flags,
    )
    if result.prior_scale_evidence is not None:
        best = max(result.prior_scale_evidence, key=lambda tv: tv[1])
        print(
            f"between-group scale by empirical Bayes: {best[0]:g} (log evidence, "
            "nats relative to the best: "
            + ", ".join(
                f"{t:g} {v - best[1]:+.1f}" for t, v in result.prior_scale_evidence
            )
            + ")"
        )
    if valid is not None and result.laplace is not None:
        from ._host_cmd import with_deployment

        result = result.calibrate(with_deployment(valid, flags))
    scored, which = (test, "test") if test is not None else (train, "training")
    pred = predict(scored, factors=result, **flags)
    by = "experiment_id" if "experiment_id" in pred.columns else None
    metrics = metrics_text(pred, args.target, by)
    fig = None
    if plot is not None:
        rows = labels[frame.index.get_indexer(scored.index)]
        title = f"{args.kind} fit, {which} rows"
        fig = figure(pred, rows, actual=args.target, title=title)
    status = result.status
    print(
        f"fitted {args.kind} factors to {args.target} on {len(train)} rows: "
        f"{result.n_steps} {args.solver} iterations in {result.wall_seconds:.1f} s "
        f"({status}), loss {result.loss:.5g} (mean squared log ratio)"
    )
    print(factor_table(result))
    save_factors(result, output)
    print(f"saved {output}")
    print(f"\naccuracy on the {which} rows ({args.target}, us):")
    print(metrics)
    if test is not None and result.laplace is not None:
        cal = result.laplace.calibration
        if cal is not None:
            print(
                f"90% interval calibrated on the {cal.n_rows} validation rows "
                f"(+-{cal.multiplier(0.9):.3f} sd; normal +-1.645 sd): ",
                end="",
            )
        else:
            print("90% interval (normal quantile): ", end="")
        band = predict(scored, factors=result, interval=0.9, **flags)
        y = scored[args.target]
        inside = (band["predicted_lo_us"] <= y) & (y <= band["predicted_hi_us"])
        print(f"covers {100 * inside.mean():.1f}% of the test rows")
    if fig is not None:
        save(fig, plot)
    return 0


def cmd_evaluate(args) -> int:
    from .._predict import predict

    plot = plot_file(args.plot)
    frame = load_data(args.data)
    if args.by is None:
        by = "experiment_id" if "experiment_id" in frame.columns else None
    elif args.by == "none":
        by = None
    elif args.by not in frame.columns:
        raise ValueError(f"--by {args.by}: no such column; columns are {list(frame)}")
    else:
        by = args.by
    frame, dropped = defined_target(frame, args.target, dropna=args.dropna_target)
    frame, flags, groups = deployment_groups(frame, args)
    factors = load_factor_file(args.factors)
    pred = predict(frame, factors=factors, **flags)
    if dropped:
        note(dropped)
    metrics = metrics_text(pred, args.target, by)
    fig = None
    if plot is not None:
        fig = figure(pred, row_labels(groups), actual=args.target)
    what = args.factors or "the physical priors"
    print(f"accuracy of {what} on {args.target} ({len(pred)} rows, us):")
    print(metrics)
    if fig is not None:
        save(fig, plot)
    return 0


def cmd_reproduce(args) -> int:
    from .._paths import default_data_dir
    from ._reproduce import data_root, reproduce

    def names(text):
        return None if text is None else [s for s in text.split(",") if s]

    folder = out_dir(args.out_dir)
    data = data_root(args.data) if args.data else default_data_dir()
    if not (data / "stepml" / "steps.parquet").is_file():
        where = args.data or f"{data} (the default)"
        raise FileNotFoundError(
            f"--data {where}: no stepml/steps.parquet; pass the reference data "
            "folder or its stepml/ folder"
        )
    if args.methods is None or "xgboost" in names(args.methods):
        need("xgboost", "reproduce (its xgboost method)")
        need("sklearn", "reproduce (its xgboost method)")
    reproduce(
        data=data,
        out=folder,
        quick=args.quick,
        experiments=names(args.experiments),
        targets=names(args.targets),
        protocols=names(args.protocols),
        methods=names(args.methods),
    )
    md = folder / "results.md"
    print(md.read_text())
    print(f"wrote {folder / 'results.csv'} and {md}")
    return 0


def cmd_bench(args) -> int:
    json_path = None if args.out is None else out_file(args.out, "--out", (".json",))
    md = (
        None
        if args.markdown is None
        else out_file(args.markdown, "--markdown", (".md",))
    )
    need("xgboost", "bench")
    from . import _bench

    _bench.main(
        n_steps=args.rows,
        repeats=args.repeats,
        json_path=json_path,
        markdown_path=md,
        scale=args.scale,
    )
    return 0


def cmd_models(args) -> int:
    import numpy as np

    from .._model._arch import architecture, known_models

    print(f"{'model':<18}{'params':>9}{'layers':>8}{'heads':>7}{'kv heads':>10}  MoE")
    skipped = []
    for name in known_models():
        try:
            a = architecture(name)
        except ValueError:  # a bundled config the physics cannot use yet
            skipped.append(name)
            continue
        experts = int(np.asarray(a.n_experts))
        moe = f"{experts} experts, top-{int(np.asarray(a.top_k))}" if experts else "-"
        print(
            f"{name:<18}{float(np.asarray(a.total_params())) / 1e9:>8.1f}B"
            f"{int(np.asarray(a.n_layers)):>8}{int(np.asarray(a.n_heads)):>7}"
            f"{int(np.asarray(a.n_kv_heads)):>10}  {moe}"
        )
    if skipped:
        print(f"not supported yet ({len(skipped)}): {', '.join(skipped)}")
    return 0


def cmd_gpus(args) -> int:
    from .._model._hardware import DEFAULT_HARDWARE, hardware, known_hardware

    print(
        f"{'gpu':<14}{'BF16 TFLOP/s':>14}{'FP8 TFLOP/s':>13}{'HBM TB/s':>10}"
        f"{'link GB/s':>11}"
    )
    for name in known_hardware():
        h = hardware(name)
        mark = "  (default)" if name == DEFAULT_HARDWARE else ""
        print(
            f"{name:<14}{float(h.flops_16) / 1e12:>14,.1f}"
            f"{float(h.flops_8) / 1e12:>13,.1f}{float(h.hbm_bw) / 1e12:>10.2f}"
            f"{float(h.link_bw) / 1e9:>11,.0f}{mark}"
        )
    return 0
