"""Fixtures of the server tests (``procs``, children that are always killed, is in tests/conftest.py)."""
