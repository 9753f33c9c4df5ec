"""Overload control: saturation decided from telemetry (saturation.py), fallback routing (fallback.py),
their wiring into the control plane (wiring.py) and the counts read off the access-log stream (sinks.py).
The Envoy side is in xds/builders/shedding.py and xds/builders/fallback.py."""
