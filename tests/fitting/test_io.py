"""Factors files: the family's JSON round trip, and bad files as one-line errors."""

import json

import jax
import numpy as np
import pandas as pd
import pytest

import diffmodel as dm
from diffmodel._fitting._factorsets import init_factor_set

LABELS = ("llama-2-7b/h100-sxm/tp1", "llama-2-70b/h100-sxm/tp4")


def saved(kind, tmp_path):
    fs = init_factor_set(kind, LABELS)
    return json.loads(dm.save_factors(fs, tmp_path / "f.json").read_text())


def write(tmp_path, obj, raw_text=None):
    path = tmp_path / "bad.json"
    path.write_text(raw_text if raw_text is not None else json.dumps(obj))
    return path


def check_one_line(path, field, expected):
    with pytest.raises(ValueError) as e:
        dm.load_factors(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    assert f"'{field}'" in msg and expected in msg, msg
    # The prediction path reads the file the same way.
    frame = pd.DataFrame(
        {
            "prefill_tokens": [0],
            "decode_tokens": [8],
            "num_prefill_reqs": [0],
            "num_decode_reqs": [8],
            "kv_tokens": [8000],
        }
    )
    with pytest.raises(ValueError, match="factors file"):
        dm.predict(frame, model="llama-2-7b", tp=1, factors=path)


def test_raw_of_wrong_length(tmp_path):
    d = saved("global", tmp_path)
    d["raw"] = d["raw"][:8]
    check_one_line(write(tmp_path, d), "raw", "expected shape (9)")


def test_per_group_raw_of_wrong_shape(tmp_path):
    d = saved("per-model", tmp_path)
    d["raw"] = d["raw"][:1]
    check_one_line(write(tmp_path, d), "raw", "expected shape (2x9)")


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_inf_values(tmp_path, value):
    d = saved("global", tmp_path)
    text = json.dumps(d).replace('"raw": [0.0', f'"raw": [{value}', 1)
    check_one_line(write(tmp_path, None, text), "raw", "finite")


def test_nan_in_hierarchical_offsets(tmp_path):
    d = saved("hierarchical", tmp_path)
    d["offsets"][1][3] = float("nan")
    check_one_line(write(tmp_path, d), "offsets", "finite")


def test_json_list_instead_of_object(tmp_path):
    path = write(tmp_path, [saved("global", tmp_path)])
    with pytest.raises(ValueError, match=r"bad\.json: expected a JSON object, got a"):
        dm.load_factors(path)


@pytest.mark.parametrize("value", [["a"] * 9, ["0.5"] * 9, "abc", [[0.0]] * 9])
def test_strings_or_nesting_instead_of_numbers(tmp_path, value):
    d = saved("global", tmp_path)
    d["raw"] = value
    check_one_line(write(tmp_path, d), "raw", "expected")


def test_string_scale(tmp_path):
    d = saved("hierarchical", tmp_path)
    d["noise_scale"] = "0.1"
    check_one_line(write(tmp_path, d), "noise_scale", "expected a finite number")


@pytest.mark.parametrize("kind", ["per_model", "per-layer", None, 3])
def test_unknown_kind(tmp_path, kind):
    d = saved("global", tmp_path)
    d["kind"] = kind
    check_one_line(write(tmp_path, d), "kind", "expected one of")


def test_missing_and_bad_fields(tmp_path):
    d = saved("global", tmp_path)
    d["factors"]["gemm_flops"] = 0.3  # the physical block edited, raw untouched
    check_one_line(write(tmp_path, d), "factors.gemm_flops", "but the file's 'raw'")
    d = saved("per-model", tmp_path)
    del d["raw"]
    check_one_line(write(tmp_path, d), "raw", "missing")
    d = saved("per-model", tmp_path)
    d["labels"] = "llama"
    check_one_line(write(tmp_path, d), "labels", "list of strings")
    d = saved("global", tmp_path)
    d["prior"][0] = 1.5  # an efficiency above 1
    check_one_line(write(tmp_path, d), "prior", "Factors.gemm_flops must be in (0, 1]")
    d = saved("global", tmp_path)
    d["format"] = "other/1"
    check_one_line(write(tmp_path, d), "format", "diffmodel.factors/1")


def test_not_json(tmp_path):
    path = write(tmp_path, None, "{raw: [")
    with pytest.raises(ValueError, match="is not valid JSON"):
        dm.load_factors(path)


@pytest.mark.parametrize(
    "kind", ["global", "per-model", "hierarchical", "study-9", "study-36"]
)
def test_every_kind_round_trips_and_reports_itself(kind, tmp_path):
    fs = init_factor_set(kind, LABELS)
    loaded = dm.load_factors(dm.save_factors(fs, tmp_path / "f.json"))
    assert loaded.kind() == kind and type(loaded) is type(fs)
    for a, b in zip(
        np.concatenate([np.ravel(x) for x in jax.tree.leaves(fs)]),
        np.concatenate([np.ravel(x) for x in jax.tree.leaves(loaded)]),
        strict=True,
    ):
        assert a == b
    assert loaded.n_params() == fs.n_params()
    assert loaded.table().shape == fs.table().shape
