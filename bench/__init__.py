"""Benchmarks of vfiocaps measured side by side with their floors (run with ``bench/run``)."""
