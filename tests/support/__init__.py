"""Helpers the tests and the benchmarks share: hosts, daemons, buses and in-process fakes."""
