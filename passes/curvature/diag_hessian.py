"""Diagonal of the Hessian: the GGN plus every op's second-order residual (BackPACK's DiagHessian).

``∇²L = Σ_n J_nᵀ H_n J_n + Σ_ops Σ_n J_{op,n}ᵀ R_{op,n} J_{op,n}``, where ``R_op`` is the
op's residual ``Σ_out g ⊙ ∂²f/∂x²`` (``g`` the gradient at its output). For elementwise ops
``R`` is diagonal; it is split into its positive and negative parts, each with a square-root
factor ``diag(√R±)`` ``[D, N, *x.shape[1:]]`` that is propagated back from the op's input like
a sqrt-GGN factor. Then ``diag_h = diag_ggn_exact + Σ_residuals (‖J ᵀ√R₊‖² - ‖Jᵀ√R₋‖²)``.
Both parts travel in one factor ``diag(√|R|)``: a Jacobian-transpose acts on each column
``(d, n)`` alone, so the propagated factor's columns where ``R[n, d] > 0`` are ``Jᵀ√R₊`` and
the others ``Jᵀ√R₋``; the parts are told apart by masking the columns where they are read
(:class:`MaskedColumns`), one backward pass instead of two.
Ops affine in each argument (linear, conv, relu, shape ops, ...) have no residual.

A non-diagonal residual (softmax, layer_norm: ``residual_block``) is a dense per-sample
``R_n`` over the argument's ``D`` per-sample entries, block-diagonal with ``B`` blocks of
``K`` (a row of the softmax or layer_norm); ``eigh`` of each block splits it into
``S₊S₊ᵀ − S₋S₋ᵀ`` (:func:`eigen_sqrt`), ``D`` columns each, seeded on the argument like the
diagonal factors. A bilinear op whose two activations share a parameter (``q kᵀ``,
``weights · v``) has ``R_n = [[0, C_n], [C_nᵀ, 0]]``, split by the SVD of ``C_n``
(:func:`cross_sqrt`, ``min(Da, Db)`` columns seeded on both). Elementwise products and
quotients of two such values (``x * s``, arguments broadcast against each other) have the
same block with a sparse ``C_n`` (:func:`broadcast_cross_sqrt`). A tied weight, a bilinear
op whose data argument depends on its parameter-side argument ``w`` (``lin(lin(x))``), has
the block over ``(a_n, w)``: its ``w`` part enters as direct per-sample terms of ``w``
(:func:`_parameter_cross_seeds`). Exact, at ``O(N B K³)`` (or
``O(N Da Db min(Da, Db))``) time per op and step and ``O(N D²)`` memory, as a diagonal
residual's factor; ``D`` above :data:`MAX_BLOCK_SIZE` is refused when the step runs (sizes
are not known before). Beyond :data:`MAX_SEPARATE_PROPAGATIONS` seed sets, all sets of one
sign share one backward pass (:func:`_combined_propagations`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional

import torch
import torch.fx as fx
from torch import Tensor

from fxcurv.emit import Emitter
from fxcurv.errors import node_error
from fxcurv.rules import Ctx, rule_for
from fxcurv.rules.contraction import diagonal_curvature
from fxcurv.rules.registry import Args

from ..analysis import (ancestors, depends_on, descendants, differentiable_inputs, sample_data,
                        sample_carriers)
from ..backward import backward
from ..per_sample import MaskedColumns
from . import factors
from .factors import (broadcast_cross_sqrt, checked_cross, checked_parameter_cross,
                      column_mask, cross_sqrt, parameter_cross_sqrt,
                      per_sample_block, repeat_samples, residual_sqrt, sample_basis,
                      signed_part)
from .loss_hessian import block_sqrt, loss_negative_factor, symmetric_eigh
from .second_order import BILINEAR, BLOCK, CROSS, MISSING, RESIDUAL, ZERO, Term, classify

MAX_BLOCK_SIZE = 4096  # per-sample entries D = B·K of a residual block (factor: N·D² values)
# more residual seed sets than this are propagated together, one backward pass per sign
# (unrolled recurrent layers: O(T) instead of O(T²) nodes)
MAX_SEPARATE_PROPAGATIONS = 32


def residual_propagations(emit: Emitter, traced, gradient: dict,
                          make_source: Callable[[dict, Any], Any]) -> list[tuple[Any, float]]:
    """For every op with a second-order residual (diagonal or cross), the propagations of its
    positive and negative square-root factors, each wrapped by ``make_source(cotangents,
    columns)``, with its sign."""
    params = list(traced.params.values())
    dependent = depends_on(traced.graph, params)  # shared by every propagation below
    depends = _parameter_sets(traced.graph, traced.params)
    model = ancestors(traced.model_output)  # the loss region's curvature is in the GGN term
    per_sample = sample_data(traced.graph, traced.inputs[0])  # values with a sample axis
    carriers = sample_carriers(traced.graph, traced.inputs[0])
    terms, pending = [], []
    local = _LocalProducers(emit, traced, depends, per_sample)
    negative = loss_negative_factor(emit, traced, gradient)
    if negative is not None:  # a non-convex loss: its negative curvature, subtracted
        node, factor = negative
        with emit.naming("loss_hessian_negative"):
            columns = factor.size(0)
        cotangents = backward(emit, {node: factor}, params, lead=1,
                              tag="loss_hessian_minus", active=dependent)
        terms.append((make_source(cotangents, columns), -1.0))
    for node in list(traced.graph.nodes):
        if node not in gradient or node not in model or node.op not in ("call_function",
                                                                       "call_method"):
            continue
        rule = rule_for(node)
        ctx = Ctx.of(node, rule, emit)
        active = _active_args(ctx, depends)
        op = _Op(node, rule, ctx, dict(active), gradient[node],
                 classify(rule, ctx.bound, [name for name, _ in active]))
        with emit.naming(f"{node.name}_residual", pass_="diag_hessian", node=node.name):
            seed_sets = _diagonal_seeds(emit, op, local, terms)
            seed_sets += _parameter_cross_seeds(emit, op, depends, carriers)
            seed_sets += _cross_seeds(emit, op, depends, carriers)
            seed_sets += _block_seeds(emit, op, depends, carriers)
        for seeds, sign, tag, *rest in seed_sets:
            for arg in seeds:
                _check_sample_axis(node, rule, arg, per_sample)
            pending.append((seeds, sign, f"{node.name}_residual_{tag}",
                            rest[0] if rest else {}, rest[1] if len(rest) > 1 else None))
    if len(pending) > MAX_SEPARATE_PROPAGATIONS:
        return terms + _combined_propagations(emit, pending, params, make_source)
    return terms + _separate_propagations(emit, pending, params, make_source)


def _separate_propagations(emit, pending, params, make_source) -> list:
    """One backward pass per seed set; a diagonal residual's producer's own parameters
    (``own``: ``(LocalProducers, z, R)``) are left out of its pass and pulled back at the
    producer (:class:`LocalResidual`)."""
    terms = []
    for seeds, sign, tag, direct, own in pending:
        with emit.naming(tag, pass_="diag_hessian"):
            columns = next(iter(seeds.values())).size(0)
        targets = params
        if own is not None:
            local, z, residual = own
            kept = local.add_terms(z, residual, terms)
            targets = [param for param in params if param not in kept]
        cotangents = backward(emit, seeds, targets, lead=1, tag=tag)
        terms += _signed_terms(emit, cotangents, columns, sign, direct, make_source)
    return terms


def _signed_terms(emit, cotangents, columns, sign, direct, make_source) -> list:
    """``[(source, sign)]`` of one propagation: a seed set of one sign (``sign`` a float), or
    of both (``sign``: the masks ``[D, N]`` of its positive and negative columns), which gives
    a masked source per sign."""
    if isinstance(sign, float):
        return [(make_source(cotangents, columns, direct or None), sign)]
    return [(make_source(MaskedColumns(emit, cotangents, mask), columns), part_sign)
            for mask, part_sign in zip(sign, (1.0, -1.0))]


def _combined_propagations(emit, pending, params, make_source) -> list:
    """All seed sets of one sign in one backward pass: set ``k``'s ``r_k`` columns are placed
    at their own offset of ``R = Σ r_k`` columns (zeros elsewhere), so the squares summed over
    the columns are the sum of the sets' squares. ``O(graph)`` nodes instead of one pass per
    set (``O(T²)`` for ``T`` unrolled steps), at up to ``R`` columns everywhere."""
    terms = []
    for sign, tag in ((1.0, "plus"), (-1.0, "minus"), (None, "both")):
        group = [(seeds, direct, s) for seeds, s, _, direct, _ in pending
                 if (s == sign if isinstance(s, float) else sign is None)]
        if not group:
            continue
        with emit.naming(f"residuals_{tag}", pass_="diag_hessian"):
            sizes = [next(iter(seeds.values())).size(0) for seeds, _, _ in group]
            columns = emit.call(column_total, sizes)
            placed: list[dict] = [{}, {}, {}]
            for index, (seeds, direct, s) in enumerate(group):
                masks = {} if sign is not None else {"plus": s[0], "minus": s[1]}
                for target, part in zip(placed, (seeds, direct, masks)):
                    for key, factor in part.items():
                        value = emit.call(place_columns, factor, index, sizes)
                        target[key] = target[key] + value if key in target else value
        cotangents = backward(emit, placed[0], params, lead=1, tag=f"residuals_{tag}")
        both = (placed[2]["plus"], placed[2]["minus"]) if sign is None else sign
        terms += _signed_terms(emit, cotangents, columns, both, placed[1], make_source)
    return terms


def column_total(sizes: List[int]) -> int:
    """``Σ sizes``: the columns of the combined residual factor."""
    total = 0
    for size in sizes:
        total += size
    return total


def place_columns(factor: Tensor, index: int, sizes: List[int]) -> Tensor:
    """``factor`` ``[sizes[index], ...]`` at its offset among ``Σ sizes`` columns, zeros
    elsewhere."""
    before = 0
    for size in sizes[:index]:
        before += size
    after = column_total(sizes) - before - factor.size(0)
    shape = list(factor.shape[1:])
    return torch.cat([factor.new_zeros([before] + shape), factor,
                      factor.new_zeros([after] + shape)], 0)


@dataclass
class _Op:
    """One op's call as the seed builders see it: node, rule, context, active arguments
    ``{name: node}``, the gradient at its output and its second-order terms."""

    node: fx.Node
    rule: Any
    ctx: Ctx
    values: dict
    g: Any
    terms: list


def _diagonal_seeds(emit, op: _Op, local: "_LocalProducers", terms: list) -> list:
    """``({arg: √|R|}, (mask₊, mask₋), tag)`` for each argument with a diagonal residual
    ``R``: both parts in one factor, its columns of either sign masked (:func:`column_mask`);
    where the argument's producer holds all the parameters it depends on, ``R``'s signed
    parts are added to ``terms`` as they are (:class:`LocalResidual`) instead."""
    found = []
    for term in op.terms:
        if len(term.names) != 1 or term.kind in (ZERO, BLOCK):
            continue
        name = term.names[0]
        if term.kind != RESIDUAL:
            raise node_error(op.node, f"{op.rule.name} has a non-zero second derivative in "
                             f"its argument '{name}' but no diagonal residual rule",
                             "Request the GGN (diag_ggn_exact) instead, or add a residual "
                             "rule to this op.")
        residual, z = term.fn(op.g, op.ctx), op.values[name]
        if local.complete(z):
            local.add_terms(z, residual, terms)
            continue
        factor = emit.call(residual_sqrt, residual, 0.0, _where(op.node, op.rule),
                           factors.MAX_RESIDUAL_FACTOR_BYTES)
        masks = tuple(emit.call(column_mask, residual, sign) for sign in (1.0, -1.0))
        own = (local, z, residual) if local.arguments(z) else None
        found.append(({z: factor}, masks, name, {}, own))
    return found


class _LocalProducers:
    """For a diagonal residual ``R`` seeded on ``z = P(x, θ, ...)``: the parameters ``θ``
    that are ``P``'s own arguments, which ``P``'s rule pulls a diagonal curvature back to
    (``diagonal_squares``) and which reach no other argument of ``P``. Their part
    ``J_θᵀ diag(R) J_θ`` is computed at ``P`` directly, and the factor ``diag(√|R|)``
    ``[D, N, D]`` (``D`` the entries of one sample's ``z``) is propagated only to the
    parameters further up; where ``z`` depends on no other parameter (a first layer), no
    factor is built at all. Not where ``P``'s rows may be merged, or the samples coupled."""

    def __init__(self, emit: Emitter, traced, depends: dict, per_sample) -> None:
        self.emit, self.depends, self.per_sample = emit, depends, per_sample
        self.params = traced.params
        self.names = {node: name for name, node in traced.params.items()}
        self.merged = traced.memo.get("merged_rows", frozenset())
        self.coupled = bool(traced.memo.get("coupled"))

    def arguments(self, z: fx.Node) -> dict:
        """``{parameter name: P's argument}``: the parameters that are ``P``'s own arguments,
        declared in its ``diagonal_squares`` and not reaching its other arguments."""
        rule = rule_for(z)
        if rule is None or not rule.diagonal_squares or self.coupled or \
                z not in self.per_sample:
            return {}
        bound = {arg: value for arg, value in rule.bind(z).items()
                 if isinstance(value, fx.Node)}
        if any(value in self.merged for value in bound.values()):
            return {}
        found = {}
        for arg, value in bound.items():
            name = self.names.get(value)
            if name is not None and arg in rule.diagonal_squares and not any(
                    name in self.depends.get(other, ()) for other in bound.values()
                    if other is not value):
                found[name] = arg
        return found

    def complete(self, z: fx.Node) -> bool:
        """Whether every parameter ``z`` depends on is one of :meth:`arguments` (no
        propagation is needed)."""
        own = self.arguments(z)
        return bool(own) and self.depends.get(z, frozenset()) <= frozenset(own)

    def add_terms(self, z: fx.Node, residual: Any, terms: list) -> set:
        """Append ``(LocalResidual, ±1)`` of ``residual``'s positive and negative parts at
        ``P``'s own parameters to ``terms``; their nodes."""
        arguments, rule = self.arguments(z), rule_for(z)
        for sign in (1.0, -1.0):
            part = self.emit.call(signed_part, residual, sign)
            terms.append((LocalResidual(self.emit, self.params, z, rule, arguments, part), sign))
        return {self.params[name] for name in arguments}


class LocalResidual:
    """One signed part ``r`` ``[N, *z.shape]`` of a diagonal residual at the output ``z`` of
    ``P`` (:class:`_LocalProducers`), as the terms :class:`~passes.per_sample.SignedSum`
    reads: ``Σ_d r_d (∂z_d/∂θ)²`` summed or per sample, and ``J_θᵀ diag(r) J_θ V``, by ``P``'s
    rule (:func:`fxcurv.rules.contraction.diagonal_curvature`)."""

    lead = 0  # not a propagated factor: never combined by the ops' ``signed_squares``

    def __init__(self, emit: Emitter, params: dict, node: fx.Node, rule, arguments: dict,
                 part: Any) -> None:
        self.emit, self.params, self.node, self.rule = emit, params, node, rule
        self.arguments, self.part = arguments, part
        self._memo: dict = {}

    def reaches(self, name: str) -> bool:
        return name in self.arguments

    def shortcut_use(self, name: str, field: str) -> None:
        return None

    def use(self, name: str) -> tuple:
        """``(P, its rule, the argument)`` where parameter ``name`` meets ``P``."""
        return self.node, self.rule, self.arguments[name]

    def _quantity(self, kind: str, name: str, label: str, *extra: Any) -> Any:
        if (kind, name) not in self._memo:
            with self.emit.naming(f"{self.params[name].name}_{label}", pass_="per_sample",
                                  param=name):
                ctx = Ctx.of(self.node, self.rule, self.emit, 0)
                self._memo[kind, name] = diagonal_curvature(
                    kind, self.rule, self.arguments[name], self.part, ctx, *extra)
        return self._memo[kind, name]

    def sum_squares(self, name: str, label: str) -> Any:
        return self._quantity("sum_squares", name, label)

    def batch_sum_squares(self, name: str, label: str) -> Any:
        return self._quantity("batch_sum_squares", name, label)

    def product(self, name: str, label: str, vectors: Any) -> Any:
        return self._quantity("product", name, label, vectors)


def _where(node: fx.Node, rule) -> str:
    """How a runtime error names the op: ``node 'tanh_1' (tanh)``."""
    return f"node '{node.name}' ({rule.name})"


def _pairs(op: _Op, depends: dict, kinds: tuple):
    """``(term, a, b)`` for the two-argument terms of ``kinds`` whose arguments share a
    parameter (otherwise the term lies outside the parameters' blocks)."""
    for term in op.terms:
        if len(term.names) == 2 and term.kind in kinds:
            a, b = (op.values[name] for name in term.names)
            if depends[a] & depends[b]:
                yield term, a, b


def _cross_seeds(emit, op: _Op, depends, carriers) -> list:
    """Cross terms of two arguments ``a, b`` that share parameters, from the coefficient
    ``c = Σ g ∂²f/∂a∂b`` in the output's shape (arguments broadcast against each other):
    ``R_n = [[0, C_n], [C_nᵀ, 0]]`` with ``C_n`` summing ``c`` over the output entries each
    pair of entries of ``a`` and ``b`` meets in, split into ``S₊S₊ᵀ − S₋S₋ᵀ``
    (:func:`broadcast_cross_sqrt`), each part seeded on both arguments."""
    found = []
    for term, a, b in _pairs(op, depends, (CROSS, BILINEAR, MISSING)):
        if _parameter_pair(term, a, b, op.rule, carriers) is not None:
            continue
        if term.kind != CROSS:
            raise node_error(op.node, f"its arguments '{term.names[0]}' and "
                             f"'{term.names[1]}' both depend on parameter(s) "
                             f"{sorted(depends[a] & depends[b])}, and {op.rule.name} has no "
                             "cross second-derivative rule",
                             "Request the GGN (diag_ggn_exact) instead.")
        coefficient = emit.call(checked_cross, term.fn(op.g, op.ctx), emit.proxy(a),
                                emit.proxy(b), factors.MAX_RESIDUAL_FACTOR_BYTES,
                                _where(op.node, op.rule))
        for sign, tag in ((1.0, "plus"), (-1.0, "minus")):
            parts = emit.call(broadcast_cross_sqrt, coefficient, emit.proxy(a),
                              emit.proxy(b), sign)
            found.append((_pair(a, b, parts[0], parts[1]), sign, f"cross_{tag}"))
    return [item for item in found if item[0]]


def _parameter_pair(term: Term, a: fx.Node, b: fx.Node, rule, carriers) -> Optional[tuple]:
    """``(data name, data node, parameter-side name, node)`` when the op is bilinear in
    ``(a, b)``, one of them carries the samples and the other is parameter-side."""
    if not term.bilinear:
        return None
    name_a, name_b = term.names
    if a in carriers and b not in carriers and name_b in rule.batch_grad:
        return name_a, a, name_b, b
    if b in carriers and a not in carriers and name_a in rule.batch_grad:
        return name_b, b, name_a, a
    return None


def _parameter_cross_seeds(emit, op: _Op, depends, carriers) -> list:
    """A data argument ``a`` and a parameter-side argument ``w`` of a bilinear op that share a
    parameter (a tied weight): the per-sample cross block ``C_n = ∂²⟨g_n, f⟩/∂a_n∂w``
    ``[N, Da, Dw]`` is ``w``'s per-sample rule with ``a`` replaced by the basis of its
    entries (:func:`sample_basis`); ``R_n = [[0, C_n], [C_nᵀ, 0]]`` is split by its SVD
    (:func:`parameter_cross_sqrt`), the ``a`` part seeded on ``a``, the ``w`` part a direct
    per-sample term of ``w`` (``[r, N, *w.shape]``)."""
    found = []
    for term, a, b in _pairs(op, depends, (CROSS, BLOCK, BILINEAR)):
        pair = _parameter_pair(term, a, b, op.rule, carriers)
        if pair is None:
            continue
        data_name, data, side_name, side = pair
        _check_block_sample_axis(op.node, op.rule, data, carriers)
        checked = emit.call(checked_parameter_cross, op.g, emit.proxy(data), emit.proxy(side),
                            factors.MAX_RESIDUAL_FACTOR_BYTES, _where(op.node, op.rule))
        args = Args(op.ctx.bound, emit)
        setattr(args, data_name, emit.call(sample_basis, emit.proxy(data)))
        probe = Ctx(op.node, op.ctx.bound, args, None, 0, emit)
        terms = op.rule.batch_grad[side_name](emit.call(repeat_samples, checked,
                                                        emit.proxy(data)), probe)
        block = emit.call(per_sample_block, terms, emit.proxy(data))
        svd = emit.call(torch.linalg.svd, block, full_matrices=False)
        for sign, tag in ((1.0, "plus"), (-1.0, "minus")):
            parts = emit.call(parameter_cross_sqrt, svd[0], svd[1], svd[2],
                              emit.proxy(data), emit.proxy(side), sign)
            found.append(({data: parts[0]}, sign, f"{data_name}_{side_name}_{tag}",
                          {side: parts[1]}))
    return found


def _block_seeds(emit, op: _Op, depends, carriers) -> list:
    """``({arg: S±}, ±1, tag)`` from each dense residual block whose arguments are all active
    (two arguments: only where they share a parameter, as for the diagonal cross terms)."""
    found = []
    for term in op.terms:
        if term.kind != BLOCK:
            continue
        args = [op.values[name] for name in term.names]
        if len(args) > 1 and not frozenset.intersection(*[depends[arg] for arg in args]):
            continue
        if len(args) == 2 and _parameter_pair(term, args[0], args[1], op.rule,
                                              carriers) is not None:
            continue  # a tied parameter: _parameter_cross_seeds
        for arg in args:
            _check_block_sample_axis(op.node, op.rule, arg, carriers)
        proxies = [emit.proxy(arg) for arg in args]
        checked = emit.call(checked_size, op.g, proxies, MAX_BLOCK_SIZE,
                            f"node '{op.node.name}' ({op.rule.name}) for quantity "
                            f"'{emit.quantity}'")
        block, tag = term.fn(checked, op.ctx), "_".join(term.names)
        found += _block_factors(emit, block, args, proxies, tag)
    return found


def _block_factors(emit, block, args: list, proxies: list, tag: str) -> list:
    """The seeds of a dense block ``[N, B, K, K]`` (``eigh``) or cross matrix (``svd``)."""
    found = []
    if len(args) == 1:
        eigen = emit.call(symmetric_eigh, block)          # once for both signs
    else:
        svd = emit.call(torch.linalg.svd, block, full_matrices=False)
    for sign, sign_tag in ((1.0, "plus"), (-1.0, "minus")):
        if len(args) == 1:
            factor = emit.call(block_sqrt, eigen[0], eigen[1], proxies[0], sign)
            seeds = {args[0]: factor}
        else:
            parts = emit.call(cross_sqrt, svd[0], svd[1], svd[2], proxies[0], proxies[1],
                              sign)
            seeds = _pair(args[0], args[1], parts[0], parts[1])
        found.append((seeds, sign, f"{tag}_block_{sign_tag}"))
    return found


def checked_size(g: Tensor, values: List[Tensor], limit: int, where: str) -> Tensor:
    """``g``, after refusing a residual block over ``D = Σ value[0].numel() > limit``
    per-sample entries (before the block and its factor's ``N·D²`` values are built)."""
    size = 0
    for value in values:
        size += value[0].numel()
    if size > limit:
        raise RuntimeError(f"fxcurv: {where}: the exact second derivative needs a dense "
                           f"per-sample residual block of size {size} > {limit}; "
                           "request the GGN (diag_ggn_exact, ggnmp) for this model, or "
                           "shrink the op (fewer positions or heads per sample)")
    return g


def _check_block_sample_axis(node, rule, arg, carriers) -> None:
    if arg not in carriers or node not in carriers:
        value = arg.name if arg not in carriers else "its output"
        raise node_error(node, f"a second derivative of {rule.name} acts on '{value}', a "
                         "value without the sample axis 0 (a parameter, or after an op that "
                         "moves or reduces the samples), so it has no per-sample block",
                         "Request the GGN (diag_ggn_exact) instead.")


def _pair(a: fx.Node, b: fx.Node, factor_a: Any, factor_b: Any) -> dict:
    """Seeds on ``a`` and ``b`` (one node, ``x * x``: their sum)."""
    if a is not b:
        return {a: factor_a, b: factor_b}
    return {a: factor_a + factor_b}


def _check_sample_axis(node, rule, arg, per_sample) -> None:
    if arg not in per_sample:
        raise node_error(node, f"a second derivative of {rule.name} acts on '{arg.name}', a "
                         f"value without a sample axis (a parameter used directly, e.g. "
                         f"x / w), which is not supported yet",
                         "Request the GGN (diag_ggn_exact) instead.")


def _active_args(ctx: Ctx, depends: dict) -> list[tuple[str, fx.Node]]:
    """``(argument name, node)`` of the arguments that depend on a parameter."""
    found = []
    for name, value in ctx.bound.items():
        if isinstance(value, fx.Node) and depends.get(value):
            found.append((name, value))
    return found


def _parameter_sets(graph: fx.Graph, params: dict) -> dict[fx.Node, frozenset]:
    """For each node, the names of the parameters its value depends on differentiably (not
    through sizes: ``q.size(-1) ** -0.5`` is a constant)."""
    names = {node: name for name, node in params.items()}
    sets: dict[fx.Node, frozenset] = {}
    for node in graph.nodes:
        own = frozenset([names[node]]) if node in names else frozenset()
        sets[node] = own.union(*[sets.get(arg, frozenset())
                                 for arg in differentiable_inputs(node)])
    return sets
