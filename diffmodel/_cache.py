"""JAX's persistent compilation cache, on by default (see :mod:`diffmodel._paths`).

Compiled executables are written to disk and read back by later processes, so a
second process that fits or predicts the same shapes pays tracing only, not XLA
compilation (and for the fitting loop not even tracing: :mod:`diffmodel._fitting._aot`
keeps that executable itself in the same folder). A cache folder the user configured
for JAX is left as it is.

The folder is bounded (:data:`CACHE_MAX_BYTES`, least recently used entries go
first). The bound also buys safety: only with a size limit does JAX read and write
entries under a file lock, so that processes sharing the folder (parallel fits,
test workers) never read an entry another is still writing (JAX then warns, and
without the lock it writes in place).
"""

import importlib.util
import os
import pathlib
import time

import jax

from ._paths import compilation_cache_dir

CACHE_MAX_BYTES = 2 * 1024**3
"""Size limit of diffmodel's compilation cache folder, bytes (2 GiB)."""


def enable_compilation_cache() -> str | None:
    """Point JAX at diffmodel's cache folder unless turned off or already set;
    return the folder in use (``None``: no persistent cache)."""
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    folder = compilation_cache_dir()
    if folder is None:
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    # Cache every executable, also the many small ones a fit compiles (their sum,
    # not any one of them, is what a fresh process would pay).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if (
        jax.config.jax_compilation_cache_max_size == -1  # JAX's default: unbounded
        and importlib.util.find_spec("filelock") is not None  # JAX needs it to bound
    ):
        _stamp_unstamped_entries(folder)
        jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
    return str(folder)


def _stamp_unstamped_entries(folder: pathlib.Path) -> None:
    """Give each entry written without a size limit (an older diffmodel, or another
    program sharing the folder) the last-access stamp a bounded cache keeps beside
    each entry: without it JAX's eviction fails, and every later write warns."""
    # One listing, no per-entry stat: this runs in every process that uses the
    # library (a per-entry check took ~36 ms on a 3,900-entry folder).
    try:
        names = set(os.listdir(folder))
    except OSError:  # no folder yet, or unreadable: JAX will say so when it writes
        return
    stamp = time.time_ns().to_bytes(8, "little")
    try:
        for name in names:
            if name.endswith("-cache"):
                atime = name[: -len("-cache")] + "-atime"
                if atime not in names:
                    (folder / atime).write_bytes(stamp)
    except OSError:  # a read-only or vanished folder: JAX will say so when it writes
        pass
