"""A PyTorch module exported on the client's side, as the file optiforge converts to ONNX.

    from optiforge_client.torch_export import export_module
    path = export_module(model, (torch.randn(8, 3, 224, 224),), "model.pt2")

`torch.export.export` traces the module into a program of PyTorch operators, with dim 0 of every
input a dynamic batch dim (one `Dim` shared by all inputs), and `torch.export.save` writes it as a
`.pt2` archive. The server reads that archive without unpickling anything and converts it to ONNX
in a worker. torch is imported here only: the rest of optiforge_client installs and runs without
it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

BATCH_DIM_NAME = "batch"


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise ImportError(
            "export_module needs PyTorch, which is not installed: `pip install torch` (only this "
            "function of optiforge_client uses it)"
        ) from exc
    return torch


def export_module(
    module: Any,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    dynamic_batch: bool = True,
) -> Path:
    """Export `module` (a `torch.nn.Module`) with `torch.export` and save it to `path` (a `.pt2`).

    `example_inputs`: the positional arguments of one call, a tuple (or a lone tensor); nested
    lists, tuples and dicts of tensors work too. The module is traced in eval mode (dropout off,
    BatchNorm on its running statistics) and put back in the mode it was in.

    `dynamic_batch` (default): dim 0 of every tensor input (of rank 1 or more) is one dynamic dim
    named `batch`, so the converted model takes any batch size. Examples with a batch of 1 are
    repeated to 2 for the trace (torch.export would otherwise take size 1 for a constant). A module
    that fixes its batch size (e.g. `x.view(8, -1)`) raises ValueError: pass `dynamic_batch=False`
    to export it with the examples' shapes.
    """
    torch = _import_torch()
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"export_module takes a torch.nn.Module, not {type(module).__name__}")
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    target = Path(path)
    if target.suffix != ".pt2":
        raise ValueError(f"'{target.name}': a torch.export program is saved as a .pt2 file")
    dynamic_shapes = None
    if dynamic_batch:
        args = _batch_of_two(torch, args)
        batch = torch.export.Dim(BATCH_DIM_NAME)
        dynamic_shapes = torch.utils._pytree.tree_map(
            lambda leaf: {0: batch} if isinstance(leaf, torch.Tensor) and leaf.dim() > 0 else None, args
        )
    was_training = module.training
    module.eval()
    try:
        program = torch.export.export(module, args, dynamic_shapes=dynamic_shapes)
    except Exception as exc:
        if dynamic_batch and "Constraints violated" in str(exc):
            first = str(exc).strip().splitlines()
            raise ValueError(
                "the module does not take any batch size (torch.export found it fixes dim 0 of an input: "
                f"{' '.join(first[:3])}); export it with dynamic_batch=False to keep the examples' "
                "batch size, or make the batch dim free (e.g. x.flatten(1) instead of x.view(8, -1))"
            ) from exc
        raise
    finally:
        module.train(was_training)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, target)
    return target


def _batch_of_two(torch: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """`args` with every batched tensor repeated to a batch of 2 when all have a batch of 1."""
    leaves = [
        leaf
        for leaf in torch.utils._pytree.tree_leaves(args)
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0
    ]
    if not leaves or any(leaf.shape[0] != 1 for leaf in leaves):
        return args
    return torch.utils._pytree.tree_map(
        lambda leaf: torch.cat([leaf, leaf]) if isinstance(leaf, torch.Tensor) and leaf.dim() > 0 else leaf,
        args,
    )
