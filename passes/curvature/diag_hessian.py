"""Diagonal of the Hessian: the GGN plus every op's second-order residual (BackPACK's DiagHessian).

``∇²L = Σ_n J_nᵀ H_n J_n + Σ_ops Σ_n J_{op,n}ᵀ R_{op,n} J_{op,n}``, where ``R_op`` is the
op's residual ``Σ_out g ⊙ ∂²f/∂x²`` (``g`` the gradient at its output). For elementwise ops
``R`` is diagonal; it is split into its positive and negative parts, each with a square-root
factor ``diag(√R±)`` ``[D, N, *x.shape[1:]]`` that is propagated back from the op's input like
a sqrt-GGN factor. Then ``diag_h = diag_ggn_exact + Σ_residuals (‖J ᵀ√R₊‖² - ‖Jᵀ√R₋‖²)``.
Ops affine in each argument (linear, conv, relu, shape ops, ...) have no residual.

A non-diagonal residual (softmax, layer_norm: ``residual_block``) is a dense per-sample
``R_n`` over the argument's ``D`` per-sample entries, block-diagonal with ``B`` blocks of
``K`` (a row of the softmax or layer_norm); ``eigh`` of each block splits it into
``S₊S₊ᵀ − S₋S₋ᵀ`` (:func:`eigen_sqrt`), ``D`` columns each, seeded on the argument like the
diagonal factors. A bilinear op whose two activations share a parameter (``q kᵀ``,
``weights · v``) has ``R_n = [[0, C_n], [C_nᵀ, 0]]``, split by the SVD of ``C_n``
(:func:`cross_sqrt`, ``min(Da, Db)`` columns seeded on both). Exact, at ``O(N B K³)`` (or
``O(N Da Db min(Da, Db))``) time per op and step and ``O(N D²)`` memory, as a diagonal
residual's factor; ``D`` above :data:`MAX_BLOCK_SIZE` is refused when the step runs (sizes
are not known before).
"""
from __future__ import annotations

import operator
from typing import Any, Callable, List

import torch
import torch.fx as fx
from torch import Tensor

from fxcurv.emit import Emitter
from fxcurv.errors import node_error
from fxcurv.rules import Ctx, rule_for

from ..analysis import ancestors, descendants, differentiable_inputs, sample_carriers
from ..backward import backward
from . import factors
from .factors import residual_sqrt
from .loss_hessian import eigen_sqrt, loss_negative_factor, symmetric_eigh

MAX_BLOCK_SIZE = 4096  # per-sample entries D = B·K of a residual block (factor: N·D² values)


def residual_propagations(emit: Emitter, traced, gradient: dict, quantity: str,
                          make_source: Callable[[dict, Any], Any]) -> list[tuple[Any, float]]:
    """For every op with a second-order residual (diagonal or cross), the propagations of its
    positive and negative square-root factors, each wrapped by ``make_source(cotangents,
    columns)``, with its sign."""
    params = list(traced.params.values())
    depends = _parameter_sets(traced.graph, traced.params)
    model = ancestors(traced.model_output)  # the loss region's curvature is in the GGN term
    per_sample = descendants(traced.graph, traced.inputs[0])  # values with a sample axis
    carriers = sample_carriers(traced.graph, traced.inputs[0])
    terms = []
    negative = loss_negative_factor(emit, traced, gradient, quantity)
    if negative is not None:  # a non-convex loss: its negative curvature, subtracted
        node, factor = negative
        with emit.naming("loss_hessian_negative"):
            columns = factor.size(0)
        cotangents = backward(emit, {node: factor}, params, lead=1,
                              tag="loss_hessian_minus", quantity=quantity)
        terms.append((make_source(cotangents, columns), -1.0))
    for node in list(traced.graph.nodes):
        if node not in gradient or node not in model or node.op not in ("call_function",
                                                                       "call_method"):
            continue
        rule = rule_for(node)
        ctx = Ctx.of(node, rule, emit)
        active = _active_args(ctx, depends)
        with emit.naming(f"{node.name}_residual", pass_="diag_hessian", node=node.name):
            seed_sets = _diagonal_seeds(emit, node, rule, ctx, active, gradient[node], quantity)
            seed_sets += _cross_seeds(emit, node, rule, ctx, active, depends, gradient[node],
                                      quantity)
            seed_sets += _block_seeds(emit, node, rule, ctx, active, depends, carriers,
                                      gradient[node], quantity)
        for seeds, sign, tag in seed_sets:
            for arg in seeds:
                _check_sample_axis(node, rule, arg, per_sample, quantity)
            with emit.naming(f"{node.name}_residual_{tag}", pass_="diag_hessian"):
                columns = next(iter(seeds.values())).size(0)
            cotangents = backward(emit, seeds, params, lead=1,
                                  tag=f"{node.name}_residual_{tag}", quantity=quantity)
            terms.append((make_source(cotangents, columns), sign))
    return terms


def _diagonal_seeds(emit, node, rule, ctx, active, g, quantity) -> list:
    """``({arg: √R±}, ±1, tag)`` for each argument with a diagonal residual ``R``."""
    found = []
    for name, arg in active:
        if rule.zero_hessian(name, ctx.bound) or (name,) in rule.residual_block:
            continue
        if name not in rule.residual:
            raise node_error(node, f"{rule.name} has a non-zero second derivative in its "
                             f"argument '{name}' but no diagonal residual rule",
                             "Request the GGN (diag_ggn_exact) instead, or add a residual "
                             "rule to this op.", quantity)
        residual = rule.residual[name](g, ctx)
        for sign, tag in ((1.0, "plus"), (-1.0, "minus")):
            factor = emit.call(residual_sqrt, residual, sign, _where(node, rule),
                               factors.MAX_RESIDUAL_FACTOR_BYTES)
            found.append(({arg: factor}, sign, f"{name}_{tag}"))
    return found


def _where(node: fx.Node, rule) -> str:
    """How a runtime error names the op: ``node 'tanh_1' (tanh)``."""
    return f"node '{node.name}' ({rule.name})"


def _cross_seeds(emit, node, rule, ctx, active, depends, g, quantity) -> list:
    """Cross terms of two arguments ``a, b`` that share parameters: with ``c`` the diagonal of
    ``Σ g ∂²f/∂a∂b``, ``2c·δa·δb = (c/2)[(δa + δb)² − (δa − δb)²]``, so the factors
    ``√(c±/2)`` are seeded on both arguments, with equal or opposite signs."""
    if rule.jointly_affine:
        return []
    found = []
    for i, (name_a, a) in enumerate(active):
        for name_b, b in active[i + 1:]:
            if not (depends[a] & depends[b]) or (name_a, name_b) in rule.residual_block:
                continue
            fn = rule.cross.get((name_a, name_b)) or rule.cross.get((name_b, name_a))
            if fn is None:
                raise node_error(node, f"its arguments '{name_a}' and '{name_b}' both depend "
                                 f"on parameter(s) {sorted(depends[a] & depends[b])}, and "
                                 f"{rule.name} has no cross second-derivative rule",
                                 "Request the GGN (diag_ggn_exact) instead.", quantity)
            half = emit.call(cross_half, fn(g, ctx), ctx.args.__dict__[name_a],
                             ctx.args.__dict__[name_b])
            roots = {sign: emit.call(residual_sqrt, half, sign, _where(node, rule),
                               factors.MAX_RESIDUAL_FACTOR_BYTES)
                     for sign in (1.0, -1.0)}
            for sign, same, opposite in ((1.0, 1.0, -1.0), (-1.0, -1.0, 1.0)):
                found.append((_pair(a, b, roots[same], roots[same]), sign, "cross_sum"))
                found.append((_pair(a, b, roots[opposite], -roots[opposite]), sign,
                              "cross_difference"))
    return [item for item in found if item[0]]


def _block_seeds(emit, node, rule, ctx, active, depends, carriers, g, quantity) -> list:
    """``({arg: S±}, ±1, tag)`` from each dense residual block whose arguments are all active
    (two arguments: only where they share a parameter, as for the diagonal cross terms)."""
    found, values = [], dict(active)
    for names, block_rule in rule.residual_block.items():
        args = [values.get(name) for name in names]
        if None in args or (len(args) > 1 and not frozenset.intersection(
                *[depends[arg] for arg in args])):
            continue
        for arg in args:
            _check_block_sample_axis(node, rule, arg, carriers, quantity)
        proxies = [emit.proxy(arg) for arg in args]
        checked = emit.call(checked_size, g, proxies, MAX_BLOCK_SIZE,
                            f"node '{node.name}' ({rule.name}) for quantity '{quantity}'")
        block, tag = block_rule(checked, ctx), "_".join(names)
        if len(args) == 1:
            eigen = emit.call(symmetric_eigh, block)          # once for both signs
        else:
            svd = emit.call(torch.linalg.svd, block, full_matrices=False)
        for sign, sign_tag in ((1.0, "plus"), (-1.0, "minus")):
            if len(args) == 1:
                factor = emit.call(block_sqrt, eigen[0], eigen[1], proxies[0], sign)
                seeds = {args[0]: factor}
            else:
                parts = emit.call(cross_sqrt, svd[0], svd[1], svd[2], proxies[0], proxies[1],
                                  sign)
                seeds = _pair(args[0], args[1], parts[0], parts[1])
            found.append((seeds, sign, f"{tag}_block_{sign_tag}"))
    return found


def checked_size(g: Tensor, values: List[Tensor], limit: int, where: str) -> Tensor:
    """``g``, after refusing a residual block over ``D = Σ value[0].numel() > limit``
    per-sample entries (before the block and its factor's ``N·D²`` values are built)."""
    size = 0
    for value in values:
        size += value[0].numel()
    if size > limit:
        raise RuntimeError(f"fxcurv: {where}: the exact second derivative needs a dense "
                           f"per-sample residual block of size {size} > {limit}; "
                           "request the GGN (diag_ggn_exact, ggnmp) for this model, or "
                           "shrink the op (fewer positions or heads per sample)")
    return g


def block_sqrt(values: Tensor, vectors: Tensor, like: Tensor, sign: float) -> Tensor:
    """``S`` ``[B·K, N, *like.shape[1:]]``, ``S_n S_nᵀ`` the positive (``sign = 1``) or negated
    negative part of the block-diagonal ``R_n`` from its blocks' eigenvalues ``[N, B, K]`` and
    vectors ``[N, B, K, K]``: each block's factor (:func:`eigen_sqrt`), its column ``(b, j)``
    zero outside block ``b``."""
    samples, count, size = values.size(0), values.size(1), values.size(2)
    flat = values.reshape(samples * count, size)
    factor = eigen_sqrt(flat, vectors.reshape(samples * count, size, size), flat, sign)
    factor = factor.reshape(size, samples, count, size).permute(2, 0, 1, 3)  # [B, K, N, K]
    eye = torch.eye(count, dtype=values.dtype, device=values.device)
    full = factor.unsqueeze(3) * eye.view(count, 1, 1, count, 1)          # [B, K, N, B, K]
    return full.reshape([count * size] + list(like.shape))


def cross_sqrt(u: Tensor, sigma: Tensor, vh: Tensor, a: Tensor, b: Tensor,
               sign: float) -> List[Tensor]:
    """Factors of a bilinear op's block ``R_n = [[0, C_n], [C_nᵀ, 0]]`` from the SVD
    ``C_n = U Σ Vᵀ`` (``u`` ``[N, Da, r]``, ``sigma`` ``[N, r]``, ``vh`` ``[N, r, Db]``):
    ``R_n = S₊S₊ᵀ − S₋S₋ᵀ`` with ``S± = [U; ±V] √(Σ/2)`` (its eigen-split: eigenvalues
    ``±σ``), ``r = min(Da, Db)`` columns; the parts on ``a`` and ``b``, ``[r, N, *a.shape[1:]]``,
    ``[r, N, *b.shape[1:]]``."""
    root = (sigma * 0.5).sqrt()
    lead = [sigma.size(1)]
    left = (u * root.unsqueeze(1)).permute(2, 0, 1)                      # [r, N, Da]
    right = (vh * root.unsqueeze(2)).permute(1, 0, 2) * sign             # [r, N, Db]
    return [left.reshape(lead + list(a.shape)), right.reshape(lead + list(b.shape))]


def _check_block_sample_axis(node, rule, arg, carriers, quantity) -> None:
    if arg not in carriers or node not in carriers:
        value = arg.name if arg not in carriers else "its output"
        raise node_error(node, f"a second derivative of {rule.name} acts on '{value}', a "
                         "value without the sample axis 0 (a parameter, or after an op that "
                         "moves or reduces the samples), so it has no per-sample block",
                         "Request the GGN (diag_ggn_exact) instead.", quantity)


def cross_half(coefficient: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``c / 2`` for the cross factors; the arguments must have the output's shape."""
    if a.shape != coefficient.shape or b.shape != coefficient.shape:
        raise ValueError("fxcurv: cross second-order terms need both arguments in the output's "
                         "shape (no broadcasting)")
    return coefficient * 0.5


def _pair(a: fx.Node, b: fx.Node, factor_a: Any, factor_b: Any) -> dict:
    """Seeds on ``a`` and ``b`` (one node: their sum, or nothing if they cancel)."""
    if a is not b:
        return {a: factor_a, b: factor_b}
    return {} if factor_b is not factor_a and _negated(factor_a, factor_b) else \
        {a: factor_a + factor_b}


def _negated(first: Any, second: Any) -> bool:
    node = getattr(second, "node", None)
    return node is not None and node.target is operator.neg and node.args[0] is first.node


def _check_sample_axis(node, rule, arg, per_sample, quantity) -> None:
    if arg not in per_sample:
        raise node_error(node, f"a second derivative of {rule.name} acts on '{arg.name}', a "
                         f"value without a sample axis (a parameter used directly, e.g. "
                         f"x / w), which is not supported yet",
                         "Request the GGN (diag_ggn_exact) instead.", quantity)


def _active_args(ctx: Ctx, depends: dict) -> list[tuple[str, fx.Node]]:
    """``(argument name, node)`` of the arguments that depend on a parameter."""
    found = []
    for name, value in ctx.bound.items():
        if isinstance(value, fx.Node) and depends.get(value):
            found.append((name, value))
    return found


def _parameter_sets(graph: fx.Graph, params: dict) -> dict[fx.Node, frozenset]:
    """For each node, the names of the parameters its value depends on differentiably (not
    through sizes: ``q.size(-1) ** -0.5`` is a constant)."""
    names = {node: name for name, node in params.items()}
    sets: dict[fx.Node, frozenset] = {}
    for node in graph.nodes:
        own = frozenset([names[node]]) if node in names else frozenset()
        sets[node] = own.union(*[sets.get(arg, frozenset())
                                 for arg in differentiable_inputs(node)])
    return sets
