import json
import pathlib

import numpy as np
import pandas as pd
import pytest

from diffmodel.data._traces import (
    STEP_COLUMNS,
    add_targets,
    iteration_time,
    load_otel,
    load_steps,
    validate_steps,
)

from helpers import FIXTURES, trace_table, unchecked


def _otel_events(path: pathlib.Path) -> dict:
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- tables


def test_validate_sorts_stably_and_keeps_rows():
    out = validate_steps(trace_table())
    assert list(out["experiment_id"]) == ["a", "a", "b", "b"]
    assert list(out["step.id"]) == [3, 4, 1, 5]
    assert list(out.index) == [0, 1, 2, 3]


def test_validate_converts_nullable_integers():
    frame = trace_table()
    frame["batch.prefill_tokens"] = frame["batch.prefill_tokens"].astype("Int64")
    frame["extra_complete"] = pd.array([1, 2, 3, 4], dtype="Int64")
    frame["extra_gappy"] = pd.array([1, None, 3, 4], dtype="Int64")
    out = validate_steps(frame)
    assert out["batch.prefill_tokens"].dtype == np.int64
    assert out["extra_complete"].dtype == np.int64
    assert out["extra_gappy"].dtype == np.float64
    assert out["extra_gappy"].isna().sum() == 1
    assert out["kv.usage_gpu_ratio"].dtype == np.float64


def test_validate_missing_columns():
    frame = trace_table().drop(columns=["tp", "batch.decode_tokens"])
    with pytest.raises(ValueError, match=r"missing required columns.*batch.decode"):
        validate_steps(frame)


def test_validate_nan_names_column_and_row():
    frame = trace_table()
    frame["batch.decode_tokens"] = pd.array([1, 0, None, 2], dtype="Int64")
    with pytest.raises(ValueError, match=r"'batch.decode_tokens'.*row 2"):
        validate_steps(frame)


def test_validate_nan_float_column():
    frame = trace_table(**{"kv.usage_gpu_ratio": [0.1, np.nan, 0.1, 0.1]})
    with pytest.raises(ValueError, match=r"'kv.usage_gpu_ratio'.*row 1"):
        validate_steps(frame)


def test_validate_missing_label():
    frame = trace_table(model=["m", None, "m", "m"])
    with pytest.raises(ValueError, match=r"'model'.*row 1"):
        validate_steps(frame)


def test_validate_negative_count():
    frame = trace_table(**{"queue.waiting_depth": [0, 0, 0, -1]})
    with pytest.raises(ValueError, match=r"'queue.waiting_depth'.*>= 0.*row 3 has -1$"):
        validate_steps(frame)


def test_validate_fractional_count():
    frame = trace_table(**{"batch.prefill_tokens": [10.5, 64, 0, 32]})
    with pytest.raises(
        ValueError, match=r"'batch.prefill_tokens'.*whole.*row 0 has 10.5"
    ):
        validate_steps(frame)


def test_validate_usage_ratio_above_one():
    frame = trace_table(**{"kv.usage_gpu_ratio": [0.1, 1.7, 0.1, 0.1]})
    with pytest.raises(ValueError, match=r"fraction in \[0, 1\]; row 1 has 1.7$"):
        validate_steps(frame)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"batch.num_decode_reqs": [0, 0, 1, 2]},
            "row 0: batch.decode_tokens is 1 but batch.num_decode_reqs is 0",
        ),
        (
            {"batch.num_prefill_reqs": [1, 65, 0, 1]},
            "row 1: batch.prefill_tokens is 64 but batch.num_prefill_reqs is 65",
        ),
    ],
)
def test_validate_counts_that_contradict_each_other(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate_steps(trace_table(**overrides))


def test_validate_no_rows():
    with pytest.raises(ValueError, match="the step table has no rows"):
        validate_steps(trace_table().iloc[:0])


def test_validate_non_numeric():
    frame = trace_table(**{"tp": ["1", "x", "1", "1"]})
    with pytest.raises(ValueError, match=r"'tp' must be numeric; row 1 has 'x'$"):
        validate_steps(frame)


def test_load_steps_csv_and_parquet_agree(tmp_path):
    frame = trace_table()
    frame.to_csv(tmp_path / "steps.csv", index=False)
    frame.to_parquet(tmp_path / "steps.parquet")
    from_csv = load_steps(tmp_path / "steps.csv")
    from_parquet = load_steps(tmp_path / "steps.parquet")
    pd.testing.assert_frame_equal(from_csv, from_parquet, check_dtype=False)
    assert from_csv["step.id"].dtype == np.int64


def test_load_steps_unknown_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"\.parquet, \.pq or \.csv"):
        load_steps(tmp_path / "steps.txt")


def test_load_steps_real(data_dir):
    frame = load_steps(data_dir / "stepml" / "steps.parquet")
    assert len(frame) == 20_112
    assert set(STEP_COLUMNS) <= set(frame.columns)
    assert frame.groupby("experiment_id").size().to_dict() == {
        "20260217-202857-llama-2-70b-tp4-general": 5_992,
        "20260217-203421-llama-2-70b-hf-tp4-codegen": 6_679,
        "20260218-150304-codellama-34b-tp2-general": 7_441,
    }
    for name in STEP_COLUMNS[:-4]:
        assert frame[name].dtype in (np.int64, np.float64), name
    assert frame["cycle_time_us"].dtype == np.float64


# --------------------------------------------------------------------------- targets


def test_iteration_time_hand_computed():
    frame = trace_table()
    result = iteration_time(frame)
    # Experiment "a": steps 3 -> 4 are consecutive, 4_000_000 - 1_000_000 ns = 3000 us.
    # Experiment "b": steps 1 and 5 are not; the last row of each has no successor.
    expected = pd.Series([np.nan, 3000.0, np.nan, np.nan], name="iteration_time_us")
    pd.testing.assert_series_equal(result, expected)


def test_iteration_time_does_not_cross_experiments():
    frame = trace_table(
        **{"step.id": [5, 3, 4, 6], "experiment_id": ["b", "a", "a", "c"]}
    )
    assert iteration_time(frame).notna().sum() == 1


def test_iteration_time_rejects_backwards_clock():
    frame = trace_table(
        **{"step.ts_start_ns": [9_000_000, 5_000_000, 4_000_000, 2_000_000]}
    )
    with pytest.raises(ValueError, match="does not increase after row 1"):
        iteration_time(frame)


def test_iteration_time_missing_column():
    with pytest.raises(ValueError, match="step.ts_start_ns"):
        iteration_time(trace_table().drop(columns="step.ts_start_ns"))


def test_add_targets():
    frame = validate_steps(trace_table())
    out = add_targets(frame)
    assert out["step_duration_us"].dtype == np.float64
    np.testing.assert_array_equal(out["step_duration_us"], [300.0, 100.0, 200.0, 500.0])
    np.testing.assert_array_equal(out["iteration_time_us"], [3000.0] + [np.nan] * 3)
    assert "step_duration_us" not in frame.columns


def test_add_targets_missing_column():
    with pytest.raises(ValueError, match="step.duration_us"):
        add_targets(trace_table().drop(columns="step.duration_us"))


def test_iteration_time_real(data_dir):
    frame = add_targets(load_steps(data_dir / "stepml" / "steps.parquet"))
    it = frame.dropna(subset=["iteration_time_us"])
    assert len(it) == 1_967
    medians_ms = it.groupby("experiment_id")["iteration_time_us"].median() / 1000
    assert medians_ms.round(1).to_dict() == {
        "20260217-202857-llama-2-70b-tp4-general": 19.0,
        "20260217-203421-llama-2-70b-hf-tp4-codegen": 18.1,
        "20260218-150304-codellama-34b-tp2-general": 15.1,
    }


# --------------------------------------------------------------------------- OTLP


def test_load_otel_export_file():
    frame = load_otel(FIXTURES / "otel_export.json")
    assert list(frame["step.id"]) == [11, 12, 14]
    assert list(frame["batch.prefill_tokens"]) == [2046, 0, 100]
    # A numeric attribute sent as stringValue is still read as a count.
    assert list(frame["kv.blocks_free_gpu"]) == [31030, 30347, 30321]
    assert frame["kv.blocks_free_gpu"].dtype == np.int64
    np.testing.assert_allclose(frame["kv.usage_gpu_ratio"], [0.0104, 0.0322, 0.0330])
    assert set(frame["model"]) == {"llama-2-70b-hf"}
    assert list(frame["tp"]) == [4, 4, 4]
    # The attribute wins over the event's wall-clock timeUnixNano.
    assert list(frame["step.ts_start_ns"]) == [
        5_000_000_000,
        5_019_000_000,
        5_050_000_000,
    ]
    np.testing.assert_array_equal(iteration_time(frame), [19_000.0, np.nan, np.nan])


def test_load_otel_dict_and_span_list_agree():
    export = _otel_events(FIXTURES / "otel_export.json")
    from_dict = load_otel(export)
    spans = export["resourceSpans"][0]["scopeSpans"][0]["spans"]
    from_spans = load_otel(
        spans,
        experiment_id="fixture-llama-2-70b-hf-tp4-general",
        model="llama-2-70b-hf",
        workload="general",
        tp=4,
    )
    pd.testing.assert_frame_equal(from_dict, from_spans)


def test_load_otel_jsonl_uses_event_time_and_keywords():
    frame = load_otel(
        FIXTURES / "otel_export.jsonl", experiment_id="x", workload="code"
    )
    assert list(frame["step.ts_start_ns"]) == [7_000_000_000, 7_015_000_000]
    assert list(frame["model"]) == ["codellama-34b"] * 2
    assert list(frame["tp"]) == [2, 2]
    np.testing.assert_array_equal(iteration_time(frame), [15_000.0, np.nan])


def test_load_otel_missing_label():
    with pytest.raises(ValueError, match="no 'workload'; pass workload="):
        load_otel(FIXTURES / "otel_export.jsonl", experiment_id="x")


def test_load_otel_conflicting_label():
    with pytest.raises(ValueError, match="tp=8 disagrees"):
        load_otel(FIXTURES / "otel_export.json", tp=8)


def test_load_otel_missing_attribute():
    export = _otel_events(FIXTURES / "otel_export.json")
    event = export["resourceSpans"][0]["scopeSpans"][0]["spans"][1]["events"][0]
    event["attributes"] = [
        a for a in event["attributes"] if a["key"] != "batch.decode_tokens"
    ]
    with pytest.raises(ValueError, match=r"event 1 is missing.*batch.decode_tokens"):
        load_otel(export)


def test_load_otel_missing_start_without_event_time():
    export = _otel_events(FIXTURES / "otel_export.json")
    event = export["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["events"][0]
    del event["timeUnixNano"]
    event["attributes"] = [
        a for a in event["attributes"] if a["key"] != "step.ts_start_ns"
    ]
    with pytest.raises(ValueError, match=r"event 0 is missing.*step.ts_start_ns"):
        load_otel(export)


def test_load_otel_negative_value():
    export = _otel_events(FIXTURES / "otel_export.json")
    event = export["resourceSpans"][0]["scopeSpans"][0]["spans"][2]["events"][0]
    event["attributes"][4]["value"] = {"intValue": "-3"}
    with pytest.raises(ValueError, match=r"'queue.running_depth'.*row 2"):
        load_otel(export)


def test_load_otel_unsupported_value():
    export = _otel_events(FIXTURES / "otel_export.json")
    event = export["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["events"][0]
    event["attributes"][0]["value"] = {"arrayValue": {"values": []}}
    with pytest.raises(ValueError, match="'step.id': unsupported value"):
        load_otel(export)


def test_load_otel_no_events():
    with pytest.raises(ValueError, match="no BATCH_SUMMARY events"):
        load_otel([{"name": "span", "events": []}])


def test_load_otel_malformed(tmp_path):
    with pytest.raises(ValueError, match="expected a path"), unchecked():
        load_otel(42)
    with pytest.raises(ValueError, match="'resourceSpans'.*'events'"):
        load_otel([{"name": "not a span"}])
    with pytest.raises(ValueError, match="expected JSON objects"):
        load_otel([[1, 2]])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"events": []}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        load_otel(bad)
