"""Prometheus and Alertmanager around the gateway: file-SD targets from the registry and config rendering.

Pure functions only; the processes are started by `control_plane.devstack.observability`.
"""
