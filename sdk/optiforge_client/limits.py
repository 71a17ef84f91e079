"""Bounds the server enforces that the CLI checks before it uploads anything, so a mistake costs
no upload. The minimum time budget is held here and imported by the server's schema
(app/api/schemas.py); the others are copies of the server's values, and tests/test_cli_checks.py
fails when a copy differs."""

from __future__ import annotations

#: The shortest time budget of an auto-optimize search, in minutes (the server's
#: `MIN_TIME_BUDGET_MINUTES`): below it, not even the cheapest candidates and the final timing fit.
MIN_TIME_BUDGET_MINUTES = 1.0
#: What an auto-optimize objective may measure (the server's `engines.search.space.OBJECTIVE_METRICS`).
OBJECTIVE_METRICS = ("latency", "throughput", "size")
#: The largest accuracy budget the server takes as meant, a fraction (the server's
#: `MAX_BUDGET_DROP`): 0.5 = 50 points; above it, a unit mistake is far likelier.
MAX_BUDGET_DROP = 0.5
