"""Measured kernel latencies: loaders, and the work of each measured row
(:func:`table_work`; the work functions are in :mod:`diffmodel.kernels._work`).

Two sources (see ``data/README.md``): aiconfigurator's H100 SXM kernel tables
(``kernels/h100_sxm/*.parquet``) and Vidur's per-operator profiles
(``vidur/h100/*.csv``). Both report milliseconds; every loader returns the measured time
as ``latency_us`` in microseconds.

What the aiconfigurator columns mean (from its collector): every kernel runs on one GPU,
so ``num_heads``/``num_key_value_heads`` are the heads *on that GPU* (a model's heads
divided by its TP degree); prefill attention is causal self-attention of ``isl`` new
tokens per sequence; decode attention reads a KV cache of ``step`` tokens per sequence;
fused MoE holds ``num_experts / moe_ep_size`` experts of ``inter_size / moe_tp_size``
each, with ``num_tokens`` tokens routed top-``topk`` over all ``num_experts``;
all-reduce ``message_size`` counts elements of ``allreduce_dtype``. Vidur gives the
model's total heads and sizes, with ``num_tensor_parallel_workers`` (``t``) splitting
heads and FFN; its all-reduce ``size`` is in bytes.

Every prediction composes the operator formulas of :mod:`diffmodel._physics`: work
(FLOPs, bytes) from ``gemm_work``/``attention_work``/``moe_work``, time from
``roofline_us``/``allreduce_us``, with efficiencies either constants or curves of the
work (:mod:`diffmodel._curves`).
"""

import pathlib

import jax.numpy as jnp
import numpy as np
import pandas as pd

from .._model._hardware import Hardware
from .._model._physics import (
    MXFP4_BYTES,
    NVFP4_BYTES,
    gemm_work,
    touched_experts,
)
from ..kernels._moe import (
    MOE_DEFAULT_TILES,
    MXFP4_PAD,
    ExpertLoads,
    moe_block_m,
    moe_kernel_work,
    moe_local_only,
    moe_tile_rule,
    moe_up_projections,
    power_law_loads,
    vllm_tuned_moe,
)
from ..kernels._work import (
    KernelWork,
    _work,
    decode_attention_work,
    fa2_splits_kv,
    gemm_kernel_work,
    prefill_attention_work,
)

MS_TO_US = 1e3

# Bytes per weight of each dtype name of the tables (MXFP4: 4 bits plus an 8-bit
# scale per 32 weights), and the operand width of the tensor cores where it differs
# (W4A16: 4-bit weights dequantized to the 16-bit peak).
_DTYPE_BYTES = {
    "bfloat16": 2.0,
    "float16": 2.0,
    "fp8": 1.0,
    "fp8_block": 1.0,
    "w4a16_mxfp4": MXFP4_BYTES,
    "nvfp4": NVFP4_BYTES,
}
_COMPUTE_BYTES = {"w4a16_mxfp4": 2.0, "nvfp4": 0.5}

GEMM_COLUMNS = ("m", "n", "k", "gemm_dtype", "latency")
ATTENTION_COLUMNS = (
    "batch_size",
    "isl",
    "num_heads",
    "num_key_value_heads",
    "head_dim",
    "kv_cache_dtype",
    "step",
    "latency",
)
MOE_COLUMNS = (
    "device",
    "num_tokens",
    "hidden_size",
    "inter_size",
    "topk",
    "num_experts",
    "moe_tp_size",
    "moe_ep_size",
    "distribution",
    "moe_dtype",
    "latency",
)
ALLREDUCE_COLUMNS = (
    "num_gpus",
    "message_size",
    "allreduce_dtype",
    "kernel_source",
    "latency",
)
VIDUR_SHAPE_COLUMNS = (
    "n_head",
    "n_kv_head",
    "n_embd",
    "n_expanded_embd",
    "num_tokens",
    "num_tensor_parallel_workers",
)
VIDUR_OPERATORS: tuple[str, ...] = (
    "emb",
    "input_layernorm",
    "attn_pre_proj",
    "attn_rope",
    "attn_post_proj",
    "post_attention_layernorm",
    "mlp_up_proj",
    "mlp_act",
    "mlp_down_proj",
    "add",
)
VIDUR_ALLREDUCE_COLUMNS = ("num_workers", "size", "time_stats.all_reduce.median")

AIC_FILES = {
    "gemm": "gemm_perf.parquet",
    "prefill_attention": "context_attention_perf.parquet",
    "decode_attention": "generation_attention_perf.parquet",
    "moe": "moe_perf.parquet",
    "allreduce": "custom_allreduce_perf.parquet",
}


# --------------------------------------------------------------------------- loaders


def _read(
    path: str | pathlib.Path, required: tuple[str, ...], what: str
) -> pd.DataFrame:
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"{what} file not found: {path}")
    frame = pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{what} file {path.name} is missing column(s) {missing}; "
            f"expected at least {list(required)}"
        )
    return frame


def _with_us(frame: pd.DataFrame, column: str, what: str) -> pd.DataFrame:
    ms = pd.to_numeric(frame[column], errors="coerce")
    if not (ms > 0).all():
        raise ValueError(f"{what}: column {column!r} must hold positive times (ms)")
    out = frame.copy()
    out["latency_us"] = ms.to_numpy(float) * MS_TO_US
    return out.reset_index(drop=True)


def _dtype_bytes(values: pd.Series, column: str) -> np.ndarray:
    unknown = sorted(set(values) - set(_DTYPE_BYTES))
    if unknown:
        raise ValueError(
            f"column {column!r} has unknown dtype(s) {unknown}; "
            f"expected {sorted(_DTYPE_BYTES)}"
        )
    return values.map(_DTYPE_BYTES).to_numpy(float)


def _compute_bytes(values: pd.Series, weight: np.ndarray) -> np.ndarray:
    """Tensor-core operand width of each dtype name: its weight bytes except where
    the format computes at another width (W4A16 at 16 bits, NVFP4 at 4)."""
    compute = values.map(_COMPUTE_BYTES).to_numpy(float)
    return np.where(np.isnan(compute), weight, compute)


def load_gemm(path: str | pathlib.Path) -> pd.DataFrame:
    """aiconfigurator GEMMs ``[m, k] @ [k, n]``: adds ``latency_us`` (us)."""
    return _with_us(_read(path, GEMM_COLUMNS, "GEMM"), "latency", "GEMM")


def load_attention(path: str | pathlib.Path) -> pd.DataFrame:
    """aiconfigurator prefill (``context_*``) or decode (``generation_*``) attention.

    Adds ``latency_us`` (us) and ``kv_bytes`` (bytes per KV element).
    """
    frame = _with_us(_read(path, ATTENTION_COLUMNS, "attention"), "latency", "attn")
    frame["kv_bytes"] = _dtype_bytes(frame["kv_cache_dtype"], "kv_cache_dtype")
    return frame


def load_moe(path: str | pathlib.Path) -> pd.DataFrame:
    """aiconfigurator fused MoE: adds ``latency_us`` (us)."""
    return _with_us(_read(path, MOE_COLUMNS, "MoE"), "latency", "MoE")


def load_allreduce(path: str | pathlib.Path) -> pd.DataFrame:
    """aiconfigurator custom all-reduce: adds ``latency_us`` (us) and ``bytes``."""
    frame = _with_us(_read(path, ALLREDUCE_COLUMNS, "all-reduce"), "latency", "AR")
    frame["bytes"] = frame["message_size"] * _dtype_bytes(
        frame["allreduce_dtype"], "allreduce_dtype"
    )
    return frame


def load_vidur_operators(path: str | pathlib.Path, model: str) -> pd.DataFrame:
    """One Vidur ``<model>_mlp.csv`` in long form: one row per (operator, shape).

    Columns: ``model``, ``operator``, the shape columns, ``latency_us`` (the median
    over Vidur's repetitions, us).
    """
    required = VIDUR_SHAPE_COLUMNS + tuple(
        f"time_stats.{op}.median" for op in VIDUR_OPERATORS
    )
    frame = _read(path, required, "Vidur operator profile")
    parts = []
    for op in VIDUR_OPERATORS:
        part = frame[list(VIDUR_SHAPE_COLUMNS)].copy()
        part["operator"] = op
        part["latency"] = frame[f"time_stats.{op}.median"]
        parts.append(part)
    long = pd.concat(parts, ignore_index=True)
    long.insert(0, "model", model)
    return _with_us(long, "latency", f"Vidur {model}").drop(columns="latency")


def load_vidur_allreduce(path: str | pathlib.Path) -> pd.DataFrame:
    """Vidur NCCL all-reduce: ``num_gpus``, ``bytes``, ``latency_us`` (median, us)."""
    frame = _read(path, VIDUR_ALLREDUCE_COLUMNS, "Vidur all-reduce")
    frame = _with_us(frame, "time_stats.all_reduce.median", "Vidur all-reduce")
    return pd.DataFrame(
        {
            "num_gpus": frame["num_workers"].to_numpy(float),
            "bytes": frame["size"].to_numpy(float),
            "latency_us": frame["latency_us"].to_numpy(float),
        }
    )


def load_kernel_tables(data_dir: str | pathlib.Path) -> dict[str, pd.DataFrame]:
    """All aiconfigurator tables under ``data_dir/kernels/h100_sxm``, by family."""
    root = pathlib.Path(data_dir) / "kernels" / "h100_sxm"
    return {
        "gemm": load_gemm(root / AIC_FILES["gemm"]),
        "prefill_attention": load_attention(root / AIC_FILES["prefill_attention"]),
        "decode_attention": load_attention(root / AIC_FILES["decode_attention"]),
        "moe": load_moe(root / AIC_FILES["moe"]),
        "allreduce": load_allreduce(root / AIC_FILES["allreduce"]),
    }


VIDUR_MODELS: dict[str, str] = {
    "llama-2-7b": "llama-2-7b-hf_mlp.csv",
    "llama-2-70b": "llama-2-70b-hf_mlp.csv",
    "codellama-34b": "codellama-34b-instruct-hf_mlp.csv",
}


def load_vidur(data_dir: str | pathlib.Path) -> pd.DataFrame:
    """Vidur operator profiles of all three models in long form."""
    root = pathlib.Path(data_dir) / "vidur" / "h100"
    return pd.concat(
        [load_vidur_operators(root / f, m) for m, f in VIDUR_MODELS.items()],
        ignore_index=True,
    )


# ---------------------------------------------------------------- tables to KernelWork


def table_work(family: str, table: pd.DataFrame, hw: Hardware) -> KernelWork:
    """The :class:`KernelWork` of every row of a loaded table of one family.

    ``family``: ``gemm`` (any dtype), ``prefill_attention``, ``decode_attention``,
    ``moe``, or ``vidur`` (a long Vidur table; see :func:`vidur_work`).
    """

    def col(name):
        return jnp.asarray(table[name].to_numpy(float))

    if family == "gemm":
        dtype = table["gemm_dtype"]
        weight = _dtype_bytes(dtype, "gemm_dtype")
        compute = _compute_bytes(dtype, weight)
        # vLLM's FP8 and FP4 linears write bf16; per-tensor FP8 ("fp8") and NVFP4
        # rows time the dynamic quantization of the bf16 activation too (a ~10 us
        # floor and a cost in m k whatever n: see gemm_act_quant_bytes).
        quant = dtype.isin(("fp8", "nvfp4")).to_numpy(float)
        return gemm_kernel_work(
            col("m"),
            col("n"),
            col("k"),
            hw,
            jnp.asarray(compute),
            out_bytes=2.0,
            act_quant=quant if quant.any() else None,
            weight_bytes=jnp.asarray(weight),
        )
    if family in ("prefill_attention", "decode_attention"):
        heads = (col("num_heads"), col("num_key_value_heads"), col("head_dim"))
        if family == "prefill_attention":
            return prefill_attention_work(
                col("batch_size"), col("isl"), *heads, hw, col("kv_bytes")
            )
        split = None
        if {"kernel_source", "device"} <= set(table.columns):
            split = fa2_splits_kv(
                table["kernel_source"],
                table["device"],
                table["num_heads"],
                table["num_key_value_heads"],
            )
        return decode_attention_work(
            col("batch_size"), col("step"), *heads, hw, col("kv_bytes"), split
        )
    if family == "moe":
        return _moe_table_work(table, hw)
    if family == "vidur":
        return vidur_work(table, hw)
    raise ValueError(
        f"unknown kernel family {family!r}; expected gemm, prefill_attention, "
        "decode_attention, moe or vidur"
    )


def routing_alpha(distribution: pd.Series) -> np.ndarray:
    """The power-law exponent of each row's ``distribution`` (``power_law_1.2`` ->
    1.2), NaN for ``balanced``; ``ValueError`` naming any other value."""
    alpha = np.full(len(distribution), np.nan)
    bad = []
    for i, d in enumerate(distribution):
        if d == "balanced":
            continue
        try:
            assert d.startswith("power_law_")
            alpha[i] = float(d[len("power_law_") :])
        except (AssertionError, ValueError, AttributeError):
            bad.append(d)
    if bad:
        raise ValueError(
            f"column 'distribution' has {sorted(set(map(str, bad)))}; expected "
            "'balanced' or 'power_law_<alpha>'"
        )
    return alpha


def mxfp4_alignment(table: pd.DataFrame) -> np.ndarray:
    """Per MoE row, the multiple its kernel pads the expert width and hidden size to
    (``moe_kernel_work``'s ``width_align``): :data:`MXFP4_PAD` for FlashInfer's MXFP4
    kernels (``moe_dtype`` ``w4a16_mxfp4``; Blackwell's TRT-LLM MoE), 0 (none) for
    every other row. vLLM pads the width to 64 for its other MXFP4 kernels too
    (Triton, Marlin), but with that padding their held-out shapes went the wrong way
    (``experiments/gpus.py``, L40S 24.8 -> 29.3%, RTX PRO 6000 19.6 -> 21.2%): at
    small widths those kernels already run faster than the curves say."""
    if "moe_dtype" not in table:
        return np.zeros(len(table))
    src = table.get("kernel_source", pd.Series("", index=table.index))
    fi = (table["moe_dtype"] == "w4a16_mxfp4").to_numpy() & src.astype(
        str
    ).str.contains("flashinfer").to_numpy()
    return np.where(fi, MXFP4_PAD, 0.0)


def _moe_table_work(table: pd.DataFrame, hw: Hardware) -> KernelWork:
    def col(name):
        return table[name].to_numpy(float)

    weight = _dtype_bytes(table["moe_dtype"], "moe_dtype")
    compute = _compute_bytes(table["moe_dtype"], weight)
    alpha = routing_alpha(table["distribution"])
    skewed = ~np.isnan(alpha)
    rule = moe_tile_rule(table)
    own = np.asarray(
        moe_block_m(
            rule, col("num_tokens"), col("topk"), col("num_experts"), col("moe_ep_size")
        )
    )
    loads = None
    if skewed.any():
        pl = power_law_loads(
            col("num_tokens"),
            col("num_experts"),
            col("topk"),
            col("moe_ep_size"),
            np.where(skewed, alpha, 1.2),
            block_m=own,
        )
        # Balanced rows: round-robin's own counts through the same fields.
        e_loc = col("num_experts") / col("moe_ep_size")
        k_loc = col("topk") / col("moe_ep_size")
        t_b = np.asarray(touched_experts(col("num_tokens"), e_loc, k_loc, "balanced"))
        s_b = np.maximum(col("num_tokens") * k_loc, t_b)
        per = s_b / np.where(t_b > 0, t_b, 1.0)
        (bm_s, _), (bm_l, _) = MOE_DEFAULT_TILES
        loads = ExpertLoads(
            touched=jnp.where(skewed, pl.touched, t_b),
            tiles_small=jnp.where(
                skewed, pl.tiles_small, t_b * np.ceil(per / bm_s - 1e-9)
            ),
            tiles_large=jnp.where(
                skewed, pl.tiles_large, t_b * np.ceil(per / bm_l - 1e-9)
            ),
            tiles_own=jnp.where(skewed, pl.tiles_own, t_b * np.ceil(per / own - 1e-9)),
        )
    return moe_kernel_work(
        *(jnp.asarray(col(c)) for c in ("num_tokens", "hidden_size", "inter_size")),
        jnp.asarray(col("topk")),
        jnp.asarray(col("num_experts")),
        hw,
        tp=jnp.asarray(col("moe_tp_size")),
        ep=jnp.asarray(col("moe_ep_size")),
        weight_bytes=jnp.asarray(weight),
        compute_bytes=jnp.asarray(compute),
        routing="balanced",
        tuned=jnp.asarray(vllm_tuned_moe(table, strict=False)),
        loads=loads,
        local_only=jnp.asarray(moe_local_only(table)),
        up_projections=jnp.asarray(moe_up_projections(table)),
        width_align=jnp.asarray(mxfp4_alignment(table)),
        tile_rule=jnp.asarray(rule),
    )


def vidur_work(table: pd.DataFrame, hw: Hardware, act_bytes: float = 2.0) -> KernelWork:
    """Work of Vidur operators, per GPU at TP ``t`` (16-bit weights and activations).

    GEMMs by ``gemm_work``: QKV ``[T, d] @ [d, (H/t + 2 max(Hkv/t, 1)) dh]``, output
    ``[T, (H/t) dh] @ [., d]``, gate+up ``[T, d] @ [d, 2F/t]``, down ``[T, F/t] @
    [., d]``. Memory-only operators (no FLOPs), bytes per token: layer norm ``2 d``,
    residual add ``3 d``, RoPE on Q and K ``2 (H/t + Hkv/t) dh``, gated activation
    ``3 F/t``, embedding gather ``2 d``; times ``act_bytes``.
    """
    unknown = sorted(set(table["operator"]) - set(VIDUR_OPERATORS))
    if unknown:
        raise ValueError(f"unknown Vidur operator(s) {unknown}")

    def col(name):
        return jnp.asarray(table[name].to_numpy(float))

    T, t = col("num_tokens"), col("num_tensor_parallel_workers")
    d, H, F = col("n_embd"), col("n_head"), col("n_expanded_embd")
    dh = d / H
    qh, kvh = H / t, jnp.maximum(col("n_kv_head") / t, 1.0)
    ab = act_bytes
    op = table["operator"].to_numpy()
    gemms = {
        "attn_pre_proj": gemm_work(T, (qh + 2 * kvh) * dh, d, ab, ab),
        "attn_post_proj": gemm_work(T, d, qh * dh, ab, ab),
        "mlp_up_proj": gemm_work(T, 2 * F / t, d, ab, ab),
        "mlp_down_proj": gemm_work(T, d, F / t, ab, ab),
    }
    per_token = {
        "emb": 2 * d,
        "input_layernorm": 2 * d,
        "post_attention_layernorm": 2 * d,
        "add": 3 * d,
        "attn_rope": 2 * (qh + kvh) * dh,
        "mlp_act": 3 * F / t,
    }
    flops = jnp.zeros_like(T)
    bytes_ = jnp.zeros_like(T)
    for name, (f, b) in gemms.items():
        sel = jnp.asarray(op == name)
        flops = jnp.where(sel, f, flops)
        bytes_ = jnp.where(sel, b, bytes_)
    for name, per in per_token.items():
        bytes_ = jnp.where(jnp.asarray(op == name), T * per * ab, bytes_)
    tiles = jnp.ceil(T / 64.0) * jnp.ceil(jnp.where(flops > 0, d, bytes_ / T) / 128.0)
    return _work(flops, bytes_, hw.flops_16, hw, tiles)
