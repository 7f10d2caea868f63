"""Test configuration: float64 for numerics, runtime shape checks, shared data path."""

import os
import pathlib

import jax

jax.config.update("jax_enable_x64", True)

import pytest  # noqa: E402

DATA_DIR = pathlib.Path(
    os.environ.get(
        "DIFFMODEL_DATA",
        pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data",
    )
)


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    """The shared reference data folder (``$DIFFMODEL_DATA`` overrides)."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"shared data not found at {DATA_DIR}")
    return DATA_DIR
