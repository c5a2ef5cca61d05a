"""In-place ops and aliasing: which in-place ops the functional graph represents exactly.

``normalize`` rewrites an in-place op ``a.op_(...)`` to its out-of-place twin and makes later
readers of ``a`` read the result. That equals eager PyTorch exactly when nothing else sees the
mutation: no other tensor shares ``a``'s memory and is read afterwards. Sharing comes from
views (reshape, transpose, indexing, expand, split pieces, ``detach``, ...: rules with the
``aliases`` trait) and from earlier in-place ops (their result *is* their first argument).

So an in-place op is allowed when every alias of the mutated value that existed before it —
its base, the base's other views, earlier in-place results — is not read after it. Otherwise,
and for in-place ops on values fxcurv cannot see the memory of (a parameter or buffer: the
step never mutates the model; an op without a rule, which may return a view; an in-place op
without an out-of-place rule; ``out=``), the op is refused naming its node.
"""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxcurv.errors import node_error
from fxcurv.rules import BOOLEAN, RULES, VIEW, rule_for
from fxcurv.rules.shape import (assigned, assigned_number, index_spec, is_scalar_node,
                                masked_assign)

# ``x += y`` and friends: every in-place operator (those without a rule are then refused by
# the invariant check where they depend on the parameters)
OUT_OF_PLACE = {getattr(operator, f"i{name.rstrip('_')}"): getattr(operator, name) for name in (
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and_", "or_", "xor",
    "lshift", "rshift")}
_HINT = ("Write it out of place (y = x * 2 instead of x.mul_(2); torch.cat / torch.where "
         "instead of writing into a slice), or .clone() the value before changing it.")
# in-place-looking methods that change no values (flags only)
_FLAG_METHODS = ("requires_grad_",)


def in_place_twin(node: fx.Node) -> Optional[tuple[Any, tuple, dict]]:
    """``(out-of-place target, args, kwargs)`` of an in-place node; None if it is not
    in-place. The target is None for an in-place op without an out-of-place rule."""
    if node.op not in ("call_method", "call_function"):
        return None
    if node.op == "call_function" and node.target in OUT_OF_PLACE:
        return OUT_OF_PLACE[node.target], node.args, dict(node.kwargs)
    if node.op == "call_function" and node.target is operator.setitem:
        return _assignment_twin(node)
    flag = _inplace_flag(node)
    if flag is not None:
        return flag
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if node.op == "call_function" and not str(getattr(node.target, "__module__", None)
                                              ).startswith("torch"):
        return None  # operator.and_ is not in-place
    if not isinstance(name, str) or not name.endswith("_") or name.startswith("_") or \
            name in _FLAG_METHODS:
        return None
    if node.op == "call_method":
        twin = name[:-1] if name[:-1] in RULES else None
    else:
        twins = [getattr(module, name[:-1], None) for module in (torch, F)]
        twin = next((t for t in twins if t is not None and t in RULES), None)
    return twin, node.args, dict(node.kwargs)


def _assignment_twin(node: fx.Node) -> tuple[Any, tuple, dict]:
    """``x[index] = value`` -> ``assigned(x, value, spec)`` (a tensor value) or
    ``assigned_number`` (a Python number, a bool, or a traced number: a size), for a basic index
    (``index_spec``);
    ``x[mask] = number`` with a boolean mask -> ``masked_assign``; target None for any other
    index or value."""
    mutated, index, value = node.args
    traced_number = isinstance(value, fx.Node) and is_scalar_node(value)  # (BEiT's ``n - 3``)
    is_number = traced_number or isinstance(value, (bool, int, float))  # (True: a mask's)
    number = value if traced_number else float(value) if is_number else None
    if isinstance(index, fx.Node) and rule_for(index) is not None and \
            rule_for(index).has(BOOLEAN):  # ``x[mask] = number``
        return (masked_assign, (mutated, index, number), {}) if is_number else \
            (None, node.args, {})
    spec = index_spec(index)
    if spec is None:
        return None, node.args, {}
    if is_number:
        return assigned_number, (mutated, number, spec), {}
    return (assigned, (mutated, value, spec), {}) if isinstance(value, fx.Node) else \
        (None, node.args, {})


def _inplace_flag(node: fx.Node) -> Optional[tuple[Any, tuple, dict]]:
    """``F.relu(x, inplace=True)`` (or positional ``True``) -> the same call with False."""
    if node.kwargs.get("inplace") is True:
        return node.target, node.args, {**node.kwargs, "inplace": False}
    rule = rule_for(node)
    names = list(rule.signature.parameters) if rule is not None else []
    position = names.index("inplace") if "inplace" in names else len(node.args)
    if position < len(node.args) and node.args[position] is True:
        args = node.args[:position] + (False,) + node.args[position + 1:]
        return node.target, args, dict(node.kwargs)
    return None


def check_in_place(graph: fx.Graph) -> None:
    """Refuse every in-place op the functional rewrite would not reproduce exactly."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in graph.nodes:
        if isinstance(node.kwargs.get("out"), fx.Node):
            raise node_error(node, "an op writing into an existing tensor (out=) has no "
                             "functional form in fxcurv", _HINT)
        twin = in_place_twin(node)
        if twin is None:
            continue
        if twin[0] is None:
            raise node_error(node, "this in-place op has no out-of-place rule", _HINT)
        mutated = node.args[0] if node.args else None
        if isinstance(mutated, fx.Node) and not is_scalar_node(mutated):
            reason = _grad_mode_problem(node, mutated) or _aliasing_problem(node, mutated,
                                                                            order)
            if reason:
                raise node_error(node, reason, _HINT)


def _grad_mode_problem(node: fx.Node, mutated: fx.Node) -> Optional[str]:
    """An in-place op with grad mode off on a value computed with it on: eager autograd keeps
    the old derivative for the new values (like writing to ``.data``)."""
    if node.meta.get("grad_enabled", True) or not mutated.meta.get("grad_enabled", True):
        return None
    return (f"it changes '{mutated.name}' in place with grad mode off (torch.no_grad), which "
            "eager autograd does not record")


def _aliasing_problem(node: fx.Node, mutated: fx.Node, order: dict) -> Optional[str]:
    """Why changing ``mutated`` in place at ``node`` is seen by another value, or None."""
    base = _alias_root(mutated)
    if isinstance(base, str):
        return base
    for alias in _aliases(base):
        if alias is mutated or order[alias] >= order[node]:
            continue
        later = [u for u in alias.users if order[u] > order[node]]
        if later:
            return (f"it changes '{mutated.name}' in place, which shares memory with "
                    f"'{alias.name}', read afterwards by '{later[0].name}' (eager PyTorch "
                    "would show the change there too)")
    return None


def _alias_root(value: fx.Node) -> Any:
    """The node whose memory ``value`` is a view of (itself if fresh), or why it is unknown."""
    while True:
        if value.op == "get_attr":
            return (f"it changes the model's tensor '{value.target}' in place (the compiled "
                    "step never mutates the model)")
        if value.op == "placeholder":
            return value
        if in_place_twin(value) is None:
            rule = rule_for(value)
            if rule is None:
                return (f"it changes '{value.name}' in place, the result of an op without a "
                        "rule, which may share memory with its inputs")
            if not rule.has(VIEW):
                return value
        source = value.args[0] if value.args else None
        if not isinstance(source, fx.Node):
            return (f"it changes '{value.name}' in place, which may share memory with an "
                    "input of its op")
        value = source


def _aliases(base: fx.Node) -> list[fx.Node]:
    """``base`` and every value sharing its memory: views and in-place results, transitively."""
    found, stack = [base], [base]
    while stack:
        for user in stack.pop().users:
            rule = rule_for(user)
            shares = in_place_twin(user) is not None or (rule is not None and rule.has(VIEW))
            if shares and user.args and user.args[0] in found and user not in found:
                found.append(user)
                stack.append(user)
    return found
