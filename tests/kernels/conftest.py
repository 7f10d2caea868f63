"""Fixtures shared by the kernel tests."""

import pytest

from diffmodel.kernels._tables import load_kernel_tables


@pytest.fixture(scope="module")
def tables(data_dir):
    return load_kernel_tables(data_dir)
