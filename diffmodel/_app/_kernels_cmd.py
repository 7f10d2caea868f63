"""``diffmodel kernels list`` and ``diffmodel calibrate``: the kernel database from the
command line (registered by :func:`add_parser`)."""

import argparse
import pathlib
import sys


def _cmd_kernels_list(args) -> int:
    from ..kernels._database import list_kernel_tables

    listing = list_kernel_tables()
    if args.system:
        known = sorted(set(listing["system"]))
        listing = listing[listing["system"] == args.system]
        if listing.empty:
            raise ValueError(
                f"--system {args.system!r}: not in the kernel database; systems: "
                f"{', '.join(known)}"
            )
    if args.backend:
        known = sorted(set(listing["backend"]))
        listing = listing[listing["backend"] == args.backend]
        if listing.empty:
            where = f" of {args.system}" if args.system else ""
            raise ValueError(
                f"--backend {args.backend!r}: no tables{where}; backends: "
                f"{', '.join(known)}"
            )
    grouped = (
        listing.groupby(["system", "backend", "family"], sort=True)["version"]
        .apply(lambda v: ",".join(sorted(set(v))))
        .reset_index()
    )
    print("system               backend  family             versions")
    for r in grouped.itertuples(index=False):
        print(f"{r.system:<20} {r.backend:<8} {r.family:<18} {r.version}")
    if args.hardware:
        from .._model._hardware import SPECS, system_info

        print(
            "\nname           system               BF16 TF  FP8 TF   HBM TB/s  "
            "link GB/s  class   SMs  GHz    peaks from"
        )
        for name in SPECS:
            try:
                i = system_info(name)
            except ValueError as err:
                print(f"{name:<14} unavailable: {err}")
                continue
            print(
                f"{name:<14} {i['system']:<20} {i['bf16_tflops']:7.1f} "
                f"{i['fp8_tflops']:7.1f} {i['hbm_tb_s']:9.3f} {i['link_gb_s']:10.0f} "
                f"{i['gpu_class']:<7} {i['sm_count']:4d} {i['clock_ghz']:5.2f}  "
                f"{i['peaks_source']}"
            )
    return 0


def _cmd_calibrate(args) -> int:
    from .._model._hardware import canonical_hardware, hardware_system
    from ..kernels._calibrate import FitOptions, calibrate_kernels
    from ..kernels._curves_io import save_curves
    from ..kernels._database import FAMILY_FILES, list_systems, load_system_tables
    from ._cli_io import out_file

    out_file(args.out, "--out", (".json",))  # before minutes of fitting
    try:
        name = canonical_hardware(args.system)
    except ValueError:
        raise ValueError(
            f"--system {args.system}: not a GPU system of the kernel database; "
            f"systems: {', '.join(list_systems())}"
        ) from None
    system = hardware_system(name)
    if args.rows_per_gpu is not None and not args.pool:
        raise ValueError("--rows-per-gpu: only pooled curves (--pool) sample rows")
    if args.no_siblings and not args.pool:
        raise ValueError("--no-siblings: only pooled curves (--pool) take siblings'")

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if args.pool:
        if args.absolute:
            raise ValueError("--absolute: pooled curves are portable only")
        if args.families:
            raise ValueError("--families: pooled curves fit every family")
        if args.shape_grid:
            raise ValueError(
                "--shape-grid: a shape grid is one GPU's own measurements; pooled "
                "curves carry none"
            )
        curves = _pooled_curves(args, system, say)
        path = save_curves(curves, pathlib.Path(args.out))
        print(f"wrote {path}")
        return 0
    tables = load_system_tables(
        system,
        args.backend,
        args.version,
        families=tuple(FAMILY_FILES),
        skip_missing=True,
        progress=say,
    )
    versions = sorted({t.attrs.get("version", "?") for t in tables.values()})
    say(f"loaded {system} / {args.backend} {','.join(versions)}: {list(tables)}")
    curves = calibrate_kernels(
        tables,
        hardware_name=name,
        options=FitOptions(adam_steps=args.adam_steps, lbfgs_steps=args.lbfgs_steps),
        portable=not args.absolute,
        progress=say,
        families=tuple(args.families) if args.families else None,
        shape_grids=args.shape_grid,
    )
    path = save_curves(curves, pathlib.Path(args.out))
    print(f"wrote {path}")
    return 0


def _pooled_curves(args, system: str, say):
    """The curves ``--system`` gets from the ``--pool`` systems' tables."""
    from ..kernels._calibrate import FitOptions
    from ..kernels._pooled_calibrate import curves_from_other_gpus

    rows = {} if args.rows_per_gpu is None else {"rows_per_gpu": args.rows_per_gpu}
    return curves_from_other_gpus(
        system,
        None if args.pool == ["others"] else args.pool,
        backend=args.backend,
        version=args.version,
        **rows,
        siblings=not args.no_siblings,
        options=FitOptions(adam_steps=args.adam_steps, lbfgs_steps=args.lbfgs_steps),
        progress=say,
    )


def add_parser(subparsers) -> None:
    """Add the ``kernels`` and ``calibrate`` subcommands to ``subparsers``."""
    from .._kernel_families import ALL_FAMILIES
    from ._cli import COUNT, POSITIVE_INT

    families = (*ALL_FAMILIES, "mla", "dsa")

    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = subparsers.add_parser(
        "kernels",
        help="the measured kernel database (aiconfigurator-core)",
        description="List the kernel tables of the installed aiconfigurator-core "
        "database (pip install 'diffmodel[aic]').",
        formatter_class=fmt,
    )
    sub = p.add_subparsers(dest="kernels_command", metavar="ACTION", required=True)
    q = sub.add_parser(
        "list",
        help="systems, backends, families and versions",
        formatter_class=fmt,
    )
    q.add_argument("--system", help="only this system (e.g. h100_sxm)")
    q.add_argument("--backend", help="only this backend (vllm, sglang, trtllm)")
    q.add_argument(
        "--hardware", action="store_true", help="also print the hardware catalog"
    )
    q.set_defaults(run=_cmd_kernels_list)

    p = subparsers.add_parser(
        "calibrate",
        help="fit kernel efficiency curves on one system's measured kernels",
        description="Fit every family's efficiency curves on the measured kernels "
        "of one GPU system and backend, with one progress line per family, and "
        "write curves the step model loads (diffmodel.kernels.load_curves).",
        formatter_class=fmt,
    )
    p.add_argument("--system", required=True, help="e.g. h100_sxm, l40s, b200")
    p.add_argument("--backend", default="vllm", help="vllm, sglang or trtllm")
    p.add_argument(
        "--version", default=None, help="backend version (default: newest per family)"
    )
    p.add_argument(
        "--out", required=True, metavar="CURVES.json", help="where to write the curves"
    )
    p.add_argument(
        "--families",
        nargs="+",
        choices=families,
        metavar="FAMILY",
        help=f"fit only these ({', '.join(families)}); the others are written "
        "uncalibrated (default: every family; 'mla' and 'dsa': vLLM's MLA and "
        "DeepSeek sparse attention modules, where the system's tables have them)",
    )
    p.add_argument(
        "--adam-steps",
        type=POSITIVE_INT,
        default=800,
        help="Adam steps per family's fit",
    )
    p.add_argument(
        "--lbfgs-steps",
        type=COUNT,
        default=100,
        help="L-BFGS steps per family's fit, after Adam",
    )
    p.add_argument(
        "--absolute",
        action="store_true",
        help="curves in absolute sizes (FLOPs, bytes, blocks) instead of portable",
    )
    p.add_argument(
        "--shape-grid",
        action="store_true",
        help="also fit each GEMM family's shape grid: this GPU's tile and split-K "
        "effects over (m, n, k), read from its tables (closer on held-out GEMM "
        "shapes; not the default: it did not improve the step model on the public "
        "H100 traces)",
    )
    p.add_argument(
        "--pool",
        nargs="+",
        metavar="SYSTEM",
        help="fit on these systems' tables at once instead ('others': every "
        "system but --system whose tables time the same vendor's kernels) and "
        "write the curves --system gets from them: its own offsets if pooled, "
        "else those of the pooled GPUs that run its kernels "
        "(read from its tables' kernel names, never their times); for an unpooled "
        "system with siblings in the pool (within 1.5x on every published spec, "
        "e.g. H200 for H100), curves pooled over the siblings for the kernels they "
        "run",
    )
    p.add_argument(
        "--no-siblings",
        action="store_true",
        help="with --pool: the whole pool's curves for every family, never the "
        "siblings' alone",
    )
    p.add_argument(
        "--rows-per-gpu",
        type=POSITIVE_INT,
        default=None,
        help="with --pool: at most this many sampled rows per GPU and family "
        "(default 1000)",
    )
    p.set_defaults(run=_cmd_calibrate)


def handle(args) -> int:
    """Run the subcommand ``args`` was parsed for."""
    return args.run(args)
