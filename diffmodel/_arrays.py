"""Host values onto the device without compiling anything.

``jnp.asarray`` of a NumPy array or Python number runs a small compiled program per
shape and dtype; a fresh process pays tracing, lowering and a cache load for each
(10-20 ms apiece, and a fit's set-up had two dozen). Values known on the host are
converted by NumPy here and moved with one ``jax.device_put``; traced values (inside
``jit``, ``grad``, ``vmap``) go through ``jnp`` as before.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike


def on_host(*xs) -> bool:
    """Whether no value is a tracer (all are known now)."""
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def device_array(x: ArrayLike, dtype=None) -> Array:
    """``jnp.asarray(x, dtype)``, without a compile for host values (``dtype``
    ``float``: JAX's default float, float64 only with ``jax_enable_x64``)."""
    if dtype is float:
        dtype = jnp.result_type(float)
    if not on_host(x):
        return jnp.asarray(x, dtype)
    return jax.device_put(np.asarray(x, dtype))
