"""A tenant's connection to Salesmsg: consent, authorization, tokens, refresh, events."""
