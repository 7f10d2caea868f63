import numpy as np
import pandas as pd
import pytest

from diffmodel.data._splits import (
    leave_one_out,
    split_sizes,
    temporal_split,
)
from diffmodel.data._traces import load_steps

from helpers import unchecked


def _frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "experiment_id": ["b"] * 5 + ["a"] * 10,
            "step.id": [50, 10, 40, 20, 30] + list(range(10, 0, -1)),
            "model": ["llama-2-70b-hf"] * 5
            + ["Mixtral-8x7B-v0-1"] * 5
            + ["llama-2-70b"] * 5,
            "workload": ["general"] * 5 + ["codegen"] * 10,
        }
    )


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (5_992, (3_595, 1_198, 1_199)),
        (6_679, (4_007, 1_336, 1_336)),
        (7_441, (4_465, 1_488, 1_488)),
        (10, (6, 2, 2)),
        (0, (0, 0, 0)),
        (1, (1, 0, 0)),
    ],
)
def test_split_sizes(n, expected):
    assert split_sizes(n) == expected


def test_split_sizes_never_exceed_n():
    for n in range(50):
        sizes = split_sizes(n, (0.5, 0.5, 0.0))
        assert sum(sizes) == n and min(sizes) >= 0


def test_temporal_split_orders_by_step_within_experiment():
    frame = _frame()
    labels = temporal_split(frame)
    assert labels.name == "split"
    assert list(labels.index) == list(frame.index)
    # Experiment b, 5 rows: 3 train, 1 valid, 1 test, by step.id 10,20,30 | 40 | 50.
    b = labels[frame["experiment_id"] == "b"]
    assert list(b) == ["test", "train", "valid", "train", "train"]
    # Experiment a, 10 rows with descending step ids: the first rows are the latest.
    a = labels[frame["experiment_id"] == "a"]
    assert list(a) == ["test"] * 2 + ["valid"] * 2 + ["train"] * 6


def test_temporal_split_custom_fractions():
    labels = temporal_split(_frame(), fractions=(0.8, 0.0, 0.2))
    assert (labels == "valid").sum() == 0
    assert (labels == "train").sum() == 4 + 8


def test_temporal_split_errors():
    with pytest.raises(ValueError, match="sum to 1"):
        temporal_split(_frame(), fractions=(0.6, 0.2, 0.1))
    with pytest.raises(ValueError, match="three non-negative"):
        temporal_split(_frame(), fractions=(1.2, -0.2, 0.0))
    with pytest.raises(ValueError, match="three non-negative"), unchecked():
        split_sizes(5, (0.5, 0.5))
    with pytest.raises(ValueError, match="non-negative, got -1"):
        split_sizes(-1)
    with pytest.raises(ValueError, match=r"missing columns \['step.id'\]"):
        temporal_split(_frame().drop(columns="step.id"))


def test_temporal_split_reproduces_seed_sizes(data_dir):
    frame = load_steps(data_dir / "stepml" / "steps.parquet")
    seed = pd.read_csv(data_dir / "stepml" / "seed_split_sizes.csv")
    labels = temporal_split(frame)
    counts = pd.crosstab(frame["experiment_id"], labels)
    public = seed[seed["experiment_id"].isin(counts.index)].set_index("experiment_id")
    assert len(public) == 3
    for experiment, row in public.iterrows():
        assert counts.loc[experiment, "train"] == row["n_train"]
        assert counts.loc[experiment, "test"] == row["n_test"]


def test_study_test_rows_are_the_last_split(data_dir):
    frame = load_steps(data_dir / "stepml" / "steps.parquet")
    seed = pd.read_csv(data_dir / "stepml" / "seed_xgboost_test_predictions.csv")
    test = frame[temporal_split(frame) == "test"]
    ours = set(zip(test["experiment_id"], test["step.id"], strict=True))
    theirs = seed[seed["experiment_id"].isin(frame["experiment_id"].unique())]
    assert ours == set(zip(theirs["experiment_id"], theirs["step.id"], strict=True))


def test_study_sizes_consistent_for_all_experiments(data_dir):
    """Every row of the CSV, private experiments included, fits the rounding rule."""
    seed = pd.read_csv(data_dir / "stepml" / "seed_split_sizes.csv")
    for row in seed.itertuples():
        guess = round(row.n_train / 0.6)
        candidates = range(guess - 3, guess + 4)
        fits = [
            n
            for n in candidates
            if split_sizes(n)[0] == row.n_train and split_sizes(n)[2] == row.n_test
        ]
        assert fits, row.experiment_id


def test_leave_one_model_out_rejects_names_that_are_not_models():
    frame = _frame().assign(model=["llama-2-70b"] * 10 + ["my-finetune"] * 5)
    with pytest.raises(ValueError, match="unknown model 'my-finetune'"):
        leave_one_out(frame, "model")


def test_leave_one_model_out_merges_aliases():
    frame = _frame()
    folds = list(leave_one_out(frame, "model"))
    assert [f[0] for f in folds] == ["llama-2-70b", "mixtral-8x7b"]
    held, train, test = folds[0]
    assert test.dtype == bool and train.dtype == bool
    assert test.sum() == 10
    np.testing.assert_array_equal(train, ~test)
    assert set(frame.loc[test, "model"]) == {"llama-2-70b", "llama-2-70b-hf"}


def test_leave_one_workload_out():
    folds = list(leave_one_out(_frame(), "workload"))
    assert [(f[0], int(f[2].sum())) for f in folds] == [("codegen", 10), ("general", 5)]


def test_leave_one_out_errors():
    frame = _frame()
    with pytest.raises(ValueError, match="no column 'gpu'"):
        leave_one_out(frame, "gpu")
    with pytest.raises(ValueError, match="at least 2 distinct values"):
        leave_one_out(frame[frame["experiment_id"] == "b"], "model")
    frame.loc[3, "workload"] = None
    with pytest.raises(ValueError, match="missing values"):
        leave_one_out(frame, "workload")


def test_leave_one_model_out_real(data_dir):
    frame = load_steps(data_dir / "stepml" / "steps.parquet")
    folds = {held: int(test.sum()) for held, _, test in leave_one_out(frame, "model")}
    assert folds == {"codellama-34b": 7_441, "llama-2-70b": 5_992 + 6_679}
