"""The explicit backward pass: Jacobian-transpose nodes from the rule table, in reverse order.

Given seed cotangents (``∂L/∂L = 1`` at the loss for a gradient, a loss-Hessian square root at
the model output for a sqrt-GGN factor), walk the forward nodes in reverse graph order and, for
every node that has a cotangent, emit ``Jᵀ g`` for each argument that depends on a source
(the parameters). Contributions to a value used several times (residual branches, a parameter
used twice) are summed. Nothing is emitted for values that do not depend on a source, so there
is no input cotangent and nothing below the first parameterised op.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch.fx as fx

from fxcurv.emit import Emitter
from fxcurv.errors import node_error
from fxcurv.rules import Ctx, rule_for

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
    for node in reversed(nodes):
        if node in cotangents and node.op in ("call_function", "call_method"):
            with emit.naming(f"{node.name}_vjp", pass_="backward", node=node.name):
                _propagate(node, cotangents, active, emit, lead)
    for node, value in reversed(list(cotangents.items())):
        if node not in seeds and node not in sources:
            emit.rename(value, f"{node.name}_{tag}")
    return cotangents


def _propagate(node: fx.Node, cotangents: dict, active: dict, emit: Emitter, lead: int) -> None:
    """Emit ``Jᵀ g`` of one node for each active argument and accumulate it."""
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
