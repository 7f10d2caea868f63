"""A continuous-batching scheduler simulated on top of the step model: exact and
relaxed (differentiable) simulation, marginal request costs, and knob tuning."""

from ._scheduler import (
    Knobs as Knobs,
    MarginalCost as MarginalCost,
    SimResult as SimResult,
    StepTrace as StepTrace,
    TuneResult as TuneResult,
    Workload as Workload,
    make_workload as make_workload,
    marginal_cost as marginal_cost,
    serving_objective as serving_objective,
    simulate as simulate,
    tune_knobs as tune_knobs,
)
