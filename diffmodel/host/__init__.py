"""The host side of a step: scheduling, input preparation, CUDA-graph replay or eager
kernel launches behind a smooth regime gate; the host timer and the iteration time
(host and device overlapped) from one model, and its fitting."""

from .._fitting._host_factors import (
    HOST_KINDS as HOST_KINDS,
    HOST_TARGETS as HOST_TARGETS,
    AbstractHostSet as AbstractHostSet,
    HostGlobal as HostGlobal,
    HostHierarchical as HostHierarchical,
    HostPerGroup as HostPerGroup,
    host_target as host_target,
    init_host_set as init_host_set,
)
from .._fitting._host_fit import (
    HostFit as HostFit,
    fit_host as fit_host,
    host_table as host_table,
    predict_host as predict_host,
)
from .._fitting._host_model import HostStepModel as HostStepModel
from .._model._host import (
    GATE_VARIABLES as GATE_VARIABLES,
    HOST_NAMES as HOST_NAMES,
    HOST_SPECS as HOST_SPECS,
    HostBreakdown as HostBreakdown,
    HostFactors as HostFactors,
    eager_launches as eager_launches,
    host_time as host_time,
    iteration_us as iteration_us,
    kernels_per_layer as kernels_per_layer,
)
