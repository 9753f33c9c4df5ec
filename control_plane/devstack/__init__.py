"""Start and stop the local stack's processes (Envoy, control plane, simulated backends).

Used by `make run` and by the integration tests, so both exercise the same wiring.
"""
