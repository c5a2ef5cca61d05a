"""Hessian quantities: ``diag_h``, ``diag_h_batch`` and the block products ``hmp``, ``ggnmp``,
``pchmp_abs``, ``pchmp_clip`` (float64, tiny models).

1. Equal to BackPACK 1.7.1 (``DiagHessian``, ``BatchDiagHessian``, ``HMP``, ``GGNMP``) on every
   layer and loss BackPACK supports for them. From ``backpack/extensions/secondorder/
   diag_hessian/__init__.py`` and ``backpack/extensions/curvmatprod/{hmp,ggnmp}/__init__.py``:

   * DiagHessian / BatchDiagHessian: Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d,
     MaxPool1d/2d/3d, AvgPool1d/2d/3d, AdaptiveAvgPool1d/2d/3d, ZeroPad2d, Dropout, Flatten,
     ReLU, Sigmoid, Tanh, LeakyReLU, LogSigmoid, ELU, SELU (and its own Pad/Slicing modules);
     losses MSELoss, CrossEntropyLoss (also on ``[N, C, d]``) and BCEWithLogitsLoss
     (``[N, 1]`` only).
   * HMP / GGNMP (and PCHMP): Linear, Conv2d, MaxPool2d, AvgPool2d, ZeroPad2d, Dropout, Flatten,
     ReLU, Sigmoid, Tanh, BatchNorm1d (not PCHMP); losses MSELoss and CrossEntropyLoss.

2. Brute force with ``torch.func`` on models BackPACK cannot handle. For a parameter ``p`` (all
   other parameters fixed) and ``L_n`` the n-th sample's term of the loss (for "mean" it
   carries the 1/divisor factor; it is obtained exactly by letting only sample n's model output
   depend on ``p``): ``diag_h = diag ∂²L/∂p²``, ``diag_h_batch[n] = diag ∂²L_n/∂p²`` (summing to
   ``diag_h``), ``hmp = ∂²L/∂p² · v``, ``ggnmp = Jᵀ (∂²L/∂f²) J · v`` with ``J = ∂f/∂p``.

3. The positive-curvature Hessian (BDA-PCH) by its definition: per parameter block
   ``Σ_n J_nᵀ H_n J_n + Σ_activations J_aᵀ diag(m(R_a)) J_a`` with ``J_a`` the Jacobian of the
   activation's input w.r.t. the parameter, ``R_a = f''(input) ⊙ ∂L/∂(activation output)`` and
   ``m = abs`` (``pchmp_abs``) or ``clamp(min=0)`` (``pchmp_clip``). BackPACK's PCHMP differs:
   ``backpack/extensions/curvmatprod/pchmp/pchmpbase.py`` computes the residual as
   ``derivatives.hessian_diagonal(...) * g_out[0]`` while ``ElementwiseDerivatives.
   hessian_diagonal`` (``backpack/core/derivatives/elementwise.py``) already returns
   ``d2f * g_out[0]``, so BackPACK uses ``m(f'' ⊙ g²)``; a test below pins that down.

4. Product semantics (V = 1, 3; call-time checks of ``vectors``; TorchScript round trip).
5. Non-diagonal residuals (LayerNorm: a dense per-sample block, ``test_residual_blocks.py``)
   and cross terms (``x * sigmoid(x)``) against the exact Hessian.
"""
from __future__ import annotations

import copy
import functools
import re
from typing import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, hessian, jacrev, vmap

import fxcurv
from fxcurv.passes.curvature import products
from setups import (FunctionalWithScale, Gated, LayerNormNet, ResidualMLP, default_dtype,
                    make_batch, randomize_bn, with_head)

backpack = pytest.importorskip("backpack")
from backpack.extensions import (  # noqa: E402
    GGNMP,
    HMP,
    PCHMP,
    BatchDiagHessian,
    DiagHessian,
)

DTYPE = torch.float64
N = 3
NUM_OUT = 3
V = 2
TOL = dict(rtol=1e-8, atol=1e-12)         # vs BackPACK
BRUTE = dict(rtol=1e-9, atol=1e-12)       # vs torch.func
SAME = dict(rtol=1e-12, atol=1e-14)       # TorchScript vs eager
HESSIAN = ("diag_h", "diag_h_batch", "hmp", "ggnmp", "pchmp_abs", "pchmp_clip")
PRODUCTS = ("hmp", "ggnmp", "pchmp_abs", "pchmp_clip")
pytestmark = pytest.mark.filterwarnings(
    "ignore:Full backward hook is firing:UserWarning",
    "ignore:`torch.jit.load` is deprecated:FutureWarning")


@pytest.fixture(autouse=True, scope="module")
def _single_threaded(one_thread):
    """Run this module with one intra-op thread (the shared ``one_thread`` fixture)."""


@pytest.fixture
def float64_default():
    """BackPACK builds some intermediate tensors in the default dtype; restore it afterwards."""
    with default_dtype(DTYPE):
        yield


def random_vectors(model: nn.Module, v: int = V, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(v, *p.shape, generator=gen, dtype=DTYPE)
            for n, p in model.named_parameters()}


def run_fxcurv(model, loss_fn, x, y, quantities, vectors=None) -> dict:
    step = fxcurv.compile(model, loss_fn, list(quantities))
    args = (x, y) if vectors is None else (x, y, vectors)
    _, _, *values = step(*args)
    return dict(zip(quantities, values))


# =============================================================== 1. BackPACK comparison
DIAG, PROD = ("diag_h", "diag_h_batch"), ("hmp", "ggnmp")
BOTH = DIAG + PROD
# name -> (model builder, input shape, quantities BackPACK supports on it)
LAYERS = {
    "linear_sigmoid_tanh": (
        lambda: nn.Sequential(nn.Linear(4, 5, bias=False), nn.Sigmoid(), nn.Linear(5, 4),
                              nn.Tanh(), nn.Linear(4, NUM_OUT)), (4,), BOTH),
    "linear_dropout_eval_relu": (
        lambda: nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.ReLU(), nn.Linear(5, 4),
                              nn.Sigmoid(), nn.Linear(4, NUM_OUT)), (4,), BOTH),
    "leaky_relu_elu": (
        lambda: nn.Sequential(nn.Linear(4, 5), nn.LeakyReLU(0.2), nn.Linear(5, 4), nn.ELU(0.7),
                              nn.Linear(4, NUM_OUT)), (4,), DIAG),
    "selu_logsigmoid": (
        lambda: nn.Sequential(nn.Linear(4, 5), nn.SELU(), nn.Linear(5, 4), nn.LogSigmoid(),
                              nn.Linear(4, NUM_OUT)), (4,), DIAG),
    "conv2d_tanh_maxpool": (
        lambda: with_head([nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0)), nn.Tanh(),
                           nn.MaxPool2d(2)], (2, 5, 5)), (2, 5, 5), BOTH),
    "zeropad_conv2d_dilated_sigmoid_avgpool": (
        lambda: with_head([nn.ZeroPad2d((1, 0, 1, 2)),
                           nn.Conv2d(2, 3, 2, dilation=2, bias=False), nn.Sigmoid(),
                           nn.AvgPool2d(2, stride=1)], (2, 4, 4)), (2, 4, 4), BOTH),
    "conv2d_groups_relu_sigmoid": (
        lambda: with_head([nn.Conv2d(2, 4, 3, stride=2, padding=2, dilation=2, groups=2),
                           nn.ReLU(), nn.Conv2d(4, 2, 1), nn.Sigmoid()], (2, 5, 4)),
        (2, 5, 4), BOTH),
    "batchnorm1d_eval_tanh": (
        lambda: randomize_bn(nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(),
                                           nn.Linear(5, NUM_OUT))), (4,), PROD),
    "conv1d_tanh": (
        lambda: with_head([nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=2), nn.Tanh()],
                          (2, 6)), (2, 6), DIAG),
    "conv3d_sigmoid": (
        lambda: with_head([nn.Conv3d(2, 2, (2, 2, 1), stride=(1, 2, 1), padding=(1, 0, 1),
                                     dilation=(1, 1, 2)), nn.Sigmoid()], (2, 3, 4, 3)),
        (2, 3, 4, 3), DIAG),
    "conv_transpose1d_tanh": (
        lambda: with_head([nn.ConvTranspose1d(2, 3, 3, stride=2, padding=1, dilation=2),
                           nn.Tanh()], (2, 3)), (2, 3), DIAG),
    "conv_transpose2d_sigmoid": (
        lambda: with_head([nn.ConvTranspose2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0)),
                           nn.Sigmoid()], (2, 3, 2)), (2, 3, 2), DIAG),
    "conv_transpose3d_elu": (
        lambda: with_head([nn.ConvTranspose3d(2, 2, 2, stride=2, bias=False), nn.ELU()],
                          (2, 2, 1, 2)), (2, 2, 1, 2), DIAG),
    "pool1d": (
        lambda: with_head([nn.Conv1d(2, 3, 2), nn.Tanh(), nn.MaxPool1d(2),
                           nn.AvgPool1d(2, stride=1)], (2, 6)), (2, 6), DIAG),
    "pool3d": (
        lambda: with_head([nn.Conv3d(2, 2, 2, padding=1), nn.Sigmoid(), nn.MaxPool3d(2),
                           nn.AvgPool3d(1, stride=1)], (2, 3, 3, 3)), (2, 3, 3, 3), DIAG),
    "adaptive_avg_pool": (
        lambda: with_head([nn.Conv2d(2, 2, 1), nn.Tanh(), nn.AdaptiveAvgPool2d((2, 1))],
                          (2, 4, 3)), (2, 4, 3), DIAG),
    "adaptive_avg_pool_1d_3d": (
        lambda: with_head([nn.Conv3d(1, 2, 1), nn.Sigmoid(), nn.AdaptiveAvgPool3d((1, 2, 1)),
                           nn.Flatten(2), nn.AdaptiveAvgPool1d(1)], (1, 2, 4, 2)),
        (1, 2, 4, 2), DIAG),
}
LOSSES = {
    "ce_mean": lambda: nn.CrossEntropyLoss(reduction="mean"),
    "ce_sum": lambda: nn.CrossEntropyLoss(reduction="sum"),
    "mse_mean": lambda: nn.MSELoss(reduction="mean"),
    "mse_sum": lambda: nn.MSELoss(reduction="sum"),
}
EXTENSIONS = {"diag_h": DiagHessian, "diag_h_batch": BatchDiagHessian, "hmp": HMP,
              "ggnmp": GGNMP}


def make_model(layer: str, num_out: int = NUM_OUT) -> nn.Module:
    torch.manual_seed(sorted(LAYERS).index(layer))
    with default_dtype(DTYPE):
        model = LAYERS[layer][0]()
        if num_out != NUM_OUT:
            model[-1] = nn.Linear(model[-1].in_features, num_out)
    return model.eval()


def run_backpack(model, loss_fn, x, y, quantities, vectors) -> dict:
    """BackPACK's quantities from one backward pass on an extended deep copy; products are
    applied to ``vectors``."""
    model = backpack.extend(copy.deepcopy(model))
    loss_fn = backpack.extend(copy.deepcopy(loss_fn))
    with backpack.backpack(*[EXTENSIONS[q]() for q in quantities]):
        loss_fn(model(x), y).backward()
    results = {}
    for q in quantities:
        results[q] = {}
        for name, p in model.named_parameters():
            value = getattr(p, q)
            results[q][name] = value(vectors[name]) if q in PROD else value
    return results


def compare_backpack(model, loss_fn, x, y, quantities) -> None:
    vectors = random_vectors(model)
    products = any(q in PROD for q in quantities)
    ours = run_fxcurv(model, loss_fn, x, y, quantities, vectors if products else None)
    theirs = run_backpack(model, loss_fn, x, y, quantities, vectors)
    for q in quantities:
        assert list(ours[q]) == list(theirs[q]), f"{q}: keys differ"
        for name, ref in theirs[q].items():
            got = ours[q][name]
            assert got.shape == ref.shape, f"{q}[{name}]: {tuple(got.shape)} vs {tuple(ref.shape)}"
            torch.testing.assert_close(got, ref, **TOL, msg=f"{q}[{name}] vs BackPACK")


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("layer", list(LAYERS))
def test_hessian_quantities_equal_backpack(layer, loss, float64_default):
    _, in_shape, supported = LAYERS[layer]
    x, y = make_batch(in_shape, None, loss, N)
    compare_backpack(make_model(layer), LOSSES[loss](), x, y, supported)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("layer", ["linear_sigmoid_tanh", "selu_logsigmoid",
                                   "conv2d_tanh_maxpool"])
def test_diag_h_bce_with_logits_equal_backpack(layer, reduction, float64_default):
    """BCEWithLogitsLoss on ``[N, 1]``: DiagHessian only (HMP/GGNMP have no BCE extension)."""
    x, y = make_batch(LAYERS[layer][1], None, "bce", N, num_out=1)
    compare_backpack(make_model(layer, num_out=1), nn.BCEWithLogitsLoss(reduction=reduction),
                     x, y, DIAG)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_diag_h_cross_entropy_positions_equal_backpack(reduction, float64_default):
    """CrossEntropyLoss on ``[N, C, d]`` (every position is a sample)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 2), nn.Tanh(), nn.Conv1d(4, NUM_OUT, 1),
                          nn.Sigmoid()).to(DTYPE)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, 2, 4, generator=gen, dtype=DTYPE)
    y = torch.randint(0, NUM_OUT, (N, 3), generator=gen)
    compare_backpack(model, nn.CrossEntropyLoss(reduction=reduction), x, y, DIAG)


# ============================================================== 2. brute force (torch.func)
class Functional(FunctionalWithScale):
    """F.* with raw parameters; a scale parameter in an elementwise product."""

    def forward(self, x):
        h = F.softplus(F.linear(x, self.w1, self.b1), beta=2.0, threshold=1.0) * self.scale
        return F.linear(torch.sigmoid(h), self.w2, self.b2)


class ViewCat(nn.Module):
    """Two branches (sigmoid, tanh) concatenated, reshaped with ``x.view`` and a transpose."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 3)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.cat([torch.sigmoid(self.a(x)), torch.tanh(self.b(x))], dim=1)
        h = h.view(h.size(0), 2, 3).transpose(1, 2).reshape(h.size(0), 6)
        return self.head(F.elu(h))


class ConvAvgPool(nn.Module):
    """Grouped conv -> SiLU -> avg_pool2d (count_include_pad=False) -> conv -> GELU(tanh)
    -> adaptive average pool -> Linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 2, padding=1, groups=2)
        self.conv2 = nn.Conv2d(4, 3, 2)
        self.head = nn.Linear(3 * 2, 3)

    def forward(self, x):
        h = F.silu(self.conv1(x))
        h = F.avg_pool2d(h, 2, stride=1, padding=1, count_include_pad=False)
        h = F.gelu(self.conv2(h), approximate="tanh")
        h = F.adaptive_avg_pool2d(h, (2, 1))
        return self.head(h.flatten(1))


class TwoUses(nn.Module):
    """One Linear used on two branches (its terms are summed over the uses before squaring),
    one of them in the divisor of a ``div`` (its ``other`` residual ``2 g y / b²``)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x)) + x / (torch.sigmoid(self.fc(2 * x)) + 0.5))


class BroadcastGates(nn.Module):
    """Quotients whose arguments broadcast against each other and share parameters:
    ``h / (1 + s)`` (``s: [N, C, 1, 1]``, a squeeze-excitation gate) and ``s / (2 + t)``
    (``t: [N, 1, H, W]``: both broadcast)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 3, 1)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        s = torch.sigmoid(self.fc(h.mean((2, 3), keepdim=True)))
        t = torch.sigmoid(h.mean(1, keepdim=True))
        return self.head((h / (1 + s) + s / (2 + t)).mean((2, 3)))


class TiedLayers(nn.Module):
    """One layer applied twice (tied weights): the second use's data argument depends on the
    weight it is multiplied with, so the Hessian has a cross term of the two arguments.
    ``kind``: ``nn.Linear``, ``nn.Conv2d``, a raw parameter through ``matmul`` or ``einsum``."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        if kind == "conv":
            self.layer = nn.Conv2d(2, 2, 3, padding=1)
        elif kind == "linear":
            self.layer = nn.Linear(4, 4)
        else:
            self.weight = nn.Parameter(torch.randn(4, 4) / 2)
        self.head = nn.Linear(2 * 4 * 3 if kind == "conv" else 4, 3)

    def apply(self, h):
        if self.kind == "matmul":
            return h @ self.weight
        if self.kind == "einsum":
            return torch.einsum("ni,ij->nj", h, self.weight)
        return self.layer(h)

    def forward(self, x):
        return self.head(torch.tanh(self.apply(torch.tanh(self.apply(x)))).flatten(1))


def _gelu_silu_softplus():
    return nn.Sequential(nn.Linear(4, 5), nn.GELU(), nn.Linear(5, 5), nn.SiLU(),
                         nn.Linear(5, 4), nn.Softplus(), nn.Linear(4, 3))


def _labels(classes, *shape):
    return torch.randint(0, classes, shape)


def _randn(*shape):
    return torch.randn(*shape, dtype=DTYPE)


# name -> (model, loss, x, y) builders (seeded)
BRUTE_CASES: dict[str, Callable] = {
    "residual_tanh_mse": lambda: (ResidualMLP(activation=torch.tanh), nn.MSELoss(),
                                  _randn(4, 4), _randn(4, 3)),
    "functional_ce": lambda: (Functional(), nn.CrossEntropyLoss(), _randn(4, 4),
                              _labels(3, 4)),
    "gelu_silu_softplus_ce_sum": lambda: (_gelu_silu_softplus(),
                                          nn.CrossEntropyLoss(reduction="sum"),
                                          _randn(3, 4), _labels(3, 3)),
    "view_cat_mse_sum": lambda: (ViewCat(), nn.MSELoss(reduction="sum"), _randn(3, 4),
                                 _randn(3, 3)),
    "conv_avgpool_ce": lambda: (ConvAvgPool(), nn.CrossEntropyLoss(), _randn(3, 2, 4, 3),
                                _labels(3, 3)),
    "two_uses_div_ce_sum": lambda: (TwoUses(), nn.CrossEntropyLoss(reduction="sum"),
                                    _randn(3, 4), _labels(3, 3)),
    "broadcast_div_ce": lambda: (BroadcastGates(), nn.CrossEntropyLoss(), _randn(3, 2, 4, 4),
                                 _labels(3, 3)),
    "tied_linear_ce": lambda: (TiedLayers("linear"), nn.CrossEntropyLoss(), _randn(3, 4),
                               _labels(3, 3)),
    "tied_conv_mse": lambda: (TiedLayers("conv"), nn.MSELoss(), _randn(2, 2, 4, 3),
                              _randn(2, 3)),
    "tied_matmul_ce_sum": lambda: (TiedLayers("matmul"), nn.CrossEntropyLoss(reduction="sum"),
                                   _randn(3, 4), _labels(3, 3)),
    "tied_einsum_ce": lambda: (TiedLayers("einsum"), nn.CrossEntropyLoss(), _randn(3, 4),
                               _labels(3, 3)),
    "bce_multioutput": lambda: (
        nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), nn.BCEWithLogitsLoss(),
        _randn(4, 4), torch.rand(4, 3, dtype=DTYPE)),
    "ce_positions": lambda: (
        nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.Sigmoid(), nn.Conv1d(4, 3, 1)),
        nn.CrossEntropyLoss(), _randn(3, 2, 4), _labels(3, 3, 4)),
    "sequence_tanh_mse": lambda: (
        nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), nn.MSELoss(),
        _randn(3, 2, 4), _randn(3, 2, 3)),
    "nll_log_softmax": lambda: (
        nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 3), nn.LogSoftmax(dim=1)),
        nn.NLLLoss(), _randn(4, 4), _labels(3, 4)),
}


def build_case(name: str):
    torch.manual_seed(sorted(BRUTE_CASES).index(name) + 100)
    with default_dtype(DTYPE):
        model, loss_fn, x, y = BRUTE_CASES[name]()
    return model.to(DTYPE).eval(), loss_fn, x, y


def ggn_split(model: nn.Module, loss_fn: Callable):
    """fxcurv fuses NLL after LogSoftmax(dim=1) into cross-entropy on the logits, so its GGN
    is that of the logits (the GGN w.r.t. log-probabilities is zero: NLL is linear)."""
    if isinstance(loss_fn, nn.NLLLoss):
        return model[:-1], lambda z, y: F.nll_loss(F.log_softmax(z, dim=1), y)
    return None


def brute_force(model: nn.Module, loss_fn: Callable, x, y, vectors: dict,
                split: tuple | None = None) -> dict:
    """Per parameter: Hessian diagonal, per-sample Hessian diagonals, Hessian block and GGN
    block times ``vectors`` (no fxcurv code involved). ``split = (model part, loss)``: the
    GGN is taken at that part's output (NLL after LogSoftmax: the logits, as in BackPACK)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    out0 = functional_call(model, params, (x,)).detach()
    samples = out0.size(0)
    ggn_model, ggn_loss = split or (model, loss_fn)
    logits = functional_call(ggn_model, params, (x,)).detach()
    h_out = hessian(lambda o: ggn_loss(o, y))(logits).reshape(logits.numel(), logits.numel())

    def output(name, value, net=model):
        return functional_call(net, {**params, name: value}, (x,))

    def loss_of(name):
        def fn(value, mask=None):
            out = output(name, value)
            if mask is not None:  # only sample n's output depends on the parameter
                out = mask * out + (1 - mask) * out0
            return loss_fn(out, y)
        return fn

    masks = torch.eye(samples, dtype=out0.dtype).reshape(samples, samples,
                                                         *[1] * (out0.dim() - 1))
    masks = masks.expand(samples, *out0.shape)         # masks[n]: ones on sample n
    ref = {"diag_h": {}, "diag_h_batch": {}, "hmp": {}, "ggnmp": {}, "hessian_block": {}}
    for name, p in params.items():
        size = p.numel()
        block = hessian(loss_of(name))(p).reshape(size, size)
        per_sample = vmap(hessian(loss_of(name)), in_dims=(None, 0))(p, masks)
        per_sample = per_sample.reshape(samples, size, size).diagonal(dim1=1, dim2=2)
        jac = jacrev(lambda v: output(name, v, ggn_model))(p).reshape(logits.numel(), size)
        ggn = jac.T @ h_out @ jac
        flat = vectors[name].reshape(vectors[name].size(0), size)
        ref["diag_h"][name] = block.diagonal().reshape(p.shape)
        ref["diag_h_batch"][name] = per_sample.reshape(samples, *p.shape)
        ref["hmp"][name] = (flat @ block.T).reshape(vectors[name].shape)
        ref["ggnmp"][name] = (flat @ ggn.T).reshape(vectors[name].shape)
        ref["hessian_block"][name] = block
    return ref


@functools.lru_cache(maxsize=None)
def brute_case(name: str):
    """``(fxcurv outputs, reference)`` once per case."""
    model, loss_fn, x, y = build_case(name)
    vectors = random_vectors(model, v=3, seed=1)
    ours = run_fxcurv(model, loss_fn, x, y, HESSIAN, vectors)
    return ours, brute_force(model, loss_fn, x, y, vectors, ggn_split(model, loss_fn))


def assert_dicts_close(actual: dict, expected: dict, what: str, tol=BRUTE) -> None:
    assert list(actual) == list(expected), f"{what}: keys {list(actual)} vs {list(expected)}"
    for name, ref in expected.items():
        assert actual[name].shape == ref.shape, \
            f"{what}[{name}]: {tuple(actual[name].shape)} vs {tuple(ref.shape)}"
        torch.testing.assert_close(actual[name], ref, **tol, msg=f"{what}[{name}]")


@pytest.mark.parametrize("quantity", ["diag_h", "diag_h_batch", "hmp", "ggnmp"])
@pytest.mark.parametrize("case", list(BRUTE_CASES))
def test_brute_force(case, quantity):
    ours, ref = brute_case(case)
    assert_dicts_close(ours[quantity], ref[quantity], f"{case} {quantity}")


def test_products_by_forward_tangents_on_chains():
    """Linear layers and elementwise ops up to the loss: block products by forward tangents,
    no propagated factor; a residual connection: the factor products."""
    model, loss_fn, _, _ = build_case("gelu_silu_softplus_ce_sum")
    code = fxcurv.compile(model, loss_fn, ["hmp", "pchmp_clip"]).code
    assert "output_hessian_product" in code
    assert "residual_sqrt" not in code and "sqrt_ggn" not in code
    model, loss_fn, _, _ = build_case("residual_tanh_mse")
    assert "residual_sqrt" in fxcurv.compile(model, loss_fn, ["hmp"]).code


@pytest.fixture
def residual_factors_only(monkeypatch):
    """Every parameter's Hessian diagonal from the residual factors (no parameter is small
    enough for its entries' forward tangents)."""
    monkeypatch.setattr(products, "MAX_DIAGONAL_TANGENTS", 0)


@pytest.mark.parametrize("case", list(BRUTE_CASES))
def test_diag_h_by_residual_factors_equals_brute_force(case, residual_factors_only):
    """The factor path that the chains' small parameters now skip, on every brute-force
    case (the default run takes those parameters' diagonals from tangents)."""
    model, loss_fn, x, y = build_case(case)
    ours = run_fxcurv(model, loss_fn, x, y, ("diag_h", "diag_h_batch"))
    _, ref = brute_case(case)
    for quantity in ("diag_h", "diag_h_batch"):
        assert_dicts_close(ours[quantity], ref[quantity], f"{case} {quantity} (factors)")


@pytest.mark.parametrize("layer", [name for name, (_, _, supported) in LAYERS.items()
                                   if "diag_h" in supported])
def test_diag_h_by_residual_factors_equals_backpack(layer, residual_factors_only,
                                                    float64_default):
    _, in_shape, _ = LAYERS[layer]
    x, y = make_batch(in_shape, None, "ce_mean", N)
    compare_backpack(make_model(layer), LOSSES["ce_mean"](), x, y, DIAG)


def test_diag_h_of_small_parameters_on_a_chain_by_forward_tangents():
    """Convolutions, tanh, max pooling, flatten and linear up to the loss: the first layer
    has 10 entries, fewer than the 12 channels of the sigmoid above the next layer, so its
    Hessian diagonal comes from its entries' tangents; the layers above pull their own
    residuals back (no residual factor at all). Where the first layer has more entries than
    that lower bound, or there is a residual connection, the factors."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 2), nn.Tanh(), nn.MaxPool2d(2), nn.Conv2d(2, 12, 2),
                          nn.Sigmoid(), nn.Flatten(), nn.Linear(48, 3)).to(DTYPE)
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), ["diag_h", "diag_h_batch"])
    assert "tangent_diagonal" in step.code and "residual_sqrt" not in step.code
    x, y = torch.randn(5, 1, 7, 7, dtype=DTYPE), torch.tensor([0, 2, 1, 1, 0])
    _, _, diag_h, diag_h_batch = step(x, y)
    ref = brute_force(model, nn.CrossEntropyLoss(), x, y, random_vectors(model))
    assert_dicts_close(diag_h, ref["diag_h"], "diag_h by tangents")
    assert_dicts_close(diag_h_batch, ref["diag_h_batch"], "diag_h_batch by tangents")
    scripted = torch.jit.script(step)(x[:3], y[:3])  # (another batch size)
    for got, expected in zip(scripted[1:], step(x[:3], y[:3])[1:]):
        assert_dicts_close(got, expected, "scripted", tol=SAME)
    model[0] = nn.Conv2d(1, 4, 2).to(DTYPE)  # 20 entries > 12
    model[3] = nn.Conv2d(4, 12, 2).to(DTYPE)
    assert "tangent_diagonal" not in fxcurv.compile(model, nn.CrossEntropyLoss(),
                                                    ["diag_h"]).code
    model, loss_fn, _, _ = build_case("residual_tanh_mse")
    assert "residual_sqrt" in fxcurv.compile(model, loss_fn, ["diag_h"]).code


@pytest.mark.parametrize("case", list(BRUTE_CASES))
def test_diag_h_batch_sums_to_diag_h_and_the_block_is_not_the_ggn(case):
    ours, ref = brute_case(case)
    for name, value in ours["diag_h_batch"].items():
        torch.testing.assert_close(value.sum(0), ours["diag_h"][name], **BRUTE, msg=name)
    # every case has a non-linear activation: some block differs from its GGN block
    assert any(not torch.allclose(ref["hmp"][n], ref["ggnmp"][n]) for n in ref["hmp"])


@pytest.mark.parametrize("case", list(BRUTE_CASES))
def test_pch_identities(case):
    """``H = G + R₊ - R₋``, ``abs = G + R₊ + R₋``, ``clip = G + R₊``: so
    ``hmp + pchmp_abs = 2 pchmp_clip`` and ``pchmp_abs - pchmp_clip = pchmp_clip - hmp``."""
    ours, _ = brute_case(case)
    for name in ours["hmp"]:
        torch.testing.assert_close(ours["hmp"][name] + ours["pchmp_abs"][name],
                                   2 * ours["pchmp_clip"][name], **BRUTE, msg=name)


class DivByParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.d = nn.Parameter(torch.rand(3) + 1)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        return self.head(x / self.d)


@pytest.mark.parametrize("quantity", ["diag_h", "diag_h_batch", "hmp"])
@pytest.mark.parametrize("shape", [(3,), (1, 3)])
def test_division_by_a_parameter_is_refused(shape, quantity):
    """A residual on a value without a sample axis (x / w with w a parameter) is not
    supported yet: a clear compile-time error, never a wrong number."""
    torch.manual_seed(0)
    model = DivByParameter().to(DTYPE)
    with torch.no_grad():
        model.d = nn.Parameter(model.d.detach().reshape(shape))
    with pytest.raises(fxcurv.CompileError, match=rf"node 'truediv'.*quantity '{quantity}'"
                       r".*without a sample axis"):
        fxcurv.compile(model, nn.CrossEntropyLoss(reduction="sum"), [quantity])


def test_reference_diag_h_batch_carries_the_mean_factor():
    """Self-check of the reference: for "mean", the n-th term is 1/N of the sum's."""
    model, _, x, y = build_case("functional_ce")
    vectors = random_vectors(model)
    mean = brute_force(model, nn.CrossEntropyLoss(), x, y, vectors)["diag_h_batch"]
    total = brute_force(model, nn.CrossEntropyLoss(reduction="sum"), x, y, vectors)
    for name in mean:
        torch.testing.assert_close(mean[name] * x.size(0), total["diag_h_batch"][name], **BRUTE)


# ============================================================ 3. positive-curvature Hessian
def _pch_mlp() -> nn.Sequential:
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 4), nn.Tanh(),
                         nn.Linear(4, NUM_OUT)).to(DTYPE)


def _pch_batch(loss: str):
    gen = torch.Generator().manual_seed(11)
    x = 2 * torch.randn(4, 4, generator=gen, dtype=DTYPE)
    if loss.startswith("ce"):
        return x, torch.randint(0, NUM_OUT, (4,), generator=gen)
    return x, torch.randn(4, NUM_OUT, generator=gen, dtype=DTYPE)


def _mlp_forward(params: dict, x):
    """The MLP of :func:`_pch_mlp` written out: output, pre-activations, activations."""
    z1 = F.linear(x, params["0.weight"], params["0.bias"])
    h1 = torch.sigmoid(z1)
    z2 = F.linear(h1, params["2.weight"], params["2.bias"])
    h2 = torch.tanh(z2)
    return F.linear(h2, params["4.weight"], params["4.bias"]), (z1, z2), (h1, h2)


_ACTIVATIONS = (torch.sigmoid, torch.tanh)


def pch_reference(model, loss_fn, x, y, vectors, modify: Callable,
                  gradient_power: int = 1) -> dict:
    """``[G + Σ_a J_aᵀ diag(modify(f_a''(z_a) ⊙ g_a^power)) J_a] v`` per parameter block, with
    ``g_a = ∂L/∂h_a`` (autograd) and ``f''`` by ``torch.func.grad`` twice."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
    out, pre, post = _mlp_forward(leaves, x)
    torch.testing.assert_close(out, model(x), **SAME)          # the written-out forward
    gradients = torch.autograd.grad(loss_fn(out, y), post)
    residuals = []
    for f, z, g in zip(_ACTIVATIONS, pre, gradients):
        second = vmap(grad(grad(f)))(z.detach().flatten()).reshape(z.shape)
        residuals.append(modify(second * g ** gradient_power).flatten())
    out0 = out.detach()
    h_out = hessian(lambda o: loss_fn(o, y))(out0).reshape(out0.numel(), out0.numel())
    result = {}
    for name, p in params.items():
        def part(value, k):
            return _mlp_forward({**params, name: value}, x)[k]
        size = p.numel()
        jac = jacrev(lambda v: part(v, 0))(p).reshape(-1, size)
        block = jac.T @ h_out @ jac
        jacs = jacrev(lambda v: part(v, 1))(p)
        for j, r in zip(jacs, residuals):
            j = j.reshape(-1, size)
            block = block + j.T @ (r.unsqueeze(1) * j)
        flat = vectors[name].reshape(vectors[name].size(0), size)
        result[name] = (flat @ block.T).reshape(vectors[name].shape)
    return result


PCH_LOSSES = {"ce_mean": nn.CrossEntropyLoss, "mse_sum": lambda: nn.MSELoss(reduction="sum")}
MODIFY = {"pchmp_abs": torch.abs, "pchmp_clip": lambda r: r.clamp(min=0)}


@pytest.mark.parametrize("loss", list(PCH_LOSSES))
def test_pch_reference_with_identity_is_the_hessian_block(loss):
    """Self-check of the reference: with ``m = id`` it is torch.func's Hessian block."""
    model, loss_fn = _pch_mlp(), PCH_LOSSES[loss]()
    x, y = _pch_batch(loss)
    vectors = random_vectors(model)
    expected = brute_force(model, loss_fn, x, y, vectors)["hmp"]
    assert_dicts_close(pch_reference(model, loss_fn, x, y, vectors, lambda r: r), expected,
                       "identity reference")


@pytest.mark.parametrize("loss", list(PCH_LOSSES))
@pytest.mark.parametrize("quantity", list(MODIFY))
def test_pchmp_matches_definition(quantity, loss):
    model, loss_fn = _pch_mlp(), PCH_LOSSES[loss]()
    x, y = _pch_batch(loss)
    vectors = random_vectors(model, v=3)
    ours = run_fxcurv(model, loss_fn, x, y, [quantity, "hmp"], vectors)
    expected = pch_reference(model, loss_fn, x, y, vectors, MODIFY[quantity])
    assert_dicts_close(ours[quantity], expected, quantity)
    # the residuals have both signs here: the modification changes the hidden blocks
    for name in ("0.weight", "2.bias"):
        assert not torch.allclose(ours[quantity][name], ours["hmp"][name]), name


def test_all_residuals_nonnegative_pch_equals_hessian():
    """Softplus (f'' > 0) into a positive read-out, targets below the predictions (MSE):
    every residual ``f'' ⊙ g`` is > 0, so hmp = pchmp_abs = pchmp_clip ≠ ggnmp."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Softplus(), nn.Linear(5, 2)).to(DTYPE)
    with torch.no_grad():
        model[2].weight.abs_()
    x = torch.randn(3, 4, dtype=DTYPE)
    y = model(x).detach() - 1.0
    loss_fn = nn.MSELoss()
    # the premise: g = ∂L/∂h > 0 and softplus'' > 0
    h = model[1](model[0](x)).detach().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_fn(model[2](h), y), h)
    assert (g > 0).all()
    vectors = random_vectors(model, v=3)
    ours = run_fxcurv(model, loss_fn, x, y, PRODUCTS, vectors)
    for name in ours["hmp"]:
        for q in ("pchmp_abs", "pchmp_clip"):
            torch.testing.assert_close(ours[q][name], ours["hmp"][name], **BRUTE, msg=(q, name))
    assert not torch.allclose(ours["hmp"]["0.weight"], ours["ggnmp"]["0.weight"])
    assert_dicts_close(ours["hmp"], brute_force(model, loss_fn, x, y, vectors)["hmp"], "hmp")


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_piecewise_linear_network_hessian_is_the_ggn(model_name):
    """ReLU / LeakyReLU / max-pool networks: no residual, all four products coincide."""
    torch.manual_seed(5)
    if model_name == "mlp":
        model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.LeakyReLU(0.1),
                              nn.Linear(5, NUM_OUT))
        x = torch.randn(4, 4, dtype=DTYPE)
    else:
        model = with_head([nn.Conv2d(2, 3, 2), nn.ReLU(), nn.MaxPool2d(2)], (2, 5, 5))
        x = torch.randn(3, 2, 5, 5, dtype=DTYPE)
    model = model.to(DTYPE)
    y = torch.randint(0, NUM_OUT, (x.size(0),))
    vectors = random_vectors(model, v=3)
    ours = run_fxcurv(model, nn.CrossEntropyLoss(), x, y, PRODUCTS, vectors)
    for q in ("ggnmp", "pchmp_abs", "pchmp_clip"):
        assert_dicts_close(ours[q], ours["hmp"], f"{q} vs hmp", tol=dict(rtol=1e-12,
                                                                          atol=1e-15))
    expected = brute_force(model, nn.CrossEntropyLoss(), x, y, vectors)["hmp"]
    assert_dicts_close(ours["hmp"], expected, "hmp")


@pytest.mark.parametrize("mode", ["abs", "clip"])
def test_backpack_pchmp_uses_squared_output_gradient(mode, float64_default):
    """Documents BackPACK 1.7.1's PCHMP: its residual is ``m(f'' ⊙ g²)`` (``hessian_diagonal``,
    which already multiplies by ``g_out``, times ``g_out`` again), not the definition's
    ``m(f'' ⊙ g)`` that fxcurv follows. The two differ; BackPACK equals the ``g²`` reference."""
    model, loss_fn = _pch_mlp(), nn.CrossEntropyLoss()
    x, y = _pch_batch("ce_mean")
    vectors = random_vectors(model)
    modify = MODIFY[f"pchmp_{mode}"]
    extended = backpack.extend(copy.deepcopy(model))
    with backpack.backpack(PCHMP(modify=mode)):
        backpack.extend(copy.deepcopy(loss_fn))(extended(x), y).backward()
    theirs = {n: p.pchmp(vectors[n]) for n, p in extended.named_parameters()}
    squared = pch_reference(model, loss_fn, x, y, vectors, modify, gradient_power=2)
    assert_dicts_close(theirs, squared, f"BackPACK pchmp ({mode}) vs the g² reference", tol=TOL)
    ours = run_fxcurv(model, loss_fn, x, y, [f"pchmp_{mode}"], vectors)[f"pchmp_{mode}"]
    definition = pch_reference(model, loss_fn, x, y, vectors, modify)
    assert_dicts_close(ours, definition, f"fxcurv pchmp_{mode} vs the definition")
    # the hidden layers' blocks differ between the two; the read-out (no residual) agrees
    assert not torch.allclose(theirs["0.weight"], ours["0.weight"], rtol=1e-3)
    torch.testing.assert_close(theirs["4.weight"], ours["4.weight"], **TOL)


# ================================================================= 4. product semantics
def _semantics_setup():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 4), nn.Tanh(),
                          nn.Linear(4, NUM_OUT)).to(DTYPE)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(4, 4, generator=gen, dtype=DTYPE)
    y = torch.randint(0, NUM_OUT, (4,), generator=gen)
    return model, nn.CrossEntropyLoss(), x, y


@pytest.mark.parametrize("num_vectors", [1, 3])
def test_products_for_v_vectors(num_vectors):
    """``[V, *p.shape]`` in and out; each row is the block times that vector alone."""
    model, loss_fn, x, y = _semantics_setup()
    vectors = random_vectors(model, v=num_vectors, seed=num_vectors)
    step = fxcurv.compile(model, loss_fn, list(PRODUCTS))
    _, _, *values = step(x, y, vectors)
    ours = dict(zip(PRODUCTS, values))
    ref = brute_force(model, loss_fn, x, y, vectors)
    for q in ("hmp", "ggnmp"):
        assert_dicts_close(ours[q], ref[q], q)
    for q in ("pchmp_abs", "pchmp_clip"):
        assert_dicts_close(ours[q], pch_reference(model, loss_fn, x, y, vectors, MODIFY[q]), q)
    for i in range(num_vectors):
        single = {n: v[i:i + 1] for n, v in vectors.items()}
        _, _, *rows = step(x, y, single)
        for q, row in zip(PRODUCTS, rows):
            for name, value in row.items():
                assert value.shape == (1, *dict(model.named_parameters())[name].shape)
                torch.testing.assert_close(value[0], ours[q][name][i], **SAME, msg=(q, name))


def _bad_vectors(model, kind: str):
    vectors = random_vectors(model)
    if kind == "missing":
        del vectors["2.bias"]
    elif kind == "no_leading_axis":
        vectors["2.bias"] = vectors["2.bias"][0]
    elif kind == "wrong_trailing":
        vectors["2.bias"] = torch.randn(V, 5, dtype=DTYPE)
    elif kind == "extra_axis":
        vectors["2.bias"] = vectors["2.bias"].unsqueeze(-1)
    return vectors


@pytest.mark.parametrize("kind", ["missing", "no_leading_axis", "wrong_trailing",
                                  "extra_axis"])
def test_bad_vectors_raise_value_error_naming_the_parameter(kind):
    model, loss_fn, x, y = _semantics_setup()
    vectors = _bad_vectors(model, kind)
    step = fxcurv.compile(model, loss_fn, ["diag_h", "hmp", "pchmp_clip"])
    message = "no entry for parameter '2.bias'" if kind == "missing" else \
        re.escape("vectors['2.bias'] must have shape [V, 4]")
    with pytest.raises(ValueError, match=message):
        step(x, y, vectors)
    with pytest.raises(torch.jit.Error, match="ValueError: fxcurv: .*" + message):
        torch.jit.script(step)(x, y, vectors)


def test_vectors_in_another_float_dtype_are_converted():
    model, loss_fn, x, y = _semantics_setup()
    vectors = random_vectors(model)
    step = fxcurv.compile(model, loss_fn, ["hmp"])
    _, _, expected = step(x, y, vectors)
    _, _, got = step(x, y, {n: v.float() for n, v in vectors.items()})
    for name, value in got.items():
        assert value.dtype == DTYPE
        torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("quantity", HESSIAN)
def test_torchscript_round_trip(quantity, tmp_path):
    model, loss_fn, x, y = _semantics_setup()
    step = fxcurv.compile(model, loss_fn, [quantity])
    scripted = torch.jit.script(step)
    path = tmp_path / f"{quantity}.pt"
    scripted.save(str(path))
    loaded = torch.jit.load(str(path))
    product = quantity in PRODUCTS
    for batch, v in ((4, 3), (2, 1)):                   # sizes come from the inputs
        x_b, y_b = x[:batch], y[:batch]
        args = (x_b, y_b, random_vectors(model, v=v)) if product else (x_b, y_b)
        expected = step(*args)
        for module, what in ((scripted, "scripted"), (loaded, "loaded")):
            got = module(*args)
            torch.testing.assert_close(got[0], expected[0], **SAME, msg=what)
            for part in (1, 2):
                assert_dicts_close(got[part], expected[part], f"{quantity} {what}", tol=SAME)


# ================================================= 5. non-diagonal residuals, cross terms
Swish = Gated  # h * sigmoid(h): both factors depend on fc's parameters


@pytest.mark.parametrize("model", [LayerNormNet, Swish])
def test_non_diagonal_second_derivatives_give_the_exact_hessian(model):
    """LayerNorm's residual in its input is not diagonal: its dense per-sample block enters
    through ``eigh`` factors. ``h * sigmoid(h)``: the mixed second derivative of mul enters as
    cross factors seeded on both arguments. diag_h, diag_h_batch and hmp equal the exact
    Hessian."""
    torch.manual_seed(2)
    net = model().to(DTYPE)
    x, y = torch.randn(3, 4, dtype=DTYPE), torch.randint(0, 3, (3,))
    vectors = random_vectors(net)
    quantities = ["diag_h", "diag_h_batch", "hmp"]
    ours = run_fxcurv(net, nn.CrossEntropyLoss(), x, y, quantities, vectors)
    expected = brute_force(net, nn.CrossEntropyLoss(), x, y, vectors)
    for quantity in quantities:
        assert_dicts_close(ours[quantity], expected[quantity], quantity)


@pytest.mark.parametrize("model", [LayerNormNet, Swish])
def test_ggn_products_compile_where_the_hessian_does_not(model):
    """``ggnmp`` needs no residual: it compiles and equals the GGN block."""
    torch.manual_seed(2)
    net = model().to(DTYPE)
    x, y = torch.randn(3, 4, dtype=DTYPE), torch.randint(0, 3, (3,))
    vectors = random_vectors(net)
    ours = run_fxcurv(net, nn.CrossEntropyLoss(), x, y, ["ggnmp"], vectors)
    expected = brute_force(net, nn.CrossEntropyLoss(), x, y, vectors)["ggnmp"]
    assert_dicts_close(ours["ggnmp"], expected, "ggnmp")


@pytest.mark.parametrize("quantity", ["diag_h", "diag_h_batch", "hmp", "pchmp_abs"])
def test_residuals_build_nothing_for_parameters_they_do_not_reach(quantity):
    """A residual seeded at a deep activation adds nothing to the layers after it: the step
    builds no ``[D, N, *p]`` zeros for them (their cost once dominated smooth networks)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 3), nn.Tanh(),
                          nn.Linear(3, 2)).double()
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), [quantity])
    assert "batch_zeros" not in step.code
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 2, (6,))
    extra = ({n: torch.randn(2, *p.shape, dtype=torch.float64)
              for n, p in model.named_parameters()},) if quantity.endswith("mp") or \
        quantity.startswith("pchmp") else ()
    got = step(x, y, *extra)[2]
    if quantity == "diag_h":
        def loss(params):
            return F.cross_entropy(functional_call(model, params, (x,)), y)
        params = dict(model.named_parameters())
        for name, p in params.items():
            def partial(value, name=name):
                return loss({**params, name: value})
            full = hessian(partial)(p.detach()).reshape(p.numel(), p.numel())
            torch.testing.assert_close(got[name], full.diagonal().reshape(p.shape))
