"""Saving and loading a :class:`KernelHostFit` as human-readable JSON.

The file holds the fitted host costs (us) with their posterior sd, the posterior
covariance of their logs, the in-sample noise by regime, the deployments the rows
came from, what the fit could not determine, the interval multipliers held-out rows
measured (``calibration``, null when not calibrated), and the kernel curves of the
GPU the device side was summed on (exact: the curves' own JSON). It round-trips
exactly; a bad file is one ``ValueError`` line naming the file and the field.
"""

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from .._jsonfile import read_json_file
from ..kernels._curves_io import curves_from_json, curves_to_json
from ..kernels._step import HOST_TERMS, HostCosts
from ._base import check_covariance
from ._intervals import calibration_from_dict, calibration_to_dict
from ._kernel_host import KernelHostFit

FORMAT = "diffmodel.kernel-host/1"


def host_fit_to_dict(fit: KernelHostFit) -> dict[str, Any]:
    """A JSON-ready description of ``fit`` (costs in us)."""
    if not isinstance(fit, KernelHostFit):
        raise ValueError(
            f"can only save a KernelHostFit (diffmodel.fit_host_on_kernels), got "
            f"{type(fit).__name__}"
        )
    values = fit.host.as_dict()
    return {
        "format": FORMAT,
        "terms": list(fit.terms),
        "host_us": {t: float(values[t]) for t in HOST_TERMS},
        "sd_us": {t: float(fit.sd_us[t]) for t in fit.terms},
        "cov_raw": np.asarray(fit.cov_raw, np.float64).tolist(),
        "noise_sd_prefill": float(fit.noise_sd[0]),
        "noise_sd_decode_only": float(fit.noise_sd[1]),
        "loss": float(fit.loss),
        "n_rows": int(fit.n_rows),
        "trained_on": list(fit.trained_on),
        "converged": bool(fit.converged),
        "unpinned": list(fit.unpinned),
        "curves": curves_to_json(fit.curves),
        "calibration": calibration_to_dict(fit.calibration),
        "transfer_calibration": calibration_to_dict(fit.transfer_calibration),
    }


def _field(d: Mapping[str, Any], name: str):
    if name not in d:
        raise ValueError(f"missing field {name!r}")
    return d[name]


def host_fit_from_dict(d: Mapping[str, Any]) -> KernelHostFit:
    """Inverse of :func:`host_fit_to_dict`."""
    if not isinstance(d, Mapping):
        raise ValueError(f"expected a JSON object, got {type(d).__name__}")
    fmt = _field(d, "format")
    if fmt != FORMAT:
        raise ValueError(f"field 'format': expected {FORMAT!r}, got {fmt!r}")
    terms = tuple(_field(d, "terms"))
    unknown = [t for t in terms if t not in HOST_TERMS]
    if not terms or unknown:
        raise ValueError(f"field 'terms': names from {HOST_TERMS}, got {list(terms)}")
    host_us = _field(d, "host_us")
    if not isinstance(host_us, Mapping) or set(host_us) - set(HOST_TERMS):
        raise ValueError(f"field 'host_us': costs named from {HOST_TERMS} expected")
    values = {t: float(host_us.get(t, 0.0)) for t in HOST_TERMS}
    if not all(np.isfinite(v) and v >= 0.0 for v in values.values()):
        raise ValueError(f"field 'host_us': finite costs >= 0 expected, got {host_us}")
    idle = [t for t, v in values.items() if t not in terms and v != 0.0]
    if idle:
        raise ValueError(
            f"field 'host_us': {idle[0]!r} is not among the fitted terms "
            f"{list(terms)}, so its cost must be 0 (it would be ignored)"
        )
    cov = np.asarray(_field(d, "cov_raw"), np.float64)
    if cov.shape != (len(terms), len(terms)) or not np.isfinite(cov).all():
        raise ValueError(
            f"field 'cov_raw': a finite {len(terms)}x{len(terms)} matrix expected, "
            f"got shape {cov.shape}"
        )
    check_covariance(cov, "cov_raw")
    sd = _field(d, "sd_us")
    noise = tuple(
        float(_field(d, k)) for k in ("noise_sd_prefill", "noise_sd_decode_only")
    )
    if not all(np.isfinite(v) and v > 0.0 for v in noise):
        raise ValueError(
            f"fields 'noise_sd_prefill', 'noise_sd_decode_only': finite sds > 0 "
            f"expected, got {list(noise)}"
        )
    return KernelHostFit(
        curves=curves_from_json(_field(d, "curves")),
        terms=terms,
        host=HostCosts(**{f"{t}_us": v for t, v in values.items()}),
        sd_us={t: float(_field(sd, t)) for t in terms},
        cov_raw=cov,
        noise_sd=noise,
        loss=float(_field(d, "loss")),
        n_rows=int(_field(d, "n_rows")),
        trained_on=tuple(str(s) for s in _field(d, "trained_on")),
        converged=bool(_field(d, "converged")),
        unpinned=tuple(str(s) for s in _field(d, "unpinned")),
        calibration=calibration_from_dict(d.get("calibration")),
        transfer_calibration=calibration_from_dict(
            d.get("transfer_calibration"), "transfer_calibration"
        ),
    )


def save_host_fit(fit: KernelHostFit, path: str | pathlib.Path) -> pathlib.Path:
    """Write ``fit`` (:func:`diffmodel.fit_host_on_kernels`) to ``path`` as JSON;
    returns the path."""
    path = pathlib.Path(path)
    path.write_text(json.dumps(host_fit_to_dict(fit), indent=2) + "\n")
    return path


def load_host_fit(path: str | pathlib.Path) -> KernelHostFit:
    """Read a fit written by :func:`save_host_fit`.

    Raises:
        ValueError: one line, ``host fit file <path>: ...``, naming the bad field.
    """
    return read_json_file(
        path,
        "host fit file",
        host_fit_from_dict,
        (ValueError, TypeError, AttributeError),
    )
