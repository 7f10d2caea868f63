"""experiments/gpus.py: a held-out GPU takes the offsets of its kernel."""

import numpy as np
import pandas as pd
import pytest

from helpers import load_experiment


@pytest.fixture(scope="module")
def gpus():
    return load_experiment("gpus")


def rows(device, source):
    return pd.DataFrame({"device": [device] * 3, "kernel_source": [source] * 3})


def test_kernel_of_names_vendor_and_kernel(gpus):
    gathered = [
        ("h100_sxm", "vllm", rows("NVIDIA H100 80GB HBM3", "vllm_flash_attn_fa3")),
        ("a100_sxm", "vllm", rows("NVIDIA A100-SXM4-80GB", "vllm_flash_attn")),
        ("b60", "vllm", rows("Intel(R) Arc(TM) Pro B60 Graphics", "vllm_flash_attn")),
        ("x", "vllm", pd.DataFrame({"latency_us": [1.0]})),
    ]
    assert gpus.kernel_of(gathered) == [
        ("NVIDIA", "vllm_flash_attn_fa3"),
        ("NVIDIA", "vllm_flash_attn"),
        ("Intel(R)", "vllm_flash_attn"),  # the same name, another vendor's kernel
        None,
    ]


def test_held_out_offsets_average_the_same_kernel_among_training_gpus(gpus):
    kernels = [("N", "fa3"), ("N", "fa3"), ("N", "trtllm"), ("N", "fa3"), None]
    off = np.arange(20.0).reshape(5, 4)
    # GPU 0 held out (and GPU 3 out of this inner fold): only GPU 1 runs fa3.
    got = gpus.held_out_offsets(off, 0, {0, 3}, kernels)
    np.testing.assert_array_equal(got[0], off[1])
    np.testing.assert_array_equal(got[1:], off[1:])
    # Outer fold: GPUs 1 and 3 run fa3.
    got = gpus.held_out_offsets(off, 0, {0}, kernels)
    np.testing.assert_array_equal(got[0], (off[1] + off[3]) / 2)
    # No training GPU runs its kernel (or it is unknown): the shared curves.
    np.testing.assert_array_equal(gpus.held_out_offsets(off, 2, {2}, kernels)[2], 0)
    np.testing.assert_array_equal(gpus.held_out_offsets(off, 4, {4}, kernels)[4], 0)


def test_held_out_offsets_prefer_the_gpus_of_its_class(gpus):
    """Among the GPUs running its kernel, a card takes the cards' offsets, a module
    the modules'; where its class has none, every GPU running the kernel."""
    kernels = [("N", "cublas")] * 4 + [("N", "other")]
    classes = ["nvlink", "nvlink", "pcie", "pcie", "pcie"]
    off = np.arange(20.0).reshape(5, 4)
    got = gpus.held_out_offsets(off, 2, {2}, kernels, classes)
    np.testing.assert_array_equal(got[2], off[3])
    got = gpus.held_out_offsets(off, 0, {0}, kernels, classes)
    np.testing.assert_array_equal(got[0], off[1])
    # GPU 3 out of this inner fold: no other card runs cuBLAS; all that do.
    got = gpus.held_out_offsets(off, 2, {2, 3}, kernels, classes)
    np.testing.assert_array_equal(got[2], (off[0] + off[1]) / 2)


def test_inner_peers_are_the_gpus_of_the_same_class(gpus):
    """PCIe cards choose their form on the other cards, NVLink modules on the other
    modules; a GPU alone in its class falls back to every other GPU."""
    names = ["h100-sxm", "b200", "l40s", "rtx-pro-6000", "b60"]
    peers = [list(p) for p in gpus.inner_peers(names)]
    assert peers == [[1], [0], [3, 4], [2, 4], [2, 3]]
    assert [list(p) for p in gpus.inner_peers(["h100-sxm", "l40s", "b60"])] == [
        [1, 2],
        [2],
        [1],
    ]


def test_table_shows_the_shape_grid_where_measured(gpus):
    base = dict(family="gemm_bf16", held_out="h100-sxm", n_rows=60, n_params=15)
    table = pd.DataFrame(
        [
            dict(base, protocol="held_out_shapes", variant="uncalibrated", mape=40.0),
            dict(base, protocol="held_out_shapes", variant="calibrated", mape=9.0),
            dict(base, protocol="held_out_shapes", variant="calibrated_grid", mape=7.0),
            dict(base, protocol="leave_one_gpu_out", variant="uncalibrated", mape=35.0),
            dict(base, protocol="leave_one_gpu_out", variant="calibrated", mape=13.0),
            dict(base, protocol="leave_one_gpu_out", variant="xgboost", mape=21.0),
        ]
    ).assign(form="portable_l2")
    text = gpus.table_text(table)
    assert (
        "| gemm_bf16 | held_out_shapes | h100-sxm | 40.0 | 9.0 | 7.0 |  | 60 |" in text
    )
    assert (
        "| gemm_bf16 | leave_one_gpu_out | h100-sxm | 35.0 | 13.0 |  | 21.0 | 60 |"
        in text
    )


def test_choose_form_by_mean_or_one_standard_error(gpus):
    summary = {"portable": 20.0, "absolute": 24.0, "constant": 22.0}
    # Gains over the constant per peer: 4 and 0 (mean 2, se 2): within one se.
    noisy = {"portable": [18.0, 22.0], "absolute": [24.0, 24.0], "constant": [22, 22]}
    assert gpus.choose_form(summary, noisy, "mean") == "portable"
    assert gpus.choose_form(summary, noisy, "one_se") == "constant"
    # 3, 1 and 2: mean 2, se 0.58, a gain beyond it.
    steady = {
        "portable": [19.0, 21.0, 20.0],
        "absolute": [24.0, 24.0, 24.0],
        "constant": [22.0, 22.0, 22.0],
    }
    assert gpus.choose_form(summary, steady, "one_se") == "portable"
    single = {f: v[:1] for f, v in steady.items()}  # one peer: no error bar
    assert gpus.choose_form(summary, single, "one_se") == "constant"
    assert gpus.choose_form({"constant": 5.0, "portable": 6.0}, {}, "one_se") == (
        "constant"
    )


def test_siblings_of_need_the_same_kernel(gpus):
    names = ["h100-sxm", "h200", "a100-sxm-80gb"]
    fa3 = ("NVIDIA", "vllm_flash_attn_fa3")
    assert gpus.siblings_of(0, {0}, names, [fa3, fa3, fa3]) == [1]
    assert gpus.siblings_of(0, {0, 1}, names, [fa3, fa3, fa3]) == []
    other = ("NVIDIA", "flashinfer")
    assert gpus.siblings_of(0, {0}, names, [fa3, other, fa3]) == []


def test_black_box_features_and_fit():
    xgb = load_experiment("kernel_xgboost")
    from diffmodel import hardware
    from diffmodel.kernels._work import gemm_kernel_work

    m = np.array([1.0, 64.0, 4096.0, 8192.0])
    work = gemm_kernel_work(m, 4096.0, 4096.0, hardware("h100-sxm"))
    x = xgb.work_features(work)
    assert x.shape[0] == 4 and np.isfinite(x).all()
    # log FLOPs first: 2 m' n k with m' = ceil(m / 32) 32.
    np.testing.assert_allclose(
        x[:, 0], np.log(2 * np.array([32, 64, 4096, 8192.0]) * 4096**2)
    )
    rng = np.random.default_rng(0)
    z = rng.uniform(0, 5, size=(400, 2))
    y = np.exp(1.0 + 0.8 * z[:, 0] - 0.3 * z[:, 1])
    groups = np.arange(400) // 10
    train = groups < 30
    p, nodes = xgb.fit_predict(z, y, train, groups)
    err = np.mean(np.abs(p[~train] - y[~train]) / y[~train])
    assert err < 0.1 and nodes > 0
    with pytest.raises(ValueError, match="at least two training groups"):
        xgb.fit_predict(z, y, groups == 0, groups)
    with pytest.raises(ValueError, match="must be positive"):
        xgb.fit_predict(z, -y, train, groups)


def test_training_systems_are_the_siblings_where_any(gpus):
    systems = ["h100_sxm", "h200_sxm", "a100_sxm", "l40s"]
    assert gpus.training_systems("h100_sxm", systems) == ["h200_sxm"]
    assert gpus.training_systems("a100_sxm", systems) == [
        "h100_sxm",
        "h200_sxm",
        "l40s",
    ]
    every = ["h200_sxm", "a100_sxm", "l40s"]
    assert gpus.training_systems("h100_sxm", systems, siblings=False) == every
