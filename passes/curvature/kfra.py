"""KFRA (Botev et al. 2017, BackPACK's ``KFRA``): Kronecker factors from a dense curvature
matrix propagated with batch averaging.

At the model output ``M = Σ_n H_n`` ``[D, D]`` (the loss Hessian summed over the batch, from
the exact factor: ``M = Σ_{c,n} S_cn S_cnᵀ``). Going back through an op with per-sample
Jacobians ``J_n``, ``M_in = (1/N) Σ_n J_nᵀ M_out J_n`` — computed with the op's own
Jacobian-transpose rule applied twice (rows, then columns) with one leading axis. At a
parameterised op the factor of the output curvature is ``G = M_out`` (its positions summed for
a convolution, like the bias GGN), obtained by feeding a square root ``L Lᵀ = M_out`` to the
op's Kronecker rule; the input factor ``A`` is KFLR's. Like BackPACK, KFRA is defined for
chains: every op has one data input and every value one reader.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import Tensor

from fxcurv.emit import Emitter
from fxcurv.errors import node_error
from fxcurv.rules import Ctx, rule_for

from ..analysis import ancestors
from .loss_hessian import loss_factor


def summed_outer(factor: Tensor) -> Tensor:
    """``Σ_{c,n} s sᵀ`` over the flattened per-sample entries of ``factor`` ``[C, N, *out]``."""
    flat = factor.reshape(factor.size(0) * factor.size(1), -1)
    return torch.matmul(flat.t(), flat)


def rows_as_cotangent(matrix: Tensor, like: Tensor) -> Tensor:
    """``[D, D]`` -> ``[D, N, *like.shape[1:]]``: each row a cotangent, the same for every n."""
    shape = [matrix.size(0), 1] + list(like.shape[1:])
    expanded = [matrix.size(0), like.size(0)] + list(like.shape[1:])
    return matrix.reshape(shape).expand(expanded)


def transpose_rows(rows: Tensor, like: Tensor) -> Tensor:
    """``[D_out, N, *in]`` (rows of ``M J_n``) -> ``[D_in, N, *like.shape[1:]]`` (of ``J_nᵀ M``)."""
    d_out, samples = rows.size(0), rows.size(1)
    flat = rows.reshape(d_out, samples, -1).permute(2, 1, 0)
    return flat.reshape([flat.size(0), samples] + list(like.shape[1:]))


def batch_mean_matrix(rows: Tensor) -> Tensor:
    """``[D, N, *in]`` -> ``(1/N) Σ_n`` as ``[D, D]``."""
    return rows.reshape(rows.size(0), rows.size(1), -1).mean(1)


def matrix_sqrt_factor(matrix: Tensor, like: Tensor) -> Tensor:
    """``L`` with ``L Lᵀ = matrix`` (symmetric PSD, by eigh), shaped ``[D, 1, *like.shape[1:]]``
    so that Kronecker rules read it as a factor of one sample."""
    values, vectors = torch.linalg.eigh(0.5 * (matrix + matrix.t()))
    root = vectors * values.clamp(min=0.0).sqrt().unsqueeze(0)
    return root.t().reshape([matrix.size(0), 1] + list(like.shape[1:]))


class KFRA:
    """Emits KFRA's factors for every parameter; ``kron(name, label)`` gives one's list."""

    def __init__(self, emit: Emitter, traced, gradient: dict, quantity: str):
        self.emit, self.traced, self.quantity = emit, traced, quantity
        self.gradient = gradient
        self.factors: dict[str, Any] = {}
        self._propagate()

    def kron(self, name: str, label: str) -> Any:
        if name not in self.factors:
            raise node_error(self.traced.params[name], f"parameter '{name}' does not reach the "
                             "loss through a KFRA chain", "Request kflr instead.", self.quantity)
        return self.factors[name]

    def _propagate(self) -> None:
        emit = self.emit
        node, factor = loss_factor(emit, self.traced, self.gradient, "exact", 1, self.quantity)
        with emit.naming(f"{node.name}_kfra"):
            matrix = emit.call(summed_outer, factor)
        emit.rename(matrix, f"{node.name}_kfra")
        params = set(self.traced.params.values())
        while node is not None and node not in params:
            node, matrix = self._step(node, matrix, params)

    def _step(self, node: fx.Node, matrix: Any, params: set) -> tuple:
        """Factors of ``node``'s parameters; the matrix at its data input (or None)."""
        rule = rule_for(node)
        if rule is None or rule.is_constant(node):
            return None, None
        ctx = Ctx.of(node, rule, self.emit, lead=1)
        data, param_args = self._arguments(node, ctx, params)
        with self.emit.naming(f"{node.name}_kfra", pass_="kfra", node=node.name):
            if param_args:
                root = self.emit.call(matrix_sqrt_factor, matrix, ctx.out)
            for arg, param in param_args:
                self._factors_of(node, rule, arg, param, root, ctx)
            if data is None:
                return None, None
            arg, value = data
            rows = rule.vjp[arg](self.emit.call(rows_as_cotangent, matrix, ctx.out), ctx)
            cols = rule.vjp[arg](self.emit.call(transpose_rows, rows, ctx.out), ctx)
            result = self.emit.call(batch_mean_matrix, cols)
        self.emit.rename(result, f"{value.name}_kfra")
        return value, result

    def _factors_of(self, node, rule, arg, param, root, ctx) -> None:
        name = param.target
        if arg not in rule.kron:
            raise node_error(node, f"{rule.name} has no Kronecker factorisation for its "
                             f"argument '{arg}' (parameter '{name}')",
                             "Request diag_ggn_* or sqrt_ggn_* for this parameter.",
                             self.quantity)
        factors = rule.kron[arg](root, ctx)
        for i, factor in enumerate(factors):
            self.emit.rename(factor, f"{param.name}_kfra_{i}")
        self.factors[name] = factors

    def _arguments(self, node: fx.Node, ctx: Ctx, params: set) -> tuple:
        """The one data argument that depends on parameters, and the parameter arguments."""
        data, param_args = [], []
        for arg, value in ctx.bound.items():
            if not isinstance(value, fx.Node) or ctx.node.op == "placeholder":
                continue
            rule_vjp = rule_for(node).vjp.get(arg)
            if value in params:
                param_args.append((arg, value))
            elif rule_vjp is not None and _depends_on(value, params):
                data.append((arg, value))
        if len(data) > 1 or (data and len(_forward_users(data[0][1])) > 1):
            raise node_error(node, "KFRA propagates one batch-averaged matrix along a chain, "
                             "and this op joins or splits branches", "Request kflr (exact) or "
                             "kfac (MC) instead; they handle any graph.", self.quantity)
        return (data[0] if data else None), param_args


def _forward_users(node: fx.Node) -> list[fx.Node]:
    """Readers of ``node`` in the model and loss (not the emitted derivative nodes)."""
    return [u for u in node.users
            if u.meta.get("fxcurv", {}).get("pass_") in (None, "normalize")]


def _depends_on(node: fx.Node, params: set) -> bool:
    return not params.isdisjoint(ancestors(node))
