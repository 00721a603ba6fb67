"""The management API under /api/v1: JSON, API-key authentication, cursor pagination."""
