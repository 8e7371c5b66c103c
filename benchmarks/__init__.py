"""Reproducible benchmarks (not tests): one script per item, `python -m benchmarks.<name> --help`."""
