"""vLLM's MLA attention module as calibrated curves (KernelCurves.mla) and its use in
the kernel sum."""

import dataclasses
import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import diffmodel as dm
import diffmodel.kernels as dk
from diffmodel.kernels import (
    MlaCurves,
    MlaModule,
    default_kernel_curves,
    kernel_step_time,
    mla_module_us,
    mla_module_work,
    mla_parts_us,
)
from diffmodel.kernels._mla import EFFICIENCIES, module_arch
from tests.helpers import assert_grad_matches_fd, one_step

TRUTH = MlaModule(
    raw=jnp.log(
        jnp.asarray([0.6, 0.3, 0.2, 0.7, 0.5, 0.65])
        / (1.0 - jnp.asarray([0.6, 0.3, 0.2, 0.7, 0.5, 0.65]))
    ),
    log_latency_us=jnp.log(jnp.asarray(50.0)),
)
MLA = MlaCurves(context=TRUTH, generation=MlaModule.prior(30.0))
CURVES = dataclasses.replace(default_kernel_curves(), mla=MLA)
DSV3 = dm.deployment("deepseek-v3", "h200-sxm", 8)


def one_layer(dep):
    """``dep`` with one attention layer and no MLP: the kernel sum of one module."""
    one = tuple(jnp.asarray(v, float) for v in (1.0, 0.0, 0.0))
    arch = eqx.tree_at(
        lambda a: (a.n_layers, a.dense_layers, a.moe_layers), dep.arch, one
    )
    return dataclasses.replace(dep, arch=arch)


def test_attention_work_hand_computed():
    # DeepSeek-V3 at TP 8: 16 heads per GPU; prefill qk 192, v 128: 2 (192 + 128)
    # FLOPs per pair and head; the latent KV write (512 + 64) x 2 bytes per token.
    w = mla_module_work("context", 100.0, 1000.0, 100.0, module_arch("bfloat16", ""), 8)
    assert float(w.attn_flops) == pytest.approx(2 * 1000 * 16 * (192 + 128))
    assert float(w.kv_bytes) == pytest.approx(100 * 576 * 2)
    # decode (absorbed): every head reads the latent, qk = 576, v = 512.
    w = mla_module_work("generation", 4.0, 4000.0, 4000.0, DSV3.arch, 8)
    assert float(w.attn_flops) == pytest.approx(2 * 4000 * 16 * (576 + 512))


def test_module_time_is_its_parts_plus_latency():
    w = mla_module_work("context", 2048.0, 2048 * 2049 / 2, 2048.0, DSV3.arch, 8)
    proj, attn, kv = mla_parts_us(TRUTH, w, DSV3.hw)
    want = float(proj + attn + kv) + 50.0
    assert float(mla_module_us(TRUTH, w, DSV3.hw)) == pytest.approx(want, rel=1e-12)
    # KV write at mem_bw: 2048 tokens x 576 x 2 bytes (the catalog's 16-bit cache)
    # / (0.7 HBM bw).
    assert float(DSV3.arch.kv_bytes) == 2.0
    hbm = float(DSV3.hw.hbm_bw)
    assert float(kv) == pytest.approx(2048 * 576 * 2.0 / (hbm * 0.7) * 1e6)


@pytest.mark.parametrize(
    "op,step",
    [
        (
            "context",
            dict(prefill_tokens=1024, num_prefill=2, attn_prefill=2 * 512 * 513 / 2),
        ),
        ("generation", dict(decode_tokens=64, num_decode=64, kv_decode=64 * 2048)),
    ],
)
def test_kernel_sum_times_one_layer_on_the_module(op, step):
    dep = one_layer(DSV3)
    b = kernel_step_time(one_step(**step), dep, CURVES)
    got = b.linear + b.attention_prefill + b.attention_decode + b.kv_write
    if op == "context":
        w = mla_module_work(op, 1024.0, step["attn_prefill"], 1024.0, dep.arch, dep.tp)
    else:
        w = mla_module_work(op, 64.0, 64 * 2048.0, 64 * 2048.0, dep.arch, dep.tp)
    m = getattr(MLA, op)
    want = mla_module_us(m, w, dep.hw) - m.latency_us
    np.testing.assert_allclose(float(got), float(want), rtol=1e-10)
    # the modules' parts land in their components
    assert float(b.kv_write) > 0
    assert float(b.attention_prefill if op == "context" else b.attention_decode) > 0


def test_gqa_models_do_not_use_the_module():
    dep = dm.deployment("llama-3.1-70b", "h100-sxm", 4)
    st = one_step(prefill_tokens=512, num_prefill=1, attn_prefill=512 * 513 / 2)
    a = kernel_step_time(st, dep, CURVES)
    b = kernel_step_time(st, dep, dataclasses.replace(CURVES, mla=None))
    for f in ("linear", "attention_prefill", "attention_decode", "kv_write", "total"):
        assert float(getattr(a, f)) == float(getattr(b, f))


def test_mixed_steps_pay_both_paths_and_grads_are_finite():
    mixed = one_step(
        prefill_tokens=2048,
        num_prefill=1,
        attn_prefill=2048 * 2049 / 2,
        decode_tokens=64,
        num_decode=64,
        kv_decode=64 * 4096,
    )
    decode_only = one_step(decode_tokens=64, num_decode=64, kv_decode=64 * 4096)
    t_mixed = kernel_step_time(mixed, DSV3, CURVES)
    t_dec = kernel_step_time(decode_only, DSV3, CURVES)
    assert float(t_mixed.attention_decode) == pytest.approx(
        float(t_dec.attention_decode)
    )
    assert float(t_dec.attention_prefill) == 0.0

    def total(raw, st):
        c = eqx.tree_at(lambda c: c.mla.context.raw, CURVES, raw)
        return kernel_step_time(st, DSV3, c, check=False).total

    for st in (mixed, decode_only):
        g = jax.grad(total)(TRUTH.raw, st)
        assert np.isfinite(np.asarray(g)).all()
    # a decode-only step does not depend on the prefill path's curves
    assert np.all(np.asarray(jax.grad(total)(TRUTH.raw, decode_only)) == 0.0)
    assert_grad_matches_fd(lambda r: total(r, mixed), np.asarray(TRUTH.raw), rtol=1e-5)


def test_jit_matches_eager():
    st = one_step(
        prefill_tokens=300,
        num_prefill=1,
        attn_prefill=300 * 301 / 2 + 300 * 700,
        kv_prefill=700,
        decode_tokens=8,
        num_decode=8,
        kv_decode=8 * 900,
    )
    eager = kernel_step_time(st, DSV3, CURVES).total
    jitted = jax.jit(lambda s: kernel_step_time(s, DSV3, CURVES, check=False).total)
    np.testing.assert_allclose(float(jitted(st)), float(eager), rtol=1e-12)


def synthetic_rows(op: str) -> pd.DataFrame:
    """Module rows over two dtype combinations and a grid of shapes (latency 0)."""
    rows = []
    for combo in (
        ("bfloat16", "bfloat16", "bfloat16"),
        ("bfloat16", "fp8", "fp8_block"),
    ):
        for heads in (8, 16, 32, 64, 128):
            for b in (1, 4, 16, 64, 256):
                for s in (64, 512, 2048, 8192) if op == "context" else (1,):
                    for step in (0,) if op == "context" else (128, 1024, 8192):
                        rows.append((*combo, heads, b, s, step))
    cols = ["mla_dtype", "kv_cache_dtype", "gemm_type", "num_heads", "batch_size"]
    return pd.DataFrame(rows, columns=[*cols, "isl", "step"])


@pytest.mark.slow
def test_fit_recovers_known_module():
    hw = dm.hardware("h200-sxm")
    rows = synthetic_rows("context")
    truth_us = np.asarray(mla_module_us(TRUTH, dk.mla_table_work("context", rows), hw))
    rows["latency_us"] = truth_us
    fitted = dk.fit_mla_module("context", rows, hw)
    # The GEMM widths present (16-bit, FP8), the bandwidths, attention and latency
    # are pinned; the FP4 efficiency has no rows.
    for name in ("gemm_16", "gemm_8", "attn_flops", "attn_bw"):
        got, want = float(fitted.efficiency(name)), float(TRUTH.efficiency(name))
        assert got == pytest.approx(want, rel=0.05), name
    assert float(fitted.latency_us) == pytest.approx(50.0, rel=0.05)
    pred = np.asarray(mla_module_us(fitted, dk.mla_table_work("context", rows), hw))
    assert dm.mape(truth_us, pred) < 0.5


def test_table_work_keeps_row_order():
    rows = synthetic_rows("generation").sample(frac=1.0, random_state=0)
    rows = rows.reset_index(drop=True)
    w = dk.mla_table_work("generation", rows)
    i = 7
    a = module_arch(rows.loc[i, "gemm_type"], rows.loc[i, "kv_cache_dtype"])
    b = float(rows.loc[i, "batch_size"])
    read = b * float(rows.loc[i, "step"])
    one = mla_module_work(
        "generation", b, read, read, a, 128.0 / float(rows.loc[i, "num_heads"])
    )
    for f in ("proj_flops", "proj_bytes", "attn_flops", "attn_bytes", "kv_bytes"):
        assert float(getattr(w, f)[i]) == pytest.approx(float(getattr(one, f)))


def test_curves_json_round_trip(tmp_path):
    path = dk.save_curves(CURVES, tmp_path / "c.json")
    back = dk.load_curves(path)
    for op in ("context", "generation"):
        a, b = getattr(CURVES.mla, op), getattr(back.mla, op)
        np.testing.assert_array_equal(np.asarray(a.raw), np.asarray(b.raw))
        assert float(a.log_latency_us) == float(b.log_latency_us)
    obj = json.loads(path.read_text())
    assert obj["mla"]["context"]["physical"]["latency_us"] == pytest.approx(50.0)
    del obj["mla"]  # files written before the MLA curves load without them
    path.write_text(json.dumps(obj))
    assert dk.load_curves(path).mla is None


def test_bad_json_names_the_field(tmp_path):
    obj = dk._curves_io.curves_to_json(CURVES)
    obj["mla"]["generation"]["raw"]["raw"] = [0.1, 0.2]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(ValueError, match="raw.raw"):
        dk.load_curves(path)


def test_bad_inputs_raise(tmp_path):
    with pytest.raises(ValueError, match="op must be one of"):
        mla_module_work("decode", 1.0, 1.0, 1.0, DSV3.arch, 8)
    with pytest.raises(ValueError, match="gemm_type"):
        module_arch("int4", "bfloat16")
    with pytest.raises(ValueError, match="unknown table families"):
        dk.load_system_tables("h200_sxm", families=("mla",))
    frame = synthetic_rows("context").assign(latency=0.1, model="other/model")
    path = tmp_path / "m.parquet"
    frame.to_parquet(path)
    with pytest.raises(ValueError, match="no deepseek-ai/DeepSeek-V3 rows"):
        dk.load_mla_module(path)
    frame.drop(columns=["isl"]).to_parquet(path)
    with pytest.raises(ValueError, match="isl"):
        dk.load_mla_module(path)
    frame.assign(model=dk._mla.MLA_MODEL, latency=-1.0).to_parquet(path)
    with pytest.raises(ValueError, match="positive times"):
        dk.load_mla_module(path)


def test_calibrate_reports_missing_mla_tables():
    lines = []
    curves = dk.calibrate_kernels({}, families=("mla",), progress=lines.append)
    assert curves.mla is None
    assert any(line.startswith("skipped mla: no mla_context") for line in lines)
    lines.clear()
    dk.calibrate_kernels({}, families=("allreduce",), progress=lines.append)
    assert any(line.startswith("skipped mla: not asked for") for line in lines)


def test_json_names_every_efficiency_and_priors_are_the_factor_priors():
    phys = MlaModule.prior().to_json()["physical"]
    assert list(phys) == [*EFFICIENCIES, "latency_us"]
    assert phys["mem_bw"] == pytest.approx(dm.FACTOR_SPECS["mem_bw"][0])
    assert phys["attn_flops"] == pytest.approx(dm.FACTOR_SPECS["attn_flops"][0])


def test_mixed_mla_and_gqa_deployments_per_step_with_finite_gradients():
    """Steps of a GQA and an MLA deployment side by side (one deployment per step):
    each priced as alone; the gradient with respect to every curve is finite (the
    module path's values on the GQA step are selected out, not NaN)."""
    llama = dm.deployment("llama-3.1-70b", "h200-sxm", 8)
    deps = dm.stack_deployments([llama, DSV3])
    st = dm.BatchStats(
        prefill_tokens=jnp.asarray([512.0, 512.0]),
        decode_tokens=jnp.asarray([16.0, 16.0]),
        num_prefill=jnp.asarray([1.0, 1.0]),
        num_decode=jnp.asarray([16.0, 16.0]),
        kv_decode=jnp.asarray([16 * 900.0, 16 * 900.0]),
        attn_prefill=jnp.asarray([512 * 513 / 2.0, 512 * 513 / 2.0]),
        kv_prefill=jnp.asarray([0.0, 0.0]),
    )
    both = kernel_step_time(st, deps, CURVES)
    for i, dep in enumerate((llama, DSV3)):
        one = jax.tree.map(lambda x, i=i: x[i], st)
        alone = kernel_step_time(one, dep, CURVES)
        np.testing.assert_allclose(float(both.total[i]), float(alone.total), rtol=1e-12)

    def total(c):
        return kernel_step_time(st, deps, c, check=False).total.sum()

    grads = jax.grad(total)(CURVES)
    leaves = jax.tree.leaves(eqx.filter(grads, eqx.is_inexact_array))
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)
    assert float(jnp.abs(grads.mla.generation.raw).sum()) > 0


@pytest.mark.slow
def test_pooled_fit_prices_each_row_at_its_own_gpu():
    """Module rows of two GPUs made from one known module: the pooled fit (each row
    at its own GPU's peaks) recovers it; a GPU without tables is left out."""
    hws = {"h200": dm.hardware("h200-sxm"), "b200": dm.hardware("b200")}
    tables = {}
    for g, hw in hws.items():
        rows = synthetic_rows("generation")
        w = dk.mla_table_work("generation", rows)
        tables[g] = {
            "mla_context": rows.assign(latency_us=1.0),
            "mla_generation": rows.assign(
                latency_us=np.asarray(mla_module_us(TRUTH, w, hw))
            ),
        }
    tables["a100"] = {}
    lines = []
    got = dk.fit_mla_curves_pooled(
        tables, {**hws, "a100": dm.hardware("a100-sxm")}, progress=lines.append
    )
    assert "mla: a100 has no MLA module tables" in lines
    for name in ("gemm_16", "gemm_8", "attn_bw"):
        want = float(TRUTH.efficiency(name))
        assert float(got.generation.efficiency(name)) == pytest.approx(want, rel=0.05)
    assert float(got.generation.latency_us) == pytest.approx(50.0, rel=0.05)
    assert dk.fit_mla_curves_pooled({"a100": {}}, {}, progress=lines.append) is None


def test_progress_names_efficiencies_at_their_bound():
    at = MlaModule(raw=TRUTH.raw.at[4].set(9.0), log_latency_us=TRUTH.log_latency_us)
    assert (
        dk._mla._at_bound(at) == "; at the bound of 1 (weakly identified): attn_flops"
    )
    assert dk._mla._at_bound(TRUTH) == ""
