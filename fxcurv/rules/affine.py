"""Affine layers. ``linear``: ``y = x Wᵀ + b`` with ``x: [N, *, I]``, ``W: [O, I]``, ``y: [N, *, O]``.

Jacobian-transposes: ``x̄ = g W``, ``W̄ = Σ_{n,*} g xᵀ``, ``b̄ = Σ_{n,*} g``. Per sample the sum
runs over the extra axes ``*`` only (positions inside a sample, e.g. a sequence).
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor

from .helpers import merge_middle
from .registry import Ctx, register


def linear_weight_batch_l2(g: Tensor, x: Tensor) -> Tensor:
    """``‖Σ_t g_nt x_ntᵀ‖²`` per sample ``[N]`` without building ``[N, O, I]`` when cheaper.

    2-D input: ``‖g_n‖² ‖x_n‖²``. With T positions: the Gram form
    ``Σ_{t,s} (g_t·g_s)(x_t·x_s)`` when ``T(O + I) < O·I``, else the explicit per-sample grad.
    """
    gm = merge_middle(g, 1)
    xm = merge_middle(x, 1)
    positions, outs, ins = gm.size(1), gm.size(2), xm.size(2)
    if positions == 1:
        return gm.square().sum([1, 2]) * xm.square().sum([1, 2])
    if positions * (outs + ins) < outs * ins:
        gram_g = torch.matmul(gm, gm.transpose(1, 2))
        gram_x = torch.matmul(xm, xm.transpose(1, 2))
        return (gram_g * gram_x).sum([1, 2])
    return torch.einsum("nto,nti->noi", gm, xm).square().sum([1, 2])


def linear_weight_sum_grad_squared(g: Tensor, x: Tensor, lead: int) -> Tensor:
    """``Σ_{lead, n} (Σ_t g_nt x_ntᵀ)²`` ``[O, I]``; for 2-D input ``Σ_n (Σ_lead g²)_n x_n²ᵀ``
    with no ``[*lead, N, O, I]`` tensor (the GGN diagonal when ``g`` is a sqrt-GGN factor)."""
    gm = merge_middle(g, lead + 1).flatten(0, lead)  # [lead*N, T, O] (lead axes merged)
    xm = merge_middle(x, 1)                           # [N, T, I]
    if gm.size(1) == 1:
        g_squared = gm[:, 0].square().reshape(-1, xm.size(0), gm.size(2)).sum(0)
        return torch.matmul(g_squared.t(), xm[:, 0].square())
    gm = gm.reshape(-1, xm.size(0), gm.size(1), gm.size(2))
    return torch.einsum("lnto,nti->lnoi", gm, xm).square().sum([0, 1])


def output_gram(g: Tensor, lead: int) -> Tensor:
    """``G = Σ s sᵀ`` over every leading, sample and position axis of ``g`` ``[*lead, N, *, O]``."""
    flat = g.reshape(-1, g.size(-1))
    return torch.matmul(flat.t(), flat)


def input_gram(x: Tensor) -> Tensor:
    """``A = Σ_{n,t} x_nt x_ntᵀ / (N·T)`` for ``x: [N, *, I]`` (``/N`` for 2-D input, as BackPACK;
    sequence positions count as extra samples, the "expand" convention)."""
    flat = x.reshape(-1, x.size(-1))
    return torch.matmul(flat.t(), flat) / flat.size(0)


def _weight_vjp(g, c: Ctx):
    gm = c.call(merge_middle, g, c.lead)
    xm = c.call(merge_middle, c.args.input, 0)
    return torch.matmul(gm.transpose(-1, -2), xm)


def _weight_batch(g, c: Ctx):
    gm = c.call(merge_middle, g, c.lead + 1)
    xm = c.call(merge_middle, c.args.input, 1)
    return torch.einsum("...nto,nti->...noi", gm, xm)


register(
    [F.linear], "linear", "input, weight, bias=None",
    doc=__doc__,
    vjp={"input": lambda g, c: torch.matmul(g, c.args.weight),
         "weight": _weight_vjp,
         "bias": lambda g, c: c.call(merge_middle, g, c.lead).sum(-2)},
    batch_grad={"weight": _weight_batch,
                "bias": lambda g, c: c.call(merge_middle, g, c.lead + 1).sum(-2)},
    batch_l2={"weight": lambda g, c: c.call(linear_weight_batch_l2, g, c.args.input)},
    sum_grad_squared={"weight": lambda g, c: c.call(linear_weight_sum_grad_squared, g,
                                                    c.args.input, c.lead)},
    hessian_is_zero=True,
    kron={"weight": lambda g, c: [c.call(output_gram, g, c.lead), c.call(input_gram, c.args.input)],
          "bias": lambda g, c: [c.call(output_gram, g, c.lead)]},
)
