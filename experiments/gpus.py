"""Every GPU of the kernel database: held-out shapes per GPU, and leave one GPU out.

For each family (``gemm_bf16``, ``gemm_fp8``, ``gemm_nvfp4``, ``prefill_attention``,
``decode_attention``, ``moe``, ``moe_fp8``, ``moe_w4a16``, ``moe_nvfp4``,
``allreduce``) and each
GPU system of the installed ``aiconfigurator-core`` database (vLLM tables where the
system has them, else SGLang):

- ``held_out_shapes``: the GPU's own curves fitted on 75% of its shapes (whole
  shapes), MAPE on the other 25%; for GEMMs and attention also with the GPU's
  shape grid
  (``dk.with_shape_grid``) fitted on the same 75% (variant ``calibrated_grid``);
- ``leave_one_gpu_out``: curves fitted on every other GPU (partial pooling: shared
  curves plus per-GPU offsets), predicting every (sampled) row of the held-out GPU
  from its specs alone, with the mean offsets of the training GPUs that run its
  kernel, of its class where any is (:func:`held_out_offsets`). The form, absolute
  sizes, portable ones (work as time at peak, blocks as waves of the SM count),
  portable with the L2 cache, or the constant roofline, is chosen per held-out GPU
  by an inner leave-one-GPU-out over the training GPUs only (never by the held-out
  GPU's figures), scored on the training GPUs of its class (PCIe card or NVLink
  module; :func:`inner_peers`).

Both beside the uncalibrated roofline (the constant efficiencies of ``FACTOR_SPECS``).
Rows are subsampled per (GPU, family) with a fixed seed (``--rows``). Writes
``gpus.csv`` (``family, protocol, held_out, variant, mape, n_rows, n_params``, plus
``form`` and ``backend``) and prints the table.

    python experiments/gpus.py [--out DIR] [--rows 250] [--families a,b]
"""

import argparse
import pathlib
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import kernel_xgboost  # a sibling script: the black box on the same rows
import numpy as np
import pandas as pd

import diffmodel.kernels as dk
from diffmodel import FACTOR_SPECS, gpu_class, hardware, mape, sibling_gpus

FAMILIES = dk.ALL_FAMILIES
SHAPE_KEYS = {
    "gemm_bf16": ["n", "k"],
    "gemm_fp8": ["n", "k"],
    "gemm_nvfp4": ["n", "k"],
    "prefill_attention": ["num_heads", "num_key_value_heads", "head_dim"],
    "decode_attention": ["num_heads", "num_key_value_heads", "head_dim"],
    "moe": ["hidden_size", "inter_size", "topk", "num_experts"],
    "moe_fp8": ["hidden_size", "inter_size", "topk", "num_experts"],
    # gpt-oss's MXFP4 rows time two expert shapes: hold out expert layouts.
    "moe_w4a16": ["num_experts", "moe_tp_size", "moe_ep_size"],
    "moe_nvfp4": ["hidden_size", "inter_size", "topk", "num_experts"],
    "allreduce": ["message_size"],
}
# The catalog name of each database system.
SYSTEMS = {
    "a100_sxm": "a100-sxm-80gb",
    "h100_sxm": "h100-sxm",
    "h200_sxm": "h200",
    "b200_sxm": "b200",
    "b300_sxm": "b300",
    "gb200": "gb200",
    "gb300": "gb300",
    "l40s": "l40s",
    "rtx_pro_6000_server": "rtx-pro-6000",
    "b60": "b60",
}
FORMS = ("absolute", "portable", "portable_l2")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _n_params(tree) -> int:
    return sum(int(np.size(x)) for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array)))


def gather(family: str, rows_per_gpu: int, seed: int) -> list[tuple]:
    """(system, backend, sampled rows) of every GPU with rows of ``family``."""
    out = []
    for system in SYSTEMS:
        for backend in ("vllm", "sglang"):
            try:
                tables = dk.load_system_tables(
                    system,
                    backend,
                    families=(dk.family_table(family),),
                )
                rows = dk.family_rows(tables, family)
            except ValueError as err:
                _log(f"  {family}: skipped {system}/{backend}: {err}")
                continue
            if len(rows) > rows_per_gpu:
                rows = rows.sample(rows_per_gpu, random_state=seed)
            out.append((system, backend, rows.reset_index(drop=True)))
            break
    return out


def concat_works(works):
    """One work (or all-reduce inputs) of all GPUs' rows, fields concatenated."""
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *works)


def family_inputs(family, gathered):
    """``(predict(curves), predict_uncalibrated(), y, gpu index, black-box
    features)`` over all rows (features: :mod:`kernel_xgboost`)."""
    parts, ys, gpus = [], [], []
    for i, (system, _, rows) in enumerate(gathered):
        hw = hardware(SYSTEMS[system])
        if family == "allreduce":
            n = len(rows)
            hw_rows = jax.tree.map(lambda x, n=n: jnp.full(n, x), hw)
            parts.append(
                (
                    rows["bytes"].to_numpy(float),
                    rows["num_gpus"].to_numpy(float),
                    hw_rows,
                )
            )
        else:
            parts.append(dk.family_work(family, rows, hw))
        ys.append(rows["latency_us"].to_numpy(float))
        gpus.append(np.full(len(rows), i))
    data = concat_works(parts)
    if family == "allreduce":
        b, n, hw = data
        const = (FACTOR_SPECS["comm_bw"][0], FACTOR_SPECS["comm_latency_us"][0])

        def predict(c):
            return dk.allreduce_kernel_us(b, n, c, hw)

        unc = dk.allreduce_kernel_us(b, n, const, hw)
        x = kernel_xgboost.allreduce_features(b, n, hw)
    else:
        kind = "attn" if "attention" in family else None
        const = (
            (FACTOR_SPECS["attn_flops"][0], FACTOR_SPECS["attn_bw"][0])
            if kind
            else (FACTOR_SPECS["gemm_flops"][0], FACTOR_SPECS["mem_bw"][0])
        )
        predict = data.time_us
        unc = data.time_us(const)
        x = kernel_xgboost.work_features(data)
    return predict, np.asarray(unc), np.concatenate(ys), np.concatenate(gpus), x


def init_for(family: str, form: str):
    portable = form.startswith("portable")
    if family == "allreduce":
        return dk.default_allreduce_curve(portable=portable, hop=True)
    base = dk.init_curves(family)
    return dk.default_roofline_curves(
        occupancy=base.occupancy is not None,
        latency=base.log_latency_us is not None,
        tuned=base.raw_tuned is not None,
        prologue=base.prologue is not None,
        serial_k=base.log_row_ns is not None,
        exp=base.raw_exp_eta is not None,
        overlap=base.log_overlap is not None,
        kloop=base.log_kloop_ns is not None and base.log_row_ns is None,
        ep_latency=base.log_ep_latency_us is not None,
        portable=portable,
        cache=form == "portable_l2",
    )


def held_out_shapes(family, gathered, predict, unc, y, gpu, x, options, seed):
    """Per GPU: its own curves on 75% of its shapes, MAPE on the rest; for GEMMs
    and attention also with the GPU's shape grid fitted on those 75%
    (``calibrated_grid``); and the black box (``xgboost``, features ``x``) fitted
    on the same 75%."""
    n_g = len(gathered)
    keys = SHAPE_KEYS[family]
    test = np.zeros(len(y), bool)
    shape = np.zeros(len(y), int)  # each row's shape, for the black box's inner split
    for i, (_, _, rows) in enumerate(gathered):
        test[gpu == i] = dk.held_out_split(rows, keys, seed=seed)
        shape[gpu == i] = rows.groupby(keys, sort=False).ngroup().to_numpy()
    train = np.stack([(gpu == i) & ~test for i in range(n_g)])
    init = init_for(family, "portable_l2")
    curves, _ = dk.fit_folds(
        predict, y, train, gpu, init, n_gpus=n_g, offsets=False, options=options
    )
    pred = np.asarray(jax.vmap(predict)(curves))  # [folds, n]
    out = []
    for i, (system, backend, _) in enumerate(gathered):
        sel = (gpu == i) & test
        variants = [("uncalibrated", unc, 0), ("calibrated", pred[i], _n_params(init))]
        variants.append(
            ("xgboost", *kernel_xgboost.fit_predict(x, y, train[i], shape, seed))
        )
        if family in dk.GRID_FAMILIES:
            # The GPU's shape grid on its training shapes' residuals (the package's
            # calibrate_kernels(shape_grids=True)), timed through the same work.
            work = predict.__self__
            rows = train[i]
            shapes = dk.shape_groups(gathered[i][2], family)[~test[gpu == i]]
            moved, _ = dk.with_shape_grid(
                dk.fold(curves, i),
                jax.tree.map(lambda x, r=rows: x[r], work),
                y[rows],
                shapes,
            )
            grid_k = _n_params(init) + int(moved.shape_grid.values.size)
            variants.append(("calibrated_grid", np.asarray(predict(moved)), grid_k))
        for variant, p, k in variants:
            out.append(
                dict(
                    family=family,
                    protocol="held_out_shapes",
                    held_out=SYSTEMS[system],
                    variant=variant,
                    mape=mape(y[sel], p[sel]),
                    n_rows=int(sel.sum()),
                    n_params=k,
                    form=""
                    if variant in ("uncalibrated", "xgboost")
                    else ("portable" if family == "allreduce" else "portable_l2"),
                    backend=backend,
                )
            )
    return out


def kernel_of(gathered) -> list[tuple[str, str] | None]:
    """The kernel each GPU's rows time (``dk.kernel_key``: the vendor and the most
    common ``kernel_source``; one name, e.g. ``vllm_flash_attn``, is a different
    kernel on Intel's XPU); ``None`` without those columns."""
    return [dk.kernel_key(rows) for _, _, rows in gathered]


def held_out_offsets(
    off, held: int, excluded: set, kernels, classes=None
) -> np.ndarray:
    """One fold's per-GPU offsets ``[GPUs, 4]`` with the held-out GPU's set to the
    mean of the training GPUs that run its kernel (``kernels``), those of its class
    (``classes``, :func:`diffmodel.gpu_class` per GPU) where any is, 0 if none runs
    it: GPUs running one implementation (FlashAttention-3, FlashInfer's TRT-LLM
    decode) share its per-block costs and efficiencies, a power-capped GDDR card
    runs it otherwise than an HBM module, and both which kernel a GPU runs (the
    serving stack picks it by architecture) and its class are known before it is
    measured. The same rule as :meth:`diffmodel.kernels.PooledCurves.family_offset`."""
    o = np.array(off)
    same = [
        h
        for h in range(len(kernels))
        if h not in excluded and kernels[h] is not None and kernels[h] == kernels[held]
    ]
    if classes is not None:
        same = [h for h in same if classes[h] == classes[held]] or same
    o[held] = o[same].mean(axis=0) if same else 0.0
    return o


def inner_peers(names: list[str]) -> list[np.ndarray]:
    """For each GPU, the other GPUs whose inner held-out errors choose its form:
    those of its class (PCIe card or NVLink module, :func:`diffmodel.gpu_class`:
    from the catalog's link bandwidth, known before the GPU is measured), or every
    other GPU when it is the only one of its class. A form that ports well across
    the seven HBM modules can still fail on a GDDR card (and the other way round);
    the mean over all GPUs lets the majority class decide for the other."""
    card = np.array([gpu_class(n) == "pcie" for n in names])
    out = []
    for g in range(len(names)):
        others = np.array([h for h in range(len(names)) if h != g], int)
        same = others[card[others] == card[g]]
        out.append(same if len(same) else others)
    return out


def siblings_of(held: int, excluded: set, names: list[str], kernels) -> list[int]:
    """The GPUs (indices; not ``held``, not in ``excluded``) that are siblings of
    the held-out GPU (:func:`diffmodel.sibling_gpus`: within ``SIBLING_RATIO`` on
    every published spec) and run its kernel."""
    sib = set(sibling_gpus(names[held], names))
    return [
        j
        for j in range(len(names))
        if j != held
        and j not in excluded
        and names[j] in sib
        and kernels[j] == kernels[held]
    ]


def training_systems(system: str, systems, siblings: bool = True) -> list[str]:
    """The database systems a held-out ``system`` is fitted on when one GPU is left
    out of an operator's tables (``systems``: those with rows): its siblings among
    them (:func:`diffmodel.sibling_gpus`) where any, else every other. The rule the
    kernel families' inner folds chose (:func:`leave_one_gpu_out`), for the module
    and quantization tables of the sibling scripts; ``siblings=False`` (collectives,
    which run on the node's fabric) every other."""
    others = [s for s in systems if s != system]
    if not siblings:
        return others
    held = SYSTEMS.get(system, system)
    close = [s for s in others if sibling_gpus(held, [SYSTEMS.get(s, s)])]
    return close or others


def choose_form(summary: dict, per_peer: dict, select: str) -> str:
    """The form with the lowest inner ``summary`` error (ties: the first); under
    ``select="one_se"`` the constant roofline instead when the chosen form's gain
    over it, per inner peer (``per_peer``: MAPE per inner held-out GPU), is at most
    its standard error (always with a single peer)."""
    form = min(summary, key=summary.get)
    if select == "one_se" and form != "constant":
        gain = np.asarray(per_peer["constant"]) - np.asarray(per_peer[form])
        se = gain.std(ddof=1) / np.sqrt(gain.size) if gain.size > 1 else np.inf
        if gain.mean() <= se:
            form = "constant"
    return form


def leave_one_gpu_out(
    family, gathered, predict, unc, y, gpu, x, options, inner_options, select="mean"
):
    """Per held-out GPU: partial pooling on the others, the held-out GPU taking the
    offsets of those that run its kernel (:func:`held_out_offsets`); the form chosen
    by an inner leave-one-GPU-out over those others, by the same rule: the lowest
    mean MAPE over the inner held-out GPUs of its class (:func:`inner_peers`;
    ``select="mean"``), the lowest worst one (``"worst"``), or the lowest mean
    unless the constant roofline is within one standard error of it (``"one_se"``,
    the one-standard-error rule with the constant as the simplest model: the
    standard error of the per-peer differences, the constant when there is a single
    peer).

    Where the held-out GPU has siblings among the others (:func:`siblings_of`:
    within ``SIBLING_RATIO`` on every published spec, running its kernel; kernel
    families only, ``dk.SIBLING_FAMILIES``), curves
    pooled over the siblings alone (portable, with the L2 cache; the held-out GPU
    takes their mean offsets) predict it instead, if the same rule did better on
    the inner held-out GPUs of its class that have siblings than the chosen form
    did on those GPUs (form ``siblings:<gpus>``). Beside it, the black box
    (``xgboost``, features ``x``: the work and the GPUs' specs) fitted on the
    other GPUs' rows."""
    n_g = len(gathered)
    kernels = kernel_of(gathered)
    names = [SYSTEMS[system] for system, _, _ in gathered]
    classes = [gpu_class(n) for n in names]
    peers = inner_peers(names)
    summary = np.max if select == "worst" else np.mean
    pairs = [(g, h) for g in range(n_g) for h in range(n_g) if h != g]
    inner_train = np.stack([(gpu != g) & (gpu != h) for g, h in pairs])
    outer_train = np.stack([gpu != g for g in range(n_g)])
    g_rows = jnp.asarray(gpu)

    def with_offsets(curves, offs):
        return np.asarray(
            jax.vmap(lambda c, o: predict(dk.shifted(c, o[g_rows])))(curves, offs)
        )

    inner_err = {}
    peer_err = {}
    outer_pred = {}
    for form in FORMS:
        init = init_for(family, form)
        curves, off = dk.fit_folds(
            predict, y, inner_train, gpu, init, n_gpus=n_g, options=inner_options
        )
        offs = np.stack(
            [
                held_out_offsets(off[f], h, {g, h}, kernels, classes)
                for f, (g, h) in enumerate(pairs)
            ]
        )
        pred = with_offsets(curves, jnp.asarray(offs))
        err = np.full((n_g, n_g), np.nan)
        for f, (g, h) in enumerate(pairs):
            err[g, h] = mape(y[gpu == h], pred[f][gpu == h])
        inner_err[form] = np.array([summary(err[g, peers[g]]) for g in range(n_g)])
        peer_err[form] = err
        curves, off = dk.fit_folds(
            predict, y, outer_train, gpu, init, n_gpus=n_g, options=options
        )
        offs = np.stack(
            [held_out_offsets(off[g], g, {g}, kernels, classes) for g in range(n_g)]
        )
        outer_pred[form] = (with_offsets(curves, jnp.asarray(offs)), _n_params(init))
    # The constant roofline is a candidate too: where the inner folds say no curve
    # generalises better to an unseen GPU, the held-out one gets the constants.
    unc_by_gpu = np.array([mape(y[gpu == h], unc[gpu == h]) for h in range(n_g)])
    inner_err["constant"] = np.array(
        [summary(unc_by_gpu[peers[g]]) for g in range(n_g)]
    )
    outer_pred["constant"] = (np.stack([unc] * n_g), 0)
    peer_err["constant"] = np.broadcast_to(unc_by_gpu, (n_g, n_g))
    candidates = (*FORMS, "constant")
    # Curves pooled over each set of siblings the outer and inner folds need.
    by_kin = family in dk.SIBLING_FAMILIES
    sets: dict[frozenset, int] = {}
    for g in range(n_g if by_kin else 0):
        for h, excluded in ((g, {g}), *((h, {g, h}) for h in peers[g])):
            if sibs := siblings_of(h, excluded, names, kernels):
                sets.setdefault(frozenset(sibs), len(sets))
    if sets:
        sib_init = init_for(family, "portable_l2")
        sib_curves, sib_off = dk.fit_folds(
            predict,
            y,
            np.stack([np.isin(gpu, sorted(s)) for s in sets]),
            gpu,
            sib_init,
            n_gpus=n_g,
            options=options,
        )

    def by_siblings(held: int, sibs: list[int]) -> np.ndarray:
        """Predictions (us) of every row by the curves pooled over ``sibs``, the
        held-out GPU taking their offsets (:func:`held_out_offsets`)."""
        f = sets[frozenset(sibs)]
        others = set(range(n_g)) - set(sibs)
        o = held_out_offsets(sib_off[f], held, others, kernels, classes)
        curves = dk.fold(sib_curves, f)
        return np.asarray(predict(dk.shifted(curves, jnp.asarray(o)[g_rows])))

    out = []
    for g, (system, backend, _) in enumerate(gathered):
        form = choose_form(
            {f: inner_err[f][g] for f in candidates},
            {f: peer_err[f][g, peers[g]] for f in candidates},
            select,
        )
        pred, k = outer_pred[form]
        sel = gpu == g
        inner = ", ".join(f"{f} {inner_err[f][g]:.1f}%" for f in candidates)
        _log(f"  {family} held out {system}: inner CV {inner} -> {form}")
        sibs = siblings_of(g, {g}, names, kernels) if by_kin else []
        if sibs:
            checked = [
                (h, s)
                for h in peers[g]
                if (s := siblings_of(h, {g, h}, names, kernels))
            ]
            by_sib = [
                mape(y[gpu == h], by_siblings(h, s)[gpu == h]) for h, s in checked
            ]
            by_form = [peer_err[form][g, h] for h, _ in checked]
            if checked and np.mean(by_sib) < np.mean(by_form):
                form = "siblings:" + "+".join(names[j] for j in sibs)
                pred = np.stack([by_siblings(g, sibs)] * n_g)
                k = _n_params(sib_init)
            _log(
                f"  {family} held out {system}: siblings {[names[j] for j in sibs]}; "
                f"inner GPUs with one: siblings "
                f"{np.mean(by_sib) if checked else np.nan:.1f}% vs "
                f"{np.mean(by_form) if checked else np.nan:.1f}% -> {form}"
            )
        outer = ", ".join(
            f"{f} {mape(y[sel], outer_pred[f][0][g][sel]):.1f}%" for f in candidates
        )
        _log(f"  {family} held out {system}: (not used) held-out GPU {outer}")
        box, box_k = kernel_xgboost.fit_predict(x, y, gpu != g, gpu, g)
        for variant, p, kk in (
            ("uncalibrated", unc, 0),
            ("calibrated", pred[g], k),
            ("xgboost", box, box_k),
        ):
            out.append(
                dict(
                    family=family,
                    protocol="leave_one_gpu_out",
                    held_out=SYSTEMS[system],
                    variant=variant,
                    mape=mape(y[sel], p[sel]),
                    n_rows=int(sel.sum()),
                    n_params=kk,
                    form=form if variant == "calibrated" else "",
                    backend=backend,
                )
            )
    return out


def table_text(table: pd.DataFrame) -> str:
    """One line per (family, protocol, GPU): uncalibrated and calibrated MAPE,
    with the GPU's shape grid where measured (GEMMs, held-out shapes), and the
    black box (XGBoost) where measured."""
    wide = table.pivot_table(
        index=["family", "protocol", "held_out"],
        columns="variant",
        values="mape",
        sort=False,
    )
    cal = table[table["variant"] == "calibrated"].set_index(
        ["family", "protocol", "held_out"]
    )
    lines = [
        "| family | protocol | held out | uncalibrated % | calibrated % | "
        "+ shape grid % | XGBoost % | rows | params | form |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(r, name):
        v = r.get(name, np.nan)
        return "" if pd.isna(v) else f"{v:.1f}"

    for key, r in wide.iterrows():
        c = cal.loc[key]
        lines.append(
            f"| {' | '.join(key)} | {r['uncalibrated']:.1f} | {r['calibrated']:.1f} "
            f"| {cell(r, 'calibrated_grid')} | {cell(r, 'xgboost')} "
            f"| {c['n_rows']} | {c['n_params']} | {c['form']} |"
        )
    return "\n".join(lines)


def main(
    *,
    out: str | pathlib.Path = "results/gpus",
    rows: int = 250,
    families: tuple[str, ...] = FAMILIES,
    seed: int = 0,
    options: dk.FitOptions | None = None,
    inner_options: dk.FitOptions | None = None,
    select: str = "mean",
) -> pd.DataFrame:
    """Run both protocols on every family, write ``gpus.csv``, print the table.
    ``select``: how the inner leave-one-GPU-out picks the form (mean or worst
    MAPE over the inner held-out GPUs)."""
    if select not in ("mean", "worst", "one_se"):
        raise ValueError(f"select must be 'mean', 'worst' or 'one_se', got {select!r}")
    jax.config.update("jax_enable_x64", True)
    options = (
        dk.FitOptions(adam_steps=400, lbfgs_steps=60) if options is None else options
    )
    inner_options = (
        dk.FitOptions(adam_steps=200, lbfgs_steps=30)
        if inner_options is None
        else inner_options
    )
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for family in families:
        t0 = time.perf_counter()
        gathered = gather(family, rows, seed)
        if len(gathered) < 2:
            _log(f"{family}: fewer than 2 GPUs have rows; skipped")
            continue
        predict, unc, y, gpu, x = family_inputs(family, gathered)
        results += held_out_shapes(
            family, gathered, predict, unc, y, gpu, x, options, seed
        )
        results += leave_one_gpu_out(
            family, gathered, predict, unc, y, gpu, x, options, inner_options, select
        )
        _log(
            f"{family}: {len(gathered)} GPUs, {len(y)} rows, "
            f"{time.perf_counter() - t0:.0f} s"
        )
        pd.DataFrame(results).to_csv(out / "gpus.csv", index=False)
    table = pd.DataFrame(results)
    table.to_csv(out / "gpus.csv", index=False)
    text = table_text(table)
    (out / "gpus.md").write_text(text + "\n")
    print(text)
    return table


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path("results/gpus")
    )
    parser.add_argument("--rows", type=int, default=250, help="rows per GPU and family")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--select",
        choices=("mean", "worst", "one_se"),
        default="mean",
        help="inner leave-one-GPU-out picks the form by mean or by worst MAPE, or "
        "by mean unless the constant roofline is within one standard error",
    )
    args = parser.parse_args()
    main(
        out=args.out,
        rows=args.rows,
        families=tuple(args.families.split(",")),
        seed=args.seed,
        select=args.select,
    )
