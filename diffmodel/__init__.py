"""diffmodel: a differentiable, fittable roofline of LLM inference step time."""

from ._arch import (
    Architecture as Architecture,
    architecture as architecture,
    canonical_model as canonical_model,
    from_hf_config as from_hf_config,
    known_models as known_models,
)
from ._batch import (
    BatchStats as BatchStats,
    from_aggregates as from_aggregates,
    from_requests as from_requests,
    kv_tokens_from_usage as kv_tokens_from_usage,
)
from ._deployment import (
    Deployment as Deployment,
    deployment as deployment,
    stack_deployments as stack_deployments,
)
from ._factors import (
    FACTOR_NAMES as FACTOR_NAMES,
    FACTOR_SPECS as FACTOR_SPECS,
    Factors as Factors,
    default_factors as default_factors,
)
from ._frame import (
    group_label as group_label,
    groups_from_frame as groups_from_frame,
    stats_from_frame as stats_from_frame,
)
from ._hardware import (
    Hardware as Hardware,
    canonical_hardware as canonical_hardware,
    hardware as hardware,
    known_hardware as known_hardware,
)
from ._paths import default_data_dir as default_data_dir
from ._predict import predict as predict
from ._roofline import (
    COMPONENTS as COMPONENTS,
    Breakdown as Breakdown,
    step_time as step_time,
    step_time_batch as step_time_batch,
)
