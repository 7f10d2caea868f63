"""Fixtures shared by the step-model tests: configs from aiconfigurator-core's
bundle (an optional extra; the tests that need them skip without it)."""

import pytest

import diffmodel as dm

aic = pytest.importorskip  # the bundle is an optional extra


@pytest.fixture(scope="module")
def bundle():
    aic("aiconfigurator_core")


@pytest.fixture(scope="module")
def bundle_deepseek():
    pytest.importorskip("aiconfigurator_core")
    return dm.architecture("deepseek-ai/DeepSeek-V3")


@pytest.fixture(scope="module")
def bundle_gpt_oss():
    pytest.importorskip("aiconfigurator_core")
    return dm.architecture("openai/gpt-oss-120b")
