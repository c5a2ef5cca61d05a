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
from .registry import Ctx, fresh, register


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
    return torch.einsum("nto,nti->noi", gm, xm).square_().sum([1, 2])


@fresh
def linear_weight_sum_grad_squared(g: Tensor, x: Tensor, lead: int) -> Tensor:
    """``Σ_{lead, n} (Σ_t g_nt x_ntᵀ)²`` ``[O, I]``; for 2-D input ``Σ_n (Σ_lead g²)_n x_n²ᵀ``
    with no ``[*lead, N, O, I]`` tensor (the GGN diagonal when ``g`` is a sqrt-GGN factor)."""
    gm = merge_middle(g, lead + 1).flatten(0, lead)  # [lead*N, T, O] (lead axes merged)
    xm = merge_middle(x, 1)                           # [N, T, I]
    if gm.size(1) == 1:
        g_squared = gm[:, 0].square()
        if g_squared.size(0) != xm.size(0):  # lead vectors: Σ over them first
            g_squared = g_squared.reshape(-1, xm.size(0), gm.size(2)).sum(0)
        return torch.matmul(g_squared.t(), xm[:, 0].square())
    gm = gm.reshape(-1, xm.size(0), gm.size(1), gm.size(2))
    return torch.einsum("lnto,nti->lnoi", gm, xm).square().sum([0, 1])


def by_lead(g: Tensor, x: Tensor) -> Tuple[Tensor, Tensor]:
    """``g: [*lead, N, *, O]`` -> ``[K, N, T, O]`` (lead axes merged, ``K = 1`` for none) and
    ``x: [N, *, I]`` -> ``[N, T, I]`` (positions merged)."""
    xm = merge_middle(x, 1)
    return g.reshape([-1, xm.size(0), xm.size(1), g.size(-1)]), xm


def linear_weight_product(g: Tensor, x: Tensor, vectors: Tensor) -> Tensor:
    """``Σ_{k,n} q_kn ⟨q_kn, V_v⟩`` with ``q_kn = Σ_t g_knt x_ntᵀ``, ``[V, O, I]``, never
    building ``q``: ``u = J V`` (``u_vnto = Σ_i V_voi x_nti``), projections
    ``w_nkv = Σ_{t,o} g_knto u_vnto``, ``r_vnto = Σ_k w_nkv g_knto``, then ``Jᵀ r``
    (``Σ_{n,t} r_vnto x_nti``). ``g: [*lead, N, *, O]``, ``x: [N, *, I]``, ``V: [V, O, I]``.
    Batched matmuls over the samples read ``g`` in place (no copy of the factor)."""
    gm, xm = by_lead(g, x)
    samples, positions, outs = xm.size(0), xm.size(1), gm.size(-1)
    count = vectors.size(0)
    flat_x = xm.reshape(samples * positions, -1)                            # [N·T, I]
    u = torch.matmul(flat_x, vectors.reshape(-1, flat_x.size(1)).t())      # [N·T, V·O]
    u = u.reshape(samples, positions, count, outs).transpose(1, 2)           # [N, V, T, O]
    by_sample = gm.reshape(gm.size(0), samples, -1).transpose(0, 1)         # [N, K, T·O] view
    projections = torch.matmul(by_sample, u.reshape(samples, count, -1).transpose(1, 2))
    r = torch.matmul(projections.transpose(1, 2), by_sample)                # [N, V, T·O]
    r = r.reshape(samples, count, positions, outs).permute(1, 3, 0, 2)      # [V, O, N, T]
    return torch.matmul(r.reshape(count, outs, -1), flat_x)


def linear_weight_batch(g: Tensor, x: Tensor, lead: int) -> Tensor:
    """``W̄_n = Σ_t g_nt x_ntᵀ`` ``[*lead, N, O, I]``; for one position the outer product
    ``g_n x_nᵀ`` as one broadcast multiply (a matmul with an inner size of 1 is slower)."""
    gm = merge_middle(g, lead + 1)  # [*lead, N, T, O]
    xm = merge_middle(x, 1)         # [N, T, I]
    if xm.size(1) == 1:
        return gm.select(-2, 0).unsqueeze(-1) * xm.select(1, 0).unsqueeze(-2)
    return torch.einsum("...nto,nti->...noi", gm, xm)


def linear_weight_batch_sum_squares(g: Tensor, x: Tensor) -> Tensor:
    """``Σ_k (Σ_t g_knt x_ntᵀ)²`` ``[N, O, I]``: for one position ``(Σ_k g_kn²) x_n²ᵀ`` (no
    ``[K, N, O, I]``), else accumulated one lead index at a time."""
    gm, xm = by_lead(g, x)
    if xm.size(1) == 1:
        return gm[:, :, 0].square().sum(0).unsqueeze(-1) * xm[:, 0].square().unsqueeze(-2)
    total = torch.matmul(gm[0].transpose(-1, -2), xm).square()
    for k in range(1, gm.size(0)):
        term = torch.matmul(gm[k].transpose(-1, -2), xm)
        total.addcmul_(term, term)
    return total


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


def _weight_batch(g, c: Ctx):
    return c.call(linear_weight_batch, g, c.args.input, c.lead)


def _matrix_gram(m, c: Ctx):
    return c.call(matrix_output_gram, m, c.args.weight.size(0))


register(
    [F.linear], "linear", "input, weight, bias=None",
    doc=__doc__,
    vjp={"input": lambda g, c: torch.matmul(g, c.args.weight),
         "weight": _weight_vjp,
         "bias": lambda g, c: c.call(merge_middle, g, c.lead).sum(-2)},
    batch_grad={"weight": _weight_batch,
                "bias": lambda g, c: c.call(sum_middle, g, c.lead + 1)},
    batch_l2={"weight": lambda g, c: c.call(linear_weight_batch_l2, g, c.args.input)},
    sum_grad_squared={"weight": lambda g, c: c.call(linear_weight_sum_grad_squared, g,
                                                    c.args.input, c.lead)},
    param_product={"weight": lambda g, c, v: c.call(linear_weight_product, g, c.args.input, v)},
    batch_sum_grad_squared={"weight": lambda g, c: c.call(linear_weight_batch_sum_squares, g,
                                                          c.args.input)},
    hessian_is_zero=True, bilinear=(("input", "weight"),),
    stack_uses={"weight": "input", "bias": "input"},
    kron={"weight": lambda g, c: [c.call(output_gram, g, c.lead), c.call(input_gram, c.args.input)],
          "bias": lambda g, c: [c.call(output_gram, g, c.lead)]},
    kron_matrix={"weight": lambda m, c: [_matrix_gram(m, c), c.call(input_gram, c.args.input)],
                 "bias": lambda m, c: [_matrix_gram(m, c)]},
    sandwich={"input": "shared"},
)
