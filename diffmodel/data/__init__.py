"""Traces and splits: loading vLLM step traces (parquet, OpenTelemetry JSON), their
targets, the pandas-to-statistics bridge, and the study's train/valid/test splits."""

from .._frame import (
    group_label as group_label,
    groups_from_frame as groups_from_frame,
    stats_from_frame as stats_from_frame,
)
from .._paths import default_data_dir as default_data_dir
from ._splits import (
    SPLIT_LABELS as SPLIT_LABELS,
    leave_one_out as leave_one_out,
    split_sizes as split_sizes,
    temporal_split as temporal_split,
)
from ._traces import (
    STEP_COLUMNS as STEP_COLUMNS,
    add_targets as add_targets,
    iteration_time as iteration_time,
    load_otel as load_otel,
    load_steps as load_steps,
    validate_steps as validate_steps,
)
