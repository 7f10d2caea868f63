"""The compiled fitting loop, kept on disk as an executable.

JAX's persistent compilation cache spares a second process XLA's compilation, not
the Python tracing and MLIR lowering that come before it: for a fit of the study's
9-parameter model on the public traces that was ~0.4 s of the second process's
~0.6 s. This module keeps the compiled loop of
:func:`~diffmodel._fitting._optimise.minimise` itself on disk
(:mod:`jax.experimental.serialize_executable`), keyed by everything its trace
depends on, so a later process loads it in tens of milliseconds and traces nothing.

A loop is kept only when its key is complete:

- the loss (and validation loss) is a module-level function of diffmodel itself, so
  its code is covered by the digest of diffmodel's source files (with the versions
  of Python, JAX, optax and equinox, and the machine's CPU flags: an executable is
  compiled for them);
- the solver is named (``"lbfgs"``, ``"adam"``), so its settings are in the key;
- no progress callback (a host callback does not survive serialization);
- every non-array leaf of the parameters and data has a stable ``repr`` (no object
  addresses), and every array sits on one device;
- the compiled module calls no custom kernels (LAPACK and the like, which a fresh
  process registers only while lowering).

Anything else runs through the ordinary ``jit`` path, as does any loop whose saving
or loading fails. The folder holds at most :data:`MAX_FILES` executables (the least
recently used go first); it is off whenever the compilation cache is
(``DIFFMODEL_COMPILATION_CACHE=0``).
"""

import collections
import functools
import hashlib
import importlib.metadata
import inspect
import os
import pathlib
import platform
import sys
import tempfile
import threading
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
from jax.experimental.serialize_executable import deserialize_and_load, serialize

from .._paths import compilation_cache_dir, xla_flags

MAX_FILES = 64
"""Most compiled loops kept on disk (each ~0.4 MB)."""

_FRESH_OPTIONS = {"xla_embed_ir_in_executable": False}
"""An XLA option at its default value: the same code under another cache key."""

_SUFFIX = ".xla"
_MEMORY: collections.OrderedDict[str, Callable] = collections.OrderedDict()
_MEMORY_SIZE = 16


def _folder() -> pathlib.Path | None:
    base = compilation_cache_dir()
    return None if base is None else base / "loops"


@functools.cache
def _source_digest() -> str:
    """SHA-256 of diffmodel's source files and the versions of what traces them."""
    h = hashlib.sha256()
    root = pathlib.Path(__file__).resolve().parents[1]
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    for dist in ("jax", "jaxlib", "optax", "equinox"):
        try:
            h.update(f"{dist}={importlib.metadata.version(dist)}".encode())
        except importlib.metadata.PackageNotFoundError:
            h.update(f"{dist}=?".encode())
    h.update(sys.version.encode())
    h.update(platform.machine().encode())
    try:  # the CPU's instruction sets: XLA compiles for the host it runs on
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
        h.update(flags.encode())
    except OSError:
        h.update(platform.processor().encode())
    return h.hexdigest()


def _module_function(f: Callable) -> bool:
    """A closure-free module-level function of diffmodel's own code (under any
    wrapper that keeps ``__wrapped__``, such as a run-time type checker)."""
    module = getattr(f, "__module__", "") or ""
    if not (module == "diffmodel" or module.startswith("diffmodel.")):
        return False
    if getattr(inspect.unwrap(f), "__closure__", None) is not None:
        return False
    owner = sys.modules.get(module)
    return owner is not None and getattr(owner, f.__qualname__, None) is f


_KNOWN_MODULES = ("builtins", "numpy", "jax", "jaxlib", "equinox", "optax", "diffmodel")


def _known_type(cls: type) -> bool:
    """A type whose code the key covers: a builtin, or one of diffmodel's or of the
    versioned libraries' (a user's own class could change under the same key)."""
    return cls.__module__.split(".")[0] in _KNOWN_MODULES


def _known_nodes(treedef) -> bool:
    """Every node type of ``treedef`` is a :func:`_known_type`."""
    data = treedef.node_data()
    if data is not None and not _known_type(data[0]):
        return False
    return all(_known_nodes(child) for child in treedef.children())


def loop_key(
    functions: tuple[Callable, ...], settings: tuple, tree: Any
) -> tuple[str, Any, Any, list] | None:
    """The key of a compiled loop over ``tree`` (parameters, data and tolerances), or
    None where the key could not be complete.

    Returns:
        ``(key, treedef, others, arrays)``: ``arrays`` are the traced leaves, and
        ``treedef`` and ``others`` (the non-array part) rebuild the tree from them.
    """
    if not all(_module_function(f) for f in functions):
        return None
    arrays, others = eqx.partition(tree, eqx.is_array)
    leaves, treedef = jax.tree.flatten(arrays)
    constants = jax.tree.leaves(others)
    if not (_known_nodes(treedef) and all(map(_known_type, map(type, constants)))):
        return None
    static = repr((treedef, constants))
    if " at 0x" in static:
        return None
    avals = []
    device = jax.devices()[0]  # where a loaded executable runs
    for x in leaves:
        if isinstance(x, jax.Array) and x.devices() != {device}:
            return None
        avals.append((x.shape, str(x.dtype), bool(getattr(x, "weak_type", False))))
    parts = (
        _source_digest(),
        tuple(f"{f.__module__}.{f.__qualname__}" for f in functions),
        settings,
        static,
        tuple(avals),
        device.platform,
        getattr(device, "device_kind", ""),
        jax.config.jax_enable_x64,
        jax.config.jax_default_matmul_precision,
        jax.config.jax_numpy_dtype_promotion,
        jax.config.jax_numpy_rank_promotion,
        xla_flags(),  # code generation options
    )
    key = hashlib.sha256(repr(parts).encode()).hexdigest()[:40]
    return key, treedef, others, leaves


def compiled_call(
    body: Callable, key: str, treedef, others, leaves: list, n_out: int
) -> list | None:
    """Run ``body`` (a function of the tree that ``treedef`` and ``others`` rebuild
    from ``leaves``, with ``n_out`` output leaves) as the compiled loop of ``key``:
    from memory, else from disk, else compiled now and saved. Returns the flat
    outputs, or None where keeping loops is off or failed (the caller then runs
    ``body`` jitted)."""
    folder = _folder()
    if folder is None:
        return None
    path = folder / f"{key}{_SUFFIX}"
    run, loaded = _MEMORY.get(key), False
    if run is None:
        run = _load(path, len(leaves), n_out)
        loaded = run is not None
    if run is None:
        run = _compile(body, treedef, others, leaves, folder, key)
    _MEMORY[key] = run
    _MEMORY.move_to_end(key)
    while len(_MEMORY) > _MEMORY_SIZE:
        _MEMORY.popitem(last=False)
    try:
        out = run(*leaves)
    except jax.errors.JaxRuntimeError:
        if not loaded:
            raise
        # An executable that does not run (XLA resolves its functions when it
        # starts): drop it; the caller compiles the loop anew.
        path.unlink(missing_ok=True)
        _MEMORY.pop(key, None)
        return None
    return list(out) if len(out) == n_out else None


def _compile(body, treedef, others, leaves, folder, key):
    def flat(*xs):
        tree = eqx.combine(jax.tree.unflatten(treedef, list(xs)), others)
        return tuple(jax.tree.leaves(body(*tree)))

    lowered = jax.jit(flat).lower(*leaves)
    hits = _CACHE_HITS.count()
    compiled = lowered.compile()
    # An executable JAX's persistent cache handed back serializes without some of
    # its functions (jaxlib 0.10, XLA:CPU: "Function ... not found" when a later
    # process runs it): only a fresh compile is kept. A hit here means the cache
    # holds this very program under another key of ours (a new diffmodel whose
    # loop compiles to the same code): compile it once more under a cache key of
    # its own, so that it is kept and later processes trace nothing.
    after = _CACHE_HITS.count()
    if after != hits:
        compiled = lowered.compile(compiler_options=_FRESH_OPTIONS)
    fresh = _CACHE_HITS.count() == after
    if fresh and "custom_call" not in lowered.as_text():
        _save(folder, key, compiled)
    return compiled


class _CacheHits:
    """Persistent-cache hits in this thread (from ``jax.monitoring``)."""

    def __init__(self):
        self.local = threading.local()
        jax.monitoring.register_event_listener(self._listen)

    def _listen(self, event: str, **kwargs) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            self.local.n = self.count() + 1

    def count(self) -> int:
        return getattr(self.local, "n", 0)


_CACHE_HITS = _CacheHits()


def _load(path: pathlib.Path, n_in: int, n_out: int):
    try:
        data = path.read_bytes()
    except OSError:
        return None
    try:
        run = deserialize_and_load(
            data,
            jax.tree.structure((tuple(range(n_in)), {})),
            jax.tree.structure(tuple(range(n_out))),
        )
    except Exception:  # noqa: BLE001 -- a stale or damaged file: compile anew
        path.unlink(missing_ok=True)
        return None
    try:
        os.utime(path)  # least recently used goes first
    except OSError:
        pass
    return run


def _save(folder: pathlib.Path, key: str, compiled) -> None:
    """Write atomically (a process reading never sees half a file); keep the
    folder at :data:`MAX_FILES`. A read-only folder only costs the saving."""
    try:
        data, _, _ = serialize(compiled)
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, folder / f"{key}{_SUFFIX}")
        files = sorted(folder.glob(f"*{_SUFFIX}"), key=lambda p: p.stat().st_mtime)
        for old in files[:-MAX_FILES]:
            old.unlink(missing_ok=True)
    except OSError:
        pass
