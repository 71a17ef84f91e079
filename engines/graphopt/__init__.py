"""Transformer graph optimization: ONNX Runtime's transformer optimizer as a stage of its own.

config.py (what a recipe states), model_types.py (the registry of model types the stage fuses),
graph.py (reading an ONNX graph: producers, consumers, small constants), detect.py (model type,
attention heads and hidden size from the graph; a stated value checked against it), fuse.py (the
optimizer run, its counts per fused operator and what it did not fuse, and why), fidelity.py (the
fused model's outputs against the unfused model's, in real ONNX Runtime sessions), targets.py
(which backend and precision starts from the fused graph), stage.py (the stage the pipeline and
the search run, and the check made when a job is created).
"""
