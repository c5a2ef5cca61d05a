"""Scheduling: each extraction runs as soon as the propagation value it reads is ready.

The passes emit a whole propagation first (every layer's factor ``[C, N, ...]``, cotangent or
MC samples ``[M, N, ...]``) and the per-parameter extractions after it (per-sample terms
``[*lead, N, *p]``, their squares and sums, Kronecker factors). A GraphModule frees a value
after its last use, so in that order every layer's factor stays alive until the end. This pass
moves every extraction node (``meta["fxcurv"]["pass_"] == "per_sample"``) right after the last
propagation node it reads, so a layer's factor dies once the layer below has its factor and
the layer's quantities are extracted. Extraction nodes that read forward values only (a
convolution's input patches, ``x²``) move with their first consumer instead of up to the
forward pass, where they would stay alive through the whole propagation. Quantities as big as
a propagation (``[*lead, N, *p]``: ``batch_grad``, ``sqrt_ggn_*``, ``*_batch``) stay at the end
with what only they read: hoisted, they would be alive through the rest of the propagation.
"""
from __future__ import annotations

from typing import Sequence

import torch.fx as fx

from .analysis import descendants


def schedule_extractions(graph: fx.Graph, model_output: fx.Node,
                         in_place: Sequence[bool] = ()) -> None:
    """Move extraction nodes next to their inputs (see the module docstring); ``model_output``:
    the node every propagation depends on (the loss's derivatives are taken there);
    ``in_place[i]``: the ``i``-th quantity of the output ``(loss, grad, *quantities)`` stays."""
    nodes = list(graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    staying = _staying(nodes, in_place)
    moving = {node: None for node in nodes if _is_extraction(node) and node not in staying}
    anchor = _anchors(nodes, moving, position, descendants(graph, model_output))
    groups: dict[int, list[fx.Node]] = {}
    for node in moving:
        groups.setdefault(anchor[node], []).append(node)
    for i, node in enumerate(nodes):
        cursor = node
        for moved in groups.get(i, []) if node not in moving else []:
            cursor.append(moved)
            cursor = moved
    graph.lint()


def _anchors(nodes: list[fx.Node], moving: dict, position: dict,
             propagated: set[fx.Node]) -> dict[fx.Node, int]:
    """For each moving node, the position of the node it goes right after: the last input
    that does not move (through moving inputs); for forward-only ones (not ``propagated``)
    the latest such place before their first consumer."""
    first = max([i for i, node in enumerate(nodes) if node.op == "placeholder"], default=0)
    anchor: dict[fx.Node, int] = {}
    for node in moving:  # graph order: inputs first
        anchor[node] = max([anchor[a] if a in moving else position[a]
                            for a in node.all_input_nodes], default=first)
    for node in reversed(list(moving)):  # consumers first
        if node not in propagated:
            anchor[node] = min((anchor[user] if user in moving else
                                _before(user, moving, position) for user in node.users),
                               default=anchor[node])
    return anchor


def _staying(nodes: list[fx.Node], in_place: Sequence[bool]) -> set[fx.Node]:
    """The values of the quantities flagged in ``in_place`` and what only they read (besides
    the gradient: a weight's gradient summed from its ``batch_grad`` stays with it)."""
    results = nodes[-1].args[0][2:]
    staying = {value for flag, result in zip(in_place, results) if flag
               for value in result.values() if isinstance(value, fx.Node)}
    grads = nodes[-1].args[0][1]
    grads = {value for value in grads.values() if isinstance(value, fx.Node)} \
        if isinstance(grads, dict) else set()
    for node in reversed(nodes):
        if _is_extraction(node) and any(u in staying for u in node.users) and \
                all(u in staying or u in grads for u in node.users):
            staying.add(node)
    return staying | {value for value in grads if _is_extraction(value) and
                      all(a in staying for a in value.all_input_nodes)}


def _before(node: fx.Node, moving: dict, position: dict) -> int:
    """The position of the last node before ``node`` that does not move."""
    previous = node.prev
    while previous in moving:
        previous = previous.prev
    return position[previous]


def _is_extraction(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and \
        node.meta.get("fxcurv", {}).get("pass_") == "per_sample"
