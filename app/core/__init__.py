"""The foundation every domain stands on: settings, the database, tables, errors, logs, metrics."""
