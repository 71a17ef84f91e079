"""Timing inputs for token models at a (batch, sequence length): what a tokenizer would give.

A transformer's latency depends on the shape it runs, but its inputs must still be valid: a token
id past the word table fails (or reads out of bounds), position ids must count 0…L−1, token types
are 0 for a single segment, and an attention mask is ones over real tokens. So values follow each
input's role (engines.ingest.sequence): ids drawn from the vocabulary (never the padding id 0),
mask ones, token types zeros, positions 0…L−1. With `padding` > 0, rows of a batch hold fewer real
tokens, as a batch padded to its longest sentence does: the first row is full, the others end
between (1 − 2·padding)·L and L tokens (padding·L pad tokens on average), with pad id 0 and mask 0
past their end.

A dataset's own rows (real tokens) are fitted to the length instead: cut, or padded the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from engines.errors import InvalidRecipeError
from engines.ingest.sequence import IDS, MASK, POSITIONS, TOKEN_TYPES, SequenceProfile
from engines.ingest.signature import TensorSpec

#: The most a generated batch may be padded (average share of pad tokens per row).
MAX_PADDING = 0.5


def full_shape(spec: TensorSpec, batch_size: int, length: int, axis: int | None) -> tuple[int, ...]:
    """The input's shape at this batch and sequence length (`axis`: its sequence axis, if any);
    InvalidRecipeError when another dim is dynamic (there is no one value to make up for it)."""
    dims = []
    for index, dim in enumerate(spec.shape):
        if index == spec.batch_axis:
            dims.append(batch_size)
        elif index == axis:
            dims.append(length)
        elif isinstance(dim, int):
            dims.append(dim)
        else:
            raise InvalidRecipeError(
                f"input '{spec.name}' has dynamic dims besides the batch and the sequence "
                f"({list(spec.shape)}); give a dataset so it can be measured",
            )
    return tuple(dims)


def row_lengths(batch_size: int, length: int, padding: float, rng: np.random.Generator) -> np.ndarray:
    """Real tokens per row: all `length` without padding; else the first row full and the others
    spread between (1 − 2·padding)·length and length (at least one token)."""
    if padding <= 0 or batch_size == 0:
        return np.full(batch_size, length, dtype=np.int64)
    share = min(padding, MAX_PADDING)
    cut = np.rint(2 * share * length * rng.random(batch_size)).astype(np.int64)
    cut[0] = 0
    return np.maximum(1, length - cut)


def _values(
    role: str, rows: int, length: int, lengths: np.ndarray, vocab: int | None, rng: np.random.Generator
) -> np.ndarray:
    """A (rows, length) int64 matrix of the role's values, pad positions (past `lengths`) zero."""
    real = np.arange(length)[None, :] < lengths[:rows, None]
    if role == IDS:
        low, high = (1, vocab) if vocab and vocab > 1 else (1, 2)
        return np.where(real, rng.integers(low, high, size=(rows, length)), 0)
    if role == POSITIONS:
        return np.broadcast_to(np.arange(length, dtype=np.int64), (rows, length)).copy()
    if role == TOKEN_TYPES:
        return np.zeros((rows, length), dtype=np.int64)
    # masks, and integer inputs of no known role: ones over real tokens (valid as ids, types, masks)
    return real.astype(np.int64)


def _place(matrix: np.ndarray, spec: TensorSpec, axis: int, shape: tuple[int, ...]) -> np.ndarray:
    """A (rows, length) matrix laid out on the input's batch and sequence axes, broadcast over the
    others (a [batch, 1, 1, seq] mask, a [1, seq] position-id input without a batch axis)."""
    if spec.batch_axis is None:
        view = [1] * len(shape)
        view[axis] = matrix.shape[1]
        placed = matrix[0].reshape(view)
    else:
        view = [1] * len(shape)
        view[spec.batch_axis], view[axis] = matrix.shape
        placed = (matrix if spec.batch_axis < axis else matrix.T).reshape(view)
    return np.ascontiguousarray(np.broadcast_to(placed, shape))


def sequence_feeds(
    specs: Sequence[TensorSpec],
    batch_size: int,
    length: int,
    profile: SequenceProfile,
    *,
    padding: float = 0.0,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Generated feeds at (batch_size, length) for every input: token inputs by role, float inputs
    without a sequence role random normal, other integer inputs zeros (as for any model)."""
    rng = np.random.default_rng(seed)
    lengths = row_lengths(batch_size, length, padding, rng)
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        axis = profile.axes.get(spec.name)
        shape = full_shape(spec, batch_size, length, axis)
        role = profile.roles.get(spec.name)
        kind = np.dtype(spec.dtype).kind
        if axis is not None and (kind in "iub" or role == MASK):
            rows = batch_size if spec.batch_axis is not None else 1
            matrix = _values(role or MASK, rows, length, lengths, profile.vocab_size, rng)
            feeds[spec.name] = _place(matrix, spec, axis, shape).astype(spec.dtype)
        elif kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        else:
            feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
    return feeds


def fit_to_length(
    feeds: Mapping[str, np.ndarray], specs: Sequence[TensorSpec], length: int, profile: SequenceProfile
) -> dict[str, np.ndarray]:
    """A dataset's feeds with every sequence axis cut or padded to `length`: ids, masks and token
    types padded with 0 (the pad id, no attention), position ids counted on."""
    fitted = dict(feeds)
    for spec in specs:
        axis = profile.axes.get(spec.name)
        array = feeds.get(spec.name)
        if axis is None or array is None or axis >= array.ndim:
            continue
        if profile.roles.get(spec.name) == POSITIONS:
            shape = tuple(length if index == axis else size for index, size in enumerate(array.shape))
            view = [1] * array.ndim
            view[axis] = length
            positions = np.arange(length, dtype=np.int64).reshape(view)
            fitted[spec.name] = np.ascontiguousarray(np.broadcast_to(positions, shape)).astype(array.dtype)
            continue
        have = array.shape[axis]
        if have >= length:
            fitted[spec.name] = np.ascontiguousarray(np.take(array, np.arange(length), axis=axis))
        else:
            pad = [(0, 0)] * array.ndim
            pad[axis] = (0, length - have)
            fitted[spec.name] = np.pad(array, pad)
    return fitted
