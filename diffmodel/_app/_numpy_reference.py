"""A NumPy copy of the roofline, the throughput benchmark's reference.

The same formulas as :func:`diffmodel.step_time` written in vectorised NumPy: what a
careful NumPy port costs per step (see ``_bench``). Kept in step with the JAX model by
``tests/app/test_numpy_reference.py`` (float64, hand-checkable values).
"""

import numpy as np

import diffmodel as dm


def numpy_step_time(cols, group, dep: dict, fac: dict) -> np.ndarray:
    """The roofline of :func:`diffmodel.step_time`, total us, in vectorised NumPy.

    The same formulas written directly, for the throughput benchmark's NumPy column
    (and tested against :func:`diffmodel.step_time` in float64).

    Args:
        cols: the seven :class:`diffmodel.BatchStats` fields in field order, arrays
            of steps.
        group: each step's deployment index into ``dep``'s arrays.
        dep, fac: from :func:`numpy_tables`.
    """
    p, dtok, n_pf, n_dec, k_dec, a_pf, k_pf = cols
    g = {k: v[group] for k, v in dep.items()}
    L, d, dh, t = g["n_layers"], g["hidden"], g["head_dim"], g["tp"]
    wb, ab, kb = g["weight_bytes"], g["act_bytes"], g["kv_bytes"]
    bw = g["hbm_bw"]
    tokens, requests = p + dtok, n_pf + n_dec
    gate = np.where(tokens >= 1.0, 1.0, tokens)  # the idle gate of step_time
    qh = g["n_heads"] / t
    kvh = np.maximum(g["n_kv_heads"] / t, 1.0)
    peak = np.where(wb <= 1.0, g["flops_8"], g["flops_16"])

    def smooth_max(a, b):
        m = np.maximum(a, b)
        safe = np.where(m > 0, m, 1.0)
        s = (a / safe) ** 4 + (b / safe) ** 4
        return np.where(m > 0, safe * s**0.25, 0.0)

    def roof(f, b, pk, eta_f, eta_b):
        return smooth_max(f / (pk * eta_f) * 1e6, b / (bw * eta_b) * 1e6)

    def gemm(m, n, k):
        return 2.0 * m * n * k, k * n * wb + (m * k + m * n) * ab

    ffn, sffn, e, k = g["ffn"] / t, g["shared_ffn"] / t, g["n_experts"], g["top_k"]
    fe = g["expert_ffn"] / t
    gemms = [
        gemm(tokens, (qh + 2 * kvh) * dh, d),
        gemm(tokens, d, qh * dh),
        gemm(tokens, 2 * ffn, d),
        gemm(tokens, d, ffn),
        gemm(tokens, 2 * sffn, d),
        gemm(tokens, d, sffn),
        gemm(tokens, e, d),
    ]
    per_expert = 3.0 * d * fe
    base = 1.0 - k / np.where(e > 0, e, 1.0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        miss = np.where(
            base > 0,
            np.where(base > 0, base, 1.0) ** tokens,
            np.where(tokens > 0, 0, 1),
        )
    touched = np.where(e > 0, e * (1.0 - miss), 0.0)
    acts = tokens * k * (2.0 * d + 3.0 * fe) + tokens * d
    lin_f = sum(x[0] for x in gemms) + 2.0 * tokens * k * per_expert
    lin_b = sum(x[1] for x in gemms) + touched * per_expert * wb + acts * ab
    ffn_act = ffn + sffn + k * fe
    lin_b = lin_b + tokens * ab * (10 * d + 2 * (qh + kvh) * dh + 3 * ffn_act)
    linear = roof(L * lin_f, L * lin_b, peak, fac["gemm_flops"], fac["mem_bw"])
    f16 = g["flops_16"]
    pf_f = 4.0 * qh * dh * a_pf
    pf_b = 2.0 * kvh * dh * kb * (k_pf + p) + 2.0 * qh * dh * ab * p
    pf = roof(L * pf_f, L * pf_b, f16, fac["attn_flops"], fac["attn_bw"])
    dec_f = 4.0 * qh * dh * k_dec
    dec_b = 2.0 * kvh * dh * kb * k_dec + 2.0 * qh * dh * ab * dtok
    dec = roof(L * dec_f, L * dec_b, f16, fac["attn_flops"], fac["attn_bw"])
    kv_write = L * 2 * kvh * dh * kb * tokens / (bw * fac["mem_bw"]) * 1e6
    head_f, head_b = gemm(requests, g["vocab"] / t, d)
    head_b = head_b + requests * g["vocab"] / t * 4.0
    head = roof(head_f, head_b, peak, fac["gemm_flops"], fac["mem_bw"])
    ring = 2.0 * (t - 1.0) / t * tokens * d * ab / (g["link_bw"] * fac["comm_bw"]) * 1e6
    allreduce = 2 * L * np.where(t > 1, fac["comm_latency_us"] + ring, 0.0)
    overhead = (
        fac["step_overhead_us"]
        + L * fac["layer_overhead_us"] * gate
        + requests * fac["request_overhead_us"]
    )
    gpu = linear + pf + dec + kv_write + head + allreduce
    return gpu * gate + overhead


def numpy_tables(deps: dm.Deployment, fac: dm.Factors, dtype) -> tuple[dict, dict]:
    """Stacked deployments and shared factors as dicts of NumPy arrays of ``dtype``."""
    dep = {k: np.asarray(v, dtype) for k, v in vars(deps.arch).items()}
    dep |= {k: np.asarray(v, dtype) for k, v in vars(deps.hw).items()}
    dep["tp"] = np.asarray(deps.tp, dtype)
    return dep, {k: dtype(v) for k, v in fac.as_dict().items()}
