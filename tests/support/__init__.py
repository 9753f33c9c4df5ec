"""Helpers shared by the tests: registry fixtures, an ADS client that behaves like Envoy, HTTP helpers."""
