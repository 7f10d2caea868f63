"""vLLM's DeepSeek sparse attention (DSA) module as calibrated curves
(KernelCurves.dsa) and its use in the kernel sum."""

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
    DsaCurves,
    DsaModule,
    default_kernel_curves,
    dsa_module_us,
    dsa_module_work,
    dsa_parts_us,
    kernel_step_time,
)
from diffmodel.kernels._dsa import DSA, DSA_BASE, DSA_CHECKPOINTS, DSA_EFFICIENCIES
from diffmodel.kernels._mla import module_arch
from tests.helpers import assert_grad_matches_fd
from tests.kernels.test_mla_module import one_layer

_EFF = jnp.asarray([0.6, 0.3, 0.2, 0.5, 0.45, 0.3, 0.4, 0.6, 0.2])
TRUTH = eqx.tree_at(
    lambda m: (m.raw, m.log_latency_us, m.log_overlap),
    DsaModule.prior(),
    (jnp.log(_EFF / (1.0 - _EFF)), jnp.log(jnp.asarray(400.0)), jnp.log(2.0)),
)
DSA_CURVES = DsaCurves(context=TRUTH, generation=DsaModule.prior(150.0))
CURVES = dataclasses.replace(default_kernel_curves(), dsa=DSA_CURVES)
V32 = dm.deployment("deepseek-v3.2", "h200-sxm", 8)


def _stats(op: str, b: float, n: float):
    """``b`` requests of ``n`` new tokens (context, empty cache) or ``b`` decode
    requests reading ``n`` cached tokens each."""
    if op == "context":
        return dm.from_aggregates(
            prefill_tokens=b * n,
            decode_tokens=0.0,
            num_prefill=b,
            num_decode=0.0,
            kv_tokens=0.0,
        )
    return dm.from_aggregates(
        prefill_tokens=0.0,
        decode_tokens=b,
        num_prefill=0.0,
        num_decode=b,
        kv_tokens=b * n,
    )


def test_work_hand_computed():
    a = V32.arch  # TP 8: 16 heads a GPU, run as one 64-head tile
    # decode: 4 requests of 4096 cached tokens; the top-k keeps 2048 each.
    w = dsa_module_work("generation", _stats("generation", 4.0, 4096.0), a, 8.0)
    assert float(w.mla.attn_flops) == pytest.approx(2 * 4 * 2048 * 64 * (576 + 512))
    # indexer logits: 2 Hi di FLOPs per pair over every cached token; the top-k
    # reads 4-byte logits of each pair, one row per request.
    assert float(w.index_flops) == pytest.approx(2 * 64 * 128 * 4 * 4096)
    assert float(w.topk_bytes) == pytest.approx(4 * 4 * 4096)
    assert float(w.topk_rows) == 4.0
    # KV writes: the latent (576 x 2 bytes) and the FP8 indexer key (128 bytes).
    assert float(w.mla.kv_bytes) == pytest.approx(4 * (576 * 2 + 128))
    # prefill of 1 request of 1024 tokens: below the top-k, every causal pair.
    w = dsa_module_work("context", _stats("context", 1.0, 1024.0), a, 8.0)
    pairs = 1024 * 1024 / 2
    assert float(w.index_flops) == pytest.approx(2 * 64 * 128 * pairs)
    assert float(w.mla.attn_flops) == pytest.approx(2 * pairs * 64 * (576 + 512))
    # 128 heads a GPU (TP 1) are two tiles: twice the attention of 16 heads.
    w1 = dsa_module_work("context", _stats("context", 1.0, 1024.0), a, 1.0)
    assert float(w1.mla.attn_flops) == pytest.approx(2 * float(w.mla.attn_flops))


def test_topk_runs_one_row_per_sm():
    hw = V32.hw
    few = dsa_module_work("generation", _stats("generation", 1.0, 65536.0), V32.arch, 8)
    many = dsa_module_work(
        "generation", _stats("generation", 2 * hw.sm_count, 65536.0), V32.arch, 8
    )
    m = eqx.tree_at(lambda x: x.raw, TRUTH, TRUTH.raw.at[-1].set(0.0))  # topk_bw 0.5
    bw = float(hw.hbm_bw) * 0.5
    _, _, ix_few, _ = dsa_parts_us(m, few, hw)
    _, _, ix_many, _ = dsa_parts_us(m, many, hw)
    logits = lambda w: dk.roofline_us(  # noqa: E731
        w.index_flops, w.index_bytes, hw.flops_8, hw.hbm_bw, 0.4, 0.6
    )
    # one row alone runs on one SM: as slow as sm_count rows
    want_few = float(hw.sm_count) * 4 * 65536 / bw * 1e6
    assert float(ix_few - logits(few)) == pytest.approx(want_few, rel=1e-9)
    want_many = 2 * float(hw.sm_count) * 4 * 65536 / bw * 1e6
    assert float(ix_many - logits(many)) == pytest.approx(want_many, rel=1e-9)


def test_module_combines_work_and_fixed_cost_by_its_exponent():
    w = dsa_module_work("context", _stats("context", 2.0, 4096.0), V32.arch, 8)
    proj, attn, index, kv = dsa_parts_us(TRUTH, w, V32.hw)
    d, c = float(proj + attn + index + kv), 400.0
    got = float(dsa_module_us(TRUTH, w, V32.hw))
    assert got == pytest.approx((d**3 + c**3) ** (1 / 3), rel=1e-12)  # p = 1 + 2
    summed = eqx.tree_at(lambda m: m.log_overlap, TRUTH, jnp.asarray(-40.0))
    assert float(dsa_module_us(summed, w, V32.hw)) == pytest.approx(d + c, rel=1e-9)
    hidden = eqx.tree_at(lambda m: m.log_overlap, TRUTH, jnp.asarray(6.0))
    assert float(dsa_module_us(hidden, w, V32.hw)) == pytest.approx(max(d, c), 1e-3)


@pytest.mark.parametrize("op", ["context", "generation"])
def test_kernel_sum_times_one_layer_on_the_module(op):
    dep = one_layer(V32)  # one layer, running the indexer
    dep = dataclasses.replace(
        dep, arch=eqx.tree_at(lambda a: a.index_layers, dep.arch, jnp.asarray(1.0))
    )
    st = _stats(op, 8.0, 3000.0)
    b = kernel_step_time(st, dep, CURVES)
    got = b.linear + b.attention_prefill + b.attention_decode + b.kv_write
    parts = dsa_parts_us(
        getattr(DSA_CURVES, op), dsa_module_work(op, st, dep.arch, dep.tp), dep.hw
    )
    np.testing.assert_allclose(float(got), float(sum(parts)), rtol=1e-10)
    # the indexer is paid in its index_layers only (GLM-5.3 shares the top-k)
    shared = dataclasses.replace(
        dep, arch=eqx.tree_at(lambda a: a.index_layers, dep.arch, jnp.asarray(0.0))
    )
    c = kernel_step_time(st, shared, CURVES)
    attn = c.attention_prefill + c.attention_decode
    want = b.attention_prefill + b.attention_decode - parts[2]
    np.testing.assert_allclose(float(attn), float(want), rtol=1e-10)


def test_sparse_attention_needs_dsa_curves():
    st = _stats("generation", 4.0, 1000.0)
    with pytest.raises(ValueError, match="sparse attention .* without DSA module"):
        kernel_step_time(st, V32, default_kernel_curves())
    # DeepSeek-V3 (dense MLA) does not use them
    v3 = dm.deployment("deepseek-v3", "h200-sxm", 8)
    a = kernel_step_time(st, v3, CURVES).total
    b = kernel_step_time(st, v3, default_kernel_curves()).total
    assert float(a) == float(b)


def test_mixed_steps_grads_jit_and_finite_differences():
    mixed = dm.from_aggregates(
        prefill_tokens=2048.0,
        decode_tokens=64.0,
        num_prefill=1.0,
        num_decode=64.0,
        kv_tokens=64 * 8192.0,
        prefill_context_tokens=4096.0,
    )

    def total(raw, st):
        c = eqx.tree_at(lambda c: c.dsa.context.raw, CURVES, raw)
        return kernel_step_time(st, V32, c, check=False).total

    eager = kernel_step_time(mixed, V32, CURVES).total
    jitted = jax.jit(lambda s: kernel_step_time(s, V32, CURVES, check=False).total)
    np.testing.assert_allclose(float(jitted(mixed)), float(eager), rtol=1e-12)
    decode_only = _stats("generation", 64.0, 8192.0)
    g = jax.grad(total)(TRUTH.raw, decode_only)
    assert np.all(np.asarray(g) == 0.0)  # no prefill: the prefill path is idle
    assert_grad_matches_fd(lambda r: total(r, mixed), np.asarray(TRUTH.raw), rtol=1e-5)
    # and through the step's statistics
    grad_stats = jax.grad(lambda s: kernel_step_time(s, V32, CURVES, check=False).total)
    gs = grad_stats(mixed)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(gs))


def synthetic_rows(op: str) -> pd.DataFrame:
    rows = []
    for combo in (
        ("bfloat16", "bfloat16", "bfloat16"),
        ("bfloat16", "fp8", "fp8_block"),
    ):
        for heads in (1, 16, 64, 128):
            for b in (1, 4, 32, 256):
                for s in (64, 1024, 4096, 16384) if op == "context" else (1,):
                    for step in (0,) if op == "context" else (128, 2048, 32768):
                        rows.append((*combo, heads, b, s, step))
    cols = ["mla_dtype", "kv_cache_dtype", "gemm_type", "num_heads", "batch_size"]
    return pd.DataFrame(rows, columns=[*cols, "isl", "step"])


def test_table_work_matches_one_row():
    rows = synthetic_rows("generation").sample(frac=1.0, random_state=0)
    rows = rows.reset_index(drop=True)
    w = dk.dsa_table_work("generation", rows)
    i = 5
    a = module_arch(
        rows.loc[i, "gemm_type"],
        rows.loc[i, "kv_cache_dtype"],
        DSA_BASE,
        DSA_CHECKPOINTS,
    )
    one = dsa_module_work(
        "generation",
        _stats(
            "generation", float(rows.loc[i, "batch_size"]), float(rows.loc[i, "step"])
        ),
        a,
        128.0 / float(rows.loc[i, "num_heads"]),
    )
    for got, want in zip(jax.tree.leaves(w), jax.tree.leaves(one), strict=True):
        assert float(np.asarray(got)[i]) == pytest.approx(float(want))


def test_rows_keep_each_model_on_its_dimensions():
    """GLM-5's modules are counted on GLM-5's dimensions (64 heads of qk 256 + 64,
    v 256, 32 indexer heads), DeepSeek-V3.2's on its own; duplicates average per
    model, never across them."""
    base = synthetic_rows("generation").iloc[:1]
    rows = pd.concat(
        [
            base.assign(model="deepseek-ai/DeepSeek-V3.2", latency_us=1.0),
            base.assign(model="zai-org/GLM-5", latency_us=3.0),
            base.assign(model="zai-org/GLM-5", latency_us=5.0),
        ],
        ignore_index=True,
    )
    kept = dk.dsa_rows(rows)
    assert dict(zip(kept["model"], kept["latency_us"], strict=True)) == {
        "deepseek-ai/DeepSeek-V3.2": 1.0,
        "zai-org/GLM-5": 4.0,
    }
    w = dk.dsa_table_work("generation", kept)
    heads = float(base["num_heads"].iloc[0])  # the heads on the GPU, either model
    b, step = float(base["batch_size"].iloc[0]), float(base["step"].iloc[0])
    keys = min(step, 2048.0)
    # absorbed attention: qk = c + r = 576, v = c = 512 for both (same latent);
    # tiles of 64 heads
    tile = max(64.0, heads)
    for i in (0, 1):
        assert float(w.mla.attn_flops[i]) == pytest.approx(
            2 * b * keys * tile * (576 + 512)
        )
    # the indexer: 64 heads (V3.2) vs 32 (GLM-5), 128 wide
    assert float(w.index_flops[0]) == pytest.approx(2 * 64 * 128 * b * step)
    assert float(w.index_flops[1]) == pytest.approx(2 * 32 * 128 * b * step)
    # GLM-5's q_b is wider per head (256 + 64 vs 192) from a 2048-wide q_lora
    assert float(w.mla.proj_flops[1]) != float(w.mla.proj_flops[0])


@pytest.mark.slow
def test_fit_recovers_known_module():
    hw = dm.hardware("h200-sxm")
    rows = synthetic_rows("context")
    truth_us = np.asarray(dsa_module_us(TRUTH, dk.dsa_table_work("context", rows), hw))
    rows["latency_us"] = truth_us
    fitted = dk.fit_module(DSA, "context", rows, hw)
    pred = np.asarray(dsa_module_us(fitted, dk.dsa_table_work("context", rows), hw))
    assert dm.mape(truth_us, pred) < 1.0
    for name in ("gemm_16", "attn_flops"):
        got, want = float(fitted.efficiency(name)), float(TRUTH.efficiency(name))
        assert got == pytest.approx(want, rel=0.1), name


def test_curves_json_round_trip_and_errors(tmp_path):
    path = dk.save_curves(CURVES, tmp_path / "c.json")
    back = dk.load_curves(path)
    for op in ("context", "generation"):
        a, b = getattr(CURVES.dsa, op), getattr(back.dsa, op)
        np.testing.assert_array_equal(np.asarray(a.raw), np.asarray(b.raw))
        assert float(a.log_overlap) == float(b.log_overlap)
        assert isinstance(b, DsaModule)
    obj = json.loads(path.read_text())
    phys = obj["dsa"]["context"]["physical"]
    assert list(phys) == [*DSA_EFFICIENCIES, "latency_us", "overlap"]
    assert phys["overlap"] == pytest.approx(3.0)  # log_overlap = log 2
    obj["dsa"]["context"]["raw"]["log_overlap"] = "x"
    path.write_text(json.dumps(obj))
    with pytest.raises(ValueError, match="log_overlap"):
        dk.load_curves(path)
    del obj["dsa"]  # files without DSA curves load without them
    path.write_text(json.dumps(obj))
    assert dk.load_curves(path).dsa is None


def test_bad_inputs_raise(tmp_path):
    with pytest.raises(ValueError, match="op must be one of"):
        dsa_module_work("decode", _stats("context", 1.0, 1.0), V32.arch, 8)
    frame = synthetic_rows("context").assign(latency=0.1, model="other/model")
    path = tmp_path / "d.parquet"
    frame.to_parquet(path)
    with pytest.raises(ValueError, match="no deepseek-ai/DeepSeek-V3.2 or zai-org"):
        dk.load_dsa_module(path)
    with pytest.raises(ValueError, match=r"rows of \['other/model'\]"):
        dk.dsa_table_work("context", frame)
    with pytest.raises(ValueError, match="gemm_type"):
        module_arch("nvfp4", "bfloat16", DSA_BASE, DSA_CHECKPOINTS)


def test_calibrate_reports_missing_dsa_tables():
    lines = []
    curves = dk.calibrate_kernels({}, families=("dsa",), progress=lines.append)
    assert curves.dsa is None
    assert any(line.startswith("skipped dsa: no dsa_context") for line in lines)
