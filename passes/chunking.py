"""The exact GGN factor in chunks of columns: bounded memory for many classes.

The exact square-root factor ``S`` ``[C, N, *node]`` (one column per class) is propagated to
every layer; with ``C = 100`` classes on a convolutional network, one layer's factor alone is
100 activations' worth. Everything computed from ``S`` up to the extractions is linear in its
columns (each column is propagated on its own) and every extraction is either a sum over the
columns of a per-column quadratic form (``diag_ggn_exact``, ``diag_ggn_exact_batch``,
``kflr``'s ``G``, ``ggnmp``, the GGN part of ``diag_h``) or keeps the column axis
(``sqrt_ggn_exact``). So the propagation runs column chunk by column chunk: sums add up,
column-shaped results are concatenated.

This pass moves that region (the descendants of ``S`` up to the extraction results, which
``PerSample`` tags ``meta["fxcurv"]["extract"]``) into a ``body`` GraphModule
``(chunk, tensors, shapes, ints) -> outputs`` and calls it through :class:`ColumnChunks`, which picks the
chunk size at run time (``column_chunk`` columns, or the most that fit ``column_budget``
bytes). ``step.sqrt_ggn_exact_chunks.body.code`` shows the propagation. A region that does
not have this shape is left as it is (unchunked).
"""
from __future__ import annotations

import heapq
import inspect
import operator
import typing
from typing import List, Optional

import torch
import torch.fx as fx
import torch.nn as nn
from torch import Tensor

from fxcurv.rules.shape import NO_DERIVATIVE_ATTRIBUTES

# bytes of propagated factor per column, per byte of the biggest activation (factor, the
# product of an op's Jacobian with it, its square in the extraction, the next factor)
LIVE_COPIES = 4


class ColumnChunks(nn.Module):
    """Runs ``body`` on chunks of the leading (column) axis of ``factor`` and combines the
    outputs: ``cat[i]``: concatenated along axis 0, else summed."""

    def __init__(self, body: fx.GraphModule, cat: List[bool], chunk: int, budget: int):
        super().__init__()
        self.body = body
        self.cat = cat
        self.chunk = chunk
        self.budget = budget
        self.copies = LIVE_COPIES

    def forward(self, factor: Tensor, tensors: List[Tensor], shapes: List[List[int]],
                ints: List[int]) -> List[Tensor]:
        columns = factor.size(0)
        chunk = self.chunk_size(factor, tensors, shapes)
        if chunk >= columns:
            return self.body(factor, tensors, shapes, ints)
        results: List[Tensor] = []
        pieces: List[List[Tensor]] = []
        for start in range(0, columns, chunk):
            part = factor.narrow(0, start, min(chunk, columns - start))
            outputs = self.body(part, tensors, shapes, ints)
            if start == 0:
                results = outputs
                pieces = [[value] for value in outputs]
            else:
                for i in range(len(outputs)):
                    if self.cat[i]:
                        pieces[i].append(outputs[i])
                    else:
                        results[i] = results[i] + outputs[i]
        for i in range(len(results)):
            if self.cat[i]:
                results[i] = torch.cat(pieces[i], 0)
        return results

    def chunk_size(self, factor: Tensor, tensors: List[Tensor], shapes: List[List[int]]) -> int:
        """``self.chunk`` if set (> 0); else the columns whose propagation fits the budget:
        ``copies`` copies of the biggest sample-carrying value (``[N, ...]``, from the inputs
        and shapes) per column. Under ``torch.compile`` / ``torch.export`` (sizes may be
        symbolic): all columns."""
        if self.chunk > 0:
            return self.chunk
        if not torch.jit.is_scripting():
            if _tracing():
                return factor.size(0)
        samples = factor.size(1) if factor.dim() > 1 else 1
        largest = 1
        for value in tensors:
            if value.dim() > 0 and value.size(0) == samples:
                largest = max(largest, value.numel())
        for shape in shapes:
            if len(shape) > 0 and shape[0] == samples:
                size = 1
                for extent in shape:
                    size *= extent
                largest = max(largest, size)
        per_column = self.copies * largest * factor.element_size()
        return max(1, self.budget // per_column)


@torch.jit.unused
def _tracing() -> bool:
    return torch.compiler.is_compiling()


def chunk_columns(step: fx.GraphModule, chunk: int, budget: int) -> None:
    """Route the propagation of each tagged column factor through :class:`ColumnChunks`."""
    for factor in [n for n in step.graph.nodes if _meta(n).get("columns")]:
        region = _region(factor)
        if region is None:
            continue
        _outline(step, factor, region, chunk, budget)
    step.graph.lint()
    step.recompile()


def _meta(node: fx.Node) -> dict:
    return node.meta.get("fxcurv") or {}


def _region(factor: fx.Node) -> Optional[dict]:
    """The nodes computed from ``factor`` up to (and with) the tagged extraction results, in
    graph order; ``None`` if a value leaves the region untagged or a tag is read inside."""
    region = {factor: None}
    for node in factor.graph.nodes:
        if node is factor or node.op in ("output", "placeholder"):
            continue
        reads = [arg for arg in node.all_input_nodes if arg in region]
        tagged = [arg for arg in reads if _meta(arg).get("extract") and arg is not factor]
        if len(tagged) == len(reads):
            continue  # outside: reads only combined results (or nothing of the region)
        if tagged:
            return None  # a partial and a per-chunk value together: not chunk-wise
        region[node] = None
    for node in region:
        leaves = any(user not in region for user in node.users)
        if node is not factor and leaves and not _meta(node).get("extract"):
            return None
    return region


def _outline(step: fx.GraphModule, factor: fx.Node, region: dict, chunk: int,
             budget: int) -> None:
    """Build the body, call it where the region was, and drop the region's nodes."""
    graph = step.graph
    try:
        body, inputs, outputs = _body(step, factor, region)
    except _NotChunkable:
        return
    name = f"{factor.name.replace('loss_sqrt_hessian', 'sqrt_ggn')}_chunks"
    cat = [_meta(node)["extract"] == "batch" for node in outputs]
    step.add_submodule(name, ColumnChunks(body, cat, chunk, budget))
    with graph.inserting_before(next(iter(n for n in graph.nodes if n.op == "output"))):
        call = graph.call_module(name, (factor, *[list(values) for values in inputs.values()]))
        values = []
        for i, node in enumerate(outputs):
            value = graph.call_function(operator.getitem, (call, i))
            values.append(value)
    for node, value in zip(outputs, values):
        node.replace_all_uses_with(value)
    names = [node.name for node in outputs]
    for node in reversed(list(region)):
        if node is not factor:
            graph.erase_node(node)
    for name, value in zip(names, values):
        graph._graph_namespace._used_names.discard(name)  # retired names stay reserved
        value._rename(name)
    call._rename(name)
    _stable_topological_order(graph)


def _body(step: fx.GraphModule, factor: fx.Node, region: dict):
    """``(body GraphModule, inputs, outputs)``: the region's nodes copied into a graph
    ``(chunk, tensors, shapes, ints) -> [outputs]``; ``inputs`` the outside values it reads,
    by kind (a size read from outside is passed as a size, not with its tensor, which can then
    die early; arithmetic on sizes is recomputed inside)."""
    graph = fx.Graph()
    chunk = graph.placeholder(factor.name, type_expr=Tensor)
    lists = {kind: graph.placeholder(kind, type_expr=kind_type)
             for kind, kind_type in (("tensors", List[Tensor]), ("shapes", List[List[int]]),
                                     ("ints", List[int]))}
    env: dict[fx.Node, fx.Node] = {factor: chunk}
    inputs: dict[str, list[fx.Node]] = {kind: [] for kind in lists}

    def bring(node: fx.Node) -> fx.Node:
        if node not in env:
            kind = _size_kind(node)
            if kind == "arithmetic":
                env[node] = graph.node_copy(node, bring)
                return env[node]
            if kind == "unknown":
                raise _NotChunkable(node.name)
            kind = kind or "tensors"
            inputs[kind].append(node)
            env[node] = graph.call_function(operator.getitem,
                                            (lists[kind], len(inputs[kind]) - 1))
            env[node]._rename(node.name)
        return env[node]

    outputs = []
    for node in region:
        if node is factor:
            continue
        env[node] = graph.node_copy(node, bring)
        if _meta(node).get("extract"):
            outputs.append(node)
    graph.output([env[node] for node in outputs], type_expr=List[Tensor])
    graph.lint()
    return fx.GraphModule(step, graph, class_name="ColumnChunkBody"), inputs, outputs


class _NotChunkable(Exception):
    """A value the body would read whose type is not known (the region stays inline)."""


def _size_kind(node: fx.Node) -> Optional[str]:
    """``"shapes"`` (``t.shape``, ``t.size()``), ``"ints"`` (``t.size(0)``, ``t.dim()``),
    ``"arithmetic"`` (on sizes only: recomputed in the body) or ``None`` (a tensor)."""
    if node.op == "call_function" and node.target is getattr and node.args[1] == "shape":
        return "shapes"
    if node.op == "call_method" and node.target == "size":
        return "ints" if len(node.args) > 1 or "dim" in node.kwargs else "shapes"
    if node.op == "call_method" and node.target in ("dim", "numel"):
        return "ints"
    if node.op == "call_function" and node.target is getattr and \
            node.args[1] in NO_DERIVATIVE_ATTRIBUTES and node.args[1] not in ("data", "grad_fn"):
        return "arithmetic"  # metadata (``h.ndim``, ``h.dtype``): read inside from its tensor
    if node.op in ("call_function", "call_method") and node.all_input_nodes and \
            all(_size_kind(arg) in ("shapes", "ints", "arithmetic")
                for arg in node.all_input_nodes):
        return "arithmetic"  # a function of sizes only (``d ** -0.5``): recomputed inside
    if node.op == "call_function" and inspect.isfunction(node.target):
        return _returns(node.target)  # a helper: its annotation says
    if node.op == "call_method" and node.target in ("item", "tolist"):
        return "unknown"
    return None


def _returns(fn) -> Optional[str]:
    """A helper's result kind from its return annotation (``"unknown"`` if not a size or a
    tensor: the region is not chunked then)."""
    try:
        result = typing.get_type_hints(fn).get("return")
    except Exception:  # noqa: BLE001 (unresolvable annotations)
        return "unknown"
    return {Tensor: None, int: "ints", List[int]: "shapes"}.get(result, "unknown")


def _stable_topological_order(graph: fx.Graph) -> None:
    """Reorder ``graph`` so every node follows its inputs, otherwise keeping its order."""
    nodes = list(graph.nodes)
    index = {node: i for i, node in enumerate(nodes)}
    waiting = {node: len(set(node.all_input_nodes)) for node in nodes}
    ready = [index[node] for node in nodes if waiting[node] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        node = nodes[heapq.heappop(ready)]
        order.append(node)
        for user in node.users:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, index[user])
    cursor = order[0]
    for node in order[1:]:
        cursor.append(node)
        cursor = node
