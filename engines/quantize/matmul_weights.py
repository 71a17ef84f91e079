"""What dynamic INT8 and weight-only quantization work on: MatMul/Gemm nodes whose weight is a constant.

Both precisions quantize weights that are initializers read as a MatMul's B (or a Gemm's B, or a
fused Attention's weight); activations stay float until run time. So whether they apply, and
whether they pay, is a property of the graph's weights, read here once for both:

- `matmul_weights(path)`: how many such weights there are and what share of the model's parameters
  they hold (of all of them: what a smaller file is made of; and of the weights compute ops read:
  how much of the arithmetic is in MatMuls rather than convolutions).
- `gemm_as_matmul(model)`: ONNX Runtime's dynamic quantizer has no Gemm form (its IntegerOps
  registry lists MatMul, Attention, Conv, LSTM, Gather) and its MatMulNBits quantizer takes MatMul
  only, while exporters write a Linear on 2-D inputs as Gemm (torch's classic exporter, tf2onnx).
  A Gemm with a constant B becomes MatMul (+ Add of beta·C): the same function, now quantizable.
- `embedding_tables(model)`: which Gathers read a table ONNX Runtime's GatherBlockQuantized can hold
  (weight-only's `embeddings`). Its quantizer takes every Gather over an initializer without looking
  at it: an int64 constant gathered (a position-id buffer an exporter or a simplifier stored as an
  initializer) gets int64 scales and the model no longer loads; a 1-D float constant fails its
  quantize-axis assertion; a table that is also a MatMul's weight gets two different 4-bit forms
  under one name. So the tables are chosen here, and the rest excluded by name.
- `untie_tables(model, tables)`: a table that is also a MatMul's weight (tied embeddings) gets its
  own copy for the MatMul, so that each is quantized in the form its operator reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

#: Ops whose constant weight the dynamic quantizer turns into integer arithmetic.
DYNAMIC_WEIGHT_OPS = frozenset({"MatMul", "Gemm", "Attention"})
#: Ops whose constant weight MatMulNBits can hold (Gemm after gemm_as_matmul).
WEIGHT_ONLY_OPS = frozenset({"MatMul", "Gemm"})
#: Ops that compute with a weight (what "the model's arithmetic" is made of); embedding tables read by
#: Gather are parameters but no arithmetic.
COMPUTE_OPS = frozenset({"MatMul", "Gemm", "Attention", "Conv", "ConvTranspose", "LSTM", "GRU", "RNN"})


@dataclass(frozen=True)
class MatMulWeights:
    """The constant MatMul/Gemm (and fused Attention) weights of a model."""

    nodes: int  # MatMul/Gemm/Attention nodes reading a constant weight of rank 2 or more
    weight_only_nodes: int  # of them, the MatMul/Gemm ones (what MatMulNBits can take)
    matmul_params: int  # elements of those weights
    weight_only_params: int
    total_params: int  # elements of every float initializer of rank 2 or more
    compute_params: int  # of those, the ones read by compute ops (COMPUTE_OPS)

    @property
    def share_of_parameters(self) -> float:
        """The MatMul/Gemm weights' share of all the model's weights: what weight-only shrinks."""
        return self.weight_only_params / self.total_params if self.total_params else 0.0

    @property
    def share_of_compute(self) -> float:
        """The MatMul/Gemm/Attention weights' share of the weights compute ops read: how much of the
        arithmetic dynamic INT8 reaches (embedding tables are not arithmetic)."""
        return self.matmul_params / self.compute_params if self.compute_params else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "matmul_nodes": self.nodes,
            "matmul_weight_params": self.matmul_params,
            "total_weight_params": self.total_params,
            "share_of_parameters": round(self.share_of_parameters, 4),
            "share_of_compute": round(self.share_of_compute, 4),
        }


_FLOATS = frozenset({1, 10, 11, 16})  # FLOAT, FLOAT16, DOUBLE, BFLOAT16


def _weight_input(node: Any) -> str | None:
    """The input that holds the node's weight: B of MatMul/Gemm, the weight of a fused Attention."""
    return node.input[1] if len(node.input) > 1 else None


@lru_cache(maxsize=16)
def _summary(path: Path, _mtime_ns: int) -> MatMulWeights:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    sizes = {
        tensor.name: int(np.prod(tensor.dims))
        for tensor in graph.initializer
        if len(tensor.dims) >= 2 and tensor.data_type in _FLOATS
    }
    matmul: set[str] = set()
    weight_only: set[str] = set()
    nodes = weight_only_nodes = 0
    compute: set[str] = set()
    for node in graph.node:
        if node.op_type in COMPUTE_OPS:
            compute.update(name for name in node.input if name in sizes)
        if node.op_type not in DYNAMIC_WEIGHT_OPS:
            continue
        weight = _weight_input(node)
        if weight is None or weight not in sizes:
            continue
        nodes += 1
        matmul.add(weight)
        if node.op_type in WEIGHT_ONLY_OPS:
            weight_only_nodes += 1
            weight_only.add(weight)
    return MatMulWeights(
        nodes=nodes,
        weight_only_nodes=weight_only_nodes,
        matmul_params=sum(sizes[name] for name in matmul),
        weight_only_params=sum(sizes[name] for name in weight_only),
        total_params=sum(sizes.values()),
        compute_params=sum(sizes[name] for name in compute),
    )


def matmul_weights(path: Path) -> MatMulWeights:
    """The model's constant MatMul/Gemm/Attention weights (parsed once per version of the file;
    external data is not read: the sizes come from the initializers' dims)."""
    return _summary(path, path.stat().st_mtime_ns)


def gemm_as_matmul(model: Any) -> int:
    """Rewrite each Gemm with a constant B (and no transposed A) as MatMul, plus Add of beta·C when
    it has a C: alpha and transB are folded into the new weight. Returns how many were rewritten.

    Gemm computes alpha·A'·B' + beta·C with A 2-D, which is MatMul(A, alpha·B') + beta·C exactly
    (C broadcasts to the [M, N] product in both). A Gemm with transA or a B computed at run time
    is left alone: neither quantizer would quantize it anyway."""
    from onnx import helper, numpy_helper

    graph = model.graph
    constants = {tensor.name: tensor for tensor in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    rewritten: list[Any] = []
    replaced: set[str] = set()
    count = 0
    for node in graph.node:
        attributes = {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}
        weight = constants.get(node.input[1]) if node.op_type == "Gemm" and len(node.input) > 1 else None
        if weight is None or attributes.get("transA", 0) or len(weight.dims) != 2:
            rewritten.append(node)
            continue
        array = numpy_helper.to_array(weight)
        if attributes.get("transB", 0):
            array = array.T
        alpha, beta = float(attributes.get("alpha", 1.0)), float(attributes.get("beta", 1.0))
        if alpha != 1.0:
            array = array * np.asarray(alpha, dtype=array.dtype)
        name = node.name or f"Gemm_{count}"
        if readers.get(weight.name, 0) == 1 and not attributes.get("transB", 0) and alpha == 1.0:
            weight_name = weight.name  # used by this Gemm alone, unchanged: kept as it is
        else:
            weight_name = f"{weight.name}_as_matmul_{count}"
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), weight_name))
            replaced.add(weight.name)
        has_bias = len(node.input) > 2 and node.input[2] != ""
        product = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        rewritten.append(helper.make_node("MatMul", [node.input[0], weight_name], [product], name=name))
        if has_bias:
            bias = node.input[2]
            if beta != 1.0:
                source = constants.get(bias)
                if source is None:  # a computed C: scale it at run time
                    scale = f"{name}_beta"
                    graph.initializer.append(numpy_helper.from_array(np.asarray(beta, np.float32), scale))
                    rewritten.append(
                        helper.make_node("Mul", [bias, scale], [f"{scale}_c"], name=f"{scale}_mul")
                    )
                    bias = f"{scale}_c"
                else:
                    values = numpy_helper.to_array(source)
                    bias = f"{source.name}_beta_{count}"
                    graph.initializer.append(
                        numpy_helper.from_array((values * np.asarray(beta, values.dtype)), bias)
                    )
                    replaced.add(source.name)
            rewritten.append(helper.make_node("Add", [product, bias], [node.output[0]], name=f"{name}_bias"))
        count += 1
    if count:
        del graph.node[:]
        graph.node.extend(rewritten)
        used = referenced_names(graph)
        for tensor in [tensor for tensor in graph.initializer if tensor.name in replaced - used]:
            graph.initializer.remove(tensor)
    return count


def referenced_names(graph: Any) -> set[str]:
    """Every tensor name a node reads, in this graph and its subgraphs (If/Loop/Scan bodies read
    outer-scope initializers), and the graph's outputs."""
    names = {output.name for output in graph.output}
    for node in graph.node:
        names.update(node.input)
        for attribute in node.attribute:
            for subgraph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                names |= referenced_names(subgraph)
    return names


def name_nodes(model: Any) -> None:
    """Give every node a unique name: exclusions and ONNX Runtime's weight-only quantizers refer to
    nodes by name (its GPTQ sorts the graph by node name and fails when two share one)."""
    used: set[str] = set()
    for index, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{index}"
        while name in used:
            name += "_"
        node.name = name
        used.add(name)


#: Table types ONNX Runtime's CPU GatherBlockQuantized has kernels for (its scales take the table's
#: type): float and float16. A bfloat16 table quantizes, and the model then does not load (1.32).
_TABLE_TYPES = frozenset({1, 10})


@dataclass(frozen=True)
class EmbeddingTables:
    """The Gathers of a graph's top level that read a constant, sorted by whether their table can be
    stored in 4 bits (a float initializer of rank 2, gathered along its rows: token embeddings)."""

    #: Gather nodes whose tables GatherBlockQuantized can hold, and those tables.
    gathers: tuple[str, ...]
    tables: tuple[str, ...]
    #: Gather nodes over other constants (integers, bfloat16, 1-D, along another axis): left alone.
    others: tuple[str, ...]
    #: table -> the MatMul nodes that also read it as their weight (tied embeddings).
    tied: dict[str, tuple[str, ...]]


def embedding_tables(model: Any) -> EmbeddingTables:
    """The model's embedding tables as ONNX Runtime's Gather quantizer would meet them (this module's
    docstring). Node names must be unique and set (name_nodes)."""
    from onnx import helper

    graph = model.graph
    constants = {tensor.name: tensor for tensor in graph.initializer}
    gathers, tables, others = [], [], []
    for node in graph.node:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or node.input[0] not in constants:
            continue
        table = constants[node.input[0]]
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        if len(table.dims) == 2 and table.data_type in _TABLE_TYPES and axis in (0, -2):
            gathers.append(node.name)
            if table.name not in tables:
                tables.append(table.name)
        else:
            others.append(node.name)
    tied: dict[str, list[str]] = {}
    for node in graph.node:
        if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in tables:
            tied.setdefault(node.input[1], []).append(node.name)
    return EmbeddingTables(
        tuple(gathers), tuple(tables), tuple(others), {name: tuple(nodes) for name, nodes in tied.items()}
    )


def untie_tables(model: Any, tied: dict[str, tuple[str, ...]]) -> list[str]:
    """Give the MatMuls that share an embedding table (`embedding_tables(model).tied`) a copy of their
    own, so that the Gather's table and the MatMul's weight are quantized each in its operator's form.
    Returns the copies' names."""
    graph = model.graph
    constants = {tensor.name: tensor for tensor in graph.initializer}
    used = {tensor.name for tensor in graph.initializer} | referenced_names(graph)
    copies: dict[str, str] = {}
    for table in tied:
        name = f"{table}_matmul"
        while name in used:
            name += "_"
        twin = type(constants[table])()
        twin.CopyFrom(constants[table])
        twin.name = name
        graph.initializer.append(twin)
        copies[table] = name
        used.add(name)
    readers = {node for nodes in tied.values() for node in nodes}
    for node in graph.node:
        if node.name in readers:
            node.input[1] = copies[node.input[1]]
    return list(copies.values())
