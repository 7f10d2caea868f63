"""The hardware catalog: datasheet numbers, peaks from the database's YAMLs, custom
hardware without specs."""

import numpy as np
import pytest

import diffmodel as dm
import diffmodel.kernels as dk
from diffmodel._model._hardware import (
    SPECS,
    Hardware,
    canonical_hardware,
    spec_from_yaml,
    system_info,
)
from diffmodel.kernels._work import gemm_kernel_work

from helpers import needs_db

H100 = dm.hardware("h100-sxm")


def test_h100_numbers_unchanged_and_specs_attached():
    assert float(H100.flops_16) == 989.5e12 and float(H100.flops_8) == 1979e12
    assert float(H100.hbm_bw) == 3.35e12 and float(H100.link_bw) == 450e9
    assert float(H100.sm_count) == 132 and float(H100.l2_bytes) == 50 * 2**20
    for alias in ("H100", "h100_sxm", "h100-sxm5"):
        assert canonical_hardware(alias) == "h100-sxm"
    assert canonical_hardware("rtx_pro_6000_server") == "rtx-pro-6000"
    assert all(s.source and s.sm_count > 0 and s.l2_mib > 0 for s in SPECS.values())


def test_spec_from_yaml_by_hand():
    spec = {
        "gpu": {"bfloat16_tc_flops": 312e12, "mem_bw": 2.039e12},
        "node": {"intra_node_bw": 300e9},
    }
    # No FP8 tensor cores: the FP8 peak is the 16-bit one, and the FP4 one with it.
    assert spec_from_yaml(spec) == dict(
        flops_16=312e12, flops_8=312e12, flops_4=312e12, hbm_bw=2.039e12, link_bw=300e9
    )
    with pytest.raises(ValueError, match="'mem_bw'"):
        spec_from_yaml({"gpu": {"bfloat16_tc_flops": 1.0}, "node": {}})


def test_user_hardware_needs_no_specs():
    hw = Hardware(flops_16=1e12, hbm_bw=1e12, link_bw=1e9)
    assert hw.sm_count is None and hw.l2_bytes is None
    work = gemm_kernel_work(64.0, 64.0, 64.0, hw)
    with pytest.raises(ValueError, match="SM count"):
        work.time_us(dk.default_roofline_curves(portable=True))
    assert np.isfinite(float(work.time_us(dk.default_roofline_curves())))


@needs_db
def test_catalog_reads_the_yamls():
    b200 = dm.hardware("b200")
    assert float(b200.flops_16) == 2.25e15 and float(b200.hbm_bw) == 7.7e12
    # FP4 tensor cores on Blackwell (b300's 14 PFLOP/s is not twice its FP8 4.5);
    # none on Hopper, where FP4 runs at the FP8 peak.
    assert float(b200.flops_4) == 9e15 and float(dm.hardware("b300").flops_4) == 14e15
    assert float(dm.hardware("h200").flops_4) == float(dm.hardware("h200").flops_8)
    a100 = dm.hardware("a100")
    yaml_a100 = spec_from_yaml(dk.system_spec("a100_sxm"))
    assert float(a100.flops_16) == yaml_a100["flops_16"]
    assert float(a100.hbm_bw) == yaml_a100["hbm_bw"]
    info = system_info("gb200")
    assert info["gpus_per_node"] == 4 and info["peaks_source"] == "gb200.yaml"
    assert info["gpu_class"] == "nvlink" and system_info("l40s")["gpu_class"] == "pcie"


def test_hardware_catalog_and_custom():
    h = dm.hardware("H100")
    assert float(h.flops_16) == 989.5e12 and float(h.flops_8) == 1979e12
    assert float(h.hbm_bw) == 3.35e12 and float(h.link_bw) == 450e9
    a = dm.hardware("a100-sxm-80gb")
    assert float(a.flops_8) == float(a.flops_16) == 312e12  # no FP8 tensor cores
    assert float(dm.hardware("h200").hbm_bw) == 4.8e12
    assert "l40s" in dm.known_hardware()
    mine = dm.Hardware(flops_16=1e15, hbm_bw=5e12, link_bw=900e9)
    dep = dm.deployment("llama-2-7b", mine, 1)
    assert float(dep.hw.flops_8) == 1e15
    with pytest.raises(ValueError, match="unknown hardware 'tpu'.*h100-sxm"):
        dm.hardware("tpu")


def test_sibling_gpus_by_every_published_spec():
    pool = ["h100-sxm", "H200", "h200", "a100-sxm-80gb", "l40s"]
    # H200 differs from H100 by its HBM alone: 4.8 / 3.35 = 1.43 TB/s.
    assert dm.sibling_gpus("H100", pool) == ("h200",)
    assert dm.sibling_gpus("h100-sxm", pool, ratio=1.4) == ()
    assert dm.sibling_gpus("h200", pool) == ("h100-sxm",)
    # L40S is within 1.16x of A100's 16-bit peak but 2.4x off its bandwidth.
    assert dm.sibling_gpus("a100-sxm-80gb", pool) == ()
    assert dm.sibling_gpus("l40s", pool, ratio=2.0) == ()
    with pytest.raises(ValueError, match="ratio must be at least 1"):
        dm.sibling_gpus("h100-sxm", pool, ratio=0.5)
    with pytest.raises(ValueError, match="unknown hardware 'z100'"):
        dm.sibling_gpus("h100-sxm", ["z100"])


@needs_db
def test_sibling_gpus_of_the_database():
    pool = ["a100-sxm-80gb", "h100-sxm", "h200", "b200", "b300", "gb200", "gb300"]
    pool += ["l40s", "rtx-pro-6000", "b60"]
    assert dm.sibling_gpus("b200", pool) == ("b300", "gb200", "gb300")
    for lone in ("a100-sxm-80gb", "l40s", "rtx-pro-6000", "b60"):
        assert dm.sibling_gpus(lone, pool) == ()
