"""Serving: name → engine (aliases, versions), the engine pool, and running a request on an engine."""
