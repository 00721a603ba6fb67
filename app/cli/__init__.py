"""The ``salesmsg-connect`` command line."""
