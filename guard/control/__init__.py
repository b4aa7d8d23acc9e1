"""Running the guard: config, settings precedence, file watching, the
process lifecycle, workers and ``guard check``."""
