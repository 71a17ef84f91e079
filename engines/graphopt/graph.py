"""Reading an ONNX graph the way the detector needs: who produces and who consumes a tensor, and the
value of a small constant (a Reshape's target shape, a scale) wherever the exporter put it (an
initializer, a Constant node, a Concat of constants and dynamic dims).

Weights are never converted to arrays here: only tensors of at most SMALL_CONSTANT elements are,
so reading a graph of a large model costs its node list, not its weights.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # onnx is imported where a graph is read, not when the API starts
    from onnx import GraphProto, NodeProto, TensorProto

#: Constants up to this many elements are read as values (shapes, scales, masks of a test graph).
SMALL_CONSTANT = 4096
#: A tensor whose value comes from elsewhere (a graph input, a computed dim) within a shape.
UNKNOWN = None


class GraphIndex:
    """Producers, consumers, initializers and graph inputs of one graph (its top level)."""

    def __init__(self, graph: GraphProto):
        self.graph = graph
        self.nodes = list(graph.node)
        self.producer: dict[str, NodeProto] = {}
        self.consumers: dict[str, list[NodeProto]] = defaultdict(list)
        for node in self.nodes:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self.initializers: dict[str, TensorProto] = {tensor.name: tensor for tensor in graph.initializer}
        self.inputs = [value for value in graph.input if value.name not in self.initializers]

    # ------------------------------------------------------------ constants

    def is_constant(self, name: str) -> bool:
        """An initializer or a Constant node's output (a weight, a bias, a scale)."""
        if name in self.initializers:
            return True
        node = self.producer.get(name)
        return node is not None and node.op_type == "Constant"

    def dims(self, name: str) -> tuple[int, ...] | None:
        """The shape of a constant tensor, without reading its values."""
        if name in self.initializers:
            return tuple(self.initializers[name].dims)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    return tuple(attribute.t.dims)
        return None

    def value(self, name: str, limit: int = SMALL_CONSTANT) -> np.ndarray | None:
        """The value of a constant of at most `limit` elements (through Identity and Cast), or None."""
        from onnx import TensorProto, numpy_helper

        if name in self.initializers:
            tensor = self.initializers[name]
            if math.prod(tensor.dims) > limit or tensor.data_location == TensorProto.EXTERNAL:
                return None
            return numpy_helper.to_array(tensor)
        node = self.producer.get(name)
        if node is None:
            return None
        if node.op_type == "Constant":
            return _constant_node_value(node, limit)
        if node.op_type in ("Identity", "Cast") and node.input:
            return self.value(node.input[0], limit)
        return None

    def shape_values(self, name: str) -> list[int | None] | None:
        """The entries of a shape tensor (a Reshape's second input): ints where they are constant,
        None where computed at run time (a batch or sequence dim read with Shape); None when even its
        length is unknown."""
        constant = self.value(name)
        if constant is not None:
            return [int(item) for item in np.asarray(constant).reshape(-1)]
        node = self.producer.get(name)
        if node is None:
            return None
        if node.op_type == "Concat":
            entries: list[int | None] = []
            for part in node.input:
                values = self.shape_values(part)
                if values is None:
                    return None
                entries += values
            return entries
        if node.op_type == "Unsqueeze":  # a scalar dim made a one-element list
            inner = self.value(node.input[0])
            return [int(inner)] if inner is not None and np.asarray(inner).size == 1 else [UNKNOWN]
        if node.op_type in ("Cast", "Identity"):
            return self.shape_values(node.input[0])
        return None

    # ------------------------------------------------------------ walking

    def activation_inputs(self, node: NodeProto) -> list[str]:
        """The inputs of a node that are computed, not constants."""
        return [name for name in node.input if name and not self.is_constant(name)]

    def walk_up(
        self, name: str, through: Iterable[str], until: Iterable[str], max_hops: int = 8
    ) -> tuple[NodeProto | None, list[NodeProto]]:
        """Follow `name` up through nodes of the `through` types (along their computed inputs, the
        first that leads anywhere) to the first node of an `until` type: (that node, the nodes passed)."""
        through, until = set(through), set(until)
        passed: list[NodeProto] = []
        frontier = [name]
        for _ in range(max_hops):
            following: list[str] = []
            for tensor in frontier:
                node = self.producer.get(tensor)
                if node is None:
                    continue
                if node.op_type in until:
                    return node, passed
                if node.op_type in through:
                    passed.append(node)
                    following += self.activation_inputs(node)
            if not following:
                return None, passed
            frontier = following
        return None, passed

    def ancestors(self, names: Iterable[str], stop: Iterable[str], limit: int = 256) -> list[NodeProto]:
        """The nodes that compute `names`, breadth first, not going above nodes of the `stop` types
        (which are listed, their inputs not followed), at most `limit` of them: what a mask is made of."""
        stop = set(stop)
        found: list[NodeProto] = []
        seen: set[int] = set()
        frontier = list(names)
        while frontier and len(found) < limit:
            following: list[str] = []
            for tensor in frontier:
                node = self.producer.get(tensor)
                if node is None or id(node) in seen:
                    continue
                seen.add(id(node))
                found.append(node)
                if node.op_type not in stop:
                    following += [name for name in node.input if name]
            frontier = following
        return found[:limit]

    def walk_down(
        self, name: str, through: Iterable[str], until: Iterable[str], max_hops: int = 4
    ) -> NodeProto | None:
        """The first consumer of an `until` type, passing only through nodes of the `through` types."""
        through, until = set(through), set(until)
        frontier = [name]
        for _ in range(max_hops):
            following: list[str] = []
            for tensor in frontier:
                for node in self.consumers.get(tensor, []):
                    if node.op_type in until:
                        return node
                    if node.op_type in through:
                        following += list(node.output)
            if not following:
                return None
            frontier = following
        return None

    def count(self, op_type: str, domain: str | None = None) -> int:
        return sum(
            node.op_type == op_type and (domain is None or (node.domain or "") == domain)
            for node in self.nodes
        )


def _constant_node_value(node: NodeProto, limit: int = SMALL_CONSTANT) -> np.ndarray | None:
    from onnx import helper, numpy_helper

    for attribute in node.attribute:
        if attribute.name == "value":
            if math.prod(attribute.t.dims) > limit:
                return None
            return numpy_helper.to_array(attribute.t)
        if attribute.name in ("value_int", "value_ints", "value_float", "value_floats"):
            return np.asarray(helper.get_attribute_value(attribute))
    return None
