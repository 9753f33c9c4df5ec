"""The admin HTTP API (FastAPI)."""
