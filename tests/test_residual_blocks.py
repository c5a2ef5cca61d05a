"""Dense per-sample residual blocks (``OpRule.residual_block``) and the Hessian family through
transformer pieces: softmax, layer_norm and products of two activations.

1. Generic, over every rule case (``rule_cases.py``) with an op that has ``residual_block``:
   the emitted blocks ``[N, B, K, K]`` placed on the diagonal (one argument), or
   ``[[0, C], [Cᵀ, 0]]`` from the cross matrix ``C`` of a product, equal
   ``torch.func.hessian`` of ``Σ g ⊙ f`` w.r.t. the op's arguments, restricted to each
   sample (float64); products whose operands do not keep the samples on axis 0 are refused
   by name.
2. Models (float64, vs ``torch.func`` brute force of the whole loss): softmax inside an MLP,
   a layer-norm MLP, hand-written single-head attention, ``nn.MultiheadAttention`` and a
   tiny ``nn.TransformerEncoderLayer``: ``diag_h``, ``diag_h_batch``, ``hmp`` exactly;
   ``pchmp_abs`` vs its definition (GGN + ``Jᵀ|R|J``) on the softmax MLP, and the identity
   ``(hmp + pchmp_abs) / 2 = pchmp_clip`` on all.
"""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from torch.func import functional_call, hessian, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel

import fxcurv
from fxcurv.emit import Emitter
from fxcurv.errors import CompileError
from fxcurv.passes.analysis import sample_carriers
from fxcurv.passes.normalize import normalize
from fxcurv.rules import RULES, Ctx, rule_for
from fxcurv.rules.helpers import block_diagonal
from fxcurv.trace import CurvatureTracer
from rule_cases import CASES
from test_hessian import assert_dicts_close, brute_force, random_vectors, run_fxcurv

DTYPE = torch.float64
# products of two data operands that are not both ``[N, ..., T, K] @ [N, ..., K, U]`` with
# equal batch axes: refused when the step runs (sizes are known only then)
REFUSED = {("matmul_broadcast", "matmul"), ("matmul_method", "matmul")}


# ============================================================== 1. generic rule check
def _block_graph(case):
    """Graph ``(g, *inputs) -> [(node name, key, block, arg values, op input values)]`` for
    every op with a dense residual block whose arguments all carry the samples."""
    graph = CurvatureTracer().trace(case.fn)
    normalize(graph)
    holders = {n.target: n for n in graph.nodes if n.op == "placeholder"}
    data = [holders[n] for n in case.differentiable() if n not in case.params]
    carriers = set().union(*[sample_carriers(graph, d) for d in data]) if data else set()
    with graph.inserting_before(next(iter(graph.nodes))):
        ct = graph.placeholder("ct")
    out_node = next(n for n in graph.nodes if n.op == "output")
    emit, found = Emitter(graph), []
    for node in list(graph.nodes):
        rule = rule_for(node)
        if rule is None or not rule.residual_block or node not in carriers:
            continue
        ctx = Ctx.of(node, rule, emit)
        for key, fn in rule.residual_block.items():
            args = [ctx.bound.get(name) for name in key]
            if not all(isinstance(a, fx.Node) and a in carriers for a in args):
                continue
            g = emit.proxy(ct) if node is out_node.args[0] else None
            if g is None:
                continue
            found.append((node, key, fn(g, ctx), args))
    return graph, out_node, emit, found


def _reference(node, key, bound_values: dict, g, args_values):
    """Per-sample ``∂²(Σ g ⊙ f)/∂(args)²`` ``[N, D, D]`` by ``torch.func.hessian``."""
    sizes = [v.numel() for v in args_values]
    samples = args_values[0].size(0)

    def total(flat):
        env = dict(bound_values)
        for name, piece, value in zip(key, torch.split(flat, sizes), args_values):
            env[name] = piece.reshape(value.shape)
        return (g * _call(node, env)).sum()

    flat = torch.cat([v.reshape(-1) for v in args_values])
    full = hessian(total)(flat)
    index = torch.cat([torch.arange(s).reshape(samples, -1) + offset for s, offset in
                       zip(sizes, [sum(sizes[:i]) for i in range(len(sizes))])], 1)
    return torch.stack([full[i][:, i] for i in index])


def _call(node, env: dict):
    """Call ``node``'s op with its bound arguments taken from ``env``."""
    rule = rule_for(node)
    names = list(rule.signature.parameters)
    if node.op == "call_method":
        return getattr(env[names[0]], node.target)(*[env[n] for n in names[1:]])
    values = [env[n] for n in names]
    if node.target is torch.einsum:
        return torch.einsum(values[0], *[v for v in values[1:] if v is not None])
    return node.target(*values)


# the cases with a residual block whose arguments all carry the samples at the output op
BLOCK_CASES = [c for c in CASES if _block_graph(c)[3]]


@pytest.mark.parametrize("case", BLOCK_CASES, ids=[c.id for c in BLOCK_CASES])
def test_residual_block_equals_hessian_per_sample(case):
    graph, out_node, emit, found = _block_graph(case)
    assert found
    values = {}
    for node, key, block, args in found:
        operands = [a for a in node.all_input_nodes]
        values[node] = (block, args, operands)
    graph.erase_node(out_node)
    graph.output(emit.as_node([[v[0]] + [emit.proxy(n) for n in v[2]]
                               for v in values.values()]))
    graph.lint()
    graph._co_fields = {}
    module = fx.GraphModule(torch.nn.Module(), graph)
    out = case.fn(*case.inputs)
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(0))
    try:
        results = module(g, *case.inputs)
    except (RuntimeError, CompileError) as err:
        assert (case.id, found[0][0].name) in REFUSED and "fxcurv" in str(err), str(err)
        return
    assert (case.id, found[0][0].name) not in REFUSED
    for (node, (_, args, operands)), (block, *operand_values) in zip(values.items(), results):
        env_nodes = dict(zip(operands, operand_values))
        rule = rule_for(node)
        bound = rule.bind(node)
        env = {name: (env_nodes[v] if isinstance(v, fx.Node) else v)
               for name, v in bound.items()}
        key = next(k for k in rule.residual_block if [bound[n] for n in k] == args)
        expected = _reference(node, key, env, g, [env[n] for n in key])
        dense = block_diagonal(block) if len(key) == 1 else _bilinear(block)
        torch.testing.assert_close(dense, expected, rtol=1e-9, atol=1e-11)


def _bilinear(cross):
    """``C`` ``[N, Da, Db]`` -> ``[[0, C], [Cᵀ, 0]]``."""
    samples, first, second = cross.shape
    top = torch.cat([torch.zeros(samples, first, first, dtype=DTYPE), cross], 2)
    bottom = torch.cat([cross.transpose(1, 2), torch.zeros(samples, second, second,
                                                           dtype=DTYPE)], 2)
    return torch.cat([top, bottom], 1)


def test_every_residual_block_rule_has_a_checked_case():
    rules = {id(r): r for r in RULES.values() if r.residual_block}
    covered = set()
    for case in CASES:
        _, _, _, found = _block_graph(case)
        covered |= {id(rule_for(node)) for node, *_ in found}
    missing = sorted({rules[i].name for i in rules} - {rules[i].name for i in covered
                                                         if i in rules})
    assert not missing, missing


# ============================================================================ 2. models
D, T, HEADS = 4, 3, 2
HESSIAN = ["diag_h", "diag_h_batch", "hmp"]


class SoftmaxMLP(nn.Module):
    """Linear -> softmax -> Linear: softmax in the middle of the model."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(D, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.softmax(self.fc(x), dim=-1))


class LayerNormMLP(nn.Module):
    """Linear -> tanh -> LayerNorm over two axes of ``[N, T, D]`` -> mean -> Linear."""

    def __init__(self):
        super().__init__()
        self.fc, self.norm, self.head = nn.Linear(D, D), nn.LayerNorm([T, D]), nn.Linear(D, 3)
        with torch.no_grad():
            self.norm.weight.normal_()
            self.norm.bias.normal_()

    def forward(self, x):
        return self.head(self.norm(torch.tanh(self.fc(x))).mean(1))


class HandAttention(nn.Module):
    """Single-head attention by hand after a shared layer (q, k, v share its parameters)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(D, D)
        self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        scores = torch.matmul(self.q(h), self.k(h).transpose(-2, -1)) / D ** 0.5
        return self.head(torch.matmul(torch.softmax(scores, dim=-1), self.v(h)).mean(1))


class MultiheadNet(nn.Module):
    """``nn.MultiheadAttention`` (lowered) on a shared embedding."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(D, D)
        self.attn = nn.MultiheadAttention(D, HEADS, batch_first=True)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        h = self.embed(x)
        return self.head(self.attn(h, h, h, need_weights=False)[0].mean(1))


class EncoderNet(nn.Module):
    """A tiny ``nn.TransformerEncoderLayer`` (eval, no dropout) and a read-out."""

    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(D, HEADS, dim_feedforward=6, dropout=0.0,
                                                batch_first=True)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        return self.head(self.layer(x).mean(1))


MODELS = {"softmax_mlp": (SoftmaxMLP, (3, D)), "layer_norm_mlp": (LayerNormMLP, (3, T, D)),
          "hand_attention": (HandAttention, (2, T, D)), "multihead": (MultiheadNet, (2, T, D)),
          "encoder_layer": (EncoderNet, (2, T, D))}


def _setup(name: str):
    make, shape = MODELS[name]
    torch.manual_seed(3)
    model = make().to(DTYPE).eval()
    x = torch.randn(*shape, dtype=DTYPE)
    return model, nn.CrossEntropyLoss(), x, torch.randint(0, 3, (shape[0],))


@pytest.mark.parametrize("name", list(MODELS))
def test_hessian_family_equals_brute_force(name, one_thread):
    model, loss_fn, x, y = _setup(name)
    vectors = random_vectors(model, v=2, seed=1)
    quantities = HESSIAN + ["pchmp_abs", "pchmp_clip"]
    ours = run_fxcurv(model, loss_fn, x, y, quantities, vectors)
    with sdpa_kernel(SDPBackend.MATH):  # forward-mode AD (torch.func.hessian) needs the math path
        expected = brute_force(model, loss_fn, x, y, vectors)
    for quantity in HESSIAN:
        assert_dicts_close(ours[quantity], expected[quantity], f"{name} {quantity}")
    half_sum = {n: (ours["hmp"][n] + ours["pchmp_abs"][n]) / 2 for n in ours["hmp"]}
    assert_dicts_close(half_sum, ours["pchmp_clip"], f"{name} (hmp + pchmp_abs) / 2")


@pytest.mark.parametrize("name", ["hand_attention", "encoder_layer"])
def test_scripted_step_agrees(name, one_thread):
    model, loss_fn, x, y = _setup(name)
    step = fxcurv.compile(model, loss_fn, ["diag_h", "hmp"])
    vectors = random_vectors(model, v=2, seed=1)
    eager, scripted = step(x, y, vectors), torch.jit.script(step)(x, y, vectors)
    for a, b in zip(eager[2:], scripted[2:]):
        assert_dicts_close(b, a, "scripted")


def test_pchmp_abs_softmax_mlp_equals_definition(one_thread):
    """GGN + ``Σ_n J_nᵀ |R_n| J_n`` with ``R_n = ∂²(g_n·softmax(z_n))/∂z_n²`` at ``z = fc(x)``
    (``g`` the loss gradient at the softmax output, ``|R|`` by eigenvalues)."""
    model, loss_fn, x, y = _setup("softmax_mlp")
    vectors = random_vectors(model, v=2, seed=1)
    ours = run_fxcurv(model, loss_fn, x, y, ["pchmp_abs"], vectors)["pchmp_abs"]
    expected = dict(brute_force(model, loss_fn, x, y, vectors)["ggnmp"])
    params = {n: p.detach() for n, p in model.named_parameters()}
    z = model.fc(x).detach()
    s = torch.softmax(z, -1)
    g = torch.func.grad(lambda s_: loss_fn(model.head(s_), y))(s)
    residual = torch.stack([hessian(lambda zn: (gn * torch.softmax(zn, -1)).sum())(zn)
                            for gn, zn in zip(g, z)])
    values, basis = torch.linalg.eigh(residual)
    absolute = basis @ torch.diag_embed(values.abs()) @ basis.transpose(1, 2)
    for name in ("fc.weight", "fc.bias"):
        jac = jacrev(lambda p: functional_call(model.fc, {name[3:]: p}, (x,)))(params[name])
        jac = jac.reshape(x.size(0), z.size(1), -1)                              # [N, 5, P]
        block = torch.einsum("nap,nab,nbq->pq", jac, absolute, jac)
        flat = vectors[name].flatten(1)
        expected[name] = expected[name] + (flat @ block).reshape(vectors[name].shape)
    assert_dicts_close(ours, expected, "pchmp_abs")


def test_oversized_block_is_refused_when_the_step_runs(monkeypatch):
    from fxcurv.passes.curvature import diag_hessian  # noqa: PLC0415
    monkeypatch.setattr(diag_hessian, "MAX_BLOCK_SIZE", 4)
    model, loss_fn, x, y = _setup("softmax_mlp")
    step = fxcurv.compile(model, loss_fn, ["diag_h"])
    with pytest.raises(RuntimeError, match=r"node 'softmax' \(softmax\) for quantity 'diag_h'"
                       r".*block of size 5 > 4.*diag_ggn_exact"):
        step(x, y)


def test_oversized_elementwise_residual_factor_is_refused(monkeypatch):
    """A residual that must travel past its own layer needs the factor ``[D, N, D]``: over
    the limit, refused when the step runs. One that only reaches its own layer's weight and
    bias is pulled back there and needs none (``diag_hessian.LocalResidual``)."""
    from fxcurv.passes.curvature import factors  # noqa: PLC0415
    monkeypatch.setattr(factors, "MAX_RESIDUAL_FACTOR_BYTES", 6 * 6 * 4 - 1)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    first_layer_only = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(),
                                           torch.nn.Linear(6, 3))
    fxcurv.compile(first_layer_only, torch.nn.CrossEntropyLoss(), ["diag_h"])(x, y)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 6),
                                torch.nn.Tanh(), torch.nn.Linear(6, 3))
    step = fxcurv.compile(model, torch.nn.CrossEntropyLoss(), ["diag_h"])
    with pytest.raises(RuntimeError, match=r"node .tanh_1. \(tanh\).*D = 6 and N = 5"
                       r".*diag_ggn_exact"):
        step(x, y)
