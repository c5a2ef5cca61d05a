"""Square-root factors shared by the curvature passes: of diagonal residuals, and of cross
blocks ``R_n = [[0, C_n], [C_nᵀ, 0]]`` of two arguments (bilinear ops, broadcast products,
tied weights), ``R_n = S₊S₊ᵀ − S₋S₋ᵀ`` with ``S± = [U; ±V] √(Σ/2)`` from the SVD of ``C_n``."""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor

from fxcurv.rules.helpers import column_scaled


# the largest residual factor ``[D, N, D]`` built, in bytes per sample (``D²`` entries); beyond
# it the step refuses (elementwise residuals on wide activations: request the GGN instead).
# Per sample, so that the check does not depend on the batch size (dynamic-batch export).
MAX_RESIDUAL_FACTOR_BYTES = 256 * 2 ** 20


def residual_sqrt(residual: Tensor, sign: float, where: str, limit: int) -> Tensor:
    """``diag(√max(sign·R, 0))`` as a factor ``[D, N, *R.shape[1:]]``, ``D = R[0].numel()``;
    ``sign = 0``: ``diag(√|R|)``, both parts in one factor (its columns told apart by
    :func:`column_mask`). A RuntimeError naming ``where`` if it would exceed ``limit`` bytes
    per sample (``MAX_RESIDUAL_FACTOR_BYTES`` when the step was compiled)."""
    samples = residual.size(0)
    width = residual[0].numel()
    size = width * width * residual.element_size()
    if size > limit:
        raise RuntimeError("fxcurv: {}: the exact diagonal Hessian needs this op's residual "
                           "square-root factor [D, N, D] with D = {} and N = {} ({} bytes per "
                           "sample > {}); request the GGN (diag_ggn_exact, ggnmp) for this "
                           "model".format(where, width, samples, size, limit))
    part = (residual.abs() if sign == 0.0 else signed_part(residual, sign)).sqrt()
    flat = part.reshape(samples, -1)
    eye = torch.eye(flat.size(1), dtype=part.dtype, device=part.device)
    factor = eye.unsqueeze(1) * flat.unsqueeze(0)                     # [D, N, D]
    return factor.reshape([flat.size(1)] + list(part.shape))


def signed_part(residual: Tensor, sign: float) -> Tensor:
    """``max(sign · R, 0)``: the positive or the negative part of a diagonal residual."""
    return (residual * sign).clamp(min=0.0)


def column_mask(residual: Tensor, sign: float) -> Tensor:
    """``[D, N]``: 1 for the columns ``(d, n)`` of ``diag(√|R|)`` (:func:`residual_sqrt`) where
    ``sign·R[n, d] > 0``, else 0."""
    flat = residual.reshape(residual.size(0), -1).t()
    return (flat * sign > 0).to(residual.dtype)


def mask_columns(factor: Tensor, mask: Tensor) -> Tensor:
    """``factor`` ``[D, N, ...]`` with its columns ``(d, n)`` scaled by ``mask`` ``[D, N]``
    (a propagated factor's column ``(d, n)`` stays the image of seed column ``(d, n)``)."""
    return column_scaled(factor, mask)


def checked_parameter_cross(g: Tensor, data: Tensor, side: Tensor, limit: int,
                            where: str) -> Tensor:
    """``g``, after checking that the tied-weight cross block's intermediates
    (``[N·Da, *out]``, ``[N·Da, *w]``, the factors) stay within ``limit`` bytes per sample."""
    width = data[0].numel()
    size = width * (width + g[0].numel() + 2 * side.numel()) * g.element_size()
    if size > limit:
        raise RuntimeError("fxcurv: {}: the cross second derivative of a data argument and "
                           "a tied parameter needs {} bytes per sample (> {}); request the "
                           "GGN (diag_ggn_exact, ggnmp) for this model".format(where, size,
                                                                              limit))
    return g


def sample_basis(data: Tensor) -> Tensor:
    """``[N·D, *data.shape[1:]]``: row ``n·D + i`` the ``i``-th unit vector of one sample's
    ``D`` entries."""
    width = data[0].numel()
    eye = torch.eye(width, dtype=data.dtype, device=data.device)
    rows = eye.unsqueeze(0).expand(data.size(0), width, width)
    return rows.reshape([data.size(0) * width] + list(data.shape[1:]))


def rows_apart(factor: Tensor) -> Tensor:
    """``[K, N, *f]`` -> ``[K·N, N, *f]``: column ``(k, n)`` holds ``factor[k, n]`` at row
    ``n`` and zeros elsewhere (``N`` sample-local columns for each of ``K``), so that a
    propagation through ops that couple the rows keeps each sample's column apart."""
    samples = factor.size(1)
    eye = torch.eye(samples, dtype=factor.dtype, device=factor.device)
    apart = factor.unsqueeze(1) * eye.view([1, samples, samples] + [1] * (factor.dim() - 2))
    return apart.reshape([factor.size(0) * samples] + list(factor.shape[1:]))


def columns_by_sample(columns: Tensor, samples: int) -> Tensor:
    """``[K·N, *p]`` -> ``[K, N, *p]``: the totals of :func:`rows_apart`'s columns by sample."""
    return columns.reshape([columns.size(0) // samples, samples] + list(columns.shape[1:]))


def repeat_samples(g: Tensor, data: Tensor) -> Tensor:
    """``g`` ``[N, *out]`` with each sample repeated ``D = data[0].numel()`` times."""
    return g.repeat_interleave(data[0].numel(), dim=0)


def per_sample_block(terms: Tensor, data: Tensor) -> Tensor:
    """``[N·D, *w]`` -> ``[N, D, Dw]``."""
    return terms.reshape(data.size(0), data[0].numel(), -1)


def parameter_cross_sqrt(u: Tensor, sigma: Tensor, vh: Tensor, data: Tensor, side: Tensor,
                         sign: float) -> List[Tensor]:
    """:func:`cross_sqrt` for a parameter-side second argument (no sample axis): the parts on
    the data ``[r, N, *data.shape[1:]]`` and on the parameter-side value ``[r, N, *side.shape]``
    (per-sample terms of it)."""
    root = (sigma * 0.5).sqrt()
    left = (u * root.unsqueeze(1)).permute(2, 0, 1)                      # [r, N, Da]
    right = (vh * root.unsqueeze(2)).permute(1, 0, 2) * sign             # [r, N, Dw]
    lead = [sigma.size(1), sigma.size(0)]
    return [left.reshape(lead + list(data.shape[1:])), right.reshape(lead + list(side.shape))]


def checked_cross(coefficient: Tensor, a: Tensor, b: Tensor, limit: int, where: str) -> Tensor:
    """The cross coefficient ``c`` ``[N, *out]``, after checking that ``a`` and ``b`` carry the
    samples on axis 0 with the output's number of axes, and that the factors
    (:func:`broadcast_cross_sqrt`) stay within ``limit`` bytes per sample."""
    if a.dim() != coefficient.dim() or b.dim() != coefficient.dim() or \
            a.size(0) != coefficient.size(0) or b.size(0) != coefficient.size(0):
        raise RuntimeError("fxcurv: {}: the cross second derivative needs both arguments "
                           "with the samples on axis 0 and the output's number of axes, got "
                           "{} and {} for an output {}".format(where, list(a.shape),
                                                               list(b.shape),
                                                               list(coefficient.shape)))
    da, db = a[0].numel(), b[0].numel()
    size = min(da, db) * (da + db) * coefficient.element_size()
    if size > limit:
        raise RuntimeError("fxcurv: {}: the cross second derivative's factors need {} bytes "
                           "per sample (> {}); request the GGN (diag_ggn_exact, ggnmp) for "
                           "this model".format(where, size, limit))
    return coefficient


def broadcast_cross_sqrt(c: Tensor, a: Tensor, b: Tensor, sign: float) -> List[Tensor]:
    """Factors ``[r, N, *a.shape[1:]]``, ``[r, N, *b.shape[1:]]`` of the positive
    (``sign = 1``) or negated negative part of ``R_n = [[0, C_n], [C_nᵀ, 0]]``,
    ``C_n[i, j] = Σ_{d: d→i, d→j} c[n, d]`` (``d`` an output entry, ``d→i`` when ``a``'s entry
    ``i`` is broadcast to it). If one argument has the output's shape, each entry ``j`` of the
    other meets a disjoint group of output entries, so ``C_n = Σ_j σ_j u_j e_jᵀ`` is its SVD
    (``σ_j = ‖c|_j‖``, ``u_j = c|_j / σ_j``) and ``S± = [u; ±e] √(σ/2)``, one column per entry
    of the smaller argument (both of the output's shape: ``r = D``, a diagonal ``C_n``);
    otherwise the SVD of the dense ``C_n`` (:func:`cross_sqrt`)."""
    if list(a.shape) == list(c.shape):
        return grouped_cross_sqrt(c, a, b, sign)
    if list(b.shape) == list(c.shape):  # [e; ±u] spans the same parts as [±e; u]
        parts = grouped_cross_sqrt(c, b, a, sign)
        return [parts[1], parts[0]]
    samples = c.size(0)
    groups = torch.arange(b[0].numel(), device=c.device).reshape(b[0].shape)
    groups = groups.expand(c.shape[1:]).reshape(-1)                           # [D] -> j
    rows = torch.arange(a[0].numel(), device=c.device).reshape(a[0].shape)
    rows = rows.expand(c.shape[1:]).reshape(-1)
    dense = torch.zeros(samples, a[0].numel() * b[0].numel(), dtype=c.dtype, device=c.device)
    dense.index_add_(1, rows * b[0].numel() + groups, c.reshape(samples, -1))
    u, sigma, vh = torch.linalg.svd(dense.reshape(samples, a[0].numel(), b[0].numel()),
                                    full_matrices=False)
    return cross_sqrt(u, sigma, vh, a, b, sign)


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


def grouped_cross_sqrt(c: Tensor, full: Tensor, other: Tensor, sign: float) -> List[Tensor]:
    """:func:`broadcast_cross_sqrt` where ``full`` has the output's shape: one column per entry
    ``j`` of ``other`` (``[Dj, N, *full.shape[1:]]``, ``[Dj, N, *other.shape[1:]]``)."""
    samples, width = c.size(0), other[0].numel()
    groups = torch.arange(width, device=c.device).reshape(other[0].shape)
    groups = groups.expand(c.shape[1:]).reshape(-1)                           # [D] -> j
    flat = c.reshape(samples, -1)                                              # [N, D]
    squares = torch.zeros(samples, width, dtype=c.dtype, device=c.device)
    sigma = squares.index_add_(1, groups, flat.square()).sqrt()               # [N, Dj]
    scale = torch.where(sigma > 0, (2.0 * sigma).clamp(min=1e-300).rsqrt(),
                        torch.zeros_like(sigma))
    member = torch.nn.functional.one_hot(groups, width).t().to(c.dtype)       # [Dj, D]
    left = member.unsqueeze(1) * (flat * scale[:, groups]).unsqueeze(0)        # [Dj, N, D]
    eye = torch.eye(width, dtype=c.dtype, device=c.device)
    right = eye.unsqueeze(1) * (sign * (sigma * 0.5).sqrt()).unsqueeze(0)      # [Dj, N, Dj]
    lead = [width, samples]
    return [left.reshape(lead + list(full.shape[1:])), right.reshape(lead + list(other.shape[1:]))]
