"""The application layer: command line, demo, plots, the benchmark drivers. The
library never imports it."""
