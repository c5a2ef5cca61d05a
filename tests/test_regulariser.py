"""A regulariser added to the loss, ``L = c·D(θ, x) + R(θ)``: curvature quantities include
``∇²R`` exactly (``passes/curvature/regulariser.py``), per-sample quantities and Kronecker
factors are refused with an error naming the node and the user's line.

References in float64 with torch.func: ``diag_h`` / ``hmp`` against the Hessian of the whole
loss; ``diag_ggn_exact`` / ``ggnmp`` against ``JᵀHJ`` of the data term (``H`` the Hessian of
the data loss w.r.t. the model output) plus the Hessian of ``R``; ``pchmp_*`` and the exact
part of ``diag_ggn_mc`` by the difference to the same loss without ``R``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxcurv

DTYPE = torch.float64
TOL = dict(rtol=1e-9, atol=1e-11)


class Tied(nn.Module):
    """An MLP whose first weight is used on two branches: a shared parameter."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4, dtype=DTYPE))
        self.b = nn.Parameter(torch.randn(3, dtype=DTYPE))
        self.out = nn.Linear(3, 4).to(DTYPE)

    def forward(self, x):
        h = torch.tanh(F.linear(x, self.w, self.b)) + torch.sigmoid(F.linear(2 * x, self.w))
        return self.out(h)


def mlp():
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 4)).to(DTYPE)


class WithPrior(nn.Module):
    """An MLP and a parameter the model does not use (only the loss's prior term does)."""

    def __init__(self):
        super().__init__()
        self.net = mlp()
        self.extra = nn.Parameter(torch.randn(3, dtype=DTYPE))

    def forward(self, x):
        return self.net(x)


ANCHOR = torch.linspace(-1, 1, 12, dtype=DTYPE).reshape(3, 4)


class Params:
    """``p["0.weight"]``: the model's parameter read as an attribute at call time (inside
    the trace this gives the parameter's graph node)."""

    def __init__(self, model):
        self.model = model

    def __getitem__(self, name):
        value = self.model
        for atom in name.split("."):
            value = getattr(value, atom)
        return value

    def values(self):
        return self.model.parameters()   # plain tensors: the tracer maps them to the graph


# name -> (model, scale of the data term, regulariser R(p))
CASES = {
    "l2_one_weight": (mlp, 1.0, lambda p: 0.1 * (p["0.weight"] ** 2).sum()),
    "l2_all_params": (mlp, 1.0, lambda p: 0.05 * sum((v ** 2).sum() for v in p.values())),
    "concatenated_params": (mlp, 1.0, lambda p: 0.1 * torch.sqrt(
        torch.cat([v.reshape(-1) for v in p.values()]) ** 2 + 0.1).sum()),
    "scaled_loss": (mlp, 2.0, lambda p: 0.1 * (p["2.weight"] ** 2).sum()),
    "mean_weight_decay": (mlp, 1.0, lambda p: (p["0.weight"] ** 2).mean() / 2),
    "smooth_l1": (mlp, 1.0, lambda p: 0.1 * torch.sqrt(p["0.weight"] ** 2 + 1e-2).sum()),
    "product_and_transpose": (mlp, 1.0, lambda p: 0.3 * (p["2.bias"] * p["2.bias"]).sum()
                              + torch.exp(p["0.weight"].t() / 2).sum()),
    "anchor_and_prior": (WithPrior, 1.0, lambda p: ((p["net.0.weight"] - ANCHOR) ** 2).sum()
                         + torch.exp(p["extra"]).sum()
                         + 0.5 * torch.tanh(p["extra"] * p["net.0.bias"]).sum()),
    "shared_parameter": (Tied, 1.0, lambda p: 0.2 * (p["w"] ** 2).sum()
                         + 0.1 * (p["b"] ** 4).sum()),
}


def setup(case: str):
    torch.manual_seed(0)
    make, scale, reg = CASES[case]
    model = make()
    x, y = torch.randn(5, 4, dtype=DTYPE), torch.randint(0, 4, (5,))
    p = Params(model)

    def loss_fn(out, target):
        return scale * F.cross_entropy(out, target) + reg(p)

    return model, loss_fn, (x, y), scale, reg


def references(model, scale, reg, x, y):
    """``(Hessian blocks of L, GGN blocks of the data term + ∇²R)``, each ``[P, P]``."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def output(q):
        return torch.func.functional_call(model, q, (x,))

    def full(q):
        return scale * F.cross_entropy(output(q), y) + reg(q)

    hessian = torch.func.hessian(full)(params)
    reg_hessian = torch.func.hessian(reg)(params)
    jac = torch.func.jacrev(output)(params)
    out = output(params)
    h_out = torch.func.hessian(lambda o: scale * F.cross_entropy(o, y))(out)
    h_out = h_out.reshape(out.numel(), out.numel())
    blocks, ggn = {}, {}
    for k, v in params.items():
        j = jac[k].reshape(out.numel(), v.numel())
        blocks[k] = hessian[k][k].reshape(v.numel(), v.numel())
        ggn[k] = j.t() @ h_out @ j + reg_hessian[k][k].reshape(v.numel(), v.numel())
    return blocks, ggn


def vectors_for(model):
    g = torch.Generator().manual_seed(3)
    return {k: torch.randn(2, *v.shape, dtype=DTYPE, generator=g)
            for k, v in model.named_parameters()}


@pytest.mark.parametrize("case", list(CASES))
def test_hessian_and_ggn_include_the_regulariser(case, one_thread):
    model, loss_fn, (x, y), scale, reg = setup(case)
    vectors = vectors_for(model)
    step = fxcurv.compile(model, loss_fn, ["diag_h", "hmp", "diag_ggn_exact", "ggnmp"])
    loss, grad, diag_h, hmp, diag_ggn, ggnmp = step(x, y, vectors)
    hessian, ggn = references(model, scale, reg, x, y)
    for name, v in vectors.items():
        flat = v.flatten(1)
        torch.testing.assert_close(diag_h[name].flatten(), hessian[name].diagonal(), **TOL)
        torch.testing.assert_close(hmp[name].flatten(1), flat @ hessian[name], **TOL)
        torch.testing.assert_close(diag_ggn[name].flatten(), ggn[name].diagonal(), **TOL)
        torch.testing.assert_close(ggnmp[name].flatten(1), flat @ ggn[name], **TOL)


def regulariser_diagonal(model, reg):
    params = {k: v.detach() for k, v in model.named_parameters()}
    hessian = torch.func.hessian(reg)(params)
    return {k: hessian[k][k].reshape(v.numel(), v.numel()).diagonal().reshape(v.shape)
            for k, v in params.items()}


@pytest.mark.parametrize("case", ["smooth_l1", "shared_parameter"])
def test_positive_curvature_adds_abs_or_clipped_regulariser(case, one_thread):
    model, loss_fn, (x, y), scale, reg = setup(case)
    vectors = vectors_for(model)
    quantities = ["pchmp_abs", "pchmp_clip"]
    with_reg = fxcurv.compile(model, loss_fn, quantities)(x, y, vectors)
    data_only = fxcurv.compile(model, lambda out, t: scale * F.cross_entropy(out, t),
                               quantities)(x, y, vectors)
    diagonal = regulariser_diagonal(model, reg)
    for i, modify in ((2, torch.abs), (3, lambda d: d.clamp(min=0))):
        for name, v in vectors.items():
            torch.testing.assert_close(with_reg[i][name] - data_only[i][name],
                                       modify(diagonal[name]) * v, **TOL)


def test_monte_carlo_ggn_adds_the_exact_regulariser(one_thread):
    model, loss_fn, (x, y), scale, reg = setup("scaled_loss")
    torch.manual_seed(7)
    with_reg = fxcurv.compile(model, loss_fn, ["diag_ggn_mc"], mc_samples=3)(x, y)[2]
    torch.manual_seed(7)
    plain = fxcurv.compile(model, nn.CrossEntropyLoss(), ["diag_ggn_mc"], mc_samples=3)(x, y)[2]
    diagonal = regulariser_diagonal(model, reg)
    for name in plain:   # the same draws: 2·ce samples √2·S
        torch.testing.assert_close(with_reg[name], scale * plain[name] + diagonal[name], **TOL)
    many = fxcurv.compile(model, loss_fn, ["diag_ggn_mc"], mc_samples=4000)(x, y)[2]
    exact = fxcurv.compile(model, loss_fn, ["diag_ggn_exact"])(x, y)[2]
    for name in exact:
        assert ((many[name] - exact[name]).norm() / exact[name].norm()) < 0.05


@pytest.mark.parametrize("case", ["smooth_l1", "anchor_and_prior"])
def test_torchscript_and_gradient(case, one_thread):
    model, loss_fn, (x, y), _, _ = setup(case)
    step = fxcurv.compile(model, loss_fn, ["diag_h", "ggnmp"])
    vectors = vectors_for(model)
    eager = step(x, y, vectors)
    scripted = torch.jit.script(step)(x, y, vectors)
    for a, b in zip(eager[1:], scripted[1:]):
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-12, atol=0)
    loss_fn(model(x), y).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(eager[1][name], p.grad, **TOL)


@pytest.mark.parametrize("quantity,reason", [
    ("batch_grad", "not a sum of per-sample terms"),
    ("sum_grad_squared", "not a sum of per-sample terms"),
    ("diag_h_batch", "not a sum of per-sample terms"),
    ("sqrt_ggn_exact", "not a sum of per-sample terms"),
    ("kflr", "not a Kronecker product"),
    ("kfra", "not a Kronecker product"),
])
def test_per_sample_and_kronecker_quantities_are_refused(quantity, reason):
    model, loss_fn, _, _, _ = setup("l2_one_weight")
    with pytest.raises(fxcurv.CompileError) as info:
        fxcurv.compile(model, loss_fn, ["diag_h", quantity])
    message = str(info.value)
    assert "node 'mul" in message and f"quantity '{quantity}'" in message, message
    assert "test_regulariser.py" in message and '"l2_one_weight": (mlp' in message, message
    assert "regulariser" in message and reason in message, message


def test_captured_parameter_is_traced_not_frozen(one_thread):
    model, (x, y) = mlp(), (torch.randn(5, 4, dtype=DTYPE), torch.randint(0, 4, (5,)))
    weight = model[0].weight            # captured before compile: still read live

    def loss_fn(out, target):
        return F.cross_entropy(out, target) + 0.1 * (weight ** 2).sum()

    step = fxcurv.compile(model, loss_fn, ["diag_ggn_exact"])
    with torch.no_grad():
        weight.mul_(2.0)
    loss, grad, _ = step(x, y)
    expected = loss_fn(model(x), y)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), **TOL)
    torch.testing.assert_close(grad["0.weight"], weight.grad, **TOL)


def _refused(reg, quantity="diag_h"):
    model = mlp()
    p = Params(model)
    with pytest.raises(fxcurv.CompileError) as info:
        fxcurv.compile(model, lambda out, t: F.cross_entropy(out, t) + reg(p), [quantity])
    return str(info.value)


def test_non_diagonal_regulariser_is_refused():
    message = _refused(lambda p: p["0.weight"].sum() ** 2)   # a reduction, then curvature
    assert "node 'sum" in message and "not diagonal" in message, message
    assert "test_regulariser.py" in message and "quantity 'diag_h'" in message, message
    message = _refused(lambda p: (p["0.weight"] * torch.exp(p["0.weight"])).sum())
    assert "not diagonal" in message and "share parameters" in message, message
    message = _refused(lambda p: (torch.stack([p["0.bias"], 2 * p["0.bias"]]) ** 3).sum())
    assert "node 'stack" in message and "pieces share parameters" in message, message


def test_broadcast_before_a_non_linear_op_fails_at_call_time():
    model = mlp()
    x, y = torch.randn(5, 4, dtype=DTYPE), torch.randint(0, 4, (5,))

    def loss_fn(out, target):
        tiled = model[2].bias.unsqueeze(0) * torch.ones(2, 4, dtype=DTYPE)
        return F.cross_entropy(out, target) + torch.sqrt(tiled ** 2 + 1).sum()

    step = fxcurv.compile(model, loss_fn, ["diag_h"])
    with pytest.raises(ValueError, match="broadcasts a parameter value"):
        step(x, y)


def test_non_additive_regulariser_is_refused():
    model = mlp()
    with pytest.raises(fxcurv.CompileError, match="not additive in the regulariser"):
        fxcurv.compile(model, lambda out, t: torch.log(
            F.cross_entropy(out, t) + (model[0].weight ** 2).sum()), ["diag_ggn_exact"])
