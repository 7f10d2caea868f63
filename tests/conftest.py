"""Test configuration: float64 for numerics, strict rank promotion, shared data path.

Runtime shape checks (jaxtyping + beartype on the whole ``diffmodel`` package) are
switched on by ``--jaxtyping-packages`` in pyproject.toml's pytest options.
"""

import os
import pathlib
import tempfile

# The suite compiles into a cache folder of its own (subprocesses inherit it), so that
# an entry left half-written in the user's cache by a killed process cannot fail it.
os.environ.setdefault(
    "DIFFMODEL_COMPILATION_CACHE", tempfile.mkdtemp(prefix="diffmodel-test-cache-")
)

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
# Implicit broadcasting between arrays of different ranks is an error: a (n,) + (n, 1)
# that silently makes an (n, n) matrix is a classic bug.
jax.config.update("jax_numpy_rank_promotion", "raise")
# Tests run many small computations: on CPU, handing each to a worker thread
# (asynchronous dispatch) costs ~0.1 ms per call on a small VM, more than the work.
jax.config.update("jax_cpu_enable_async_dispatch", False)

import pytest  # noqa: E402

DATA_DIR = pathlib.Path(
    os.environ.get(
        "DIFFMODEL_DATA",
        pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data",
    )
)
# CI sets this so that a missing data folder fails the run instead of skipping tests.
REQUIRE_DATA = os.environ.get("DIFFMODEL_REQUIRE_DATA", "") not in ("", "0")


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    """The shared reference data folder (``$DIFFMODEL_DATA`` overrides)."""
    if not DATA_DIR.is_dir():
        message = (
            f"shared data not found at {DATA_DIR} (clone it beside the project as "
            "../shared/data or set DIFFMODEL_DATA)"
        )
        if REQUIRE_DATA:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return DATA_DIR
