"""Per-sample parameter Jacobians declared as contractions, and every per-sample quantity of
a parameter derived from that one declaration.

A parameter argument ``w`` of an op that is linear in it (linear, conv, conv_transpose,
matmul, bmm, einsum, embedding) declares its per-sample term as a sum over positions ``p`` of
outer products, per group ``γ``:

    q_kn[γ, a, b] = Σ_p L[k, n, γ, p, a] R[n, γ, p, b]

* ``L`` (left): the cotangent side ``[*lead, N, G, P, A]`` (``k`` runs over the lead vectors);
* ``R`` (right): the data side ``[N, G, P, B]``, or an *index* factor, integers ``[N, G, P]``
  in ``[0, B)`` standing for one-hot rows (embedding);
* the index spec: ``last`` (both factors store positions last, ``[..., A, P]`` and
  ``[N, G, B, P]``: the im2col layout of conv), ``swap`` (the parameter is ``[G, B, A]``,
  else ``[G, A, B]``), reshaped to ``w.shape``.

A rule field ``contraction[arg](g, c) -> Contraction | None`` declares it (None: no form for
this call, e.g. an einsum with three operands). From it this module derives:

================================  =============  ==========================================
quantity                          shape          contraction order
================================  =============  ==========================================
``batch_grad`` (:func:`batch`)    ``[*lead,N,*w]``  one outer product per sample (P = 1: a
                                                 broadcast multiply)
``batch_l2`` (lead 0)             ``[N]``        Gram ``Σ_{p,p'} (L_p·L_p')(R_p·R_p')`` when
                                                 ``P (A + B) < A B``, else explicit
``sum_grad_squared``              ``w.shape``    P = 1: ``(Σ_k L²)ᵀ R²``; else one lead vector
                                                 at a time into one reused buffer
``batch_sum_grad_squared``        ``[N, *w]``    P = 1: ``(Σ_k L²) ⊗ R²``; else accumulated
``param_product``                 ``[V, *w]``    ``u = R Vᵀ``, projections ``⟨L_kn, u_vn⟩``,
                                                 ``Σ_{n,p} (Σ_k w L) ⊗ R``; never ``q``
                                                 (a form's own ``product``: ``u`` and the
                                                 last step by the op's maps, e.g. conv)
================================  =============  ==========================================

With a sqrt-GGN factor as the cotangent (lead 1) ``sum_grad_squared`` is the GGN diagonal,
``batch_sum_grad_squared`` its per-sample diagonals and ``param_product`` the GGN block times
vectors. Every helper is TorchScript-scriptable; Python control flow depends on sizes of the
parameter, positions and lead axes only.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import Tensor

from .helpers import column_scaled, rows_apart_by_sample
from .registry import fresh


@dataclass
class Contraction:
    """The declared form (Proxies): see the module docstring."""

    left: Any
    right: Any
    param: Any
    swap: bool = False
    last: bool = False
    index: bool = False
    # ``vectors -> [V, *w]``: ``param_product`` by the op's own maps (``u = J V`` and ``Jᵀ r``
    # as the layer's forward and weight-backward calls) where they beat the factor ``R``
    product: Optional[Callable] = None


# -- factor primitives (TorchScript-scriptable) ------------------------------------------------
def positions_middle(t: Tensor, last: bool) -> Tensor:
    """``[..., F, P]`` -> ``[..., P, F]`` (a view) when the factor stores positions last."""
    return t.transpose(-1, -2) if last else t


def right_width(left: Tensor, weight: Tensor, lead: int, last: bool) -> int:
    """``B``: the parameter's entries per group and left feature."""
    features = left.size(-2) if last else left.size(-1)
    return weight.numel() // (left.size(lead + 1) * features)


def outer(left: Tensor, right: Tensor, weight: Tensor, lead: int, last: bool,
          index: bool) -> Tensor:
    """``Σ_p L_p ⊗ R_p`` ``[*lead, N, G, A, B]``; an index factor scatters ``L``'s rows into
    the own rows ``(n, γ, R[n, γ, p])`` of one zero table."""
    if index:
        rows = right_width(left, weight, lead, last)
        by_position = positions_middle(left, last)
        samples, groups = right.size(0), right.size(1)
        offset = torch.arange(samples * groups, device=right.device) * rows
        own = (right + offset.reshape([samples, groups, 1])).reshape(-1)
        head: List[int] = list(left.shape[:lead])
        features = by_position.size(-1)
        table = torch.zeros(head + [samples * groups * rows, features], dtype=left.dtype,
                            device=left.device)
        table = table.index_add(lead, own, by_position.reshape(head + [-1, features]))
        return table.reshape(head + [samples, groups, rows, features]).transpose(-1, -2)
    axis = -1 if last else -2
    if left.size(axis) == 1:  # one position: a broadcast multiply (a matmul over 1 is slower)
        return left.select(axis, 0).unsqueeze(-1) * right.select(axis, 0).unsqueeze(-2)
    if last:
        return torch.einsum("...ngap,ngbp->...ngab", left, right)
    return torch.einsum("...ngpa,ngpb->...ngab", left, right)


def as_parameter(q: Tensor, keep: int, weight: Tensor, swap: bool) -> Tensor:
    """``[*head, G, A, B]`` (``keep`` head axes) -> ``[*head, *w.shape]``."""
    if swap:
        q = q.transpose(-1, -2)
    head: List[int] = list(q.shape[:keep])
    return q.reshape(head + list(weight.shape))


def right_gram(right: Tensor, last: bool, index: bool, dtype: torch.dtype) -> Tensor:
    """``R_p · R_p'`` ``[N·G, P, P]``; for an index factor ``[R_p = R_p']``."""
    if index:
        flat = right.flatten(0, 1)
        return (flat.unsqueeze(2) == flat.unsqueeze(1)).to(dtype)
    flat = positions_middle(right, last).flatten(0, 1)
    return torch.matmul(flat, flat.transpose(1, 2))


def apply_right(right: Tensor, vectors: Tensor, last: bool, index: bool) -> Tensor:
    """``u[n, v, γ, p, a] = Σ_b V[v, γ, a, b] R[n, γ, p, b]`` in ``L``'s layout (``[..., a, p]``
    if ``last``); ``vectors`` ``[V, G, A, B]``. An index factor gathers ``V[v, γ, a, R_p]``."""
    if index:
        groups, rows = vectors.size(1), vectors.size(3)
        table = vectors.permute(1, 3, 0, 2).reshape(groups * rows, vectors.size(0), -1)
        offset = torch.arange(groups, device=right.device).reshape([1, groups, 1]) * rows
        u = table[right + offset]                                  # [N, G, P, V, A]
        return u.permute(0, 3, 1, 4, 2) if last else u.permute(0, 3, 1, 2, 4)
    if last:
        return torch.einsum("ngbp,vgab->nvgap", right, vectors)
    return torch.einsum("ngpb,vgab->nvgpa", right, vectors)


def apply_right_t(r: Tensor, right: Tensor, groups: int, rows: int, last: bool,
                  index: bool) -> Tensor:
    """``Σ_{n,p} r[n, v, γ, p, a] R[n, γ, p, b]`` ``[V, G, A, B]`` (``r`` in ``L``'s layout)."""
    if index:
        by_position = positions_middle(r, last)                    # [N, V, G, P, A]
        count, features = by_position.size(1), by_position.size(-1)
        offset = torch.arange(groups, device=right.device).reshape([1, groups, 1]) * rows
        own = (right + offset).reshape(-1)
        terms = by_position.transpose(0, 1).reshape(count, -1, features)
        table = torch.zeros([count, groups * rows, features], dtype=r.dtype, device=r.device)
        table = table.index_add(1, own, terms)
        return table.reshape([count, groups, rows, features]).transpose(-1, -2)
    if last:
        return torch.einsum("nvgap,ngbp->vgab", r, right)
    return torch.einsum("nvgpa,ngpb->vgab", r, right)


# -- derived quantities (TorchScript-scriptable) -----------------------------------------------
def contraction_batch(left: Tensor, right: Tensor, weight: Tensor, lead: int, swap: bool,
                      last: bool, index: bool) -> Tensor:
    """``batch_grad``: ``q`` ``[*lead, N, *w.shape]``."""
    return as_parameter(outer(left, right, weight, lead, last, index), lead + 1, weight, swap)


def contraction_l2(left: Tensor, right: Tensor, weight: Tensor, swap: bool, last: bool,
                   index: bool) -> Tensor:
    """``‖q_n‖²`` ``[N]`` (lead 0), in the cheaper contraction order for the shapes: one
    position ``Σ_γ ‖L‖²‖R‖²``; the Gram form ``Σ_{p,p'} (L_p·L_p')(R_p·R_p')`` when
    ``P (A + B) < A·B``; else the explicit ``q``."""
    by_position = positions_middle(left, last)                      # [N, G, P, A]
    samples, groups = by_position.size(0), by_position.size(1)
    positions, features = by_position.size(2), by_position.size(3)
    rows = right_width(left, weight, 0, last)
    if positions == 1 and not index:
        return (left.square().sum([2, 3]) * right.square().sum([2, 3])).sum(1)
    if positions * (features + rows) < features * rows:
        flat = by_position.flatten(0, 1)
        gram = torch.matmul(flat, flat.transpose(1, 2))
        total = (gram * right_gram(right, last, index, left.dtype)).sum([1, 2])
        return total.reshape([samples, groups]).sum(1)
    explicit = as_parameter(outer(left, right, weight, 0, last, index), 1, weight, swap)
    return explicit.square_().flatten(1).sum(1)


@fresh
def contraction_sum_squares(left: Tensor, right: Tensor, weight: Tensor, lead: int,
                            swap: bool, last: bool, index: bool,
                            weights: Optional[Tensor] = None) -> Tensor:
    """``Σ_{lead, n} q²`` ``w.shape`` without ``[*lead, N, *w]``: one position
    ``Σ_n (Σ_k L²)ᵀ R²`` (a batched matmul over the groups); else chunks of lead vectors
    (:func:`square_sums_by_vector`). ``weights`` (lead 1): each column's ``q_kn²`` times
    ``weights[k, n]`` (``[K, N]``, or ``[1, 1]``: one weight)."""
    flat = left.reshape([-1] + list(left.shape[lead:]))                # [K, N, G, ., .]
    axis = -1 if last else -2
    if flat.size(axis) == 1 and not index:
        squares = _weighted(flat.select(axis, 0).square(), weights).sum(0)  # [N, G, A]
        total = torch.matmul(squares.permute(1, 2, 0),
                             right.select(axis, 0).square().transpose(0, 1))
        return as_parameter(total, 0, weight, swap)
    return as_parameter(square_sums_by_vector(flat, right, weight, last, index, weights), 0,
                        weight, swap)


def _weighted(squares: Tensor, weights: Optional[Tensor]) -> Tensor:
    """``squares`` ``[K, N, ...]`` times ``weights`` (``[K, N]`` or ``[1, 1]``; None:
    unweighted)."""
    return squares if weights is None else column_scaled(squares, weights)


def square_sums_by_vector(flat: Tensor, right: Tensor, weight: Tensor, last: bool,
                          index: bool, weights: Optional[Tensor] = None) -> Tensor:
    """``Σ_{k,n} q_kn²`` ``[G, A, B]`` (weighted by ``weights[k, n]``), ``flat``
    ``[K, N, G, ., .]``: chunks of lead vectors per batched product
    (:func:`_chunked_squares`: thousands of residual columns of a depthwise convolution in a
    few products, not one each)."""
    if index:
        return _indexed_squares(flat, right, weight, last, weights).sum(0)
    return _chunked_squares(flat, right, weight, last, False, weights)


def _indexed_squares(flat: Tensor, right: Tensor, weight: Tensor, last: bool,
                     weights: Optional[Tensor]) -> Tensor:
    """``Σ_k w_kn q_kn²`` ``[N, G, A, B]`` of an index factor, one lead vector at a time."""
    columns = None if weights is None else weights.expand(flat.size(0), flat.size(1))
    total = torch.zeros(0, dtype=flat.dtype, device=flat.device)
    for vector in range(flat.size(0)):
        term = outer(flat[vector], right, weight, 0, last, True).square()
        if columns is not None:
            term = column_scaled(term.unsqueeze(0), columns[vector:vector + 1])[0]
        total = term if vector == 0 else total + term
    return total


def _chunked_squares(flat: Tensor, right: Tensor, weight: Tensor, last: bool,
                     per_sample: bool, weights: Optional[Tensor] = None,
                     chunk_entries: int = 2097152) -> Tensor:
    """``Σ_k q_k²`` over the lead vectors of ``flat`` ``[K, N, G, ., .]`` (weighted by
    ``weights[k, n]``), ``[N, G, A, B]`` (``per_sample``) or summed over the samples
    ``[G, A, B]``: per chunk of lead vectors one batched matmul over ``(sample, group)``,
    ``[k·A, P] @ [P, B]`` (``R`` read once, not once per vector), for as many lead vectors
    at once as fit ``chunk_entries`` entries of ``q`` (16 MiB in float64; all at once under
    ``torch.compile`` / ``torch.export``, where the chunk would depend on the batch size),
    squared in place."""
    samples, groups = flat.size(1), flat.size(2)
    features = flat.size(3) if last else flat.size(4)
    rows = right_width(flat[0], weight, 0, last)
    lhs = positions_middle(flat.reshape([flat.size(0), samples * groups, flat.size(3), -1]),
                           not last)                                  # [K, N·G, A, P] (view)
    rhs = positions_middle(right.reshape([samples * groups, right.size(2), -1]), last)
    chunk = max(1, flat.size(0))
    if torch.jit.is_scripting() or not torch.compiler.is_compiling():
        chunk = max(1, min(chunk, chunk_entries // (samples * groups * features * rows)))
    total = torch.zeros([samples, groups, features, rows] if per_sample
                        else [groups, features, rows], dtype=flat.dtype, device=flat.device)
    for start in range(0, lhs.size(0), chunk):
        part = lhs[start:start + chunk]
        count = part.size(0)
        by_sample = part.transpose(0, 1).reshape([samples * groups, -1, part.size(-1)])
        terms = torch.bmm(by_sample, rhs)                              # [N·G, k·A, B]
        squares = terms.square_().view([samples, groups, count, features, rows])
        if weights is not None:  # (columns [k, N] -> [N, 1, k, 1, 1])
            columns = weights.expand(flat.size(0), samples)[start:start + count]
            squares = squares * columns.t().reshape([samples, 1, count, 1, 1])
        total += squares.sum(2) if per_sample else squares.sum([0, 2])
    return total


def contraction_total(left: Tensor, right: Tensor, weight: Tensor, swap: bool, last: bool,
                      index: bool) -> Tensor:
    """``Σ_n q_n`` ``w.shape`` (lead 0: the parameter's gradient) as one matmul per group over
    the ``(sample, position)`` pairs, ``[G, A, N·P] @ [G, N·P, B]``."""
    if index:
        return as_parameter(outer(left, right, weight, 0, last, index).sum(0), 0, weight,
                            swap)
    by_position = positions_middle(left, last)                      # [N, G, P, A]
    rows = positions_middle(right, last)                             # [N, G, P, B]
    groups = by_position.size(1)
    lhs = by_position.permute(1, 3, 0, 2).reshape(groups, by_position.size(3), -1)
    rhs = rows.transpose(0, 1).reshape(groups, -1, rows.size(3))
    return as_parameter(torch.matmul(lhs, rhs), 0, weight, swap)


@fresh
def contraction_sum_squares_total(left: Tensor, right: Tensor, weight: Tensor, swap: bool,
                                  last: bool, index: bool) -> Tuple[Tensor, Tensor]:
    """Lead 0: ``(Σ_n q_n², Σ_n q_n)``. Where the per-sample terms are built (several
    positions: :func:`square_sums_by_vector`'s buffer) their sum is one pass over them
    before they are squared, which saves the backward pass its weight-gradient product
    (``contraction_total`` else: that product once)."""
    axis = -1 if last else -2
    if left.size(axis) == 1 or index:
        return (contraction_sum_squares(left, right, weight, 0, swap, last, index),
                contraction_total(left, right, weight, swap, last, index))
    samples, groups = left.size(0), left.size(1)
    features = left.size(2) if last else left.size(3)
    rows = right_width(left, weight, 0, last)
    lhs = positions_middle(left.reshape([samples * groups, left.size(2), -1]), not last)
    rhs = positions_middle(right.reshape([samples * groups, right.size(2), -1]), last)
    terms = torch.bmm(lhs, rhs).view([samples, groups, features, rows])  # q_n [N, G, A, B]
    total = terms.sum(0)
    squares = terms.square_().sum(0)
    return as_parameter(squares, 0, weight, swap), as_parameter(total, 0, weight, swap)


@fresh
def contraction_l2_total(left: Tensor, right: Tensor, weight: Tensor, swap: bool, last: bool,
                         index: bool) -> Tuple[Tensor, Tensor]:
    """Lead 0: ``(‖q_n‖², Σ_n q_n)``: the sum from the explicit ``q`` where
    :func:`contraction_l2` builds it, else :func:`contraction_total`."""
    by_position = positions_middle(left, last)
    positions, features = by_position.size(2), by_position.size(3)
    rows = right_width(left, weight, 0, last)
    if (positions == 1 and not index) or positions * (features + rows) < features * rows:
        return (contraction_l2(left, right, weight, swap, last, index),
                contraction_total(left, right, weight, swap, last, index))
    explicit = as_parameter(outer(left, right, weight, 0, last, index), 1, weight, swap)
    total = explicit.sum(0)
    return explicit.square_().flatten(1).sum(1), total


def contraction_batch_total(left: Tensor, right: Tensor, weight: Tensor, swap: bool,
                            last: bool, index: bool) -> Tuple[Tensor, Tensor]:
    """Lead 0: ``(q [N, *w], Σ_n q_n)``, the sum over ``q`` when it has several positions
    per sample (cheaper than their product again), else :func:`contraction_total`."""
    terms = contraction_batch(left, right, weight, 0, swap, last, index)
    axis = -1 if last else -2
    if left.size(axis) > 1:
        return terms, terms.sum(0)
    return terms, contraction_total(left, right, weight, swap, last, index)


def contraction_batch_sum_squares(left: Tensor, right: Tensor, weight: Tensor, lead: int,
                                  swap: bool, last: bool, index: bool,
                                  weights: Optional[Tensor] = None) -> Tensor:
    """``Σ_lead q²`` ``[N, *w.shape]``, never ``[*lead, N, *w]``: one position
    ``(Σ_k L²) ⊗ R²``; else accumulated over chunks of lead vectors
    (:func:`_chunked_squares`); ``weights`` as for :func:`contraction_sum_squares`."""
    flat = left.reshape([-1] + list(left.shape[lead:]))
    axis = -1 if last else -2
    if flat.size(axis) == 1 and not index:
        squares = _weighted(flat.select(axis, 0).square(), weights).sum(0).unsqueeze(-1)
        total = squares * right.select(axis, 0).square().unsqueeze(-2)  # [N, G, A, B]
        return as_parameter(total, 1, weight, swap)
    if index:
        return as_parameter(_indexed_squares(flat, right, weight, last, weights), 1, weight,
                            swap)
    return as_parameter(_chunked_squares(flat, right, weight, last, True, weights), 1, weight,
                        swap)


def contraction_product(left: Tensor, right: Tensor, weight: Tensor, vectors: Tensor,
                        lead: int, swap: bool, last: bool, index: bool) -> Tensor:
    """``Σ_{k,n} q_kn ⟨q_kn, V_v⟩`` ``[V, *w.shape]`` without ``q``: ``u = R Vᵀ``
    (:func:`apply_right`), projections ``w_nkv = ⟨L_kn, u_vn⟩``, ``r_vn = Σ_k w_nkv L_kn``,
    then ``Σ_{n,p} r ⊗ R``. Batched matmuls over the samples read ``L`` in place."""
    samples, groups = left.size(lead), left.size(lead + 1)
    rows = right_width(left, weight, lead, last)
    count = vectors.size(0)
    u = apply_right(right, _by_group(vectors, left, rows, last, swap), last, index)
    by_sample = left.reshape([-1, samples, u[0, 0].numel()]).transpose(0, 1)  # [N, K, S]
    projections = torch.matmul(by_sample, u.reshape([samples, count, -1]).transpose(1, 2))
    r = torch.matmul(projections.transpose(1, 2), by_sample).reshape(u.shape)
    return as_parameter(apply_right_t(r, right, groups, rows, last, index), 1, weight, swap)


def _by_group(vectors: Tensor, left: Tensor, rows: int, last: bool, swap: bool) -> Tensor:
    """Vectors ``[V, *w.shape]`` as ``[V, G, A, B]`` (``G`` and ``A`` read off ``left``'s
    last three axes)."""
    groups = left.size(-3)
    features = left.size(-2) if last else left.size(-1)
    if swap:
        return vectors.reshape([vectors.size(0), groups, rows, features]).transpose(-1, -2)
    return vectors.reshape([vectors.size(0), groups, features, rows])


def diagonal_product(left: Tensor, right: Tensor, weight: Tensor, vectors: Tensor, swap: bool,
                     last: bool, index: bool) -> Tensor:
    """``Jᵀ diag(r) J V`` ``[V, *w.shape]`` for a diagonal curvature ``r`` at the output, with
    ``left`` the form of ``r`` (lead 0): ``u = J V`` in ``L``'s layout (:func:`apply_right`),
    weighted by ``r``, then ``Σ_{n,p} ⊗ R`` (:func:`apply_right_t`)."""
    groups = left.size(1)
    rows = right_width(left, weight, 0, last)
    u = apply_right(right, _by_group(vectors, left, rows, last, swap), last, index)
    return as_parameter(apply_right_t(u * left.unsqueeze(1), right, groups, rows, last, index),
                        1, weight, swap)


def squared_right(right: Tensor, index: bool) -> Tensor:
    """``R ⊙ R`` (an index factor stands for one-hot rows, its own square)."""
    return right if index else right.square()


# -- emitting the derived quantities -----------------------------------------------------------
def _flags(form: Contraction) -> tuple:
    return form.swap, form.last, form.index


def batch(form: Contraction, c) -> Any:
    return c.call(contraction_batch, form.left, form.right, form.param, c.lead, *_flags(form))


def batch_l2(form: Contraction, c) -> Any:
    return c.call(contraction_l2, form.left, form.right, form.param, *_flags(form))


def sum_squares(form: Contraction, c) -> Any:
    return c.call(contraction_sum_squares, form.left, form.right, form.param, c.lead,
                  *_flags(form))


def batch_sum_squares(form: Contraction, c) -> Any:
    return c.call(contraction_batch_sum_squares, form.left, form.right, form.param, c.lead,
                  *_flags(form))


def weighted_squares(form: Contraction, c, weights: Any, per_sample: bool) -> Any:
    """``Σ_{k,n} weights[k, n] q_kn²`` of a factor's form (lead 1), per sample or summed."""
    helper = contraction_batch_sum_squares if per_sample else contraction_sum_squares
    return c.call(helper, form.left, form.right, form.param, c.lead, *_flags(form), weights)


def product(form: Contraction, c, vectors: Any) -> Any:
    if form.product is not None:
        return form.product(vectors)
    return c.call(contraction_product, form.left, form.right, form.param, vectors, c.lead,
                  *_flags(form))


def _total_of(helper: Callable) -> Callable:
    """Lead 0: ``(quantity, Σ_n q_n)`` by ``helper``, or None for other leads."""
    def derive_total(form: Contraction, c) -> Any:
        if c.lead != 0:
            return None
        pair = c.call(helper, form.left, form.right, form.param, *_flags(form))
        return pair[0], pair[1]
    return derive_total


# what :class:`passes.per_sample.PerSample` asks for, by name; ``*_total``: lead 0 only,
# ``(quantity, Σ_n q_n)``, the sum standing in for the backward's weight gradient
DERIVED: dict[str, Callable] = {"batch_l2": batch_l2, "sum_squares": sum_squares,
                                "batch_sum_squares": batch_sum_squares, "product": product,
                                "batch_total": _total_of(contraction_batch_total),
                                "batch_l2_total": _total_of(contraction_l2_total),
                                "sum_squares_total": _total_of(contraction_sum_squares_total)}


def diagonal_curvature(kind: str, rule, arg: str, r: Any, c, *extra: Any) -> Any:
    """A diagonal curvature ``diag(r)`` at the output (``r`` ``[N, *y.shape]``, ``c`` at lead
    0) pulled back to the parameter argument ``arg`` by ``rule.diagonal_squares[arg]``:
    ``Σ_{n,d} r_nd (∂y_nd/∂w)²`` (``kind`` "sum_squares", ``w.shape``), the same per sample
    ("batch_sum_squares", ``[N, *w.shape]``) or ``Jᵀ diag(r) J V`` ("product", vectors ``V``
    ``[V, *w.shape]``). "form": ``∂y_d/∂w`` is one entry of the right factor ``R``, so the
    squares are the form with ``g = r`` and ``R²``; "unit": ``J`` has 0/1 entries, one per
    output entry, so ``Jᵀ diag(r) J = diag(Jᵀ r)``."""
    if rule.diagonal_squares[arg] == "unit":
        if kind == "sum_squares":
            return rule.vjp[arg](r, c)
        if kind == "batch_sum_squares":
            return rule.batch_grad[arg](r, c)
        return rule.vjp[arg](r, c) * extra[0]
    form = rule.contraction[arg](r, c)
    if kind == "product":
        return c.call(diagonal_product, form.left, form.right, form.param, extra[0],
                      *_flags(form))
    squared = replace(form, right=c.call(squared_right, form.right, form.index))
    if kind == "sum_squares":
        return c.call(contraction_total, squared.left, squared.right, squared.param,
                      *_flags(form))
    return batch(squared, c)


def rows_into_positions(factor: Tensor, axis: int, samples: int, last: bool) -> Tensor:
    """A factor whose sample axis ``axis`` holds ``k`` rows per sample, in sample order (a
    reshape inside the model merged positions or frames into rows), with each sample's rows as
    ``k`` more positions of it: ``[.., N·k, G, P, F]`` -> ``[.., N, G, k·P, F]``
    (``[.., F, P]`` -> ``[.., F, k·P]`` if ``last``: also an index factor ``[N·k, G, P]``).
    Unchanged at one row per sample."""
    if factor.size(axis) == samples:
        return factor
    split = rows_apart_by_sample(factor, axis, samples)
    position = -1 if last else -2
    return split.movedim(axis + 1, position - 1).flatten(position - 1, position)


def rows_as_positions(form: Optional[Contraction], c, samples: Any) -> Optional[Contraction]:
    """``form`` of an op whose rows may be merged (several per sample,
    ``passes/sample_axis.merged_rows``): the same sums over a sample's positions with its rows
    among them, so every derived quantity is per sample. The op's own ``product`` (which
    reads its rows as samples) is dropped for the generic one."""
    if form is None:
        return None
    left = c.call(rows_into_positions, form.left, c.lead, samples, form.last)
    right = c.call(rows_into_positions, form.right, 0, samples, form.last or form.index)
    return replace(form, left=left, right=right, product=None)


def derive(kind: str, declare: Callable, g: Any, c, *extra: Any) -> Optional[Any]:
    """Quantity ``kind`` (a key of :data:`DERIVED`) of the declared form, or None where the
    declaration has no form for this call."""
    form = declare(g, c)
    return None if form is None else DERIVED[kind](form, c, *extra)


def batch_grad_of(declare: Callable) -> Callable:
    """The ``batch_grad`` rule of a declaration that always has a form."""
    return lambda g, c: batch(declare(g, c), c)
