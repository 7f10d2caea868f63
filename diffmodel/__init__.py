"""diffmodel: a differentiable, fittable roofline of LLM inference step time.

The top level holds the core vocabulary: the step model (architecture, hardware,
deployment, batch statistics, ``step_time``), its factors and factor sets, ``fit``,
prediction (``predict`` for pandas frames, ``predict_steps`` for arrays in bulk), JSON
save/load and metrics. Families live in public namespaces: :mod:`diffmodel.data`
(traces, frames, splits), :mod:`diffmodel.kernels` (kernel tables, curves,
calibration), :mod:`diffmodel.scheduler` and :mod:`diffmodel.baselines`.

Units: times in microseconds per GPU, work in FLOPs and bytes, tokens as counts.

Start with::

    import diffmodel as dm
    dep = dm.deployment("llama-2-70b", hardware="h100-sxm", tp=4)
    stats = dm.from_aggregates(prefill_tokens=512, decode_tokens=32, num_prefill=1,
                               num_decode=32, kv_tokens=32_000)
    dm.step_time(stats, dep, dm.default_factors()).total  # us

The names (``__all__``, listed by ``help(diffmodel)``) are imported on first use:
``import diffmodel`` alone does not import JAX, so the command line's ``--help`` is
instant. The list lives in ``diffmodel/_api.py``.
"""

from importlib import import_module as _import_module


def __getattr__(name: str):
    if name == "__version__":  # importlib.metadata alone takes ~0.1 s to import
        from importlib.metadata import PackageNotFoundError, version

        try:
            value = version("diffmodel")
        except PackageNotFoundError:  # pragma: no cover - a bare source tree
            value = "0+unknown"
        globals()[name] = value
        return value
    if name.startswith("_") and name != "__all__":
        raise AttributeError(f"module 'diffmodel' has no attribute {name!r}")
    _api = _import_module(f"{__name__}._api")  # imports JAX and the library
    try:
        value = getattr(_api, name)
    except AttributeError:
        raise AttributeError(f"module 'diffmodel' has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    _api = _import_module(f"{__name__}._api")
    return sorted(set(globals()) | set(_api.__all__) | {"__version__"})
