"""Auto-optimize: the fastest engine within an accuracy budget, searched over pruning × precision ×
calibration × backend, with every candidate's outcome and the Pareto front (`autotune`)."""
