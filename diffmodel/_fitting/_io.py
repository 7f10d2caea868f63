"""Saving and loading fitted factors as human-readable JSON, with an exact round trip.

The file keeps the unconstrained parameters (``raw``, exact: Python floats print
their shortest round-trip representation) and, for people, the physical values with
their units per group. Each factor set writes and reads its own fields
(:meth:`~diffmodel._fitting._base.AbstractFactorSet.to_dict`); a bad file is one
``ValueError`` line naming the file and the field.
"""

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from .._fitting._base import (
    AbstractFactorSet,
    check_covariance,
    json_array,
    json_float,
)
from .._fitting._factorsets import FACTOR_SET_CLASSES
from .._fitting._fit import FitResult
from .._fitting._intervals import (
    IntervalModel,
    calibration_from_dict,
    calibration_to_dict,
)
from .._fitting._kinds import FACTOR_KINDS
from .._fitting._split import HostDeviceFactors
from .._jsonfile import read_json_file

FORMAT = "diffmodel.factors/1"


def factors_to_dict(obj: AbstractFactorSet | FitResult) -> dict:
    """A JSON-ready description of a factor set or fit result."""
    fs = obj.factor_set if isinstance(obj, FitResult) else obj
    if not isinstance(fs, AbstractFactorSet):
        raise ValueError(
            f"can only save a factor set or fit result, got {type(obj).__name__}"
        )
    out: dict[str, Any] = {"format": FORMAT, **fs.to_dict()}
    if isinstance(obj, FitResult) and obj.target:
        out["target"] = obj.target
    lap = obj.laplace if isinstance(obj, FitResult) else None
    if lap is not None and lap.regime_noise_sd is not None:
        out["uncertainty"] = {
            "cov_raw": np.asarray(lap.cov_raw, np.float64).tolist(),
            "noise_sd_prefill": lap.regime_noise_sd[0],
            "noise_sd_decode_only": lap.regime_noise_sd[1],
            "unpinned": list(lap.unpinned),
            "at_bound": list(lap.at_bound),
            "trained_on": list(lap.trained_on),
            "calibration": calibration_to_dict(lap.calibration),
        }
        if lap.transfer_noise_sd is not None:
            out["uncertainty"].update(
                transfer_by=lap.transfer_by,
                transfer_noise_sd_prefill=lap.transfer_noise_sd[0],
                transfer_noise_sd_decode_only=lap.transfer_noise_sd[1],
            )
    return out


def uncertainty_from_dict(d: Mapping[str, Any], n_params: int) -> IntervalModel:
    """The :class:`IntervalModel` of a factors file's ``uncertainty`` block (written
    for fit results), for predictive intervals."""
    block = d.get("uncertainty")
    if not isinstance(block, Mapping):
        raise ValueError(
            "field 'uncertainty' is missing: the file holds a factor set without a "
            "fit's posterior (save the FitResult of a fit run with uncertainty=True)"
        )
    cov = check_covariance(
        json_array(block, "cov_raw", (n_params, n_params)), "cov_raw"
    )
    noise = tuple(
        json_float(block, k, positive=True)
        for k in ("noise_sd_prefill", "noise_sd_decode_only")
    )
    trained = block.get("trained_on", [])
    if not isinstance(trained, list) or not all(isinstance(t, str) for t in trained):
        raise ValueError("field 'trained_on': expected a list of deployment labels")
    transfer = None
    by = block.get("transfer_by")
    if by is not None:
        if not isinstance(by, str):
            raise ValueError(f"field 'transfer_by': expected a column name, got {by!r}")
        transfer = tuple(
            json_float(block, f"transfer_noise_sd_{k}", positive=True)
            for k in ("prefill", "decode_only")
        )
    return IntervalModel(
        cov_raw=np.asarray(cov),
        noise_sd=noise,
        trained_on=tuple(trained),
        transfer_noise_sd=transfer,
        transfer_by=by,
        calibration=calibration_from_dict(block.get("calibration")),
    )


def load_uncertainty(path: str | pathlib.Path):
    """The posterior block of a factors file (see :func:`uncertainty_from_dict`)."""

    def parse(d):
        return uncertainty_from_dict(d, factors_from_dict(d).n_params())

    return read_json_file(path, "factors file", parse)


def factors_from_dict(d: Any) -> AbstractFactorSet:
    """Rebuild the factor set described by :func:`factors_to_dict`.

    Raises:
        ValueError: naming the field and what was expected: not a JSON object, an
            unknown format or kind, a missing field, an array of the wrong shape,
            strings, NaN or infinite values.
    """
    if not isinstance(d, Mapping):
        raise ValueError(f"expected a JSON object, got a {type(d).__name__}")
    if d.get("format") != FORMAT:
        hint = ""
        if d.get("format") == "diffmodel.kernel-host/1":
            hint = (
                "; it holds host costs from 'diffmodel fit-host': pass it as --host "
                "(diffmodel.load_host_fit in Python)"
            )
        raise ValueError(
            "not a diffmodel factors file (field 'format': expected "
            f"{FORMAT!r}, got {d.get('format')!r}){hint}"
        )
    kind = d.get("kind")
    kinds = (*FACTOR_KINDS, "host-device")
    if kind not in kinds:
        raise ValueError(f"field 'kind': expected one of {kinds}, got {kind!r}")
    classes = {**FACTOR_SET_CLASSES, "host-device": HostDeviceFactors}
    fs = classes[kind].from_dict(d)
    if "factors" in d:
        _check_physical(d["factors"], fs.to_dict().get("factors"), "factors")
    return fs


def _check_physical(given: Any, derived: Any, where: str) -> None:
    """``ValueError`` where the file's physical values (``factors``, written for
    people) differ from those its ``raw`` parameters give: the values used are the
    raw ones, so an edit of the physical block alone would be ignored silently."""
    if isinstance(derived, Mapping):
        if not isinstance(given, Mapping) or set(given) != set(derived):
            raise ValueError(
                f"field {where!r}: expected the keys {sorted(derived)}, got "
                f"{sorted(given) if isinstance(given, Mapping) else _short(given)}"
            )
        for key in derived:
            _check_physical(given[key], derived[key], f"{where}.{key}")
        return
    if isinstance(derived, list | tuple):
        if not isinstance(given, list | tuple) or len(given) != len(derived):
            raise ValueError(f"field {where!r}: expected {len(derived)} values")
        for i, (g, v) in enumerate(zip(given, derived, strict=True)):
            _check_physical(g, v, f"{where}[{i}]")
        return
    if isinstance(derived, int | float) and not isinstance(derived, bool):
        ok = isinstance(given, int | float) and not isinstance(given, bool)
        if not ok or not np.isclose(given, derived, rtol=1e-6, atol=1e-12):
            raise ValueError(
                f"field {where!r} is {_short(given)} but the file's 'raw' parameters "
                f"give {derived:.6g}: the raw values are the fitted ones; edit "
                "neither by hand (build a diffmodel.Factors instead)"
            )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def save_factors(obj, path: str | pathlib.Path) -> pathlib.Path:
    """Write a factor set or fit result to ``path`` as JSON; returns the path."""
    path = pathlib.Path(path)
    path.write_text(json.dumps(factors_to_dict(obj), indent=2) + "\n")
    return path


def load_factors(path: str | pathlib.Path) -> AbstractFactorSet:
    """Read a factor set written by :func:`save_factors`.

    Raises:
        ValueError: one line, ``factors file <path>: ...``, naming the bad field.
    """
    return read_json_file(path, "factors file", factors_from_dict)
