"""Runs one op rule case through fxcurv's own passes, and computes the autograd reference.

A :class:`Case` is a small function of tensors (``lambda x, w, b: F.linear(x, w, b)``) with
float64 example inputs. The harness traces it with fxcurv's tracer, normalises it, seeds the
output with a cotangent that has ``lead`` extra leading axes, runs the backward pass and the
per-sample parameter rules, and returns the results next to ``torch.func`` references.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx

from fxcurv.emit import Emitter
from fxcurv.passes.backward import backward
from fxcurv.passes.normalize import normalize
from fxcurv.rules import Ctx, contraction, rule_for
from fxcurv.trace import CurvatureTracer


@dataclass
class Case:
    """``fn(*inputs)``; ``params`` names the arguments that act as parameters (no sample
    axis), the others are data with the sample axis 0."""

    id: str
    fn: Callable
    inputs: tuple
    params: tuple = ()
    const: tuple = ()
    names: list = field(init=False)

    def __post_init__(self):
        self.names = list(inspect.signature(self.fn).parameters)

    def differentiable(self) -> list[str]:
        return [n for n, t in zip(self.names, self.inputs)
                if isinstance(t, torch.Tensor) and t.is_floating_point() and n not in self.const]

    def of_differentiable(self) -> tuple[Callable, list]:
        """``(f, values)``: ``fn`` as a function of the differentiable inputs alone (the
        others fixed), and those inputs."""
        index = [self.names.index(n) for n in self.differentiable()]

        def f(*tensors):
            args = list(self.inputs)
            for i, t in zip(index, tensors):
                args[i] = t
            return self.fn(*args)

        return f, [self.inputs[i] for i in index]


def case(case_id: str, fn: Callable, *inputs, params: tuple = (), const: tuple = ()) -> Case:
    """A rule case; ``params``: inputs without a sample axis; ``const``: float inputs that are
    not differentiated (targets, class weights)."""
    return Case(case_id, fn, tuple(inputs), tuple(params), tuple(const))


def build(c: Case, lead: int) -> tuple[fx.GraphModule, list, fx.Graph]:
    """GraphModule ``(ct, *inputs) -> (vjps..., batch_grads...)`` and the rules it used."""
    graph = CurvatureTracer().trace(c.fn)
    normalize(graph)
    placeholders = {n.target: n for n in graph.nodes if n.op == "placeholder"}
    with graph.inserting_before(next(iter(graph.nodes))):
        ct = graph.placeholder("ct")
    out_node = next(n for n in graph.nodes if n.op == "output")
    result = out_node.args[0]
    emit = Emitter(graph)
    sources = [placeholders[name] for name in c.differentiable()]
    cts = backward(emit, {result: emit.proxy(ct)}, sources, lead=lead)
    vjps = [cts.get(node) for node in sources]
    batch = [_batch_grad(emit, placeholders[name], cts, lead) for name in c.params]
    shortcuts = [_shortcuts(emit, placeholders[name], cts, lead) for name in c.params]
    used = [rule_for(n) for n in cts if rule_for(n) is not None]
    graph.erase_node(out_node)
    graph.output(emit.as_node((vjps, batch, shortcuts)))
    graph.lint()
    graph._co_fields = {}  # a lambda's code name would hide the generated source from TorchScript
    return fx.GraphModule(torch.nn.Module(), graph), used, graph


def _batch_grad(emit: Emitter, param: fx.Node, cts: dict, lead: int):
    total = None
    for user in list(param.users):
        if user not in cts:
            continue
        rule = rule_for(user)
        for arg, value in rule.bind(user).items():
            if value is param:
                part = rule.batch_grad[arg](cts[user], Ctx.of(user, rule, emit, lead))
                total = part if total is None else total + part
    return total


def _shortcuts(emit: Emitter, param: fx.Node, cts: dict, lead: int) -> dict:
    """``sum_squares`` (any lead) and ``batch_l2`` (lead 0) derived from the op's contraction
    form, where it declares one."""
    users = [u for u in list(param.users) if u in cts]
    if len(users) != 1:
        return {}
    user, rule = users[0], rule_for(users[0])
    arg = next(a for a, v in rule.bind(user).items() if v is param)
    declare = rule.contraction.get(arg)
    found = {}
    for kind in ("sum_squares", "batch_l2") if declare is not None else ():
        if kind == "sum_squares" or lead == 0:
            value = contraction.derive(kind, declare, cts[user], Ctx.of(user, rule, emit, lead))
            if value is not None:
                found[kind] = value
    if arg in rule.diagonal_squares and lead == 0:  # the cotangent as a diagonal curvature
        ctx = Ctx.of(user, rule, emit, 0)
        vectors = emit.call(torch.ones_like, emit.proxy(param)).unsqueeze(0)
        vectors = torch.cat([vectors, vectors.cumsum(-1)], 0)  # [2, *w]
        found["diagonal_vectors"] = vectors
        for kind in ("sum_squares", "batch_sum_squares", "product"):
            extra = (vectors,) if kind == "product" else ()
            found[f"diagonal_{kind}"] = contraction.diagonal_curvature(
                kind, rule, arg, cts[user], ctx, *extra)
    return found


def reference_diagonal_curvature(c: Case, ct: torch.Tensor, name: str,
                                 vectors: torch.Tensor) -> dict:
    """``Σ_d ct_d (∂y_d/∂w)²`` (summed and per sample) and ``Jᵀ diag(ct) J V`` for parameter
    ``name``, from the Jacobian ``∂y/∂w`` by ``torch.func.jacrev``."""
    index = c.names.index(name)

    def of_param(w):
        args = list(c.inputs)
        args[index] = w
        return c.fn(*args)

    param = c.inputs[index]
    jacobian = torch.func.jacrev(of_param)(param).reshape(ct.shape[0], -1, param.numel())
    weights = ct.reshape(ct.shape[0], -1, 1)
    per_sample = (weights * jacobian.square()).sum(1).reshape(ct.shape[:1] + param.shape)
    tangents = jacobian @ vectors.reshape(vectors.shape[0], -1).T         # [N, D, V]
    product = torch.einsum("ndw,nd,ndv->vw", jacobian, weights[..., 0], tangents)
    return {"diagonal_sum_squares": per_sample.sum(0), "diagonal_batch_sum_squares": per_sample,
            "diagonal_product": product.reshape(vectors.shape)}


def cotangent(c: Case, lead: int, generator: torch.Generator) -> torch.Tensor:
    out = c.fn(*c.inputs)
    return torch.randn((2,) * lead + tuple(out.shape), dtype=out.dtype, generator=generator)


def reference_vjps(c: Case, ct: torch.Tensor, lead: int) -> list[torch.Tensor]:
    """``Jᵀ ct`` for every differentiable input by ``torch.func.vjp``, looped over the lead
    axes (not vmapped: torch's batching of ``cdist``'s backward gives wrong values)."""
    partial, values = c.of_differentiable()
    _, pullback = torch.func.vjp(partial, *values)
    fn = pullback
    for _ in range(lead):
        fn = _looped(fn)
    return list(fn(ct))


def _looped(fn: Callable) -> Callable:
    """``fn`` applied to each slice of its argument's axis 0, the results stacked."""
    return lambda ct: [torch.stack(parts) for parts in zip(*[fn(row) for row in ct])]


def reference_batch_grads(c: Case, ct: torch.Tensor, lead: int) -> list[torch.Tensor]:
    """Per-sample parameter gradients of ``⟨ct, fn⟩``: sample ``n`` of every data input."""
    data = [i for i, n in enumerate(c.names) if n not in c.params and n not in c.const
            and isinstance(c.inputs[i], torch.Tensor)]
    samples = c.inputs[data[0]].shape[0]
    results = []
    for name in c.params:
        index = c.names.index(name)
        per_lead = []
        for ct_lead in ct.reshape(-1, *ct.shape[lead:]):
            per_sample = []
            for n in range(samples):
                args = list(c.inputs)
                for i in data:
                    args[i] = c.inputs[i][n:n + 1]
                param = c.inputs[index].clone().requires_grad_(True)
                args[index] = param
                value = (c.fn(*args) * ct_lead[n:n + 1]).sum()
                per_sample.append(torch.autograd.grad(value, param, allow_unused=True)[0]
                                  if value.requires_grad else torch.zeros_like(param))
            per_lead.append(torch.stack([p if p is not None else torch.zeros_like(param)
                                         for p in per_sample]))
        stacked = torch.stack(per_lead)
        results.append(stacked.reshape(*ct.shape[:lead], *stacked.shape[1:]))
    return results
