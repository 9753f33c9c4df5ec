"""Alertmanager notifications: recorded, shown, and (where the operator allows it) acted upon."""
