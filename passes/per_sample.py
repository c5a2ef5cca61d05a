"""Per-sample parameter quantities from a propagated cotangent and the per-op parameter rules.

A propagation gives every parameterised op a cotangent with ``lead`` leading vector axes: the
gradient (``lead = 0``), or a square-root factor of the GGN (``lead = 1``: ``[C, N, ...]``
exact, ``[M, N, ...]`` Monte-Carlo). The op's ``batch_grad`` rule turns it into per-sample
parameter terms ``s = [*lead, N, *p.shape]`` (summed over every use of ``p``), from which:

==========================  ===================  ===========================================
method                      shape                lead 0 (gradient)      lead 1 (sqrt-GGN)
==========================  ===================  ===========================================
``batch(p)``                ``[*lead, N, *p]``   ``batch_grad``         ``sqrt_ggn_*``
``sum_squares(p)``          ``p.shape``          ``sum_grad_squared``   ``diag_ggn_*``
``batch_sum_squares(p)``    ``[N, *p]``          —                      ``diag_ggn_*_batch``
``batch_l2(p)``             ``[N]``              ``batch_l2``           —
``variance(p)``             ``p.shape``          ``variance``           —
==========================  ===================  ===========================================

``sum_squares``, ``batch_l2``, ``batch_sum_squares`` and ``product`` (curvature block times
vectors) of a parameter with one use whose op declares its per-sample term as a contraction
(``OpRule.contraction``) are derived from that form in the cheaper contraction order
(:mod:`fxcurv.rules.contraction`: a linear layer on 2-D input never builds
``[*lead, N, O, I]``; products never build the per-sample terms).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, List, Optional

import torch
import torch.fx as fx
from torch import Tensor

from fxcurv.emit import Emitter
from fxcurv.errors import node_error
from fxcurv.rules import Ctx, OpRule, contraction, rule_for
from fxcurv.rules.helpers import column_scaled, rows_apart_by_sample

from .analysis import ancestors
from .backward import joined_use
from .curvature.factors import columns_by_sample, mask_columns


def factor_product(factor: Tensor, vectors: Tensor) -> Tensor:
    """``Σ_{k,n} Q_kn ⟨Q_kn, v⟩`` for each ``v``: ``Q`` ``[K, N, *p]``, ``vectors`` ``[V, *p]``
    -> ``[V, *p]`` (the block ``QᵀQ`` of a factorised curvature times each vector)."""
    flat = factor.reshape(factor.size(0) * factor.size(1), -1)      # [K·N, P]
    projections = torch.matmul(flat, vectors.reshape(vectors.size(0), -1).t())  # [K·N, V]
    return torch.matmul(projections.t(), flat).reshape(vectors.shape)


# parameters without Kronecker structure: the full GGN block up to this many entries, its
# diagonal above (an [P, P] block of a 4096-entry parameter is 128 MiB in float64)
MAX_KRON_BLOCK = 4096


def block_of_terms(terms: Tensor) -> Tensor:
    """``Σ_{k,n} q_kn q_knᵀ`` ``[P, P]`` of per-sample terms ``[K, N, *p]`` (``P`` entries)."""
    flat = terms.reshape(terms.size(0) * terms.size(1), -1)
    return torch.matmul(flat.t(), flat)


def batch_zeros(p: Tensor, lead_shape: List[int]) -> Tensor:
    """Per-sample terms of a parameter that does not influence the loss."""
    return torch.zeros(lead_shape + list(p.shape), dtype=p.dtype, device=p.device)


def variance_from_moments(sum_squares: Tensor, grad: Tensor, batch_size: int) -> Tensor:
    """``Σ_n g_n²/N − (Σ_n g_n/N)²`` as ``(Σ g² − (Σ g)²/N)/N``: one fused multiply-add and
    one in-place scaling instead of four elementwise passes."""
    inverse = 1.0 / batch_size
    return torch.addcmul(sum_squares, grad, grad, value=-inverse).mul_(inverse)


def variance_from_moments_(sum_squares: Tensor, grad: Tensor, batch_size: int) -> Tensor:
    """:func:`variance_from_moments` written into ``sum_squares`` (a temporary nothing else
    reads; the cleanup pass ``moments_in_place`` picks this form)."""
    inverse = 1.0 / batch_size
    return sum_squares.addcmul_(grad, grad, value=-inverse).mul_(inverse)


class PerSample:
    """Emits per-sample parameter quantities of one propagation, each at most once."""

    def __init__(self, emit: Emitter, params: dict[str, fx.Node], cotangents: dict,
                 batch_size: Any, data: tuple[set, set], lead: int = 0,
                 label: str = "batch_grad", lead_size: Any = None,
                 numels: Optional[dict[str, int]] = None,
                 direct: Optional[dict[fx.Node, Any]] = None, coupled: bool = False,
                 merged: frozenset = frozenset()):
        """``data``: the nodes that depend on the input, and those of them that still carry
        its sample axis (``analysis.descendants``, ``analysis.sample_carriers``); ``label``
        names the emitted nodes (errors name the quantity of ``emit.requesting``); ``numels``:
        each parameter's number of entries (what :meth:`ggn_block` returns depends on it);
        ``direct``: per-sample terms ``[*lead, N, *value.shape]`` seeded on parameter-side
        values (a tied weight's part of a cross second derivative), added where the
        propagation reaches them; ``merged``: the values whose rows may be merged, several per
        sample (``passes/sample_axis.merged_rows``): an op reading one gets its terms by
        sample (:func:`rows_by_sample`, or its contraction with the rows as positions)."""
        self.emit, self.params, self.cotangents = emit, params, cotangents
        self.merged = merged
        self.batch_size, self.lead, self.label, self.lead_size = batch_size, lead, label, \
            lead_size
        self.data, self.carriers = data
        self.numels = numels or {}
        self.direct = direct or {}
        self.coupled = coupled
        self._reaches = set().union(*[ancestors(node) for node in self.direct])
        self._memo: dict[tuple[str, str], Any] = {}
        self._terms: dict[fx.Node, Any] = {}
        # lead 0: ``Σ_n q_n`` of parameters whose extraction computed it on the way, the
        # gradient that the step returns in place of the backward pass's own product
        self.totals: dict[str, Any] = {}

    def reaches(self, name: str) -> bool:
        """Whether this propagation reaches parameter ``name`` (else its terms are zero)."""
        return self.params[name] in self.cotangents

    def uses(self, name: str) -> list[tuple[fx.Node, OpRule, str]]:
        """``(op node, rule, argument name)`` for every direct use of a parameter the loss
        sees (where per-op formulas — cheap norms, Kronecker factors — apply)."""
        return _uses_of(self.params[name], self.cotangents)

    def memoized(self, kind: str, name: str, label: str, build) -> Any:
        """Build once, inside a naming scope ``<param>_<label>``."""
        key = (kind, name)
        if key not in self._memo:
            full = f"{self.params[name].name}_{label}"
            with self.emit.naming(full, pass_="per_sample", param=name):
                value = build()
            if isinstance(value, list):
                for i, item in enumerate(value):
                    self.emit.rename(item, f"{full}_{i}")
            else:
                self.emit.rename(value, full)
            for item in value if isinstance(value, list) else [value]:
                _tag_extraction(item, kind)
            self._memo[key] = value
        return self._memo[key]

    def _boundary_term(self, node: fx.Node, rule: OpRule, arg: str, kind: str, name: str,
                       *extra: Any):
        """``batch_grad`` or the contraction-derived ``kind`` (:data:`contraction.DERIVED`)
        for a parameter-side argument of ``node`` (``extra``: e.g. a product's vectors)."""
        fn = _rule_fn(rule, arg, kind, self.batch_size if node in self.merged else None)
        if fn is None:
            raise node_error(node, f"{rule.name} has no per-sample rule for its argument "
                             f"'{arg}' (from parameter '{name}')", "Use a supported layer for "
                             "this parameter or request only 'grad'.")
        if node not in self.carriers:  # (a regulariser is refused before, with its node)
            raise node_error(node, f"parameter '{name}' reaches the loss here without passing "
                             "through the per-sample part of the model (e.g. a regulariser "
                             "added to the loss), so its per-sample terms are undefined",
                             "Request grad or a curvature quantity (diag_ggn_*, diag_h, "
                             "ggnmp, hmp), which include a regulariser's exact Hessian.")
        return fn(self.cotangents[node], Ctx.of(node, rule, self.emit, self.lead), *extra)

    def stacked(self, name: str) -> Optional[tuple[Any, Ctx, OpRule, str]]:
        """``(cotangent, ctx, rule, argument)`` of one virtual use standing for all uses of a
        parameter used several times by one op kind with ``stack_uses`` (a recurrent weight
        at every step): their data and cotangents concatenated along a position axis, or
        None."""
        key = ("stacked", name)
        if key not in self._memo:
            self._memo[key] = self._build_stacked(name)
        return self._memo[key]

    def _build_stacked(self, name: str) -> Optional[tuple[Any, Ctx, OpRule, str]]:
        param, uses = self.params[name], self.uses(name)
        if len(uses) < 2 or len({(id(rule), arg) for _, rule, arg in uses}) != 1:
            return None
        _, rule, arg = uses[0]
        direct = {node for node, _, _ in uses}
        if arg not in rule.stack_uses or len(direct) != len(uses) or \
                any(node not in self.carriers or node in self.merged for node in direct) or \
                any(u not in direct and (u in self.cotangents or u in self._reaches)
                    for u in param.users):
            return None
        with self.emit.naming(f"{param.name}_{self.label}_uses", pass_="per_sample",
                              param=name):
            g, ctx = joined_use(uses, self.cotangents, self.emit, self.lead)
        return g, ctx, rule, arg

    def _shortcut(self, name: str, kind: str, *extra: Any) -> Optional[Any]:
        """The quantity derived from the op's contraction form, when the parameter has exactly
        one use, where it meets the data, and its op declares one (or one stacked use standing
        for several)."""
        stacked = self.stacked(name)
        if stacked is not None:
            g, ctx, rule, arg = stacked
            fn = _rule_fn(rule, arg, kind)
            return None if fn is None or self.params[name] in self._reaches else \
                fn(g, ctx, *extra)
        use = self.shortcut_use(name, "contraction")
        if use is not None:
            node, rule, arg = use
            return self._boundary_term(node, rule, arg, kind, name, *extra)
        return None

    def _shortcut_total(self, name: str, kind: str) -> Optional[Any]:
        """Lead 0, one use with a contraction form: ``kind`` derived with the parameter's
        ``Σ_n q_n`` (kept in :attr:`totals`), which the per-sample terms give for a pass over
        them (and the backward pass then need not compute); else ``kind`` alone."""
        use = self.shortcut_use(name, "contraction") if self.lead == 0 else None
        if use is None:  # (``batch`` has no contraction-only form)
            return self._shortcut(name, kind) if kind in contraction.DERIVED else None
        node, rule, arg = use
        pair = self._boundary_term(node, rule, arg, f"{kind}_total", name)
        if pair is None:
            return None
        self.totals[name] = pair[1]
        self.emit.rename(pair[1], f"{self.params[name].name}_grad_of_terms")
        return pair[0]

    def shortcut_use(self, name: str, field: str) -> Optional[tuple[fx.Node, OpRule, str]]:
        """``(node, rule, argument)`` of the parameter's one use when it is its only reader,
        meets the data there, and the op's rule ``field`` (``contraction``,
        ``signed_squares``) has an entry for it (not for stacked uses), else None."""
        if self.stacked(name) is not None:
            return None
        uses = self.uses(name)
        used_elsewhere = len(uses) != sum(1 for u in self.params[name].users
                                          if u in self.cotangents) or \
            self.params[name] in self._reaches
        if len(uses) == 1 and not used_elsewhere and uses[0][0] in self.data and \
                uses[0][2] in getattr(uses[0][1], field):
            return uses[0]
        return None

    def per_sample_term(self, value: fx.Node, name: str) -> Optional[Any]:
        """``[*lead, N, *value.shape]`` for a parameter-side value (no sample axis): ops that
        meet the data contribute their per-sample rule; parameter-side ops carry the result
        back with their Jacobian-transpose rule, the sample axis as one more leading axis."""
        if value not in self._terms:
            parts = [self.direct[value]] if value in self.direct else []
            stacked = self.stacked(name) if value is self.params[name] else None
            if stacked is not None:
                g, ctx, rule, arg = stacked
                parts.append(rule.batch_grad[arg](g, ctx))
            for user in list(value.users) if stacked is None else []:
                if user not in self.cotangents and user not in self._reaches:
                    continue
                rule = rule_for(user)
                for arg, bound in rule.bind(user).items():
                    if bound is not value and not (isinstance(bound, (list, tuple))
                                                   and value in bound):
                        continue
                    if user in self.data:  # the op meets the data here
                        if user in self.cotangents:
                            parts.append(self._boundary_term(user, rule, arg, "batch_grad",
                                                             name))
                        continue
                    upstream = self.per_sample_term(user, name)
                    if upstream is not None:
                        ctx = Ctx.of(user, rule, self.emit, self.lead + 1)
                        parts += _pieces_of(value, bound, rule.vjp[arg](upstream, ctx))
            self._terms[value] = _sum(parts) if parts else None
        return self._terms[value]

    def batch(self, name: str, label: Optional[str] = None) -> Any:
        """``[*lead, N, *p.shape]``: per-sample terms, summed over the parameter's uses. A
        coupled batch's columns are sample-local (:func:`~.curvature.factors.rows_apart`):
        the totals of column ``(k, n)`` by sample."""
        if self.coupled:
            def own_node():  # (a node of its own to tag: not the backward's cotangent)
                total = self.column_totals(name)
                return total.view_as(total)
            columns = self.memoized("batch", name, f"{label or self.label}_columns", own_node)
            return self.memoized("by_sample", name, label or self.label, lambda: self.emit.call(
                columns_by_sample, columns, self.batch_size))

        def build():
            quick = self._shortcut_total(name, "batch") if self.lead == 0 else None
            if quick is not None:
                return quick
            term = self.per_sample_term(self.params[name], name)
            if term is None:
                lead = [self.lead_size] * self.lead
                return self.emit.call(batch_zeros, self.emit.proxy(self.params[name]),
                                      lead + [self.batch_size])
            return term
        return self.memoized("batch", name, label or self.label, build)

    def column_totals(self, name: str) -> Any:
        """``[*lead, *p.shape]``: each column's cotangent of the parameter, ``Σ_n q_n`` over the
        rows (the terms of the one sample a coupled batch counts as)."""
        total = self.cotangents.get(self.params[name])
        if total is None:
            lead = [self.lead_size] * self.lead
            return self.emit.call(batch_zeros, self.emit.proxy(self.params[name]), lead)
        return total

    def sum_squares(self, name: str, label: str) -> Any:
        def build():
            if self.coupled:
                return self.column_totals(name).square().sum(list(range(self.lead)))
            quick = self._shortcut_total(name, "sum_squares")
            if quick is not None:
                return quick
            return self.batch(name).square().sum(list(range(self.lead + 1)))
        return self.memoized("sum_squares", name, label, build)

    def batch_sum_squares(self, name: str, label: str) -> Any:
        """``[N, *p]``: ``Σ_lead`` of the squared per-sample terms (the op's formula when it
        has one, never ``[*lead, N, *p]`` then)."""
        def build():
            quick = self._shortcut(name, "batch_sum_squares")
            if quick is not None:
                return quick
            if self.per_sample_term(self.params[name], name) is None:
                return self.emit.call(batch_zeros, self.emit.proxy(self.params[name]),
                                      [self.batch_size])
            return self.batch(name).square().sum(list(range(self.lead)))
        return self.memoized("batch_sum_squares", name, label, build)

    def batch_l2(self, name: str, label: str) -> Any:
        def build():
            quick = self._shortcut_total(name, "batch_l2")
            if quick is not None:
                return quick
            terms = self.batch(name)  # [N, *p]; p may be a 0-d parameter
            return terms.square().reshape(terms.size(0), -1).sum(1)
        return self.memoized("batch_l2", name, label, build)

    def product(self, name: str, label: str, vectors: Any) -> Any:
        """``[V, *p]``: this propagation's curvature block of ``p`` times each vector (the
        op's contraction form when it has one, never building the per-sample terms then)."""
        def build():
            if self.coupled:
                return self.emit.call(factor_product, self.column_totals(name).unsqueeze(
                    self.lead), vectors)
            quick = self._shortcut(name, "product", vectors)
            if quick is not None:
                return quick
            if self.per_sample_term(self.params[name], name) is None:
                return torch.zeros_like(vectors)
            return self.emit.call(factor_product, self.batch(name), vectors)
        return self.memoized("product", name, label, build)

    def kron(self, name: str, label: str) -> Any:
        """Kronecker factors ``[G, A]`` / ``[G]`` of a parameter with one use whose op has a
        Kronecker rule, or with several uses by one such op kind (a recurrent weight at every
        step, a tied layer), which count like positions of one sequence input (the "expand"
        convention): the factors of the stacked use (linear: ``G = Σ_u G_u``, ``A`` the Gram
        of all the uses' input rows over their number), else ``G = Σ_u G_u`` and
        ``A = (1/U) Σ_u A_u``. Any other parameter (norm scales and shifts, elementwise
        parameters, one read by different ops) gets its GGN block (:meth:`ggn_block`)."""
        def build():
            stacked = self.stacked(name)
            if stacked is not None and stacked[3] in stacked[2].kron:
                g, ctx, rule, arg = stacked
                return rule.kron[arg](g, ctx)
            uses = self._kron_uses(name)
            if uses is None:
                return self.ggn_block(name, label)
            return expand_factors([rule.kron[arg](self.cotangents[node],
                                                  Ctx.of(node, rule, self.emit, self.lead))
                                   for node, rule, arg in uses])
        return self.memoized("kron", name, label, build)

    def _kron_uses(self, name: str) -> Optional[list[tuple[fx.Node, OpRule, str]]]:
        """The parameter's uses, if they are its only readers and all of one op kind with a
        Kronecker rule for that argument; else None."""
        uses = self.uses(name)
        readers = [u for u in self.params[name].users if u in self.cotangents]
        if uses and len(readers) == len(uses) and len({(id(r), a) for _, r, a in uses}) == 1 \
                and uses[0][2] in uses[0][1].kron:
            return uses
        return None

    def ggn_block(self, name: str, label: str) -> list:
        """``[G]``: the parameter's curvature block ``Σ_{k,n} q_kn q_knᵀ`` ``[P, P]`` (``q`` its
        per-sample terms flattened, ``P = p.numel()``), for ``P`` up to
        :data:`MAX_KRON_BLOCK`; above, ``[G_diag]``, its diagonal in ``p.shape``. With a
        sqrt-GGN factor this is the exact (kflr) or Monte-Carlo (kfac) GGN block. A coupled
        batch is one sample: ``q_k`` are the columns' totals (:meth:`column_totals`)."""
        if self.numels[name] > MAX_KRON_BLOCK:
            return [self.sum_squares(name, f"{label}_diagonal")]
        terms = self.column_totals(name).unsqueeze(self.lead) if self.coupled else \
            self.batch(name)
        return [self.emit.call(block_of_terms, terms)]

    def variance(self, name: str, label: str, grad: Any) -> Any:
        def build():
            squares = self.sum_squares(name, "sum_grad_squared")
            return self.emit.call(variance_from_moments, squares,
                                  self.totals.get(name, grad), self.batch_size)
        return self.memoized("variance", name, label, build)


def _rule_fn(rule: OpRule, arg: str, kind: str, samples: Any = None) -> Optional[Callable]:
    """``rule.batch_grad[arg]``, or quantity ``kind`` derived from ``rule.contraction[arg]``
    (returning None where the declaration has no form for the call). ``samples``: the number
    of samples where the op's rows may be merged: its per-row terms summed by sample, its
    contraction with a sample's rows as positions."""
    if kind == "batch_grad":
        terms = rule.batch_grad.get(arg)
        if terms is None or samples is None:
            return terms
        return lambda g, c: c.call(rows_by_sample, terms(g, c), c.lead, samples)
    declare = rule.contraction.get(arg)
    if declare is None:
        return None
    if samples is not None:
        declare = _rows_as_positions(declare, samples)
    return lambda g, c, *extra: contraction.derive(kind, declare, g, c, *extra)


def _rows_as_positions(declare: Callable, samples: Any) -> Callable:
    return lambda g, c: contraction.rows_as_positions(declare(g, c), c, samples)


def rows_by_sample(terms: Tensor, axis: int, samples: int) -> Tensor:
    """Per-row terms ``[*lead, N·k, *p]`` of an op whose ``k`` rows per sample follow the
    sample order (``passes/sample_axis.merged_rows``) summed by sample, ``[*lead, N, *p]``;
    unchanged at one row per sample."""
    if terms.size(axis) == samples:
        return terms
    return rows_apart_by_sample(terms, axis, samples).sum(axis + 1)


def _tag_extraction(value: Any, kind: str) -> None:
    """Mark an extraction result (``meta["fxcurv"]["extract"] = kind``): where a chunked
    propagation's partial results are combined (``passes/chunking.py``)."""
    node = value.node if isinstance(value, fx.Proxy) else value
    if isinstance(node, fx.Node) and "fxcurv" in node.meta:
        node.meta["fxcurv"] = {**node.meta["fxcurv"], "extract": kind}


def expand_factors(per_use: list) -> list:
    """``[G, A]`` (or ``[G]``) of a parameter's uses combined: ``G = Σ_u G_u``,
    ``A = (1/U) Σ_u A_u`` (emitted as plain sums; one use: its own factors)."""
    if len(per_use) == 1:
        return per_use[0]
    combined = [_sum([factors[0] for factors in per_use])]
    if len(per_use[0]) > 1:
        combined.append(_sum([factors[1] for factors in per_use]) / len(per_use))
    return combined


def _uses_of(param: fx.Node, cotangents: dict) -> list[tuple[fx.Node, OpRule, str]]:
    found = []
    for user in param.users:
        if user not in cotangents:
            continue
        rule = rule_for(user)
        for arg, value in rule.bind(user).items():
            if value is param or (isinstance(value, (list, tuple)) and param in value):
                found.append((user, rule, arg))
    return found


def _pieces_of(value: fx.Node, bound: Any, result: Any) -> list:
    """``Jᵀ`` results that belong to ``value``: the result, or for a list argument (``cat``,
    ``stack``: one piece per entry) the pieces at ``value``'s places in it."""
    if not isinstance(bound, (list, tuple)):
        return [result]
    return [piece for entry, piece in zip(bound, result) if entry is value]


def _sum(parts: list) -> Any:
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


# SignedSum kinds an op's ``signed_squares`` formula computes for several factors at once
SQUARES_KINDS = ("sum_squares", "batch_sum_squares")


def _signed_squares(kind: str, name: str, full: str, terms: list, base: Any,
                    first: "PerSample") -> tuple[Any, list]:
    """``(base + Σ_k sign_k ·`` the squared quantity ``kind`` of the terms it can fold, those
    terms)``: the propagations (lead 1) whose factors meet the parameter at its one use, in
    one pass by that use's ``signed_squares`` formulas (each factor's share where it is, one
    product with the data for all), else one column-weighted pass per factor (its
    contraction form, or its per-sample terms); and residuals pulled back at that use
    (:class:`~passes.curvature.diag_hessian.LocalResidual`, lead 0) as the formulas'
    ``diagonal`` shares. ``(base, [])`` where nothing folds (``first``: the GGN part's
    propagation, for the emitter and the merged rows)."""
    if kind not in SQUARES_KINDS or first.coupled:  # (coupled: squares of column totals)
        return base, []
    factored = [(term, sign) for term, sign in terms if term.lead == 1]
    field, use = _common_use(name, factored)
    local = [(term, sign) for term, sign in terms if term.lead == 0]
    if use is None and local:  # no factor to fold: the residuals' own use
        field, use, factored = "signed_squares", local[0][0].use(name), []
    if use is None or use[0] in first.merged:
        return base, []
    node, rule, arg = use
    formulas = rule.signed_squares.get(arg, ()) if field == "signed_squares" else ()
    local = [(term, sign) for term, sign in local
             if len(formulas) == 3 and term.use(name)[0::2] == (node, arg)]
    if not factored and not local:
        return base, []
    emit, per_sample = first.emit, kind == "batch_sum_squares"
    with emit.naming(full, pass_="per_sample", param=name):
        ctx = Ctx.of(node, rule, emit, 1)
        factors, weights = _weighted_factors(emit, node, factored) if factored else ([], [])
        if field == "contraction":  # the weighted squares of each factor's form, summed
            forms = [rule.contraction[arg](factor, ctx) for factor in factors]
            if any(form is None for form in forms):
                return base, []
            total = base + _sum([contraction.weighted_squares(form, ctx, weight, per_sample)
                                 for form, weight in zip(forms, weights)])
        elif field == "batch_grad":  # the per-sample terms of each factor, squared, weighted
            total = base + _sum([emit.call(weighted_term_squares,
                                           rule.batch_grad[arg](factor, ctx), weight,
                                           per_sample)
                                 for factor, weight in zip(factors, weights)])
        else:
            shares = [formulas[0](factor, weight, ctx)
                      for factor, weight in zip(factors, weights)]
            diagonal = Ctx.of(node, rule, emit, 0)
            shares += [formulas[2](term.part, diagonal) * sign for term, sign in local]
            total = formulas[1](_sum(shares), ctx, per_sample, base)
    return total, [term for term, _ in factored + local]


def _common_use(name: str, terms: list) -> tuple[Optional[str], Optional[tuple]]:
    """``(field, (node, rule, arg))``: the parameter's one use, the same in every term, with
    the most specific formula its rule has (``signed_squares``, a ``contraction`` form, a
    per-sample rule); ``(None, None)`` without terms or such a use."""
    for field in ("signed_squares", "contraction", "batch_grad") if terms else ():
        uses = [term.shortcut_use(name, field) for term, _ in terms]
        if all(use is not None and use[:3:2] == uses[0][:3:2] for use in uses):
            return field, uses[0]
    return None, None


def weighted_term_squares(terms: Tensor, weights: Tensor, per_sample: bool) -> Tensor:
    """``Σ_k w_kn q_kn²`` of per-sample terms ``q`` ``[K, N, *p]`` with column weights ``w``
    (``[K, N]`` or ``[1, 1]``): ``[N, *p]`` per sample, else summed over the samples."""
    squares = column_scaled(terms.square(), weights)
    return squares.sum(0) if per_sample else squares.sum([0, 1])


def _weighted_factors(emit: Emitter, node: fx.Node, terms: list) -> tuple[list, list]:
    """The factors at ``node`` with their column weights: the masked parts of one
    propagation (:class:`MaskedColumns`) as that propagation's factor once, its columns
    weighted by ``Σ sign_k mask_k`` (no masked copies); other factors by their sign."""
    factors, weights, masked = [], [], {}
    for term, sign in terms:
        cotangents = term.cotangents
        if not isinstance(cotangents, MaskedColumns):
            factors.append(cotangents[node])
            weights.append(emit.call(sign_weight, factors[-1], sign))
            continue
        masked.setdefault(id(cotangents.cotangents), (cotangents.cotangents, []))[1].append(
            (cotangents.mask, sign))
    for base, parts in masked.values():
        factors.append(base[node])
        weights.append(emit.call(column_weights, [m for m, _ in parts], [s for _, s in parts]))
    return factors, weights


def sign_weight(factor: Tensor, sign: float) -> Tensor:
    """``[1, 1]`` holding ``sign``: the same weight for every column of ``factor``."""
    return torch.full([1, 1], sign, dtype=factor.dtype, device=factor.device)


def column_weights(masks: List[Tensor], signs: List[float]) -> Tensor:
    """``Σ_k sign_k mask_k`` ``[L, N]``: each column's weight in a signed sum of squares."""
    total = masks[0] * signs[0]
    for k in range(1, len(masks)):
        total = total + masks[k] * signs[k]
    return total


class MaskedColumns(Mapping):
    """A propagation's cotangents ``[D, N, ...]`` with the columns outside ``mask`` ``[D, N]``
    zeroed, each emitted where it is first read (by an extraction) and once."""

    def __init__(self, emit: Emitter, cotangents: dict, mask: Any):
        self.emit, self.cotangents, self.mask = emit, cotangents, mask
        self._masked: dict = {}

    def __getitem__(self, node: fx.Node) -> Any:
        if node not in self._masked:
            self._masked[node] = self.emit.call(mask_columns, self.cotangents[node], self.mask)
        return self._masked[node]

    def __contains__(self, node: object) -> bool:
        return node in self.cotangents

    def __iter__(self):
        return iter(self.cotangents)

    def __len__(self) -> int:
        return len(self.cotangents)


class SignedSum:
    """``Σ_k sign_k · term_k`` of several propagations' squared quantities: the Hessian is the
    GGN plus the positive and minus the negative residual parts; the positive-curvature
    Hessian adds the negative parts (``abs``) or drops them (``clip``). A propagation that
    does not reach a parameter (a residual seeded downstream of it) adds nothing: no zero
    ``[*lead, N, *p]`` terms are built for it."""

    def __init__(self, terms: list[tuple[PerSample, float]]):
        self.terms = terms
        self._memo: dict[tuple[str, str], Any] = {}

    def _combine(self, kind: str, name: str, label: str, *args: Any) -> Any:
        key = (kind, name)
        if key not in self._memo:
            first = self.terms[0][0]
            reached = [(term, sign) for term, sign in self.terms[1:] if term.reaches(name)]
            parts = [(getattr(first, kind)(name, f"{label}_part", *args), 1.0)]
            full = f"{first.params[name].name}_{label}"
            total, folded = _signed_squares(kind, name, full, reached, parts[0][0], first)
            parts = [(total, 1.0)] + [
                (getattr(term, kind)(name, f"{label}_part", *args), sign)
                for term, sign in reached if not any(term is done for done in folded)]
            with first.emit.naming(full, pass_="per_sample", param=name):
                total = parts[0][0]
                for value, sign in parts[1:]:
                    total = total + value if sign > 0 else total - value
            first.emit.rename(total, full)
            self._memo[key] = total
        return self._memo[key]

    def sum_squares(self, name: str, label: str) -> Any:
        return self._combine("sum_squares", name, label)

    def product(self, name: str, label: str, vectors: Any) -> Any:
        return self._combine("product", name, label, vectors)

    def batch_sum_squares(self, name: str, label: str) -> Any:
        return self._combine("batch_sum_squares", name, label)
