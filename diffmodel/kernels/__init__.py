"""Kernels: measured kernel tables, the work each kernel does (from the step model's own
physics), efficiency curves, and their calibration against the tables.

The step model's operator-level functions are here too, for validating an operator
against measured kernels with the same arithmetic the step model uses:
``attention_dims``, ``projection_work``, ``quant_pass_bytes`` (per-layer work of GQA
and MLA projections), ``attention_work_dims`` (attention FLOPs and bytes),
``tensor_peak`` (the dense peak of an operand width) and ``roofline_us``.
"""

from .._kernel_families import (
    ALL_FAMILIES as ALL_FAMILIES,
    KERNEL_FAMILIES as KERNEL_FAMILIES,
)
from .._model._layers import (
    attention_dims as attention_dims,
    projection_work as projection_work,
    quant_pass_bytes as quant_pass_bytes,
)
from .._model._physics import (
    attention_work_dims as attention_work_dims,
    roofline_us as roofline_us,
    tensor_peak as tensor_peak,
)
from ._calibrate import (
    GRID_FAMILIES as GRID_FAMILIES,
    GRID_SHAPE_KEYS as GRID_SHAPE_KEYS,
    FitOptions as FitOptions,
    calibrate_kernels as calibrate_kernels,
    family_rows as family_rows,
    family_table as family_table,
    family_work as family_work,
    fit_allreduce_curve as fit_allreduce_curve,
    fit_roofline_curves as fit_roofline_curves,
    held_out_split as held_out_split,
    init_curves as init_curves,
    kernel_prior_factors as kernel_prior_factors,
    shape_groups as shape_groups,
    two_stage_minimise as two_stage_minimise,
    with_shape_grid as with_shape_grid,
)
from ._curves import (
    AllReduceCurve as AllReduceCurve,
    KernelCurves as KernelCurves,
    Occupancy as Occupancy,
    RooflineCurves as RooflineCurves,
    SaturationCurve as SaturationCurve,
    default_allreduce_curve as default_allreduce_curve,
    default_kernel_curves as default_kernel_curves,
    default_roofline_curves as default_roofline_curves,
)
from ._curves_io import (
    load_curves as load_curves,
    save_curves as save_curves,
)
from ._database import (
    FAMILY_FILES as FAMILY_FILES,
    KERNEL_TABLES as KERNEL_TABLES,
    database_available as database_available,
    database_root as database_root,
    find_table as find_table,
    list_kernel_tables as list_kernel_tables,
    load_system_tables as load_system_tables,
    system_spec as system_spec,
)
from ._dsa import (
    DsaCurves as DsaCurves,
    DsaModule as DsaModule,
    DsaWork as DsaWork,
    dsa_module_us as dsa_module_us,
    dsa_module_work as dsa_module_work,
    dsa_parts_us as dsa_parts_us,
    dsa_rows as dsa_rows,
    dsa_table_work as dsa_table_work,
    load_dsa_module as load_dsa_module,
)
from ._grid import ShapeGrid as ShapeGrid, fit_shape_grid as fit_shape_grid
from ._mla import (
    MlaCurves as MlaCurves,
    MlaModule as MlaModule,
    MlaWork as MlaWork,
    ModuleKind as ModuleKind,
    fit_mla_curves as fit_mla_curves,
    fit_mla_curves_pooled as fit_mla_curves_pooled,
    fit_mla_module as fit_mla_module,
    fit_module as fit_module,
    fit_module_curves as fit_module_curves,
    fit_module_curves_pooled as fit_module_curves_pooled,
    load_mla_module as load_mla_module,
    mla_module_us as mla_module_us,
    mla_module_work as mla_module_work,
    mla_parts_us as mla_parts_us,
    mla_rows as mla_rows,
    mla_table_work as mla_table_work,
)
from ._moe import (
    ExpertLoads as ExpertLoads,
    moe_kernel_work as moe_kernel_work,
    moe_up_projections as moe_up_projections,
    moe_us as moe_us,
    plain_moe_shapes as plain_moe_shapes,
    power_law_loads as power_law_loads,
)
from ._pooled import fit_folds as fit_folds, fold as fold, shifted as shifted
from ._pooled_calibrate import (
    SIBLING_FAMILIES as SIBLING_FAMILIES,
    PooledCurves as PooledCurves,
    calibrate_kernels_pooled as calibrate_kernels_pooled,
    curves_from_other_gpus as curves_from_other_gpus,
    kernel_key as kernel_key,
    kernels_vendor as kernels_vendor,
    table_kernels as table_kernels,
)
from ._step import (
    HOST_TERMS as HOST_TERMS,
    HostCosts as HostCosts,
    kernel_step_time as kernel_step_time,
)
from ._tables import (
    VIDUR_OPERATORS as VIDUR_OPERATORS,
    load_allreduce as load_allreduce,
    load_attention as load_attention,
    load_gemm as load_gemm,
    load_kernel_tables as load_kernel_tables,
    load_moe as load_moe,
    load_vidur as load_vidur,
    load_vidur_allreduce as load_vidur_allreduce,
    load_vidur_operators as load_vidur_operators,
    table_work as table_work,
    vidur_work as vidur_work,
)
from ._work import (
    COLLECTIVES as COLLECTIVES,
    KernelWork as KernelWork,
    allreduce_kernel_us as allreduce_kernel_us,
    collective_kernel_us as collective_kernel_us,
    decode_attention_us as decode_attention_us,
    gemm_us as gemm_us,
    prefill_attention_us as prefill_attention_us,
)
