"""Exact GGN-family quantities and the Hessian with losses written as plain callables and with
post-loss arithmetic: the loss Hessian is assembled from second-order sources in the loss
region and factorised per sample. Compared with torch.func brute force in float64."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxcurv

DTYPE = torch.float64
TOL = dict(rtol=1e-8, atol=1e-11)


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)


def batch(n=4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, dtype=DTYPE, generator=g), torch.randint(0, 3, (n,), generator=g)


LOSSES = {
    "half_sum_of_squares": lambda out, y: ((out - F.one_hot(y, 3).to(DTYPE)) ** 2).sum() / 2,
    "scaled_cross_entropy": lambda out, y: 2.0 * F.cross_entropy(out, y),
    "ce_plus_output_penalty": lambda out, y: F.cross_entropy(out, y) + 0.5 * (out ** 2).mean(),
    "softplus_margin": lambda out, y: F.softplus(
        1.0 - (out * F.one_hot(y, 3).to(DTYPE)).sum(1)).mean(),
    "log_cosh": lambda out, y: torch.log(torch.exp(out) + torch.exp(-out)).sum(),
    "label_smoothed_gather": lambda out, y: label_smoothed(out, y),
}


def label_smoothed(out, y, smoothing: float = 0.1):
    """Label-smoothed cross-entropy written by hand: ``log_softmax`` and ``gather`` of the
    labels' log-probabilities (issue 16)."""
    logp = out.log_softmax(1)
    nll = -logp.gather(1, y.unsqueeze(1)).squeeze(1)
    return ((1 - smoothing) * nll - smoothing * logp.mean(1)).mean()


@pytest.mark.parametrize("loss", list(LOSSES))
def test_loss_and_grad_with_callable_losses(loss):
    net, (x, y) = model(), batch()
    value, grad = fxcurv.compile(net, LOSSES[loss], [])(x, y)
    expected = LOSSES[loss](net(x), y)
    grads = torch.autograd.grad(expected, list(net.parameters()))
    torch.testing.assert_close(value, expected.detach(), rtol=1e-12, atol=0)
    for (name, _), g in zip(net.named_parameters(), grads):
        torch.testing.assert_close(grad[name], g, **TOL, msg=name)


def test_label_smoothed_gather_equals_the_builtin_label_smoothing():
    net, (x, y) = model(), batch()
    ours = fxcurv.compile(net, LOSSES["label_smoothed_gather"], ["diag_ggn_exact", "diag_h"])
    builtin = fxcurv.compile(net, nn.CrossEntropyLoss(label_smoothing=0.1),
                             ["diag_ggn_exact", "diag_h"])
    for a, b in zip(ours(x, y)[1:], builtin(x, y)[1:]):
        for name in a:
            torch.testing.assert_close(a[name], b[name], **TOL, msg=name)


def ggn_diagonal_brute_force(net, loss_fn, x, y):
    """diag(Σ_n J_nᵀ H_n J_n) from torch.func: H the loss Hessian w.r.t. the output (block
    diagonal over samples for these losses), H projected onto PSD per sample."""
    params = dict(net.named_parameters())
    out = net(x)
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(net, p, (x,)))(params)
    hess = torch.func.jacrev(torch.func.jacrev(lambda o: loss_fn(o, y)))(out)
    n, c = out.shape
    result = {}
    for name, p in params.items():
        j = jac[name].reshape(n, c, -1)
        total = 0
        for i in range(n):
            block = hess[i, :, i, :]
            values, vectors = torch.linalg.eigh(block)
            block = vectors @ torch.diag(values.clamp(min=0)) @ vectors.T
            total = total + torch.einsum("ci,cd,di->i", j[i], block, j[i])
        result[name] = total.reshape(p.shape)
    return result


@pytest.mark.parametrize("loss", list(LOSSES))
def test_diag_ggn_exact_with_callable_losses(loss):
    net, x_y = model(), batch()
    _, _, diag, sqrt = fxcurv.compile(net, LOSSES[loss], ["diag_ggn_exact", "sqrt_ggn_exact"])(
        *x_y)
    expected = ggn_diagonal_brute_force(net, LOSSES[loss], *x_y)
    for name in expected:
        torch.testing.assert_close(diag[name], expected[name], **TOL, msg=name)
        torch.testing.assert_close(sqrt[name].square().sum([0, 1]), diag[name], **TOL)


@pytest.mark.parametrize("loss", ["half_sum_of_squares", "scaled_cross_entropy",
                                  "ce_plus_output_penalty", "label_smoothed_gather"])
def test_diag_h_with_callable_losses(loss):
    net, (x, y) = model(), batch()
    _, _, diag_h = fxcurv.compile(net, LOSSES[loss], ["diag_h"])(x, y)
    for name, p in net.named_parameters():
        def of_param(value, name=name):
            params = {**dict(net.named_parameters()), name: value}
            return LOSSES[loss](torch.func.functional_call(net, params, (x,)), y)
        hessian = torch.func.hessian(of_param)(p.detach()).reshape(p.numel(), p.numel())
        torch.testing.assert_close(diag_h[name], hessian.diagonal().reshape(p.shape), **TOL)


def test_scaled_cross_entropy_scales_the_builtin_quantities():
    net, x_y = model(), batch()
    plain = fxcurv.compile(net, nn.CrossEntropyLoss(), ["diag_ggn_exact", "kflr"])(*x_y)
    scaled = fxcurv.compile(net, LOSSES["scaled_cross_entropy"], ["diag_ggn_exact", "kflr"])(
        *x_y)
    for name in plain[2]:
        torch.testing.assert_close(scaled[2][name], 2.0 * plain[2][name], **TOL)
        torch.testing.assert_close(scaled[3][name][0], 2.0 * plain[3][name][0], **TOL)


def test_callable_loss_step_scripts():
    net, x_y = model(), batch()
    step = fxcurv.compile(net, LOSSES["log_cosh"], ["diag_ggn_exact", "kfra"])
    eager, scripted = step(*x_y), torch.jit.script(step)(*x_y)
    for name in eager[2]:
        torch.testing.assert_close(scripted[2][name], eager[2][name], rtol=1e-12, atol=0)


def test_loss_that_couples_samples_is_refused():
    def coupled(out, y):
        return out.sum() ** 2

    with pytest.raises(fxcurv.CompileError, match="reduction over the samples"):
        fxcurv.compile(model(), coupled, ["diag_ggn_exact"])


def test_cross_terms_of_dense_ops_in_the_loss_are_refused():
    with pytest.raises(fxcurv.CompileError, match="cross second derivatives"):
        fxcurv.compile(model(), lambda out, y: torch.einsum("ni,ni->n", out, out).sum(),
                       ["diag_ggn_exact"])


@pytest.mark.parametrize("loss_fn", [
    lambda out, y: (out * out).sum(),
    lambda out, y: (out[:, :2] * torch.sigmoid(out[:, 1:])).sum(),
    lambda out, y: ((out[:, :2] - 1) ** 2 / torch.exp(out[:, 2:])).mean()])
def test_elementwise_cross_terms_in_the_loss(loss_fn):
    """Products and quotients of two values that both depend on the output (before:
    refused): their cross second derivatives enter the assembled loss Hessian."""
    net, (x, y) = model(), batch()
    _, _, diag, diag_h = fxcurv.compile(net, loss_fn, ["diag_ggn_exact", "diag_h"])(x, y)
    ggn = ggn_diagonal_brute_force(net, loss_fn, x, y)
    for name, p in net.named_parameters():
        torch.testing.assert_close(diag[name], ggn[name], **TOL, msg=name)

        def of_param(value, name=name):
            return loss_fn(torch.func.functional_call(
                net, {**dict(net.named_parameters()), name: value}, (x,)), y)
        full = torch.func.hessian(of_param)(p.detach()).reshape(p.numel(), p.numel())
        torch.testing.assert_close(diag_h[name], full.diagonal().reshape(p.shape), **TOL)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("options", [{"weight": True}, {"ignore": True},
                                     {"weight": True, "ignore": True}])
def test_cross_entropy_with_class_weights_and_ignored_targets(options, reduction):
    """The Hessian factor carries √w_y per position (0 where ignored) and the gradient's
    mean divisor Σ w_y: diag_ggn_exact and diag_h equal brute force."""
    net, (x, y) = model(), batch(5)
    weight = torch.tensor([0.5, 2.0, 1.5], dtype=DTYPE) if options.get("weight") else None
    if options.get("ignore"):
        y = y.clone()
        y[1] = -100
    loss_fn = nn.CrossEntropyLoss(weight=weight, reduction=reduction)
    _, _, diag, diag_h = fxcurv.compile(net, loss_fn, ["diag_ggn_exact", "diag_h"])(x, y)
    expected = ggn_diagonal_brute_force(net, loss_fn, x, y)
    for name, p in net.named_parameters():
        torch.testing.assert_close(diag[name], expected[name], **TOL)

        def of_param(value, name=name):
            params = {**dict(net.named_parameters()), name: value}
            return loss_fn(torch.func.functional_call(net, params, (x,)), y)

        hessian = torch.func.hessian(of_param)(p.detach()).reshape(p.numel(), p.numel())
        torch.testing.assert_close(diag_h[name], hessian.diagonal().reshape(p.shape), **TOL)


def test_cross_entropy_with_weights_and_label_smoothing_is_refused():
    loss_fn = nn.CrossEntropyLoss(weight=torch.ones(3, dtype=DTYPE), label_smoothing=0.1)
    with pytest.raises(fxcurv.CompileError, match="class weights and label smoothing"):
        fxcurv.compile(model(), loss_fn)


def test_hessian_of_a_non_convex_loss_keeps_its_negative_curvature():
    """The GGN uses the loss Hessian's positive part; diag_h and hmp subtract the negative
    part too, so they stay the exact Hessian for a non-convex loss."""
    net, (x, y) = model(), batch()

    def non_convex(out, target):
        return F.cross_entropy(out, target) - 0.3 * (out ** 2).mean()

    vectors = {n: torch.randn(2, *p.shape, dtype=DTYPE) for n, p in net.named_parameters()}
    _, _, diag_h, hmp = fxcurv.compile(net, non_convex, ["diag_h", "hmp"])(x, y, vectors)
    for name, p in net.named_parameters():
        def of_param(value, name=name):
            params = {**dict(net.named_parameters()), name: value}
            return non_convex(torch.func.functional_call(net, params, (x,)), y)

        hessian = torch.func.hessian(of_param)(p.detach()).reshape(p.numel(), p.numel())
        torch.testing.assert_close(diag_h[name], hessian.diagonal().reshape(p.shape), **TOL)
        torch.testing.assert_close(hmp[name].flatten(1), vectors[name].flatten(1) @ hessian,
                                   **TOL)


@pytest.mark.parametrize("divisor", ["shape", "size", "numel"])
def test_sizes_of_the_output_are_constants_in_the_loss(divisor):
    """``/ out.shape[0]`` (or ``out.size(0)``, ``out.numel()``) divides by a number: the loss
    Hessian is that of a sum of per-sample terms (issue 16)."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
                                torch.nn.Linear(4, 2)).double()
    size = {"shape": lambda o: o.shape[0], "size": lambda o: o.size(0),
            "numel": lambda o: o.numel()}[divisor]

    def loss_fn(out, y):
        return ((out - y) ** 2).sum() / size(out)

    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    step = fxcurv.compile(model, loss_fn, ["diag_ggn_exact", "diag_h"])
    _, _, diag_ggn, diag_h = step(x, y)
    params = dict(model.named_parameters())
    scale = 2.0 / size(torch.empty(5, 2))
    for name, p in params.items():
        def out_of(q, name=name):
            return torch.func.functional_call(model, {**params, name: q}, (x,))
        jac = torch.func.jacrev(out_of)(p.detach()).reshape(10, -1)
        torch.testing.assert_close(diag_ggn[name].reshape(-1), scale * jac.square().sum(0),
                                   rtol=1e-10, atol=1e-12)

        def loss_of(q, name=name):
            return loss_fn(out_of(q), y)
        hessian = torch.func.hessian(loss_of)(p.detach()).reshape(p.numel(), p.numel())
        torch.testing.assert_close(diag_h[name].reshape(-1), hessian.diagonal(), rtol=1e-9,
                                   atol=1e-12)


# -- losses and activations lowered to ruled ops (PyTorch's own modules) ----------------------
REGRESSION = {"huber": nn.HuberLoss(delta=0.6), "smooth_l1": nn.SmoothL1Loss(beta=0.4),
              "smooth_l1_sum": nn.SmoothL1Loss(reduction="sum", beta=0.8),
              "huber_sum": nn.HuberLoss(reduction="sum")}


def lowered_model():
    """PReLU (per channel), GLU and Softmin: modules whose ops are lowered to ruled ones."""
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(4, 6), nn.PReLU(6), nn.Linear(6, 6), nn.GLU(),
                         nn.Linear(3, 3), nn.Softmin(dim=1), nn.Linear(3, 3)).to(DTYPE)


@pytest.mark.parametrize("loss", list(REGRESSION))
def test_lowered_losses_and_activations_against_brute_force(loss):
    """Gradient, exact GGN diagonal and Hessian diagonal of a model with PReLU, GLU and
    Softmin under Huber and smooth-L1 losses (before: refused, no rule), by torch.func."""
    net, (x, _) = lowered_model(), batch()
    y = torch.randn(x.size(0), 3, dtype=DTYPE, generator=torch.Generator().manual_seed(5))
    _against_brute_force(net, REGRESSION[loss], x, y)


def test_l1_loss_gives_the_gradient_and_refuses_curvature():
    """L1 is piecewise linear in the output: the gradient is torch's (sign, 0 at 0) and the
    GGN / Hessian quantities are refused as for any loss linear in the output."""
    net, (x, _) = lowered_model(), batch()
    y = torch.randn(x.size(0), 3, dtype=DTYPE)
    _, grad = fxcurv.compile(net, nn.L1Loss(), [])(x, y)
    expected = torch.autograd.grad(nn.L1Loss()(net(x), y), list(net.parameters()))
    for (name, _), g in zip(net.named_parameters(), expected):
        torch.testing.assert_close(grad[name], g, **TOL, msg=name)
    with pytest.raises(fxcurv.CompileError, match="linear in the model output"):
        fxcurv.compile(net, nn.L1Loss(), ["diag_ggn_exact"])


def test_lowered_ops_refuse_what_they_cannot_represent():
    net = nn.Sequential(nn.Linear(4, 3), nn.Softmin()).to(DTYPE)
    with pytest.raises(fxcurv.CompileError, match="softmin without a dim"):
        fxcurv.compile(net, nn.CrossEntropyLoss(), ["diag_ggn_exact"])
    with pytest.raises(fxcurv.CompileError, match="'weight' argument"):
        fxcurv.compile(model(), lambda out, y: F.huber_loss(out, y, weight=torch.ones(3)), [])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_weighted_l1_loss_keeps_its_weight(reduction):
    """PyTorch's dispatch for traced values drops l1_loss's ``weight`` (torch 2.14); the tracer
    writes the weighted loss out instead (before: the unweighted loss and its gradient)."""
    net, (x, _) = model(), batch()
    y = torch.randn(x.size(0), 3, dtype=DTYPE)
    weight = torch.rand(x.size(0), 3, dtype=DTYPE, generator=torch.Generator().manual_seed(2))

    def loss_fn(out, target):
        return F.l1_loss(out, target, weight=weight, reduction=reduction)
    value, grad = fxcurv.compile(net, loss_fn, [], verify=False)(x, y)
    expected = loss_fn(net(x), y)
    torch.testing.assert_close(value, expected.detach(), rtol=1e-12, atol=0)
    for (name, _), g in zip(net.named_parameters(),
                            torch.autograd.grad(expected, list(net.parameters()))):
        torch.testing.assert_close(grad[name], g, **TOL, msg=name)


# -- more of PyTorch's losses: KL, BCE, Gaussian / Poisson NLL, soft margins, cosine ----------
def head(outputs: int, last: nn.Module = nn.Identity()):
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, outputs), last).to(DTYPE)


def probabilities(n=4, c=3, seed=6):
    """Teacher probabilities with one exactly zero entry (``0 log 0 = 0``)."""
    p = torch.softmax(torch.randn(n, c, dtype=DTYPE, generator=_gen(seed)), 1)
    p[0, 1] = 0.0
    return p / p.sum(1, keepdim=True)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _variance_head(out, y, **options):
    """A mean head and a variance head (softplus of the last three outputs)."""
    return F.gaussian_nll_loss(out[:, :3], y, F.softplus(out[:, 3:]), **options)


MORE = {  # name: (net, loss_fn, target)
    "distillation_batchmean": (head(3), lambda out, p: F.kl_div(
        F.log_softmax(out, 1), p, reduction="batchmean"), probabilities()),
    "kl_sum": (head(3), lambda out, p: F.kl_div(F.log_softmax(out, 1), p, reduction="sum"),
               probabilities()),
    "kl_mean": (head(3), lambda out, p: F.kl_div(F.log_softmax(out, 1), p), probabilities()),
    "kl_log_target_none": (head(3), lambda out, t: F.kl_div(
        F.log_softmax(out, 1), t, reduction="none", log_target=True).sum(1).mean(),
        probabilities().clamp(min=1e-3).log()),
    "bce_after_sigmoid": (head(3, nn.Sigmoid()), nn.BCELoss(),
                          torch.rand(4, 3, dtype=DTYPE, generator=_gen(7))),
    "bce_weight_sum": (head(3, nn.Sigmoid()), nn.BCELoss(
        weight=torch.tensor([0.5, 1.0, 2.0], dtype=DTYPE), reduction="sum"),
        torch.randint(0, 2, (4, 3), generator=_gen(7)).to(DTYPE)),
    "gaussian_constant_var": (head(3), lambda out, y: F.gaussian_nll_loss(
        out, y, full=True, var= torch.rand(4, 3, dtype=DTYPE, generator=_gen(8)) + 0.5),
        torch.randn(4, 3, dtype=DTYPE)),
    "gaussian_float_var_sum": (head(3), lambda out, y: F.gaussian_nll_loss(
        out, y, 0.3, reduction="sum"), torch.randn(4, 3, dtype=DTYPE)),
    "gaussian_variance_head": (head(6), _variance_head, torch.randn(4, 3, dtype=DTYPE)),
    "gaussian_variance_column": (head(4), lambda out, y: F.gaussian_nll_loss(
        out[:, :3], y, out[:, 3].exp(), eps=1e-3), torch.randn(4, 3, dtype=DTYPE)),
    "poisson_log_input": (head(3), nn.PoissonNLLLoss(),
                          torch.poisson(torch.full((4, 3), 2.0, dtype=DTYPE), generator=_gen(9))),
    "poisson_rate_full": (head(3, nn.Softplus()), nn.PoissonNLLLoss(
        log_input=False, full=True, reduction="sum"),
        torch.tensor([[0.0, 1.0, 2.0], [3.0, 5.0, 0.0], [1.0, 4.0, 2.0], [7.0, 0.0, 1.0]],
                     dtype=DTYPE)),
    "soft_margin": (head(3), nn.SoftMarginLoss(),
                    torch.randint(0, 2, (4, 3), generator=_gen(10)).to(DTYPE) * 2 - 1),
    "multilabel_soft_margin_weight": (head(3), nn.MultiLabelSoftMarginLoss(
        weight=torch.tensor([0.5, 1.0, 2.0], dtype=DTYPE)),
        torch.randint(0, 2, (4, 3), generator=_gen(10)).to(DTYPE)),
    "cosine_to_target": (head(3), lambda out, y: (1 - F.cosine_similarity(out, y)).mean(),
                         torch.randn(4, 3, dtype=DTYPE)),
    "cosine_between_heads": (head(6), lambda out, y: (
        1 - F.cosine_similarity(out[:, :3], out[:, 3:])).sum(), torch.randn(4, 3, dtype=DTYPE)),
}


def _against_brute_force(net, loss_fn, x, y, hessian=True, reference=None):
    """``reference``: the same loss for torch.func's second derivatives where PyTorch's own
    has none."""
    value, grad, diag, diag_h = fxcurv.compile(net, loss_fn, ["diag_ggn_exact", "diag_h"])(x, y)
    expected = loss_fn(net(x), y)
    torch.testing.assert_close(value, expected.detach(), rtol=1e-12, atol=0)
    reference = reference or loss_fn
    ggn = ggn_diagonal_brute_force(net, reference, x, y)
    for (name, p), g in zip(net.named_parameters(), torch.autograd.grad(expected,
                                                                         list(net.parameters()))):
        torch.testing.assert_close(grad[name], g, **TOL, msg=name)
        torch.testing.assert_close(diag[name], ggn[name], **TOL, msg=name)

        def of_param(value, name=name):
            params = {**dict(net.named_parameters()), name: value}
            return reference(torch.func.functional_call(net, params, (x,)), y)
        if hessian:
            full = torch.func.jacrev(torch.func.jacrev(of_param))(p.detach())
            full = full.reshape(p.numel(), p.numel())
            torch.testing.assert_close(diag_h[name], full.diagonal().reshape(p.shape), **TOL)


@pytest.mark.parametrize("loss", list(MORE))
def test_more_losses_against_brute_force(loss):
    """Gradient, exact GGN diagonal and Hessian diagonal of PyTorch's KL, BCE, Gaussian and
    Poisson NLL, soft-margin and cosine losses (before: refused, no rule), by torch.func."""
    net, loss_fn, y = MORE[loss]
    _against_brute_force(net, loss_fn, batch()[0], y)


def test_bce_with_a_saturated_probability_matches_eager_autograd():
    """p = σ(z) rounds to exactly 1.0 and 0.0: torch's clamped log (-100) and backward
    ``(p - y)/max(p(1 - p), 1e-12)``; the gradient and GGN are eager's, not NaN."""
    net = head(3, nn.Sigmoid())
    with torch.no_grad():
        net[2].bias.copy_(torch.tensor([60.0, -800.0, 0.0], dtype=DTYPE))
    x = batch()[0]
    assert (net(x)[:, 0] == 1.0).all() and (net(x)[:, 1] == 0.0).all()
    y = torch.tensor([[0.0, 1.0, 0.3]] * 4, dtype=DTYPE)
    _against_brute_force(net, nn.BCELoss(), x, y, hessian=False)
    _, _, diag_h = fxcurv.compile(net, nn.BCELoss(), ["diag_h"])(x, y)
    for name in diag_h:
        assert torch.isfinite(diag_h[name]).all()


def test_clamped_variance_and_zero_vectors_keep_torchs_gradient():
    """PyTorch clamps the variance (Gaussian NLL) and the norms (cosine similarity) at eps
    under no_grad: the value is clamped, the gradient is the unclamped one."""
    net, x = head(6, nn.ReLU()), batch()[0]
    with torch.no_grad():
        net[2].bias[3:] = -50.0        # variance head exactly 0 after the ReLU: below eps
    y = torch.randn(4, 3, dtype=DTYPE)
    for loss_fn in (lambda out, t: F.gaussian_nll_loss(out[:, :3], t, out[:, 3:] + 1e-9),
                    lambda out, t: (1 - F.cosine_similarity(out[:, :3], out[:, 3:])).sum()):
        value, grad = fxcurv.compile(net, loss_fn, [])(x, y)
        expected = loss_fn(net(x), y)
        torch.testing.assert_close(value, expected.detach(), rtol=1e-12, atol=0)
        for (name, _), g in zip(net.named_parameters(),
                                torch.autograd.grad(expected, list(net.parameters()))):
            torch.testing.assert_close(grad[name], g, **TOL, msg=name)


def test_more_losses_refuse_what_they_cannot_represent():
    net = head(3, nn.Sigmoid())
    with pytest.raises(fxcurv.CompileError, match="canonical link"):
        fxcurv.compile(net, nn.BCELoss(), ["diag_ggn_mc"])
    with pytest.raises(fxcurv.CompileError, match="'target'"):
        fxcurv.compile(head(6, nn.Sigmoid()), lambda out, y: F.binary_cross_entropy(
            out[:, :3], out[:, 3:]), [])
    with pytest.raises(fxcurv.CompileError, match="size_average"):
        fxcurv.compile(net, lambda out, y: F.binary_cross_entropy(out, y, reduce=True), [])
    with pytest.raises(fxcurv.CompileError, match="reduction 'batch' is unknown"):
        fxcurv.compile(head(3), lambda out, p: F.kl_div(out, p, reduction="batch"), [])
    with pytest.raises(fxcurv.CompileError, match="negative var"):
        fxcurv.compile(head(3), lambda out, y: F.gaussian_nll_loss(out, y, -1.0), [])
    with pytest.raises(fxcurv.CompileError, match="linear in the model output"):
        fxcurv.compile(head(3), lambda out, p: F.kl_div(out, p), ["diag_ggn_exact"])


def test_gaussian_nll_checks_the_variance_when_called():
    """PyTorch's ValueErrors for a variance of the wrong shape or with a negative entry."""
    y = torch.randn(4, 3, dtype=DTYPE)
    step = fxcurv.compile(head(3), lambda out, t: F.gaussian_nll_loss(out, t, t[:, :2].abs()), [],
                          verify=False)
    with pytest.raises(ValueError, match="var is of incorrect size"):
        step(batch()[0], y)
    step = fxcurv.compile(head(3), lambda out, t: F.gaussian_nll_loss(out, t, t), [],
                          verify=False)
    with pytest.raises(RuntimeError, match="negative"):
        step(batch()[0], y)


@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum"])
def test_kl_div_module_after_a_log_softmax_layer(reduction):
    """nn.KLDivLoss on a model ending in LogSoftmax: the gradient is eager's; the loss is
    linear in that output, so its GGN is refused (as for any loss linear in the output)."""
    net, loss_fn, (x, _) = head(3, nn.LogSoftmax(1)), nn.KLDivLoss(reduction=reduction), batch()
    _, grad = fxcurv.compile(net, loss_fn, [])(x, probabilities())
    expected = torch.autograd.grad(loss_fn(net(x), probabilities()), list(net.parameters()))
    for (name, _), g in zip(net.named_parameters(), expected):
        torch.testing.assert_close(grad[name], g, **TOL, msg=name)
    with pytest.raises(fxcurv.CompileError, match="linear in the model output"):
        fxcurv.compile(net, loss_fn, ["diag_ggn_exact"])


@pytest.mark.parametrize("loss_fn, y", [
    (nn.MarginRankingLoss(margin=0.1), torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=DTYPE)),
    (nn.HingeEmbeddingLoss(margin=0.5),
     torch.tensor([[1.0, -1.0, 1.0], [-1.0, 1.0, -1.0]] * 2, dtype=DTYPE)),
    (nn.MultiMarginLoss(), torch.tensor([0, 2, 1, 1]))])
def test_piecewise_linear_margin_losses(loss_fn, y):
    """Margin ranking (the model's two outputs ranked), hinge embedding and multi-margin
    (p = 1): eager's gradient, ties included (none passes); curvature refused (ℓ'' = 0)."""
    net, x = head(2 if isinstance(loss_fn, nn.MarginRankingLoss) else 3), batch()[0]
    if isinstance(loss_fn, nn.MarginRankingLoss):
        def loss(out, t):
            return F.margin_ranking_loss(out[:, 0], out[:, 1], t, margin=loss_fn.margin)
    else:
        loss = loss_fn
    with torch.no_grad():   # one tie: the hinge of sample 1 exactly at the margin
        out = net(x)
        if isinstance(loss_fn, nn.HingeEmbeddingLoss):
            net[2].bias[0] += 0.5 - out[1, 0]
    _, grad = fxcurv.compile(net, loss, [])(x, y)
    expected = torch.autograd.grad(loss(net(x), y), list(net.parameters()))
    for (name, _), g in zip(net.named_parameters(), expected):
        torch.testing.assert_close(grad[name], g, **TOL, msg=name)
    with pytest.raises(fxcurv.CompileError, match="linear in the model output"):
        fxcurv.compile(net, loss, ["diag_ggn_exact"])


def test_squared_multi_margin_loss_against_brute_force():
    """p = 2: piecewise quadratic (PyTorch has no second derivative of its kernel: the brute
    force differentiates the same loss written out)."""
    weight = torch.tensor([0.5, 1.0, 2.0], dtype=DTYPE)
    loss_fn = nn.MultiMarginLoss(p=2, margin=2.0, weight=weight)

    def written_out(out, y):
        z = (2.0 - out.gather(1, y.unsqueeze(1)) + out).clamp(min=0) ** 2
        return ((z.sum(1) - 4.0) / 3 * weight[y]).mean()   # the term i = y is 2² = 4
    x, y = batch()
    _against_brute_force(head(3), loss_fn, x, y, reference=written_out)


# -- metric-learning losses: triplet margin, cosine embedding, multilabel margin ----------------
def _triplet(**options):
    """Anchor, positive and negative: the three thirds of a [N, 9] model output."""
    return lambda out, y: F.triplet_margin_loss(out[:, :3], out[:, 3:6], out[:, 6:], **options)


METRIC_LOSSES = {  # name: (loss_fn, target); the net is head(9) or head(6)
    "triplet": (_triplet(margin=3.0), None),
    "triplet_swap_sum": (_triplet(margin=3.0, swap=True, reduction="sum"), None),
    "triplet_p3": (_triplet(margin=4.0, p=3.0, eps=1e-3), None),
    "cosine_embedding": (lambda out, t: F.cosine_embedding_loss(
        out[:, :3], out[:, 3:6], t, margin=-0.5), torch.tensor([1.0, -1.0, -1.0, 1.0],
                                                               dtype=DTYPE)),
}


@pytest.mark.parametrize("loss", list(METRIC_LOSSES))
def test_metric_learning_losses_against_brute_force(loss):
    """Triplet margin (p = 2, 3; swap) and cosine embedding losses with every input from the
    model: gradient, exact GGN diagonal (positive part of the indefinite loss Hessian) and
    Hessian diagonal by torch.func (before: refused, no rule)."""
    loss_fn, t = METRIC_LOSSES[loss]
    x = batch()[0]
    _against_brute_force(head(9 if t is None else 6), loss_fn, x, t if t is not None else x)


def _eager_gradient_matches(net, loss_fn, x, y):
    _, grad = fxcurv.compile(net, loss_fn, [])(x, y)
    expected = torch.autograd.grad(loss_fn(net(x), y), list(net.parameters()))
    for (name, _), g in zip(net.named_parameters(), expected):
        torch.testing.assert_close(grad[name], g, **TOL, msg=name)


def test_metric_losses_at_ties_and_piecewise_linear_ones():
    """Ties at the hinge pass no gradient, as PyTorch's: a triplet whose margin is met exactly
    (p = 1), a cosine embedding at its margin; multilabel margin (labels until the first -1,
    a repeated label counted twice) is piecewise linear: eager's gradient, curvature
    refused (ℓ'' = 0)."""
    net, x = head(9), batch()[0]
    with torch.no_grad():
        out = net(x)
        d = lambda a, b: (a - b + 1e-6).abs().sum(-1)  # noqa: E731
        gaps = d(out[:, :3], out[:, 6:]) - d(out[:, :3], out[:, 3:6])
        margin = float(gaps[gaps > 0][0])   # the first sample with a positive gap ties
    _eager_gradient_matches(net, _triplet(margin=margin, p=1), x, x)
    net = head(6)
    with torch.no_grad():
        out = net(x)
        cos = F.cosine_similarity(out[1:2, :3], out[1:2, 3:], eps=0)[0]
    t = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=DTYPE)
    _eager_gradient_matches(net, lambda o, y: F.cosine_embedding_loss(
        o[:, :3], o[:, 3:], y, margin=float(cos)), x, t)
    labels = torch.tensor([[2, 0, -1], [1, 1, 2], [-1, 0, 2], [0, 2, 1]])
    net = head(3)
    _eager_gradient_matches(net, nn.MultiLabelMarginLoss(), x, labels)
    with pytest.raises(fxcurv.CompileError, match="linear in the model output"):
        fxcurv.compile(net, nn.MultiLabelMarginLoss(), ["diag_ggn_exact"])


def test_metric_ops_refuse_what_they_cannot_represent():
    """cdist and pairwise distances of order p < 1 or ∞, a triplet margin <= 0, tensor_split
    at decreasing indices; per-sample quantities of a cdist in the model whose x2 comes from
    the model (its rows mix samples), the GGN of a loss whose cdist pairs samples; a parameter
    x2 with more axes than x1 when the step runs."""
    net = head(6)
    for loss_fn, reason in [
            (lambda o, y: torch.cdist(o[:, :3], y, p=0.5).sum(), "p = 0.5 has no rule"),
            (lambda o, y: F.pairwise_distance(o[:, :3], y, p=math.inf).sum(), "p = inf"),
            (lambda o, y: F.triplet_margin_loss(o[:, :2], o[:, 2:4], o[:, 4:], margin=0.0),
             "margin > 0"),
            (lambda o, y: torch.tensor_split(o, [4, 2], 1)[0].sum(), "non-decreasing")]:
        with pytest.raises(fxcurv.CompileError, match=reason):
            fxcurv.compile(net, loss_fn, [])
    x, y = batch()

    class Pairs(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 6)

        def forward(self, x):
            h = self.lin(x)
            return torch.cdist(h[:, :3], h[:, 3:])       # [N, N]: row n reads every sample
    pairs, target = Pairs().to(DTYPE), torch.randn(4, 4, dtype=DTYPE)
    _eager_gradient_matches(pairs, nn.MSELoss(), x, target)
    with pytest.raises(fxcurv.CompileError, match="cdist pairs every row"):
        fxcurv.compile(pairs, nn.MSELoss(), ["batch_grad"])
    coupled = lambda o, y: torch.cdist(o[:, :3], o[:, 3:]).sum(1).mean()  # noqa: E731
    _eager_gradient_matches(net, coupled, x, y)
    with pytest.raises(fxcurv.CompileError, match="not a sum of per-sample terms"):
        fxcurv.compile(net, coupled, ["diag_ggn_exact"])

    class Batched(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.prototypes = nn.Linear(4, 3), nn.Parameter(torch.randn(2, 5, 3))

        def forward(self, x):
            return torch.cdist(self.lin(x), self.prototypes).sum(-1).t()
    step = fxcurv.compile(Batched().to(DTYPE), nn.MSELoss(), [], verify=False)
    with pytest.raises(ValueError, match="more axes than x1"):
        step(x, torch.randn(4, 2, dtype=DTYPE))
