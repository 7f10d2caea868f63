"""The study's own fitter (scipy trf on its 9-parameter model), against diffmodel's
fit of the same model."""

import numpy as np
import pandas as pd
import pytest

import diffmodel as dm
from diffmodel._fitting._fit import step_data
from diffmodel._fitting._study import study_components, study_predict

TRUE = np.array([1.5, 0.8, 2.0, 1.0, 300.0, 0.6, 0.7, 0.4, 0.5])


def _frame(n: int = 200, seed: int = 0) -> pd.DataFrame:
    """Steps of two deployments whose target is the study's model at ``TRUE``."""
    rng = np.random.default_rng(seed)
    nd = rng.integers(1, 64, n)
    pf = rng.choice([0, 128, 512, 2048], n)
    f = pd.DataFrame(
        {
            "prefill_tokens": pf,
            "decode_tokens": nd,
            "num_prefill_reqs": (pf > 0).astype(int),
            "num_decode_reqs": nd,
            "kv_tokens": nd * 500,
            "prefill_context_tokens": (pf > 0) * rng.integers(0, 4000, n),
            "model": np.where(np.arange(n) % 2, "llama-2-7b", "llama-2-70b"),
            "tp": np.where(np.arange(n) % 2, 1, 4),
        }
    )
    comps = np.asarray(study_components(step_data(f)[0]))
    f["t_us"] = np.asarray(study_predict(TRUE, comps))
    return f


@pytest.mark.slow
def test_exact_data_is_fitted_to_zero_loss_as_diffmodel_fits_it():
    f = _frame()
    sol = dm.baselines.study_least_squares(f, "t_us")
    assert sol.loss < 1e-12 and sol.seconds > 0 and sol.n_evaluations > 0
    assert list(sol.values) == [
        "factor_prefill_gemm",
        "factor_decode_gemm",
        "factor_prefill_attention",
        "factor_decode_attention",
        "overhead_us",
        "mfu_prefill_gemm",
        "mfu_decode_gemm",
        "mfu_prefill_attention",
        "mfu_decode_attention",
    ]
    # Only factor/MFU ratios and the overhead are determined by the data.
    v = sol.values
    assert v["overhead_us"] == pytest.approx(300.0, rel=1e-4)
    for c, i in (("prefill_gemm", 0), ("decode_gemm", 1), ("prefill_attention", 2)):
        ratio = v[f"factor_{c}"] / v[f"mfu_{c}"]
        assert ratio == pytest.approx(TRUE[i] / TRUE[5 + i], rel=1e-4)
    ours = dm.fit(f, target="t_us", factors="study-9", uncertainty=False)
    assert ours.loss < 1e-10


@pytest.mark.slow
def test_noisy_data_same_loss_as_diffmodel():
    f = _frame(seed=1)
    f["t_us"] *= np.random.default_rng(2).lognormal(0, 0.1, len(f))
    sol = dm.baselines.study_least_squares(f, "t_us")
    ours = dm.fit(
        f, target="t_us", factors="study-9", max_steps=2000, uncertainty=False
    )
    assert ours.loss == pytest.approx(sol.loss, rel=1e-3)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda f: f.drop(columns="t_us"), "missing target column 't_us'"),
        (lambda f: f.assign(t_us=0.0), "must be finite and > 0"),
        (lambda f: f.assign(t_us=np.nan), "must be finite and > 0"),
        (lambda f: f.iloc[:0], "must be finite and > 0"),
    ],
)
def test_bad_targets_are_named(mutate, match):
    with pytest.raises(ValueError, match=match):
        dm.baselines.study_least_squares(mutate(_frame(10)), "t_us")
