"""Benchmark workloads shared by `sparsefl bench` and the pytest-benchmark suite in bench/."""
