"""``diffmodel fit-host`` and ``diffmodel predict --host``: host costs over the kernel
sum from the command line (:func:`diffmodel.fit_host_on_kernels`).

The device side of each step is its kernels summed on a GPU's calibrated curves (a
file from ``diffmodel calibrate``); only the serving stack's host costs are fitted.
"""

# pandas, JAX and the library are imported by the commands, not by the parser
# (``diffmodel --help`` stays fast).

TERMS: tuple[str, ...] = ("step", "layer", "request", "layer_request")
"""``diffmodel.kernels.HOST_TERMS``, spelled here so that building the parser
imports no JAX (a test keeps the two equal)."""


def _curves(path: str):
    from ..kernels._curves_io import load_curves

    try:
        return load_curves(path)
    except ValueError as err:
        raise ValueError(f"--curves {path}: {err}") from None


def with_deployment(frame, flags: dict):
    """``frame`` with the ``--model/--hardware/--tp`` flags given as columns (already
    checked against the table by :func:`deployment_groups`)."""
    given = {k: v for k, v in flags.items() if v is not None}
    return frame.assign(**given) if given else frame


def cmd_fit_host(args) -> int:
    import jax

    from .._fitting._kernel_host import fit_host_on_kernels
    from .._fitting._kernel_host_io import save_host_fit
    from ..data._splits import temporal_split
    from ._cli_io import (
        check_temporal_columns,
        defined_target,
        deployment_groups,
        load_data,
        metrics_text,
        note,
        out_file,
    )

    if args.joint is not None and args.transfer:
        raise ValueError(
            "--joint with --transfer: the joint fit has no leave-one-deployment-out "
            "refits (each would refit the curves); use one or the other"
        )
    if args.calibrate_tail is not None and args.split == "temporal":
        raise ValueError(
            "--calibrate-tail goes with --split none: --split temporal calibrates "
            "the intervals on its validation rows"
        )
    jax.config.update("jax_enable_x64", True)
    output = out_file(args.out, "--out", (".json",))
    curves = _curves(args.curves)
    frame = load_data(args.data)
    if args.split == "temporal":
        check_temporal_columns(frame)
    frame, dropped = defined_target(frame, args.target, dropna=args.dropna_target)
    frame, flags, _ = deployment_groups(frame, args)
    frame = with_deployment(frame, flags)
    if dropped:
        note(dropped)
    calibrate = frame.iloc[:0]
    if args.calibrate_tail is not None:
        check_temporal_columns(
            frame,
            "--calibrate-tail",
            "without them, leave it out (the intervals then use the normal quantile)",
        )
    if args.split == "temporal":
        split = temporal_split(frame)
        train, test = frame[split == "train"], frame[split == "test"]
        calibrate = frame[split == "valid"]
        if len(train) == 0 or len(test) == 0:
            raise ValueError("--split temporal left no training or no test rows")
        note(
            f"temporal split: fit on {len(train)} rows, calibrate the intervals on "
            f"the next {len(calibrate)}, score on the last {len(test)}"
        )
    elif args.calibrate_tail is not None:
        tail = args.calibrate_tail
        split = temporal_split(frame, fractions=(1.0 - tail, tail, 0.0))
        train, calibrate = frame[split == "train"], frame[split == "valid"]
        if len(train) == 0 or len(calibrate) == 0:
            raise ValueError(
                f"--calibrate-tail {tail} left no training or no held-out rows"
            )
        test = frame
        note(
            f"fit on the first {len(train)} rows of each experiment, calibrate the "
            f"intervals on the last {len(calibrate)}"
        )
    else:
        train = test = frame
    terms = tuple(args.terms)
    if "auto" in terms:
        if len(terms) > 1:
            raise ValueError("--terms: 'auto' stands alone (it chooses the terms)")
        terms = _auto_terms(train, args, curves)
    if args.joint is None:
        result = fit_host_on_kernels(
            train,
            target=args.target,
            curves=curves,
            terms=terms,
            max_steps=args.max_iterations,
            transfer=args.transfer,
        )
    else:
        result = _joint_fit(train, args, curves, terms)
    status = "converged" if result.converged else "iteration budget reached"
    print(
        f"fitted host costs {' + '.join(result.terms)} to {args.target} on "
        f"{result.n_rows} rows over the kernel sum on {curves.hardware} ({status}), "
        f"loss {result.loss:.5g} (mean squared log ratio)"
    )
    print(result.table().to_string(float_format=lambda v: f"{v:.4g}"))
    print(
        f"residual noise (log sd): prefill steps {result.noise_sd[0]:.4f}, "
        f"decode-only steps {result.noise_sd[1]:.4f}"
    )
    for line in result.unpinned:
        print(f"undetermined: {line}")
    if result.transfer_calibration is not None:
        print(
            "intervals of unseen deployments from refits without each of the "
            f"{len(result.trained_on)} deployments: the 90% interval spans "
            f"+-{result.transfer_calibration.multiplier(0.9):.3f} sd"
        )
    if len(calibrate):
        result = result.calibrate(calibrate, target=args.target)
        print(
            f"intervals calibrated on {len(calibrate)} held-out rows: the 90% "
            f"interval spans +-{result.calibration.multiplier(0.9):.3f} sd "
            "(normal: +-1.645 sd)"
        )
    save_host_fit(result, output)
    print(f"saved {output}")
    which = "test" if args.split == "temporal" else "training"
    pred = test.assign(predicted_us=result.predict(test)["predicted_us"])
    by = "experiment_id" if "experiment_id" in pred.columns else None
    print(f"\naccuracy on the {which} rows ({args.target}, us):")
    print(metrics_text(pred, args.target, by))
    if args.split == "temporal":
        band = result.predict(test, interval=0.9)
        y = test[args.target]
        inside = (band["predicted_lo_us"] <= y) & (y <= band["predicted_hi_us"])
        print(f"90% interval: covers {100 * inside.mean():.1f}% of the test rows")
    return 0


def _joint_tables(source: str, curves):
    """``--joint SOURCE``: the kernel tables of the curves' GPU, from the installed
    database (``database``) or a data folder holding ``kernels/h100_sxm``."""
    import pathlib

    from .._fitting._joint import JOINT_FAMILIES
    from .._model._hardware import hardware_system
    from ..kernels._calibrate import family_table
    from ..kernels._database import load_system_tables
    from ..kernels._tables import load_kernel_tables

    families = tuple(dict.fromkeys(family_table(f) for f in JOINT_FAMILIES))
    if source == "database":
        return load_system_tables(hardware_system(curves.hardware), families=families)
    folder = pathlib.Path(source)
    if not (folder / "kernels" / "h100_sxm").is_dir():
        raise ValueError(
            f"--joint {source}: expected 'database' (the installed "
            "aiconfigurator-core tables of the curves' GPU) or a data folder "
            "holding kernels/h100_sxm (e.g. ../shared/data)"
        )
    if curves.hardware != "h100-sxm":
        raise ValueError(
            f"--joint {source}: the folder holds H100 tables, but --curves are "
            f"{curves.hardware!r}'s; use --joint database"
        )
    return load_kernel_tables(folder)


def _joint_fit(train, args, curves, terms):
    """``--joint``: curves and host costs in one objective
    (:func:`diffmodel.fit_joint`); its sources printed; the host fit returned."""
    from .._fitting._joint import fit_joint
    from ._cli_io import note

    tables = _joint_tables(args.joint, curves)
    note(
        "fitting the curves and the host costs jointly on "
        f"{sum(len(t) for t in tables.values())} kernel rows and {len(train)} steps"
    )
    joint = fit_joint(
        train,
        target=args.target,
        curves=curves,
        tables=tables,
        terms=terms,
        max_steps=args.max_iterations,
        progress=note,
    )
    print("joint fit: each source's noise sd (log), and how far the steps moved")
    print(joint.sources.to_string(float_format=lambda v: f"{v:.4g}"))
    return joint.host_fit


def _auto_terms(train, args, curves) -> tuple[str, ...]:
    """``--terms auto``: the host costs with the lowest held-out MAPE on the training
    rows (:func:`diffmodel.select_host_terms`), the comparison printed."""
    from .._fitting._host_terms import select_host_terms
    from ._cli_io import note

    choice = select_host_terms(
        train,
        target=args.target,
        curves=curves,
        max_steps=args.max_iterations,
        progress=note,
    )
    print(
        f"host terms chosen by held-out MAPE % on the training rows: "
        f"{' + '.join(choice.terms)} (held out in turn: {', '.join(choice.folds)})"
    )
    print(choice.table.to_string(float_format=lambda v: f"{v:.2f}"))
    return choice.terms


def predict_host(args, frame, flags: dict):
    """``diffmodel predict --host`` (``flags``: the checked deployment flags of
    :func:`._cli_io.deployment_groups`): the rows with ``predicted_us`` (kernel sum plus
    the fitted host costs) and its ``<component>_us`` columns (``overhead_us`` the
    host costs), and with ``--interval`` ``predicted_lo_us`` / ``predicted_hi_us``."""
    import pandas as pd

    from .._fitting._kernel_host import kernel_breakdown
    from .._fitting._kernel_host_io import load_host_fit

    fit = load_host_fit(args.host)
    curves = fit.curves if args.curves is None else _curves(args.curves)
    frame = with_deployment(frame, flags)
    out = fit.predict(frame, interval=args.interval, curves=curves)
    parts = kernel_breakdown(frame, curves, fit.host)
    return pd.concat([frame, out, parts], axis=1)


def add_parser(subparsers, common) -> None:
    """Add the ``fit-host`` subcommand; ``common`` holds the shared flag adders of
    :mod:`._cli` (``data``, ``target``, ``deployment``)."""
    from ._cli import FRACTION, POSITIVE_INT

    p = subparsers.add_parser(
        "fit-host",
        help="fit a serving stack's host costs over the kernel-sum device time",
        description="Fit the host costs of a serving stack (per step, per layer, "
        "per request, per request in each layer; us) to measured wall times, with "
        "each step's device time fixed at the sum of its kernels on a GPU's "
        "calibrated curves (a file from 'diffmodel calibrate'). Prints each cost "
        "with its posterior sd and any direction the rows do not determine, saves "
        "the fit as JSON for 'diffmodel predict --host', and scores it.",
    )
    common["data"](p)
    common["target"](p)
    p.add_argument(
        "--curves",
        required=True,
        metavar="CURVES.json",
        help="kernel curves of the GPU the rows ran on ('diffmodel calibrate')",
    )
    p.add_argument(
        "--terms",
        nargs="+",
        choices=(*TERMS, "auto"),
        default=["layer", "layer_request"],
        help="host costs to fit (default: layer layer_request, the form chosen by "
        "leaving one model out of the public traces' training rows); 'auto': "
        "choose among the candidate sets by held-out MAPE on the training rows, "
        "holding out each deployment in turn (each half of the rows when there is "
        "one), and print the comparison",
    )
    p.add_argument(
        "--split",
        choices=("temporal", "none"),
        default="none",
        help="'temporal': fit on the first 60 %% of each experiment's steps, "
        "calibrate the intervals on the next 20 %%, score on the last 20 %% (needs "
        "experiment_id and step.id); 'none': fit and score on every row (default)",
    )
    p.add_argument(
        "--calibrate-tail",
        type=FRACTION,
        default=None,
        metavar="F",
        help="with --split none: hold the last fraction F (0 < F < 1) of each "
        "experiment's steps out of the fit and calibrate the predictive intervals "
        "on them (split conformal; needs experiment_id and step.id). Default: no "
        "calibration, intervals assume Gaussian log residuals",
    )
    p.add_argument(
        "--transfer",
        action="store_true",
        help="also refit without each deployment in turn and calibrate the "
        "intervals of deployments the fit never saw on those refits' misses "
        "(needs rows of two deployments or more)",
    )
    p.add_argument(
        "--joint",
        metavar="SOURCE",
        default=None,
        help="fit the curves of the steps' kernels (16-bit GEMMs, prefill and "
        "decode attention, all-reduce) together with the host costs, in one "
        "objective over the kernel tables and the steps, each with its own noise "
        "(diffmodel.fit_joint; minutes); the saved fit holds the refitted curves. "
        "SOURCE: 'database' (the installed aiconfigurator-core tables of the "
        "curves' GPU, vLLM, newest version) or a data folder holding "
        "kernels/h100_sxm (e.g. ../shared/data)",
    )
    p.add_argument(
        "--max-iterations",
        type=POSITIVE_INT,
        default=500,
        help="L-BFGS iterations at most (default: 500)",
    )
    p.add_argument("--out", required=True, metavar="FILE", help="fit file, .json")
    common["deployment"](p)
    p.set_defaults(run=cmd_fit_host)
