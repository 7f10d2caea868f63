"""The generator of vLLM's tuned MoE catalogue: file names parsed, module written."""

import importlib.util
import zipfile

import pytest

from helpers import load_experiment

CONFIGS = "vllm/model_executor/layers/fused_moe/configs/"


@pytest.fixture(scope="module")
def script():
    return load_experiment("vllm_moe_configs")


def fake_wheel(path, names):
    with zipfile.ZipFile(path, "w") as z:
        for name in names:
            z.writestr(name, "{}")
    return path


def test_file_names_map_to_dtypes_and_devices(script, tmp_path):
    wheel = fake_wheel(
        tmp_path / "vllm-0.99.0-cp38-abi3-manylinux_2_28_x86_64.whl",
        [
            CONFIGS + "E=8,N=7168,device_name=NVIDIA_H100_80GB_HBM3.json",
            CONFIGS + "E=8,N=3584,device_name=NVIDIA_H100_80GB_HBM3.json",
            CONFIGS + "E=256,N=256,device_name=NVIDIA_H200,dtype=fp8_w8a8,"
            "block_shape=[128,128].json",
            CONFIGS + "E=16,N=1024,device_name=NVIDIA_B200,dtype=fp8_w8a8.json",
            # Not an aiconfigurator MoE dtype, not NVIDIA, not a config: skipped.
            CONFIGS
            + "E=8,N=7168,device_name=NVIDIA_H100_80GB_HBM3,dtype=int8_w8a16.json",
            CONFIGS + "E=8,N=7168,device_name=AMD_Instinct_MI300X.json",
            CONFIGS + "README",
        ],
    )
    assert script.wheel_version(wheel) == "0.99.0"
    assert script.tuned_shapes(wheel) == {
        "NVIDIA_B200": {"fp8": [(16, 1024)]},
        "NVIDIA_H100_80GB_HBM3": {"bfloat16": [(8, 3584), (8, 7168)]},
        "NVIDIA_H200": {"fp8_block": [(256, 256)]},
    }
    out = tmp_path / "tuned.py"
    script.main([wheel], out)
    spec = importlib.util.spec_from_file_location("tuned", out)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.TUNED["0.99.0"]["NVIDIA_H100_80GB_HBM3"]["bfloat16"] == (
        "8x3584 8x7168"
    )
    assert max(len(line) for line in out.read_text().splitlines()) <= 88


def test_a_file_that_is_not_a_vllm_wheel_is_named(script, tmp_path):
    with pytest.raises(ValueError, match="not a vLLM wheel"):
        script.wheel_version(tmp_path / "torch-2.0.whl")
