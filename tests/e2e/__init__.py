"""End-to-end tests against the real servers.

A package, so that its conftest.py does not shadow tests/conftest.py.
"""
