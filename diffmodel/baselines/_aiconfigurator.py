"""The field's own estimator as a baseline: aiconfigurator-core's per-step latency.

aiconfigurator-core (the ``[aic]`` extra) predicts an engine step from its measured
kernel tables by table lookup, with no fitting and no trace data. This module asks it
for every row of a step table the way a new user would: one compiled engine per
deployment (a Hugging Face ``config.json`` written from the catalog's architecture,
since the package bundles no Llama-2 configs; backend ``vllm``), then

- a decode-only step: ``decode_step_latency(D, isl, osl)``, whose context per request
  is ``isl + osl // 2 + 1``: ``isl`` is set so that this is the step's mean decode
  context ``K_dec / Nd``;
- a step with prefill: ``mixed_step_latency(P, D, isl, osl)``, with ``isl`` the mean
  decode context when the step decodes, else the mean prefill length including
  cached tokens, ``(P + K_pf) / Np`` (the engine takes one ``isl`` for both parts);

with ``osl = 2``. Identical requests are asked once. Its answers are milliseconds of
GPU time; this module returns microseconds.
"""

import functools
import json
import pathlib
import tempfile
import threading

import numpy as np
import pandas as pd

from .._frame import groups_from_frame, stats_from_frame
from .._model._arch import architecture
from .._model._hardware import hardware_system

OSL = 2
"""Output length passed with every request (the decode context is ``isl + 2``)."""

_LOCK = threading.Lock()  # one engine call at a time (benchmark threads share it)


def _need_aic():
    try:
        from aiconfigurator_core.sdk.engine import EngineHandle
    except ModuleNotFoundError:
        raise ValueError(
            "the aiconfigurator baseline needs aiconfigurator-core: pip install "
            "'diffmodel[aic]'"
        ) from None
    return EngineHandle


def hf_config(model: str) -> dict:
    """A Hugging Face ``config.json`` of a dense catalog model (Llama family)."""
    a = architecture(model)
    special = (a.n_experts, a.kv_lora_rank, a.window, a.index_heads)
    if any(float(x) > 0 for x in special) or float(a.weight_bytes) != 2.0:
        raise ValueError(
            "the aiconfigurator baseline writes configs of dense 16-bit GQA models "
            f"only (no MoE, MLA, sliding windows or quantization), got {model!r}"
        )
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": int(a.hidden),
        "intermediate_size": int(a.ffn),
        "num_attention_heads": int(a.n_heads),
        "num_key_value_heads": int(a.n_kv_heads),
        "head_dim": int(a.head_dim),
        "num_hidden_layers": int(a.n_layers),
        "vocab_size": int(a.vocab),
        "max_position_embeddings": 16384,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "torch_dtype": "float16",
        "tie_word_embeddings": False,
    }


@functools.lru_cache(maxsize=16)
def _engine(model: str, system: str, tp: int):
    EngineHandle = _need_aic()
    folder = pathlib.Path(tempfile.mkdtemp(prefix="diffmodel-aic-")) / model
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_config(model)))
    return EngineHandle.compile(str(folder), system, "vllm", tp_size=tp)


def _split_label(label: str) -> tuple[str, str, int]:
    from .._frame import parse_group_label

    model, hw, tp, ep = parse_group_label(label)
    if ep != 1:
        raise ValueError(
            f"{label}: the aiconfigurator baseline here prices tensor-parallel "
            "deployments only (ep 1)"
        )
    return model, hw, tp


def aiconfigurator_step_us(
    frame: pd.DataFrame,
    *,
    model: str | None = None,
    hardware: str | None = None,
    tp: int | None = None,
) -> np.ndarray:
    """aiconfigurator-core's step time of every row of ``frame``, us.

    ``frame`` and the deployment keywords as for :func:`diffmodel.predict`. A step
    with neither prefill nor decode tokens has no estimate (NaN).

    Raises:
        ValueError: aiconfigurator-core not installed, a model that is not a dense
            GQA model, or a GPU the database has no tables for.
    """
    _need_aic()
    stats = stats_from_frame(frame)
    groups = groups_from_frame(frame, model=model, hardware=hardware, tp=tp)
    p, d, n_p, n_d, k_dec, k_pf = (
        np.asarray(getattr(stats, f), float)
        for f in (
            "prefill_tokens",
            "decode_tokens",
            "num_prefill",
            "num_decode",
            "kv_decode",
            "kv_prefill",
        )
    )
    decode_ctx = np.where(n_d > 0, k_dec / np.maximum(n_d, 1), 0.0)
    prefill_len = np.where(n_p > 0, (p + k_pf) / np.maximum(n_p, 1), 0.0)
    isl = np.where(n_d > 0, decode_ctx - OSL // 2 - 1, prefill_len)
    isl = np.maximum(np.rint(isl), 1).astype(int)
    out = np.full(len(frame), np.nan)
    index = np.asarray(groups.index)
    for g, label in enumerate(groups.labels):
        name, hw, tp_ = _split_label(label)
        engine = _engine(name, hardware_system(hw), tp_)
        asked: dict[tuple[int, int, int], float] = {}
        for row in np.flatnonzero(index == g):
            key = (int(p[row]), int(d[row]), int(isl[row]))
            if key not in asked:
                pf, dec, s = key
                with _LOCK:
                    if pf > 0:
                        ms = engine.mixed_step_latency(pf, dec, s, OSL)
                    elif dec > 0:
                        ms = engine.decode_step_latency(dec, s, OSL)
                    else:
                        ms = np.nan
                asked[key] = ms
            out[row] = asked[key] * 1e3
    return out
