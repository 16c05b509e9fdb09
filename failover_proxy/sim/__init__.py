"""Simulated providers for the demo, the tests and the benchmarks: fault backends and load."""
