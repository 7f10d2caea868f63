"""Where the shared reference data lives.

The only place the package reads an environment variable: ``DIFFMODEL_DATA`` points at
the reference data folder (the one holding ``stepml/``, ``kernels/``, ``vidur/``,
``model_configs/``). Without it, ``../shared/data`` relative to the current directory
and then relative to the source checkout are tried.
"""

import os
import pathlib

_ENV = os.environ.get("DIFFMODEL_DATA")


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
