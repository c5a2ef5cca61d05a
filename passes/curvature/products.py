"""Block curvature products by forward tangents: ``hmp``, ``ggnmp``, ``pchmp_abs/clip``.

For a parameter ``p`` read by one op ``u`` whose output reaches the loss's input through a
chain of ops ``n_1 … n_K`` (each reading the previous one, and nothing else that depends on
``p``), the block ``H_pp`` times vectors ``v`` ``[V, *p.shape]`` is Pearlmutter's
Hessian-vector product with only ``p`` perturbed:

    t_0 = J_p v                      [V, N, *out_u]   (``jvp`` rule of u's parameter argument)
    t_i = J_i t_{i-1}                along the chain  (``jvp``; ``vjp`` for diagonal J)
    ġ_K = S_n S_nᵀ t_K               per sample, S the exact loss factor [C, N, *out]
    ġ_{i-1} = J_iᵀ ġ_i + m(R_i) ⊙ t_{i-1}   (R_i = Σ g ∂²f/∂x² the op's elementwise residual)
    H_pp v = J_pᵀ ġ_0                (the vjp rule of u for p, with the lead axis V)

``m`` is the identity (``hmp``), ``|·|`` (``pchmp_abs``), ``max(·, 0)`` (``pchmp_clip``), or
drops the residuals (``ggnmp``): the same sums ``Σ_ops J_opᵀ m(R_op) J_op`` the factor
propagations of ``diag_hessian.py`` square, without the ``[C, N, …]`` and ``[D, N, …]``
factors: ``O(V·K)`` layer products per parameter, exact. A parameter whose path is not such
a chain (several uses, branches, ops without tangent rules, a loss without a factor) gets
``None``; the caller then multiplies with the propagated factors.

With ``v`` the unit vectors of a small parameter's ``P`` entries, the same sweep gives the
Hessian's diagonal (``diag_h``, per sample ``diag_h_batch``): ``diag(H_pp)_j =
Σ_n [Σ_c (s_nc · t_K,jn)² + Σ_i Σ_d R_i,nd t_{i-1},jnd²]``, ``O(P·K)`` layer calls instead of
the residual factors' ``Σ_i D_i`` columns (:meth:`TangentProducts.diagonal`).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.fx as fx
from torch import Tensor

from fxcurv.emit import Emitter
from fxcurv.rules import ELEMENTWISE, RESHAPES, WINDOW_MAX, Ctx, rule_for

from ..analysis import depends_on, sample_carriers

# the most entries of a parameter whose Hessian diagonal is taken from its entries' tangents
# (one forward sweep per entry along its chain) rather than from the residual factors
MAX_DIAGONAL_TANGENTS = 1024
# how the residuals enter, by the propagation's signs of their positive and negative parts
RESIDUAL_MODES = {(1.0, -1.0): "identity", (1.0, 1.0): "abs", (1.0, 0.0): "clip"}


def output_hessian_product(factor: Tensor, tangent: Tensor) -> Tensor:
    """``S_n S_nᵀ t_n`` for every sample: ``factor`` ``[C, N, *out]``, ``tangent``
    ``[V, N, *out]`` -> ``[V, N, *out]``."""
    s = factor.flatten(2).transpose(0, 1)                # [N, C, D]
    t = tangent.flatten(2).transpose(0, 1)               # [N, V, D]
    projections = torch.matmul(t, s.transpose(1, 2))     # [N, V, C]
    return torch.matmul(projections, s).transpose(0, 1).reshape(tangent.shape)


def output_squares(factor: Tensor, tangent: Tensor) -> Tensor:
    """``Σ_c (s_nc · t_kn)²`` ``[K, N]``: ``factor`` ``[C, N, *out]``, ``tangent``
    ``[K, N, *out]`` (the GGN's diagonal entries from the tangents of unit vectors)."""
    s = factor.flatten(2).transpose(0, 1)                # [N, C, D]
    t = tangent.flatten(2).transpose(0, 1)               # [N, K, D]
    return torch.matmul(t, s.transpose(1, 2)).square().sum(-1).t()


def residual_squares(residual: Tensor, tangent: Tensor) -> Tensor:
    """``Σ_d R_nd t_knd²`` ``[K, N]``: ``residual`` ``[N, *x]``, ``tangent`` ``[K, N, *x]``."""
    return (tangent.square() * residual).flatten(2).sum(-1)


def unit_vectors(param: Tensor) -> Tensor:
    """``[P, *p.shape]``: the ``P = p.numel()`` unit vectors of the parameter's entries."""
    eye = torch.eye(param.numel(), dtype=param.dtype, device=param.device)
    return eye.reshape([param.numel()] + list(param.shape))


def entries_as_parameter(squares: Tensor, param: Tensor, per_sample: bool) -> Tensor:
    """``[P, N]`` -> ``[N, *p.shape]`` per sample, else summed over the samples."""
    if per_sample:
        return squares.t().reshape([squares.size(1)] + list(param.shape))
    return squares.sum(1).reshape(param.shape)


def modified_residual(residual: Tensor, mode: str) -> Tensor:
    """``m(R)``: ``R`` (identity), ``|R|`` (abs) or ``max(R, 0)`` (clip)."""
    if mode == "abs":
        return residual.abs()
    if mode == "clip":
        return residual.clamp(min=0.0)
    return residual


class TangentProducts:
    """Block products ``[V, *p.shape]`` of one curvature (``propagation``: the exact GGN, or
    the GGN plus residual parts with the signs of :data:`RESIDUAL_MODES`) by forward
    tangents, for the parameters whose path is a chain."""

    def __init__(self, emit: Emitter, traced, gradient: dict, propagation: Any):
        self.emit, self.traced, self.gradient = emit, traced, gradient
        self.supported = propagation.signs in RESIDUAL_MODES or (
            propagation.signs is None and propagation.factor == "exact")
        self.mode = RESIDUAL_MODES.get(propagation.signs)
        self.carriers = sample_carriers(traced.graph, traced.inputs[0])
        self._factor: Any = None
        self._residuals: dict[fx.Node, Any] = {}

    def product(self, name: str, vectors: Any) -> Optional[Any]:
        """``H_pp v`` for parameter ``name``, or None where its path is not a chain."""
        found = self._chain(name) if self.supported else None
        if found is None:
            return None
        (u, rule, arg), chain = found
        with self.emit.naming(f"{self.traced.params[name].name}_tangent", pass_="products"):
            tangents = self._sweep(found, vectors)
            g = self.emit.call(output_hessian_product, self._loss_factor(), tangents[-1])
            for (node, node_rule, node_arg), t_in in zip(reversed(chain),
                                                          reversed(tangents[:-1])):
                g = node_rule.vjp[node_arg](g, Ctx.of(node, node_rule, self.emit, 1))
                residual = self._residual(node, node_rule, node_arg)
                if residual is not None:
                    g = g + residual * t_in
            return rule.vjp[arg](g, Ctx.of(u, rule, self.emit, 1))

    def _sweep(self, found: tuple, vectors: Any) -> list:
        """The tangents ``[t_0, …, t_K]`` of ``vectors`` along the chain: ``t_0 = J_p v`` at
        the use's output, then one per chain op (``t_{i-1}`` is op ``i``'s input)."""
        (u, rule, arg), chain = found
        tangents = [rule.jvp[arg](vectors, Ctx.of(u, rule, self.emit, 1))]
        for node, node_rule, node_arg in chain:
            fn = node_rule.jvp.get(node_arg) or node_rule.vjp[node_arg]
            tangents.append(fn(tangents[-1], Ctx.of(node, node_rule, self.emit, 1)))
        return tangents

    def diagonal(self, name: str, per_sample: bool) -> Optional[Any]:
        """The Hessian's diagonal for parameter ``name`` (``[N, *p]`` per sample, else
        ``p.shape``) from the tangents of its ``P`` entries' unit vectors along its chain:
        ``Σ_c (s_c·t_K)²`` at the loss plus ``Σ_d R_d t_d²`` at every op with a residual.
        ``O(P·K)`` layer calls in place of the residual factors' ``O(Σ D)`` columns: only where
        the parameter's layer has at most :data:`MAX_DIAGONAL_TANGENTS` entries in all and no
        more than the factors would have columns there (:meth:`_columns_above`, else the
        factors are cheaper); None where it does not apply."""
        param = self.traced.params[name]
        found = self._chain(name) if self.mode == "identity" else None
        if found is None or (per_sample and self.traced.memo.get("merged_rows")):
            return None
        (u, rule, arg), chain = found
        params = set(self.traced.params.values())  # the layer's parameters, together: the
        entries = sum(self.traced.attrs[v.target].numel()  # factors reach it for any one
                      for v in rule.bind(u).values() if isinstance(v, fx.Node) and v in params)
        if entries > min(MAX_DIAGONAL_TANGENTS, self._columns_above(chain)):
            return None
        with self.emit.naming(f"{param.name}_tangent_diagonal", pass_="products"):
            vectors = self.emit.call(unit_vectors, self.emit.proxy(param))
            tangents = self._sweep(found, vectors)
            total = self.emit.call(output_squares, self._loss_factor(), tangents[-1])
            for step, t_in in zip(chain, tangents):
                residual = self._residual(*step)
                if residual is not None:
                    total = total + self.emit.call(residual_squares, residual, t_in)
            return self.emit.call(entries_as_parameter, total, self.emit.proxy(param),
                                  per_sample)

    def _columns_above(self, chain: list) -> int:
        """A lower bound of the residual factors' columns the parameter's diagonal would need
        (``Σ D`` of the residuals past the next layer on the chain; its own layer's residual
        needs no factor, ``diag_hessian.LocalResidual``): each residual's per-sample entries
        are at least the output features (``shape[0]`` of the parameter) of the last layer
        before it that pulls a diagonal back (``diagonal_squares``: linear, convolutions);
        0 where an op in between may change the width otherwise."""
        params = set(self.traced.params.values())
        total, width, past_layer = 0, 0, False
        for node, rule, arg in chain:
            others = [v for k, v in rule.bind(node).items()
                      if k != arg and isinstance(v, fx.Node) and v in params]
            if others and rule.diagonal_squares:
                width = max(self.traced.attrs[v.target].shape[0] for v in others)
                past_layer = True
            elif not (rule.has(ELEMENTWISE) or rule.has(RESHAPES) or rule.has(WINDOW_MAX)):
                width = 0
            if past_layer and not rule.zero_hessian(arg, rule.bind(node)):
                total += width
        return total

    def _loss_factor(self) -> Any:
        if self._factor is None:
            loss = self.traced.loss
            rule = rule_for(loss)
            with self.emit.naming(f"{loss.name}_sqrt_hessian_tangent", pass_="products"):
                self._factor = rule.loss.sqrt_hessian(Ctx.of(loss, rule, self.emit))
        return self._factor

    def _residual(self, node: fx.Node, rule, arg: str) -> Optional[Any]:
        """``m(R)`` of a chain op (``[N, *arg]``), or None (affine, or a GGN product)."""
        if self.mode is None or rule.zero_hessian(arg, rule.bind(node)):
            return None
        if node not in self._residuals:
            with self.emit.naming(f"{node.name}_tangent_residual", pass_="products"):
                residual = rule.residual[arg](self.gradient[node],
                                              Ctx.of(node, rule, self.emit))
                self._residuals[node] = self.emit.call(modified_residual, residual,
                                                       self.mode)
        return self._residuals[node]

    def _chain(self, name: str) -> Optional[tuple]:
        """``((u, rule, arg), [(n_i, rule_i, arg_i), ...])`` from the parameter's one use to
        the loss's input, or None."""
        loss_rule = rule_for(self.traced.loss)
        if loss_rule is None or not loss_rule.has_sqrt_hessian:
            return None
        end = loss_rule.bind(self.traced.loss)["input"]
        param = self.traced.params[name]
        first = _only_use(param, self.gradient)
        if first is None or first[0] not in self.carriers or \
                first[2] not in first[1].jvp:
            return None
        dependent = depends_on(self.traced.graph, [param])
        chain, node = [], first[0]
        while node is not end:
            step = _only_use(node, self.gradient)
            if step is None or not self._passes(step, dependent):
                return None
            chain.append(step)
            node = step[0]
        last = _only_use(end, self.gradient)
        if last is None or last[0] is not self.traced.loss:
            return None  # the loss's input also reaches the loss another way
        return first, chain

    def _passes(self, step: tuple, dependent: dict) -> bool:
        """The op has a tangent rule for the argument, keeps the samples, is affine in it or
        has its elementwise residual, and reads nothing else that depends on ``p``."""
        node, rule, arg = step
        bound = rule.bind(node)
        others = [v for k, v in bound.items() if k != arg and isinstance(v, fx.Node)]
        tangent = arg in rule.jvp or rule.sandwich.get(arg) == "diagonal"  # unary: J = Jᵀ
        second = self.mode is None or rule.zero_hessian(arg, bound) or arg in rule.residual
        return tangent and second and node in self.carriers and \
            not any(v in dependent for v in others)


def _only_use(value: fx.Node, gradient: dict) -> Optional[tuple]:
    """``(user, rule, arg)`` when exactly one user of ``value`` is on the way to the loss and
    reads it in exactly one argument; else None."""
    users = [user for user in value.users if user in gradient]
    if len(users) != 1:
        return None
    rule = rule_for(users[0])
    if rule is None:
        return None
    args = [k for k, v in rule.bind(users[0]).items() if v is value]
    if len(args) != 1:
        return None
    return users[0], rule, args[0]
