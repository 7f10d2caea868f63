"""The step model: architecture, hardware, deployment, batch statistics, operator
physics, the roofline and its factors."""
