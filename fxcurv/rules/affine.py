"""Affine layers. ``linear``: ``y = x Wᵀ + b`` with ``x: [N, *, I]``, ``W: [O, I]``, ``y: [N, *, O]``.

Jacobian-transposes: ``x̄ = g W``, ``W̄ = Σ_{n,*} g xᵀ``, ``b̄ = Σ_{n,*} g``. Per sample the sum
runs over the extra axes ``*`` only (positions inside a sample, e.g. a sequence).
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .helpers import merge_middle, sum_middle, symmetric_gram
from .contraction import Contraction, contraction_batch_sum_squares
from .registry import Ctx, register


def linear_factors(g: Tensor, x: Tensor, lead: int) -> Tuple[Tensor, Tensor]:
    """The weight's contraction factors (views): ``W̄_n = Σ_t g_nt x_ntᵀ`` with
    ``L = g [*lead, N, 1, T, O]``, ``R = x [N, 1, T, I]`` (positions merged, one group)."""
    return merge_middle(g, lead + 1).unsqueeze(lead + 1), merge_middle(x, 1).unsqueeze(1)


def linear_weight_tangent(x: Tensor, vectors: Tensor) -> Tensor:
    """``J_W V = x Vᵀ`` for each vector: ``x: [N, *, I]``, ``V: [V, O, I]`` -> ``[V, N, *, O]``."""
    flat = x.reshape(-1, x.size(-1))                          # [N·T, I]
    tangent = torch.matmul(flat, vectors.transpose(1, 2))     # [V, N·T, O]
    return tangent.reshape([vectors.size(0)] + list(x.shape[:-1]) + [vectors.size(1)])


def linear_bias_tangent(vectors: Tensor, out: Tensor) -> Tensor:
    """``J_b v``: each vector ``[O]`` at every sample and position, ``[V, *out.shape]``."""
    shape = [vectors.size(0)] + [1] * (out.dim() - 1) + [vectors.size(1)]
    return vectors.reshape(shape).expand([vectors.size(0)] + list(out.shape))


def linear_weight_squares_part(g: Tensor, weight: Tensor, x: Tensor, param: Tensor) -> Tensor:
    """One factor's share of a weighted sum of squares (:func:`linear_weight_squares_total`)
    from ``g`` ``[L, N, *, O]`` with column weights ``w`` (``[L, N]``, or ``[1, 1]``: a
    sign): for one position ``Σ_l w_l g_l²`` ``[N, O]``; with positions the per-sample
    ``Σ_l w_l (Σ_t g_lt x_tᵀ)²`` ``[N, O, I]`` (columns of either sign apart, ``g √w±``)."""
    xm = merge_middle(x, 1)
    if xm.size(1) == 1:
        squares = g.reshape(-1, xm.size(0), g.size(-1)).square()             # [L, N, O]
        return (squares * weight.unsqueeze(-1)).sum(0)
    left, right = linear_factors(g, x, 1)
    return contraction_batch_sum_squares(left, right, param, 1, False, False, False, weight)


def linear_weight_diagonal_share(r: Tensor, x: Tensor) -> Tensor:
    """The share (:func:`linear_weight_squares_part`'s shape) of a diagonal curvature ``r``
    ``[N, *, O]`` at the output: ``Σ_d r_d (∂y_d/∂W)²`` per sample is ``r ⊗ x²``, for one
    position ``r`` ``[N, O]`` itself; with positions ``Σ_t r_t x_t²ᵀ`` ``[N, O, I]``."""
    xm = merge_middle(x, 1)
    rm = merge_middle(r, 1)
    if xm.size(1) == 1:
        return rm[:, 0]
    return torch.matmul(rm.transpose(1, 2), xm.square())

def linear_weight_squares_total(partial: Tensor, x: Tensor, per_sample: bool,
                                base: Tensor) -> Tensor:
    """``base +`` the summed shares of several factors: ``[N, O, I]`` (``per_sample``) or
    ``[O, I]``; for one position one product of the squares ``[N, O]`` with ``x²``
    (``addcmul`` / ``addmm``: no further ``[N, O, I]`` temporaries)."""
    if partial.dim() == 3:  # positions: the shares are per-sample blocks already
        return base + (partial if per_sample else partial.sum(0))
    x_squared = merge_middle(x, 1)[:, 0].square()
    if per_sample:
        return torch.addcmul(base, partial.unsqueeze(-1), x_squared.unsqueeze(-2))
    return torch.addmm(base, partial.t(), x_squared)


def linear_bias_squares_part(g: Tensor, weight: Tensor) -> Tensor:
    """``Σ_l w_l (Σ_t g_lt)²`` ``[N, O]`` of ``g`` ``[L, N, *, O]`` with column weights."""
    return (sum_middle(g, 2).square() * weight.unsqueeze(-1)).sum(0)


def linear_bias_diagonal_share(r: Tensor) -> Tensor:
    """The share of a diagonal curvature ``r`` ``[N, *, O]`` at the output for the bias
    (coefficient 1 at every position): ``Σ_t r_t`` ``[N, O]``."""
    return sum_middle(r, 1)


def linear_bias_squares_total(partial: Tensor, per_sample: bool, base: Tensor) -> Tensor:
    """``base +`` the summed shares ``[N, O]``: per sample, or summed over the samples."""
    return base + (partial if per_sample else partial.sum(0))


def output_gram(g: Tensor, lead: int) -> Tensor:
    """``G = Σ s sᵀ`` over every leading, sample and position axis of ``g`` ``[*lead, N, *, O]``."""
    flat = g.reshape(-1, g.size(-1))
    return symmetric_gram(flat.t())


def matrix_output_gram(matrix: Tensor, features: int) -> Tensor:
    """:func:`output_gram` from the dense output curvature ``M = Σ s sᵀ`` ``[T·O, T·O]`` of one
    sample's ``[*, O]`` (``O = features``): ``G = Σ_t M[(t, :), (t, :)]`` (``M`` for 2-D input)."""
    positions = matrix.size(0) // features
    if positions == 1:
        return matrix
    blocks = matrix.reshape(positions, features, positions, features)
    return blocks.diagonal(0, 0, 2).sum(-1)


def input_gram(x: Tensor) -> Tensor:
    """``A = Σ_{n,t} x_nt x_ntᵀ / (N·T)`` for ``x: [N, *, I]`` (``/N`` for 2-D input, as BackPACK;
    sequence positions count as extra samples, the "expand" convention)."""
    flat = x.reshape(-1, x.size(-1))
    return symmetric_gram(flat.t()).div_(flat.size(0))  # in place: no second [I, I]


def _weight_vjp(g, c: Ctx):
    gm = c.call(merge_middle, g, c.lead)
    xm = c.call(merge_middle, c.args.input, 0)
    return torch.matmul(gm.transpose(-1, -2), xm)


def _weight_contraction(g, c: Ctx) -> Contraction:
    factors = c.call(linear_factors, g, c.args.input, c.lead)
    return Contraction(factors[0], factors[1], c.args.weight)


def _matrix_gram(m, c: Ctx):
    return c.call(matrix_output_gram, m, c.args.weight.size(0))


register(
    [F.linear], "linear", "input, weight, bias=None",
    doc=__doc__,
    vjp={"input": lambda g, c: torch.matmul(g, c.args.weight),
         "weight": _weight_vjp,
         "bias": lambda g, c: c.call(merge_middle, g, c.lead).sum(-2)},
    contraction={"weight": _weight_contraction},
    batch_grad={"bias": lambda g, c: c.call(sum_middle, g, c.lead + 1)},
    signed_squares={
        "weight": (lambda g, w, c: c.call(linear_weight_squares_part, g, w, c.args.input,
                                                  c.args.weight),
                   lambda s, c, per_sample, base: c.call(
                       linear_weight_squares_total, s, c.args.input, per_sample, base),
                   lambda r, c: c.call(linear_weight_diagonal_share, r, c.args.input)),
        "bias": (lambda g, w, c: c.call(linear_bias_squares_part, g, w),
                 lambda s, c, per_sample, base: c.call(linear_bias_squares_total, s,
                                                        per_sample, base),
                 lambda r, c: c.call(linear_bias_diagonal_share, r))},
    diagonal_squares={"weight": "form", "bias": "unit"},
    jvp={"input": lambda t, c: torch.matmul(t, c.args.weight.t()),
         "weight": lambda v, c: c.call(linear_weight_tangent, c.args.input, v),
         "bias": lambda v, c: c.call(linear_bias_tangent, v, c.out)},
    hessian_is_zero=True, bilinear=(("input", "weight"),),
    stack_uses={"weight": "input", "bias": "input"},
    kron={"weight": lambda g, c: [c.call(output_gram, g, c.lead), c.call(input_gram, c.args.input)],
          "bias": lambda g, c: [c.call(output_gram, g, c.lead)]},
    kron_matrix={"weight": lambda m, c: [_matrix_gram(m, c), c.call(input_gram, c.args.input)],
                 "bias": lambda m, c: [_matrix_gram(m, c)]},
    sandwich={"input": "shared"},
)
