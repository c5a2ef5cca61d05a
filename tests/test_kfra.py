"""KFRA: equal to BackPACK's on the chains it supports; a clear error on branching graphs."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fxcurv

backpack = pytest.importorskip("backpack")
from backpack.extensions import KFRA  # noqa: E402


def chains():
    torch.manual_seed(0)
    return {
        "mlp": (nn.Sequential(nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 4), nn.ReLU(),
                              nn.Linear(4, 3)), (7, 5)),
        "cnn_maxpool": (nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Flatten(), nn.Linear(8, 3)), (3, 1, 6, 6)),
        "cnn_tanh_avgpool": (nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(),
                                           nn.AvgPool2d(2), nn.Conv2d(2, 2, 2), nn.Flatten(),
                                           nn.Linear(8, 3)), (3, 1, 6, 6)),
    }


LOSSES = {"ce_mean": nn.CrossEntropyLoss(), "ce_sum": nn.CrossEntropyLoss(reduction="sum"),
          "mse_mean": nn.MSELoss(), "mse_sum": nn.MSELoss(reduction="sum")}


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("chain", list(chains()))
def test_kfra_equals_backpack(chain, loss, float64):
    model, shape = chains()[chain]
    loss_fn = LOSSES[loss]
    x = torch.randn(*shape)
    y = torch.randint(0, 3, (shape[0],)) if "ce" in loss else torch.randn(shape[0], 3)
    _, _, kfra = fxcurv.compile(model, loss_fn, ["kfra"])(x, y)
    extended, extended_loss = backpack.extend(copy.deepcopy(model)), backpack.extend(
        copy.deepcopy(loss_fn))
    with backpack.backpack(KFRA()):
        extended_loss(extended(x), y).backward()
    for name, param in extended.named_parameters():
        assert len(kfra[name]) == len(param.kfra)
        for ours, theirs in zip(kfra[name], param.kfra):
            torch.testing.assert_close(ours, theirs, rtol=1e-8, atol=1e-12)


def test_kfra_torchscript_round_trip(float64, tmp_path):
    model, shape = chains()["mlp"]
    x, y = torch.randn(*shape), torch.randint(0, 3, (shape[0],))
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), ["kfra"])
    path = str(tmp_path / "kfra.pt")
    torch.jit.script(step).save(path)
    eager, loaded = step(x, y)[2], torch.jit.load(path)(x, y)[2]
    for name in eager:
        for a, b in zip(eager[name], loaded[name]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_kfra_on_a_residual_graph_is_refused():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            h = self.fc1(x)
            return self.fc2(h + torch.tanh(h))

    with pytest.raises(fxcurv.CompileError, match=r"quantity 'kfra'.*chain.*kflr"):
        fxcurv.compile(Residual(), nn.CrossEntropyLoss(), ["kfra"])


@pytest.mark.parametrize("pool, features", [(nn.MaxPool2d(3, 2, padding=1), 18),
                                            (nn.MaxPool2d(2), 8)], ids=["overlapping", "untiled"])
def test_kfra_max_pool_routes_equal_backpack(pool, features, float64):
    """Overlapping windows (sample by sample) and windows that leave inputs out (gathered);
    the chains above cover windows that tile the input."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), pool, nn.Flatten(),
                          nn.Linear(features, 3))
    x, y = torch.randn(4, 1, 7, 7), torch.randint(0, 3, (4,))
    _, _, kfra = fxcurv.compile(model, nn.CrossEntropyLoss(), ["kfra"])(x, y)
    extended = backpack.extend(copy.deepcopy(model))
    with backpack.backpack(KFRA()):
        backpack.extend(nn.CrossEntropyLoss())(extended(x), y).backward()
    for name, param in extended.named_parameters():
        for ours, theirs in zip(kfra[name], param.kfra):
            torch.testing.assert_close(ours, theirs, rtol=1e-8, atol=1e-12)


def brute_force_output_factors(model: nn.Sequential, loss_fn, x, y) -> dict:
    """KFRA's output factor ``G`` of every parameterised layer by per-sample Jacobians:
    ``M = Σ_n ∂²L/∂out_n²``, ``M_in = (1/N) Σ_n J_nᵀ M J_n``, ``G`` = ``M`` (linear, summed
    over diagonal position blocks) or ``M`` summed over positions (conv, diagonal group blocks)."""
    inputs = [x]
    for layer in model:
        inputs.append(layer(inputs[-1]))
    out = inputs[-1]
    hessian = torch.func.hessian(lambda o: loss_fn(o, y))(out).reshape(len(x), out[0].numel(),
                                                                      len(x), -1)
    matrix = sum(hessian[n, :, n] for n in range(len(x)))
    factors = {}
    for i in reversed(range(len(model))):
        layer, layer_in, layer_out = model[i], inputs[i], inputs[i + 1]
        if isinstance(layer, nn.Linear):
            t, o = layer_out[0].numel() // layer.out_features, layer.out_features
            factors[i] = matrix.reshape(t, o, t, o).diagonal(0, 0, 2).sum(-1)
        if isinstance(layer, nn.Conv2d):
            c, g = layer.out_channels, layer.groups
            full = matrix.reshape(c, -1, c, matrix.size(0) // c).sum([1, 3])
            factors[i] = full.reshape(g, c // g, g, c // g).diagonal(0, 0, 2).permute(2, 0, 1)
        jacobians = [torch.func.jacrev(lambda s: layer(s.unsqueeze(0))[0])(sample)
                     .reshape(matrix.size(0), -1) for sample in layer_in]
        matrix = sum(j.t() @ matrix @ j for j in jacobians) / len(x)
    return factors


def test_kfra_grouped_conv_and_sequence_linear_equal_brute_force(float64):
    """Paths BackPACK does not cover: groups > 1 and a linear layer on ``[N, T, I]``."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Sigmoid(), nn.Flatten(2),
                          nn.Linear(9, 5), nn.Tanh(), nn.Flatten(), nn.Linear(20, 3))
    x, y = torch.randn(3, 2, 5, 5), torch.randint(0, 3, (3,))
    _, _, kfra = fxcurv.compile(model, nn.CrossEntropyLoss(), ["kfra"])(x, y)
    expected = brute_force_output_factors(model, nn.CrossEntropyLoss(), x, y)
    torch.testing.assert_close(kfra["0.weight"][0], expected[0], rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(kfra["3.weight"][0], expected[3], rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(kfra["6.weight"][0], expected[6], rtol=1e-8, atol=1e-12)


def test_kfra_too_large_dense_matrix_is_refused(monkeypatch):
    """The dense matrix is checked against a size limit before any propagation step."""
    import fxcurv.passes.curvature.kfra as kfra_pass

    monkeypatch.setattr(kfra_pass, "MAX_DENSE_BYTES", 60)  # the last layer's 4 x 4 has 64
    model, shape = chains()["mlp"]
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), ["kfra"])
    with pytest.raises(RuntimeError, match=r"node 'linear_2'.*quantity 'kfra'.*4 x 4.*kflr"):
        step(torch.randn(*shape), torch.randint(0, 3, (shape[0],)))


def _sandwich_op(case):
    """The case's graph, its one op, the op's rule and the data argument, if that op has a
    ``sandwich`` rule for its one data input (else None)."""
    from fxcurv.passes.normalize import normalize
    from fxcurv.rules import rule_for
    from fxcurv.trace import CurvatureTracer

    data = [n for n, t in zip(case.names, case.inputs) if isinstance(t, torch.Tensor)
            and t.is_floating_point() and n not in case.params and n not in case.const]
    if len(data) != 1:
        return None
    graph = CurvatureTracer().trace(case.fn)
    normalize(graph)
    ops = [n for n in graph.nodes if rule_for(n) is not None and not rule_for(n).is_constant(n)]
    if len(ops) != 1:
        return None
    node, rule = ops[0], rule_for(ops[0])
    args = [a for a, v in rule.bind(node).items()
            if isinstance(v, torch.fx.Node) and v.op == "placeholder" and v.target == data[0]]
    index = case.names.index(data[0])
    if len(args) != 1 or args[0] not in rule.sandwich or not _per_sample(case, index):
        return None
    return graph, node, rule, args[0], index


def _per_sample(case, index: int) -> bool:
    """The case runs on one sample (no size written for the whole batch, ``x.view(3, 8)``)."""
    inputs = list(case.inputs)
    inputs[index] = inputs[index][:1]
    try:
        case.fn(*inputs)
    except RuntimeError:
        return False
    return True


def _sandwich_cases():
    """Cases of ops with a ``sandwich`` rule; if tracing a case fails, that case alone (its
    test shows the error, and the other tests of this file still collect)."""
    from rule_cases import CASES

    cases = []
    for case in CASES:
        try:
            if _sandwich_op(case) is not None:
                cases.append(case)
        except Exception:  # noqa: BLE001
            return [case]
    return cases


@pytest.mark.parametrize("case", _sandwich_cases(), ids=lambda case: case.id)
def test_sandwich_rules_vs_per_sample_jacobians(case):
    """Every op's ``sandwich`` rule, scripted, against ``(1/N) Σ_n J_nᵀ M J_n`` from
    ``torch.func.jacrev`` per sample, for a random symmetric ``M``."""
    from fxcurv.emit import Emitter
    from fxcurv.passes.curvature.kfra import sandwich
    from fxcurv.rules import Ctx

    graph, node, rule, arg, index = _sandwich_op(case)
    with graph.inserting_before(next(iter(graph.nodes))):
        matrix = graph.placeholder("matrix")
    output = next(n for n in graph.nodes if n.op == "output")
    emit = Emitter(graph)
    result = sandwich(emit, rule, arg, emit.proxy(matrix), Ctx.of(node, rule, emit, lead=1))
    graph.erase_node(output)
    graph.output(emit.as_node(result))
    graph._co_fields = {}
    step = torch.jit.script(torch.fx.GraphModule(torch.nn.Module(), graph))

    x = case.inputs[index]

    def sample_fn(sample):
        inputs = list(case.inputs)
        inputs[index] = sample.unsqueeze(0)
        return case.fn(*inputs)[0]

    jacobians = [torch.func.jacrev(sample_fn)(s).reshape(-1, s.numel()) for s in x]
    root = torch.randn(jacobians[0].size(0), jacobians[0].size(0), dtype=x.dtype)
    m = root @ root.T
    expected = sum(j.T @ m @ j for j in jacobians) / len(jacobians)
    torch.testing.assert_close(step(m, *case.inputs), expected, rtol=1e-9, atol=1e-12)
