"""Active health probing of model server endpoints."""
