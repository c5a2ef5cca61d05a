"""The curvature of a regulariser added to the loss: ``L = c·D(θ, x) + R(θ)``.

A *regulariser* is a branch of the loss graph that depends on parameters but not on the input
``x`` and enters the loss after the per-sample part of the model (an argument ``a`` of an op
``j`` below the loss reduction, ``a`` in ``depends_on(params)`` but not in
``descendants(x)``), additively: sums of the data term and such branches, scaled by
constants (``2 * ce + lam * (w ** 2).sum()``, ``ce + (w ** 2).mean() / 2``).

Convention. Every curvature quantity includes the regulariser's *exact* Hessian ``∇²R``
(BackPACK silently leaves it out): ``diag_ggn_exact``, ``diag_ggn_mc``, ``diag_h`` add its
diagonal, the block products ``ggnmp``, ``hmp`` add ``∇²R`` times the vectors. The GGN and
Monte-Carlo variants add the exact ``∇²R`` too (a deterministic, damping-like term: ``R`` has
no model output to linearise and no likelihood to sample). ``pchmp_abs`` / ``pchmp_clip`` add
``|∇²R|`` / ``max(∇²R, 0)`` (elementwise: it is diagonal). Per-sample quantities
(``batch_grad``, ``*_batch``, ``sqrt_ggn_*``, ``batch_l2``, ``sum_grad_squared``,
``variance``) are refused (``R`` is not a sum of per-sample terms), and so are Kronecker
factors (``∇²R`` is not a Kronecker product of a layer's factors).

How. From the loss downward (reverse graph order), the Hessian of ``L`` w.r.t. each branch
value ``v`` is kept as a *diagonal* ``H_v`` ``[*v.shape]``, or as structurally zero:

* an op ``y = f(a, ...)`` whose output Hessian is zero (``H_y = 0``: ``y`` enters the loss
  linearly, through sums, means, constant scalings, ``add``/``sub``) gives ``a``
  ``residual[a](g)`` = ``diag Σ g ∂²f/∂a²`` (``g = ∂L/∂y`` from the backward pass), or
  nothing when ``hessian_is_zero``;
* an elementwise op with a nonzero ``H_y`` gives ``f'² ⊙ H_y`` (+ its residual); an op that
  only reorders or joins elements (``t``, ``reshape``, ``permute``, ``cat``, ...) gives
  ``Jᵀ H_y``;
* anything else with a nonzero ``H_y`` (a reduction, ``matmul``, broadcasting:
  ``(w.sum()) ** 2``) has a non-diagonal Hessian, a cross term ``∂²f/∂a∂b`` between arguments
  that share parameters (``w * w`` excepted: ``2 ∂²f/∂a∂b``) is not diagonal either, and a
  nonzero curvature where the branch meets the data (``log(ce + R)``) makes the loss
  non-additive: all of these are a ``CompileError`` naming the node, never a wrong number.

The diagonals that reach the parameters are ``∇²R``'s diagonal (its blocks are diagonal).
"""
from __future__ import annotations

from typing import Any, Optional

import torch.fx as fx
from torch import Tensor

from fxcurv.emit import Emitter
from fxcurv.errors import node_error, requesting
from fxcurv.quantities import KRON, Quantity
from fxcurv.rules import (AFFINE, CONCATENATION, ELEMENTWISE, PERMUTATION, Ctx, OpRule,
                          rule_for)

from ..analysis import ancestors, depends_on, differentiable_inputs
from .second_order import CROSS, RESIDUAL, ZERO, classify

def elementwise_shape(hessian: Tensor, arg: Tensor, out: Tensor) -> Tensor:
    """Call-time check that ``f'² ⊙ H`` was formed on an argument shaped like the output
    (not broadcast by the op)."""
    if arg.shape != out.shape:
        raise ValueError("fxcurv: a regulariser term broadcasts a parameter value before a "
                         "non-linear op; its Hessian is not supported (write the broadcast "
                         "after the non-linear op)")
    return hessian


class Regulariser:
    """The regulariser of one loss graph: where it enters, and its Hessian diagonals."""

    def __init__(self, emit: Emitter, traced, cotangents: dict, data: tuple):
        """``data``: the input's descendants and sample carriers (``PerSample``'s)."""
        self.emit, self.traced, self.cotangents = emit, traced, cotangents
        self.depends, self.carriers = data
        self.entries = self._entries()
        self._hessians: Optional[dict[str, Any]] = None

    def _entries(self) -> list[tuple[fx.Node, fx.Node]]:
        """``(op, argument)`` where a parameter value without a sample axis enters the loss
        after the per-sample part of the model."""
        side = depends_on(self.traced.graph, self.traced.params.values())
        found = []
        for node in self.traced.graph.nodes:
            if node in self.cotangents and self.after_samples(node):
                found += [(node, arg) for arg in differentiable_inputs(node)
                          if arg in side and arg not in self.depends and arg in self.cotangents]
        return found

    def after_samples(self, node: fx.Node) -> bool:
        """A node of the loss below the reduction over samples (``ce``, ``ce + R``)."""
        return node in self.depends and node not in self.carriers

    # -- which quantities include it ---------------------------------------------------------
    def check(self, requested: list) -> None:
        """Refuse per-sample quantities and Kronecker factors when there is a regulariser."""
        if not self.entries:
            return
        op, arg = self.entries[0]
        where = arg if arg.op in ("call_function", "call_method") else op
        for label, quantity in requested:
            if quantity.regulariser is not None:
                continue
            if quantity.extract is KRON:
                problem = ("its curvature is not a Kronecker product of a layer's factors, so "
                           "Kronecker factors cannot include it")
                hint = "Request diag_ggn_*, diag_h or a product (ggnmp, hmp), which include it."
            else:
                problem = ("it is not a sum of per-sample terms, so per-sample quantities are "
                           "undefined for it")
                hint = ("Request grad or a curvature quantity (diag_ggn_*, diag_h, ggnmp, hmp, "
                        "pchmp_*), which include the regulariser's exact Hessian.")
            with requesting(label):
                raise node_error(where, f"'{arg.name}' depends on parameters but not on the "
                                 "input and is added to the loss after the per-sample part of "
                                 f"the model (a regulariser); {problem}", hint)

    # -- adding it to a quantity -------------------------------------------------------------
    def add(self, quantity: Quantity, label: str, values: dict, vectors: dict) -> dict:
        """``values`` (one per parameter) plus the regulariser's term for ``quantity`` (as its
        ``regulariser`` field says: exact, ``abs``, ``clip``): ``diag ∇²R`` for a diagonal,
        ``diag ∇²R ⊙ v`` for products (``vectors`` given)."""
        if not self.entries:
            return values
        hessians = self.hessians()
        result = dict(values)
        for name, diagonal in hessians.items():
            node = self.traced.params[name]
            with self.emit.naming(f"{node.name}_{label}", pass_="regulariser", param=name):
                mode = quantity.regulariser
                if mode == "abs":
                    diagonal = diagonal.abs()
                elif mode == "clip":
                    diagonal = diagonal.clamp(min=0.0)
                term = diagonal * vectors[name] if vectors else diagonal
                result[name] = values[name] + term
            self.emit.rename(result[name], f"{node.name}_{label}_regularised")
        return result

    def hessians(self) -> dict[str, Any]:
        """``{parameter name: diagonal of ∇²R}`` for parameters with a nonzero one (once)."""
        if self._hessians is None:
            walk = _HessianWalk(self)
            self._hessians = walk.run()
        return self._hessians


class _HessianWalk:
    """The downward propagation of the module docstring, one node at a time."""

    def __init__(self, regulariser: Regulariser):
        self.r, self.emit = regulariser, regulariser.emit
        traced = regulariser.traced
        self.params = {node: name for name, node in traced.params.items()}
        self.branch = self._branch_nodes()
        self.hessian: dict[fx.Node, Any] = {}     # branch values: a diagonal Proxy, if nonzero
        self.curved: set[fx.Node] = set()         # loss nodes with a nonzero Hessian

    def _branch_nodes(self) -> set[fx.Node]:
        """Parameter-side ops that reach the loss only through regulariser entries."""
        entries = {arg for _, arg in self.r.entries}
        cotangents, branch = self.r.cotangents, set()
        for node in reversed(list(self.r.traced.graph.nodes)):
            if node not in entries or node not in cotangents or node.op not in (
                    "call_function", "call_method"):
                continue
            users = [u for u in node.users if u in cotangents]
            if all(u in branch or self.r.after_samples(u) for u in users):
                branch.add(node)
                entries.update(node.all_input_nodes)
        return branch

    def run(self) -> dict[str, Any]:
        for node in reversed(list(self.r.traced.graph.nodes)):
            if node in self.branch or (node in self.r.cotangents and self.r.after_samples(node)):
                self._visit(node)
        found = {}
        for name, node in self.r.traced.params.items():
            if self.hessian.get(node) is not None:
                found[name] = self.hessian[node]
                self.emit.rename(found[name], f"{node.name}_regulariser_hessian")
        return found

    def _visit(self, node: fx.Node) -> None:
        """Give each argument of ``node`` its share of the Hessian below ``node``."""
        rule = rule_for(node)
        if rule is None or rule.is_constant(node):
            return
        ctx = Ctx.of(node, rule, self.emit)
        if rule.has(CONCATENATION) and self.hessian.get(node) is not None:
            return self._split(node, rule, ctx)
        curved = node in self.curved or self.hessian.get(node) is not None
        active = self._active(rule, ctx, curved)
        terms = classify(rule, ctx.bound, [name for name, _ in active])
        for name, arg in active:
            if arg in self.r.depends:                  # a data value below the reduction
                if curved or any(t.kind != ZERO for t in terms if name in t.names):
                    self.curved.add(arg)
                continue
            if node not in self.branch and curved:
                raise node_error(node, f"the loss is not additive in the regulariser "
                                  f"'{arg.name}' (its curvature meets the data term here)",
                                  "Add the regulariser to the loss: loss + lam * R(w).")
            self._check_reachable(node, arg)
            with self.emit.naming(f"{node.name}_regulariser", pass_="regulariser",
                                  node=node.name):
                term = self._term(node, rule, ctx, active, terms, name, arg)
            if term is not None:
                self._accumulate(arg, term)

    def _split(self, node: fx.Node, rule: OpRule, ctx: Ctx) -> None:
        """``cat`` / ``stack`` of regulariser values with a nonzero diagonal ``H``: each piece
        gets its part (pieces that share parameters would need cross terms: refused)."""
        name = next(k for k, v in ctx.bound.items() if isinstance(v, (list, tuple)))
        pieces = [p for p in ctx.bound[name] if isinstance(p, fx.Node) and p in
                  self.r.cotangents]
        for i, piece in enumerate(pieces):
            if any(self._share(piece, other) for other in pieces[i + 1:]):
                raise self._not_diagonal(node, piece, "its pieces share parameters")
        with self.emit.naming(f"{node.name}_regulariser", pass_="regulariser",
                              node=node.name):
            parts = rule.vjp[name](self.hessian[node], ctx)
        for piece, part in zip(ctx.bound[name], parts):
            if piece in pieces:
                self._check_reachable(node, piece)
                self._accumulate(piece, part)

    def _active(self, rule: OpRule, ctx: Ctx, curved: bool) -> list[tuple[str, fx.Node]]:
        """``(argument name, node)`` of the arguments the loss differentiates through. Values
        in a list argument (``cat``, ``stack``) get nothing from a linear op; otherwise a data
        value is marked curved, a regulariser value refused."""
        found = []
        for name, value in ctx.bound.items():
            if rule.vjp.get(name) is None:
                continue
            if isinstance(value, fx.Node) and value in self.r.cotangents:
                found.append((name, value))
            elif isinstance(value, (list, tuple)):
                linear = rule.has(AFFINE) and rule.zero_hessian(name, ctx.bound) and \
                    not curved
                for item in value:
                    if linear or not isinstance(item, fx.Node) or item not in \
                            self.r.cotangents:
                        continue
                    if item not in self.r.depends:
                        raise self._not_diagonal(ctx.node, item, f"{rule.name} of a list")
                    self.curved.add(item)
        return found

    def _term(self, node, rule: OpRule, ctx: Ctx, active: list, terms: list, name: str,
              arg: fx.Node):
        """``arg``'s diagonal from this op: chain of ``H_node``, residual and cross terms."""
        hessian = self.hessian.get(node)
        g = self.r.cotangents[node]
        parts = []
        if hessian is not None:
            parts.append(self._chain(node, rule, ctx, active, name, arg, hessian))
        for term in terms:
            if term.names == (name,) and term.kind != ZERO:
                if term.kind != RESIDUAL:
                    raise node_error(node, f"{rule.name} has a non-zero second derivative "
                                      f"in '{name}' but no diagonal residual rule",
                                      "Write the regulariser with elementwise ops.")
                parts.append(term.fn(g, ctx))
        parts += self._cross(node, rule, ctx, terms, active, name, arg, g)
        total = None
        for part in parts:
            total = part if total is None else total + part
        return total

    def _chain(self, node, rule, ctx, active, name, arg, hessian) -> Any:
        """``Jᵀ H J`` on the diagonal: ``Jᵀ H`` (reordering), ``f'² ⊙ H`` (elementwise)."""
        if any(other_name != name and (other is arg or self._share(arg, other))
               for other_name, other in active):
            raise self._not_diagonal(node, arg, "its arguments share parameters")
        if rule.has(PERMUTATION):
            return rule.vjp[name](hessian, ctx)
        if not rule.has(ELEMENTWISE):
            raise self._not_diagonal(node, arg, f"{rule.name} is not elementwise")
        vjp = rule.vjp[name]
        twice = vjp(vjp(hessian, ctx), ctx)       # f' ⊙ (f' ⊙ H), arg shaped like the output
        others = [v for k, v in ctx.bound.items() if k != name and isinstance(v, fx.Node)]
        if others:
            twice = ctx.call(elementwise_shape, twice, getattr(ctx.args, name), ctx.out)
        return twice

    def _cross(self, node, rule, ctx: Ctx, terms: list, active: list, name: str,
               arg: fx.Node, g) -> list:
        """``2 ∂²f/∂a∂b`` when both arguments are the same value (``w * w``); cross terms
        between values that share parameters are refused (not diagonal), others lie outside
        the parameters' blocks."""
        values, parts = dict(active), []
        for term in terms:
            if len(term.names) != 2 or name not in term.names or term.kind == ZERO:
                continue
            other_name = term.names[1] if term.names[0] == name else term.names[0]
            other = values[other_name]
            if other is arg and term.kind == CROSS:
                parts.append(term.fn(g, ctx))   # the pair is seen from both names: 2×
            elif self._share(arg, other):
                raise self._not_diagonal(node, arg, f"{rule.name} has a cross second "
                                         f"derivative between '{name}' and '{other_name}', "
                                         "which share parameters")
        return parts

    def _check_reachable(self, node: fx.Node, arg: fx.Node) -> None:
        """The walk continues below ``arg``: a regulariser value or a parameter."""
        if arg not in self.branch and arg not in self.params:
            raise node_error(node, f"the regulariser acts on '{arg.name}', a value computed "
                              "from parameters that the model uses too, so its curvature "
                              "cannot be told apart from the model's",
                              "Apply the regulariser to the parameters themselves.")

    def _accumulate(self, arg: fx.Node, term: Any) -> None:
        previous = self.hessian.get(arg)
        self.hessian[arg] = term if previous is None else previous + term

    def _share(self, a: fx.Node, b: fx.Node) -> bool:
        """``a`` and ``b`` depend on a common parameter."""
        return bool(set(self.params) & ancestors(a) & ancestors(b))

    def _not_diagonal(self, node: fx.Node, arg: fx.Node, why: str):
        return node_error(node, f"the regulariser's Hessian is not diagonal here ({why}; "
                           f"value '{arg.name}')", "Write the regulariser as sums of "
                           "elementwise functions of the parameters, e.g. lam * (w ** 2).sum().")

