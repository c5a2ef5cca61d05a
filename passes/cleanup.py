"""Final passes: the output node, dead-code removal, detached parameter reads, GraphModule."""
from __future__ import annotations

import operator
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from fxcurv.emit import Emitter, rename_freeing
from fxcurv.passes.per_sample import variance_from_moments, variance_from_moments_
from fxcurv.rules import BY_PRODUCTS, FRESH, INTO_FIRST, PERMUTATION, RANDOM, VIEW, has_trait


def finalize(traced, emit: Emitter, outputs: tuple, quantity_names: list[str],
             schedule: Optional[Callable[[fx.Graph], None]] = None) -> fx.GraphModule:
    """Return ``outputs`` from the graph, drop dead nodes, reorder it by ``schedule`` (before
    the module generates its code, which it does once), and build the step module."""
    graph = traced.graph
    old_output = next(n for n in graph.nodes if n.op == "output")
    graph.erase_node(old_output)
    graph.output(emit.as_node(outputs))
    eliminate_common_subexpressions(graph)
    share_by_products(graph)
    graph.eliminate_dead_code()
    prune_output_masks(graph)
    write_into_temporaries(graph)
    moments_in_place(graph)
    read_shapes_early(graph)
    detach_parameters(graph, traced.params)
    if schedule is not None:
        schedule(graph)
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




def eliminate_common_subexpressions(graph: fx.Graph) -> None:
    """Merge calls with the same op and arguments (random ops excepted): rules that both
    need e.g. the flattened cotangent of a layer then share one node."""
    seen: dict[Any, fx.Node] = {}
    for node in list(graph.nodes):
        if node.op not in ("call_function", "call_method") or is_random(node.target):
            continue
        key = (node.op, node.target, _hashable(node.args), _hashable(node.kwargs))
        try:
            first = seen.setdefault(key, node)
        except TypeError:  # an unhashable constant argument
            continue
        if first is not node:
            _keep_extraction_tag(node, first)
            node.replace_all_uses_with(first)
            graph.erase_node(node)


def _keep_extraction_tag(node: fx.Node, first: fx.Node) -> None:
    """The merged node stays an extraction result (``passes/chunking.py`` reads the tag)."""
    kind = (node.meta.get("fxcurv") or {}).get("extract")
    if kind and "fxcurv" in first.meta:
        first.meta["fxcurv"] = {**first.meta["fxcurv"], "extract": kind}


def share_by_products(graph: fx.Graph) -> None:
    """A helper ``h(y, x, ...)`` that recomputes a by-product of the forward's ``y = f(x, ...)``
    (``BY_PRODUCTS``: a max pool's argmax, a layer norm's statistics): make the forward call
    the joint helper ``(y, by-product) = joint(x, ...)`` once and read both from it."""
    shared: dict[fx.Node, fx.Node] = {}
    for node in list(graph.nodes):
        joint, label = BY_PRODUCTS.get(node.target, (None, "")) if node.op == "call_function" \
            else (None, "")
        if joint is None:
            continue
        forward, x, *rest = node.args
        if forward not in shared:
            name = forward.name
            with graph.inserting_before(forward):
                both = graph.create_node("call_function", joint, (x, *rest),
                                         name=f"{name}_and_{label}")
                values = graph.create_node("call_function", operator.getitem, (both, 0))
                shared[forward] = graph.create_node("call_function", operator.getitem,
                                                    (both, 1), name=f"{name}_{label}")
            both.meta, values.meta = dict(forward.meta), dict(forward.meta)
            forward.replace_all_uses_with(values)
            graph.erase_node(forward)
            values._rename(name)
        node.replace_all_uses_with(shared[forward])
        graph.erase_node(node)


def prune_output_masks(graph: fx.Graph) -> None:
    """A helper call with an ``output_mask`` keyword computes only the outputs it flags: keep
    the flags of the outputs some ``getitem`` reads (e.g. no ``x̄`` for the first layer)."""
    for node in graph.nodes:
        mask = node.kwargs.get("output_mask") if node.op == "call_function" else None
        if not isinstance(mask, (list, tuple)):
            continue
        if not all(user.target is operator.getitem and isinstance(user.args[1], int)
                   for user in node.users):
            continue
        read = {user.args[1] for user in node.users}
        node.kwargs = {**node.kwargs, "output_mask": [i in read for i in range(len(mask))]}


def read_shapes_early(graph: fx.Graph) -> None:
    """Move every ``t.shape`` read to right after ``t`` is computed: a backward rule that needs
    only a forward value's shape (a pool's or a flatten's input) then does not keep the value
    itself alive until the backward pass reaches it."""
    for node in list(graph.nodes):
        if (node.op == "call_function" and node.target is getattr and node.args[1] == "shape"
                and isinstance(node.args[0], fx.Node) and node.args[0].op != "placeholder"):
            node.args[0].append(node)


def write_into_temporaries(graph: fx.Graph) -> None:
    """A call with the ``INTO_FIRST`` trait (``threshold_backward(g, y, 0)``, ReLU's
    ``x̄ = g·[y > 0]``) writes into its first argument ``g`` (its out variant, e.g.
    ``grad_input=g``; elementwise, so exact) when ``g`` is a temporary that nothing else
    reads: no new tensor of ``g``'s size (with a sqrt-GGN factor, ``C`` times the
    activation) is allocated, page-faulted and written. ``g`` must be fresh memory
    (a call with the ``FRESH`` trait, or a piece of one's tuple), possibly through views
    that rearrange it (``VIEW`` and ``PERMUTATION``: no entry twice), each read only by the
    next."""
    owned: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op != "call_function" or node.kwargs or not has_trait(node.target, INTO_FIRST):
            continue
        g = node.args[0]
        if _owned_temporary(g, owned):
            node.kwargs = {out_argument(node.target): g}
            owned.add(node)


def out_argument(op: Any) -> str:
    """The name of the out argument of an ATen op's out variant (``grad_input``)."""
    for overload in op.overloads():
        names = [a.name for a in getattr(op, overload)._schema.arguments if a.is_out]
        if len(names) == 1:
            return names[0]
    raise KeyError(f"{op} has no out variant with one out argument")


def moments_in_place(graph: fx.Graph) -> None:
    """``variance`` from the square sum and the gradient writes into the square sum when
    nothing else reads it (``sum_grad_squared`` not requested too): no new tensor of the
    parameter's size per parameter."""
    for node in graph.nodes:
        if (node.op == "call_function" and node.target is variance_from_moments
                and _owned_temporary(node.args[0], set())):
            node.target = variance_from_moments_


def _owned_temporary(node: Any, owned: set) -> bool:
    """``node`` is read once, and its memory is fresh or a view of such a temporary."""
    if not isinstance(node, fx.Node) or len(node.users) != 1:
        return False
    if node in owned or has_trait(node.target, FRESH):
        return True
    if node.target is operator.getitem:
        source = node.args[0]
        return isinstance(source, fx.Node) and has_trait(source.target, FRESH)
    return has_trait(node.target, VIEW) and has_trait(node.target, PERMUTATION) and \
        _owned_temporary(node.args[0], owned)


def draws_random(graph: fx.Graph) -> bool:
    """Whether the step draws random numbers (Monte-Carlo factors, dropout masks): a random
    op, or a helper function that calls one (``cross_entropy_sqrt_hessian_mc``)."""
    return any(node.op in ("call_function", "call_method") and
               (is_random(node.target) or _calls_random(node.target))
               for node in graph.nodes)


RANDOM_NAMES = frozenset({"bernoulli", "multinomial", "normal", "rand", "randn", "randint",
                          "randperm", "rand_like", "randn_like", "randint_like"})


def _calls_random(target: Any) -> bool:
    code = getattr(target, "__code__", None)
    return code is not None and not RANDOM_NAMES.isdisjoint(code.co_names)


def is_random(target: Any) -> bool:
    """The op draws random numbers (dropout masks, Monte-Carlo samples): it has the
    ``RANDOM`` trait, or is an aten op tagged as seeded."""
    if torch.Tag.nondeterministic_seeded in getattr(target, "tags", ()):
        return True
    return has_trait(target, RANDOM)


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return (type(value).__name__,) + tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, slice):
        return ("slice", value.start, value.stop, value.step)
    return value
