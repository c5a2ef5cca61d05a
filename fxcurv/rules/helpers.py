"""Small TorchScript-compatible helpers that generated code calls for runtime shape logic.

Every function here is type-annotated and scriptable; rules emit calls to them with
:meth:`fxcurv.rules.registry.Ctx.call`. ``lead`` is always the number of leading vector axes
of the cotangent (a compile-time constant passed as an int).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .registry import reshaping


def sum_to_shape(t: Tensor, lead: int, shape: List[int]) -> Tensor:
    """Undo broadcasting: reduce ``t`` of shape ``[*lead, *broadcast]`` to ``[*lead, *shape]``."""
    extra = t.dim() - lead - len(shape)
    if extra > 0:
        t = t.sum(list(range(lead, lead + extra)))
    dims: List[int] = []
    for i, size in enumerate(shape):
        if size == 1 and t.size(lead + i) != 1:
            dims.append(lead + i)
    if len(dims) > 0:
        t = t.sum(dims, keepdim=True)
    return t


def sum_to_batch(t: Tensor, lead: int, shape: List[int]) -> Tensor:
    """Per-sample undo of broadcasting: ``[*lead, N, *broadcast]`` -> ``[*lead, N, *shape]``.

    The operand of ``shape`` has no sample axis; sample ``n`` is axis ``lead`` of ``t``. An
    operand as long as ``t``'s per-lead shape (``b.view(1, C, 1)``) has a size-1 axis 0 that
    broadcasts against the samples: it is kept, per sample, as that size-1 axis.
    """
    if t.dim() - lead == len(shape):
        return sum_to_shape(t, lead + 1, shape[1:]).unsqueeze(lead + 1)
    return sum_to_shape(t, lead + 1, shape)


@reshaping
def symmetric_gram(a: Tensor) -> Tensor:
    """``a aᵀ`` ``[..., R, M] -> [..., R, R]`` (a Kronecker factor's Gram matrix). For
    ``R ≥ 256`` by row blocks ``i`` (2 to 4 of them): ``a_i a_{≥i}ᵀ``, the blocks on and right
    of the diagonal, the others their mirror (4 blocks: 5/8 of the multiply-adds of one
    product)."""
    rows = a.size(-2)
    blocks = min(4, rows // 128)
    if blocks < 2:
        return torch.matmul(a, a.transpose(-1, -2))
    size = (rows + blocks - 1) // blocks
    out = torch.empty(list(a.shape[:-1]) + [rows], dtype=a.dtype, device=a.device)
    for start in range(0, rows, size):
        rest = rows - start
        block = torch.matmul(a.narrow(-2, start, min(size, rest)),
                             a.narrow(-2, start, rest).transpose(-1, -2))   # [.., h, rest]
        height = block.size(-2)
        out.narrow(-2, start, height).narrow(-1, start, rest).copy_(block)
        out.narrow(-1, start, height).narrow(-2, start + height, rest - height).copy_(
            block.narrow(-1, height, rest - height).transpose(-1, -2))
    return out


def merge_middle(t: Tensor, start: int) -> Tensor:
    """``[*t.shape[:start], a, b, ..., c]`` -> ``[*t.shape[:start], a*b*..., c]``."""
    head: List[int] = list(t.shape[:start])
    return t.reshape(head + [-1, t.size(-1)])


def sum_middle(t: Tensor, start: int) -> Tensor:
    """``[*t.shape[:start], a, b, ..., c]`` -> ``[*t.shape[:start], c]`` summed over the
    middle axes; ``t`` itself (no copy) when there are none."""
    if t.dim() == start + 1:
        return t
    return merge_middle(t, start).sum(-2)


def column_scaled(t: Tensor, weights: Tensor) -> Tensor:
    """``t`` ``[K, N, ...]`` with each column ``(k, n)`` scaled by ``weights[k, n]``."""
    return t * weights.reshape(list(weights.shape) + [1] * (t.dim() - 2))


@reshaping
def reshape_lead(t: Tensor, lead: int, shape: List[int]) -> Tensor:
    """Keep the first ``lead`` axes of ``t`` and reshape the rest to ``shape``."""
    head: List[int] = list(t.shape[:lead])
    return t.reshape(head + list(shape))


def shift_dims(dims: List[int], lead: int, ndim: int) -> List[int]:
    """Axis indices of an op's operand, moved behind ``lead`` leading axes."""
    return [lead + (d % ndim) for d in dims]


def dims_list(dim: Optional[List[int]], ndim: int) -> List[int]:
    """The reduced axes of ``sum``/``mean`` (``None`` means all), non-negative and sorted."""
    if dim is None or len(dim) == 0:
        return list(range(ndim))
    return sorted([d % ndim for d in dim])


def expand_reduced(g: Tensor, lead: int, shape: List[int], dim: Optional[List[int]],
                   keepdim: bool) -> Tensor:
    """Jacobian-transpose of ``sum(x, dim, keepdim)``: broadcast ``g`` back to ``[*lead, *shape]``."""
    ndim = len(shape)
    if not keepdim:
        for d in dims_list(dim, ndim):
            g = g.unsqueeze(lead + d)
    head: List[int] = list(g.shape[:lead])
    return g.expand(head + list(shape))


def reduced_count(shape: List[int], dim: Optional[List[int]]) -> int:
    """Number of elements averaged by ``mean(x, dim)``."""
    count = 1
    for d in dims_list(dim, len(shape)):
        count *= shape[d]
    return count


def permute_back(g: Tensor, lead: int, dims: List[int]) -> Tensor:
    """Jacobian-transpose of ``permute(x, dims)``: apply the inverse permutation after ``lead``."""
    ndim = len(dims)
    inverse = [0] * ndim
    for i, d in enumerate(dims):
        inverse[d % ndim] = i
    return g.permute(list(range(lead)) + [lead + i for i in inverse])


def reverse_dims(g: Tensor, lead: int) -> Tensor:
    """Jacobian-transpose of ``x.T`` (all axes reversed): reverse the axes after ``lead``."""
    return g.permute(list(range(lead)) + list(range(g.dim() - 1, lead - 1, -1)))


def split_back(g: Tensor, lead: int, dim: int, sizes: List[int]) -> List[Tensor]:
    """Jacobian-transpose of ``cat(tensors, dim)``: split ``g`` into the pieces."""
    axis = dim if dim < 0 else dim + lead
    return list(torch.split(g, sizes, axis))


def unpad(g: Tensor, pad: List[int]) -> Tensor:
    """Jacobian-transpose of constant ``F.pad(x, pad)``: crop (or zero-pad for negative pads)."""
    return torch.nn.functional.pad(g, [-p for p in pad])


def movedim_last(t: Tensor, src: int) -> Tensor:
    """Move axis ``src`` to the end."""
    return t.movedim(src, -1)


def block_diagonal(blocks: Tensor) -> Tensor:
    """``[N, B, K, K]`` -> ``[N, B·K, B·K]``: per sample, the ``B`` blocks on the diagonal."""
    samples, count, size = blocks.size(0), blocks.size(1), blocks.size(2)
    eye = torch.eye(count, dtype=blocks.dtype, device=blocks.device)
    full = blocks.unsqueeze(3) * eye.view(1, count, 1, count, 1)      # [N, B, K, B, K]
    return full.reshape(samples, count * size, count * size)


def rows_apart_by_sample(t: Tensor, axis: int, samples: int) -> Tensor:
    """``t`` with axis ``axis`` of ``N·k`` rows in sample order split into ``[N, k]`` (a
    reshape inside the model gave each sample ``k`` rows)."""
    shape: List[int] = list(t.shape)
    return t.reshape(shape[:axis] + [samples, shape[axis] // samples] + shape[axis + 1:])


def concat_positions(tensors: List[Tensor], lead: int) -> Tensor:
    """``[*head, N, *, F]`` tensors (``head``: ``lead`` axes) -> ``[*head, N, P, F]``: their
    middle axes flattened to positions and concatenated (``P`` the total). Tensors with
    different numbers of rows (a layer also applied to several rows per sample,
    ``passes/sample_axis.merged_rows``) -> ``[*head, 1, P, F]``, every row a position of one
    sample: the sums over samples that the backward pass reads are the same."""
    rows = tensors[0].size(lead)
    kept = lead + 1
    for t in tensors:
        if t.size(lead) != rows:
            kept = lead
    parts = [t.reshape(list(t.shape[:kept]) + [-1, t.size(-1)]) for t in tensors]
    if kept == lead:
        parts = [part.unsqueeze(lead) for part in parts]
    return torch.cat(parts, lead + 1)
