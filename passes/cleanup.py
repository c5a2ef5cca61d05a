"""Final passes: the output node, dead-code removal, detached parameter reads, GraphModule."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from fxcurv.emit import Emitter, rename_freeing


def finalize(traced, emit: Emitter, outputs: tuple, quantity_names: list[str]) -> fx.GraphModule:
    """Return ``outputs`` from the graph, drop dead nodes, and build the step module."""
    graph = traced.graph
    old_output = next(n for n in graph.nodes if n.op == "output")
    graph.erase_node(old_output)
    graph.output(emit.as_node(outputs))
    eliminate_common_subexpressions(graph)
    graph.eliminate_dead_code()
    detach_parameters(graph, traced.params)
    graph.lint()
    step = fx.GraphModule(traced.attrs, graph, class_name="FxcurvStep")
    step.meta["fxcurv"] = {"quantities": list(quantity_names),
                           "parameters": list(traced.params)}
    return step


def detach_parameters(graph: fx.Graph, params: dict[str, fx.Node]) -> None:
    """Read each parameter as ``p.detach()``: the step computes derivatives itself, so autograd
    must not record (and keep alive) the whole generated computation."""
    for node in params.values():
        if not node.users:
            continue
        with graph.inserting_after(node):
            detached = graph.call_method("detach", (node,))
        node.replace_all_uses_with(detached, delete_user_cb=lambda user: user is not detached)
        rename_freeing(detached, node, node.name)




RANDOM_OPS = {torch.bernoulli, "bernoulli", "bernoulli_", torch.rand_like, torch.randn_like,
              torch.randint_like, torch.multinomial, torch.normal, torch.rand, torch.randn,
              torch.randint, torch.randperm}


def eliminate_common_subexpressions(graph: fx.Graph) -> None:
    """Merge calls with the same op and arguments (random ops excepted): rules that both
    need e.g. the flattened cotangent of a layer then share one node."""
    seen: dict[Any, fx.Node] = {}
    for node in list(graph.nodes):
        if node.op not in ("call_function", "call_method") or _is_random(node.target):
            continue
        key = (node.op, node.target, _hashable(node.args), _hashable(node.kwargs))
        try:
            first = seen.setdefault(key, node)
        except TypeError:  # an unhashable constant argument
            continue
        if first is not node:
            node.replace_all_uses_with(first)
            graph.erase_node(node)


def _is_random(target: Any) -> bool:
    try:
        return target in RANDOM_OPS
    except TypeError:
        return False


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return (type(value).__name__,) + tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, slice):
        return ("slice", value.start, value.stop, value.step)
    return value
