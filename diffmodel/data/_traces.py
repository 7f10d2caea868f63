"""Per-step vLLM trace tables: loading, validation and the two step-time targets.

A *step table* has one row per sampled scheduler step, with the columns of
``stepml/steps.parquet`` (see ``STEP_COLUMNS``). It comes either from that table
(``load_steps``) or from the raw OpenTelemetry export it was built from
(``load_otel``). Both return the same validated frame: plain numpy dtypes, no missing
values in the required columns, no negative counts, sorted by
``(experiment_id, step.id)``.

Two targets are derived from it (``add_targets``):

- ``step_duration_us``: the trace's ``step.duration_us``, a host-side timer, in
  microseconds.
- ``iteration_time_us``: for two sampled steps of one experiment whose ``step.id``
  differ by exactly 1, ``step.ts_start_ns(next) - step.ts_start_ns(this)``, in
  microseconds: the full wall time of the step. NaN where the next step was not sampled.
"""

import json
import os
import pathlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import pandas as pd

from .._frame import check_batch, check_counts, check_ratio, numeric_column

INT_COLUMNS: tuple[str, ...] = (
    "step.id",
    "step.ts_start_ns",
    "step.ts_end_ns",
    "step.duration_us",
    "queue.running_depth",
    "queue.waiting_depth",
    "batch.num_prefill_reqs",
    "batch.num_decode_reqs",
    "batch.scheduled_tokens",
    "batch.prefill_tokens",
    "batch.decode_tokens",
    "batch.num_finished",
    "batch.num_preempted",
    "kv.blocks_total_gpu",
    "kv.blocks_free_gpu",
)
"""Integer counts (steps, nanoseconds, microseconds, requests, tokens, KV blocks)."""

FLOAT_COLUMNS: tuple[str, ...] = ("kv.usage_gpu_ratio",)
"""Fractions in [0, 1]."""

EVENT_COLUMNS: tuple[str, ...] = INT_COLUMNS + FLOAT_COLUMNS
"""The columns carried by each ``BATCH_SUMMARY`` event."""

RUN_COLUMNS: tuple[str, ...] = ("experiment_id", "model", "workload", "tp")
"""Per-experiment labels; ``tp`` is the tensor-parallel degree (GPUs)."""

STEP_COLUMNS: tuple[str, ...] = EVENT_COLUMNS + RUN_COLUMNS
"""Every column a step table must have."""

_STRING_COLUMNS: tuple[str, ...] = ("experiment_id", "model", "workload")
_SORT_KEY: list[str] = ["experiment_id", "step.id"]


# --------------------------------------------------------------------------- tables


def load_steps(path: str | os.PathLike) -> pd.DataFrame:
    """Read and validate a step table.

    **Arguments:**

    - `path`: a ``.parquet`` (or ``.pq``) or ``.csv`` file with the columns in
      ``STEP_COLUMNS``; extra columns are kept.

    **Returns:** the validated table (see ``validate_steps``), sorted stably by
    ``(experiment_id, step.id)`` with a fresh ``RangeIndex``.

    **Raises:** ``ValueError`` for an unknown suffix, missing columns, missing values
    or negative counts.
    """
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        frame = pd.read_parquet(path)
    elif suffix == ".csv":
        frame = pd.read_csv(path)
    else:
        raise ValueError(
            f"path: expected a .parquet, .pq or .csv file, got {path.name!r}"
        )
    return validate_steps(frame)


def validate_steps(frame: pd.DataFrame) -> pd.DataFrame:
    """Check a step table and convert it to plain numpy dtypes.

    Required columns (``STEP_COLUMNS``) must be present and free of missing values;
    counts, times, ``kv.usage_gpu_ratio`` and ``tp`` must be non-negative. Integer
    columns become ``int64`` (nullable ``Int64`` included); extra nullable columns
    become ``float64`` with NaN for missing values. No row is dropped.

    **Returns:** a new frame, sorted stably by ``(experiment_id, step.id)``, with a
    fresh ``RangeIndex``. Errors name rows by their position in the input (0-based).
    """
    missing = [c for c in STEP_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"step table is missing required columns: {missing}")
    if len(frame) == 0:
        raise ValueError("the step table has no rows")
    frame = frame.reset_index(drop=True)
    out = {}
    for name in frame.columns:
        column = frame[name]
        if name in STEP_COLUMNS:
            _check_present(name, column)
        if name in _STRING_COLUMNS:
            out[name] = column.astype(object).map(str).to_numpy(dtype=object)
        elif name in INT_COLUMNS or name == "tp":
            out[name] = _as_int64(name, column)
        elif name in FLOAT_COLUMNS:
            out[name] = numeric_column(column, name)
            check_ratio(name, out[name])
        else:
            out[name] = _plain(column)
    check_batch(
        {k: f"batch.{k}" for k in _BATCH}, {k: out[f"batch.{k}"] for k in _BATCH}
    )
    result = pd.DataFrame(out, columns=list(frame.columns))
    return result.sort_values(_SORT_KEY, kind="stable").reset_index(drop=True)


_BATCH = ("prefill_tokens", "decode_tokens", "num_prefill_reqs", "num_decode_reqs")
_UNITS = {
    "step.ts_start_ns": "ns",
    "step.ts_end_ns": "ns",
    "step.duration_us": "us",
    "kv.blocks_total_gpu": "blocks",
    "kv.blocks_free_gpu": "blocks",
    "tp": "GPUs",
} | {c: "tokens" for c in INT_COLUMNS if c.endswith("_tokens")}


def _as_int64(name: str, column: pd.Series) -> np.ndarray:
    """A count column as int64, exactly (nanosecond times exceed float64's 2^53)."""
    if pd.api.types.is_integer_dtype(column.dtype):
        values = column.to_numpy(dtype=np.int64)
        check_counts(name, values, _UNITS.get(name, "a count"))
        return values
    values = numeric_column(column, name)
    check_counts(name, values, _UNITS.get(name, "a count"))
    return values.astype(np.int64)


def _check_present(name: str, column: pd.Series) -> None:
    isna = column.isna().to_numpy(dtype=bool)
    if isna.any():
        row = int(np.flatnonzero(isna)[0])
        raise ValueError(f"column {name!r} has a missing value (NaN) at row {row}")


def _plain(column: pd.Series) -> np.ndarray:
    """Extra columns: nullable numbers to numpy, missing values to NaN."""
    if isinstance(column.dtype, pd.api.extensions.ExtensionDtype) and (
        pd.api.types.is_numeric_dtype(column.dtype)
    ):
        if column.isna().any() or pd.api.types.is_float_dtype(column.dtype):
            return column.to_numpy(dtype=np.float64, na_value=np.nan)
        return column.to_numpy(dtype=np.int64)
    if pd.api.types.is_numeric_dtype(column.dtype):
        return column.to_numpy()
    return column.astype(object).to_numpy(dtype=object)


# --------------------------------------------------------------------------- OTLP


def load_otel(
    source: str | os.PathLike | Mapping | list,
    *,
    experiment_id: str | None = None,
    model: str | None = None,
    workload: str | None = None,
    tp: int | None = None,
) -> pd.DataFrame:
    """Build a step table from OpenTelemetry ``BATCH_SUMMARY`` events.

    **Arguments:**

    - `source`: one of
        - an OTLP JSON export, ``{"resourceSpans": [{"resource": ..., "scopeSpans":
          [{"spans": [{"events": [...]}]}]}]}``, as a dict or a ``.json`` file;
        - a JSON-lines file with one such export per line;
        - a plain list of spans (dicts with ``events``), or a list of exports.
    - `experiment_id`, `model`, `workload`, `tp`: the run labels. Each may instead
      come from the resource attributes of the export (keys ``experiment_id``,
      ``model``, ``workload``, ``tp``); a keyword that disagrees with a resource
      attribute is an error.

    Each event named ``BATCH_SUMMARY`` becomes a row; other events are ignored. Its
    ``attributes`` (``[{"key": "batch.prefill_tokens", "value": {"intValue":
    "29"}}]``; ``intValue``, ``doubleValue``, ``stringValue`` and ``boolValue`` are
    read) must carry every column of ``EVENT_COLUMNS``, with one assumption: when
    ``step.ts_start_ns`` is absent, the event's ``timeUnixNano`` is taken as the
    step's start, in nanoseconds. That assumes the event is stamped when the step
    starts, and on the same clock as the other events of its experiment: iteration
    times are differences of start times, so mixing ``timeUnixNano`` (wall clock) with
    ``step.ts_start_ns`` (monotonic) in one experiment makes them meaningless.

    **Returns:** the validated step table, as from ``load_steps``.

    **Raises:** ``ValueError`` naming a missing attribute (and the event), a missing
    run label, conflicting labels, or a malformed export.
    """
    labels = {
        "experiment_id": experiment_id,
        "model": model,
        "workload": workload,
        "tp": tp,
    }
    rows = []
    for resource, event in _batch_events(_read_otel(source)):
        row = _event_row(event, len(rows))
        row.update(_run_labels(resource, labels, len(rows)))
        rows.append(row)
    if not rows:
        raise ValueError("source: no BATCH_SUMMARY events found")
    return validate_steps(pd.DataFrame(rows, columns=list(STEP_COLUMNS)))


def _read_otel(source: Any) -> list:
    """The exports or spans in `source`, as a list of parsed JSON objects."""
    if isinstance(source, Mapping):
        return [source]
    if isinstance(source, list):
        return source
    if not isinstance(source, str | os.PathLike):
        raise ValueError(
            "source: expected a path, an OTLP export dict or a list of spans, "
            f"got {type(source).__name__}"
        )
    text = pathlib.Path(source).read_text()
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        parsed = None
    if parsed is not None:
        return parsed if isinstance(parsed, list) else [parsed]
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"source: line {number} is not JSON: {err}") from None
    return items


def _batch_events(items: list) -> Iterator[tuple[Mapping, Mapping]]:
    """Yield ``(resource_attributes, event)`` for every ``BATCH_SUMMARY`` event."""
    for item in items:
        if not isinstance(item, Mapping):
            raise ValueError(
                f"source: expected JSON objects, got {type(item).__name__}"
            )
        if "resourceSpans" in item:
            for resource_spans in item["resourceSpans"]:
                resource = _attributes(
                    resource_spans.get("resource", {}).get("attributes", [])
                )
                for scope_spans in resource_spans.get("scopeSpans", []):
                    for span in scope_spans.get("spans", []):
                        yield from _span_events(resource, span)
        elif "events" in item:
            yield from _span_events({}, item)
        else:
            raise ValueError(
                "source: expected an OTLP export (with 'resourceSpans') or a span "
                f"(with 'events'), got keys {sorted(item)}"
            )


def _span_events(resource: Mapping, span: Mapping) -> Iterator[tuple[Mapping, Mapping]]:
    for event in span.get("events", []):
        if event.get("name") == "BATCH_SUMMARY":
            yield resource, event


def _attributes(items: Iterable[Mapping]) -> dict[str, Any]:
    """OTLP ``[{"key": k, "value": {"intValue": "3"}}]`` to ``{k: 3}``."""
    out = {}
    for item in items:
        value = item.get("value", {})
        if "intValue" in value:
            out[item["key"]] = int(value["intValue"])
        elif "doubleValue" in value:
            out[item["key"]] = float(value["doubleValue"])
        elif "stringValue" in value:
            out[item["key"]] = value["stringValue"]
        elif "boolValue" in value:
            out[item["key"]] = bool(value["boolValue"])
        else:
            raise ValueError(
                f"attribute {item.get('key')!r}: unsupported value {dict(value)!r}"
            )
    return out


def _event_row(event: Mapping, index: int) -> dict[str, Any]:
    attributes = _attributes(event.get("attributes", []))
    if "step.ts_start_ns" not in attributes and "timeUnixNano" in event:
        attributes["step.ts_start_ns"] = int(event["timeUnixNano"])
    missing = [c for c in EVENT_COLUMNS if c not in attributes]
    if missing:
        raise ValueError(f"BATCH_SUMMARY event {index} is missing attributes {missing}")
    return {c: attributes[c] for c in EVENT_COLUMNS}


def _run_labels(
    resource: Mapping, labels: Mapping[str, Any], index: int
) -> dict[str, Any]:
    out = {}
    for name, given in labels.items():
        found = resource.get(name)
        if given is not None and found is not None and str(given) != str(found):
            raise ValueError(
                f"{name}={given!r} disagrees with the resource attribute {found!r}"
            )
        value = given if given is not None else found
        if value is None:
            raise ValueError(
                f"BATCH_SUMMARY event {index}: no {name!r}; pass {name}= or set the "
                "resource attribute"
            )
        out[name] = value
    return out


# --------------------------------------------------------------------------- targets


def iteration_time(frame: pd.DataFrame) -> pd.Series:
    """The wall time of each step whose successor was also sampled, in microseconds.

    For a row whose next sampled row in the same experiment (in ``step.id`` order) has
    ``step.id`` exactly one larger: ``(ts_start_ns(next) - ts_start_ns(this)) /
    1000``. NaN for every other row. The frame need not be sorted.

    **Returns:** a float ``Series`` named ``iteration_time_us``, on `frame`'s index.

    **Raises:** ``ValueError`` if a column is missing or a defined iteration time is
    not positive (start times out of order).
    """
    needed = ["experiment_id", "step.id", "step.ts_start_ns"]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise ValueError(f"iteration_time: frame is missing columns {missing}")
    order = np.lexsort(
        (
            frame["step.id"].to_numpy(dtype=np.int64),
            pd.factorize(frame["experiment_id"], sort=True)[0],
        )
    )
    experiment = frame["experiment_id"].to_numpy(dtype=object)[order]
    step = frame["step.id"].to_numpy(dtype=np.int64)[order]
    start = frame["step.ts_start_ns"].to_numpy(dtype=np.int64)[order]
    paired = (experiment[1:] == experiment[:-1]) & (np.diff(step) == 1)
    gap_us = np.diff(start) / 1000.0
    if (gap_us[paired] <= 0).any():
        row = int(order[np.flatnonzero(paired & (gap_us <= 0))[0]])
        raise ValueError(
            f"iteration_time: step.ts_start_ns does not increase after row {row}"
        )
    sorted_values = np.full(len(frame), np.nan)
    sorted_values[:-1][paired] = gap_us[paired]
    values = np.empty(len(frame))
    values[order] = sorted_values
    return pd.Series(values, index=frame.index, name="iteration_time_us")


def add_targets(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of `frame` with ``step_duration_us`` and ``iteration_time_us`` added.

    ``step_duration_us`` is ``step.duration_us`` as float (microseconds);
    ``iteration_time_us`` is ``iteration_time(frame)`` (microseconds, NaN where the
    next step was not sampled).
    """
    if "step.duration_us" not in frame.columns:
        raise ValueError("add_targets: frame is missing column 'step.duration_us'")
    out = frame.copy()
    out["step_duration_us"] = frame["step.duration_us"].to_numpy(dtype=np.float64)
    out["iteration_time_us"] = iteration_time(frame)
    return out
