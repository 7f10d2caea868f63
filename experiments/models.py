"""Step predictions for today's models, per component, beside aiconfigurator-core's
own per-step estimate for the same steps.

Deployments: DeepSeek-V3 (MLA + MoE, FP8 blocks), DeepSeek-V3.2 and GLM-5 FP8
(sparse attention) at TP 8 on H200, Llama-3.1-70B FP8 (ModelOpt) on H100,
Qwen3-30B-A3B and gpt-oss-120b on H100, Qwen3-235B-A22B NVFP4 at TP 4 on B200.
Steps: a decode batch and a mixed prefill + decode batch. Our numbers are the
unfitted physical priors (``default_factors``); aiconfigurator's come from its
measured kernel database (``EngineHandle.decode_step_latency`` /
``mixed_step_latency``, vLLM tables).

    python experiments/models.py [--out DIR]

With ``--out`` the same text is written to ``DIR/models.md`` (the README's section).
"""

import argparse
import dataclasses
import pathlib

import jax

import diffmodel as dm
from diffmodel.kernels import calibrate_kernels
from diffmodel.kernels._tables import load_kernel_tables

jax.config.update("jax_enable_x64", True)

# (label, model, our hardware, tp, ep, aiconfigurator system, its moe tp/ep)
DEPLOYMENTS = [
    ("DeepSeek-V3 FP8", "deepseek-ai/DeepSeek-V3", "h200", 8, 1, "h200_sxm", (8, 1)),
    ("DeepSeek-V3 FP8 EP", "deepseek-ai/DeepSeek-V3", "h200", 8, 8, "h200_sxm", (1, 8)),
    (
        "DeepSeek-V3.2 (DSA)",
        "deepseek-ai/DeepSeek-V3.2",
        "h200",
        8,
        1,
        "h200_sxm",
        (8, 1),
    ),
    ("GLM-5 FP8 (DSA)", "zai-org/GLM-5-FP8", "h200", 8, 1, "h200_sxm", (8, 1)),
    (
        "Llama-3.1-70B FP8",
        "nvidia/Llama-3.1-70B-Instruct-FP8",
        "h100",
        2,
        1,
        "h100_sxm",
        (2, 1),
    ),
    ("Qwen3-30B-A3B", "Qwen/Qwen3-30B-A3B", "h100", 1, 1, "h100_sxm", (1, 1)),
    ("gpt-oss-120b", "openai/gpt-oss-120b", "h100", 1, 1, "h100_sxm", (1, 1)),
    (
        "Qwen3-235B-A22B NVFP4",
        "nvidia/Qwen3-235B-A22B-NVFP4",
        "b200",
        4,
        1,
        "b200_sxm",
        (4, 1),
    ),
]

# (label, prefill tokens in one chunk, decode requests, context per decode request)
STEPS = [
    ("decode 64 @ 2k", 0, 64, 2000),
    ("decode 64 @ 16k", 0, 64, 16000),
    ("prefill 2k + decode 64 @ 2k", 2048, 64, 2000),
]


LINES: list[str] = []


def emit(line: str = "") -> None:
    """Print a line of the report and keep it for ``models.md``."""
    print(line)
    LINES.append(line)


def step_stats(prefill, n_decode, context):
    """One step: a prefill chunk (if any) and ``n_decode`` decodes at ``context``."""
    return dm.from_aggregates(
        prefill_tokens=float(prefill),
        decode_tokens=float(n_decode),
        num_prefill=float(prefill > 0),
        num_decode=float(n_decode),
        kv_tokens=float(n_decode * context),
    )


def ours(model, hw, tp, ep, prefill, n_decode, context):
    """Our step time by component, ms."""
    dep = dm.deployment(model, hw, tp, ep=ep)
    stats = step_stats(prefill, n_decode, context)
    b = dm.step_time(stats, dep, dm.default_factors())
    return {k: float(v) / 1e3 for k, v in b.as_dict().items()}


def kernel_sum(curves, model, hw, tp, ep, prefill, n_decode, context):
    """The step's kernels summed on the GPU's calibrated curves, ms (device only), or
    None with the reason where the kernel sum cannot time the model or GPU."""
    if hw not in curves:
        return None, f"no curves calibrated for {hw} here"
    stats = step_stats(prefill, n_decode, context)
    try:
        b = dm.kernels.kernel_step_time(
            stats, dm.deployment(model, hw, tp, ep=ep), curves[hw]
        )
    except ValueError as err:
        return None, str(err).split(";")[0]
    return float(b.total) / 1e3, ""


def aiconfigurator(model, system, tp, moe, prefill, n_decode, context):
    """aiconfigurator-core's estimate of the same step, ms (None if it refuses)."""
    try:
        from aiconfigurator_core.sdk.engine import EngineHandle
    except ImportError:
        return None, "aiconfigurator-core not installed"
    try:
        h = EngineHandle.compile(
            model, system, "vllm", tp_size=tp, moe_tp_size=moe[0], moe_ep_size=moe[1]
        )
        if prefill:
            return h.mixed_step_latency(prefill, n_decode, context, 2), ""
        return h.decode_step_latency(n_decode, context, 2), ""
    except Exception as err:  # report what it cannot express, go on
        return None, f"{type(err).__name__}: {str(err)[:80]}"


def main(out: pathlib.Path | None = None) -> None:
    cols = ["linear", "attention_prefill", "attention_decode", "kv_write"]
    cols += ["lm_head", "allreduce", "overhead"]
    short = ["linear", "attn_pf", "attn_dec", "kv_wr", "lm_head", "comm", "host"]
    emit(
        "| deployment | step | "
        + " | ".join(short)
        + " | ours total | ours GPU | kernel sum | aiconfigurator | GPU / aic |"
        + " kernel sum / aic |"
    )
    emit("|" + "---|" * (len(short) + 8))
    notes = []
    # The H100 curves, calibrated on the H100 kernel tables alone (~20 s), and the
    # H200's (MLA modules included) and the B200's on their vLLM tables of the
    # installed database where there is one. The
    # shared H100 tables (vLLM 0.14.0) have no MXFP4 MoE rows: gpt-oss's experts
    # take their curves from the database's H100 tables (uncalibrated without it).
    curves = {"h100": calibrate_kernels(load_kernel_tables(dm.data.default_data_dir()))}
    if dm.kernels.database_available():
        h100 = dm.kernels.load_system_tables("h100_sxm", "vllm", families=("moe",))
        w4 = calibrate_kernels(h100, hardware_name="h100", families=("moe_w4a16",))
        curves["h100"] = dataclasses.replace(curves["h100"], moe_w4a16=w4.moe_w4a16)
        # With its MLA and DSA module tables: DeepSeek's attention (V3.2's sparse
        # attention too) on the measured modules.
        modules = ("mla_context", "mla_generation", "dsa_context", "dsa_generation")
        h200 = dm.kernels.load_system_tables(
            "h200_sxm",
            "vllm",
            families=(*dm.kernels.KERNEL_TABLES, *modules),
            skip_missing=True,
        )
        curves["h200"] = calibrate_kernels(h200, hardware_name="h200")
        # B200's for the NVFP4 deployment (NVFP4 GEMMs and experts: Blackwell).
        b200 = dm.kernels.load_system_tables("b200_sxm", "vllm", skip_missing=True)
        curves["b200"] = calibrate_kernels(b200, hardware_name="b200")
    for label, model, hw, tp, ep, system, moe in DEPLOYMENTS:
        for step, prefill, n_dec, ctx in STEPS:
            parts = ours(model, hw, tp, ep, prefill, n_dec, ctx)
            total = sum(parts.values())
            gpu = total - parts["overhead"]
            aic, why = aiconfigurator(model, system, tp, moe, prefill, n_dec, ctx)
            if why:
                notes.append(f"{label} / {step}: aiconfigurator: {why}")
            ks, why = kernel_sum(curves, model, hw, tp, ep, prefill, n_dec, ctx)
            if why and step == STEPS[0][0]:
                notes.append(f"{label}: kernel sum: {why}")
            aic_s = f"{aic:.2f}" if aic is not None else "n/a"
            ks_s = f"{ks:.2f}" if ks is not None else "n/a"
            ratio = f"{gpu / aic:.2f}" if aic else "n/a"
            ks_ratio = f"{ks / aic:.2f}" if aic and ks is not None else "n/a"
            row = " | ".join(f"{parts[c]:.2f}" for c in cols)
            emit(
                f"| {label} TP{tp} EP{ep} {hw} | {step} | {row} | {total:.2f} | "
                f"{gpu:.2f} | {ks_s} | {aic_s} | {ratio} | {ks_ratio} |"
            )
    emit()
    emit(
        "All times ms per step. 'ours' uses the unfitted physical priors; 'kernel "
        "sum' is the step's kernels summed on the GPU's curves calibrated on its "
        "kernel tables (dm.kernels.kernel_step_time, device only, no host cost)."
    )
    for n in notes:
        emit(f"- {n}")
    features()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "models.md").write_text("\n".join(LINES) + "\n")


def features():
    """Serving features on DeepSeek-V3 TP8 H200 and Llama-3.1-70B TP4 H100, ms."""
    fa = dm.default_factors()
    dec = dm.from_aggregates(
        prefill_tokens=0.0,
        decode_tokens=64.0,
        num_prefill=0.0,
        num_decode=64.0,
        kv_tokens=64 * 2000.0,
    )
    ds = dm.deployment("deepseek-ai/DeepSeek-V3", "h200", 8)
    mtp = dm.Deployment(arch=dm.serving.mtp_draft(ds.arch), hw=ds.hw, tp=ds.tp)
    emit()
    emit("Speculative decoding, DeepSeek-V3 + MTP draft, 64 requests @ 2k:")
    emit("| k | verify | draft | step | tokens/request (accept 0.7) | ms/token |")
    emit("|---|---|---|---|---|---|")
    for k in range(4):
        sp = dm.serving.speculative_step(
            dec, ds, fa, k=float(k), draft=mtp, n_draft_steps=k
        )
        gained = float(dm.serving.accepted_tokens(float(k), 0.7))
        total = float(sp.total) / 1e3
        emit(
            f"| {k} | {float(sp.verify.total) / 1e3:.2f} | "
            f"{float(sp.draft_us) / 1e3:.2f} | {total:.2f} | {gained:.2f} | "
            f"{total / gained:.2f} |"
        )
    ll = dm.deployment("llama-3.1-70b", "h100", 4)
    pf = dm.from_aggregates(
        prefill_tokens=4096.0,
        decode_tokens=0.0,
        num_prefill=2.0,
        num_decode=0.0,
        kv_tokens=0.0,
    )
    emit()
    emit("Prefix caching, Llama-3.1-70B TP4 H100, two 2048-token prompts:")
    for hit in (0.0, 1024.0, 3072.0):
        t = float(dm.step_time(dm.serving.prefix_cached(pf, hit), ll, fa).total)
        emit(f"- {hit:.0f} cached tokens: {t / 1e3:.2f} ms")
    emit()
    emit("Pipeline parallelism, Llama-3.1-70B TP4 H100, the same prefill:")
    for pp in (1, 2, 4):
        r = dm.serving.pipeline_step(pf, ll, fa, pp=float(pp))
        emit(
            f"- pp={pp}: stage {float(r.stage_us) / 1e3:.2f} ms, bubble "
            f"{float(r.bubble_us) / 1e3:.2f} ms, step {float(r.total) / 1e3:.2f} ms"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=pathlib.Path, default=None, help="write models.md"
    )
    main(parser.parse_args().out)
