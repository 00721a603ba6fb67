"""Calling Salesmsg for a tenant: the REST proxy's hot path, the gate, retries, idempotency."""
