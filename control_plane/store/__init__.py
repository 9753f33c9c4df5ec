"""Persistent admin state (SQLite): what operators changed at run time, layered over the registry file."""

from control_plane.store.overlay import AdminStore, Flags

__all__ = ["AdminStore", "Flags"]
