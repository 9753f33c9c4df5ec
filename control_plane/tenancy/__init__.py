"""Tenants: API keys with the models they may use and their limits (managed through the admin API or
declared in the registry file), stored hashed. Envoy enforces them; this package owns the keys."""
