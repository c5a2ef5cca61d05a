"""Distances and metric-learning losses: ``cdist``, ``pairwise_distance``, triplet margin,
cosine embedding and multilabel margin losses.

All are *lowered* as ATen computes them (``Distance.cpp``, ``Loss.cpp``) to ruled ops, so every
quantity follows from those ops' rules. p-norms go through :func:`norm_of` (the zero
subgradient at a zero difference, as PyTorch's ``cdist``/``norm`` backward); hinges through
:func:`_positive_part` (no gradient at a tie, as PyTorch's ``clamp_min``); piecewise-linear
losses have a zero loss Hessian, so curvature quantities are refused as for L1.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .linalg import _carries_samples
from .more_losses import _LEGACY, _known_reduction, _positive_part, _reduced_loss
from .reductions import norm_of
from .registry import Ctx, permutation, register


def _finite_order(what: str, key: str = "p"):
    """``unsupported``: only a finite order ``p >= 1`` (PyTorch's kernels for ``p < 1``, 0
    and ∞ have other zero-difference subgradients, which the lowering does not reproduce)."""
    def check(b: dict) -> Optional[str]:
        p = b[key]
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 1 <= p < math.inf:
            return f"{what} with p = {p!r} has no rule (only finite p >= 1)"
        return None
    return check


# -- cdist ------------------------------------------------------------------------------------
def cdist_pairs_across_samples(x2: Tensor) -> Tensor:
    """The identity on ``cdist``'s second operand where it carries the sample axis (marks the
    call for the per-sample check)."""
    return x2


permutation([cdist_pairs_across_samples], "cdist_pairs_across_samples", "x2",
            doc="y = x (cdist's second operand when it depends on the input);  Jᵀg = g.",
            vjp={"x2": lambda g, c: g},
            mixes_samples=lambda b: "torch.cdist pairs every row of x1 with every row of an "
            "x2 that depends on the input (2-D: each output row reads other samples' rows; "
            "the ranks are not known at compile time, so a batched x2 is refused too)")


def cdist_data_operand(x1: Tensor, other_axes: int) -> Tensor:
    """``x1`` (with the sample axis), checked to have at least as many axes as ``x2`` (without
    it; ``other_axes``): more would put ``x2``'s batch axes before the samples in the
    output."""
    if other_axes > x1.dim():
        raise ValueError("fxcurv: torch.cdist's x2 (no sample axis) has more axes than x1, so "
                         "the output's axis 0 would not be x1's samples")
    return x1


permutation([cdist_data_operand], "cdist_data_operand", "x1, other_axes",
            doc="y = x1, checked when the step runs to have no fewer axes than x2;  Jᵀg = g.",
            vjp={"x1": lambda g, c: g})


def _lower_cdist(c: Ctx):
    """``y[..., i, j] = ‖x₁[..., i, :] - x₂[..., j, :]‖_p`` (batch axes broadcast) as the
    difference of ``x₁[..., :, None, :]`` and ``x₂[..., None, :, :]`` and :func:`norm_of`
    over the last axis; PyTorch's matmul form of ``p = 2`` (``compute_mode``) is the same
    function up to rounding, and its gradient is 0 at a zero distance, as here."""
    x1, x2 = c.args.x1, c.args.x2
    if _carries_samples(c.bound["x2"]):
        x2 = c.call(cdist_pairs_across_samples, x2)
    elif _carries_samples(c.bound["x1"]):
        x1 = c.call(cdist_data_operand, x1, x2.dim())
    return norm_of(c, x1.unsqueeze(-2) - x2.unsqueeze(-3), float(c.bound["p"]), -1, False)


register([torch.cdist], "cdist",
         "x1, x2, p=2.0, compute_mode='use_mm_for_euclid_dist_if_necessary'",
         doc="y_ij = ‖x₁ᵢ - x₂ⱼ‖_p (x₁: [B.., P, D], x₂: [B.., R, D], y: [B.., P, R]);  "
             "lowered to unsqueeze, sub and the p-norm (0 subgradient at a zero distance). "
             "Per-sample quantities need x₂ without the sample axis (a parameter: "
             "prototypes); an x₂ from the model is refused for them (2-D rows mix samples).",
         lower=_lower_cdist, unsupported=_finite_order("cdist"))


# -- pairwise distance --------------------------------------------------------------------------
def pairwise_distance(c: Ctx, x1, x2, p: float, eps: float, keepdim: bool = False):
    """ATen's ``‖x₁ - x₂ + eps‖_p`` over the last axis of the broadcast inputs."""
    return norm_of(c, x1 - x2 + eps, float(p), -1, keepdim)


register([torch.pairwise_distance], "pairwise_distance",
         "x1, x2, p=2.0, eps=1e-06, keepdim=False",
         doc="y = ‖x₁ - x₂ + eps‖_p over the last axis;  lowered to sub, add and the p-norm.",
         lower=lambda c: pairwise_distance(c, c.args.x1, c.args.x2, c.bound["p"],
                                           c.bound["eps"], c.bound["keepdim"]),
         unsupported=_finite_order("pairwise_distance"))


# -- metric-learning losses ---------------------------------------------------------------------
def _lower_triplet(c: Ctx):
    """ATen's ``max(0, margin + d(a, p) - d(a, n))``, ``d`` the pairwise distance; ``swap``:
    ``d(a, n)`` replaced by ``min(d(a, n), d(p, n))`` (ties split as torch's ``minimum``)."""
    b = c.bound
    anchor, positive, negative = c.args.anchor, c.args.positive, c.args.negative
    near = pairwise_distance(c, anchor, positive, b["p"], b["eps"])
    far = pairwise_distance(c, anchor, negative, b["p"], b["eps"])
    if b["swap"]:
        far = torch.minimum(far, pairwise_distance(c, positive, negative, b["p"], b["eps"]))
    return _positive_part(b["margin"] + near - far)


def _triplet_unsupported(b: dict) -> Optional[str]:
    if not b["margin"] > 0:
        return f"triplet_margin_loss with margin {b['margin']!r} (PyTorch needs margin > 0)"
    return _finite_order("triplet_margin_loss")(b) or _known_reduction()(b)


_reduced_loss([F.triplet_margin_loss], "triplet_margin_loss",
              f"anchor, positive, negative, margin=1.0, p=2, eps=1e-06, swap=False, {_LEGACY}",
              doc="ℓ = max(0, margin + ‖a - p + eps‖_p - ‖a - n + eps‖_p) (swap: the smaller of "
                  "the anchor's and the positive's distance to n);  no gradient at a tie; "
                  "lowered to the pairwise distances, minimum, where and the reduction.",
              values=_lower_triplet, unsupported=_triplet_unsupported)


COSINE_EPSILON = 1e-12


def _lower_cosine_embedding(c: Ctx):
    """ATen's ``cos = Σ x₁x₂ / √((Σ x₁² + ε)(Σ x₂² + ε))`` over the last axis (``ε = 1e-12``);
    ``1 - cos`` where ``y = 1``, ``max(0, cos - margin)`` where ``y = -1``, 0 elsewhere."""
    x1, x2, t = c.args.input1, c.args.input2, c.args.target
    squares = (x1.square().sum(-1) + COSINE_EPSILON) * (x2.square().sum(-1) + COSINE_EPSILON)
    cos = (x1 * x2).sum(-1) / torch.sqrt(squares)
    zeros = torch.zeros_like(cos)
    return torch.where(t == 1, 1 - cos, zeros) + \
        torch.where(t == -1, _positive_part(cos - c.bound["margin"]), zeros)


_reduced_loss([F.cosine_embedding_loss], "cosine_embedding_loss",
              f"input1, input2, target, margin=0, {_LEGACY}",
              doc="ℓ = 1 - cos(x₁, x₂) (y = 1), max(0, cos(x₁, x₂) - margin) (y = -1), cos "
                  "with ε = 1e-12 added to both squared norms;  no gradient at a tie; lowered "
                  "to square, sum, sqrt, div, where and the reduction.",
              values=_lower_cosine_embedding)


def multilabel_margin_weights(target: Tensor, input: Tensor) -> Tensor:
    """``w[..., j, i]``: how often class ``j`` is listed in ``target`` before its first -1,
    times 1 if class ``i`` is not listed (``[..., C, C]``, ``input``'s dtype); PyTorch's
    range check of the labels."""
    classes = input.size(-1)
    if target.shape != input.shape:
        raise ValueError("fxcurv: multilabel_margin_loss needs target of the input's shape")
    if bool(((target < -1) | (target >= classes)).any()):
        raise ValueError("fxcurv: multilabel_margin_loss target out of range [-1, C)")
    listed = (target >= 0).to(torch.int64).cumprod(-1)
    counts = torch.zeros_like(input).scatter_add(-1, target.clamp(min=0),
                                                 listed.to(input.dtype))
    return counts.unsqueeze(-1) * (counts == 0).to(input.dtype).unsqueeze(-2)


register([multilabel_margin_weights], "multilabel_margin_weights", "target, input",
         constant=True, doc="Weights from integer labels: no derivative.")


def _lower_multilabel_margin(c: Ctx):
    """ATen's ``(1/C) Σ_{j listed} Σ_{i not listed} max(0, 1 - (f_j - f_i))`` per sample."""
    x = c.args.input
    weights = c.call(multilabel_margin_weights, c.args.target, x)
    hinge = _positive_part(1 - x.unsqueeze(-1) + x.unsqueeze(-2))
    return (weights * hinge).sum([-2, -1]) / x.size(-1)


_reduced_loss([F.multilabel_margin_loss], "multilabel_margin_loss", f"input, target, {_LEGACY}",
              doc="ℓ = (1/C) Σ_{j ∈ y} Σ_{i ∉ y} max(0, 1 - f_j + f_i) (labels listed until the "
                  "first -1);  piecewise linear: ℓ'' = 0, so curvature quantities are refused; "
                  "lowered to where, mul, sum and the reduction ([N, C, C] pairs).",
              values=_lower_multilabel_margin)
