"""From a pandas frame of steps to array data: statistics, deployments, groups."""

from collections.abc import Callable, Mapping

import equinox as eqx
import numpy as np
import pandas as pd

from ._model._arch import canonical_model
from ._model._batch import (
    VLLM_BLOCK_SIZE,
    BatchStats,
    from_aggregates,
    kv_product,
)
from ._model._deployment import (
    Deployment,
    deployment,
    positive_degree,
    stack_deployments,
)
from ._model._hardware import DEFAULT_HARDWARE, canonical_hardware

# Canonical column -> accepted trace spellings.
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "prefill_tokens": ("batch.prefill_tokens",),
    "decode_tokens": ("batch.decode_tokens",),
    "num_prefill_reqs": ("batch.num_prefill_reqs",),
    "num_decode_reqs": ("batch.num_decode_reqs",),
    "kv_tokens": (),
    "prefill_context_tokens": (),
}


def group_label(model: str, hardware: str, tp: int, ep: int = 1) -> str:
    """The label of a deployment group, e.g. ``llama-2-70b/h100-sxm/tp4``, with
    ``/epM`` after it for expert parallelism (``ep`` > 1)."""
    label = f"{model}/{hardware}/tp{int(tp)}"
    return label if int(ep) == 1 else f"{label}/ep{int(ep)}"


def parse_group_label(label: str) -> tuple[str, str, int, int]:
    """``(model, hardware, tp, ep)`` of a :func:`group_label`."""
    parts = str(label).split("/")
    ok = len(parts) in (3, 4) and parts[2].startswith("tp")
    ok = ok and (len(parts) == 3 or parts[3].startswith("ep"))
    try:
        tp = int(parts[2][2:]) if ok else 0
        ep = int(parts[3][2:]) if ok and len(parts) == 4 else 1
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"deployment label {label!r}: expected 'model/hardware/tpN[/epM]'"
        )
    return parts[0], parts[1], tp, ep


# Columns that count this step's tokens or requests: whole numbers >= 0. The KV
# columns (``kv_tokens``, ``prefill_context_tokens``) may be estimates (e.g. from the
# KV-cache gauge): any number >= 0.
COUNT_COLUMNS: tuple[str, ...] = (
    "prefill_tokens",
    "decode_tokens",
    "num_prefill_reqs",
    "num_decode_reqs",
)


def number_text(value) -> str:
    """A number as a user reads it: ``-64``, ``1.5``, ``nan`` (no NumPy reprs)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return repr(value)
    return f"{v:.0f}" if v.is_integer() and abs(v) < 1e15 else f"{v:g}"


def check_unique_columns(columns) -> None:
    """``ValueError`` naming a column that appears twice (which one would count?)."""
    names = list(columns)
    dup = [c for i, c in enumerate(names) if c in names[:i]]
    if dup:
        raise ValueError(f"duplicated column {dup[0]!r}: keep one of them")


def holds_booleans(values) -> bool:
    """Whether a column or array holds ``True``/``False`` (a boolean dtype, or
    booleans among the objects of a mixed one): they convert to 1 and 0, which
    are not token counts or step times."""
    kind = values.dtype if isinstance(values, pd.Series) else np.asarray(values).dtype
    if pd.api.types.is_bool_dtype(kind):
        return True
    if not pd.api.types.is_object_dtype(kind):
        return False
    flat = values if isinstance(values, pd.Series) else np.asarray(values).ravel()
    return any(isinstance(v, bool | np.bool_) for v in flat)


def _first_bad(col: str, values: np.ndarray, bad: np.ndarray, expected: str) -> None:
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"column {col!r} must be {expected}; row {i} has {number_text(values[i])}"
        )


MAX_COUNT = 2.0**31
"""The largest token or request count one step may hold (a serving engine indexes
its tokens with 32-bit integers); larger values overflow the float32 evaluation."""


def numeric_column(series: pd.Series, col: str) -> np.ndarray:
    """A column as float64; a one-line error naming the column, the first bad row
    (0-based position) and its value when it holds text, booleans (``True`` is not a
    count), complex numbers, dates or missing values."""
    kind = series.dtype
    if (
        pd.api.types.is_bool_dtype(kind)
        or pd.api.types.is_complex_dtype(kind)
        or pd.api.types.is_datetime64_any_dtype(kind)
        or pd.api.types.is_timedelta64_dtype(kind)
    ):
        raise ValueError(f"column {col!r} must be numeric, got a {kind} column")
    if pd.api.types.is_object_dtype(kind):
        flags = series.map(lambda v: isinstance(v, bool | np.bool_ | complex))
        if flags.any():
            i = int(np.flatnonzero(flags.to_numpy())[0])
            raise ValueError(
                f"column {col!r} must be numeric; row {i} has {series.iloc[i]!r}"
            )
    values = pd.to_numeric(series, errors="coerce").to_numpy(
        dtype=float, na_value=np.nan
    )
    text = series.notna().to_numpy() & np.isnan(values)
    if text.any():
        i = int(np.flatnonzero(text)[0])
        raise ValueError(
            f"column {col!r} must be numeric; row {i} has {series.iloc[i]!r}"
        )
    _first_bad(col, values, np.isnan(values), "a number (no missing values)")
    return values


def check_counts(col: str, values: np.ndarray, what: str = "tokens") -> None:
    """Raise unless every value is a whole number >= 0 (a count of ``what``)."""
    bad = ~(values >= 0)
    if values.dtype.kind == "f":
        bad |= ~np.isfinite(values) | (values != np.round(values))
    _first_bad(col, values, bad, f"a whole number >= 0 ({what})")


def check_step_size(col: str, values: np.ndarray) -> None:
    """Raise where a step's count is infinite or above :data:`MAX_COUNT`."""
    _first_bad(col, values, ~(values <= MAX_COUNT), "at most 2^31 in one step")


def check_ratio(col: str, values: np.ndarray) -> None:
    """Raise unless every value lies in [0, 1] (a fraction, e.g. of the KV cache)."""
    _first_bad(col, values, ~((values >= 0) & (values <= 1)), "a fraction in [0, 1]")


def check_batch(names: Mapping[str, str], columns: Mapping[str, np.ndarray]) -> None:
    """Raise where the token and request counts of a row contradict each other.

    Every request of a kind brings at least one token of that kind, and tokens of a
    kind need a request: ``tokens >= requests`` and ``tokens > 0`` only with
    ``requests > 0``. ``names`` maps ``prefill_tokens``, ``num_prefill_reqs``,
    ``decode_tokens``, ``num_decode_reqs`` to the frame's column names.
    """
    for kind in ("prefill", "decode"):
        tok, req = f"{kind}_tokens", f"num_{kind}_reqs"
        t, r = columns[tok], columns[req]
        for bad, why in (
            ((t > 0) & (r == 0), f"{kind} tokens need a {kind} request"),
            (r > t, f"each {kind} request brings at least one token"),
        ):
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ValueError(
                    f"row {i}: {names[tok]} is {number_text(t[i])} but {names[req]} is "
                    f"{number_text(r[i])} ({why})"
                )


def _column(frame: pd.DataFrame, name: str) -> tuple[str, np.ndarray] | None:
    found = None
    for col in (name, *COLUMN_ALIASES.get(name, ())):
        if col not in frame.columns:
            continue
        values = numeric_column(frame[col], col)
        if name in COUNT_COLUMNS:
            check_counts(col, values, "requests" if "reqs" in name else "tokens")
        else:
            _first_bad(col, values, ~(values >= 0), "a number >= 0")
        if name in COLUMN_ALIASES:  # the step's statistics (not the KV gauge)
            check_step_size(col, values)
        if found is None:
            found = col, values
        elif not np.array_equal(found[1], values):
            i = int(np.flatnonzero(found[1] != values)[0])
            raise ValueError(
                f"columns {found[0]!r} and {col!r} both give {name} and disagree at "
                f"row {i} ({number_text(found[1][i])} vs {number_text(values[i])}); "
                "drop one of them"
            )
    return found


def _required(frame: pd.DataFrame, name: str) -> tuple[str, np.ndarray]:
    found = _column(frame, name)
    if found is None:
        names = " or ".join(repr(c) for c in (name, *COLUMN_ALIASES[name]))
        raise ValueError(f"missing column {names}")
    return found


def stats_from_frame(
    frame: pd.DataFrame, *, block_size: int = VLLM_BLOCK_SIZE
) -> BatchStats:
    """Batch statistics from a frame with canonical or trace column names.

    ``kv_tokens`` (``K_dec``) comes from a ``kv_tokens`` column (0 in steps without a
    decoding request), else from the KV gauge ``kv.usage_gpu_ratio *
    kv.blocks_total_gpu * block_size`` (see :func:`diffmodel.kv_tokens_from_usage` for
    what that proxy approximates), taken as 0 in steps without a decoding request
    (the gauge counts every running request's cache; only decodes read it there).
    ``prefill_context_tokens`` (``K_pf``) is 0 when absent; prefill chunks are taken as
    equal (see :func:`diffmodel.from_aggregates`).
    """
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"expected a pandas DataFrame, got {type(frame).__name__}")
    if len(frame) == 0:
        raise ValueError("the table of steps has no rows")
    check_unique_columns(frame.columns)
    counts = {
        name: _required(frame, name)
        for name in ("prefill_tokens", "decode_tokens", "num_prefill_reqs")
        + ("num_decode_reqs",)
    }
    check_batch(
        {k: col for k, (col, _) in counts.items()},
        {k: v for k, (_, v) in counts.items()},
    )
    found = _column(frame, "kv_tokens")
    if found is None:
        usage = _column(frame, "kv.usage_gpu_ratio")
        blocks = _column(frame, "kv.blocks_total_gpu")
        if usage is None or blocks is None:
            raise ValueError(
                "missing column 'kv_tokens' (or both 'kv.usage_gpu_ratio' and "
                "'kv.blocks_total_gpu' to derive it)"
            )
        check_ratio(*usage)
        check_counts(*blocks, "blocks")
        _first_bad(
            blocks[0], blocks[1], blocks[1] == 0, "> 0 (a KV cache holds some blocks)"
        )
        kv = kv_product(usage[1], blocks[1], block_size)  # stays on the host
        # The gauge holds every running request's cache; a step without a decoding
        # request reads none of it in decode attention.
        kv = np.where(counts["num_decode_reqs"][1] > 0, kv, 0.0)
    else:
        kv = found[1]
        nd_col, nd = counts["num_decode_reqs"]
        _first_bad(
            found[0],
            kv,
            (kv > 0) & (nd == 0),
            f"0 where {nd_col!r} is 0 (decode attention reads the KV of decoding "
            "requests only)",
        )
    k_pf = _column(frame, "prefill_context_tokens")
    return from_aggregates(
        prefill_tokens=counts["prefill_tokens"][1],
        decode_tokens=counts["decode_tokens"][1],
        num_prefill=counts["num_prefill_reqs"][1],
        num_decode=counts["num_decode_reqs"][1],
        kv_tokens=kv,
        prefill_context_tokens=np.zeros(len(frame)) if k_pf is None else k_pf[1],
    )


class Groups(eqx.Module):
    """Deployments of a frame: stacked deployments, labels and each row's group."""

    deployments: Deployment
    labels: tuple[str, ...] = eqx.field(static=True)
    index: np.ndarray


def _degree(name: str):
    def check(value) -> int:
        return positive_degree(name, value)

    return check


_tp = _degree("tp")
_CANONICAL = {
    "model": canonical_model,
    "hardware": canonical_hardware,
    "tp": _tp,
    "ep": _degree("ep"),
    "pp": _degree("pp"),
}


def _per_row(frame: pd.DataFrame, col: str, value, spell) -> np.ndarray:
    """Each row's ``col``: the keyword ``value`` (checked: an unknown name is an
    error) or the frame's column; both only when they agree on every row."""
    if value is not None:
        try:
            value = _CANONICAL[col](value)
        except ValueError as err:
            raise ValueError(f"{spell(col)}{value}: {err}") from None
    if col not in frame.columns:
        if value is None:
            raise ValueError(
                f"no {col}: pass {spell(col)} or give the table a {col!r} column"
            )
        return np.full(len(frame), value, dtype=object)
    values = frame[col]
    if values.isna().any():
        i = int(np.flatnonzero(values.isna().to_numpy())[0])
        raise ValueError(f"column {col!r} has a missing value at row {i}")
    names = {}
    for v in pd.unique(values):
        try:
            names[v] = str(_CANONICAL[col](v))
        except ValueError as err:
            raise ValueError(f"column {col!r}: {err}") from None
    if value is not None:
        seen = sorted(set(names.values()))
        if seen != [str(value)]:
            raise ValueError(
                f"{spell(col)}{value} contradicts the table's {col!r} column "
                f"({', '.join(seen)}); drop one of them"
            )
    return values.to_numpy()


def groups_from_frame(
    frame: pd.DataFrame,
    *,
    model: str | None = None,
    hardware: str | None = None,
    tp: int | None = None,
    ep: int | None = None,
    overrides: Mapping[str, str] | None = None,
    spell: Callable[[str], str] = lambda name: f"{name}=",
) -> Groups:
    """Each row's deployment, from per-row ``model``/``hardware``/``tp`` columns or
    the keyword arguments; hardware defaults to H100-SXM when neither gives one.
    The expert-parallel degree comes from an ``ep`` column or keyword the same way
    (1 without either; see :class:`~diffmodel.Deployment`), validated against the
    model and ``tp``.

    A keyword and a column may both be given only when they name the same thing on
    every row (after canonicalisation); unknown names are an error either way.
    ``spell(name)`` is how an error names a keyword (the CLI passes ``--name``).
    """
    if "hardware" not in frame.columns and hardware is None:
        hardware = DEFAULT_HARDWARE
    models = _per_row(frame, "model", model, spell)
    hws = _per_row(frame, "hardware", hardware, spell)
    tps = _per_row(frame, "tp", tp, spell)
    if "ep" not in frame.columns and ep is None:
        ep = 1
    eps = _per_row(frame, "ep", ep, spell)
    # Distinct (model, hardware, tp, ep): one code per column, combined.
    combined = np.zeros(len(frame), np.int64)
    for col in (models, hws, np.asarray(tps), np.asarray(eps)):
        c, u = pd.factorize(col)
        combined = combined * max(len(u), 1) + c
    _, first, codes = np.unique(combined, return_index=True, return_inverse=True)
    ulabels = np.asarray(
        [
            group_label(
                canonical_model(models[i]),
                canonical_hardware(hws[i]),
                _tp(tps[i]),
                _CANONICAL["ep"](eps[i]),
            )
            for i in first
        ],
        dtype=object,
    )
    keys = ulabels[codes]
    index, labels = pd.factorize(keys, sort=True)
    deps = []
    for label in labels:
        m, h, t, e = parse_group_label(label)
        deps.append(deployment(m, h, t, ep=e, **(overrides or {})))
    return Groups(
        deployments=stack_deployments(deps),
        labels=tuple(labels),
        index=index.astype(np.int32),
    )


def pipeline_degrees(
    frame: pd.DataFrame,
    pp: int | None = None,
    *,
    spell: Callable[[str], str] = lambda name: f"{name}=",
) -> np.ndarray | None:
    """Each row's pipeline-parallel degree (positive integers), from a ``pp``
    column or keyword (both only when they agree), or ``None`` when neither gives
    one (no pipeline parallelism)."""
    if pp is None and "pp" not in frame.columns:
        return None
    values = _per_row(frame, "pp", pp, spell)
    return np.asarray([_CANONICAL["pp"](v) for v in values], np.int64)
