"""Saving and loading fitted factors as human-readable JSON, with an exact round trip.

The file keeps the unconstrained parameters (``raw``, exact: Python floats print
their shortest round-trip representation) and, for people, the physical values with
their units per group.
"""

import json
import pathlib
from typing import Any

import jax.numpy as jnp
import numpy as np

from .._fitting._factorsets import GlobalFactors, HierarchicalFactors, PerGroupFactors
from .._fitting._study import STUDY_PARAM_NAMES, StudyFactors
from .._model._factors import FACTOR_NAMES, FACTOR_SPECS

FORMAT = "diffmodel.factors/1"


def _floats(x) -> Any:
    return np.asarray(x, dtype=np.float64).tolist()


def factors_to_dict(obj) -> dict:
    """A JSON-ready description of a factor set or fit result."""
    fs = getattr(obj, "factor_set", obj)
    out: dict[str, Any] = {"format": FORMAT}
    if isinstance(fs, StudyFactors):
        out.update(
            kind="study-36" if fs.per_group else "study-9",
            parameter_names=list(STUDY_PARAM_NAMES),
            labels=list(fs.labels),
            raw=_floats(fs.raw),
            values=_floats(fs.values()),
        )
        return out
    units = {n: FACTOR_SPECS[n][1] for n in FACTOR_NAMES}
    out.update(factor_names=list(FACTOR_NAMES), units=units, prior=list(fs.prior))
    phys = {n: _floats(v) for n, v in fs.physical().as_dict().items()}
    if isinstance(fs, GlobalFactors):
        out.update(
            kind="global",
            raw=_floats(fs.raw),
            global_prior_scale=fs.global_prior_scale,
            noise_scale=fs.noise_scale,
            factors=phys,
        )
    elif isinstance(fs, PerGroupFactors):
        out.update(
            kind="per-model",
            labels=list(fs.labels),
            raw=_floats(fs.raw),
            factors={
                lab: {n: phys[n][i] for n in FACTOR_NAMES}
                for i, lab in enumerate(fs.labels)
            },
        )
    elif isinstance(fs, HierarchicalFactors):
        glob = {n: _floats(v) for n, v in fs.global_physical().as_dict().items()}
        out.update(
            kind="hierarchical",
            labels=list(fs.labels),
            global_raw=_floats(fs.global_raw),
            offsets=_floats(fs.offsets),
            log_prior_scale=float(fs.log_prior_scale),
            noise_scale=fs.noise_scale,
            learn_prior_scale=fs.learn_prior_scale,
            global_prior_scale=fs.global_prior_scale,
            factors={
                "global": glob,
                **{
                    lab: {n: phys[n][i] for n in FACTOR_NAMES}
                    for i, lab in enumerate(fs.labels)
                },
            },
        )
    else:
        raise ValueError(f"cannot save factors of type {type(fs).__name__}")
    if getattr(obj, "target", ""):
        out["target"] = obj.target
    return out


def factors_from_dict(d: dict):
    """Rebuild the factor set described by :func:`factors_to_dict`."""
    if d.get("format") != FORMAT:
        raise ValueError(f"not a diffmodel factors file (format {d.get('format')!r})")
    kind = d.get("kind")
    dtype = jnp.result_type(float)

    def arr(key):
        if key not in d:
            raise ValueError(f"factors file is missing {key!r}")
        return jnp.asarray(d[key], dtype)

    if kind in ("study-9", "study-36"):
        return StudyFactors(
            raw=arr("raw"), labels=tuple(d["labels"]), per_group=kind == "study-36"
        )
    if list(d.get("factor_names", [])) != list(FACTOR_NAMES):
        raise ValueError(
            f"factors file names {d.get('factor_names')}, expected {list(FACTOR_NAMES)}"
        )
    prior = tuple(float(x) for x in d["prior"])
    if kind == "global":
        return GlobalFactors(
            raw=arr("raw"),
            prior=prior,
            global_prior_scale=d.get("global_prior_scale"),
            noise_scale=float(d.get("noise_scale", 0.1)),
        )
    if kind == "per-model":
        return PerGroupFactors(raw=arr("raw"), prior=prior, labels=tuple(d["labels"]))
    if kind == "hierarchical":
        return HierarchicalFactors(
            global_raw=arr("global_raw"),
            offsets=arr("offsets").reshape(len(d["labels"]), len(FACTOR_NAMES)),
            log_prior_scale=arr("log_prior_scale"),
            prior=prior,
            noise_scale=float(d["noise_scale"]),
            learn_prior_scale=bool(d["learn_prior_scale"]),
            labels=tuple(d["labels"]),
            global_prior_scale=d.get("global_prior_scale"),
        )
    raise ValueError(f"unknown factors kind {kind!r} in factors file")


def save_factors(obj, path: str | pathlib.Path) -> pathlib.Path:
    """Write a factor set or fit result to ``path`` as JSON; returns the path."""
    path = pathlib.Path(path)
    path.write_text(json.dumps(factors_to_dict(obj), indent=2) + "\n")
    return path


def load_factors(path: str | pathlib.Path):
    """Read a factor set written by :func:`save_factors`."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"factors file not found: {path}")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"factors file {path} is not valid JSON: {e}") from None
    return factors_from_dict(d)
