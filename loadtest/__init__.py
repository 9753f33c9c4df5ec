"""Load tests and benchmarks of the gateway (run as modules, e.g. ``python -m loadtest.bench_balancing``)."""
