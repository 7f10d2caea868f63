"""experiments/features.py: the per-feature table from the validation scripts' CSVs,
on hand-made results with known medians."""

import pandas as pd
import pytest

from helpers import load_experiment


@pytest.fixture(scope="module")
def script():
    return load_experiment("features")


def _write(tmp_path, rel, frame):
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)


def test_medians_and_counts_by_feature(script, tmp_path, capsys):
    gpus = pd.DataFrame(
        {
            "family": ["gemm_bf16"] * 6,
            "protocol": ["held_out_shapes"] * 3 + ["leave_one_gpu_out"] * 3,
            "held_out": ["a", "b", "c"] * 2,
            "variant": ["calibrated"] * 6,
            "mape": [8.0, 12.0, 9.0, 20.0, 30.0, 10.0],
        }
    )
    # Uncalibrated rows are not the calibrated figures: left out; the shape grid's
    # (held-out shapes only) are a line of their own.
    unc = gpus.assign(variant="uncalibrated", mape=99.0)
    grid = gpus[:3].assign(variant="calibrated_grid", mape=[7.0, 9.5, 11.0])
    _write(tmp_path, "gpus/gpus.csv", pd.concat([gpus, unc, grid]))
    mla = pd.DataFrame(
        {
            "op": ["context", "context", "context", "generation", "context"],
            "protocol": [
                "held-out shapes",
                "held-out shapes",
                "kernel sum",
                "kernel sum",
                "kernel sum, MLA module curves (held-out shapes)",
            ],
            "calibrated_mape": [7.0, 11.0, 30.0, 40.0, 12.0],
        }
    )
    _write(tmp_path, "mla_kernels/mla_kernels.csv", mla)
    table = script.main(tmp_path, tmp_path / "out")
    err = capsys.readouterr().err
    assert "quant_comm_kernels.csv" in err and "left out" in err
    g = table.set_index("operator").loc["gemm_bf16"]
    assert g["held-out shapes median"] == 9.0
    assert (g["held-out shapes met"], g["held-out shapes tables"]) == (2, 3)
    assert g["leave one GPU out median"] == 20.0
    assert g["leave one GPU out met"] == 1
    gg = table.set_index("operator").loc["gemm_bf16 + shape grid"]
    assert gg["held-out shapes median"] == 9.5 and gg["held-out shapes met"] == 2
    assert gg["leave one GPU out tables"] == 0
    c = table.set_index("operator").loc["context"]
    assert c["held-out shapes median"] == 9.0 and c["leave one GPU out tables"] == 0
    md = (tmp_path / "out" / "features.md").read_text()
    assert (
        "| 16-bit dense GEMMs | every model | gemm_bf16 | 10 | 9.0 (2/3) | 20.0 (1/3) |"
        in md
    )
    assert "| context | 10 | 9.0 (1/2) | n/a |" in md
    assert (
        "no MLA row fitted): context 30.0% (0/1 at or below 15%), generation 40.0% "
        "(0/1 at or below 15%)" in md
    )
    assert "fixed cost): context 12.0% (1/1 at or below 15%)." in md


def test_no_results_is_an_error(script, tmp_path):
    with pytest.raises(SystemExit, match="no validation results"):
        script.main(tmp_path, tmp_path / "out")
