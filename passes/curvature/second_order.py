"""Which second derivatives an op has: the one classification that the diagonal Hessian, the
loss Hessian and the regulariser passes read.

For a call ``y = f(a, b, ...)`` reached by the gradient ``g = ∂L/∂y``, the second-order part
of ``⟨g, f⟩`` in its *active* arguments (those that depend on what is differentiated) is a
list of :class:`Term`, one per active argument and one per pair of them:

* ``ZERO``: ``∂²f/∂a² = 0`` (``hessian_is_zero``, an ``AFFINE`` op, an argument the output
  does not depend on); for a pair, ``∂²f/∂a∂b = 0`` (jointly affine, or a pair of a
  ``bilinear`` op that it does not list: a bias added to a product);
* ``RESIDUAL``: an elementwise diagonal ``residual[a](g)`` shaped like ``a``;
* ``CROSS``: an elementwise cross coefficient ``cross[(a, b)](g)`` shaped like the output;
* ``BLOCK``: a dense per-sample block ``residual_block[(a,)]`` or cross matrix
  ``residual_block[(a, b)]``;
* ``BILINEAR``: a pair the op is bilinear in without a rule of its own: the cross block of a
  tied weight is read off the parameter-side argument's ``batch_grad``;
* ``MISSING``: a nonzero second derivative the rule has no formula for (the caller refuses).

Terms come in a fixed order (arguments, then pairs, then blocks in the rule's order), so the
nodes a pass emits from them do not depend on set iteration.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch.fx as fx

from fxcurv.rules import AFFINE, OpRule

ZERO, RESIDUAL, CROSS, BLOCK, BILINEAR, MISSING = (
    "zero", "residual", "cross", "block", "bilinear", "missing")


@dataclass(frozen=True)
class Term:
    """One second-order term of an op: ``kind`` over the argument ``names`` (one or two),
    computed by ``fn(g, ctx)`` (``RESIDUAL``, ``CROSS``, ``BLOCK``); ``bilinear``: the op is
    bilinear in this pair (a tied weight's cross block may be read off ``batch_grad``)."""

    kind: str
    names: tuple
    fn: Optional[Callable[[Any, Any], Any]] = None
    bilinear: bool = False


def classify(rule: OpRule, bound: dict, names: list[str]) -> list[Term]:
    """The second-order terms of ``rule``'s call with bound arguments ``bound`` in its active
    arguments ``names`` (in the given order): each argument, each pair, then the dense blocks
    over active arguments in the rule's order."""
    own = [_own(rule, bound, name) for name in names]
    pairs = [_pair(rule, a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    blocks = [Term(BLOCK, key, fn, _listed(rule, *key)) for key, fn in
              rule.residual_block.items() if all(name in names for name in key)]
    return [t for t in own + pairs if t.kind != BLOCK] + blocks


def _listed(rule: OpRule, a: str, b: Optional[str] = None) -> bool:
    """The op is bilinear in the pair ``(a, b)``."""
    return b is not None and ((a, b) in rule.bilinear or (b, a) in rule.bilinear)


def _own(rule: OpRule, bound: dict, name: str) -> Term:
    if rule.vjp.get(name, 0) is None or rule.zero_hessian(name, bound):
        return Term(ZERO, (name,))
    if (name,) in rule.residual_block:
        return Term(BLOCK, (name,), rule.residual_block[(name,)])
    if name in rule.residual:
        return Term(RESIDUAL, (name,), rule.residual[name])
    return Term(MISSING, (name,))


def _pair(rule: OpRule, a: str, b: str) -> Term:
    if rule.vjp.get(a, 0) is None or rule.vjp.get(b, 0) is None or rule.has(AFFINE):
        return Term(ZERO, (a, b))
    listed = _listed(rule, a, b)
    cross = rule.cross.get((a, b)) or rule.cross.get((b, a))
    if cross is not None:
        return Term(CROSS, (a, b), cross, listed)
    if (a, b) in rule.residual_block or (b, a) in rule.residual_block:
        return Term(BLOCK, (a, b))              # listed with the blocks, in the rule's order
    if listed:
        return Term(BILINEAR, (a, b), bilinear=True)
    return Term(ZERO if rule.bilinear else MISSING, (a, b))


def is_linear(terms: list[Term]) -> bool:
    """No second derivative at all in the active arguments."""
    return all(term.kind == ZERO for term in terms)


def linear_in(node: fx.Node, rule: OpRule, inside) -> bool:
    """``node``'s op has no second derivative in the arguments whose values are in
    ``inside`` (a node, or a list of nodes, of ``inside``)."""
    bound = rule.bind(node)
    active = [name for name, value in bound.items() if any(
        isinstance(v, fx.Node) and v in inside
        for v in (value if isinstance(value, (list, tuple)) else [value]))]
    return is_linear(classify(rule, bound, active))
