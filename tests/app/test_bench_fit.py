"""The fitting benchmark's table."""

from diffmodel._app._bench_fit import fitting_table, scaling_table, synthetic_table


def test_fitting_table_layout():
    r = dict(
        loss_grad_rows=1_000_000,
        loss_grad_steps_per_s=2e7,
        ratio_loss_grad_forward=0.25,
        forward_steps_per_s=8e7,
        fit_first_s=2.0,
        fit_second_s=0.5,
        fit_run_s=0.05,
        fit_with_posterior_first_s=3.0,
        fit_with_posterior_second_s=0.8,
        scipy_fit_s=1.0,
        ratio_fit_second_scipy=0.5,
        ratio_scipy_fit_run=20.0,
        fit_rows=20_112,
        scipy_fit_loss=0.9,
        fit_loss=0.9,
    )
    lines = fitting_table(r)
    assert lines[0] == "| fitting | time or rate | ratio |"
    assert lines[2].startswith("| bulk loss + gradient, 1,000,000 steps")
    assert "| 2e+07 steps/s | 0.25 x prediction (8e+07 steps/s" in lines[2]
    assert lines[3].endswith("| 2.00 s | 2.00 x scipy |")
    assert lines[4].endswith("| 0.50 s | 0.50 x scipy |")
    assert lines[5].endswith("| 0.050 s | scipy / run = 20.0x |")
    assert "(20,112 steps) | 1.00 s | loss 0.90000000 vs ours 0.90000000 |" in lines[7]


def test_scaling_and_synthetic_tables_layout():
    rows = [
        dict(
            devices=1,
            rows=10_000,
            loss_grad_steps_per_s=7e6,
            ratio_loss_grad_forward=2.5,
        ),
        dict(
            devices=2,
            rows=1_000_000,
            loss_grad_steps_per_s=3e7,
            ratio_loss_grad_forward=0.7,
        ),
    ]
    lines = scaling_table(rows)
    assert lines[2] == "| 10,000 rows, 1 device | 7e+06 | 2.50 |"
    assert (
        lines[3] == "| 1,000,000 rows, 2 devices (forced host devices) | 3e+07 | 0.70 |"
    )
    r = dict(
        rows=10_000_000,
        deployments=20,
        wall_s=19.06,
        compile_s=5.13,
        optimiser_steps=24,
        peak_rss_bytes=2 * 2**30,
        truth_vs_fitted={"gemm_flops": [0.8, 0.82], "comm_bw": [0.5, 0.45]},
    )
    lines = synthetic_table(r)
    assert lines[0].startswith("Global fit of 10,000,000 synthetic steps of 20")
    assert "19.1 s wall (5.1 s compile), 24 optimiser steps" in lines[0]
    assert "peak memory 2.00 GiB" in lines[0]
    assert lines[4] == "| gemm_flops | 0.8 | 0.82 | +2.50% |"
    assert lines[5] == "| comm_bw | 0.5 | 0.45 | -10.00% |"
