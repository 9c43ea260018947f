"""Sandbox backends: see :mod:`nox_api.engine.base` for the protocol."""
