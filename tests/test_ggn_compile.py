"""The GGN family in the compiled step: shared propagations, TorchScript, pruning, errors."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import fxcurv
from fxcurv.rules import losses as loss_rules
from setups import LayerNormNet

DTYPE = torch.float64
GGN = ["diag_ggn_exact", "diag_ggn_mc", "diag_ggn_exact_batch", "diag_ggn_mc_batch",
       "sqrt_ggn_exact", "sqrt_ggn_mc", "kflr", "kfac"]
EXACT_TRIO = ["diag_ggn_exact", "sqrt_ggn_exact", "kflr"]
MC_TRIO = ["diag_ggn_mc", "kfac", "sqrt_ggn_mc"]
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.ReLU(),
                         nn.Linear(5, 3)).to(DTYPE)


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(3, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(2, 3)).to(DTYPE)


def mlp_batch(n: int = 4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, dtype=DTYPE, generator=g), torch.randint(0, 3, (n,), generator=g)


def cnn_batch(n: int = 3):
    g = torch.Generator().manual_seed(2)
    return (torch.randn(n, 2, 4, 4, dtype=DTYPE, generator=g),
            torch.randint(0, 3, (n,), generator=g))


def calls_to(step: fx.GraphModule, target) -> list[fx.Node]:
    return [n for n in step.graph.nodes if n.op == "call_function" and n.target is target]


def propagation(step: fx.GraphModule, kind: str) -> list[str]:
    """Names of the backward nodes of the ``kind`` sqrt-GGN propagation: those emitted by the
    backward pass after the loss's Hessian square root of that kind."""
    names, inside = [], False
    for node in step.graph.nodes:
        tag = node.meta.get("fxcurv") or {}
        if node.name == f"loss_sqrt_hessian_{kind}":
            inside = True
        elif tag.get("pass_") == "sqrt_ggn":
            inside = False
        elif inside and tag.get("pass_") == "backward":
            names.append(node.name)
    return names


def flat(outputs) -> list[torch.Tensor]:
    """Every tensor of a step's outputs, in order (dicts and Kronecker factor lists opened)."""
    tensors = []
    for value in outputs:
        if isinstance(value, dict):
            for v in value.values():
                tensors.extend(v if isinstance(v, (list, tuple)) else [v])
        else:
            tensors.append(value)
    return tensors


def assert_same(actual, expected, what: str, exact: bool = True):
    actual, expected = flat(actual), flat(expected)
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        if exact:
            assert torch.equal(a, e), f"{what}: tensor {i}"
        else:
            torch.testing.assert_close(a, e, rtol=1e-12, atol=0, msg=f"{what}: tensor {i}")


# ------------------------------------------------------------------------- (a) sharing
def test_exact_quantities_share_one_propagation():
    model, (x, y) = mlp(), mlp_batch()
    together = fxcurv.compile(model, nn.CrossEntropyLoss(), EXACT_TRIO, column_chunk=None)
    alone = {q: fxcurv.compile(model, nn.CrossEntropyLoss(), [q], column_chunk=None)
             for q in EXACT_TRIO}
    assert len(calls_to(together, loss_rules.cross_entropy_sqrt_hessian)) == 1
    assert [n.name for n in together.graph.nodes].count("loss_sqrt_hessian_exact") == 1
    cotangents = [n.name for n in together.graph.nodes if n.name.endswith("_sqrt_ggn_exact")
                  and (n.meta.get("fxcurv") or {}).get("pass_") == "backward"]
    assert cotangents and len(cotangents) == len(set(cotangents))
    assert propagation(together, "exact")
    assert propagation(together, "exact") == propagation(alone["diag_ggn_exact"], "exact")
    # three quantities cost far less than three steps: about 1.3x the code of one of them
    assert len(together.code) < 1.6 * max(len(s.code) for s in alone.values())
    for quantity, value in zip(EXACT_TRIO, together(x, y)[2:]):
        assert_same([value], [alone[quantity](x, y)[2]], quantity, exact=False)


def test_mc_quantities_share_one_propagation_and_one_draw():
    model, (x, y) = mlp(), mlp_batch()
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), MC_TRIO, mc_samples=3)
    alone = fxcurv.compile(model, nn.CrossEntropyLoss(), ["diag_ggn_mc"], mc_samples=3)
    assert len(calls_to(step, loss_rules.cross_entropy_sqrt_hessian_mc)) == 1
    assert [n.name for n in step.graph.nodes].count("loss_sqrt_hessian_mc") == 1
    assert propagation(step, "mc") and propagation(step, "mc") == propagation(alone, "mc")
    assert len(step.code) < 1.6 * len(alone.code)
    # one draw: every quantity is a function of the same sampled factor
    _, _, diag, kfac, sqrt = step(x, y)
    for p, s in sqrt.items():
        assert s.shape[:2] == (3, 4)
        torch.testing.assert_close(diag[p], s.square().sum([0, 1]), rtol=1e-12, atol=1e-15)
    for layer in ("0", "2", "4"):
        s = sqrt[f"{layer}.bias"].flatten(0, 1)
        torch.testing.assert_close(kfac[f"{layer}.bias"][0], s.T @ s, rtol=1e-12, atol=1e-15)


def test_exact_and_mc_together_give_one_propagation_each():
    step = fxcurv.compile(mlp(), nn.CrossEntropyLoss(), ["kfac", "kflr", "diag_ggn_mc",
                                                         "diag_ggn_exact"])
    # (no quantity reads the exact factor's columns: its C - 1 column form)
    assert len(calls_to(step, loss_rules.cross_entropy_sqrt_hessian_low_rank)) == 1
    assert len(calls_to(step, loss_rules.cross_entropy_sqrt_hessian)) == 0
    assert len(calls_to(step, loss_rules.cross_entropy_sqrt_hessian_mc)) == 1
    single = fxcurv.compile(mlp(), nn.CrossEntropyLoss(), ["kflr"])
    assert len(propagation(step, "exact")) == len(propagation(single, "exact"))


@pytest.mark.parametrize("loss_fn, helper", [
    (nn.MSELoss(), loss_rules.mse_sqrt_hessian_mc),
    (nn.BCEWithLogitsLoss(), loss_rules.bce_sqrt_hessian_mc)])
def test_one_draw_for_other_losses(loss_fn, helper):
    step = fxcurv.compile(mlp(), loss_fn, MC_TRIO + ["diag_ggn_mc_batch"], mc_samples=2)
    assert len(calls_to(step, helper)) == 1


# ------------------------------------------------------------------- (b) TorchScript
CASES = {"mlp": (mlp, mlp_batch), "cnn": (cnn, cnn_batch)}


@pytest.mark.parametrize("quantity", GGN)
@pytest.mark.parametrize("model_name", list(CASES))
def test_torchscript_round_trip(model_name, quantity, tmp_path):
    make_model, make_batch = CASES[model_name]
    model, (x, y) = make_model(), make_batch()
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), [quantity], mc_samples=2)
    scripted = torch.jit.script(step)
    path = tmp_path / f"{model_name}_{quantity}.pt"
    scripted.save(str(path))
    loaded = torch.jit.load(str(path))
    mc = quantity in ("diag_ggn_mc", "diag_ggn_mc_batch", "sqrt_ggn_mc", "kfac")
    for module, what in ((scripted, "scripted"), (loaded, "loaded")):
        torch.manual_seed(5)
        expected = step(x, y)
        torch.manual_seed(5)
        assert_same(module(x, y), expected, f"{model_name} {quantity} {what}", exact=False)
    x2, y2 = make_batch(5)                                  # sizes come from the graph
    torch.manual_seed(6)
    expected = step(x2, y2)
    torch.manual_seed(6)
    assert_same(loaded(x2, y2), expected, f"{model_name} {quantity} other batch", exact=False)
    if mc:
        first, second = flat(loaded(x, y)), flat(loaded(x, y))
        assert any(not torch.equal(a, b) for a, b in zip(first, second))


# ------------------------------------------------------- (c) nothing below the first op
class Preprocessed(nn.Module):
    """Non-parametric ops on the input before the first parameterised op."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.tanh(x * 2.0))))


class FrozenFirst(nn.Module):
    """A frozen first layer: no trainable parameter below ``trained``'s input."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(4, 5).requires_grad_(False)
        self.trained = nn.Linear(5, 3)

    def forward(self, x):
        return self.trained(torch.sigmoid(self.frozen(x)))


@pytest.mark.parametrize("quantities", [["diag_ggn_exact", "sqrt_ggn_exact", "kflr"],
                                        ["diag_ggn_mc", "sqrt_ggn_mc", "kfac"]])
def test_no_propagation_below_the_first_parameterised_op(quantities):
    kind = "exact" if quantities[0].endswith("exact") else "mc"
    step = fxcurv.compile(Preprocessed().to(DTYPE), nn.CrossEntropyLoss(), quantities,
                          column_chunk=None)
    names = [n.name for n in step.graph.nodes]
    for below in ("mul", "tanh", "x", "x_checked"):
        assert f"{below}_sqrt_ggn_{kind}" not in names
    assert f"linear_sqrt_ggn_{kind}" in names                  # fc1's output still gets one
    sources = {(n.meta.get("fxcurv") or {}).get("node") for n in step.graph.nodes
               if n.name in propagation(step, kind)}
    assert not sources & {"mul", "tanh", "x", "x_checked"}
    frozen = fxcurv.compile(FrozenFirst().to(DTYPE), nn.CrossEntropyLoss(), quantities,
                            column_chunk=None)
    assert propagation(frozen, kind) == []          # the factor stops at `trained`'s output
    assert f"sigmoid_sqrt_ggn_{kind}" not in frozen.code
    assert list(frozen(*mlp_batch())[2]) == ["trained.weight", "trained.bias"]


# ---------------------------------------------------------------------------- (d) errors
def half_sum_of_squares(out, y):
    return ((out - y) ** 2).sum() / 2


@pytest.mark.parametrize("quantity", [q for q in GGN if "mc" in q or q == "kfac"])
def test_monte_carlo_with_a_callable_loss_names_the_loss_node_and_quantity(quantity):
    """Sampling needs a likelihood: only built-in final losses define one."""
    with pytest.raises(fxcurv.CompileError) as info:
        fxcurv.compile(mlp(), half_sum_of_squares, [quantity])
    message = str(info.value)
    assert "node 'loss'" in message and "op truediv" in message
    assert f"'{quantity}'" in message and "likelihood" in message
    assert "cross_entropy" in message                           # what to use instead


@pytest.mark.parametrize("quantity", ["diag_ggn_mc_batch", "sqrt_ggn_mc", "diag_ggn_exact_batch"])
def test_batchnorm_train_names_the_node_and_quantity(quantity):
    """Quantities that need the samples apart (``Quantity.coupled`` False) are refused on a
    batch that BatchNorm couples; the message names the ones that are defined there."""
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).to(DTYPE)
    with pytest.raises(fxcurv.CompileError) as info:
        fxcurv.compile(model.train(), nn.CrossEntropyLoss(), [quantity])
    message = str(info.value)
    assert "node 'batch_norm'" in message and "BatchNorm1d" in message
    assert f"'{quantity}'" in message and "eval" in message
    assert "kfac, kflr" in message
    fxcurv.compile(model.eval(), nn.CrossEntropyLoss(), [quantity])  # eval mode is fine


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


def test_kronecker_factors_of_a_shared_parameter_by_the_expand_convention():
    """A layer applied twice: its uses count like positions of a sequence, ``G = G₁ + G₂``
    (each the output factor's Gram at that use) and ``A = (A₁ + A₂)/2``; bias ``[G₁ + G₂]``.
    Reference: the definition, with MSE's factor ``√2 e_c / √(N·C)`` and each use's
    per-sample Jacobian ``∂f_n/∂z_u`` from a zero probe added to that use's output."""
    torch.manual_seed(0)
    model, (x, _) = Shared().to(DTYPE), mlp_batch()
    y = torch.randn(x.size(0), 3, dtype=DTYPE)
    _, _, kflr = fxcurv.compile(model, nn.MSELoss(), ["kflr"])(x, y)
    w, b = model.shared.weight, model.shared.bias

    def forward(probes, xn):
        a1 = xn
        a2 = torch.tanh(a1 @ w.T + b + probes[0])
        return model.head(torch.tanh(a2 @ w.T + b + probes[1])), (a1, a2)

    grams, inputs = [torch.zeros(4, 4, dtype=DTYPE)] * 2, [torch.zeros(4, 4, dtype=DTYPE)] * 2
    zero = (torch.zeros(4, dtype=DTYPE),) * 2
    for xn in x:
        jac = torch.autograd.functional.jacobian(lambda *p: forward(p, xn)[0], zero)
        acts = forward(zero, xn)[1]
        for u in range(2):
            grams[u] = grams[u] + jac[u].T @ jac[u] * 2 / (x.size(0) * 3)
            inputs[u] = inputs[u] + torch.outer(acts[u], acts[u]).detach() / x.size(0)
    g_factor, a_factor = grams[0] + grams[1], (inputs[0] + inputs[1]) / 2
    torch.testing.assert_close(kflr["shared.weight"][0], g_factor)
    torch.testing.assert_close(kflr["shared.weight"][1], a_factor)
    torch.testing.assert_close(kflr["shared.bias"][0], g_factor)


@pytest.mark.parametrize("quantity", ["kflr", "kfac"])
def test_kronecker_factors_of_a_layer_norm_weight_are_its_ggn_block(quantity):
    """No Kronecker structure: ``[G]``, the parameter's (exact or sampled) GGN block, the same
    propagation's factor squared (brute force: ``tests/test_kron_blocks.py``)."""
    model, (x, y) = LayerNormNet().to(DTYPE), mlp_batch()
    factor = "sqrt_ggn_exact" if quantity == "kflr" else "sqrt_ggn_mc"
    kron, sqrt = fxcurv.compile(model, nn.CrossEntropyLoss(), [quantity, factor])(x, y)[2:]
    for name in ("norm.weight", "norm.bias"):
        s = sqrt[name].flatten(0, 1)
        assert len(kron[name]) == 1
        torch.testing.assert_close(kron[name][0], s.T @ s)
