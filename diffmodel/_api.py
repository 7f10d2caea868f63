"""The public names of :mod:`diffmodel`, imported on first use (see ``__init__``).

The one list of what the top level re-exports: add a public name here.
"""

from . import (
    baselines as baselines,
    data as data,
    kernels as kernels,
    scheduler as scheduler,
    serving as serving,
)
from ._bulk._bulk import predict_steps as predict_steps
from ._bulk._loss import fit_steps as fit_steps
from ._fitting._base import AbstractFactorSet as AbstractFactorSet
from ._fitting._factorsets import (
    GlobalFactors as GlobalFactors,
    HierarchicalFactors as HierarchicalFactors,
    PerGroupFactors as PerGroupFactors,
)
from ._fitting._fit import FitResult as FitResult, fit as fit
from ._fitting._host_terms import (
    HOST_FORMS as HOST_FORMS,
    HostTermsChoice as HostTermsChoice,
    select_host_terms as select_host_terms,
)
from ._fitting._intervals import Calibration as Calibration
from ._fitting._io import load_factors as load_factors, save_factors as save_factors
from ._fitting._joint import JointFit as JointFit, fit_joint as fit_joint
from ._fitting._kernel_host import (
    KernelHostFit as KernelHostFit,
    fit_host_on_kernels as fit_host_on_kernels,
    kernel_device_us as kernel_device_us,
)
from ._fitting._kernel_host_io import (
    load_host_fit as load_host_fit,
    save_host_fit as save_host_fit,
)
from ._fitting._laplace import IdentifiabilityWarning as IdentifiabilityWarning
from ._fitting._optimise import OptimResult as OptimResult, minimise as minimise
from ._fitting._split import (
    HostDeviceFactors as HostDeviceFactors,
    fit_host_device as fit_host_device,
)
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
    gpu_class as gpu_class,
    hardware as hardware,
    known_hardware as known_hardware,
    sibling_gpus as sibling_gpus,
)
from ._model._roofline import (
    COMPONENTS as COMPONENTS,
    Breakdown as Breakdown,
    step_time as step_time,
)
from ._predict import UnseenGroupWarning as UnseenGroupWarning, predict as predict

__all__ = [
    "AbstractFactorSet",
    "Architecture",
    "BatchStats",
    "Breakdown",
    "COMPONENTS",
    "Calibration",
    "Deployment",
    "FACTOR_NAMES",
    "FACTOR_SPECS",
    "Factors",
    "FitResult",
    "GlobalFactors",
    "Hardware",
    "HierarchicalFactors",
    "HostDeviceFactors",
    "IdentifiabilityWarning",
    "HOST_FORMS",
    "JointFit",
    "HostTermsChoice",
    "KernelHostFit",
    "OptimResult",
    "PerGroupFactors",
    "StudyFactors",
    "UnseenGroupWarning",
    "architecture",
    "baselines",
    "canonical_model",
    "data",
    "default_factors",
    "deployment",
    "fit",
    "fit_host_device",
    "fit_host_on_kernels",
    "fit_joint",
    "fit_steps",
    "from_aggregates",
    "from_requests",
    "gpu_class",
    "sibling_gpus",
    "hardware",
    "kernel_device_us",
    "kernels",
    "known_hardware",
    "known_models",
    "kv_tokens_from_usage",
    "load_factors",
    "load_host_fit",
    "log_ratio_loss",
    "mape",
    "metrics_table",
    "minimise",
    "predict",
    "predict_steps",
    "save_factors",
    "save_host_fit",
    "scheduler",
    "select_host_terms",
    "serving",
    "stack_deployments",
    "step_time",
]

# The persistent compilation cache is on from the first use of the library (the
# first name looked up on ``diffmodel``); see diffmodel._cache.
from ._cache import enable_compilation_cache as _enable_compilation_cache  # noqa: E402

_enable_compilation_cache()
