"""Fixtures shared by the bulk tests."""

import pytest

import diffmodel as dm


@pytest.fixture(scope="module")
def deps():
    return dm.stack_deployments(
        [
            dm.deployment("llama-2-70b", "h100", 4),
            dm.deployment("codellama-34b", "h100", 2),
            dm.deployment("mixtral-8x7b", "h100", 2),
        ]
    )
