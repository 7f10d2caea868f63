"""diffmodel: a differentiable, fittable roofline of LLM inference step time."""

from ._paths import default_data_dir as default_data_dir
