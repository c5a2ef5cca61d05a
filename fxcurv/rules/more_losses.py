"""More of PyTorch's losses: KL divergence, BCE on probabilities, Gaussian and Poisson negative
log-likelihoods, soft-margin losses, cosine similarity.

All but BCE are *lowered*: rewritten as PyTorch computes them (``torch/nn/functional.py`` and
ATen's ``Loss.cpp``/``Distance.cpp``, op for op) from ruled ops, so every quantity follows from
those ops' rules and the loss region's assembled Hessian. Where PyTorch changes a value under
``no_grad`` (Gaussian NLL's variance, cosine similarity's norms clamped at ``eps``), the
lowering keeps the gradient of the unclamped value: ``where(v < eps, v - v.detach() + eps, v)``.
BCE on probabilities has its own rule: PyTorch's ``log1p`` and its clamped backward
``(p - y)/max(p(1 - p), 1e-12)`` (exact at saturated ``p = 0`` or ``1``) have no ruled spelling.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor
from torch.nn import _reduction as _Reduction

from ..errors import node_error
from .losses import (negative_curvature, _legacy_args, _loss_vjp, _regression, assert_all,
                     diagonal_sqrt_hessian)
from .registry import Ctx, affine, loss, register
from .reductions import norm_of

_LEGACY = "size_average=None, reduce=None, reduction='mean'"


def _reduction_of(b: dict) -> str:
    """The reduction PyTorch applies: the deprecated ``size_average``/``reduce`` win."""
    if b.get("size_average") is not None or b.get("reduce") is not None:
        return _Reduction.legacy_get_string(b.get("size_average"), b.get("reduce"),
                                            emit_warning=False)
    return b["reduction"]


def _known_reduction(*allowed: str):
    """``unsupported``: a reduction PyTorch rejects (it raises) is refused."""
    allowed = allowed or ("mean", "sum", "none")

    def check(b: dict) -> Optional[str]:
        if _reduction_of(b) not in allowed:
            return f"reduction {b['reduction']!r} is unknown"
        return None
    return check


def _reduce(values, reduction: str):
    if reduction == "mean":
        return values.mean()
    return values.sum() if reduction == "sum" else values


def _clamped_min(v, low: float):
    """``max(v, low)`` in value with ``v``'s gradient everywhere: PyTorch's ``clamp_min_`` of
    a clone under ``no_grad`` (``v - v.detach()`` is 0 and carries the gradient)."""
    return torch.where(v < low, v - v.detach() + low, v)


def _reduced_loss(targets: list, name: str, params: str, doc: str, values, **fields):
    """Register a loss lowered to ``values(c)`` (per entry or per sample) and PyTorch's
    reduction (the deprecated ``size_average``/``reduce`` honoured)."""
    fields.setdefault("unsupported", _known_reduction())
    register(targets, name, params, doc=doc, **fields,
             lower=lambda c: _reduce(values(c), _reduction_of(c.bound)))


# -- KL divergence ----------------------------------------------------------------------------
def _lower_kl_div(c: Ctx):
    """``ℓ = xlogy(t, t) - t f`` (``log_target``: ``eᵗ (t - f)``), ATen's ``kl_div``;
    ``xlogy(t, t) = t log t`` with 0 at ``t = 0``, written ``t log(where(t = 0, 1, t))`` (no
    ``0 · log 0`` anywhere). Linear in ``f``: the curvature comes from what feeds it
    (``log_softmax``). ``batchmean``: the sum over the size of axis 0."""
    x, t = c.args.input, c.args.target
    if c.bound["log_target"]:
        pointwise = torch.exp(t) * (t - x)
    else:
        pointwise = t * torch.log(torch.where(t == 0, torch.ones_like(t), t)) - t * x
    reduction = _reduction_of({**c.bound, "reduction": "sum" if c.bound["reduction"] ==
                               "batchmean" else c.bound["reduction"]})
    reduced = _reduce(pointwise, reduction)
    return reduced / x.size(0) if c.bound["reduction"] == "batchmean" else reduced


register([F.kl_div], "kl_div", f"input, target, {_LEGACY}, log_target=False",
         doc="ℓ = t(log t - f) (log_target: eᵗ(t - f));  ∂ℓ/∂f = -t (-eᵗ), ∂²ℓ/∂f² = 0; "
             "lowered to log, exp, where, mul and the reduction (batchmean: sum / N).",
         lower=_lower_kl_div,
         unsupported=_known_reduction("mean", "sum", "none", "batchmean"))


# -- Gaussian negative log-likelihood -----------------------------------------------------------
def gaussian_nll_variance_shape(input: List[int], var: List[int]) -> List[int]:
    """The shape PyTorch gives ``var`` against ``input``: the same, one trailing axis added
    (``var`` has ``input``'s shape without its last axis), or ``var``'s own where it differs
    from ``input`` in one axis of size 1; otherwise PyTorch's ValueError."""
    input, var = list(input), list(var)
    if var == input:
        return var
    if input[:-1] == var:
        return var + [1]
    if len(input) == len(var):
        mismatched = 0
        for a, b in zip(input, var):
            if a != b:
                mismatched += b
        if mismatched == 1:
            return var
    raise ValueError("var is of incorrect size")


def check_variance(var: Tensor) -> Tensor:
    """PyTorch's check that no variance is negative (a ValueError there); the identity."""
    assert_all(torch.logical_not((var < 0).any()), "var has negative entry/entries")
    return var


affine([check_variance], "check_variance", "var",
       doc="Call-time check that a variance has no negative entry; the identity.",
       vjp={"var": lambda g, c: g})


def _lower_gaussian_nll(c: Ctx):
    """``ℓ = ½(log v + (f - y)²/v)`` (``+ ½ log 2π`` if full), ``v = max(var, eps)`` with the
    gradient of ``var`` (PyTorch clamps under ``no_grad``); ``var`` checked and shaped as
    PyTorch does (a float: ``var · ones_like(f)``)."""
    x, var = c.args.input, c.args.var
    if isinstance(c.bound["var"], fx.Node):
        var = c.call(check_variance, var)
        var = var.reshape(c.call(gaussian_nll_variance_shape, x.shape, var.shape))
    else:
        var = var * torch.ones_like(x)
    var = _clamped_min(var, c.bound["eps"])
    values = 0.5 * (torch.log(var) + (x - c.args.target) ** 2 / var)
    if c.bound["full"]:
        values = values + 0.5 * math.log(2 * math.pi)
    return _reduce(values, c.bound["reduction"])


def _gaussian_nll_unsupported(b: dict) -> Optional[str]:
    var = b["var"]
    if not isinstance(var, (fx.Node, float)):
        return f"gaussian_nll_loss with var of type {type(var).__name__} (PyTorch takes a " \
               "tensor or a float)"
    if isinstance(var, float) and var < 0:
        return "gaussian_nll_loss with a negative var"
    return _known_reduction()(b)


register([F.gaussian_nll_loss], "gaussian_nll_loss",
         "input, target, var, full=False, eps=1e-06, reduction='mean'",
         doc="ℓ = ½(log v + (f - y)²/v), v = max(var, eps);  ∂ℓ/∂f = (f - y)/v, "
             "∂ℓ/∂v = ½(1/v - (f - y)²/v²) (unclamped gradient, as PyTorch);  lowered to log, "
             "pow, div, where and the reduction (a variance head's cross terms included).",
         lower=_lower_gaussian_nll, unsupported=_gaussian_nll_unsupported)


# -- Poisson negative log-likelihood ------------------------------------------------------------
def _lower_poisson_nll(c: Ctx):
    """ATen's ``poisson_nll_loss``: ``eᶠ - y f`` (log_input) or ``f - y log(f + eps)``, plus
    the Stirling term ``y log y - y + ½ log(2πy)`` where ``y > 1`` if full."""
    x, t = c.args.input, c.args.target
    if c.bound["log_input"]:
        values = torch.exp(x) - t * x
    else:
        values = x - t * torch.log(x + c.bound["eps"])
    if c.bound["full"]:
        stirling = t * torch.log(t) - t + 0.5 * torch.log(2 * math.pi * t)
        values = values + stirling.masked_fill(t <= 1, 0)
    return values


_reduced_loss([F.poisson_nll_loss], "poisson_nll_loss",
              "input, target, log_input=True, full=False, size_average=None, eps=1e-08, "
              "reduce=None, reduction='mean'",
              doc="ℓ = eᶠ - y f (log_input) or f - y log(f + eps);  ∂²ℓ/∂f² = eᶠ or "
                  "y/(f + eps)²;  lowered to exp, log, mul and the reduction.",
              values=_lower_poisson_nll)


# -- soft-margin losses ---------------------------------------------------------------------------
def _lower_soft_margin(c: Ctx):
    """ATen's ``log1p(exp(-y f))``: ``softplus`` without its linear threshold."""
    return F.softplus(-c.args.input * c.args.target, 1.0, math.inf)


_reduced_loss([F.soft_margin_loss], "soft_margin_loss", f"input, target, {_LEGACY}",
              doc="ℓ = log(1 + e^{-y f});  ∂ℓ/∂f = -y σ(-y f), ∂²ℓ/∂f² = y² σ(y f)σ(-y f);  "
                  "lowered to softplus and the reduction.",
              values=_lower_soft_margin)


def _lower_multilabel_soft_margin(c: Ctx):
    """PyTorch's ``-(y logσ(f) + (1 - y) logσ(-f))`` (times ``weight``), summed over the last
    axis and divided by its size, then reduced."""
    x, t = c.args.input, c.args.target
    values = -(t * F.logsigmoid(x) + (1 - t) * F.logsigmoid(-x))
    if c.bound["weight"] is not None:
        values = values * c.args.weight
    return values.sum(dim=-1) / x.size(-1)


_reduced_loss([F.multilabel_soft_margin_loss], "multilabel_soft_margin_loss",
              f"input, target, weight=None, {_LEGACY}",
              doc="ℓ = -(1/C) Σ_c w_c[y_c log σ(f_c) + (1 - y_c) log σ(-f_c)];  lowered to "
                  "logsigmoid, mul, sum and the reduction.",
              values=_lower_multilabel_soft_margin)


# -- cosine similarity ------------------------------------------------------------------------
def broadcast_sizes(a: List[int], b: List[int]) -> List[int]:
    """The broadcast shape of two shapes (PyTorch's rule)."""
    size = max(len(a), len(b))
    a = [1] * (size - len(a)) + list(a)
    b = [1] * (size - len(b)) + list(b)
    return [x if y == 1 else y for x, y in zip(a, b)]


def _clamped_norm(c: Ctx, x, dim: int, eps: float):
    """``max(‖x‖, eps)`` along ``dim`` (kept), with the gradient of ``‖x‖`` (0 at ``x = 0``,
    as PyTorch's norm backward: :func:`norm_of`)."""
    return _clamped_min(norm_of(c, x, 2.0, dim, True), eps)


def _lower_cosine_similarity(c: Ctx):
    """ATen's ``Σ_dim (x₁/max(‖x₁‖, eps)) (x₂/max(‖x₂‖, eps))`` of the broadcast inputs, the
    norms clamped under ``no_grad``."""
    x1, x2, dim, eps = c.args.x1, c.args.x2, c.bound["dim"], c.bound["eps"]
    shape = c.call(broadcast_sizes, x1.shape, x2.shape)
    x1, x2 = torch.broadcast_to(x1, shape), torch.broadcast_to(x2, shape)
    return ((x1 / _clamped_norm(c, x1, dim, eps)) * (x2 / _clamped_norm(c, x2, dim, eps))).sum(
        dim)


register([F.cosine_similarity], "cosine_similarity",
         "x1, x2, dim=1, eps=1e-08",
         doc="y = Σ x₁x₂ / (max(‖x₁‖, eps) max(‖x₂‖, eps)) along dim;  lowered to square, "
             "sum, sqrt, where, div, mul (cross terms when both come from the model).",
         lower=_lower_cosine_similarity,
         mixes_samples=lambda b: "it reduces over the sample axis 0" if b["dim"] == 0 else None)


# -- binary cross-entropy on probabilities ----------------------------------------------------
BCE_EPSILON = 1e-12


def _reduction_enum(reduction: str) -> int:
    return 1 if reduction == "mean" else (2 if reduction == "sum" else 0)


def binary_cross_entropy_gradient(g: Tensor, p: Tensor, target: Tensor,
                                  weight: Optional[Tensor], reduction: str) -> Tensor:
    """``g ⊙ ∂L/∂p`` for a gradient ``g`` (no lead axes): torch's own backward kernel,
    ``w (p - y)/max(p(1 - p), 1e-12)``, ``/numel`` for mean."""
    if weight is not None:
        weight = weight.expand_as(p)
    return torch.ops.aten.binary_cross_entropy_backward(g, p, target, weight,
                                                        _reduction_enum(reduction))


def bce_probability_grad(p: Tensor, target: Tensor, weight: Optional[Tensor],
                         reduction: str) -> Tensor:
    """``∂L/∂p = w (p - y)/max(p(1 - p), 1e-12)`` (torch's backward), ``/numel`` for mean."""
    grad = (p - target) / torch.clamp(p * (1 - p), min=BCE_EPSILON)
    if weight is not None:
        grad = grad * weight
    if reduction == "mean":
        grad = grad / p.numel()
    return grad


def _bce_vjp(g, c: Ctx):
    if c.lead == 0:
        return c.call(binary_cross_entropy_gradient, g, c.args.input, c.args.target,
                      c.args.weight, c.bound["reduction"])
    return _loss_vjp(bce_probability_grad, "weight", "reduction", class_axis=False)(g, c)


def bce_probability_curvature(p: Tensor, target: Tensor, weight: Optional[Tensor]) -> Tensor:
    """``∂²ℓ/∂p² = w (p² - 2py + y)/((p + ε)²(1 - p + ε)²)``, ``ε = 1e-12``: torch's double
    backward of ``binary_cross_entropy`` (``(p - y)² + y(1 - y) >= 0`` for ``y`` in [0, 1])."""
    curvature = (p * p - 2 * p * target + target) / (
        (p + BCE_EPSILON).pow(2) * (1 - p + BCE_EPSILON).pow(2))
    if weight is not None:
        curvature = curvature * weight
    assert_all((curvature >= 0).all(), negative_curvature(
        "binary_cross_entropy", "a target outside [0, 1] or a negative weight"))
    return curvature.expand(p.shape)


def bce_probability_sqrt_hessian(p: Tensor, target: Tensor, weight: Optional[Tensor],
                                 reduction: str) -> Tensor:
    """``S[c, n] = √(∂²ℓ/∂p²) e_c`` (:func:`bce_probability_curvature`)."""
    return diagonal_sqrt_hessian(p, bce_probability_curvature(p, target, weight), reduction)


def _bce_no_monte_carlo(c: Ctx, samples: int):
    raise node_error(c.node, "binary_cross_entropy on probabilities is not the canonical link "
                     "of the Bernoulli likelihood, so sampled labels would give its Fisher, "
                     "not its GGN", "Request the exact quantities (diag_ggn_exact, kflr, "
                     "sqrt_ggn_exact), or return logits and use binary_cross_entropy_with_"
                     "logits (BCEWithLogitsLoss), which has Monte-Carlo factors.")


loss([F.binary_cross_entropy], "binary_cross_entropy",
     f"input, target, weight=None, {_LEGACY}",
     doc="ℓ = -w[y max(log p, -100) + (1 - y) max(log(1 - p), -100)];  ∂ℓ/∂p = w(p - y)/"
         "max(p(1 - p), 1e-12) (torch's kernel);  ∂²ℓ/∂p² = w(p² - 2py + y)/((p + ε)²"
         "(1 - p + ε)²), ε = 1e-12 (torch's double backward). No Monte-Carlo factors (not a "
         "canonical link); the target has no derivative rule.",
     vjp={"input": _bce_vjp},
     unsupported=_legacy_args,
     sqrt_hessian=lambda c: c.call(bce_probability_sqrt_hessian, c.args.input, c.args.target,
                                   c.args.weight, c.bound["reduction"]),
     sqrt_hessian_mc=_bce_no_monte_carlo, **_regression("binary_cross_entropy"))


# -- margin losses (piecewise linear or quadratic) ----------------------------------------------
def _positive_part(z):
    """``max(z, 0)`` (PyTorch's ``clamp_min``, NaN kept) with the gradient only where ``z > 0``
    (PyTorch's margin losses pass none at a tie)."""
    return torch.where(z > 0, z, torch.clamp(z, min=0).detach())


def _lower_margin_ranking(c: Ctx):
    """ATen's ``max(0, -y (x₁ - x₂) + margin)``."""
    return _positive_part(-c.args.target * (c.args.input1 - c.args.input2) + c.bound["margin"])


_reduced_loss([F.margin_ranking_loss], "margin_ranking_loss",
              f"input1, input2, target, margin=0, {_LEGACY}",
              doc="ℓ = max(0, -y(x₁ - x₂) + margin);  ∂ℓ/∂x₁ = -y where positive (0 at a tie, as "
                  "PyTorch);  piecewise linear: ℓ'' = 0, so curvature quantities are refused.",
              values=_lower_margin_ranking)


def _lower_hinge_embedding(c: Ctx):
    """ATen's ``where(y ≠ 1, max(0, margin - x), 0) + where(y ≠ -1, x, 0)``."""
    x, t = c.args.input, c.args.target
    zeros = torch.zeros_like(x)
    return torch.where(t != 1, _positive_part(c.bound["margin"] - x), zeros) \
        + torch.where(t != -1, x, zeros)


_reduced_loss([F.hinge_embedding_loss], "hinge_embedding_loss",
              f"input, target, margin=1.0, {_LEGACY}",
              doc="ℓ = x (y = 1), max(0, margin - x) (y = -1);  piecewise linear: ℓ'' = 0, so "
                  "curvature quantities are refused.",
              values=_lower_hinge_embedding)


def _lower_multi_margin(c: Ctx):
    """ATen's ``(1/C) Σ_{i≠y} w_y max(0, margin - x_y + x_i)^p`` per sample (``[N, C]``
    input, ``[N]`` classes)."""
    x, y = c.args.input, c.args.target
    picked = x.gather(1, y.unsqueeze(1))
    others = torch.ones_like(x).scatter(1, y.unsqueeze(1), 0.0) > 0
    z = torch.where(others, c.bound["margin"] - picked + x, torch.zeros_like(x))
    hinge = _positive_part(z)
    if c.bound["p"] == 2:
        hinge = hinge * hinge
    values = hinge.sum(1) / x.size(1)
    if c.bound["weight"] is not None:
        values = values * c.args.weight[y]
    return values


def _multi_margin_unsupported(b: dict) -> Optional[str]:
    if b["p"] not in (1, 2):
        return "multi_margin_loss supports only p = 1 and p = 2"
    return _known_reduction()(b)


_reduced_loss([F.multi_margin_loss], "multi_margin_loss",
              f"input, target, p=1, margin=1.0, weight=None, {_LEGACY}",
              doc="ℓ = (1/C) Σ_{i≠y} w_y max(0, margin - f_y + f_i)^p;  p = 1 piecewise linear "
                  "(curvature refused), p = 2: ∂²ℓ/∂f² = (2w_y/C) Σ_{active i} (e_i - e_y)(e_i - "
                  "e_y)ᵀ;  lowered to gather, where, mul and the reduction.",
              values=_lower_multi_margin, unsupported=_multi_margin_unsupported)
