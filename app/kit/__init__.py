"""Small helpers that know nothing of the app's domains."""
