"""Benchmarks of Salesmsg Connect: ``make bench`` (``python -m bench``). See bench/README.md."""
