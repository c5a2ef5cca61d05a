"""The explicit backward pass: Jacobian-transpose nodes from the rule table, in reverse order.

Given seed cotangents (``∂L/∂L = 1`` at the loss for a gradient, a loss-Hessian square root at
the model output for a sqrt-GGN factor), walk the forward nodes in reverse graph order and, for
every node that has a cotangent, emit ``Jᵀ g`` for each argument that depends on a source
(the parameters). Contributions to a value used several times (residual branches, a parameter
used twice) are summed. A parameter used several times by one op kind that declares
``stack_uses`` (a recurrent weight at every step) gets one Jacobian-transpose for all those
uses, on their data and cotangents concatenated along positions (``Σ_t g_tᵀ x_t`` as one matrix
product, not ``T`` products and ``T - 1`` sums). Nothing is emitted for values that do not
depend on a source, so there is no input cotangent and nothing below the first
parameterised op.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch.fx as fx

from fxcurv.emit import Emitter
from fxcurv.errors import node_error
from fxcurv.rules import Ctx, OpRule, rule_for
from fxcurv.rules.helpers import concat_positions
from fxcurv.rules.registry import Args

from .analysis import ancestors, depends_on
from .expand import unexpanded_reason


def backward(emit: Emitter, seeds: dict[fx.Node, Any], sources: Iterable[fx.Node],
             lead: int = 0, tag: str = "cotangent",
             active: Optional[dict] = None) -> dict[fx.Node, Any]:
    """Emit the backward propagation of ``seeds``; return ``{node: cotangent proxy}``.

    ``lead`` is the number of leading vector axes of the seeds; ``tag`` names the results
    (``relu_1_cotangent``); errors name the quantity of ``emit.requesting``; ``active``: the
    nodes that depend on ``sources`` (``analysis.depends_on``), when the caller has them (many
    propagations from forward nodes share one; only forward nodes get cotangents).
    """
    sources = list(sources)
    region = ancestors(*seeds) if seeds else set()  # where cotangents can flow
    nodes = [node for node in emit.graph.nodes if node in region]
    if active is None:
        active = depends_on(emit.graph, sources, nodes)
    cotangents: dict[fx.Node, Any] = dict(seeds)
    stackable: dict[fx.Node, list] = {source: [] for source in sources}
    for node in reversed(nodes):
        if node in cotangents and node.op in ("call_function", "call_method"):
            with emit.naming(f"{node.name}_vjp", pass_="backward", node=node.name):
                _propagate(node, cotangents, active, emit, lead, stackable)
    for source, uses in stackable.items():
        _stacked_uses(source, uses, cotangents, emit, lead)
    for node, value in reversed(list(cotangents.items())):
        if node not in seeds and node not in sources:
            emit.rename(value, f"{node.name}_{tag}")
    return cotangents


def _propagate(node: fx.Node, cotangents: dict, active: dict, emit: Emitter, lead: int,
               stackable: dict) -> None:
    """Emit ``Jᵀ g`` of one node for each active argument and accumulate it; a source
    argument that the rule can stack is left in ``stackable[source]`` for later."""
    rule = rule_for(node)
    if rule is None:
        raise node_error(node, "this op has no rule in fxcurv's rule table and no expansion"
                         + unexpanded_reason(node),
                         "Rewrite it with supported ops (see `python -m fxcurv.support` or the "
                         "README's support table) or register a rule in fxcurv/rules/.")
    ctx = Ctx.of(node, rule, emit, lead)
    for name, value in ctx.bound.items():
        inputs = value if isinstance(value, (list, tuple)) else [value]
        wanted = [isinstance(arg, fx.Node) and arg in active for arg in inputs]
        if not any(wanted) or (name in rule.vjp and rule.vjp[name] is None):
            continue  # no dependence, or a rule that says "no contribution" (None)
        if name in rule.stack_uses and value in stackable and _repeated(value, rule):
            stackable[value].append((node, rule, name))
            continue
        vjp = rule.vjp.get(name)
        if vjp is None:
            raise node_error(node, f"{rule.name} has no Jacobian rule for its argument "
                             f"'{name}', which depends on the parameters",
                             "Make that argument a constant (e.g. .detach()) or add the rule.")
        result = vjp(cotangents[node], ctx)
        results = result if isinstance(value, (list, tuple)) else [result]
        for arg, keep, contribution in zip(inputs, wanted, results):
            if keep:
                accumulate(cotangents, arg, contribution)


def accumulate(cotangents: dict, node: fx.Node, contribution: Any) -> None:
    """Add a cotangent contribution to ``node``'s running sum."""
    if node in cotangents:
        cotangents[node] = cotangents[node] + contribution
    else:
        cotangents[node] = contribution


def _repeated(source: fx.Node, rule: OpRule) -> bool:
    """Whether ``source`` is read by several nodes of ``rule``'s op kind."""
    return sum(1 for user in source.users if rule_for(user) is rule) > 1


def _stacked_uses(source: fx.Node, uses: list, cotangents: dict, emit: Emitter,
                  lead: int) -> None:
    """Accumulate the Jacobian-transposes of ``source``'s stackable uses ``(node, rule,
    argument)``: one per group of uses by one rule and argument, on the group's data and
    cotangents concatenated along positions (a single use: its own ``Jᵀ g``)."""
    groups: dict[tuple, list] = {}
    for node, rule, name in uses:
        groups.setdefault((id(rule), name), []).append((node, rule, name))
    for group in groups.values():
        node, rule, name = group[0]
        with emit.naming(f"{source.name}_vjp_uses", pass_="backward", node=node.name):
            if len(group) == 1:
                g, ctx = cotangents[node], Ctx.of(node, rule, emit, lead)
            else:
                g, ctx = joined_use(group, cotangents, emit, lead)
            accumulate(cotangents, source, rule.vjp[name](g, ctx))


def joined_use(group: list, cotangents: Any, emit: Emitter, lead: int) -> tuple[Any, Ctx]:
    """``(g, ctx)`` of one virtual use standing for ``group`` (``(node, rule, argument)``
    uses of one parameter by one op kind): the uses' cotangents and their data argument
    (``rule.stack_uses``) concatenated along a position axis, in graph order (so that the
    backward and the per-sample pass build the same concatenation, shared)."""
    order = {node: i for i, node in enumerate(group[0][0].graph.nodes)}
    group = sorted(group, key=lambda use: order[use[0]])
    first, rule, name = group[0]
    data = rule.stack_uses[name]
    bound = dict(rule.bind(first))
    bound[data] = emit.call(concat_positions,
                            [emit.proxy(rule.bind(node)[data]) for node, _, _ in group],
                            0).node
    g = emit.call(concat_positions, [cotangents[node] for node, _, _ in group], lead)
    return g, Ctx(first, bound, Args(bound, emit), None, lead, emit)
