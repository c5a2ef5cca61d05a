"""fxcurv.optim: the optimizers' updates, CG's stopping rules, attach() and dense blocks."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, hessian

import fxcurv
from fxcurv.optim import CGNewton, DiagGGNOptimizer, attach, curvature_blocks

F64 = torch.float64


def tanh_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def classification_batch(n=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, dtype=F64, generator=g), torch.randint(0, 2, (n,), generator=g)


def regression_problem(n=20, d=4, k=3):
    """A bias-free linear layer with MSE: convex, the GGN block is the whole Hessian."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(n, d, dtype=F64, generator=g), torch.randn(n, k, dtype=F64, generator=g)
    torch.manual_seed(3)
    return nn.Linear(d, k, bias=False).double(), x, y


def counting(step, x, y):
    """A CGNewton closure that counts its calls."""
    calls = []

    def closure(vectors):
        calls.append(vectors)
        return step(x, y, vectors)
    return closure, calls


def loss_hessian_blocks(model, loss_fn, x, y) -> dict:
    """``{name: [P, P]}`` diagonal blocks of the loss Hessian by torch.func."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    full = hessian(lambda ps: loss_fn(functional_call(model, ps, (x,)), y))(params)
    return {n: full[n][n].reshape(p.numel(), p.numel()) for n, p in params.items()}


# DiagGGNOptimizer ------------------------------------------------------------------------------


def test_diag_ggn_update_equals_formula_with_step_dicts():
    model, (x, y) = tanh_mlp(), classification_batch()
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), ["diag_ggn_exact"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = DiagGGNOptimizer(model.named_parameters(), step_size=0.3, damping=0.5)
    _, grad, diag = step(x, y)
    opt.step(grad, diag)
    for name, p in model.named_parameters():
        expected = before[name] - 0.3 * grad[name] / (diag[name] + 0.5)
        torch.testing.assert_close(p.detach(), expected)


def test_diag_ggn_update_from_attributes_and_plain_parameters():
    model, (x, y) = tanh_mlp(), classification_batch()
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), ["diag_ggn_exact"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = DiagGGNOptimizer(model.parameters(), 0.3, 0.5, savefield="diag_ggn_exact")
    _, grad, diag = step(x, y)
    attach(model, step, x, y)
    opt.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[name] - 0.3 * grad[name] / (diag[name] + 0.5))


def test_diag_ggn_errors_say_what_to_do():
    model, (x, y) = tanh_mlp(), classification_batch()
    _, grad, diag = fxcurv.compile(model, nn.CrossEntropyLoss(), ["diag_ggn_mc"])(x, y)
    with pytest.raises(TypeError, match="named_parameters"):
        DiagGGNOptimizer(model.parameters(), 0.1, 1.0).step(grad, diag)
    with pytest.raises(TypeError, match="both"):
        DiagGGNOptimizer(model.named_parameters(), 0.1, 1.0).step(grad)
    model[0].weight.grad = torch.zeros_like(model[0].weight)
    with pytest.raises(AttributeError, match="attach"):
        DiagGGNOptimizer(model.parameters(), 0.1, 1.0).step()


# CGNewton --------------------------------------------------------------------------------------


def test_cg_newton_one_step_reaches_least_squares_minimiser():
    model, x, y = regression_problem()
    opt = CGNewton(model.named_parameters(), lr=1.0, alpha=0.0, cg_atol=0.0, cg_tol=1e-12,
                   cg_maxiter=100, curvature="ggn")
    step = fxcurv.compile(model, nn.MSELoss(), [opt.quantity])
    opt.step(lambda vectors: step(x, y, vectors))
    minimiser = torch.linalg.lstsq(x, y).solution.T
    torch.testing.assert_close(model.weight.detach(), minimiser, rtol=1e-10, atol=1e-10)
    assert opt.state[model.weight]["cg_residual"] <= 1e-12


def test_cg_respects_maxiter():
    model, x, y = regression_problem()
    opt = CGNewton(model.named_parameters(), lr=1.0, alpha=0.0, cg_atol=0.0, cg_tol=0.0,
                   cg_maxiter=2)
    step = fxcurv.compile(model, nn.MSELoss(), [opt.quantity])
    closure, calls = counting(step, x, y)
    opt.step(closure)
    assert opt.state[model.weight]["cg_iterations"] == 2
    assert len(calls) == 1 + 2  # the gradient, then one product per CG iteration


def test_cg_stops_at_relative_tolerance_with_that_residual():
    model, x, y = regression_problem(n=30, d=8, k=2)
    step = fxcurv.compile(model, nn.MSELoss(), ["ggnmp"])
    block = curvature_blocks(step, x, y)["weight"]
    _, grad, _ = step(x, y, {"weight": torch.zeros(1, 2, 8, dtype=F64)})
    w0 = model.weight.detach().clone()
    opt = CGNewton(model.named_parameters(), lr=1.0, alpha=0.1, cg_atol=0.0, cg_tol=0.3)
    opt.step(lambda vectors: step(x, y, vectors))
    d = (model.weight.detach() - w0).flatten()
    system = 0.9 * block + 0.1 * torch.eye(16, dtype=F64)  # (1 - α) C + α I
    residual = (-grad["weight"].flatten() - system @ d).norm()
    assert residual <= 0.3 * grad["weight"].norm()
    assert 0 < opt.state[model.weight]["cg_iterations"] < 16
    assert opt.state[model.weight]["cg_residual"] == pytest.approx(
        (residual / grad["weight"].norm()).item())


def test_cg_absolute_tolerance_stops_before_any_iteration():
    model, x, y = regression_problem()
    opt = CGNewton(model.named_parameters(), lr=1.0, alpha=0.0, cg_atol=1e6, cg_tol=0.0)
    step = fxcurv.compile(model, nn.MSELoss(), [opt.quantity])
    w0 = model.weight.detach().clone()
    closure, calls = counting(step, x, y)
    opt.step(closure)
    assert len(calls) == 1 and opt.state[model.weight]["cg_iterations"] == 0
    torch.testing.assert_close(model.weight.detach(), w0)


@pytest.mark.parametrize("curvature", ["ggn", "hessian", "pch_abs", "pch_clip"])
def test_every_curvature_solves_its_damped_block_system(curvature):
    model, (x, y) = tanh_mlp(), classification_batch()
    quantity = fxcurv.optim.CURVATURES[curvature]
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), [quantity])
    blocks = curvature_blocks(step, x, y)
    lowest = min(torch.linalg.eigvalsh(b).min().item() for b in blocks.values())
    alpha = max(0.5, -lowest / (1.0 - lowest) + 0.1) if lowest < 0 else 0.5  # (1-α)C + αI ≻ 0
    _, grad, _ = step(x, y, {n: torch.zeros(1, *p.shape, dtype=F64)
                             for n, p in model.named_parameters()})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = CGNewton(model.named_parameters(), lr=0.5, alpha=alpha, cg_atol=0.0, cg_tol=1e-12,
                   cg_maxiter=50, curvature=curvature)
    assert opt.quantity == quantity
    loss = opt.step(lambda vectors: step(x, y, vectors))
    assert loss.shape == ()
    for name, p in model.named_parameters():
        damped = (1 - alpha) * blocks[name] + alpha * torch.eye(p.numel(), dtype=F64)
        d = torch.linalg.solve(damped, -grad[name].flatten()).view_as(p)
        torch.testing.assert_close(p.detach(), before[name] + 0.5 * d)


def test_cg_negative_curvature_at_first_iteration_takes_the_gradient_step():
    param = nn.Parameter(torch.tensor([1.0, 2.0], dtype=F64))
    grad = torch.tensor([0.5, -1.0], dtype=F64)

    def closure(vectors):  # a negative definite "curvature" C = -I
        return torch.tensor(0.0), {"p": grad}, {"p": -vectors["p"]}
    opt = CGNewton([("p", param)], lr=0.1, alpha=0.0, cg_maxiter=10)
    opt.step(closure)
    torch.testing.assert_close(param.detach(), torch.tensor([1.0, 2.0], dtype=F64) - 0.1 * grad)
    assert opt.state[param]["cg_negative_curvature"] and opt.state[param]["cg_iterations"] == 0


def test_cg_newton_checks_its_arguments():
    model = tanh_mlp()
    with pytest.raises(ValueError, match="curvature"):
        CGNewton(model.named_parameters(), lr=0.1, alpha=0.1, curvature="fisher")
    opt = CGNewton(model.parameters(), lr=0.1, alpha=0.1)
    with pytest.raises(TypeError, match="named_parameters"):
        opt.step(lambda vectors: None)


# attach and curvature_blocks -------------------------------------------------------------------


def test_attach_puts_the_step_results_on_parameters():
    model, (x, y) = tanh_mlp(), classification_batch()
    quantities = ["batch_grad", "diag_ggn_exact", "kflr", "hmp"]
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), quantities)
    zeros = {n: torch.zeros(1, *p.shape, dtype=F64) for n, p in model.named_parameters()}
    loss, grad, batch_grad, diag, kflr, _ = step(x, y, zeros)
    assert torch.equal(attach(model, step, x, y), loss)
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, grad[name])
        assert torch.equal(p.grad_batch, batch_grad[name]) and p.batch_grad is p.grad_batch
        assert torch.equal(p.diag_ggn_exact, diag[name])
        assert all(torch.equal(a, b) for a, b in zip(p.kflr, kflr[name]))
        vec = torch.randn(3, *p.shape, dtype=F64)
        expected = step(x, y, {**zeros, name: vec})[-1][name]
        torch.testing.assert_close(p.hmp(vec), expected)
    model.zero_grad()
    nn.CrossEntropyLoss()(model(x), y).backward()
    torch.testing.assert_close(model[0].weight.grad, grad["0.weight"])


def test_curvature_blocks_equal_torch_func_hessian_blocks():
    model, (x, y) = tanh_mlp(), classification_batch()
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), ["hmp"])
    blocks = curvature_blocks(step, x, y, chunk_size=5)
    expected = loss_hessian_blocks(model, nn.CrossEntropyLoss(), x, y)
    assert list(blocks) == list(expected)
    for name in expected:
        torch.testing.assert_close(blocks[name], expected[name])


def test_curvature_blocks_needs_a_product_quantity():
    model, (x, y) = tanh_mlp(), classification_batch()
    with pytest.raises(ValueError, match="no product"):
        curvature_blocks(fxcurv.compile(model, nn.CrossEntropyLoss(), ["diag_h"]), x, y)
    both = fxcurv.compile(model, nn.CrossEntropyLoss(), ["ggnmp", "hmp"])
    with pytest.raises(ValueError, match="quantity="):
        curvature_blocks(both, x, y)
    ggn = curvature_blocks(both, x, y, quantity="ggnmp")
    assert all(torch.allclose(b, b.T) for b in ggn.values())
