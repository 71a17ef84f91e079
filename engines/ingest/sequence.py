"""The sequence axis of token models: which inputs have one, and the limits the graph sets on it.

A transformer's cost grows with its sequence length as much as with its batch, so a recipe may ask
for latency at several lengths (`Recipe.sequence_lengths`). Two things decide what may be asked:

- **which inputs carry a sequence axis**: an integer input (token ids, attention mask, token types,
  position ids) with a dynamic dim after its batch axis. The first such dim is its sequence axis;
  any other input (a float mask, say) with a dim of the same symbolic name has one too, at that dim.
  Read from the signature alone, so the API decides it from a stored model's specs.
- **what the graph allows**: a learned position table (an initializer of shape [positions, hidden]
  read by a Gather, as BERT, MiniLM and GPT-2 have) caps the length; a longer sequence indexes
  past it and fails inside the runtime. The word table's rows (engines.ingest.embeddings) are the
  vocabulary, the range generated token ids must stay in. Read from the graph (weights are not
  loaded), so a model of any size costs the memory of its graph.

A model whose positions are rotary or sinusoidal (computed, no table) has no limit here.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engines.errors import InvalidRecipeError
from engines.ingest.embeddings import embedding_rows, stored_shapes
from engines.ingest.signature import TensorSpec

#: What an input with a sequence axis holds, which decides the values generated for it.
IDS, MASK, TOKEN_TYPES, POSITIONS, OTHER = "ids", "mask", "token_types", "positions", "other"

#: Ops that pass a tensor through unchanged in meaning, on the way from an initializer (a table) or
#: a graph input (indices) to a Gather.
_PASS_THROUGH = frozenset({"Cast", "Identity", "DequantizeLinear", "Squeeze", "Unsqueeze", "Reshape"})
#: Table names that say "positions" (BERT's position_embeddings, GPT-2's wpe, BART's embed_positions).
_POSITION_NAMES = ("position", "wpe", "pos_emb", "positional")
#: The longest sequence a recipe may name at all (a model's position table usually allows far less).
MAX_SEQUENCE_LENGTH = 131_072
#: How far up the graph the indices of a position Gather are followed to find a CumSum.
_ANCESTRY_LIMIT = 40


@dataclass(frozen=True)
class SequenceProfile:
    """A model's sequence axes and the limits its graph sets on them (None: no limit found)."""

    axes: dict[str, int] = field(default_factory=dict)  # input name -> its sequence axis
    roles: dict[str, str] = field(default_factory=dict)  # input name -> IDS, MASK, …
    max_positions: int | None = None  # the longest sequence the position table holds
    vocab_size: int | None = None  # rows of the word table: token ids are in [0, vocab_size)
    #: Where the limit comes from, for the 422 that names it (e.g. "position table
    #: 'embeddings.position_embeddings.weight' (512 rows)").
    limit_source: str | None = None

    @property
    def has_axis(self) -> bool:
        return bool(self.axes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "axes": dict(self.axes),
            "roles": dict(self.roles),
            "max_positions": self.max_positions,
            "vocab_size": self.vocab_size,
            "limit_source": self.limit_source,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SequenceProfile:
        return cls(
            axes={str(name): int(axis) for name, axis in (data.get("axes") or {}).items()},
            roles={str(name): str(role) for name, role in (data.get("roles") or {}).items()},
            max_positions=data.get("max_positions"),
            vocab_size=data.get("vocab_size"),
            limit_source=data.get("limit_source"),
        )


def sequence_axes(inputs: Sequence[TensorSpec]) -> dict[str, int]:
    """Input name -> sequence axis, from the signature alone (see the module's docstring).

    An integer input's first dynamic dim after its batch axis is its sequence axis; then every
    input with a dim of one of those symbolic names has its sequence axis there."""
    axes: dict[str, int] = {}
    symbols: set[str] = set()
    for spec in inputs:
        if spec.batch_axis is None or np.dtype(spec.dtype).kind not in "iu":
            continue
        for axis in range(spec.batch_axis + 1, spec.rank):
            dim = spec.shape[axis]
            if not isinstance(dim, int):
                axes[spec.name] = axis
                if isinstance(dim, str):
                    symbols.add(dim)
                break
    for spec in inputs:
        if spec.name in axes:
            continue
        for axis, dim in enumerate(spec.shape):
            if axis != spec.batch_axis and isinstance(dim, str) and dim in symbols:
                axes[spec.name] = axis
                break
    return axes


def _role_by_name(name: str) -> str | None:
    lowered = name.lower()
    if "mask" in lowered:
        return MASK
    if "token_type" in lowered or "segment" in lowered:
        return TOKEN_TYPES
    if "position" in lowered:
        return POSITIONS
    return None


def profile_from_specs(inputs: Sequence[TensorSpec]) -> SequenceProfile:
    """What the signature alone tells: the axes, and roles by input name (ids for other integer
    inputs); no limits. Used where the graph is not at hand."""
    axes = sequence_axes(inputs)
    by_name = {spec.name: spec for spec in inputs}
    roles = {
        name: _role_by_name(name) or (IDS if np.dtype(by_name[name].dtype).kind in "iu" else OTHER)
        for name in axes
    }
    return SequenceProfile(axes=axes, roles=roles)


def _back_to(name: str, producers: Mapping[str, Any], stop: Collection[str]) -> str | None:
    """Follow `name` up through pass-through ops to a name in `stop` (a table, a graph input)."""
    for _ in range(8):
        if name in stop:
            return name
        node = producers.get(name)
        if node is None or node.op_type not in _PASS_THROUGH or not node.input:
            return None
        name = node.input[0]
    return None


def _ancestors(name: str, producers: Mapping[str, Any]) -> Iterator[Any]:
    """Nodes above `name`, nearest first, at most `_ANCESTRY_LIMIT` of them."""
    seen: set[int] = set()
    frontier = [name]
    while frontier and len(seen) < _ANCESTRY_LIMIT:
        node = producers.get(frontier.pop(0))
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        frontier.extend(node.input)


def _position_tables(graph: Any, input_names: set[str]) -> list[tuple[str, int]]:
    """(what the table is, positions it holds) for every position table read at computed indices:
    by a Gather whose table's name says positions, or by ORT's fused EmbedLayerNormalization;
    failing those, the one table of a word table's width read at computed indices (a relative
    position bias, as T5 has, is as wide as the heads, not the hidden size, and is left out).
    Tables that inputs index (word, token type, position ids given as an input) are
    engines.ingest.embeddings' to count."""
    shapes = stored_shapes(graph)
    producers = {output: node for node in graph.node for output in node.output}
    named: list[tuple[str, int]] = []
    unnamed: list[tuple[str, int, int]] = []
    widths: set[int] = set()  # of the tables inputs index
    for node in graph.node:
        if node.op_type == "EmbedLayerNormalization" and len(node.input) > 3:
            table = _back_to(node.input[3], producers, shapes)
            if table is not None and len(shapes[table]) == 2:
                named.append((f"position table '{table}' ({shapes[table][0]} rows)", shapes[table][0]))
            continue
        if node.op_type != "Gather" or len(node.input) < 2:
            continue
        if any(attribute.name == "axis" and attribute.i != 0 for attribute in node.attribute):
            continue
        table = _back_to(node.input[0], producers, shapes)
        if table is None or len(shapes[table]) != 2:
            continue
        rows, width = shapes[table]
        if _back_to(node.input[1], producers, input_names) is not None:
            widths.add(width)
        elif any(word in table.lower() for word in _POSITION_NAMES):
            # RoBERTa counts positions from padding_idx + 1 (a CumSum over the mask): two rows fewer
            offset = any(ancestor.op_type == "CumSum" for ancestor in _ancestors(node.input[1], producers))
            kept = ", the first two kept for padding" if offset else ""
            named.append((f"position table '{table}' ({rows} rows{kept})", rows - 2 if offset else rows))
        else:
            unnamed.append((table, rows, width))
    if named:
        return named
    fitting = [
        (f"position table '{table}' ({rows} rows)", rows)
        for table, rows, width in unnamed
        if width in widths and rows > 2
    ]
    return fitting if len(fitting) == 1 else []


def profile_from_model(model: Any, inputs: Sequence[TensorSpec]) -> SequenceProfile:
    """The sequence profile of a loaded ONNX model (weights need not be loaded) whose inputs are
    `inputs` (batch axes decided).

    Roles: the input's name decides (`mask`, `token_type`/`segment`, `position`); else an input
    that indexes an embedding table is token ids, and one that does not gets `other` (ones: valid
    as any of them). The vocabulary: the rows of the table token ids index. The limit: the fewest
    positions of the position tables (`_position_tables`), or of the table position ids index."""
    base = profile_from_specs(inputs)
    if not base.has_axis:
        return base
    rows = embedding_rows(model)
    roles: dict[str, str] = {}
    limits = _position_tables(model.graph, {spec.name for spec in inputs})
    for name in base.axes:
        role = _role_by_name(name) or (IDS if name in rows else OTHER)
        roles[name] = role
        if role == POSITIONS and name in rows:
            limits.append((f"position table indexed by '{name}' ({rows[name]} rows)", rows[name]))
    vocab = [rows[name] for name, role in roles.items() if role == IDS and name in rows]
    limit = min(limits, key=lambda item: item[1]) if limits else None
    return SequenceProfile(
        axes=base.axes,
        roles=roles,
        max_positions=None if limit is None else limit[1],
        vocab_size=max(vocab) if vocab else None,
        limit_source=None if limit is None else limit[0],
    )


def read_profile(model_path: Path, inputs: Sequence[TensorSpec] = ()) -> SequenceProfile:
    """`profile_from_model` of an ONNX file (weights are not loaded); `inputs` are its input specs
    with batch axes decided (a model's stored specs, stated axes included), read from the graph
    when not given."""
    from engines.ingest.model import load_model_proto
    from engines.ingest.signature import assign_batch_axes, onnx_value_to_spec

    model = load_model_proto(model_path)
    if not inputs:
        weights = {tensor.name for tensor in model.graph.initializer}
        inputs = assign_batch_axes(
            [onnx_value_to_spec(v) for v in model.graph.input if v.name not in weights]
        )
    return profile_from_model(model, inputs)


def check_sequence_lengths(
    lengths: Sequence[int], profile: SequenceProfile, inputs: Sequence[TensorSpec], *, what: str
) -> None:
    """InvalidRecipeError unless every length can run: the model has a dynamic sequence axis, and
    every length is positive and within its position table. `what` names the field in messages
    (`sequence_lengths`, `objective.sequence_length`)."""
    if not lengths:
        return
    if not profile.has_axis:
        fixed = [
            f"'{spec.name}' {list(spec.shape)}"
            for spec in inputs
            if np.dtype(spec.dtype).kind in "iu" and spec.rank > 1
        ]
        raise InvalidRecipeError(
            f"{what} applies to models whose token inputs have a dynamic sequence dim after the batch "
            "(e.g. input_ids [batch, sequence]); this model has none"
            + (f" (its integer inputs: {', '.join(fixed)})" if fixed else "")
            + f": leave out {what}",
            code="no_sequence_axis",
        )
    wrong = [length for length in lengths if length <= 0]
    if wrong:
        raise InvalidRecipeError(f"{what} must be positive, got {wrong}", code="invalid_sequence_length")
    limit = profile.max_positions
    over = [length for length in lengths if limit is not None and length > limit]
    if over:
        raise InvalidRecipeError(
            f"{what} {', '.join(map(str, over))} {'is' if len(over) == 1 else 'are'} over the model's limit "
            f"of {limit} tokens (its {profile.limit_source}): ask "
            f"for at most {limit}",
            code="sequence_too_long",
            extra={"max_sequence_length": limit},
        )
