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


@needs_db
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--system", "nope"], "--system 'nope': not in the kernel database; sys"),
        (["--backend", "nope"], "--backend 'nope': no tables; backends: sglang"),
        (
            ["--system", "b60", "--backend", "sglang"],
            "no tables of b60; backends: vllm",
        ),
    ],
)
def test_cli_kernels_list_refuses_a_filter_that_matches_nothing(argv, message, capsys):
    """An empty listing would read as 'nothing measured'; a typo must say so."""
    assert cli_main(["kernels", "list", *argv]) == 1
    captured = capsys.readouterr()
    assert message in captured.err and "system " not in captured.out


@needs_db
def test_cli_kernels_list_hardware_names_each_gpus_class(capsys):
    argv = ["kernels", "list", "--system", "l40s", "--backend", "vllm", "--hardware"]
    assert cli_main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("name "))
    assert "class" in header.split()
    row = {line.split()[0]: line.split() for line in lines[lines.index(header) :]}
    assert "pcie" in row["l40s"] and "nvlink" not in row["l40s"]
    assert "nvlink" in row["h100-sxm"] and "pcie" not in row["h100-sxm"]


@pytest.mark.slow
@needs_db
def test_cli_calibrate_pooled_for_a_gpu_from_others(tmp_path, capsys):
    path = tmp_path / "pooled.json"
    base = ["calibrate", "--system", "h100_sxm", "--out", str(path)]
    tiny = ["--adam-steps", "2", "--lbfgs-steps", "0", "--rows-per-gpu", "20"]
    assert cli_main(base + ["--pool", "a100_sxm", "h200_sxm"] + tiny) == 0
    err = capsys.readouterr().err
    assert "calibrated gemm_bf16 on 40 kernels of 2 GPUs" in err
    # H100 runs FlashAttention-3 like H200, not A100's kernel: H200's offsets only.
    assert "decode_attention: offsets of ['h200']" in err
    curves = dk.load_curves(path)
    assert curves.hardware == "h100-sxm" and curves.decode_attention.portable
    # H200 is H100's sibling: its curves for the kernels it runs, and its MLA
    # modules.
    assert "gemm_bf16: curves pooled over the siblings ['h200']" in err
    assert "mla: module curves pooled over the siblings ['h200']" in err
    assert "calibrated mla context on 20 modules of h200_sxm" in err
    assert curves.mla is not None
    # Without siblings: MLA module curves from the pooled GPUs that have MLA tables
    # (H200, not A100).
    assert (
        cli_main(base + ["--pool", "a100_sxm", "h200_sxm", "--no-siblings"] + tiny) == 0
    )
    err = capsys.readouterr().err
    assert "sibling" not in err
    assert "mla: a100_sxm has no MLA module tables" in err
    assert "calibrated mla context on 20 modules of h200_sxm" in err
    assert cli_main(base + ["--pool", "nope"]) == 1
    assert "pool: ['nope'] not in the kernel database" in capsys.readouterr().err
    assert cli_main(base + ["--pool", "a100_sxm", "--absolute"]) == 1
    assert "pooled curves are portable only" in capsys.readouterr().err


@needs_db
def test_cli_calibrate_only_some_families(tmp_path, capsys):
    """``--families``: fit the named ones, write the rest uncalibrated and say so;
    an unknown name is refused by argparse, with --pool by name."""
    path = tmp_path / "mxfp4.json"
    argv = ["calibrate", "--system", "h100_sxm", "--out", str(path)]
    tiny = ["--adam-steps", "2", "--lbfgs-steps", "0"]
    assert cli_main(argv + ["--families", "moe_w4a16"] + tiny) == 0
    err = capsys.readouterr().err
    assert "calibrated moe_w4a16 on 1944 kernels" in err
    assert "skipped gemm_bf16: not asked for" in err
    curves = dk.load_curves(path)
    assert curves.moe_w4a16.portable
    assert cli_main(argv + ["--families", "mxfp4"]) == 2
    assert "--families: invalid choice: 'mxfp4'" in capsys.readouterr().err
    assert cli_main(argv + ["--families", "moe", "--pool", "others"]) == 1
    assert "--families: pooled curves fit every family" in capsys.readouterr().err
    assert cli_main(argv + ["--families", "gemm_bf16", "--shape-grid"] + tiny) == 0
    assert "(shape grid (" in capsys.readouterr().err
    assert dk.load_curves(path).gemm_bf16.shape_grid is not None
    assert cli_main(argv + ["--shape-grid", "--pool", "others"]) == 1
    assert "--shape-grid: a shape grid is one GPU's own" in capsys.readouterr().err
