"""The kernel families' names, without importing JAX (the command line's ``--help``
lists them): one set of calibrated curves per family
(:class:`~diffmodel.kernels.KernelCurves`)."""

KERNEL_FAMILIES: tuple[str, ...] = (
    "gemm_bf16",
    "gemm_fp8",
    "gemm_nvfp4",
    "prefill_attention",
    "decode_attention",
    "moe",
    "moe_fp8",
    "moe_w4a16",
    "moe_nvfp4",
)

# Every family with curves, the tensor-parallel all-reduce included.
ALL_FAMILIES: tuple[str, ...] = (*KERNEL_FAMILIES, "allreduce")
