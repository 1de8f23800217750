"""Benchmark inputs: request-length workloads and arrival processes (see ``rankserve.bench.workloads``)."""
