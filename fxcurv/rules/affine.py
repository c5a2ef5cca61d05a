"""Affine layers. ``linear``: ``y = x Wᵀ + b`` with ``x: [N, *, I]``, ``W: [O, I]``, ``y: [N, *, O]``.

Jacobian-transposes: ``x̄ = g W``, ``W̄ = Σ_{n,*} g xᵀ``, ``b̄ = Σ_{n,*} g``. Per sample the sum
runs over the extra axes ``*`` only (positions inside a sample, e.g. a sequence).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .helpers import merge_middle, sum_middle
from .contraction import Contraction
from .registry import Ctx, register


def linear_factors(g: Tensor, x: Tensor, lead: int) -> Tuple[Tensor, Tensor]:
    """The weight's contraction factors (views): ``W̄_n = Σ_t g_nt x_ntᵀ`` with
    ``L = g [*lead, N, 1, T, O]``, ``R = x [N, 1, T, I]`` (positions merged, one group)."""
    return merge_middle(g, lead + 1).unsqueeze(lead + 1), merge_middle(x, 1).unsqueeze(1)


def output_gram(g: Tensor, lead: int) -> Tensor:
    """``G = Σ s sᵀ`` over every leading, sample and position axis of ``g`` ``[*lead, N, *, O]``."""
    flat = g.reshape(-1, g.size(-1))
    return torch.matmul(flat.t(), flat)


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
    return torch.matmul(flat.t(), flat).div_(flat.size(0))  # in place: no second [I, I]


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
    hessian_is_zero=True, bilinear=(("input", "weight"),),
    stack_uses={"weight": "input", "bias": "input"},
    kron={"weight": lambda g, c: [c.call(output_gram, g, c.lead), c.call(input_gram, c.args.input)],
          "bias": lambda g, c: [c.call(output_gram, g, c.lead)]},
    kron_matrix={"weight": lambda m, c: [_matrix_gram(m, c), c.call(input_gram, c.args.input)],
                 "bias": lambda m, c: [_matrix_gram(m, c)]},
    sandwich={"input": "shared"},
)
