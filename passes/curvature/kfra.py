"""KFRA (Botev et al. 2017, BackPACK's ``KFRA``): Kronecker factors from a dense curvature
matrix propagated with batch averaging.

At the model output ``M = Σ_n H_n`` ``[D, D]`` (the loss Hessian summed over the batch, from
the exact factor: ``M = Σ_{c,n} S_cn S_cnᵀ``). Going back through an op with per-sample
Jacobians ``J_n``, ``M_in = (1/N) Σ_n J_nᵀ M_out J_n``, by the op's ``sandwich`` rule:

* "shared" (``J_n = J`` for every sample: linear, conv, average pooling, reshapes):
  ``Jᵀ M J`` with the op's Jacobian-transpose rule applied to M's rows, then columns, for
  one sample (``[D, 1, *in]`` intermediates; ``Wᵀ M W`` for a linear layer);
* "diagonal" (elementwise, ``J_n = diag(d_n)``, ``d_n = J_nᵀ 1``): ``M ⊙ (1/N) Σ_n d_n d_nᵀ``,
  one ``[D, N] x [N, D]`` product;
* an op's own function (max pooling routes entries, see its rule);
* otherwise the Jacobian-transpose rule applied twice with all N samples (``[D, N, *in]``).

At a parameterised op the output factor is ``G = M_out`` (its positions summed for a
convolution, like the bias GGN), read off ``M_out`` by the op's ``kron_matrix`` rule (or,
without one, by its ``kron`` rule fed a square root ``L Lᵀ = M_out``); the input factor ``A``
is KFLR's (the same node: common subexpressions are merged). Like BackPACK, KFRA is defined
for chains: every op has one data input and every value one reader.

Memory: ``M`` at a layer's input is dense in its per-sample size ``D`` (``D = 50176`` gives a
10 GB matrix in float32). Before the first propagation step the generated code checks the
largest tensor of every step against :data:`MAX_DENSE_BYTES` and raises a ``RuntimeError``
naming the node, the quantity and the sizes instead of running out of memory (sizes are known
at run time only: ``compile`` sees no example input).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.fx as fx
from torch import Tensor

from fxcurv.emit import Emitter
from fxcurv.errors import describe, node_error
from fxcurv.rules import Ctx, rule_for

from ..analysis import ancestors
from ..per_sample import MAX_KRON_BLOCK, block_of_terms
from .loss_hessian import loss_factor

MAX_DENSE_BYTES = 2 ** 31  # largest tensor one KFRA propagation step may build (2 GiB)


def summed_outer(factor: Tensor) -> Tensor:
    """``Σ_{c,n} s sᵀ`` over the flattened per-sample entries of ``factor`` ``[C, N, *out]``."""
    flat = factor.reshape(factor.size(0) * factor.size(1), -1)
    return torch.matmul(flat.t(), flat)


def rows_as_cotangent(matrix: Tensor, like: Tensor) -> Tensor:
    """``[D, D]`` -> ``[D, N, *like.shape[1:]]``: each row a cotangent, the same for every n."""
    shape = [matrix.size(0), 1] + list(like.shape[1:])
    expanded = [matrix.size(0), like.size(0)] + list(like.shape[1:])
    return matrix.reshape(shape).expand(expanded)


def transpose_rows(rows: Tensor, like: Tensor) -> Tensor:
    """``[D_out, N, *in]`` (rows of ``M J_n``) -> ``[D_in, N, *like.shape[1:]]`` (of ``J_nᵀ M``)."""
    d_out, samples = rows.size(0), rows.size(1)
    flat = rows.reshape(d_out, samples, -1).permute(2, 1, 0)
    return flat.reshape([flat.size(0), samples] + list(like.shape[1:]))


def batch_mean_matrix(rows: Tensor) -> Tensor:
    """``[D, N, *in]`` -> ``(1/N) Σ_n`` as ``[D, D]``."""
    return rows.reshape(rows.size(0), rows.size(1), -1).mean(1)


def sample_matrix(rows: Tensor) -> Tensor:
    """``[D, 1, *in]`` (one sample) -> ``[D, D]``."""
    return rows.reshape(rows.size(0), -1)


def diagonal_sandwich(matrix: Tensor, derivative: Tensor) -> Tensor:
    """``M ⊙ (1/N) Σ_n d_n d_nᵀ`` ``[D, D]``: ``(1/N) Σ_n J_nᵀ M J_n`` for ``J_n = diag(d_n)``,
    ``derivative = d: [N, *in]``."""
    flat = derivative.reshape(derivative.size(0), -1)
    moments = torch.matmul(flat.t(), flat)
    return moments.mul_(matrix).div_(flat.size(0))


def matrix_sqrt_factor(matrix: Tensor, like: Tensor) -> Tensor:
    """``L`` with ``L Lᵀ = matrix`` (symmetric PSD, by eigh), shaped ``[D, 1, *like.shape[1:]]``
    so that Kronecker rules read it as a factor of one sample."""
    values, vectors = torch.linalg.eigh(0.5 * (matrix + matrix.t()))
    root = vectors * values.clamp(min=0.0).sqrt().unsqueeze(0)
    return root.t().reshape([matrix.size(0), 1] + list(like.shape[1:]))


def every_sample(root: Tensor, like: Tensor) -> Tensor:
    """``[D, 1, *out]`` -> ``[D, N, *out]`` (a view): the same factor for each sample."""
    return root.expand([root.size(0), like.size(0)] + list(root.shape[2:]))


def sample_mean_squares(terms: Tensor) -> Tensor:
    """``(1/N) Σ_{k,n} q_kn²`` ``p.shape`` of per-sample terms ``[K, N, *p]``."""
    return terms.square().sum([0, 1]) / terms.size(1)


def checked_sizes(matrix: Tensor, inputs: List[Tensor], all_samples: List[bool], limit: int,
                  names: List[str]) -> Tensor:
    """``matrix`` (``M`` at the model output), after checking that no propagation step, to
    the per-sample size ``D_in`` of each ``inputs[i]`` in turn, builds a tensor over ``limit``
    bytes: ``D_in·max(D_in, D_out)`` entries, times ``N`` when step ``i`` runs the
    Jacobian-transpose rule with ``all_samples``. Checked before any step runs."""
    d_out = matrix.size(0)
    for i in range(len(inputs)):
        x = inputs[i]
        d_in = x.numel() // x.size(0)
        entries = d_in * max(d_in, d_out)
        if all_samples[i]:
            entries = entries * x.size(0)
        size = entries * matrix.element_size()
        if size > limit:
            raise RuntimeError(names[i] + ": the dense curvature at this op's input is "
                               + str(d_in) + " x " + str(d_in) + " per sample and propagating "
                               "it would build a tensor of " + str(size // 1048576) + " MiB "
                               "(limit " + str(limit // 1048576) + " MiB, fxcurv.passes."
                               "curvature.kfra.MAX_DENSE_BYTES). Request kflr (exact) or kfac "
                               "(MC) instead.")
        d_out = d_in
    return matrix


@dataclass
class Link:
    """One op of the chain: its rule and context (lead 1), its data argument ``(name, node)``
    (None at the first layer) and its parameter arguments ``[(name, node)]``."""

    rule: Any
    ctx: Ctx
    data: Optional[tuple]
    params: list


def sandwich(emit: Emitter, rule, arg: str, matrix: Any, ctx: Ctx) -> Any:
    """Emits ``(1/N) Σ_n J_nᵀ M J_n`` through ``arg`` by the op's ``sandwich`` rule (module
    doc); ``ctx``: the op's context with lead 1."""
    how = rule.sandwich.get(arg)
    if how == "shared":
        one = _one_sample(emit, ctx, rule, arg)
        return emit.call(sample_matrix, _twice(emit, rule, arg, matrix, one))
    if how == "diagonal":
        one = Ctx.of(ctx.node, rule, emit, lead=0)
        derivative = rule.vjp[arg](torch.ones_like(one.out), one)       # d = J_nᵀ 1
        result = emit.call(diagonal_sandwich, matrix, derivative)
    elif callable(how):
        result = how(matrix, ctx)
    else:
        result = emit.call(batch_mean_matrix, _twice(emit, rule, arg, matrix, ctx))
    result.node.meta["fxcurv"]["kfra_sample_mean"] = True
    return result


def _twice(emit: Emitter, rule, arg: str, matrix: Any, ctx: Ctx) -> Any:
    """``J_nᵀ M J_n`` ``[D_in, N, *in]`` by the Jacobian-transpose rule on M's rows
    (``M J_n`` transposed), then on the result's columns, for the samples of ``ctx``."""
    rows = rule.vjp[arg](emit.call(rows_as_cotangent, matrix, ctx.out), ctx)
    return rule.vjp[arg](emit.call(transpose_rows, rows, ctx.out), ctx)


def _one_sample(emit: Emitter, ctx: Ctx, rule, arg: str) -> Ctx:
    """``ctx`` with the data argument and the output cut to the first sample."""
    one = Ctx.of(ctx.node, rule, emit, lead=1)
    setattr(one.args, arg, getattr(ctx.args, arg).narrow(0, 0, 1))
    one.out = ctx.out.narrow(0, 0, 1)
    return one


def averages_samples(node: fx.Node) -> bool:
    """``node`` is a propagation step's ``(1/N) Σ_n J_nᵀ M J_n`` over this process's samples
    (data parallelism all-reduces it with the samples' share; a "shared" step needs none)."""
    return node.meta.get("fxcurv", {}).get("kfra_sample_mean", False)


class KFRA:
    """Emits KFRA's factors for every parameter; ``kron(name, label)`` gives one's list."""

    def __init__(self, emit: Emitter, traced, gradient: dict):
        self.emit, self.traced = emit, traced
        self.gradient = gradient
        self.factors: dict[str, Any] = {}
        self._propagate()

    def kron(self, name: str, label: str) -> Any:
        if name not in self.factors:
            raise node_error(self.traced.params[name], f"parameter '{name}' does not reach the "
                             "loss through a KFRA chain", "Request kflr instead.")
        return self.factors[name]

    def _propagate(self) -> None:
        emit = self.emit
        node, factor = loss_factor(emit, self.traced, self.gradient, "exact", 1)
        with emit.naming(f"{node.name}_kfra"):
            matrix = emit.call(summed_outer, factor)
            chain = self._chain(node)
            steps = [link for link in chain if link.data is not None]
            matrix = emit.call(checked_sizes, matrix,
                               [getattr(link.ctx.args, link.data[0]) for link in steps],
                               [link.rule.sandwich.get(link.data[0]) is None for link in steps],
                               MAX_DENSE_BYTES,
                               [f"{describe(link.ctx.node)} for quantity '{emit.quantity}'"
                                for link in steps])
        emit.rename(matrix, f"{node.name}_kfra")
        for link in chain:
            matrix = self._step(link, matrix)

    def _chain(self, node: fx.Node) -> list[Link]:
        """The ops from the model output back to the first layer, along data arguments."""
        params, chain = set(self.traced.params.values()), []
        while node is not None and node not in params:
            rule = rule_for(node)
            if rule is None or rule.is_constant(node):
                break
            ctx = Ctx.of(node, rule, self.emit, lead=1)
            data, param_args = self._arguments(node, ctx, params)
            chain.append(Link(rule, ctx, data, param_args))
            node = data[1] if data else None
        return chain

    def _step(self, link: Link, matrix: Any) -> Any:
        """Emits the factors of ``link``'s parameters; the matrix at its data input (or None)."""
        node, ctx = link.ctx.node, link.ctx
        with self.emit.naming(f"{node.name}_kfra", pass_="kfra", node=node.name):
            for arg, param in link.params:
                self._factors_of(node, link.rule, arg, param, matrix, ctx)
            if link.data is None:
                return None
            result = sandwich(self.emit, link.rule, link.data[0], matrix, ctx)
        self.emit.rename(result, f"{link.data[1].name}_kfra")
        return result

    def _factors_of(self, node, rule, arg, param, matrix, ctx) -> None:
        name = param.target
        if arg in rule.kron_matrix:
            factors = rule.kron_matrix[arg](matrix, ctx)
        elif arg in rule.kron:
            factors = rule.kron[arg](self.emit.call(matrix_sqrt_factor, matrix, ctx.out), ctx)
        elif arg in rule.batch_grad:
            factors = [self._block(rule, arg, param, matrix, ctx)]
        else:
            raise node_error(node, f"{rule.name} has neither a Kronecker factorisation nor "
                             f"a per-sample rule for its argument '{arg}' (parameter "
                             f"'{name}')", "Request diag_ggn_* or sqrt_ggn_* for this "
                             "parameter.")
        for i, factor in enumerate(factors):
            self.emit.rename(factor, f"{param.name}_kfra_{i}")
        self.factors[name] = factors

    def _block(self, rule, arg: str, param: fx.Node, matrix: Any, ctx: Ctx) -> Any:
        """A parameter without Kronecker structure: its block of the batch-averaged
        curvature, ``(1/N) Σ_n J_nᵀ M J_n`` ``[P, P]`` (``J_n`` its per-sample Jacobian; a
        bias's ``M``), or the diagonal in ``p.shape`` above ``MAX_KRON_BLOCK`` entries."""
        root = self.emit.call(matrix_sqrt_factor, matrix, ctx.out)
        terms = rule.batch_grad[arg](self.emit.call(every_sample, root, ctx.out), ctx)
        if self.traced.attrs[param.target].numel() > MAX_KRON_BLOCK:
            return self.emit.call(sample_mean_squares, terms)
        return self.emit.call(block_of_terms, terms) / ctx.out.size(0)

    def _arguments(self, node: fx.Node, ctx: Ctx, params: set) -> tuple:
        """The one data argument that depends on parameters, and the parameter arguments."""
        data, param_args = [], []
        for arg, value in ctx.bound.items():
            if not isinstance(value, fx.Node) or ctx.node.op == "placeholder":
                continue
            rule_vjp = rule_for(node).vjp.get(arg)
            if value in params:
                param_args.append((arg, value))
            elif rule_vjp is not None and _depends_on(value, params):
                data.append((arg, value))
        if len(data) > 1 or (data and len(_forward_users(data[0][1])) > 1):
            raise node_error(node, "KFRA propagates one batch-averaged matrix along a chain, "
                             "and this op joins or splits branches", "Request kflr (exact) or "
                             "kfac (MC) instead; they handle any graph.")
        return (data[0] if data else None), param_args


def _forward_users(node: fx.Node) -> list[fx.Node]:
    """Readers of ``node`` in the model and loss (not the emitted derivative nodes)."""
    return [u for u in node.users
            if u.meta.get("fxcurv", {}).get("pass_") in (None, "normalize")]


def _depends_on(node: fx.Node, params: set) -> bool:
    return not params.isdisjoint(ancestors(node))
