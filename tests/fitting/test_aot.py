"""The fitting loop kept on disk as a compiled executable: a later fit loads it
instead of tracing, gives the same answer, and any loop whose key would be
incomplete (user code, callbacks, solver objects) is never kept."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import diffmodel as dm
from diffmodel._fitting import _aot, _optimise
from diffmodel._fitting._factorsets import init_factor_set
from diffmodel._fitting._fit import fit_arrays
from tests.fitting.test_fit import LABELS, TRUTH, noisy, simulate
from tests.helpers import run_python

DATA = simulate(np.arange(120) % 4)
Y = noisy(DATA, TRUTH, 0.03)


class _Hits:
    """Stands in for the persistent-cache hit counter: ``step`` hits a compile."""

    def __init__(self, step=0):
        self.n, self.step = 0, step

    def count(self):
        self.n += self.step
        return self.n


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A fresh folder of kept loops, nothing kept in memory, and every compile
    taken as fresh (the suite's processes share one compilation cache, so a
    compile here may come from it; the slow test below checks the real thing)."""
    monkeypatch.setattr(_aot, "_folder", lambda: tmp_path)
    monkeypatch.setattr(_aot, "_MEMORY", type(_aot._MEMORY)())
    monkeypatch.setattr(_aot, "_CACHE_HITS", _Hits())
    return tmp_path


def _fit(**kw):
    fs = init_factor_set("global", LABELS)
    return fit_arrays(fs, DATA, Y, max_steps=60, uncertainty=False, **kw)


def _no_jit(*args):
    raise AssertionError("the jitted loop ran: the kept executable was not used")


def test_a_later_fit_loads_the_kept_loop_and_matches_jit(folder, monkeypatch):
    first = _fit()
    kept = list(folder.glob("*.xla"))
    assert len(kept) == 1 and kept[0].stat().st_size > 1000
    # A later process: nothing in memory, and the jit path forbidden.
    monkeypatch.setattr(_aot, "_MEMORY", type(_aot._MEMORY)())
    monkeypatch.setattr(_optimise, "_loop", _no_jit)
    again = _fit()
    monkeypatch.undo()
    with monkeypatch.context() as m:  # the reference: keeping turned off
        m.setattr(_aot, "_folder", lambda: None)
        plain = _fit()
    for res in (first, again):
        assert int(res.n_steps) == int(plain.n_steps)
        for a, b in zip(
            jax.tree.leaves(res.factor_set),
            jax.tree.leaves(plain.factor_set),
            strict=True,
        ):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(res.loss_history, plain.loss_history)


def test_new_shapes_or_settings_get_their_own_loop(folder):
    _fit()
    _fit(solver="adam")
    fs = init_factor_set("global", LABELS)
    fit_arrays(fs, simulate(np.arange(80) % 4), Y[:80], max_steps=60, uncertainty=False)
    assert len(list(folder.glob("*.xla"))) == 3


def test_a_damaged_file_is_replaced(folder, monkeypatch):
    reference = _fit()
    (path,) = folder.glob("*.xla")
    path.write_bytes(b"not an executable")
    monkeypatch.setattr(_aot, "_MEMORY", type(_aot._MEMORY)())
    res = _fit()
    np.testing.assert_array_equal(res.loss_history, reference.loss_history)
    assert path.stat().st_size > 1000  # compiled and kept anew


def test_an_executable_from_the_compilation_cache_is_not_kept(folder, monkeypatch):
    """jaxlib serializes an executable that JAX's persistent cache handed back
    without some of its functions; such a compile is never written."""
    monkeypatch.setattr(_aot, "_CACHE_HITS", _Hits(step=1))
    _fit()
    assert not list(folder.glob("*.xla"))


class _FirstHits:
    """The hit counter of a compile that JAX's cache answers the first time only
    (the same program under another key of ours)."""

    def __init__(self):
        self.seq = iter([0, 1, 1])

    def count(self):
        return next(self.seq)


def test_a_loop_the_cache_answered_is_compiled_under_its_own_key_and_kept(
    folder, monkeypatch
):
    """A cache hit (the same program compiled by an earlier diffmodel) is compiled
    once more under a key of its own, with an option at its default, and kept."""
    reference = _fit()
    for path in folder.glob("*.xla"):
        path.unlink()
    monkeypatch.setattr(_aot, "_MEMORY", type(_aot._MEMORY)())
    monkeypatch.setattr(_aot, "_CACHE_HITS", _FirstHits())
    options = []
    real = jax.stages.Lowered.compile

    def compile_(self, compiler_options=None, **kw):
        options.append(compiler_options)
        return real(self, compiler_options=compiler_options, **kw)

    monkeypatch.setattr(jax.stages.Lowered, "compile", compile_)
    res = _fit()
    assert options == [None, _aot._FRESH_OPTIONS]
    assert len(list(folder.glob("*.xla"))) == 1
    np.testing.assert_array_equal(res.loss_history, reference.loss_history)


def test_a_kept_loop_that_does_not_run_is_dropped(folder, monkeypatch):
    reference = _fit()
    (path,) = folder.glob("*.xla")
    monkeypatch.setattr(_aot, "_MEMORY", type(_aot._MEMORY)())

    def broken(*args, **kwargs):
        def run(*leaves):
            raise jax.errors.JaxRuntimeError("NOT_FOUND: Function f not found")

        return run

    monkeypatch.setattr(_aot, "deserialize_and_load", broken)
    res = _fit()  # falls back to the jitted loop
    np.testing.assert_array_equal(res.loss_history, reference.loss_history)
    assert not path.exists()


def _user_loss(params, args):
    return jnp.sum((params - args) ** 2)


class _UserParams(eqx.Module):
    """A user's own pytree class: its code is not covered by the key."""

    x: jax.Array


@pytest.mark.parametrize(
    "how",
    ["user loss", "callback", "solver object", "user pytree class"],
)
def test_loops_with_incomplete_keys_are_never_kept(folder, how):
    if how == "user loss":
        dm.minimise(_user_loss, jnp.zeros(3), jnp.ones(3), solver="lbfgs")
    elif how == "callback":
        _fit(callback=lambda step, loss: None)
    elif how == "solver object":
        _fit(solver=optax.lbfgs())
    else:
        key = _aot.loop_key(
            (_optimise._no_valid,), (), (_UserParams(jnp.zeros(2)), jnp.ones(2))
        )
        assert key is None
    assert not list(folder.glob("*.xla"))


def test_key_covers_shapes_dtypes_and_constants():
    fn = (_optimise._no_valid,)
    key = lambda tree: _aot.loop_key(fn, ("s",), tree)[0]  # noqa: E731
    base = key((jnp.zeros(3), 2.0))
    assert key((jnp.zeros(3), 2.0)) == base
    assert key((jnp.zeros(4), 2.0)) != base
    assert key((jnp.zeros(3, jnp.int32), 2.0)) != base
    assert key((jnp.zeros(3), 3.0)) != base  # a constant is baked into the loop
    assert _aot.loop_key(fn, ("t",), (jnp.zeros(3), 2.0))[0] != base
    assert _aot.loop_key(fn, (), (jnp.zeros(3), object())) is None
    assert _aot.loop_key((_user_loss,), (), (jnp.zeros(3),)) is None


def test_switched_off_with_the_compilation_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(_aot, "compilation_cache_dir", lambda: None)
    assert _aot._folder() is None
    monkeypatch.setattr(_aot, "compilation_cache_dir", lambda: tmp_path)
    assert _aot._folder() == tmp_path / "loops"


@pytest.mark.slow
def test_a_second_process_loads_the_loop_without_compiling(tmp_path):
    """Fresh processes fit the same rows with one cache folder: the second one's
    loop costs no tracing or compilation and gives the same fit."""
    import json

    code = r"""
import json, sys
import jax
jax.config.update("jax_enable_x64", True)
import numpy as np
import diffmodel as dm
from tests.fitting.test_fit import LABELS, TRUTH, noisy, simulate
from diffmodel._fitting._factorsets import init_factor_set
from diffmodel._fitting._fit import fit_arrays
data = simulate(np.arange(120) % 4)
res = fit_arrays(init_factor_set("global", LABELS), data, noisy(data, TRUTH, 0.03),
                 max_steps=60, uncertainty=False)
loss = float(res.loss_history[res.n_steps - 1])
json.dump({"compile_s": res.compile_seconds, "loss": loss}, sys.stdout)
"""
    env = {"DIFFMODEL_COMPILATION_CACHE": str(tmp_path / "cache")}

    def run():
        return json.loads(run_python(code, env, timeout=600))

    first, second = run(), run()
    loops = tmp_path / "cache" / "loops"
    assert len(list(loops.glob("*.xla"))) == 1
    assert first["compile_s"] > 0.05
    assert second["compile_s"] == 0.0
    assert second["loss"] == first["loss"]
    # Without the kept loop, JAX's persistent cache answers the compile with an
    # executable that would not run in a later process: the loop is compiled once
    # more under another key and kept; when that key is answered too, nothing is.
    for path in loops.glob("*.xla"):
        path.unlink()
    third = run()
    assert third["compile_s"] > 0.05 and len(list(loops.glob("*.xla"))) == 1
    assert run()["compile_s"] == 0.0
    for path in loops.glob("*.xla"):
        path.unlink()
    fifth = run()
    assert not list(loops.glob("*.xla"))
    assert fifth["loss"] == third["loss"] == first["loss"]


@pytest.mark.slow
def test_a_second_process_fits_a_frame_without_tracing_anything(tmp_path):
    """From a frame (the KV gauge's columns, the study's model) to fitted factors,
    a second process traces and lowers nothing: the batch statistics and hardware
    are built on the host, and the set's prepared features are computed inside
    the kept loop."""
    import json

    code = r"""
import json, sys
import jax
jax.config.update("jax_enable_x64", True)
import numpy as np
import diffmodel as dm
from tests.helpers import host_frame
traced = []
def listen(event, duration, **kw):
    if event == "/jax/core/compile/jaxpr_trace_duration":
        traced.append(kw.get("fun_name"))
jax.monitoring.register_event_duration_secs_listener(listen)
frame = host_frame(150).drop(columns="kv_tokens")
rng = np.random.default_rng(0)
frame["kv.blocks_total_gpu"] = 4000
frame["kv.usage_gpu_ratio"] = rng.uniform(0.05, 0.9, len(frame))
y = 3000 + 20.0 * frame["decode_tokens"] + 0.5 * frame["prefill_tokens"]
frame["t_us"] = y * np.exp(rng.normal(0, 0.02, len(frame)))
res = dm.fit(frame, target="t_us", factors="study-9", max_steps=40,
             uncertainty=False)
json.dump({"traced": traced, "loss": res.loss}, sys.stdout)
"""
    env = {"DIFFMODEL_COMPILATION_CACHE": str(tmp_path / "cache")}
    first = json.loads(run_python(code, env, timeout=600))
    second = json.loads(run_python(code, env, timeout=600))
    assert first["traced"]
    assert second["traced"] == []
    assert second["loss"] == first["loss"]
