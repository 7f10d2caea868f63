"""JAX's persistent compilation cache, on by default (see :mod:`diffmodel._paths`).

Compiled executables are written to disk and read back by later processes, so a
second process that fits or predicts the same shapes pays tracing only, not XLA
compilation. A cache folder the user configured for JAX is left as it is.
"""

import jax

from ._paths import compilation_cache_dir


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
    return str(folder)
