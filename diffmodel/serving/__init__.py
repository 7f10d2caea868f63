"""Serving features on top of the step model: speculative decoding, prefix caching,
pipeline parallelism (expert parallelism is the ``ep`` of :func:`diffmodel.deployment`).
"""

from .._model._features import (
    PipelineBreakdown as PipelineBreakdown,
    SpeculativeBreakdown as SpeculativeBreakdown,
    accepted_tokens as accepted_tokens,
    mtp_draft as mtp_draft,
    pipeline_step as pipeline_step,
    prefix_cached as prefix_cached,
    prefix_cached_requests as prefix_cached_requests,
    speculative_stats as speculative_stats,
    speculative_step as speculative_step,
)
