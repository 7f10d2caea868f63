"""The persistent compilation cache: on by default, its folder, the switch, and a
second process that compiles nothing."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

_PROBE = r"""
import json, sys
import jax
events = {"hits": 0, "misses": 0}
def listen(event, **kw):
    if event == "/jax/compilation_cache/cache_hits":
        events["hits"] += 1
    if event == "/jax/compilation_cache/cache_misses":
        events["misses"] += 1
jax.monitoring.register_event_listener(listen)
import jax.numpy as jnp
import diffmodel as dm
dm.minimise  # the first use of the library turns the cache on
def loss(p, args):
    return jnp.sum((p - args) ** 2)
if len(sys.argv) > 1:
    dm.minimise(loss, jnp.zeros(3), jnp.arange(3.0), solver="lbfgs")
json.dump(
    {
        "dir": jax.config.jax_compilation_cache_dir,
        "max_size": jax.config.jax_compilation_cache_max_size,
        **events,
    },
    sys.stdout,
)
"""


def run(env_changes, *args):
    env = {**os.environ, **env_changes}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, *args],
        env={k: v for k, v in env.items() if v is not None},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "compilation cache" not in out.stderr, out.stderr  # JAX's read/write errors
    return json.loads(out.stdout)


def test_default_folder_follows_xdg_cache_home(tmp_path):
    r = run({"XDG_CACHE_HOME": str(tmp_path), "DIFFMODEL_COMPILATION_CACHE": None})
    assert r["dir"] == str(tmp_path / "diffmodel" / "jax")
    # Bounded, and so read and written under JAX's file lock.
    assert r["max_size"] == 2 * 1024**3


@pytest.mark.slow
def test_switch_off_and_explicit_folder(tmp_path):
    assert run({"DIFFMODEL_COMPILATION_CACHE": "0"})["dir"] is None
    folder = tmp_path / "mine"
    assert run({"DIFFMODEL_COMPILATION_CACHE": str(folder)})["dir"] == str(folder)


@pytest.mark.slow
def test_second_process_compiles_nothing(tmp_path):
    env = {"DIFFMODEL_COMPILATION_CACHE": str(tmp_path / "cache")}
    first = run(env, "fit")
    second = run(env, "fit")
    assert first["misses"] > 0
    # Entries were written under the lock that keeps a reader from a half-written one.
    assert (tmp_path / "cache" / ".lockfile").exists()
    assert second["misses"] == 0 and second["hits"] >= first["misses"]


@pytest.mark.slow
def test_entries_from_an_unbounded_cache_do_not_break_the_bounded_one(tmp_path):
    """An entry an older diffmodel (no size limit) left has no last-access stamp;
    JAX's eviction would fail on it and warn at every write. It gets one."""
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "jit_old-0123-cache").write_bytes(b"an old executable")
    run({"DIFFMODEL_COMPILATION_CACHE": str(folder)}, "fit")  # no warning (run)
    assert (folder / "jit_old-0123-atime").exists()
