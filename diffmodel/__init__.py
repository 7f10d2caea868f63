"""diffmodel: a differentiable, fittable roofline of LLM inference step time.

The top level holds the core vocabulary: the step model (architecture, hardware,
deployment, batch statistics, ``step_time``), its factors and factor sets, ``fit``,
prediction (``predict`` for pandas frames, ``predict_steps`` for arrays in bulk),
``fit_steps`` (fitting arrays of millions of steps), JSON
save/load and metrics. Families live in public namespaces: :mod:`diffmodel.data`
(traces, frames, splits), :mod:`diffmodel.kernels` (kernel tables, curves,
calibration), :mod:`diffmodel.scheduler` and :mod:`diffmodel.baselines`.

Units: times in microseconds per GPU, work in FLOPs and bytes, tokens as counts.
"""

from importlib.metadata import PackageNotFoundError, version as _version

from . import (
    baselines as baselines,
    data as data,
    kernels as kernels,
    scheduler as scheduler,
)
from ._bulk._bulk import predict_steps as predict_steps
from ._bulk._loss import fit_steps as fit_steps
from ._cache import enable_compilation_cache as _enable_compilation_cache
from ._fitting._base import AbstractFactorSet as AbstractFactorSet
from ._fitting._factorsets import (
    GlobalFactors as GlobalFactors,
    HierarchicalFactors as HierarchicalFactors,
    PerGroupFactors as PerGroupFactors,
)
from ._fitting._fit import FitResult as FitResult, fit as fit
from ._fitting._io import load_factors as load_factors, save_factors as save_factors
from ._fitting._optimise import OptimResult as OptimResult, minimise as minimise
from ._fitting._study import StudyFactors as StudyFactors
from ._metrics import (
    log_ratio_loss as log_ratio_loss,
    mape as mape,
    metrics_table as metrics_table,
)
from ._model._arch import (
    Architecture as Architecture,
    architecture as architecture,
    canonical_model as canonical_model,
    known_models as known_models,
)
from ._model._batch import (
    BatchStats as BatchStats,
    from_aggregates as from_aggregates,
    from_requests as from_requests,
    kv_tokens_from_usage as kv_tokens_from_usage,
)
from ._model._deployment import (
    Deployment as Deployment,
    deployment as deployment,
    stack_deployments as stack_deployments,
)
from ._model._factors import (
    FACTOR_NAMES as FACTOR_NAMES,
    FACTOR_SPECS as FACTOR_SPECS,
    Factors as Factors,
    default_factors as default_factors,
)
from ._model._hardware import (
    Hardware as Hardware,
    hardware as hardware,
    known_hardware as known_hardware,
)
from ._model._roofline import (
    COMPONENTS as COMPONENTS,
    Breakdown as Breakdown,
    step_time as step_time,
)
from ._predict import predict as predict

_enable_compilation_cache()

try:
    __version__ = _version("diffmodel")
except PackageNotFoundError:  # pragma: no cover - running from a bare source tree
    __version__ = "0+unknown"
