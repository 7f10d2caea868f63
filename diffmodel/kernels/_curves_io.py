"""Kernel curves as human-readable JSON files, with an exact round trip (raw values
kept as Python floats print them; physical values beside them for people)."""

import json
import pathlib
from typing import Any

import equinox as eqx
import jax
import numpy as np

from .._jsonfile import read_json_file
from ..kernels._curves import (
    FORMAT_VERSION,
    KERNEL_FAMILIES,
    AllReduceCurve,
    KernelCurves,
    RooflineCurves,
    _need,
    init_curves,
)
from ._dsa import DsaCurves
from ._mla import MlaCurves

# Families added after files of this format were first written: a file without one
# loads it uncalibrated (the physical priors, portable as the file's MoE curves),
# as calibrating a GPU without such tables leaves it.
ADDED_FAMILIES: tuple[str, ...] = ("moe_fp8", "moe_w4a16", "gemm_nvfp4", "moe_nvfp4")


def curves_to_json(curves: KernelCurves) -> dict[str, Any]:
    """A JSON-able dict of all families (raw values exact, physical ones readable)."""
    out: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "hardware": curves.hardware,
        "description": (
            "eta(x) = eta_max * sigmoid(slope * (ln x - ln x_half)); x in FLOP for "
            "'flops' curves, bytes for 'bandwidth' curves; occupancy o(u) = "
            "sigmoid(slope * (ln u - ln u_half)) at u parallel work units; kernel "
            "time, us = latency_us + s * unit_ns / 1000 + smooth_max(FLOP / (peak * "
            "eta_flops * o), bytes / (hbm_bw * eta_bw * o)) * 1e6, s the thread "
            "blocks scheduled (u unless the kernel schedules idle ones), smooth_max(a, "
            "b) = (a^q + b^q)^(1/q) with q = overlap_q where fitted, else 4; "
            "kernels with a tuned tile configuration saturate at tuned_eta_max = "
            "sigmoid(logit(eta_max) + raw_tuned) of the compute peak; all-reduce time, "
            "us = latency_us + 2 (n-1)/n bytes / (link_bw * eta(bytes)) * 1e6"
        ),
    }
    for f in KERNEL_FAMILIES:
        out[f] = getattr(curves, f).to_json()
    out["allreduce"] = curves.allreduce.to_json()
    if curves.mla is not None:
        out["mla"] = curves.mla.to_json()
    if curves.dsa is not None:
        out["dsa"] = curves.dsa.to_json()
    return out


def curves_from_json(obj: dict[str, Any]) -> KernelCurves:
    """Inverse of :func:`curves_to_json` (older files lack :data:`ADDED_FAMILIES`,
    which load uncalibrated; a file without ``mla`` or ``dsa`` loads without
    those module curves)."""
    version = _need(obj, "format_version", "KernelCurves")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"unsupported curves format_version {version!r}; expected {FORMAT_VERSION}"
        )
    fams = {
        f: RooflineCurves.from_json(_need(obj, f, "KernelCurves"))
        for f in KERNEL_FAMILIES
        if f not in ADDED_FAMILIES or f in obj
    }
    for f in ADDED_FAMILIES:
        fams.setdefault(f, init_curves(f, portable=fams["moe"].portable))
    curves = KernelCurves(
        **fams,
        allreduce=AllReduceCurve.from_json(_need(obj, "allreduce", "KernelCurves")),
        mla=MlaCurves.from_json(obj["mla"]) if "mla" in obj else None,
        dsa=DsaCurves.from_json(obj["dsa"]) if "dsa" in obj else None,
        hardware=str(_need(obj, "hardware", "KernelCurves")),
    )
    _check_finite(curves)
    return curves


def _check_finite(curves: KernelCurves) -> None:
    """``ValueError`` naming the first parameter that is NaN or infinite (a curve
    with one predicts NaN for every kernel it times)."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(curves):
        if eqx.is_array(leaf) and not np.all(np.isfinite(np.asarray(leaf))):
            name = jax.tree_util.keystr(path).lstrip(".")
            raise ValueError(f"{name}: expected finite numbers, got {np.asarray(leaf)}")


def save_curves(curves: KernelCurves, path: str | pathlib.Path) -> pathlib.Path:
    """Write ``curves`` as indented JSON to ``path``; returns the path."""
    path = pathlib.Path(path)
    path.write_text(json.dumps(curves_to_json(curves), indent=2) + "\n")
    return path


def load_curves(path: str | pathlib.Path) -> KernelCurves:
    """Read curves written by :func:`save_curves`.

    Raises:
        ValueError: one line, ``curves file <path>: ...``, naming the bad field.
    """
    errors = (ValueError, KeyError, TypeError, AttributeError)
    return read_json_file(path, "curves file", curves_from_json, errors)
