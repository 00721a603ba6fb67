"""Salesmsg Connect: a self-hosted OAuth2 integration gateway for the Salesmsg API."""

__version__ = "0.1.0"
