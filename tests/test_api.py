"""The top level: a small, documented vocabulary, imported on first use."""

import os
import pathlib
import pydoc
import subprocess
import sys

import pytest

import diffmodel as dm
from diffmodel import _api

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_version_and_all():
    assert isinstance(dm.__version__, str) and dm.__version__
    assert sorted(dm.__all__) == sorted(_api.__all__)
    assert all(hasattr(dm, name) for name in dm.__all__)
    assert {"step_time", "predict", "fit", "deployment"} <= set(dir(dm))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dm.nope  # noqa: B018


def test_help_lists_the_functions_and_classes():
    text = pydoc.plain(pydoc.render_doc(dm))
    functions = text[text.index("\nFUNCTIONS") : text.index("\nDATA")]
    for name in ("step_time(", "predict(", "fit(", "deployment(", "load_factors("):
        assert f"\n    {name}" in functions, name
    assert "\nCLASSES" in text and "class Breakdown" in text


def test_import_does_not_import_jax():
    code = "import sys, diffmodel; print('jax' in sys.modules); "
    code += "diffmodel.step_time; print('jax' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env
    )
    assert res.stdout.split() == ["False", "True"], res.stderr


def test_one_hardware_keyword():
    by_name = dm.deployment("llama-2-7b", hardware="a100", tp=1)
    by_spec = dm.deployment("llama-2-7b", hardware=dm.hardware("a100-sxm-80gb"))
    assert float(by_name.hw.hbm_bw) == float(by_spec.hw.hbm_bw) == 2.039e12
    with pytest.raises(TypeError, match="unknown keyword 'hardware_name'"):
        dm.deployment("llama-2-7b", hardware_name="a100")
