"""The compiler's one invariant, checked in one place before any derivative is emitted.

Every node whose value depends differentiably on a parameter (``analysis.depends_on``: through
every argument of a node without a rule, through the arguments a rule differentiates) is either
*ruled* — its rule has a Jacobian-transpose for each such argument and accepts the call's
constant arguments — or *refused* here with a :class:`CompileError` naming the node, its module,
the user's source line and the quantity. A rule cuts a path only where the value truly has no
derivative (``OpRule.constant``: sizes, metadata, integer results, ``detach``, fills); the
tracer turns what it cannot see into nodes this check reads (``docs/tracing.md``): grad-mode
regions become ``detach``, custom ``autograd.Function`` calls and backward hooks become opaque
calls of their ``apply``, which have no rule and are refused.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.fx as fx
from torch.nn.modules._functions import BackwardHookFunction

from fxcurv.errors import node_error
from fxcurv.rules import rule_for

from .analysis import depends_on
from .expand import unexpanded_reason

_NO_RULE_HINT = ("Rewrite it with supported ops (see `python -m fxcurv.support`), register a "
                 "rule in fxcurv/rules/, or .detach() its input if it should have no derivative.")
_FUNCTION_HINT = ("If its backward is the exact derivative of its forward (a memory-efficient "
                  "activation), compile with custom_functions='forward' (its forward is then "
                  "differentiated, and the first call checks the gradient against its "
                  "backward); else write its forward with supported torch ops, or call it on "
                  ".detach()'d inputs if it should have no derivative.")
_HOOK_HINT = ("Remove the hook before compiling (fxcurv's backward is explicit code, so a hook "
              "would not run), or compile a model without it.")
# tensor methods whose effect is on eager autograd's backward, which the explicit step never runs
AUTOGRAD_SIDE_EFFECTS = ("register_hook", "register_post_accumulate_grad_hook")


def check_derivative_paths(graph: fx.Graph, sources: Iterable[fx.Node]) -> dict[fx.Node, None]:
    """Refuse every node that depends on ``sources`` and is not ruled; return those nodes."""
    active = depends_on(graph, sources)
    for node in graph.nodes:
        if node.op == "call_module" and any(a in active for a in node.all_input_nodes):
            raise node_error(node, "a module call that was not traced through has no rule",
                             _NO_RULE_HINT)
        if node in active and node.op in ("call_function", "call_method"):
            _check_ruled(node, active)
    loss = next(n for n in graph.nodes if n.op == "output").args[0]
    if isinstance(loss, fx.Node) and loss not in active:
        raise node_error(loss, "the loss depends on no trainable parameter (a no_grad region, "
                         "detach or a constant cuts every path), so eager autograd could not "
                         "differentiate it either", "Check where the parameters' path to the "
                         "loss is cut.")
    return active


def _check_ruled(node: fx.Node, active: dict) -> None:
    """One node on a derivative path: a rule, accepted arguments, a Jᵀ per active argument."""
    rule = rule_for(node)
    if rule is None:
        problem, hint = _opaque(node)
        raise node_error(node, problem, hint)
    bound = rule.bind(node)
    reason = rule.unsupported(bound) if rule.unsupported else None
    if reason:
        raise node_error(node, reason, "Change that argument or the op.")
    if rule.is_constant(node):
        return
    for name, value in bound.items():
        inputs = value if isinstance(value, (list, tuple)) else [value]
        if name not in rule.vjp and any(isinstance(a, fx.Node) and a in active for a in inputs):
            raise node_error(node, f"{rule.name} has no Jacobian rule for its argument "
                             f"'{name}', which depends on the parameters",
                             "Make that argument a constant (e.g. .detach()) or add the rule.")


def _opaque(node: fx.Node) -> tuple[str, str]:
    """Why a node without a rule cannot be differentiated, and what to do."""
    function = custom_function(node)
    if function is not None and (issubclass(function, BackwardHookFunction)
                                 or getattr(function, "backward_hook", False)):
        return ("a backward hook registered on this module (register_full_backward_hook / "
                "register_full_backward_pre_hook) changes its gradient in eager autograd",
                _HOOK_HINT)
    if function is not None:
        return (f"the custom torch.autograd.Function '{function.__qualname__}' defines its "
                "own backward, which the symbolic trace cannot see", _FUNCTION_HINT)
    if node.op == "call_method" and node.target in AUTOGRAD_SIDE_EFFECTS:
        return (f"Tensor.{node.target} changes the gradient eager autograd computes",
                _HOOK_HINT)
    return ("this op has no rule in fxcurv's rule table and no expansion"
            + unexpanded_reason(node), _NO_RULE_HINT)


def custom_function(node: fx.Node) -> Optional[type]:
    """The ``torch.autograd.Function`` subclass a node calls (the tracer's opaque call, or
    ``SomeFunction.apply`` itself), or None."""
    owner = getattr(node.target, "autograd_function", None) or getattr(
        node.target, "__self__", None)
    if isinstance(owner, type) and issubclass(owner, torch.autograd.Function):
        return owner
    return None
