"""Bulk evaluation: the rewritten evaluator, the chunk feeder and its entry points."""
