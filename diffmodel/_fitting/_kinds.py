"""The names of the factor-set kinds: defined here and nowhere else.

Free of JAX imports so that the command line can list them without loading JAX.
"""

from typing import Any, Literal, get_args

FactorKind = Literal["global", "per-model", "hierarchical", "study-9", "study-36"]
FACTOR_KINDS: tuple[str, ...] = get_args(FactorKind)
# Kinds with parameters of their own per group and nothing for a group never fitted.
PER_GROUP_KINDS: frozenset[str] = frozenset({"per-model", "study-36"})
# Kinds whose parameters are the roofline's physical factors (not the study's).
ROOFLINE_KINDS: tuple[str, ...] = ("global", "per-model", "hierarchical")


def check_kind(kind: Any, *, name: str = "factors") -> str:
    """``kind`` if it is one of :data:`FACTOR_KINDS`, else a ``ValueError``."""
    if kind not in FACTOR_KINDS:
        raise ValueError(f"{name} must be one of {FACTOR_KINDS}, got {kind!r}")
    return kind
