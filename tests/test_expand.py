"""Ops without a rule: opaque helpers inlined, PyTorch's decompositions, ``x[index]``, and the
refusals (``x[mask]``, an op whose decomposition needs an op without a rule); stochastic depth
in train mode draws one mask per call."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxcurv
from fxcurv import CompileError

DTYPE = torch.float64


def scaled_tanh(x, scale: float):
    """A plain helper fx keeps as one node (``torch.fx.wrap``), with a Python branch on a
    constant argument."""
    if scale == 1.0:
        return torch.tanh(x)
    return torch.tanh(x) * scale


torch.fx.wrap("scaled_tanh")


class Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)
        self.table = nn.Parameter(torch.randn(5, 4))
        self.register_buffer("index", torch.tensor([1, 3, 1, 0]))

    def forward(self, x):
        bias = self.table[self.index].sum(0)            # advanced indexing of a parameter
        return self.fc2(F.mish(scaled_tanh(self.fc1(x), 0.5) + bias))   # mish: decomposition


def _brute_force(model, x, y):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xn, yn):
        return F.cross_entropy(torch.func.functional_call(model, p, (xn[None],)), yn[None])

    return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)


def test_opaque_helper_decomposition_and_tensor_index_give_exact_quantities():
    torch.manual_seed(0)
    model = Wrapped().to(DTYPE)
    x, y = torch.randn(4, 3, dtype=DTYPE), torch.tensor([0, 1, 1, 0])
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), ["batch_grad", "diag_h"])
    assert "scaled_tanh(" not in step.code and "scaled_tanh_mul" in step.code  # inlined
    assert "wrap(" not in step.code  # no torch.fx.wrap registration of the inlined ops
    assert "mish_mul = " in step.code  # decomposed, named after the node it replaces
    loss, grad, batch_grad, diag_h = step(x, y)
    for name, g in _brute_force(model, x, y).items():
        torch.testing.assert_close(batch_grad[name], g / 4, rtol=1e-10, atol=1e-12)
    params = dict(model.named_parameters())
    for name in ("fc1.bias", "table"):
        def f(p, name=name):
            return F.cross_entropy(torch.func.functional_call(model, {**params, name: p}, (x,)), y)
        hessian = torch.func.hessian(f)(params[name].detach())
        n = params[name].numel()
        torch.testing.assert_close(diag_h[name], hessian.reshape(n, n).diagonal().view_as(
            params[name]), rtol=1e-9, atol=1e-12)


class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        h = self.fc(x)
        return h[h > 0].sum() + h


def test_boolean_mask_index_is_refused_at_compile_time():
    with pytest.raises(CompileError, match=r"node 'getitem'.*boolean mask.*torch.where"):
        fxcurv.compile(Masked(), nn.MSELoss())


class Depth(nn.Module):
    def __init__(self):
        super().__init__()
        from torchvision.ops import StochasticDepth
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)
        self.drop = StochasticDepth(0.5, "row")

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h + self.drop(torch.tanh(h)))


def test_stochastic_depth_draws_one_mask_per_call():
    """Train mode: each sample's residual branch is dropped or scaled by 2; the loss and every
    per-sample gradient are those of the model with that mask (found by trying both)."""
    torch.manual_seed(1)
    model = Depth().to(DTYPE)
    x, y = torch.randn(6, 3, dtype=DTYPE), torch.randint(0, 2, (6,))
    step = fxcurv.compile(model, nn.CrossEntropyLoss(reduction="sum"), ["batch_grad"])
    loss, _, batch_grad = step(x, y)
    params = {k: v.detach() for k, v in model.named_parameters()}
    kept = 0
    for n in range(6):
        candidates = []
        for scale in (0.0, 2.0):
            def loss_n(p, scale=scale):
                h = F.linear(x[n:n + 1], p["fc1.weight"], p["fc1.bias"])
                out = F.linear(h + scale * torch.tanh(h), p["fc2.weight"], p["fc2.bias"])
                return F.cross_entropy(out, y[n:n + 1], reduction="sum")
            candidates.append(torch.func.grad(loss_n)(params))
        match = [all(torch.allclose(batch_grad[k][n], c[k], rtol=1e-10, atol=1e-12) for k in c)
                 for c in candidates]
        assert sum(match) == 1, f"sample {n}: not one of the two masks"
        kept += match[1]
    assert 0 < kept < 6  # with 6 samples at p = 0.5 both happen for this seed
    model.eval()
    eval_step = fxcurv.compile(model, nn.CrossEntropyLoss(reduction="sum"))
    torch.testing.assert_close(eval_step(x, y)[0], F.cross_entropy(model(x), y,
                                                                   reduction="sum").detach())


class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(2, 4, 3), nn.Linear(16, 3)
        self.gn, self.inorm = nn.GroupNorm(2, 4), nn.InstanceNorm2d(4, affine=True)

    def forward(self, x):
        h = torch.tanh(self.gn(self.conv(x)))
        return self.fc(torch.tanh(self.inorm(h)).flatten(1))


def test_group_and_instance_norm_give_the_exact_hessian_diagonal():
    torch.manual_seed(4)
    model = GroupNormNet().to(DTYPE)
    for m in (model.gn, model.inorm):
        nn.init.normal_(m.weight)
    x, y = torch.randn(3, 2, 4, 4, dtype=DTYPE), torch.tensor([0, 2, 1])
    loss, grad, diag_h = fxcurv.compile(model, nn.CrossEntropyLoss(), ["diag_h"])(x, y)
    params = dict(model.named_parameters())
    for name in ("gn.weight", "gn.bias", "inorm.weight", "conv.bias"):
        def f(p, name=name):
            return F.cross_entropy(torch.func.functional_call(model, {**params, name: p}, (x,)), y)
        n = params[name].numel()
        hessian = torch.func.hessian(f)(params[name].detach()).reshape(n, n)
        torch.testing.assert_close(diag_h[name], hessian.diagonal().view_as(params[name]),
                                   rtol=1e-9, atol=1e-12, msg=name)
