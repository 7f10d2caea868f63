"""A continuous-batching scheduler simulated on top of the step model: exact and
relaxed (differentiable) simulation, marginal request costs, and knob tuning."""

from ._marginal import MarginalCost as MarginalCost, marginal_cost as marginal_cost
from ._simulate import serving_objective as serving_objective, simulate as simulate
from ._tune import TuneResult as TuneResult, tune_knobs as tune_knobs
from ._workload import (
    Knobs as Knobs,
    SimResult as SimResult,
    StepTrace as StepTrace,
    Workload as Workload,
    make_workload as make_workload,
)
