"""Stage 2, prune: structured and unstructured pruning (`methods`),
recovery by distillation (`finetune`), per-layer sensitivity (`sensitivity`), and the stage a
recipe runs (`stage`).
"""
