"""A GPU's GEMM shape grid (``ShapeGrid``): the interpolation by hand, its gradients,
jit and vmap, the curves file, the fit on known corrections, the time it gives a
GEMM (never below peak), and errors for bad input."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffmodel.kernels as dk
from diffmodel._model._hardware import hardware
from diffmodel.kernels._curves_io import curves_from_json, curves_to_json
from diffmodel.kernels._work import gemm_kernel_work

from ..helpers import assert_grad_matches_fd

H100 = hardware("h100-sxm")


def _grid(values, lo=(0.0, 10.0, 10.0), step=2.0):
    return dk.ShapeGrid(values=jnp.asarray(values, float), lo=lo, step=step)


def test_interpolation_by_hand():
    # Cells at log2 m = 0, 2; log2 n = 10, 12; log2 k = 10, 12.
    v = np.arange(8.0).reshape(2, 2, 2) / 10.0
    g = _grid(v)
    # At the nodes the grid gives its values.
    assert float(g(1.0, 1024.0, 1024.0)) == pytest.approx(v[0, 0, 0])
    assert float(g(4.0, 4096.0, 1024.0)) == pytest.approx(v[1, 1, 0])
    # Halfway along m (log2 m = 1, m = 2) at the first n, k: the mean of two cells.
    assert float(g(2.0, 1024.0, 1024.0)) == pytest.approx((v[0, 0, 0] + v[1, 0, 0]) / 2)
    # A quarter along each axis (log2 sizes 0.5, 10.5, 10.5): the trilinear weights
    # (3/4 or 1/4 per axis).
    w = np.array([0.75, 0.25])
    want = np.einsum("i,j,k,ijk->", w, w, w, v)
    assert float(g(2**0.5, 2**10.5, 2**10.5)) == pytest.approx(want)
    # Beyond the grid, and m = 0 (an empty GEMM): the edge cells.
    assert float(g(1e6, 1024.0, 1024.0)) == pytest.approx(v[1, 0, 0])
    assert float(g(0.0, 1024.0, 1024.0)) == pytest.approx(v[0, 0, 0])


def test_a_grid_of_one_cell_along_an_axis():
    g = _grid(np.array([[[0.1], [0.3]]]))  # 1 x 2 x 1
    assert float(g(7.0, 2048.0, 99.0)) == pytest.approx(0.2)


def test_gradients_match_finite_differences_and_jit_vmap_agree():
    rng = np.random.default_rng(0)
    v = rng.normal(0, 0.1, (3, 3, 3))
    g = _grid(v)

    def of_m(x):  # inside cells (the interpolation is smooth there)
        return jnp.sum(g(jnp.exp(x), 3000.0, 5000.0))

    assert_grad_matches_fd(of_m, np.log([3.0, 6.0, 11.0]), rtol=1e-5)

    def of_values(flat):
        return jnp.sum(
            eqx.tree_at(lambda t: t.values, g, flat.reshape(3, 3, 3))(
                jnp.array([3.0, 20.0]), 3000.0, jnp.array([5000.0, 70000.0])
            )
        )

    assert_grad_matches_fd(of_values, v.ravel(), rtol=1e-5)
    m = jnp.array([1.0, 3.0, 17.0, 900.0])
    eager = g(m, 2048.0, 8192.0)
    jitted = jax.jit(lambda grid, x: grid(x, 2048.0, 8192.0))(g, m)
    np.testing.assert_allclose(jitted, eager, rtol=1e-12)
    looped = jnp.stack([g(x, 2048.0, 8192.0) for x in m])
    np.testing.assert_allclose(
        jax.vmap(lambda x: g(x, 2048.0, 8192.0))(m), looped, rtol=1e-12
    )


def test_fit_recovers_a_smooth_correction_and_picks_a_smoothing():
    rng = np.random.default_rng(1)
    m = 2.0 ** rng.integers(0, 13, 3000)
    n = 2.0 ** rng.integers(8, 15, 3000)
    k = 2.0 ** rng.integers(8, 15, 3000)
    truth = 0.1 * np.sin(np.log2(m) / 3) + 0.05 * np.log2(n / 4096) * np.log2(k / 4096)
    resid = truth + rng.normal(0, 0.01, 3000)
    grid, scores = dk.fit_shape_grid(m, n, k, resid)
    pairs = {(st, sm) for st in dk._grid.GRID_STEPS for sm in dk._grid.GRID_SMOOTHING}
    assert set(scores) == pairs
    assert (grid.step, grid.smoothing) == min(scores, key=scores.get)
    err = np.asarray(grid(m, n, k)) - truth
    assert np.sqrt(np.mean(err**2)) < 0.02
    # One smoothing: no cross-validation.
    fixed, none = dk.fit_shape_grid(m, n, k, resid, step=2.0, smoothing=0.1)
    assert none == {} and (fixed.step, fixed.smoothing) == (2.0, 0.1)


def test_fit_rejects_bad_input():
    one = np.ones(4)
    with pytest.raises(ValueError, match="m must be finite and >= 1"):
        dk.fit_shape_grid(np.array([0.0, 1, 2, 3]), one, one, one * 0)
    with pytest.raises(ValueError, match="k must be finite"):
        dk.fit_shape_grid(one, one, np.array([1.0, np.nan, 2, 3]), one * 0)
    with pytest.raises(ValueError, match="log_residual must be finite"):
        dk.fit_shape_grid(one, one, one, np.array([0.0, np.inf, 0, 0]))
    with pytest.raises(ValueError, match="one length"):
        dk.fit_shape_grid(one, one, one, np.zeros(3))
    with pytest.raises(ValueError, match="smoothing must be > 0"):
        dk.fit_shape_grid(one, one, one, one * 0, smoothing=0.0)
    with pytest.raises(ValueError, match="step must be > 0"):
        dk.fit_shape_grid(one, one, one, one * 0, step=-1.0)


def _curves_with(grid):
    c = dk.default_roofline_curves(occupancy=False, latency=False)
    return eqx.tree_at(lambda c: c.shape_grid, c, grid, is_leaf=lambda x: x is None)


def test_gemm_time_is_scaled_by_the_grid_but_never_below_peak():
    w = gemm_kernel_work(jnp.array([64.0, 4096.0]), 8192.0, 8192.0, H100)
    plain = w.time_us(_curves_with(None))
    up = w.time_us(_curves_with(_grid(np.full((1, 1, 1), np.log(1.25)))))
    np.testing.assert_allclose(up, 1.25 * plain, rtol=1e-6)
    # A grid that would make the GEMM 100x faster stops at its time at peak.
    fast = w.time_us(_curves_with(_grid(np.full((1, 1, 1), np.log(0.01)))))
    at_peak = np.maximum(w.flops / w.peak_flops, w.bytes / w.bandwidth) * 1e6
    np.testing.assert_allclose(fast, at_peak, rtol=1e-6)
    # Work that names no GEMM shape (attention) ignores a grid.
    attn = dk.KernelWork(w.flops, w.bytes, w.peak_flops, w.bandwidth, w.units)
    np.testing.assert_allclose(attn.time_us(_curves_with(_grid([[[1.0]]]))), plain)


def test_curves_file_round_trip_keeps_the_grid():
    v = np.random.default_rng(2).normal(0, 0.1, (3, 2, 4))
    curves = dk.default_kernel_curves()
    moved = eqx.tree_at(
        lambda c: c.gemm_bf16.shape_grid,
        curves,
        _grid(v, lo=(0.0, 5.0, 6.0), step=1.5),
        is_leaf=lambda x: x is None,
    )
    back = curves_from_json(curves_to_json(moved))
    g = back.gemm_bf16.shape_grid
    np.testing.assert_array_equal(np.asarray(g.values), v)
    assert (g.lo, g.step) == ((0.0, 5.0, 6.0), 1.5)
    assert back.gemm_fp8.shape_grid is None
    bad = curves_to_json(moved)
    bad["gemm_bf16"]["shape_grid"]["values"] = [0.0]
    with pytest.raises(ValueError, match="shape_grid"):
        curves_from_json(bad)


def test_calibration_fits_a_grid_only_when_asked(tables):
    small = {"gemm": tables["gemm"].sample(400, random_state=0)}
    opts = dk.FitOptions(adam_steps=20, lbfgs_steps=0)
    lines = []
    with_grid = dk.calibrate_kernels(
        small,
        options=opts,
        families=("gemm_bf16",),
        shape_grids=True,
        progress=lines.append,
    )
    assert "shape grid" in next(x for x in lines if x.startswith("calibrated gemm"))
    g = with_grid.gemm_bf16.shape_grid
    assert g is not None and g.smoothing in dk._grid.GRID_SMOOTHING
    plain = dk.calibrate_kernels(small, options=opts, families=("gemm_bf16",))
    assert plain.gemm_bf16.shape_grid is None
    # The grid is fitted on the curves' residuals: the rows' log error shrinks.
    rows = dk.family_rows(small, "gemm_bf16")
    work = dk.family_work("gemm_bf16", rows, H100)
    y = rows["latency_us"].to_numpy(float)

    def err(c):
        return np.mean(np.abs(np.log(np.asarray(work.time_us(c)) / y)))

    assert err(with_grid.gemm_bf16) < err(plain.gemm_bf16)


def test_attention_work_names_its_grid_sizes():
    from diffmodel.kernels._work import decode_attention_work, prefill_attention_work

    p = prefill_attention_work(2.0, 4096.0, 32.0, 8.0, 128.0, H100)
    np.testing.assert_allclose([p.grid_a, p.grid_b, p.grid_c], [64.0, 4096.0, 4.0])
    d = decode_attention_work(16.0, 1000.0, 64.0, 8.0, 128.0, H100)
    np.testing.assert_allclose([d.grid_a, d.grid_b, d.grid_c], [1024.0, 1000.0, 8.0])
    # A grid scales the attention time like a GEMM's.
    plain = p.time_us(_curves_with(None))
    up = p.time_us(_curves_with(_grid(np.full((1, 1, 1), np.log(1.1)))))
    np.testing.assert_allclose(up, 1.1 * plain, rtol=1e-6)


def test_cross_validation_leaves_whole_shapes_out():
    # Rows of two head layouts: with groups, each fold leaves a layout out whole.
    rng = np.random.default_rng(3)
    n = 400
    a, b = 2.0 ** rng.integers(0, 10, n), 2.0 ** rng.integers(6, 14, n)
    c = np.where(np.arange(n) < n // 2, 1.0, 8.0)
    layout = (c > 1).astype(int)
    resid = 0.2 * layout + rng.normal(0, 0.01, n)
    _, by_layout = dk.fit_shape_grid(a, b, c, resid, groups=layout, folds=2)
    _, by_rows = dk.fit_shape_grid(a, b, c, resid, groups=np.arange(n), folds=2)
    # Left out whole, a layout's offset cannot be learned from the other one.
    assert min(by_layout.values()) > 0.05 > min(by_rows.values())
    with pytest.raises(ValueError, match="groups must give each row's shape"):
        dk.fit_shape_grid(a, b, c, resid, groups=layout[:10])


def test_calibration_fits_attention_grids_by_head_layout(tables):
    small = {
        "prefill_attention": tables["prefill_attention"].sample(300, random_state=0)
    }
    opts = dk.FitOptions(adam_steps=20, lbfgs_steps=0)
    curves = dk.calibrate_kernels(
        small, options=opts, families=("prefill_attention",), shape_grids=True
    )
    assert curves.prefill_attention.shape_grid is not None
    groups = dk.shape_groups(
        dk.family_rows(small, "prefill_attention"), "prefill_attention"
    )
    assert 1 < groups.max() + 1 < 300


def test_the_step_model_reads_every_grid_at_the_step_sizes():
    import diffmodel as dm

    dep = dm.deployment("llama-2-70b", "h100-sxm", 4)
    stats = dm.from_aggregates(
        prefill_tokens=np.array([1024.0]),
        decode_tokens=np.array([32.0]),
        num_prefill=np.array([2.0]),
        num_decode=np.array([32.0]),
        kv_tokens=np.array([64_000.0]),
    )
    base = dk.default_kernel_curves()
    plain = dk.kernel_step_time(stats, dep, base)
    up = _grid(np.full((1, 1, 1), np.log(1.2)))
    moved = eqx.tree_at(
        lambda c: (c.gemm_bf16.shape_grid, c.prefill_attention.shape_grid),
        base,
        (up, up),
        is_leaf=lambda x: x is None,
    )
    b = dk.kernel_step_time(stats, dep, moved)
    np.testing.assert_allclose(b.attention_prefill, 1.2 * plain.attention_prefill)
    np.testing.assert_allclose(b.attention_decode, plain.attention_decode)
    assert float(b.linear[0]) > 1.1 * float(plain.linear[0])
