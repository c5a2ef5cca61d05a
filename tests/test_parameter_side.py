"""Parameters used through parameter-only ops before they meet the data (a transposed tied
weight, a reshaped bias, ``exp(log_scale)``): per-sample terms are carried back through those
ops by their Jacobian-transpose rules, the sample axis as one more leading axis. Checked
against torch.func in float64; a parameter that reaches the loss outside the per-sample part
of the model (a regulariser) gets a clear error for per-sample quantities and Kronecker
factors (its curvature is added to the curvature quantities: tests/test_regulariser.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxcurv

DTYPE = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


class ParameterSide(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = nn.Parameter(torch.randn(5, 4, dtype=DTYPE, generator=g))
        self.b = nn.Parameter(torch.randn(2, dtype=DTYPE, generator=g))
        self.log_scale = nn.Parameter(torch.randn(5, dtype=DTYPE, generator=g))

    def forward(self, x):
        h = F.linear(x, self.emb.t())                         # transposed weight
        h = h.view(h.size(0), 2, 2) + self.b.view(1, 2, 1)    # reshaped bias
        h = torch.tanh(h.flatten(1))
        return F.linear(h, self.emb) * torch.exp(self.log_scale)  # tied weight, scale


def batch(n=6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, dtype=DTYPE, generator=g), torch.randint(0, 5, (n,), generator=g)


def per_sample_grads(model, x, y):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_n(p, xn, yn):
        return F.cross_entropy(torch.func.functional_call(model, p, (xn[None],)), yn[None])

    grads = torch.func.vmap(torch.func.grad(loss_n), in_dims=(None, 0, 0))(params, x, y)
    return {k: v / x.size(0) for k, v in grads.items()}   # mean reduction


def ggn_diagonal(model, x, y):
    params = {k: v.detach() for k, v in model.named_parameters()}
    out = model(x).detach()
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(model, p, (x,)))(params)
    hess = torch.func.hessian(lambda o: F.cross_entropy(o, y))(out)
    n, c = out.shape
    return {k: sum(torch.einsum("ci,cd,di->i", jac[k].reshape(n, c, -1)[i], hess[i, :, i, :],
                                jac[k].reshape(n, c, -1)[i]) for i in range(n)).reshape(p.shape)
            for k, p in params.items()}


def test_first_order_through_parameter_side_ops():
    model, (x, y) = ParameterSide(), batch()
    step = fxcurv.compile(model, nn.CrossEntropyLoss(),
                          ["batch_grad", "batch_l2", "sum_grad_squared", "variance"])
    _, grad, batch_grad, l2, sgs, variance = step(x, y)
    expected = per_sample_grads(model, x, y)
    for name, g in expected.items():
        torch.testing.assert_close(batch_grad[name], g, **TOL)
        torch.testing.assert_close(l2[name], g.flatten(1).square().sum(1), **TOL)
        torch.testing.assert_close(sgs[name], g.square().sum(0), **TOL)
        torch.testing.assert_close(variance[name], g.square().mean(0) - g.mean(0).square(),
                                   **TOL)
        torch.testing.assert_close(batch_grad[name].sum(0), grad[name], **TOL)


def test_ggn_through_parameter_side_ops_and_torchscript():
    model, (x, y) = ParameterSide(), batch()
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), ["diag_ggn_exact",
                                                         "diag_ggn_exact_batch"])
    _, _, diag, diag_batch = step(x, y)
    for name, expected in ggn_diagonal(model, x, y).items():
        torch.testing.assert_close(diag[name], expected, **TOL)
        torch.testing.assert_close(diag_batch[name].sum(0), expected, **TOL)
    scripted = torch.jit.script(step)(x, y)
    for name in diag:
        torch.testing.assert_close(scripted[2][name], diag[name], rtol=1e-12, atol=0)


def test_kronecker_factors_without_a_direct_use_are_ggn_blocks():
    """Transposed, reshaped and tied parameters have no Kronecker structure: ``[G]``, their
    GGN block (diagonal against brute force; full blocks in ``test_kron_blocks.py``)."""
    model, (x, y) = ParameterSide(), batch()
    kflr = fxcurv.compile(model, nn.CrossEntropyLoss(), ["kflr"])(x, y)[2]
    for name, expected in ggn_diagonal(model, x, y).items():
        assert len(kflr[name]) == 1 and kflr[name][0].shape == (expected.numel(),) * 2
        torch.testing.assert_close(kflr[name][0].diagonal(), expected.reshape(-1), **TOL)


@pytest.mark.parametrize("quantity,reason", [
    ("batch_grad", "not a sum of per-sample terms"), ("variance", "not a sum of per-sample "
                                                      "terms"), ("kfra", "not a Kronecker")])
def test_regulariser_in_the_loss_has_no_per_sample_terms(quantity, reason):
    model = ParameterSide()

    def regularised(out, y):
        return F.cross_entropy(out, y) + 0.1 * (model.emb ** 2).sum()

    with pytest.raises(fxcurv.CompileError, match=f"quantity '{quantity}'.*after the "
                                                  f"per-sample part of the model.*{reason}"):
        fxcurv.compile(model, regularised, [quantity])


def test_regulariser_on_a_tied_weight_adds_its_hessian():
    model, (x, y) = ParameterSide(), batch()
    plain = fxcurv.compile(model, nn.CrossEntropyLoss(), ["diag_ggn_exact"])(x, y)[2]

    def regularised(out, target):
        return F.cross_entropy(out, target) + 0.1 * (model.emb ** 2).sum()

    diag = fxcurv.compile(model, regularised, ["diag_ggn_exact"])(x, y)[2]
    for name, value in plain.items():
        extra = 0.2 if name == "emb" else 0.0
        torch.testing.assert_close(diag[name], value + extra, **TOL)


def test_regulariser_gradient_is_included():
    model, (x, y) = ParameterSide(), batch()

    def regularised(out, target):
        return F.cross_entropy(out, target) + 0.1 * (model.emb ** 2).sum()

    _, grad = fxcurv.compile(model, regularised)(x, y)
    regularised(model(x), y).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grad[name], p.grad, **TOL)


class CatBias(nn.Module):
    """A bias assembled by ``cat`` from a parameter and pieces of it (as Swin V2's q/k/v bias
    with its k part zeroed)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(6, 5, dtype=DTYPE, generator=g))
        self.b = nn.Parameter(torch.randn(3, dtype=DTYPE, generator=g))

    def forward(self, x):
        bias = torch.cat([self.b, self.b[1:] * 0.0, 2.0 * self.b[:1]])
        return torch.tanh(F.linear(x, self.weight, bias))[:, :5]


def test_per_sample_terms_through_a_parameter_side_cat():
    model, (x, y) = CatBias(), batch()
    _, _, batch_grad, l2 = fxcurv.compile(model, nn.CrossEntropyLoss(),
                                          ["batch_grad", "batch_l2"])(x, y)
    for name, g in per_sample_grads(model, x, y).items():
        torch.testing.assert_close(batch_grad[name], g, **TOL)
        torch.testing.assert_close(l2[name], g.flatten(1).square().sum(1), **TOL)
