"""One set of portable curves from several GPUs' kernel tables (partial pooling), and
the curves it gives a GPU, measured or not.

:func:`calibrate_kernels_pooled` fits each family with :func:`fit_folds` (one fold, all
rows): shared portable curves plus a small offset per GPU. :meth:`PooledCurves.for_gpu`
turns them into the :class:`KernelCurves` of one GPU: a pooled GPU keeps its own
offsets; an unseen GPU takes, per family, the mean offsets of the pooled GPUs that run
the same kernel (the serving stack picks the kernel by architecture, so it is known
before the GPU is measured), those of its class (PCIe card or NVLink module) where
any is, and the shared curves (offset 0) where none does.
"""

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from .._kernel_families import ALL_FAMILIES as FAMILIES
from .._model._hardware import (
    canonical_hardware,
    gpu_class,
    hardware,
    hardware_system,
    sibling_gpus,
)
from ._calibrate import FitOptions, family_rows, family_work
from ._curves import KernelCurves, default_allreduce_curve, init_curves
from ._dsa import DSA, DSA_FAMILIES
from ._mla import MLA, MLA_FAMILIES, fit_module_curves_pooled
from ._pooled import N_OFFSETS, fit_folds, fold, shifted
from ._work import allreduce_kernel_us

Kernel = tuple[str, str] | None

# The families a GPU's siblings time for it (:func:`curves_from_other_gpus`): its
# kernels, not its collectives. An all-reduce runs on the node's fabric (an 8-GPU
# NVSwitch board, a 72-GPU NVLink rack), which the chip's specs that make
# siblings do not describe: B200 and GB200 are siblings on those and run
# all-reduce on different fabrics. (Left out after the all-reduce lines of
# ``experiments/gpus.py``'s leave one GPU out came out worse with siblings than the
# constant roofline on B200, B300 and GB300: 27.2 / 29.0 / 31.1 against 19.1 /
# 20.0 / 30.6%.)
SIBLING_FAMILIES = tuple(f for f in FAMILIES if f != "allreduce")


def kernel_key(rows: pd.DataFrame) -> Kernel:
    """The kernel a table's rows time: ``(vendor, kernel_source)``, the vendor being
    the first word of ``device`` (one ``kernel_source`` name can be two vendors'
    kernels); ``None`` where the table lacks either column."""
    if "kernel_source" not in rows or "device" not in rows or rows.empty:
        return None
    vendor = str(rows["device"].iloc[0]).split()[0]
    return vendor, str(rows["kernel_source"].mode().iloc[0])


def table_kernels(tables: dict[str, pd.DataFrame]) -> dict[str, Kernel]:
    """:func:`kernel_key` of each family a GPU's loaded tables have rows for."""
    out = {}
    for fam in FAMILIES:
        try:
            out[fam] = kernel_key(family_rows(tables, fam))
        except ValueError:
            continue
    return out


def kernels_vendor(kernels: Mapping[str, Kernel]) -> str | None:
    """The vendor of the kernels a GPU's tables time (:func:`table_kernels`), or
    ``None`` where no table names it."""
    return next((k[0] for k in kernels.values() if k is not None), None)


@dataclasses.dataclass(frozen=True)
class PooledCurves:
    """Portable curves shared by several GPUs, with each GPU's offsets.

    Attributes:
        shared: the shared curves (offset 0: a typical GPU of the pool).
        offsets: per GPU (catalog name), per family, the offset ``[4]`` fitted to its
            rows (compute and bandwidth logits of ``eta_max``, log kernel floor, log
            per-unit cost; :func:`~diffmodel.kernels.shifted`).
        kernels: per GPU, per family, the kernel its rows time (:func:`kernel_key`).
        rows: per GPU, per family, the rows it was fitted on.
    """

    shared: KernelCurves
    offsets: Mapping[str, Mapping[str, np.ndarray]]
    kernels: Mapping[str, Mapping[str, Kernel]]
    rows: Mapping[str, Mapping[str, int]]

    def family_offset(
        self, gpu: str, family: str, kernel: Kernel = None
    ) -> tuple[np.ndarray, tuple[str, ...]]:
        """``(offset, GPUs it came from)`` of one family for ``gpu``: its own if it
        was pooled, else the mean of the pooled GPUs whose rows time ``kernel``,
        restricted to those of ``gpu``'s class (:func:`~diffmodel.gpu_class`: a PCIe
        card or an NVLink module) where any is, else zeros (no GPUs).

        The class matters because one kernel runs differently on a power-capped
        GDDR card than on an HBM module: chosen by class, the leave-one-GPU-out
        figures of ``experiments/gpus.py`` moved by -3.1 points (L40S GEMM) to +0.5
        (RTX PRO 6000 FP8 GEMM), mean over all lines 23.8 -> 23.4%."""
        if family in self.offsets.get(gpu, {}):
            return np.asarray(self.offsets[gpu][family]), (gpu,)
        same = tuple(
            g
            for g, fams in self.offsets.items()
            if family in fams
            and kernel is not None
            and self.kernels.get(g, {}).get(family) == kernel
        )
        if not same:
            return np.zeros(N_OFFSETS), ()
        cls = gpu_class(gpu)
        same = tuple(g for g in same if gpu_class(g) == cls) or same
        return np.mean([self.offsets[g][family] for g in same], axis=0), same

    def for_gpu(
        self, gpu: str, kernels: Mapping[str, Kernel] | None = None
    ) -> KernelCurves:
        """The :class:`KernelCurves` of ``gpu`` (a catalog name or alias), timed at
        its specs. ``kernels``: per family, the kernel it runs (:func:`table_kernels`
        of its tables; only its metadata is read), used when ``gpu`` was not pooled."""
        name = canonical_hardware(gpu)
        hardware(name)  # an unknown GPU fails here, by name
        kernels = kernels or {}
        moved = {
            fam: shifted(
                getattr(self.shared, fam),
                jnp.asarray(self.family_offset(name, fam, kernels.get(fam))[0]),
            )
            for fam in FAMILIES
        }
        return KernelCurves(**moved, hardware=name)


def _init(family: str):
    if family == "allreduce":
        # The ring alone: how a transfer scales with the GPU count belongs to the
        # interconnect (a PCIe host fabric, NVLink, NVSwitch), and one exponent
        # shared by GPUs on different fabrics describes none of them.
        return default_allreduce_curve(portable=True, gpu_exponent=False, hop=True)
    return init_curves(family, portable=True)


def _family_data(family: str, per_gpu: list[tuple[str, pd.DataFrame]]):
    """``(predict(curves), latency us, GPU index)`` over every GPU's rows."""
    parts, ys, idx = [], [], []
    for i, (gpu, rows) in enumerate(per_gpu):
        hw = hardware(gpu)
        if family == "allreduce":
            n = len(rows)
            parts.append(
                (
                    rows["bytes"].to_numpy(float),
                    rows["num_gpus"].to_numpy(float),
                    jax.tree.map(lambda x, n=n: jnp.full(n, x), hw),
                )
            )
        else:
            parts.append(family_work(family, rows, hw))
        ys.append(rows["latency_us"].to_numpy(float))
        idx.append(np.full(len(rows), i))
    data = jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)
    if family == "allreduce":
        b, n, hw = data

        def predict(c):
            return allreduce_kernel_us(b, n, c, hw)

    else:
        predict = data.time_us
    return predict, np.concatenate(ys), np.concatenate(idx)


def calibrate_kernels_pooled(
    tables: Mapping[str, dict[str, pd.DataFrame]],
    *,
    rows_per_gpu: int = 1000,
    penalty: float = 1.0,
    seed: int = 0,
    options: FitOptions | None = None,
    progress: Callable[[str], None] | None = None,
) -> PooledCurves:
    """Portable curves fitted on the kernel tables of several GPUs at once.

    ``tables``: per GPU (catalog name or database system, e.g. ``"a100_sxm"``), its
    loaded tables (:func:`load_system_tables`). Each family is fitted on the rows of
    every GPU that has them (at most ``rows_per_gpu`` per GPU, sampled with
    ``seed``; each GPU weighs the same whatever its rows), as shared curves plus a
    per-GPU offset held near 0 by ``penalty * mean(offset^2)``. A family no GPU
    has keeps its uncalibrated default curves, reported through ``progress``.
    ``options``: the fit's step budgets (default :class:`FitOptions`).
    Raises ``ValueError`` for an empty ``tables`` or an unknown GPU.
    """
    if not tables:
        raise ValueError("tables: expected the loaded tables of at least one GPU")
    if rows_per_gpu < 1:
        raise ValueError(f"rows_per_gpu must be at least 1, got {rows_per_gpu}")
    say = progress or (lambda _: None)
    named = {canonical_hardware(g): t for g, t in tables.items()}
    for gpu in named:
        hardware(gpu)
    shared, offsets, kernels, counts = {}, {}, {}, {}
    for fam in FAMILIES:
        per_gpu = []
        for gpu, t in named.items():
            try:
                rows = family_rows(t, fam)
            except ValueError:
                continue
            if len(rows) > rows_per_gpu:
                rows = rows.sample(rows_per_gpu, random_state=seed)
            per_gpu.append((gpu, rows.reset_index(drop=True)))
        if not per_gpu:
            shared[fam] = _init(fam)
            say(f"skipped {fam}: no GPU has rows (its curves stay uncalibrated)")
            continue
        predict, y, idx = _family_data(fam, per_gpu)
        curves, off = fit_folds(
            predict,
            y,
            np.ones((1, len(y)), bool),
            idx,
            _init(fam),
            n_gpus=len(per_gpu),
            penalty=penalty,
            options=options,
        )
        shared[fam] = fold(curves, 0)
        for i, (gpu, rows) in enumerate(per_gpu):
            offsets.setdefault(gpu, {})[fam] = np.asarray(off[0, i])
            kernels.setdefault(gpu, {})[fam] = kernel_key(rows)
            counts.setdefault(gpu, {})[fam] = len(rows)
        say(f"calibrated {fam} on {len(y)} kernels of {len(per_gpu)} GPUs")
    return PooledCurves(
        shared=KernelCurves(**shared, hardware=next(iter(named))),
        offsets=offsets,
        kernels=kernels,
        rows=counts,
    )


def curves_from_other_gpus(
    system: str,
    pool: Sequence[str] | None = None,
    *,
    backend: str = "vllm",
    version: str | None = None,
    rows_per_gpu: int = 1000,
    siblings: bool = True,
    options: FitOptions | None = None,
    progress: Callable[[str], None] | None = None,
) -> KernelCurves:
    """Curves for GPU ``system`` (a database system such as ``"h100_sxm"`` or a
    catalog name) fitted on other GPUs' tables alone
    (:func:`calibrate_kernels_pooled`), never on its own times.

    ``pool``: the database systems to fit on; ``None`` for every other system whose
    tables time the same vendor's kernels as ``system``'s (an NVIDIA GPU is not
    pooled with Intel's XPU kernels). Only the kernel names of ``system``'s own
    tables are read (:func:`table_kernels`), to give each family the offsets of the
    pooled GPUs that run its kernel. Systems without ``backend`` tables are skipped
    and said through ``progress``. The MLA and DSA module curves
    (``KernelCurves.mla``, ``.dsa``) are fitted on the pooled systems that have
    those module tables (:func:`fit_module_curves_pooled`).

    ``siblings``: where the pool holds siblings of ``system``
    (:func:`~diffmodel.sibling_gpus`: within 1.5x on every published spec, e.g. H200
    for H100, the other Blackwell modules for B200), each kernel family
    (:data:`SIBLING_FAMILIES`: not the all-reduce) whose kernel a
    sibling runs (or any family, where ``system`` has no tables to name its
    kernels) takes curves pooled over the siblings alone instead, and so do the MLA
    and DSA modules where a sibling has their tables: in
    ``experiments/gpus.py``'s leave one GPU out, the inner folds chose them over
    curves pooled over every GPU for every GPU with siblings. Raises
    ``ValueError`` naming unknown systems or an empty pool.
    """
    from ._database import KERNEL_TABLES, list_systems, load_system_tables

    say = progress or (lambda _: None)
    name = canonical_hardware(system)
    system = hardware_system(name)
    known = list_systems()

    def tables_of(s):
        try:
            return load_system_tables(
                s,
                backend,
                version,
                families=(*KERNEL_TABLES, *MLA_FAMILIES, *DSA_FAMILIES),
                skip_missing=True,
            )
        except ValueError as err:
            say(f"skipped {s}: {err}")
            return None

    own = {}
    if system in known:
        mine = tables_of(system)
        own = table_kernels(mine) if mine is not None else {}
    vendor = kernels_vendor(own)
    candidates = [s for s in known if s != system] if pool is None else list(pool)
    unknown = [s for s in candidates if s not in known]
    if unknown:
        raise ValueError(f"pool: {unknown} not in the kernel database {list(known)}")
    tables = {}
    for s in candidates:
        t = tables_of(s)
        if t is None:
            continue
        if pool is None and vendor is not None:
            theirs = kernels_vendor(table_kernels(t))
            if theirs != vendor:
                say(f"skipped {s}: {theirs}'s kernels, not {vendor}'s")
                continue
        tables[s] = t
    if not tables:
        raise ValueError(f"pool: no other system has {backend} tables")
    say(f"pooling {backend} tables of {list(tables)}")
    pooled = calibrate_kernels_pooled(
        tables, rows_per_gpu=rows_per_gpu, options=options, progress=say
    )
    for fam in FAMILIES:
        _, source = pooled.family_offset(name, fam, own.get(fam))
        say(f"{fam}: offsets of {list(source) or 'none (the shared curves)'}")
    curves = pooled.for_gpu(name, own)
    sibs = sibling_gpus(name, tables) if siblings else ()
    close_tables = {hardware_system(g): tables[hardware_system(g)] for g in sibs}
    if sibs:
        say(f"siblings of {name} in the pool: {list(sibs)}")
        close = calibrate_kernels_pooled(
            close_tables,
            rows_per_gpu=rows_per_gpu,
            options=options,
            progress=say,
        )
        by_siblings = close.for_gpu(name, own)
        moved = {}
        for fam in SIBLING_FAMILIES:
            _, source = close.family_offset(name, fam, own.get(fam))
            has = any(fam in close.offsets.get(s, {}) for s in sibs)
            if source or (has and own.get(fam) is None):
                moved[fam] = getattr(by_siblings, fam)
                say(f"{fam}: curves pooled over the siblings {list(source or sibs)}")
        curves = dataclasses.replace(curves, **moved)

    def module_curves(kind, pool):
        return fit_module_curves_pooled(
            kind,
            pool,
            {s: hardware(s) for s in pool},
            per_gpu=rows_per_gpu,
            options=options,
            progress=say,
        )

    modules = {}
    for kind in (MLA, DSA):
        # The siblings' modules where any sibling has them, as for the kernels. On
        # the MLA tables (experiments/mla_kernels.py, one GPU left out) that was
        # mixed: the kernel sum on module curves from siblings 17.4 / 16.6% median
        # (context / generation) against 17.2 / 15.1% from every other GPU; the
        # per-table module fits 17.5 / 17.7% against 19.6 / 16.7%, and DSA prefill
        # 27.3% against 31.0%.
        fitted = module_curves(kind, close_tables) if close_tables else None
        if fitted is not None:
            say(f"{kind.name}: module curves pooled over the siblings {list(sibs)}")
        modules[kind.name] = module_curves(kind, tables) if fitted is None else fitted
    return dataclasses.replace(curves, **modules)
