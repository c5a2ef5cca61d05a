"""Rule cases: indexing, split/chunk/unbind/stack, expand/repeat, masked_fill, matmul, einsum,
attention (scaled_dot_product_attention lowered)."""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

from rule_harness import case

g = torch.Generator().manual_seed(5)


def rand(*shape):
    return torch.randn(*shape, dtype=torch.float64, generator=g)


def _pieces_used(x):
    a, _, c = x.chunk(3, dim=1)          # the middle piece is unused: zeros
    return a * 2.0 + c


def _split_list(x):
    a, b = torch.split(x, [1, 3], -1)
    return a * b


def _split_negative_position(x):
    pieces = x.split(2, dim=1)           # sizes 2, 2, 1
    return pieces[-1] + pieces[0][:, :1] * pieces[2]


def _unbind(x):
    first, second, third = x.unbind(1)
    return first * third + second


def _causal_mask_fill(x):
    mask = torch.ones_like(x, dtype=torch.bool).triu(1)
    return x.masked_fill(mask, float("-inf")).softmax(-1)


INDEXING = [
    case("getitem_slice", lambda x: x[:, 1:3], rand(3, 4, 2)),
    case("getitem_ellipsis_int", lambda x: x[..., 0], rand(3, 4, 2)),
    case("getitem_new_axis", lambda x: x[:, None], rand(3, 4)),
    case("getitem_negative", lambda x: x[:, -1, -3:], rand(3, 4, 5)),
    case("getitem_step", lambda x: x[:, 1::2, ::3], rand(3, 5, 7)),
    case("getitem_mixed", lambda x: x[:, None, 2, ..., 1:], rand(3, 4, 2, 3)),
    case("getitem_dynamic_bound", lambda x: x[:, : x.size(1) // 2], rand(3, 6)),
    case("getitem_out_of_range", lambda x: x[:, 2:100], rand(3, 4)),
    case("getitem_index_from_size", lambda x: x[:, x.shape[1] - 1], rand(3, 4)),
    case("chunk_unused_piece", _pieces_used, rand(3, 6, 2)),
    case("split_sections", _split_list, rand(3, 2, 4)),
    case("split_negative_position", _split_negative_position, rand(3, 5)),
    case("torch_chunk_uneven", lambda x: torch.chunk(x, 3, -1)[2], rand(3, 2, 5)),
    case("unbind", _unbind, rand(3, 3, 2)),
    case("torch_unbind", lambda x: torch.unbind(x, -1)[1], rand(3, 2, 4)),
    case("stack", lambda x, y: torch.stack([x, y * 2.0, x], dim=1), rand(3, 4), rand(3, 4)),
    case("stack_negative", lambda x, y: torch.stack((x, y), -1), rand(3, 4), rand(3, 4)),
    case("expand", lambda x: x.expand(3, 4, 2), rand(3, 1, 2)),
    case("expand_new_axes", lambda x: x.expand(2, -1, 4), rand(3, 1)),
    case("expand_param_over_samples", lambda x, b: x * b.expand(x.size(0), 2, 4),
         rand(3, 2, 4), rand(1, 1, 4), params=("b",)),
    case("expand_param_new_axis", lambda x, b: x * b.expand(x.size(0), 4), rand(3, 4),
         rand(4), params=("b",)),
    case("expand_as", lambda x, y: x.expand_as(y) * y, rand(3, 1, 4), rand(3, 2, 4)),
    case("expand_as_alone", lambda x, y: x.expand_as(y), rand(3, 1, 4), rand(3, 2, 4),
         const=("y",)),
    case("split_piece", lambda x: x.split(2, 1)[1], rand(3, 5)),
    case("broadcast_to", lambda x: torch.broadcast_to(x, (3, 2, 4)), rand(3, 1, 4)),
    case("repeat", lambda x: x.repeat(1, 2, 3), rand(3, 2, 2)),
    case("repeat_new_axes", lambda x: x.repeat(2, 1, 1, 2), rand(3, 2, 2)),
    case("repeat_param_over_samples", lambda x, p: x * p.repeat(x.size(0), 2, 1),
         rand(3, 4, 2), rand(1, 2, 2), params=("p",)),
    case("repeat_param_new_axis", lambda x, p: x * p.repeat(x.size(0), 1, 3), rand(3, 2, 6),
         rand(2, 2), params=("p",)),
    case("masked_fill", lambda x: x.masked_fill(x > 0.5, 0.25), rand(3, 4)),
    case("masked_fill_causal_softmax", _causal_mask_fill, rand(3, 4, 4)),
]

MATMUL = [
    case("matmul_batched", lambda a, b: torch.matmul(a, b), rand(3, 4, 2), rand(3, 2, 5)),
    case("matmul_operator", lambda a, b: a @ b.transpose(-2, -1), rand(3, 2, 4, 2),
         rand(3, 2, 5, 2)),
    case("matmul_broadcast", lambda a, b: a @ b, rand(3, 1, 4, 2), rand(2, 2, 5)),
    case("matmul_vector_right", lambda a, b: a @ b[0], rand(3, 4, 2), rand(3, 2)),
    case("matmul_vector_both", lambda a, b: torch.matmul(a[0], b[0]), rand(3, 4), rand(3, 4)),
    case("matmul_method", lambda a, b: a.matmul(b), rand(3, 4), rand(4, 2)),
    case("matmul_weight_right", lambda x, w: x @ w, rand(3, 4, 2), rand(2, 5), params=("w",)),
    case("matmul_weight_right_2d", lambda x, w: torch.matmul(x, w), rand(3, 2), rand(2, 5),
         params=("w",)),
    case("matmul_weight_vector", lambda x, w: x @ w, rand(3, 4, 2), rand(2), params=("w",)),
    case("matmul_weight_vector_2d", lambda x, w: x @ w, rand(3, 2), rand(2), params=("w",)),
    case("matmul_weight_heads", lambda x, w: x @ w, rand(3, 2, 4, 3), rand(2, 3, 5),
         params=("w",)),
    case("matmul_weight_left", lambda w, x: w @ x, rand(5, 2), rand(3, 2, 4), params=("w",)),
    case("matmul_weight_left_vector", lambda w, x: operator.matmul(w, x), rand(2),
         rand(3, 2, 4), params=("w",)),
    case("matmul_weight_left_heads", lambda w, x: w @ x, rand(1, 5, 2), rand(3, 2, 4),
         params=("w",)),
    case("mm", lambda a, w: torch.mm(a, w), rand(3, 2), rand(2, 4), params=("w",)),
    case("bmm", lambda a, b: torch.bmm(a, b), rand(3, 4, 2), rand(3, 2, 5)),
    case("baddbmm", lambda c, a, b: torch.baddbmm(c, a, b, beta=0.5, alpha=2.0),
         rand(3, 4, 5), rand(3, 4, 2), rand(3, 2, 5)),
    case("addmm", lambda x, b, w: torch.addmm(b, x, w), rand(3, 2), rand(4), rand(2, 4),
         params=("b", "w")),
]

EINSUM = [
    case("einsum_matmul", lambda a, b: torch.einsum("nij,njk->nik", a, b), rand(3, 4, 2),
         rand(3, 2, 5)),
    case("einsum_weight", lambda x, w: torch.einsum("nti,oi->nto", x, w), rand(3, 4, 2),
         rand(5, 2), params=("w",)),
    case("einsum_weight_first", lambda w, x: torch.einsum("hd,ntd->nht", w, x), rand(2, 3),
         rand(3, 4, 3), params=("w",)),
    case("einsum_ellipsis", lambda x, w: torch.einsum("...i,ij->...j", x, w), rand(3, 4, 2),
         rand(2, 5), params=("w",)),
    case("einsum_implicit", lambda a, b: torch.einsum("bij,bjk", a, b), rand(3, 4, 2),
         rand(3, 2, 5)),
    case("einsum_summed_alone", lambda x, w: torch.einsum("ni,jk->nj", x, w), rand(3, 4),
         rand(2, 5), params=("w",)),
    case("einsum_outer", lambda x, y: torch.einsum("ni,nj->nij", x, y), rand(3, 4), rand(3, 2)),
    case("einsum_three", lambda x, u, v: torch.einsum("ni,ij,jk->nk", x, u, v), rand(3, 4),
         rand(4, 2), rand(2, 5), params=("u", "v")),
    case("einsum_one_operand", lambda x: torch.einsum("nij->nji", x), rand(3, 4, 2)),
    case("einsum_spaces", lambda x, w: torch.einsum("n t i , i o -> n t o", x, w),
         rand(3, 2, 4), rand(4, 5), params=("w",)),
    case("bilinear", lambda x1, x2, w, b: F.bilinear(x1, x2, w, b), rand(3, 2, 4),
         rand(3, 2, 5), rand(6, 4, 5), rand(6), params=("w", "b")),
]

ATTENTION = [
    case("sdpa", lambda q, k, v: F.scaled_dot_product_attention(q, k, v), rand(3, 2, 4, 3),
         rand(3, 2, 5, 3), rand(3, 2, 5, 2)),
    case("sdpa_causal_scale",
         lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3),
         rand(3, 2, 4, 3), rand(3, 2, 4, 3), rand(3, 2, 4, 2)),
    case("sdpa_bool_mask",
         lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
         rand(3, 4, 3), rand(3, 5, 3), rand(3, 5, 2), rand(4, 5) > -0.5, const=("m",)),
    case("sdpa_float_mask",
         lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
         rand(3, 4, 3), rand(3, 5, 3), rand(3, 5, 2), rand(3, 1, 5), const=("m",)),
    case("sdpa_grouped_query",
         lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
         rand(3, 4, 2, 3), rand(3, 2, 5, 3), rand(3, 2, 5, 2)),
    case("attention_by_hand",
         lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1) / 3 ** 0.5, -1) @ v,
         rand(3, 4, 3), rand(3, 5, 3), rand(3, 5, 2)),
    case("attention_scale_from_size",
         lambda q, k: q @ k.transpose(-2, -1) * q.size(-1) ** -0.5, rand(3, 4, 3),
         rand(3, 5, 3)),
]

CASES = INDEXING + MATMUL + EINSUM + ATTENTION