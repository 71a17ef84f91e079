"""Stage 5, measure: latency side by side (`latency`), accuracy and fidelity (`accuracy`), and
the comparison table (`report`).
"""
