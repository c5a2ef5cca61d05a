"""The loss Hessian w.r.t. the model output for any loss written with supported ops.

A loss that ends in a built-in loss op (cross-entropy, MSE, BCE-with-logits) uses that op's
square root directly. Any other loss ``L(f)`` — a plain callable, post-loss arithmetic such as
``2 * ce + 0.5 * (f ** 2).mean()`` — gets its per-sample Hessian ``H_n = ∂²L/∂f_n²`` assembled
from second-order sources inside the loss region, each propagated back to ``f`` with the
Jacobian-transpose rules (one leading axis):

* an inner built-in loss reached with cotangent ``g``: its factor ``S`` times ``√g₊`` / ``√g₋``;
* an elementwise op with residual ``R = Σ g ⊙ f''``: ``diag(√R₊)`` / ``diag(√R₋)``;
* an elementwise op of two arguments that both depend on ``f`` (``(f - y)²/v`` with ``v`` a
  variance head, ``x/‖x‖``) with cross coefficient ``c = Σ g ∂²y/∂a∂b``: ``diag(√(c/2)₊)``
  seeded at both arguments (``e_a + e_b``) and at ``a`` and ``-b`` (``e_a - e_b``), the two
  with opposite signs;
* an op with a dense per-sample residual block (``log_softmax``, ``softmax``): the eigen-parts
  of each block.

``H_n = Σ₊ Φ Φᵀ - Σ₋ Φ Φᵀ`` ``[N, C, C]`` (``C`` entries per sample of ``f``) is then factorised
per sample by ``eigh``: ``S_n = V √max(Λ, 0)``, ``[C, N, *f]``. Cost: one propagation per
source through the loss region, plus an ``O(N C³)`` eigendecomposition per step. The GGN
family uses the positive part (it needs a positive semi-definite ``H``); the Hessian family
also subtracts the negative part ``V √max(−Λ, 0)``, so ``diag_h`` / ``hmp`` stay exact for a
non-convex loss (``pchmp_abs`` adds it, ``pchmp_clip`` drops it).
A loss linear in one built-in loss ``ℓ`` (``2 * ce``, ``ce + lam * (w ** 2).sum()``: a
regulariser lies outside the loss region) skips the assembly: its factor is ``ℓ``'s, scaled by
``√max(±g, 0)`` (``g`` the cotangent reaching ``ℓ``). Monte-Carlo factors need a likelihood,
so they require a built-in final loss, such a linear one, or a sum of built-in losses with
non-negative weights (multi-task heads, auxiliary classifiers: :func:`loss_seeds`).
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.fx as fx
from torch import Tensor

from fxcurv.emit import Emitter
from fxcurv.errors import node_error
from fxcurv.rules import Ctx, rule_for
from fxcurv.rules.helpers import sum_to_shape

from ..analysis import ancestors, depends_on
from ..backward import backward
from . import factors
from .factors import residual_sqrt
from .second_order import BLOCK, CROSS, RESIDUAL, ZERO, classify, linear_in


def scaled_by_root(factor: Tensor, weight: Tensor, sign: float) -> Tensor:
    """``factor · √max(sign·weight, 0)`` (``weight`` a scalar cotangent)."""
    return factor * (weight * sign).clamp(min=0.0).sqrt()


def signed_gram(factor: Tensor, sign: float) -> Tensor:
    """``sign · Σ_k Φ_kn Φ_knᵀ`` per sample: ``[K, N, *f]`` -> ``[N, C, C]``."""
    flat = factor.reshape(factor.size(0), factor.size(1), -1)
    return torch.einsum("knc,knd->ncd", flat, flat) * sign


def per_sample_sqrt(hessian: Tensor, like: Tensor, sign: float) -> Tensor:
    """``S`` ``[C, N, *like.shape[1:]]`` with ``S_n S_nᵀ`` the positive (``sign = 1``) or the
    negated negative (``sign = -1``) eigen-part of ``H_n``: ``H_n = S₊S₊ᵀ − S₋S₋ᵀ``."""
    values, vectors = symmetric_eigh(hessian)
    return eigen_sqrt(values, vectors, like, sign)


def symmetric_eigh(hessian: Tensor) -> Tuple[Tensor, Tensor]:
    """``eigh`` of the symmetric part of each ``[..., C, C]`` matrix."""
    values, vectors = torch.linalg.eigh(0.5 * (hessian + hessian.transpose(-1, -2)))
    return values, vectors


def eigen_sqrt(values: Tensor, vectors: Tensor, like: Tensor, sign: float) -> Tensor:
    """:func:`per_sample_sqrt` from ``H_n``'s eigenvalues ``[N, C]`` and vectors ``[N, C, C]``."""
    factor = vectors * (values * sign).clamp(min=0.0).sqrt().unsqueeze(1)   # [N, C, C]
    return factor.permute(2, 0, 1).reshape([factor.size(2)] + list(like.shape))


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


def assembled_sqrt_hessian(emit: Emitter, traced, gradient: dict,
                           sign: float = 1.0) -> Any:
    """The factor ``[C, N, *f]`` of a general loss region's positive (``sign = 1``) or negative
    (``sign = -1``) curvature (see the module docstring); the Hessian is assembled once."""
    if "loss_hessian" not in traced.memo:
        traced.memo["loss_hessian"] = _assembled_hessian(emit, traced, gradient)
    tag = "plus" if sign > 0 else "minus"
    with emit.naming(f"loss_hessian_{tag}"):
        return emit.call(per_sample_sqrt, traced.memo["loss_hessian"],
                         emit.proxy(traced.model_output), sign)


def _assembled_hessian(emit: Emitter, traced, gradient: dict) -> Any:
    """``H_n = ∂²L/∂f_n²`` ``[N, C, C]`` from the loss region's second-order sources."""
    output = traced.model_output
    sources = _second_order_sources(emit, traced, gradient)
    if not sources:
        raise node_error(traced.loss, "the loss is linear in the model output, so its Hessian "
                         "(and the GGN) is zero", "Check the loss function.")
    total = None
    for seed_node, factor, sign, tag in sources:
        seeds = seed_node if isinstance(seed_node, dict) else {seed_node: factor}
        cotangents = backward(emit, seeds, [output], lead=1, tag=f"loss_hessian_{tag}")
        gram = emit.call(signed_gram, cotangents[output], sign)
        total = gram if total is None else total + gram
    emit.rename(total, "loss_hessian")
    return total


def _second_order_sources(emit: Emitter, traced, gradient: dict) -> list:
    """``(node to seed, factor, sign, tag)`` for every second-order term of the loss region."""
    region = _loss_region(traced)
    found = []
    for node in region:
        rule = rule_for(node)
        if rule is None or node not in gradient or rule.is_constant(node):
            continue
        ctx = Ctx.of(node, rule, emit)
        active = [(a, v) for a, v in ctx.bound.items() if isinstance(v, fx.Node)
                  and (v in region or v is traced.model_output)]
        if rule.has_sqrt_hessian:
            found += _inner_loss(emit, node, rule, ctx, gradient, region)
            continue
        values = dict(active)
        terms = classify(rule, ctx.bound, list(values))
        _check_cross_terms(node, terms)
        for term in terms:
            if term.kind == ZERO:
                continue
            if term.kind == CROSS:
                _check_separable(node, region)
                found += _cross_sources(emit, node, ctx, term, values, gradient)
                continue
            arg = term.names[0]
            if term.kind == BLOCK and len(term.names) == 1:
                found += _block_sources(emit, node, rule, ctx, term, values[arg], gradient,
                                        region)
                continue
            if term.kind != RESIDUAL:
                raise node_error(node, f"{rule.name} has a non-zero second derivative in "
                                 f"'{arg}' and no diagonal residual rule, so the loss Hessian "
                                 "cannot be assembled", "Write the loss with elementwise ops "
                                 "and built-in losses.")
            _check_separable(node, region)
            value = values[arg]
            with emit.naming(f"{node.name}_loss_residual"):
                residual = term.fn(gradient[node], ctx)
            for sign, tag in ((1.0, "plus"), (-1.0, "minus")):
                factor = emit.call(residual_sqrt, residual, sign,
                                   f"node '{node.name}' ({rule.name})",
                                   factors.MAX_RESIDUAL_FACTOR_BYTES)
                found.append((value, factor, sign, f"{node.name}_{tag}"))
    return found


def _block_sources(emit, node, rule, ctx, term, value, gradient, region) -> list:
    """A dense per-sample residual block ``R_n`` ``[N, B, K, K]`` (``log_softmax``, ``softmax``
    over classes): its eigen-parts ``R_n = S₊S₊ᵀ - S₋S₋ᵀ`` seeded at the argument."""
    if rule.mixes_samples and rule.mixes_samples(ctx.bound):
        raise node_error(node, f"{rule.name} mixes the samples, so the loss is not a sum of "
                         "per-sample terms", "Apply it per sample (not over axis 0).")
    _check_separable(node, region)
    with emit.naming(f"{node.name}_loss_block"):
        eigen = emit.call(symmetric_eigh, term.fn(gradient[node], ctx))
    return [(value, emit.call(block_sqrt, eigen[0], eigen[1], emit.proxy(value), sign), sign,
             f"{node.name}_{tag}") for sign, tag in ((1.0, "plus"), (-1.0, "minus"))]


def _inner_loss(emit, node, rule, ctx, gradient, region) -> list:
    """A built-in loss inside the loss region, weighted by the cotangent that reaches it."""
    if ctx.bound.get("reduction") == "none":
        raise node_error(node, "a built-in loss with reduction='none' inside the loss",
                         "Use reduction 'mean' or 'sum'.")
    _check_separable(node, region)
    with emit.naming(f"{node.name}_sqrt_hessian"):
        base = rule.loss.sqrt_hessian(ctx)
    sources = []
    for sign, tag in ((1.0, "plus"), (-1.0, "minus")):
        factor = emit.call(scaled_by_root, base, gradient[node], sign)
        sources.append((ctx.bound["input"], factor, sign, f"{node.name}_{tag}"))
    return sources


def _loss_region(traced) -> dict[fx.Node, None]:
    """Nodes between the model output and the loss, in graph order: those that depend
    differentiably on the output (``out.shape[0]``, ``out.numel()`` are sizes, constants)."""
    below = depends_on(traced.graph, [traced.model_output])
    above = ancestors(traced.loss)
    return {n: None for n in traced.graph.nodes if n in below and n in above
            and n is not traced.model_output}


def _check_separable(node: fx.Node, region: dict) -> None:
    """A second-order term after a reduction over samples would couple the samples."""
    ancestor = _mixing_ancestor(node, region)
    if ancestor is not None:
        raise node_error(node, "this second-order term of the loss comes after a "
                         f"reduction over the samples (node '{ancestor.name}'), so the "
                         "loss is not a sum of per-sample terms", "Write the loss as a "
                         "sum or mean of per-sample terms.")


def _mixing_ancestor(node: fx.Node, region: dict) -> Optional[fx.Node]:
    """The first op of the loss region before ``node`` that reduces over samples, or None."""
    above = ancestors(node)
    for ancestor in region:
        rule = rule_for(ancestor)
        if ancestor in above and ancestor is not node and rule is not None and \
                rule.mixes_samples and rule.mixes_samples(rule.bind(ancestor)):
            return ancestor
    return None


def _cross_sources(emit, node, ctx, term, values, gradient) -> list:
    """An elementwise cross term ``c = Σ g ∂²f/∂a∂b`` (shaped like the output, ``a`` and ``b``
    broadcast to it): per output entry ``i`` it adds ``c_i (e_aᵢ e_bᵢᵀ + e_bᵢ e_aᵢᵀ) =
    ½c_i (u uᵀ - w wᵀ)`` with ``u = e_aᵢ + e_bᵢ``, ``w = e_aᵢ - e_bᵢ``. Each of ``u``, ``w`` is
    seeded at both arguments (summed back over broadcast axes) with ``diag(√max(±c/2, 0))``:
    ``√(c₊/2) u`` and ``√(c₋/2) w`` add curvature, the other two subtract it."""
    a, b = (values[name] for name in term.names)
    with emit.naming(f"{node.name}_loss_cross"):
        half = term.fn(gradient[node], ctx) * 0.5
    sources = []
    for sign, tag in ((1.0, "plus"), (-1.0, "minus")):
        diagonal = emit.call(residual_sqrt, half, sign, f"node '{node.name}' (cross term)",
                             factors.MAX_RESIDUAL_FACTOR_BYTES)
        for pair, flip in (("u", 1.0), ("w", -1.0)):
            seeds: dict = {}
            for value, scale in ((a, 1.0), (b, flip)):
                part = emit.call(sum_to_shape, diagonal if scale > 0 else -diagonal, 1,
                                 emit.proxy(value).shape)
                seeds[value] = part if value not in seeds else seeds[value] + part
            sources.append((seeds, None, sign * flip, f"{node.name}_{pair}_{tag}"))
    return sources


def _check_cross_terms(node, terms: list) -> None:
    crossed = [t.names for t in terms if len(t.names) == 2 and t.kind not in (ZERO, CROSS)]
    if crossed:
        names = ", ".join(crossed[0])
        raise node_error(node, f"its arguments {names} all depend on the model output, which "
                         "needs cross second derivatives (not supported yet)",
                         "Rewrite the loss so each op has one argument that depends on the "
                         "model output.")


def check_monte_carlo(loss: fx.Node) -> None:
    """MC factors sample the model's likelihood, which only a built-in final loss defines."""
    raise node_error(loss, "Monte-Carlo curvature samples targets from the likelihood of a "
                     "built-in loss, and this loss is not one", "Use the exact quantity "
                     "(e.g. diag_ggn_exact, kflr), or end the loss in cross_entropy, mse_loss "
                     "or binary_cross_entropy_with_logits (or a sum of such losses with "
                     "non-negative weights).")




def loss_seeds(emit: Emitter, traced, gradient: dict, kind: str, mc_samples: int,
               low_rank: bool = False) -> dict:
    """``{node: S}``, square-root factors whose backward propagations sum to one of the loss
    Hessian: :func:`loss_factor`'s one factor, or, for Monte-Carlo factors of a loss that is
    a weighted sum of several built-in losses (``ce(out["out"]) + 0.5 * ce(out["aux"])``),
    each loss's sampled factor times ``√weight`` at its input: drawn independently with the
    same number of columns, their propagated sum ``S`` has ``E[S Sᵀ] = Σ_i w_i J_iᵀ H_i J_i``,
    the loss Hessian (the weights are checked to be non-negative when the step runs)."""
    final = rule_for(traced.loss)
    builtin = final is not None and final.has_sqrt_hessian
    losses = [] if kind == "exact" or builtin else _linear_inner_losses(traced)
    if len(losses) < 2:
        node, factor = loss_factor(emit, traced, gradient, kind, mc_samples, low_rank)
        return {node: factor}
    seeds = {}
    for inner in losses:
        rule = rule_for(inner)
        ctx = Ctx.of(inner, rule, emit)
        with emit.naming(f"{inner.name}_sqrt_hessian_{kind}", pass_="sqrt_ggn"):
            base = rule.loss.sqrt_hessian_mc(ctx, mc_samples)
            factor = emit.call(scaled_by_weight_root, base, gradient[inner],
                               f"node '{inner.name}'")
        node = ctx.bound["input"]
        seeds[node] = seeds[node] + factor if node in seeds else factor
    return seeds


def scaled_by_weight_root(factor: Tensor, weight: Tensor, where: str) -> Tensor:
    """``factor · √weight`` for a built-in loss's weight ``∂L/∂ℓ`` in a sum of losses,
    after checking it is not negative (the sum's sampled factors need convex terms)."""
    if bool(weight < 0):
        raise ValueError("fxcurv: {} enters the loss with a negative weight, so Monte-Carlo "
                         "curvature of the sum is undefined; use the exact quantity"
                         .format(where))
    return factor * weight.sqrt()


def loss_factor(emit: Emitter, traced, gradient: dict, kind: str, mc_samples: int,
                low_rank: bool = False) -> tuple[fx.Node, Any]:
    """``(node, S)``: a square-root factor of the loss Hessian w.r.t. ``node``'s value.

    A built-in final loss gives its own factor at its input (exact or sampled; ``low_rank``:
    its exact factor with fewer columns where it has one); any other loss gives the
    assembled exact factor at the model output.
    """
    loss = traced.loss
    rule = rule_for(loss)
    if rule is not None and rule.has_sqrt_hessian:
        ctx = Ctx.of(loss, rule, emit)
        exact = rule.loss.sqrt_hessian_low_rank if low_rank and \
            rule.loss.sqrt_hessian_low_rank is not None else rule.loss.sqrt_hessian
        with emit.naming(f"{loss.name}_sqrt_hessian_{kind}", pass_="sqrt_ggn"):
            factor = exact(ctx) if kind == "exact" else \
                rule.loss.sqrt_hessian_mc(ctx, mc_samples)
        emit.rename(factor, f"loss_sqrt_hessian_{kind}")
        return ctx.bound["input"], factor
    inner = _linear_inner_loss(traced)
    if inner is not None:
        return _scaled_inner_factor(emit, inner, gradient, kind, mc_samples, 1.0)
    if kind != "exact":
        check_monte_carlo(loss)
    factor = assembled_sqrt_hessian(emit, traced, gradient)
    emit.rename(factor, "loss_sqrt_hessian_exact")
    return traced.model_output, factor


def _scaled_inner_factor(emit: Emitter, inner: fx.Node, gradient: dict, kind: str,
                         mc_samples: int, sign: float) -> tuple[fx.Node, Any]:
    """The factor of a loss that is linear in one built-in loss ``ℓ`` (``2 * ce``,
    ``ce + lam * (w ** 2).sum()``: the regulariser lies outside the loss region), at ``ℓ``'s
    input: there ``L``'s Hessian is ``g · H_ℓ`` (``g = ∂L/∂ℓ``), so ``√max(±g, 0) S`` gives
    its positive / negative part (exact or sampled ``S``), no assembly or ``eigh`` needed."""
    rule = rule_for(inner)
    ctx = Ctx.of(inner, rule, emit)
    tag = kind if sign > 0 else "negative"
    with emit.naming(f"{inner.name}_sqrt_hessian_{tag}", pass_="sqrt_ggn"):
        base = rule.loss.sqrt_hessian(ctx) if kind == "exact" else \
            rule.loss.sqrt_hessian_mc(ctx, mc_samples)
        factor = emit.call(scaled_by_root, base, gradient[inner], sign)
    emit.rename(factor, f"loss_sqrt_hessian_{tag}")
    return ctx.bound["input"], factor


def _linear_inner_loss(traced) -> Any:
    """The loss region's one built-in loss (reduced), if every other op of the region is
    linear in its region arguments (no residual, no cross terms); else None."""
    losses = _linear_inner_losses(traced)
    return losses[0] if len(losses) == 1 else None


def _linear_inner_losses(traced) -> list:
    """The loss region's built-in losses (reduced), if every other op of the region is
    linear in its region arguments (a weighted sum of built-in losses, of pieces of the
    output or of several outputs: ``ce(out["out"]) + 0.5 * ce(out["aux"])``); else []."""
    region = _loss_region(traced)
    inside = {**region, traced.model_output: None}
    losses = [n for n in region if rule_for(n) is not None and
              rule_for(n).has_sqrt_hessian]
    if any(rule_for(n).bind(n).get("reduction") == "none" or
           _mixing_ancestor(n, region) is not None for n in losses):
        return []
    for node in region:
        rule = rule_for(node)
        if node in losses or (rule is not None and rule.is_constant(node)):
            continue
        if rule is None or not linear_in(node, rule, inside):
            return []
    return losses


def loss_negative_factor(emit: Emitter, traced, gradient: dict):
    """``(node, S₋)`` for a loss whose Hessian is assembled (it may have negative curvature,
    which the Hessian family subtracts); None for a built-in final loss (convex)."""
    rule = rule_for(traced.loss)
    if rule is not None and rule.has_sqrt_hessian:
        return None
    inner = _linear_inner_loss(traced)
    if inner is not None:
        return _scaled_inner_factor(emit, inner, gradient, "exact", 1, -1.0)
    factor = assembled_sqrt_hessian(emit, traced, gradient, sign=-1.0)
    emit.rename(factor, "loss_sqrt_hessian_negative")
    return traced.model_output, factor
