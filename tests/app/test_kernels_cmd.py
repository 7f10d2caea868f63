"""The ``kernels list`` and ``calibrate`` subcommands."""

import numpy as np
import pytest

import diffmodel.kernels as dk
from diffmodel._app._cli import main as cli_main

from helpers import needs_db


@pytest.mark.slow
@needs_db
def test_cli_kernels_list_and_calibrate(tmp_path, capsys):
    assert cli_main(["kernels", "list", "--system", "l40s", "--backend", "vllm"]) == 0
    out = capsys.readouterr().out
    assert "l40s" in out and "gemm" in out and "0.24.0" in out
    path = tmp_path / "curves.json"
    argv = ["calibrate", "--system", "a100_sxm", "--out", str(path)]
    assert cli_main(argv + ["--adam-steps", "2", "--lbfgs-steps", "0"]) == 0
    err = capsys.readouterr().err
    assert "calibrated gemm_bf16 on 9240 kernels" in err
    assert "skipped gemm_fp8" in err
    curves = dk.load_curves(path)
    assert curves.hardware == "a100-sxm-80gb" and curves.gemm_bf16.portable
    # The step model loads them: step-level factors from the portable curves.
    factors = dk.kernel_prior_factors(curves, tp=8)
    assert all(np.isfinite(float(v)) for v in factors.as_dict().values())
    assert 0.0 < float(factors.gemm_flops) <= 1.0
    assert cli_main(["calibrate", "--system", "nope", "--out", str(path)]) == 1
