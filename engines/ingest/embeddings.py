"""The embedding tables a model's integer inputs index: how many rows each has.

A token id at or past the rows of the table it indexes does not fail loudly everywhere: ONNX
Runtime's CPU Gather refuses it, but other runtimes clamp or read past the table. A text dataset
is checked against these numbers before it is tokenized (engines.ingest.texts): a tokenizer whose
vocabulary is larger than the word-embedding table is the wrong tokenizer for the model.

Found from the graph alone (initializer shapes, no weights read): an input is followed through
ops that keep its values (Cast, Identity, Reshape, Unsqueeze, Squeeze, Flatten) to a `Gather`
whose indices it is and whose data is a table stored in the model (an initializer or a Constant,
possibly behind Cast, Identity or DequantizeLinear); the table's rows are its dim along the
Gather's axis. ONNX Runtime's fused `EmbedLayerNormalization` (com.microsoft) counts too: its
word table is read by input_ids, its segment table by the segment (token type) ids.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

#: Ops whose output holds the same index values as their first input.
_VALUE_KEEPING = frozenset({"Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten"})
#: Ops between a stored table and the Gather that reads it, keeping its rows.
_TABLE_KEEPING = frozenset({"Cast", "Identity", "DequantizeLinear"})
#: EmbedLayerNormalization's inputs: (index input position, table input position).
_FUSED_EMBEDDINGS = ((0, 2), (1, 4))  # input_ids -> word_embedding, segment_ids -> segment_embedding


def embedding_rows(model: Any) -> dict[str, int]:
    """{graph input name: rows of the smallest embedding table it indexes}, for the inputs that
    index one (an `onnx.ModelProto`; its weights need not be loaded)."""
    graph = model.graph
    tables = stored_shapes(graph)
    producers = {output: node for node in graph.node for output in node.output}
    consumers: dict[str, list[Any]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    initializers = {tensor.name for tensor in graph.initializer}
    found: dict[str, int] = {}
    for value in graph.input:
        if value.name in initializers:
            continue
        rows = [
            row
            for name in _value_aliases(value.name, consumers)
            for node in consumers[name]
            if (row := _rows_read(node, name, tables, producers)) is not None
        ]
        if rows:
            found[value.name] = min(rows)
    return found


def read_embedding_rows(onnx_path: Path) -> dict[str, int]:
    """`embedding_rows` of an ONNX file, read without its external data."""
    from engines.ingest.model import load_model_proto

    return embedding_rows(load_model_proto(onnx_path))


def stored_shapes(graph: Any) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor stored in the graph: initializers and Constant outputs."""
    shapes = {tensor.name: tuple(int(d) for d in tensor.dims) for tensor in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.HasField("t"):
                    shapes[node.output[0]] = tuple(int(d) for d in attribute.t.dims)
    return shapes


def _value_aliases(name: str, consumers: dict[str, list[Any]]) -> list[str]:
    """`name` and every tensor that holds its values through value-keeping ops."""
    names, pending = [name], [name]
    while pending:
        current = pending.pop()
        for node in consumers.get(current, ()):
            if node.op_type in _VALUE_KEEPING and node.input and node.input[0] == current:
                for output in node.output[:1]:
                    if output not in names:
                        names.append(output)
                        pending.append(output)
    return names


def _table_shape(
    name: str, tables: dict[str, tuple[int, ...]], producers: dict[str, Any]
) -> tuple[int, ...] | None:
    for _ in range(8):  # a short chain at most: Cast(DequantizeLinear(table))
        if name in tables:
            return tables[name]
        node = producers.get(name)
        if node is None or node.op_type not in _TABLE_KEEPING or not node.input:
            return None
        name = node.input[0]
    return None


def _rows_read(
    node: Any, index_name: str, tables: dict[str, tuple[int, ...]], producers: dict[str, Any]
) -> int | None:
    """The rows of the table `node` reads with `index_name` as its indices, if it is such a read."""
    if node.op_type == "Gather" and node.domain in ("", "ai.onnx") and len(node.input) == 2:
        if node.input[1] != index_name:
            return None
        axis = next((int(a.i) for a in node.attribute if a.name == "axis"), 0)
        shape = _table_shape(node.input[0], tables, producers)
        if shape is None or not -len(shape) <= axis < len(shape):
            return None
        return shape[axis]
    if node.op_type == "EmbedLayerNormalization" and node.domain == "com.microsoft":
        for index_position, table_position in _FUSED_EMBEDDINGS:
            inputs = list(node.input)
            if len(inputs) > table_position and inputs[index_position] == index_name:
                shape = _table_shape(inputs[table_position], tables, producers)
                return shape[0] if shape else None
    return None
