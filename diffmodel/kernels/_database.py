"""The kernel database of ``aiconfigurator-core``, read in place from the installed
package (the ``aic`` extra: ``pip install 'diffmodel[aic]'``).

Layout (``aiconfigurator_core/systems/``): ``<system>.yaml`` per GPU system (peaks,
HBM bandwidth, links, GPUs per node) and ``data/<system>/<folder>/<backend>/<version>/
*.parquet`` measured kernel tables (latency in ms), with ``<folder>`` ``gemm``,
``attention`` (context and generation), ``moe``, ``comm`` (all-reduce), ``mla``
(vLLM's MLA attention modules), ``sparse_attention`` (its DSA modules) and others
this package does not model (quantize, ...). Versions differ by folder (a system can
have GEMMs measured with vLLM 0.24.0 and all-reduce with 0.19.0); without an explicit
version each family takes the newest one of its folder.

The shared slice ``../shared/data/kernels/h100_sxm`` holds the same files flat and is
read with :func:`~diffmodel.kernels.load_kernel_tables`.
"""

import dataclasses
import importlib.resources
import pathlib
import re

import pandas as pd

from ._dsa import load_dsa_module
from ._mla import load_mla_module
from ._tables import AIC_FILES, load_allreduce, load_attention, load_gemm, load_moe

PACKAGE = "aiconfigurator_core"

# (folder in the database, file) of each family this package models.
FAMILY_FILES: dict[str, tuple[str, str]] = {
    "gemm": ("gemm", AIC_FILES["gemm"]),
    "prefill_attention": ("attention", AIC_FILES["prefill_attention"]),
    "decode_attention": ("attention", AIC_FILES["decode_attention"]),
    "moe": ("moe", AIC_FILES["moe"]),
    "allreduce": ("comm", AIC_FILES["allreduce"]),
    "mla_context": ("mla", "mla_context_module_perf.parquet"),
    "mla_generation": ("mla", "mla_generation_module_perf.parquet"),
    "dsa_context": ("sparse_attention", "dsa_context_module_perf.parquet"),
    "dsa_generation": ("sparse_attention", "dsa_generation_module_perf.parquet"),
}
# What :func:`load_system_tables` loads unless told: the kernel families (the MLA
# modules only where asked for: most systems' calibration does not need them).
KERNEL_TABLES: tuple[str, ...] = (
    "gemm",
    "prefill_attention",
    "decode_attention",
    "moe",
    "allreduce",
)
_LOADERS = {
    "gemm": load_gemm,
    "prefill_attention": load_attention,
    "decode_attention": load_attention,
    "moe": load_moe,
    "allreduce": load_allreduce,
    "mla_context": load_mla_module,
    "mla_generation": load_mla_module,
    "dsa_context": load_dsa_module,
    "dsa_generation": load_dsa_module,
}


def database_root() -> pathlib.Path:
    """``aiconfigurator_core/systems`` of the installed package.

    Raises ``ValueError`` (one line, naming the extra) when it is not installed.
    """
    try:
        root = importlib.resources.files(PACKAGE) / "systems"
    except ModuleNotFoundError:
        raise ValueError(
            "the kernel database needs the 'aiconfigurator-core' package: "
            "pip install 'diffmodel[aic]' (or aiconfigurator-core==0.12.0)"
        ) from None
    root = pathlib.Path(str(root))
    if not (root / "data").is_dir():
        raise ValueError(f"aiconfigurator-core has no systems/data folder at {root}")
    return root


def database_available() -> bool:
    """True when :func:`database_root` finds the installed database."""
    try:
        database_root()
    except ValueError:
        return False
    return True


def _version_key(v: str) -> tuple:
    # "0.5.6.post2" < "0.5.10" < "0.24.0": numeric parts compare as numbers.
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.]", v))


@dataclasses.dataclass(frozen=True)
class TableSet:
    """One measured table of the database: where it is and what it holds."""

    system: str
    family: str
    backend: str
    version: str
    path: pathlib.Path


def list_kernel_tables(root: str | pathlib.Path | None = None) -> pd.DataFrame:
    """Every (system, family, backend, version) of the modelled families present.

    Columns ``system, family, backend, version, path``, sorted; ``root`` defaults
    to :func:`database_root`.
    """
    root = database_root() if root is None else pathlib.Path(root)
    rows = []
    for system_dir in sorted((root / "data").iterdir()):
        for family, (folder, file) in FAMILY_FILES.items():
            for path in sorted(system_dir.glob(f"{folder}/*/*/{file}")):
                rows.append(
                    dict(
                        system=system_dir.name,
                        family=family,
                        backend=path.parent.parent.name,
                        version=path.parent.name,
                        path=path,
                    )
                )
    cols = ["system", "family", "backend", "version", "path"]
    return pd.DataFrame(rows, columns=cols)


def list_systems(root: str | pathlib.Path | None = None) -> tuple[str, ...]:
    """Systems with a ``<system>.yaml`` and measured tables in the database."""
    listing = list_kernel_tables(root)
    return tuple(sorted(set(listing["system"])))


def find_table(
    system: str,
    backend: str,
    family: str,
    version: str | None = None,
    *,
    root: str | pathlib.Path | None = None,
) -> TableSet:
    """The table of one family: ``version`` or the newest one of its folder.

    Raises a one-line ``ValueError`` naming what is missing (system, backend, family
    or version) and what exists.
    """
    if family not in FAMILY_FILES:
        raise ValueError(
            f"unknown family {family!r}; expected one of {list(FAMILY_FILES)}"
        )
    listing = list_kernel_tables(root)
    if system not in set(listing["system"]):
        raise ValueError(
            f"system {system!r} not in the kernel database; known: "
            f"{sorted(set(listing['system']))}"
        )
    here = listing[listing["system"] == system]
    if backend not in set(here["backend"]):
        raise ValueError(
            f"system {system!r} has no {backend!r} tables; backends: "
            f"{sorted(set(here['backend']))}"
        )
    here = here[(here["backend"] == backend) & (here["family"] == family)]
    if here.empty:
        raise ValueError(
            f"system {system!r}, backend {backend!r} has no {family} table"
        )
    versions = sorted(here["version"], key=_version_key)
    if version is None:
        version = versions[-1]
    elif version not in versions:
        raise ValueError(
            f"system {system!r}, backend {backend!r}: no {family} table at version "
            f"{version!r}; versions: {versions}"
        )
    path = here[here["version"] == version]["path"].iloc[0]
    return TableSet(system, family, backend, version, pathlib.Path(path))


def load_system_tables(
    system: str,
    backend: str = "vllm",
    version: str | None = None,
    *,
    families: tuple[str, ...] = KERNEL_TABLES,
    root: str | pathlib.Path | None = None,
    skip_missing: bool = False,
    progress=None,
) -> dict[str, pd.DataFrame]:
    """Loaded tables (latency in us, as :func:`load_kernel_tables`) of one system.

    ``version``: one version for every family (an error where a family lacks it), or
    ``None`` for the newest of each. ``skip_missing``: leave out families the system
    does not have, reporting each through ``progress`` (a callable taking one line),
    instead of raising. An empty table is an error, never a silent zero-row family.
    ``families``: names of :data:`FAMILY_FILES`; by default the kernel tables
    (:data:`KERNEL_TABLES`), without vLLM's MLA modules (add ``"mla_context"`` and
    ``"mla_generation"`` for :attr:`KernelCurves.mla`).
    """
    unknown = [f for f in families if f not in FAMILY_FILES]
    if unknown:
        raise ValueError(
            f"unknown table families {unknown}; expected some of {list(FAMILY_FILES)}"
        )
    out = {}
    for fam in families:
        try:
            found = find_table(system, backend, fam, version, root=root)
        except ValueError as err:
            if not skip_missing:
                raise
            if progress:
                progress(f"skipped {fam}: {err}")
            continue
        table = _LOADERS[fam](found.path)
        if table.empty:
            raise ValueError(f"{found.path} has no rows")
        table.attrs.update(system=system, backend=backend, version=found.version)
        out[fam] = table
    if not out:
        what = f"system {system!r}, backend {backend!r}"
        listed = list_kernel_tables(root)
        listed = listed[listed.system == system]
        if version is not None:
            mine = listed[listed.backend == backend]
            have = sorted(set(mine.version))
            raise ValueError(
                f"{what}: no tables of version {version!r}; versions: "
                f"{', '.join(have) or 'none'}"
            )
        backends = sorted(set(listed[listed.family.isin(families)].backend))
        raise ValueError(
            f"{what}: no tables; backends with them: {', '.join(backends) or 'none'}"
        )
    return out


def system_spec(system: str, root: str | pathlib.Path | None = None) -> dict:
    """The parsed ``<system>.yaml`` of the database (``gpu``, ``node`` sections)."""
    import yaml

    root = database_root() if root is None else pathlib.Path(root)
    path = root / f"{system}.yaml"
    if not path.is_file():
        known = sorted(
            p.stem for p in root.glob("*.yaml") if (root / "data" / p.stem).is_dir()
        )
        raise ValueError(
            f"no system YAML {path.name} in the database; systems: {known}"
        )
    spec = yaml.safe_load(path.read_text())
    for section in ("gpu", "node"):
        if not isinstance(spec.get(section), dict):
            raise ValueError(f"{path.name} has no {section!r} section")
    return spec
