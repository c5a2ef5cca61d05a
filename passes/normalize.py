"""Normalisation: one canonical, functional spelling of every op before differentiation.

* a named field of a multi-result op (``torch.max(x, 1).values``, ``x.topk(k).indices``)
  becomes the position it names (``[0]``, ``[1]``), so it is that result, not an attribute;
* in-place ops (``x += y``, ``x.relu_()``, ``F.relu(x, inplace=True)``) become out-of-place,
  and later readers of the overwritten value read the new node instead; those that another
  alias of the value would see (views, ``passes/aliasing.py``) are refused;
* ops without a rule are expanded (``passes/expand.py``: opaque helpers inlined, PyTorch's
  decompositions, ``x[index]`` as ``index_select``);
* ops with a decomposition or an exact rewrite in the rule table (``rule.lower``) are
  replaced by it: dropout -> mask multiply (the backward reuses the forward's mask); moves of
  the sample axis that cancel (``transpose``/``permute``/``getitem`` of a ``stack``,
  ``unsqueeze``, ``transpose``, ``permute``: a sequence model's ``[T, N, F]`` layout or its
  stacked final states ``[L, N, H]`` picked by layer then keep the samples apart);
  ``nll_loss(log_softmax(z, dim=1), y)`` -> ``cross_entropy(z, y)`` (so the GGN of
  ``LogSoftmax`` + ``NLLLoss`` is that of the logits, not zero); a rule returning None keeps
  the call;
* losses whose rule checks its target at call time (``rule.check_target``) get that check.

:func:`pool_before_relu` (run by ``compile`` unless KFRA is requested) then swaps
``max_pool(relu(z))`` to ``relu(max_pool(z))`` (any monotone elementwise op for relu).
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

from fxcurv.emit import Emitter
from fxcurv.rules import MONOTONE, WINDOW_MAX, Ctx, rule_for

from .aliasing import check_in_place, in_place_twin
from .expand import expand


def normalize(graph: fx.Graph) -> fx.Graph:
    """Apply the normalisations above in graph order (``quantity`` is named in errors)."""
    for node in list(graph.nodes):
        _field_to_position(node)
    check_in_place(graph)
    for node in list(graph.nodes):
        if _make_out_of_place(node):
            _read_new_value(graph, node)
    expand(graph)
    for node in list(graph.nodes):
        rule = rule_for(node)
        if rule is not None and rule.lower is not None and _lower(graph, node, rule):
            continue
        if rule is not None and rule.loss is not None and rule.loss.check_target is not None:
            _check_target(graph, node, rule)
    graph.lint()
    return graph


def result_fields(node: fx.Node) -> Optional[dict]:
    """``{field name: position}`` of the named tuple ``node`` returns (``torch.max`` with a
    ``dim``: values, indices; ``torch.linalg.slogdet``: sign, logabsdet), or None."""
    if node.op not in ("call_function", "call_method"):
        return None
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    kind = getattr(torch.return_types, name, None)
    if not isinstance(kind, type) or not hasattr(kind, "n_fields"):
        return None
    return _fields_of(kind, kind(tuple(range(kind.n_fields))))


def _fields_of(kind: type, positions: tuple) -> dict:
    """Field name -> position of a ``torch.return_types`` struct sequence."""
    return {field: getattr(positions, field) for field in dir(kind)
            if not field.startswith("_") and field not in dir(tuple)
            and not field.startswith("n_") and isinstance(getattr(positions, field), int)}


def _field_to_position(node: fx.Node) -> None:
    """``getattr(result, "values")`` -> ``result[0]`` for a named field of a multi-result op."""
    if node.op != "call_function" or node.target is not getattr:
        return
    source, name = node.args[0], node.args[1]
    fields = result_fields(source) if isinstance(source, fx.Node) else None
    if fields and name in fields:
        node.target, node.args = operator.getitem, (source, fields[name])


def _erase_unused(graph: fx.Graph, node: fx.Node) -> None:
    """Remove ``node`` and, recursively, inputs it alone used (no other effects)."""
    if node.users or node.op not in ("call_function", "call_method"):
        return
    inputs = list(node.all_input_nodes)
    graph.erase_node(node)
    for value in inputs:
        _erase_unused(graph, value)


def _make_out_of_place(node: fx.Node) -> bool:
    """Rewrite an in-place node to its out-of-place op; True if it was in-place. Which
    in-place ops this reproduces exactly is checked before (``passes/aliasing.py``)."""
    twin = in_place_twin(node)
    if twin is None:
        return False
    node.target, node.args, node.kwargs = twin
    return True


def _read_new_value(graph: fx.Graph, node: fx.Node) -> None:
    """After ``node`` overwrote its first argument, later users read ``node`` instead."""
    mutated = node.args[0] if node.args else None
    if not isinstance(mutated, fx.Node):
        return
    order = {n: i for i, n in enumerate(graph.nodes)}
    for user in list(mutated.users):
        if user is not node and order[user] > order[node]:
            user.replace_input_with(mutated, node)


def _lower(graph: fx.Graph, node: fx.Node, rule) -> bool:
    """Replace ``node`` by the nodes its rule's decomposition emits (True), or keep it where
    the rule returns None (False). A call whose constant arguments the rule does not support
    (``unsupported``) is kept as it is: it computes the right value, and the invariant refuses
    it where a derivative must pass through it. Inputs left without users are removed; a
    single new node takes the old one's name and source location."""
    if rule.unsupported is not None and rule.unsupported(rule.bind(node)):
        return False
    emit = Emitter(graph, before=node)
    before = set(graph.nodes)
    with emit.naming(node.name, pass_="normalize", node=node.name):
        replacement = rule.lower(Ctx.of(node, rule, emit))
    if replacement is None:
        return False
    new = emit.as_node(replacement)
    node.replace_all_uses_with(new)
    name, meta, inputs = node.name, node.meta, list(node.all_input_nodes)
    graph.erase_node(node)
    for value in inputs:
        _erase_unused(graph, value)
    if isinstance(new, fx.Node) and new not in before:
        new.meta = {**meta, **new.meta}
        new._rename(name)
    return True


def _check_target(graph: fx.Graph, node: fx.Node, rule) -> None:
    """Insert the rule's call-time check of the target; the op then reads the checked value."""
    emit = Emitter(graph, before=node)
    with emit.naming(f"{node.name}_check", pass_="normalize", node=node.name):
        checked = emit.as_node(rule.loss.check_target(Ctx.of(node, rule, emit)))
    target = rule.bind(node)["target"]
    node.replace_input_with(target, checked)


def pool_before_relu(graph: fx.Graph, keep: tuple = ()) -> fx.Graph:
    """``max_pool(f(z))`` -> ``f(max_pool(z))`` for a window maximum (trait ``WINDOW_MAX``)
    of a ``MONOTONE`` elementwise ``f`` (relu, leaky_relu, relu6, hardtanh) that feeds only
    the pool.

    The two are the same function (max commutes with any non-decreasing map; the pool's
    ``-inf`` padding never wins a window that holds an input), and the same derivative
    everywhere, ties included: where ``f`` keeps a window's entries apart both route ``g`` to
    the same argmax (the first of equal values); where ``f`` merges entries it is flat there,
    ``f' = 0`` (``relu'`` is 0 at 0 in torch), so both give the window zero. ``f``, its mask
    and every backward pass through it (gradient, square-root factors, products) then work on
    the pooled tensor, ``k^d`` times smaller, and the full-size output of ``f`` is not kept.
    Exact for every quantity but KFRA, whose batch-averaged per-op approximation depends on
    the order of the ops (``compile`` skips this pass when KFRA is requested). Pools in
    ``keep`` (the model's output, whose value the step must return as it was) stay as they
    are.
    """
    for pool in list(graph.nodes):
        rule = rule_for(pool)
        if rule is None or not rule.has(WINDOW_MAX) or pool in keep:
            continue
        relu = rule.bind(pool)["input"]
        if not isinstance(relu, fx.Node) or len(relu.users) != 1:
            continue
        relu_rule = rule_for(relu)
        if relu_rule is None or not relu_rule.has(MONOTONE):
            continue
        z = relu_rule.bind(relu)["input"]
        for user in list(pool.users):
            user.replace_input_with(pool, relu)
        pool.replace_input_with(relu, z)
        relu.replace_input_with(z, pool)
        pool.append(relu)
    graph.lint()
    return graph
