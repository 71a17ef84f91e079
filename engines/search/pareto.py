"""The Pareto front of cost (latency, 1/throughput or size) against accuracy drop: the candidates no
other candidate beats on both at once. Dominated ones stay in the report, marked so."""

from __future__ import annotations

from collections.abc import Sequence


def pareto_front(points: Sequence[tuple[float, float]]) -> set[int]:
    """Indices of the points (cost, drop), both to minimize, that no other point dominates (as good
    on both and better on one). Ties keep every tied point."""
    front = set()
    for index, (cost, drop) in enumerate(points):
        dominated = any(
            other_cost <= cost and other_drop <= drop and (other_cost < cost or other_drop < drop)
            for other_index, (other_cost, other_drop) in enumerate(points)
            if other_index != index
        )
        if not dominated:
            front.add(index)
    return front
