"""The quantities derived from a contraction form (``OpRule.contraction``), ``product`` and
``batch_sum_squares``, of every rule case (``rule_cases.py`` plus a few below) against their
definition from the materialised per-sample terms, in float64: with ``q = batch_grad[arg]``
``[*lead, N, *p]``, ``product(V) = Σ_{lead,n} q ⟨q, V_v⟩`` ``[V, *p]`` and
``batch_sum_squares = Σ_lead q²`` ``[N, *p]``. A new declaration is tested by registering it;
the emitted code must also compile with TorchScript.
"""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from fxcurv.emit import Emitter
from fxcurv.passes.backward import backward
from fxcurv.passes.normalize import normalize
from fxcurv.passes.per_sample import factor_product
from fxcurv.rules import Ctx, contraction, rule_for
from fxcurv.trace import CurvatureTracer
from rule_cases import CASES
from rule_harness import _batch_grad, case, cotangent

KINDS = ("product", "batch_sum_squares")
g = torch.Generator().manual_seed(11)


def rand(*shape):
    return torch.randn(*shape, dtype=torch.float64, generator=g)


EXTRA = [
    case("linear_two_position_axes", lambda x, w, b: F.linear(x, w, b), rand(3, 2, 4, 5),
         rand(6, 5), rand(6), params=("w", "b")),
    case("linear_one_position", lambda x, w: F.linear(x, w), rand(4, 1, 3), rand(5, 3),
         params=("w",)),
    case("conv2d_groups_stride_dilation",
         lambda x, w: F.conv2d(x, w, None, stride=2, padding=(2, 1), dilation=(2, 1), groups=3),
         rand(2, 6, 7, 6), rand(9, 2, 3, 2), params=("w",)),
    case("conv1d_same_groups", lambda x, w: F.conv1d(x, w, padding="same", groups=2),
         rand(3, 4, 7), rand(6, 2, 4), params=("w",)),
    case("conv_transpose2d_groups_dilation",
         lambda x, w: F.conv_transpose2d(x, w, None, 2, 1, 1, 2, (2, 1)),
         rand(2, 4, 3, 4), rand(4, 3, 2, 3), params=("w",)),
]


def _single_use(param: fx.Node, cts: dict):
    users = [u for u in list(param.users) if u in cts]
    if len(users) != 1:
        return None, None, None
    user, rule = users[0], rule_for(users[0])
    args = [a for a, v in rule.bind(user).items() if v is param]
    return (user, rule, args[0]) if len(args) == 1 else (None, None, None)


def build(c, lead: int):
    """GraphModule ``(ct, *vectors, *inputs) -> [(batch_grad, {kind: value})]``, a vector
    argument ``[V, *p]`` and an entry per parameter."""
    graph = CurvatureTracer().trace(c.fn)
    normalize(graph)
    placeholders = {n.target: n for n in graph.nodes if n.op == "placeholder"}
    with graph.inserting_before(next(iter(graph.nodes))):
        ct = graph.placeholder("ct")
        vectors = [graph.placeholder(f"v_{name}") for name in c.params]
    out_node = next(n for n in graph.nodes if n.op == "output")
    emit = Emitter(graph)
    sources = [placeholders[name] for name in c.differentiable()]
    cts = backward(emit, {out_node.args[0]: emit.proxy(ct)}, sources, lead=lead)
    results, found = [], 0
    for i, name in enumerate(c.params):
        param = placeholders[name]
        batch = _batch_grad(emit, param, cts, lead)
        user, rule, arg = _single_use(param, cts)
        values = {}
        declare = rule.contraction.get(arg) if user is not None else None
        for kind in KINDS if declare is not None else ():
            ctx = Ctx.of(user, rule, emit, lead)
            extra = (emit.proxy(vectors[i]),) if kind == "product" else ()
            value = contraction.derive(kind, declare, cts[user], ctx, *extra)
            if value is not None:
                values[kind] = value
        found += len(values)
        results.append((batch, values))
    graph.erase_node(out_node)
    graph.output(emit.as_node(results))
    graph.lint()
    graph._co_fields = {}
    return fx.GraphModule(torch.nn.Module(), graph), found


# the cases whose op has a contraction rule for one of its parameters
WITH_RULES = [c for c in [*CASES, *EXTRA] if c.params and build(c, 1)[1]]


@pytest.mark.parametrize("lead", [1, 2])
@pytest.mark.parametrize("c", WITH_RULES, ids=[c.id for c in WITH_RULES])
def test_contractions_match_materialised_terms(c, lead):
    module, found = build(c, lead)
    assert found
    ct = cotangent(c, lead, torch.Generator().manual_seed(lead))
    vectors = [rand(3, *c.inputs[c.names.index(name)].shape) for name in c.params]
    outputs = module(ct, *vectors, *c.inputs)
    if lead == 1:
        scripted = torch.jit.script(module)(ct, *vectors, *c.inputs)
        for (_, values), (_, script_values) in zip(outputs, scripted):
            for kind in values:
                torch.testing.assert_close(script_values[kind], values[kind], rtol=1e-12,
                                           atol=1e-12)
    for name, v, (batch, values) in zip(c.params, vectors, outputs):
        terms = batch.flatten(0, lead - 1)                                 # [K, N, *p]
        expected = {"product": factor_product(terms, v),
                    "batch_sum_squares": terms.square().sum(0)}
        for kind, actual in values.items():
            assert actual.shape == expected[kind].shape, f"{kind} of {name}: shape"
            torch.testing.assert_close(actual, expected[kind], rtol=1e-10, atol=1e-12,
                                       msg=f"{kind} of {name}")


def test_bilinear_ops_declare_contractions():
    """The ops whose per-sample terms are large declare them as contractions."""
    from fxcurv.rules import RULES
    for target in (F.linear, torch.conv1d, torch.conv2d, torch.conv3d, torch.conv_transpose1d,
                   torch.conv_transpose2d, torch.conv_transpose3d, F.embedding):
        assert "weight" in RULES[target].contraction, target
    for target in (torch.matmul, torch.bmm, torch.mm):
        assert {"input"} < set(RULES[target].contraction), target
    assert "operand1" in RULES[torch.einsum].contraction
