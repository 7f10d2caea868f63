"""diffmodel: a differentiable, fittable roofline of LLM inference step time."""

from ._arch import (
    Architecture as Architecture,
    architecture as architecture,
    canonical_model as canonical_model,
    from_hf_config as from_hf_config,
    known_models as known_models,
)
from ._baselines import (
    SEED_FEATURES as SEED_FEATURES,
    BlackBox as BlackBox,
    XGBoostBaseline as XGBoostBaseline,
    load_seed_xgboost as load_seed_xgboost,
    seed_features as seed_features,
)
from ._batch import (
    BatchStats as BatchStats,
    from_aggregates as from_aggregates,
    from_requests as from_requests,
    kv_tokens_from_usage as kv_tokens_from_usage,
)
from ._bulk import (
    predict_frame_fast as predict_frame_fast,
    predict_requests as predict_requests,
    predict_steps as predict_steps,
    step_time_fast as step_time_fast,
)
from ._calibrate import (
    FitOptions as FitOptions,
    calibrate_kernels as calibrate_kernels,
    fit_allreduce_curve as fit_allreduce_curve,
    fit_roofline_curves as fit_roofline_curves,
    held_out_split as held_out_split,
    kernel_prior_factors as kernel_prior_factors,
)
from ._curves import (
    AllReduceCurve as AllReduceCurve,
    KernelCurves as KernelCurves,
    Occupancy as Occupancy,
    RooflineCurves as RooflineCurves,
    SaturationCurve as SaturationCurve,
    default_kernel_curves as default_kernel_curves,
    load_curves as load_curves,
    save_curves as save_curves,
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
from ._factorsets import (
    GlobalFactors as GlobalFactors,
    HierarchicalFactors as HierarchicalFactors,
    PerGroupFactors as PerGroupFactors,
    StepData as StepData,
    init_factor_set as init_factor_set,
)
from ._fit import (
    FitResult as FitResult,
    fit as fit,
    fit_arrays as fit_arrays,
    log_ratio_loss as log_ratio_loss,
    step_data as step_data,
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
from ._io import load_factors as load_factors, save_factors as save_factors
from ._kernels import (
    KernelWork as KernelWork,
    allreduce_kernel_us as allreduce_kernel_us,
    decode_attention_us as decode_attention_us,
    gemm_us as gemm_us,
    load_allreduce as load_allreduce,
    load_attention as load_attention,
    load_gemm as load_gemm,
    load_kernel_tables as load_kernel_tables,
    load_moe as load_moe,
    load_vidur as load_vidur,
    load_vidur_allreduce as load_vidur_allreduce,
    load_vidur_operators as load_vidur_operators,
    moe_us as moe_us,
    prefill_attention_us as prefill_attention_us,
)
from ._metrics import (
    count_under as count_under,
    mape as mape,
    metrics_table as metrics_table,
    mspe as mspe,
    p99_ape as p99_ape,
    pearson_r as pearson_r,
)
from ._optimise import OptimResult as OptimResult, minimise as minimise
from ._paths import default_data_dir as default_data_dir
from ._predict import predict as predict
from ._roofline import (
    COMPONENTS as COMPONENTS,
    Breakdown as Breakdown,
    step_time as step_time,
    step_time_batch as step_time_batch,
)
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
from ._seed import SeedFactors as SeedFactors, init_seed as init_seed
from ._splits import (
    canonical_model_name as canonical_model_name,
    leave_one_out as leave_one_out,
    split_sizes as split_sizes,
    temporal_split as temporal_split,
)
from ._traces import (
    STEP_COLUMNS as STEP_COLUMNS,
    add_targets as add_targets,
    iteration_time as iteration_time,
    load_otel as load_otel,
    load_steps as load_steps,
    validate_steps as validate_steps,
)
