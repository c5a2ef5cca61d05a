"""Diagonal of the Hessian: the GGN plus every op's second-order residual (BackPACK's DiagHessian).

``∇²L = Σ_n J_nᵀ H_n J_n + Σ_ops Σ_n J_{op,n}ᵀ R_{op,n} J_{op,n}``, where ``R_op`` is the
op's residual ``Σ_out g ⊙ ∂²f/∂x²`` (``g`` the gradient at its output). For elementwise ops
``R`` is diagonal; it is split into its positive and negative parts, each with a square-root
factor ``diag(√R±)`` ``[D, N, *x.shape[1:]]`` that is propagated back from the op's input like
a sqrt-GGN factor. Then ``diag_h = diag_ggn_exact + Σ_residuals (‖J ᵀ√R₊‖² - ‖Jᵀ√R₋‖²)``.
Ops affine in each argument (linear, conv, relu, shape ops, ...) have no residual.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx
from torch import Tensor

from fxcurv.emit import Emitter
from fxcurv.errors import node_error
from fxcurv.rules import Ctx, rule_for

from ..analysis import ancestors, descendants
from ..backward import backward


def residual_sqrt(residual: Tensor, sign: float) -> Tensor:
    """``diag(√max(sign·R, 0))`` as a factor ``[D, N, *R.shape[1:]]``, ``D = R[0].numel()``."""
    part = (residual * sign).clamp(min=0.0).sqrt()
    samples = part.size(0)
    flat = part.reshape(samples, -1)
    eye = torch.eye(flat.size(1), dtype=part.dtype, device=part.device)
    factor = eye.unsqueeze(1) * flat.unsqueeze(0)                     # [D, N, D]
    return factor.reshape([flat.size(1)] + list(part.shape))


def residual_propagations(emit: Emitter, traced, gradient: dict, quantity: str,
                          make_source: Callable[[dict, Any], Any]) -> list[tuple[Any, float]]:
    """For every op with a second-order residual, the propagations of ``√R₊`` and ``√R₋``,
    each wrapped by ``make_source(cotangents, columns)``, with its sign."""
    params = list(traced.params.values())
    depends = _parameter_sets(traced.graph, traced.params)
    model = ancestors(traced.model_output)  # the loss region's curvature is in the GGN term
    per_sample = descendants(traced.graph, traced.inputs[0])  # values with a sample axis
    terms = []
    for node in list(traced.graph.nodes):
        if node not in gradient or node not in model or node.op not in ("call_function",
                                                                       "call_method"):
            continue
        rule = rule_for(node)
        ctx = Ctx.of(node, rule, emit)
        active = _active_args(ctx, depends)
        _check_cross_terms(node, rule, active, depends, quantity)
        for name, arg in active:
            if rule.zero_hessian(name, ctx.bound):
                continue
            if name not in rule.residual:
                raise node_error(node, f"{rule.name} has a non-zero second derivative in its "
                                 f"argument '{name}' but no diagonal residual rule",
                                 "Request the GGN (diag_ggn_exact) instead, or add a residual "
                                 "rule to this op.", quantity)
            if arg not in per_sample:
                raise node_error(node, f"the second derivative of {rule.name} in '{name}' acts "
                                 f"on a value without a sample axis (a parameter used "
                                 f"directly, e.g. x / w), which is not supported yet",
                                 "Request the GGN (diag_ggn_exact) instead.", quantity)
            with emit.naming(f"{node.name}_residual", pass_="diag_hessian", node=node.name):
                residual = rule.residual[name](gradient[node], ctx)
            for sign, tag in ((1.0, "plus"), (-1.0, "minus")):
                with emit.naming(f"{node.name}_residual_{tag}", pass_="diag_hessian"):
                    factor = emit.call(residual_sqrt, residual, sign)
                    columns = factor.size(0)
                cotangents = backward(emit, {arg: factor}, params, lead=1,
                                      tag=f"{node.name}_residual_{tag}", quantity=quantity)
                terms.append((make_source(cotangents, columns), sign))
    return terms


def _active_args(ctx: Ctx, depends: dict) -> list[tuple[str, fx.Node]]:
    """``(argument name, node)`` of the arguments that depend on a parameter."""
    found = []
    for name, value in ctx.bound.items():
        if isinstance(value, fx.Node) and depends.get(value):
            found.append((name, value))
    return found


def _check_cross_terms(node, rule, active, depends, quantity) -> None:
    """Two arguments that depend on the same parameter need ``∂²f/∂a∂b`` (not supported)."""
    if rule.jointly_affine or len(active) < 2:
        return
    for i, (name_a, a) in enumerate(active):
        for name_b, b in active[i + 1:]:
            shared = depends[a] & depends[b]
            if shared:
                raise node_error(node, f"its arguments '{name_a}' and '{name_b}' both depend on "
                                 f"parameter(s) {sorted(shared)}, which needs the cross "
                                 "second derivative", "Request the GGN (diag_ggn_exact) "
                                 "instead; cross terms are not supported yet.", quantity)


def _parameter_sets(graph: fx.Graph, params: dict) -> dict[fx.Node, frozenset]:
    """For each node, the names of the parameters its value depends on."""
    names = {node: name for name, node in params.items()}
    sets: dict[fx.Node, frozenset] = {}
    for node in graph.nodes:
        own = frozenset([names[node]]) if node in names else frozenset()
        sets[node] = own.union(*[sets.get(arg, frozenset()) for arg in node.all_input_nodes])
    return sets
