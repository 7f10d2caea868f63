"""select_host_terms: the host costs a trace supports, by held-out error."""

import numpy as np
import pytest

import diffmodel as dm
from diffmodel.kernels import HostCosts, default_kernel_curves
from tests.helpers import host_frame, with_host_target

CURVES = default_kernel_curves()
TWO = (("codellama-34b", 2), ("llama-2-70b", 4))  # 48 and 80 layers


def _select(frame, **kw):
    return dm.select_host_terms(frame, target="iteration_time_us", curves=CURVES, **kw)


def test_a_fixed_step_cost_is_told_from_a_per_layer_one_across_models():
    """Two models of 48 and 80 layers: a stack with a fixed cost per step picks
    ``step``, one with a cost per layer picks ``layer``, each by leaving a model
    out; the table has one column per held-out deployment and their mean."""
    frame = host_frame(n=150, models=TWO)
    step = _select(with_host_target(frame, HostCosts(step_us=2000.0), CURVES, 0.01))
    assert step.terms == ("step",)
    assert step.folds == ("codellama-34b/h100-sxm/tp2", "llama-2-70b/h100-sxm/tp4")
    assert list(step.table.columns) == [*step.folds, "mean"]
    assert step.table.loc["step", "mean"] < 0.5 * step.table.loc["layer", "mean"]
    layer = _select(with_host_target(frame, HostCosts(layer_us=25.0), CURVES, 0.01))
    assert layer.terms == ("layer",)
    row = layer.table.loc["layer"]
    assert row["mean"] == pytest.approx(np.mean(row[list(layer.folds)]))


def test_one_deployment_holds_out_halves_and_ties_go_to_fewer_terms():
    """On one model a step and a layer cost are one column: they tie with each
    other and with step + layer; the fewest terms win, then the earliest given
    (HOST_FORMS puts the per-layer cost first)."""
    frame = with_host_target(host_frame(n=200), HostCosts(layer_us=20.0), CURVES, 0.01)
    choice = _select(frame, forms=[("step", "layer"), ("step",), ("layer",)])
    assert choice.folds == ("first half", "second half")
    assert choice.table.loc["step", "mean"] == pytest.approx(
        choice.table.loc["layer", "mean"], abs=0.01
    )
    assert choice.terms == ("step",)  # the earliest of the single terms given
    assert _select(frame, forms=[("layer",), ("step",)]).terms == ("layer",)


def test_forms_that_cannot_price_idle_steps_score_nan():
    frame = with_host_target(host_frame(n=100), HostCosts(step_us=500.0), CURVES, 0.01)
    idle = frame.index[:5]
    frame.loc[idle, ["decode_tokens", "num_decode_reqs", "kv_tokens"]] = 0
    frame.loc[idle, ["prefill_tokens", "num_prefill_reqs"]] = 0
    frame.loc[idle, "iteration_time_us"] = 500.0
    choice = _select(frame, forms=[("layer",), ("step",)])
    assert np.isnan(choice.table.loc["layer", "mean"])
    assert choice.terms == ("step",)
    with pytest.raises(ValueError, match="no candidate form prices every row"):
        _select(frame, forms=[("layer",)])


def test_bad_input_is_named():
    frame = with_host_target(host_frame(n=20), HostCosts(layer_us=20.0), CURVES)
    with pytest.raises(ValueError, match="forms must be non-empty sets"):
        _select(frame, forms=[("layer", "nope")])
    with pytest.raises(ValueError, match="target 'wall_us': no such column"):
        dm.select_host_terms(frame, target="wall_us", curves=CURVES)
    with pytest.raises(ValueError, match="fewer than 4 rows"):
        _select(frame.iloc[:6])
