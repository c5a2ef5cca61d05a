"""Kronecker factors for every model (issue 16.8): a parameter without Kronecker structure
(norm scales and shifts, raw parameters used elementwise or by two different ops) gets its GGN
block as a single factor ``[G]``, ``G: [P, P]``, or above ``MAX_KRON_BLOCK`` entries its
diagonal ``[G_diag]`` in ``p.shape``.

References: ``G = Σ_n J_nᵀ H_n J_n`` restricted to the parameter, ``J_n`` by ``jacrev`` of
sample n's output, ``H_n`` the loss Hessian w.r.t. it (``torch.func``, float64). ``kfac``'s
block is checked against the Monte-Carlo factor drawn in the same step (``sqrt_ggn_mc``), and
its average over many samples against the exact block.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, hessian, jacrev

import fxcurv
from fxcurv.passes.per_sample import MAX_KRON_BLOCK
from setups import randomize_bn

DTYPE = torch.float64
TOL = dict(rtol=1e-9, atol=1e-12)


class Block(nn.Module):
    """GPT-2-style pre-norm block (affine LayerNorm, causal attention, GELU MLP), mean-pooled
    into a linear head."""

    def __init__(self, d: int = 4, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.fc2, self.head = nn.Linear(d, 2 * d), nn.Linear(2 * d, d), nn.Linear(d, 3)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, -1)
        q, k, v = [z.reshape(n, t, self.heads, -1).transpose(1, 2) for z in (q, k, v)]
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(n, t, d))
        x = x + self.fc2(F.gelu(self.fc(self.ln2(x))))
        return self.head(x.mean(1))


class ConvBN(nn.Module):
    """conv, BatchNorm (eval), ReLU, conv, BatchNorm, average pooling, linear head."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.c2, self.b2 = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        h = torch.relu(self.b1(self.c1(x)))
        h = torch.tanh(self.b2(self.c2(h)) + h)
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


class Elementwise(nn.Module):
    """Raw parameters used elementwise (``x * exp(s)``, ``+ shift``), and an embedding table
    used by two different ops (lookup and output head)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.log_scale = nn.Parameter(torch.randn(4) / 2)
        self.shift = nn.Parameter(torch.randn(1, 4) / 2)

    def forward(self, tokens):
        h = self.emb(tokens).mean(1) * torch.exp(self.log_scale) + self.shift
        return F.linear(torch.tanh(h), self.emb.weight)


def _tokens(n):
    return torch.randint(0, 5, (n, 3))


CASES = {  # model, input maker, the parameters without Kronecker structure
    "layer_norm_block": (Block, lambda n: torch.randn(n, 3, 4, dtype=DTYPE),
                         ["ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias"]),
    "batch_norm_cnn": (lambda: randomize_bn(ConvBN()).eval(),
                       lambda n: torch.randn(n, 2, 4, 4, dtype=DTYPE),
                       ["b1.weight", "b1.bias", "b2.weight", "b2.bias"]),
    "elementwise": (Elementwise, _tokens, ["emb.weight", "log_scale", "shift"]),
}


def setup(name: str, n: int = 3):
    torch.manual_seed(0)
    make, inputs, blocks = CASES[name]
    model = make().to(DTYPE)
    return model, inputs(n), torch.randint(0, 3, (n,)), blocks


def ggn_block(model, loss_fn, x, y, name: str) -> torch.Tensor:
    """``Σ_n J_nᵀ H_n J_n`` ``[P, P]`` of parameter ``name`` (the others fixed)."""
    params = dict(model.named_parameters())
    theta = params[name].detach()

    def output(p, inputs):
        return functional_call(model, {**params, name: p}, (inputs,))

    f = output(theta, x).detach()
    h = hessian(lambda out: loss_fn(out, y))(f)                        # [N, C, N, C]
    total = torch.zeros(theta.numel(), theta.numel(), dtype=DTYPE)
    for n in range(len(x)):
        j = jacrev(output)(theta, x[n:n + 1]).reshape(f[0].numel(), -1)
        total += j.T @ h[n, :, n] @ j
    return total


@pytest.mark.parametrize("name", list(CASES))
def test_kflr_of_a_parameter_without_kronecker_structure_is_its_ggn_block(name):
    model, x, y, blocks = setup(name)
    loss_fn = nn.CrossEntropyLoss()
    step = fxcurv.compile(model, loss_fn, ["kflr"])
    kflr = step(x, y)[2]
    assert list(kflr) == [p for p, _ in model.named_parameters()]
    for p in blocks:
        assert len(kflr[p]) == 1, p
        torch.testing.assert_close(kflr[p][0], ggn_block(model, loss_fn, x, y, p), **TOL)
    for p, param in model.named_parameters():  # the others: BackPACK's [G, A] / [G]
        if p not in blocks:
            assert kflr[p][0].shape == (param.shape[0],) * 2, p
    scripted = torch.jit.script(step)(x, y)[2]
    for p in blocks:
        torch.testing.assert_close(scripted[p][0], kflr[p][0], rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_kfac_block_is_the_monte_carlo_ggn_block_of_the_same_samples(name):
    model, x, y, blocks = setup(name)
    torch.manual_seed(1)
    kfac, sqrt_mc = fxcurv.compile(model, nn.CrossEntropyLoss(), ["kfac", "sqrt_ggn_mc"],
                                   mc_samples=3)(x, y)[2:]
    for p in blocks:
        s = sqrt_mc[p].reshape(3 * len(x), -1)
        torch.testing.assert_close(kfac[p][0], s.T @ s, **TOL)


def test_kfac_block_converges_to_the_ggn_block():
    model, x, y, blocks = setup("layer_norm_block")
    torch.manual_seed(2)
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), ["kfac", "kflr"], mc_samples=20000)
    kfac, kflr = step(x, y)[2:]
    for p in blocks:
        error = (kfac[p][0] - kflr[p][0]).norm() / kflr[p][0].norm()
        assert error < 0.05, (p, error)


class Wide(nn.Module):
    """An elementwise scale over more entries than ``MAX_KRON_BLOCK``."""

    def __init__(self, width: int):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(width))
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        return self.head(torch.tanh(x * self.scale))


@pytest.mark.parametrize("quantity", ["kflr", "kfac"])
def test_above_the_size_limit_the_factor_is_the_block_diagonal(quantity):
    torch.manual_seed(0)
    model = Wide(MAX_KRON_BLOCK + 1).to(DTYPE)
    x, y = torch.randn(3, MAX_KRON_BLOCK + 1, dtype=DTYPE), torch.randint(0, 2, (3,))
    diagonal = "diag_ggn_exact" if quantity == "kflr" else "diag_ggn_mc"
    torch.manual_seed(1)
    factors, diag = fxcurv.compile(model, nn.CrossEntropyLoss(), [quantity, diagonal])(x, y)[2:]
    assert len(factors["scale"]) == 1 and factors["scale"][0].shape == model.scale.shape
    torch.testing.assert_close(factors["scale"][0], diag["scale"], **TOL)
    assert factors["head.weight"][1].shape == (MAX_KRON_BLOCK + 1,) * 2   # A is not limited


def test_kfra_block_of_a_layer_norm_scale_is_the_batch_averaged_sandwich():
    """KFRA (chains): the block of a parameter without Kronecker structure is
    ``(1/N) Σ_n J_nᵀ M J_n`` with ``M`` the dense curvature at the op's output, which is the
    shift's factor (``J = I``); for the scale ``J_n = diag(x̂_n)``: ``M ⊙ mean_n x̂_n x̂_nᵀ``.
    With one sample, KFRA is KFLR."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3))
    model = model.to(DTYPE)
    x, y = torch.randn(6, 4, dtype=DTYPE), torch.randint(0, 3, (6,))
    kfra = fxcurv.compile(model, nn.CrossEntropyLoss(), ["kfra"])(x, y)[2]
    normalised = F.layer_norm(model[0](x), (5,)).detach()
    expected = kfra["1.bias"][0] * (normalised.T @ normalised / len(x))
    torch.testing.assert_close(kfra["1.weight"][0], expected, **TOL)
    kfra, kflr = fxcurv.compile(model, nn.CrossEntropyLoss(), ["kfra", "kflr"])(x[:1], y[:1])[2:]
    for name in ("1.weight", "1.bias"):
        torch.testing.assert_close(kfra[name][0], kflr[name][0], **TOL)
