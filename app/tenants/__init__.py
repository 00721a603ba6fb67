"""Tenants (one per customer org), their HIPAA flag and BAA."""
