"""Envelope encryption of per-tenant secrets, and tenant data keys in the database."""
