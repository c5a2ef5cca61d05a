"""Monte-Carlo GGN quantities: convergence to the exact ones, shapes, and the random stream.

Statistics. With ``M = mc_samples`` independent draws, every Monte-Carlo quantity is the mean
of M i.i.d. terms whose expectation is the exact quantity: ``diag_ggn_mc = (1/M) Σ_m X_m`` with
``X_m = Σ_n (J_nᵀ ŝ_mn)²`` (``ŝ`` the unscaled sampled factor; ``sqrt_ggn_mc`` is ``ŝ/√M``, so
``X_m = M · Σ_n sqrt_ggn_mc[m, n]²``), and ``kfac``'s G likewise. The tests check two things:

* the relative error (Frobenius norm over a parameter) is below 5%. At ``M = 10_000`` it
  averages 0.9-1.6% for these models and was at most 3.1% over 200 seeds (it scales as
  1/√M), so 5% is about 3 times the typical error and still catches a wrong scale (a factor
  √2, 1/N or a missing 1/√M are all far outside it);
* every entry's error is within 6 standard errors, the standard error estimated from the
  same M terms ``X_m`` (CLT; the worst |z| seen over 200 seeds and ~100 entries per call was
  4.0, and P(|z| > 6) ≈ 2e-9 per entry).

Everything is seeded with ``torch.manual_seed``, so the tests are deterministic; the tolerances
are chosen so that they would also pass for other seeds.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn

import fxcurv

DTYPE = torch.float64
M = 10_000
REL_TOL = 0.05
Z_TOL = 6.0
N = 4
LOSSES = {"ce": nn.CrossEntropyLoss(), "ce_sum": nn.CrossEntropyLoss(reduction="sum"),
          "mse": nn.MSELoss(), "bce": nn.BCEWithLogitsLoss()}
MC = ["diag_ggn_mc", "diag_ggn_mc_batch", "sqrt_ggn_mc", "kfac"]
EXACT = ["diag_ggn_exact", "diag_ggn_exact_batch", "sqrt_ggn_exact", "kflr"]
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)


def batch(loss: str):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 4, dtype=DTYPE, generator=g)
    if loss.startswith("ce"):
        return x, torch.randint(0, 3, (N,), generator=g)
    if loss == "mse":
        return x, torch.randn(N, 3, dtype=DTYPE, generator=g)
    return x, torch.rand(N, 3, dtype=DTYPE, generator=g)


@functools.lru_cache(maxsize=None)
def results(loss: str):
    """``(exact, mc)`` dicts quantity -> {param: value}; MC with M samples, seeded."""
    model, x_y = mlp(), batch(loss)
    _, _, *exact = fxcurv.compile(model, LOSSES[loss], EXACT)(*x_y)
    step = fxcurv.compile(model, LOSSES[loss], MC, mc_samples=M)
    torch.manual_seed(1234)
    _, _, *mc = step(*x_y)
    return dict(zip(EXACT, exact)), dict(zip(MC, mc))


def draws(sqrt_mc: torch.Tensor, batch_axis: bool) -> torch.Tensor:
    """The M i.i.d. terms ``X_m`` of ``diag_ggn_mc`` (``[M, *p]``) or of ``_batch``
    (``[M, N, *p]``) from the factor ``[M, N, *p]``."""
    terms = sqrt_mc.square() * sqrt_mc.shape[0]
    return terms if batch_axis else terms.sum(1)


def assert_converges(estimate, exact, terms, what):
    """Relative error < REL_TOL and every entry within Z_TOL standard errors."""
    relative = ((estimate - exact).norm() / exact.norm()).item()
    assert relative < REL_TOL, f"{what}: relative error {relative:.3f}"
    torch.testing.assert_close(terms.mean(0), estimate, rtol=1e-10, atol=1e-15,
                               msg=f"{what}: terms do not average to the estimate")
    stderr = terms.std(0) / terms.shape[0] ** 0.5
    z = ((estimate - exact).abs() / stderr.clamp_min(1e-300))[exact.abs() > 1e-14]
    assert z.max() < Z_TOL, f"{what}: an entry is {z.max():.1f} standard errors off"


# ----------------------------------------------------------------------------- convergence
@pytest.mark.parametrize("loss", list(LOSSES))
def test_diag_ggn_mc_converges_to_diag_ggn_exact(loss):
    exact, mc = results(loss)
    for p, value in exact["diag_ggn_exact"].items():
        assert mc["diag_ggn_mc"][p].shape == value.shape
        assert_converges(mc["diag_ggn_mc"][p], value, draws(mc["sqrt_ggn_mc"][p], False),
                         f"{loss} diag_ggn_mc[{p}]")


@pytest.mark.parametrize("loss", list(LOSSES))
def test_diag_ggn_mc_batch_converges_to_diag_ggn_exact_batch(loss):
    exact, mc = results(loss)
    for p, value in exact["diag_ggn_exact_batch"].items():
        assert mc["diag_ggn_mc_batch"][p].shape == value.shape == (N, *value.shape[1:])
        assert_converges(mc["diag_ggn_mc_batch"][p], value, draws(mc["sqrt_ggn_mc"][p], True),
                         f"{loss} diag_ggn_mc_batch[{p}]")


@pytest.mark.parametrize("loss", list(LOSSES))
def test_kfac_converges_to_kflr(loss):
    """G factors converge (terms: M·Σ_n s sᵀ of the bias factor, the layer-output factor for a
    linear layer on [N, I]); A factors do not depend on the draw and are equal."""
    exact, mc = results(loss)
    for layer in ("0", "2"):
        weight, bias = f"{layer}.weight", f"{layer}.bias"
        (g_w, a_w), (g_b,) = mc["kfac"][weight], mc["kfac"][bias]
        (g_w_exact, a_w_exact), (g_b_exact,) = exact["kflr"][weight], exact["kflr"][bias]
        torch.testing.assert_close(a_w, a_w_exact, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(g_w, g_b, rtol=1e-12, atol=1e-15)
        s = mc["sqrt_ggn_mc"][bias]                                       # [M, N, out]
        terms = torch.einsum("mni,mnj->mij", s, s) * s.shape[0]
        assert_converges(g_b, g_b_exact, terms, f"{loss} kfac[{bias}] G")
        assert_converges(g_w, g_w_exact, terms, f"{loss} kfac[{weight}] G")


@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
def test_averaging_repeated_calls_converges_too(loss):
    """mc_samples=20, 100 calls averaged (fresh draws on every call): 2000 draws in all, so a
    typical relative error of √(10000/2000) ≈ 2.2 times the M = 10_000 one (2-3.6%);
    tolerance 2·REL_TOL = 10%."""
    exact, _ = results(loss)
    step = fxcurv.compile(mlp(), LOSSES[loss], ["diag_ggn_mc"], mc_samples=20)
    x, y = batch(loss)
    torch.manual_seed(99)
    calls = 100
    total = {p: torch.zeros_like(v) for p, v in exact["diag_ggn_exact"].items()}
    for _ in range(calls):
        for p, v in step(x, y)[2].items():
            total[p] += v
    for p, value in exact["diag_ggn_exact"].items():
        relative = ((total[p] / calls - value).norm() / value.norm()).item()
        assert relative < 2 * REL_TOL, f"{loss} {p}: {relative:.3f}"


# --------------------------------------------------------------------- shapes and sharing
@pytest.mark.parametrize("samples", [1, 3])
def test_sqrt_ggn_mc_shape_and_one_draw_for_every_mc_quantity(samples):
    model = mlp()
    x, y = batch("ce")
    step = fxcurv.compile(model, LOSSES["ce"], MC, mc_samples=samples)
    _, _, diag, diag_batch, sqrt, kfac = step(x, y)
    for p, param in model.named_parameters():
        assert sqrt[p].shape == (samples, N, *param.shape)
        assert diag_batch[p].shape == (N, *param.shape) and diag[p].shape == param.shape
        torch.testing.assert_close(diag[p], sqrt[p].square().sum([0, 1]), rtol=1e-12,
                                   atol=1e-15)
        torch.testing.assert_close(diag_batch[p], sqrt[p].square().sum(0), rtol=1e-12,
                                   atol=1e-15)
    s = sqrt["2.bias"].flatten(0, 1)
    torch.testing.assert_close(kfac["2.bias"][0], s.T @ s, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------- randomness
def _flat(outputs) -> torch.Tensor:
    parts = []
    for value in outputs:
        if isinstance(value, dict):
            for v in value.values():
                parts.extend(v if isinstance(v, list) else [v])
        else:
            parts.append(value)
    return torch.cat([t.reshape(-1) for t in parts])


def _mc_step(loss: str, samples: int = 2):
    return fxcurv.compile(mlp(), LOSSES[loss], MC, mc_samples=samples)


@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
def test_reproducible_under_manual_seed_and_fresh_on_every_call(loss):
    step, (x, y) = _mc_step(loss), batch(loss)
    torch.manual_seed(7)
    first, second = _flat(step(x, y)), _flat(step(x, y))
    torch.manual_seed(7)
    again = _flat(step(x, y))
    assert torch.equal(first, again)
    assert not torch.equal(first, second)


@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
def test_torchscript_mc_step_is_reproducible_and_equals_eager_under_a_seed(loss, tmp_path):
    step, (x, y) = _mc_step(loss), batch(loss)
    scripted = torch.jit.script(step)
    path = tmp_path / "mc.pt"
    scripted.save(str(path))
    loaded = torch.jit.load(str(path))
    torch.manual_seed(11)
    eager = _flat(step(x, y))
    for module in (scripted, loaded):
        torch.manual_seed(11)
        first, second = _flat(module(x, y)), _flat(module(x, y))
        torch.manual_seed(11)
        assert torch.equal(_flat(module(x, y)), first)
        assert not torch.equal(first, second)
        assert torch.equal(first, eager)


def test_cross_entropy_on_positions_draws_independently_per_position():
    """CE on ``[N, C, d]``: one class drawn per position, independently, so the cross-position
    terms of the sampled ``S Sᵀ`` vanish in expectation and the MC diagonal converges to the
    exact one (whose factor is block-diagonal over positions)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(),
                          nn.Conv1d(3, 3, 1)).to(DTYPE)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(N, 2, 5, dtype=DTYPE, generator=g), torch.randint(0, 3, (N, 5),
                                                                         generator=g)
    _, _, exact = fxcurv.compile(model, nn.CrossEntropyLoss(), ["diag_ggn_exact"])(x, y)
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), ["diag_ggn_mc", "sqrt_ggn_mc"],
                          mc_samples=M)
    torch.manual_seed(4321)
    _, _, diag, sqrt = step(x, y)
    for p, value in exact.items():
        assert sqrt[p].shape[:2] == (M, N)
        assert_converges(diag[p], value, draws(sqrt[p], False), f"ce positions {p}")
