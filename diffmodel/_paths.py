"""Where the shared reference data and the compilation cache live.

The only place the package reads environment variables:

- ``DIFFMODEL_DATA`` points at the reference data folder (the one holding
  ``stepml/``, ``kernels/``, ``vidur/``, ``model_configs/``). Without it,
  ``../shared/data`` relative to the current directory and then relative to the
  source checkout are tried.
- ``DIFFMODEL_COMPILATION_CACHE``: JAX's persistent compilation cache, on by default
  in ``$XDG_CACHE_HOME/diffmodel/jax`` (``~/.cache/diffmodel/jax``) so that a second
  process reuses the first one's compiled code. ``0`` turns it off; any other value
  than ``1`` is taken as the folder to use.
- ``XLA_FLAGS`` (XLA's own) is read, not set: the fitting loops kept on disk are
  keyed by it (:mod:`diffmodel._fitting._aot`), since it changes compiled code.
"""

import os
import pathlib

_ENV = os.environ.get("DIFFMODEL_DATA")
_CACHE_ENV = os.environ.get("DIFFMODEL_COMPILATION_CACHE", "1").strip()
_XDG_CACHE = os.environ.get("XDG_CACHE_HOME", "").strip()


def compilation_cache_dir() -> pathlib.Path | None:
    """The persistent compilation cache folder, or ``None`` when turned off."""
    if _CACHE_ENV.lower() in ("0", "off", "false", "no"):
        return None
    if _CACHE_ENV not in ("", "1"):
        return pathlib.Path(_CACHE_ENV).expanduser()
    base = pathlib.Path(_XDG_CACHE) if _XDG_CACHE else pathlib.Path.home() / ".cache"
    return base / "diffmodel" / "jax"


def xla_flags() -> str:
    """``XLA_FLAGS`` as this process started with it (empty when unset)."""
    return os.environ.get("XLA_FLAGS", "")


def default_data_dir() -> pathlib.Path:
    """The reference data folder: ``$DIFFMODEL_DATA``, else ``../shared/data``."""
    if _ENV:
        return pathlib.Path(_ENV)
    candidates = [
        pathlib.Path.cwd().parent / "shared" / "data",
        pathlib.Path(__file__).resolve().parents[2] / "shared" / "data",
    ]
    for c in candidates:
        if c.is_dir():
            return c
    return candidates[0]
