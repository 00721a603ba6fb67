"""Who calls us: people and their browser sessions, API keys for internal services."""
