"""GGN-family quantities vs ``torch.func`` brute force, on models BackPACK cannot handle (float64).

Reference (no fxcurv code involved): flatten the trainable parameters into one vector ``θ``
(``torch.func.functional_call`` on the unflattened pieces), then per sample n

* ``J_n = ∂f(θ, x_n)/∂θ`` by ``torch.func.jacrev`` on the model output of sample n alone,
* ``H_n`` = block n of ``∂²L/∂f²``, the Hessian of the *full-batch* loss w.r.t. the model output
  (``torch.func.hessian``); it carries every reduction's scaling, and the losses are separable,
  so the other blocks are zero (checked),
* ``G_n = J_nᵀ H_n J_n`` and ``G = Σ_n G_n``.

Then ``diag_ggn_exact = diag G``, ``diag_ggn_exact_batch[n] = diag G_n`` and, per parameter
block ``(p, p)``: ``Σ_c s[c, n] s[c, n]ᵀ = G_n[p, p]`` for ``s = sqrt_ggn_exact[p]`` of shape
``[C, N, *p.shape]``. A parameter used twice has one block of θ, so the reference is the true
GGN (contributions summed before squaring). NLL after ``LogSoftmax(dim=1)`` is fused into
cross-entropy on the logits, so its reference is the GGN of the logits (the model without its
last module, with the loss ``nll(log_softmax(z))``).
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, hessian, jacrev

import fxcurv
from setups import FunctionalWithScale, ResidualMLP, linear_inputs

DTYPE = torch.float64
TOL = dict(rtol=1e-9, atol=1e-12)
EXACT = ["diag_ggn_exact", "diag_ggn_exact_batch", "sqrt_ggn_exact", "kflr"]


# ----------------------------------------------------------------------------------- models
class Functional(FunctionalWithScale):
    """F.* with raw parameters, one of them in an elementwise product."""

    def forward(self, x):
        h = F.softplus(F.linear(x, self.w1, self.b1)) * self.scale
        return F.linear(h, self.w2, self.b2)


class Shared(nn.Module):
    """One ``nn.Linear`` applied twice."""

    def __init__(self, d: int = 4, d_out: int = 3):
        super().__init__()
        self.shared = nn.Linear(d, d)
        self.head = nn.Linear(d, d_out)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


class Untied(nn.Module):
    """:class:`Shared` with the two uses as two separate copies (for the self-check)."""

    def __init__(self, shared: Shared):
        super().__init__()
        self.first = copy.deepcopy(shared.shared)
        self.second = copy.deepcopy(shared.shared)
        self.head = copy.deepcopy(shared.head)

    def forward(self, x):
        return self.head(torch.tanh(self.second(torch.tanh(self.first(x)))))


class LayerNormSeq(nn.Module):
    """``[N, T, D]`` -> Linear -> LayerNorm (random affine) -> mean over T -> Linear."""

    def __init__(self, d: int = 4, hidden: int = 5, d_out: int = 3):
        super().__init__()
        self.proj = nn.Linear(d, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, d_out)
        with torch.no_grad():
            self.norm.weight.copy_(torch.randn(hidden))
            self.norm.bias.copy_(torch.randn(hidden))

    def forward(self, x):
        return self.head(self.norm(self.proj(x)).mean(1))


class EmbeddingMean(nn.Module):
    """Tokens ``[N, T]`` -> Embedding -> tanh -> mean over T -> Linear."""

    def __init__(self, vocab: int = 6, d: int = 4, d_out: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.head = nn.Linear(d, d_out)

    def forward(self, x):
        return self.head(torch.tanh(self.emb(x)).mean(1))


def conv_bn_eval() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(2, 3, 2), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(),
                          nn.Linear(3 * 3 * 3, 3))
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(3))
        bn.running_var.copy_(torch.rand(3) + 0.5)
        bn.weight.copy_(torch.randn(3))
        bn.bias.copy_(torch.randn(3))
    return model.eval()


# ------------------------------------------------------------------------------------ cases
@dataclass
class Case:
    model: nn.Module
    loss_fn: Callable
    x: torch.Tensor
    y: torch.Tensor
    columns: int                     # C, the leading axis of sqrt_ggn_exact
    kron: bool                       # every parameter has Kronecker factors (kflr compiles)
    # brute force on this model output and loss instead (NLL: the logits, fused loss)
    reference: Optional[tuple[nn.Module, Callable]] = None


def _randn(*shape):
    return torch.randn(*shape, dtype=DTYPE)


def _labels(classes, *shape):
    return torch.randint(0, classes, shape)


def _build(seed: int, make_model, loss_fn, make_xy, columns, kron=True,
           reference=None) -> Case:
    torch.manual_seed(seed)
    model = make_model().to(DTYPE)
    x, y = make_xy()
    return Case(model, loss_fn, x, y, columns, kron,
                reference(model) if reference is not None else None)


def _nll_logits(model: nn.Sequential):
    return model[:-1], lambda z, y: F.nll_loss(F.log_softmax(z, dim=1), y)


CASES: dict[str, Callable[[], Case]] = {
    "functional_ce": lambda: _build(
        0, Functional, nn.CrossEntropyLoss(), lambda: (_randn(4, 4), _labels(3, 4)), 3,
        kron=False),
    "residual_mse": lambda: _build(
        1, lambda: ResidualMLP(activation=torch.tanh), nn.MSELoss(),
        lambda: (_randn(4, 4), _randn(4, 3)), 3),
    "shared_ce_sum": lambda: _build(
        2, Shared, nn.CrossEntropyLoss(reduction="sum"), lambda: (_randn(3, 4), _labels(3, 3)),
        3, kron=False),
    "gelu_ce": lambda: _build(
        3, lambda: nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 3)),
        nn.CrossEntropyLoss(), lambda: (_randn(4, 4), _labels(3, 4)), 3),
    "gelu_tanh_bce": lambda: _build(
        4, lambda: nn.Sequential(nn.Linear(4, 5), nn.GELU(approximate="tanh"),
                                 nn.Linear(5, 1)),
        nn.BCEWithLogitsLoss(), lambda: (_randn(4, 4), torch.rand(4, 1, dtype=DTYPE)), 1),
    "silu_mse_sum": lambda: _build(
        5, lambda: nn.Sequential(nn.Linear(4, 6), nn.SiLU(), nn.Linear(6, 2)),
        nn.MSELoss(reduction="sum"), lambda: (_randn(3, 4), _randn(3, 2)), 2),
    "layernorm_seq_mse": lambda: _build(
        6, LayerNormSeq, nn.MSELoss(), lambda: (_randn(3, 3, 4), _randn(3, 3)), 3,
        kron=False),
    "logsoftmax_nll": lambda: _build(
        7, lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3),
                                 nn.LogSoftmax(dim=1)),
        nn.NLLLoss(), lambda: (_randn(4, 4), _labels(3, 4)), 3, reference=_nll_logits),
    "bce_multilabel": lambda: _build(
        8, lambda: nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 3)),
        nn.BCEWithLogitsLoss(),
        lambda: (_randn(4, 4), torch.bernoulli(torch.full((4, 3), 0.5, dtype=DTYPE))), 3),
    "bce_multilabel_sum": lambda: _build(
        9, lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)),
        nn.BCEWithLogitsLoss(reduction="sum"),
        lambda: (_randn(3, 4), torch.rand(3, 3, dtype=DTYPE)), 3),
    "ce_spatial": lambda: _build(
        10, lambda: nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv1d(4, 3, 1)),
        nn.CrossEntropyLoss(), lambda: (_randn(3, 2, 4), _labels(3, 3, 4)),
        3 * 4),  # every position is a sample: C·d columns, block-diagonal over positions
    "embedding_ce": lambda: _build(
        11, EmbeddingMean, nn.CrossEntropyLoss(), lambda: (_labels(6, 4, 5), _labels(3, 4)),
        3),
    "conv_bn_eval_ce": lambda: _build(
        12, conv_bn_eval, nn.CrossEntropyLoss(), lambda: (_randn(3, 2, 4, 4), _labels(3, 3)),
        3, kron=False),
}
NAMES = list(CASES)


# ------------------------------------------------------------------------------ reference
@dataclass
class Reference:
    names: list[str]
    slices: dict[str, slice]
    per_sample: torch.Tensor         # [N, P, P]: G_n = J_nᵀ H_n J_n


def brute_force_ggn(model: nn.Module, loss_fn: Callable, x, y) -> Reference:
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    names = list(params)
    sizes = [params[n].numel() for n in names]
    theta = torch.cat([params[n].reshape(-1) for n in names])

    def output(flat, inputs):
        pieces = {n: t.reshape(params[n].shape) for n, t in zip(names, flat.split(sizes))}
        return functional_call(model, pieces, (inputs,))

    f = output(theta, x).detach()
    n_samples, per_sample_out = f.shape[0], f[0].numel()
    h = hessian(lambda out: loss_fn(out, y))(f).reshape(n_samples, per_sample_out,
                                                          n_samples, per_sample_out)
    blocks = []
    for n in range(n_samples):
        off = torch.cat([h[n, :, :n], h[n, :, n + 1:]], 1)
        assert not off.any(), "reference self-check: the loss is not separable over samples"
        j = jacrev(output)(theta, x[n:n + 1]).reshape(per_sample_out, -1)
        blocks.append(j.T @ h[n, :, n] @ j)
    starts = torch.tensor([0] + sizes).cumsum(0).tolist()
    slices = {n: slice(a, b) for n, a, b in zip(names, starts, starts[1:])}
    return Reference(names, slices, torch.stack(blocks))


@functools.lru_cache(maxsize=None)
def computed(name: str):
    """``(case, fxcurv outputs dict, reference)`` once per case."""
    case = CASES[name]()
    step = fxcurv.compile(case.model, case.loss_fn, _quantities(case))
    loss, grad, *values = step(case.x, case.y)
    outputs = dict(zip(_quantities(case), values))
    ref_model, ref_loss = case.reference or (case.model, case.loss_fn)
    return case, outputs, brute_force_ggn(ref_model, ref_loss, case.x, case.y)


def _quantities(case: Case) -> list[str]:
    return EXACT if case.kron else EXACT[:-1]


# ----------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", NAMES)
def test_diag_ggn_exact_is_the_diagonal_of_the_ggn(name):
    case, outputs, ref = computed(name)
    diag = ref.per_sample.sum(0).diagonal()
    value = outputs["diag_ggn_exact"]
    assert list(value) == ref.names
    for p in ref.names:
        assert value[p].shape == dict(case.model.named_parameters())[p].shape
        torch.testing.assert_close(value[p].reshape(-1), diag[ref.slices[p]], **TOL, msg=p)


@pytest.mark.parametrize("name", NAMES)
def test_diag_ggn_exact_batch_is_the_per_sample_diagonal(name):
    case, outputs, ref = computed(name)
    diag = ref.per_sample.diagonal(dim1=1, dim2=2)                      # [N, P]
    value = outputs["diag_ggn_exact_batch"]
    assert list(value) == ref.names
    n = case.x.shape[0]
    for p in ref.names:
        shape = dict(case.model.named_parameters())[p].shape
        assert value[p].shape == (n, *shape)
        torch.testing.assert_close(value[p].reshape(n, -1), diag[:, ref.slices[p]], **TOL,
                                   msg=p)


@pytest.mark.parametrize("name", NAMES)
def test_sqrt_ggn_exact_squared_is_the_ggn_block(name):
    """Σ_c s[c, n] s[c, n]ᵀ = G_n[p, p] per sample, hence Σ_{c,n} s sᵀ = G[p, p]."""
    case, outputs, ref = computed(name)
    value = outputs["sqrt_ggn_exact"]
    assert list(value) == ref.names
    n = case.x.shape[0]
    for p in ref.names:
        shape = dict(case.model.named_parameters())[p].shape
        assert value[p].shape == (case.columns, n, *shape), p
        s = value[p].reshape(case.columns, n, -1)
        block = ref.per_sample[:, ref.slices[p], ref.slices[p]]
        torch.testing.assert_close(torch.einsum("cni,cnj->nij", s, s), block, **TOL, msg=p)
        torch.testing.assert_close(torch.einsum("cni,cnj->ij", s, s), block.sum(0), **TOL,
                                   msg=p)


@pytest.mark.parametrize("name", [n for n in NAMES if CASES[n]().kron and n != "ce_spatial"])
def test_kflr_bias_factor_is_the_bias_ggn_block_of_a_linear_layer(name):
    """For a linear layer on ``[N, I]`` inputs, KFLR's G is the bias's GGN block, and
    A = Σ_n x_n x_nᵀ / N (the layer input by a forward hook)."""
    case, outputs, ref = computed(name)
    inputs = linear_inputs(case.model, case.x)
    checked = 0
    for layer, x in inputs.items():
        if x.dim() != 2:
            continue
        weight, bias = f"{layer}.weight", f"{layer}.bias"
        g_bias = ref.per_sample.sum(0)[ref.slices[bias], ref.slices[bias]]
        factors = outputs["kflr"]
        assert len(factors[weight]) == 2 and len(factors[bias]) == 1
        torch.testing.assert_close(factors[bias][0], g_bias, **TOL)
        torch.testing.assert_close(factors[weight][0], g_bias, **TOL)
        torch.testing.assert_close(factors[weight][1], x.T @ x / x.shape[0], **TOL)
        checked += 1
    assert checked


def test_shared_parameter_diagonal_is_not_the_sum_of_per_use_diagonals():
    """Self-check that the shared-parameter case tests something: the per-use diagonals
    summed (squares taken before the uses are added) differ from the true diagonal."""
    case, outputs, ref = computed("shared_ce_sum")
    untied = Untied(case.model)
    other = brute_force_ggn(untied, case.loss_fn, case.x, case.y)
    diag = other.per_sample.sum(0).diagonal()
    per_use = diag[other.slices["first.weight"]] + diag[other.slices["second.weight"]]
    true = ref.per_sample.sum(0).diagonal()[ref.slices["shared.weight"]]
    assert not torch.allclose(per_use, true, rtol=1e-3)
    torch.testing.assert_close(outputs["diag_ggn_exact"]["shared.weight"].reshape(-1), true,
                               **TOL)


def _flat(value) -> torch.Tensor:
    """A quantity's value for one parameter as one vector (Kronecker factor lists too)."""
    if isinstance(value, (list, tuple)):
        return torch.cat([v.reshape(-1) for v in value])
    return value.reshape(-1)


def test_nll_after_log_softmax_equals_cross_entropy_on_the_logits():
    case, outputs, _ = computed("logsoftmax_nll")
    step = fxcurv.compile(case.model[:-1], nn.CrossEntropyLoss(), EXACT)
    _, _, *values = step(case.x, case.y)
    for quantity, value in zip(EXACT, values):
        assert list(outputs[quantity]) == list(value)
        for p in value:
            torch.testing.assert_close(_flat(outputs[quantity][p]), _flat(value[p]),
                                       rtol=1e-12, atol=1e-15, msg=f"{quantity}[{p}]")
        assert all(_flat(v).abs().sum() > 0 for v in value.values()), quantity


def test_ce_spatial_factor_has_no_cross_terms():
    """Regression (found by the ce_spatial case): one sample, a 1x1 convolution producing
    ``[1, 2, 2]`` logits (2 classes at 2 positions). The loss Hessian is block diagonal over positions, so
    the GGN block of the bias (added at both positions) is ``Σ_d diag(p_d) - p_d p_dᵀ``."""
    torch.manual_seed(0)
    model = nn.Conv1d(2, 2, 1).to(DTYPE)
    x = torch.tensor([[[1.0, -2.0], [0.5, 0.0]]], dtype=DTYPE)      # [N=1, C=2, d=2]
    y = torch.tensor([[0, 1]])
    _, _, diag = fxcurv.compile(model, nn.CrossEntropyLoss(reduction="sum"),
                                ["diag_ggn_exact"])(x, y)
    p = torch.softmax(model(x), 1)[0].detach()                        # [C, d]
    torch.testing.assert_close(diag["bias"], (p * (1 - p)).sum(1), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("option", ["weight", "pos_weight"])
def test_bce_with_logits_weights_enter_the_ggn(option):
    """Regression (found by the generic loss-factor test): the loss Hessian of
    ``BCEWithLogitsLoss(weight=w, pos_weight=p)`` is ``w σ(1-σ)(p y + 1 - y)``; the factor
    once ignored both. With ``pos_weight`` the loss is no likelihood of sampled labels: its
    Monte-Carlo quantities are refused, naming the quantity."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(DTYPE)
    x, y = torch.randn(5, 3, dtype=DTYPE), torch.rand(5, 2, dtype=DTYPE)
    loss_fn = nn.BCEWithLogitsLoss(**{option: torch.tensor([2.0, 0.5], dtype=DTYPE)})
    _, _, diag = fxcurv.compile(model, loss_fn, ["diag_ggn_exact"])(x, y)
    params = dict(model.named_parameters())
    for name, p in params.items():
        def output(t, name=name):
            return functional_call(model, {**params, name: t}, (x,))
        jac = jacrev(output)(p).reshape(-1, p.numel())
        z = output(p).detach()
        ggn = jac.t() @ hessian(lambda f: loss_fn(f, y))(z).reshape(z.numel(), -1) @ jac
        torch.testing.assert_close(_flat(diag[name]), ggn.diagonal(), **TOL)
    if option == "pos_weight":
        with pytest.raises(fxcurv.CompileError, match="Monte-Carlo.*diag_ggn_mc|diag_ggn_mc.*Monte"):
            fxcurv.compile(model, loss_fn, ["diag_ggn_mc"])


@pytest.mark.parametrize("option, target", [("pos_weight", -1.0), ("weight", 0.5)])
def test_bce_with_logits_negative_curvature_is_an_error(option, target):
    """A target outside [0, 1] with ``pos_weight`` (``p y + 1 - y < 0``) or a negative weight
    makes the loss's second derivative negative: the step raises instead of returning NaN."""
    model = nn.Linear(3, 2).to(DTYPE)
    values = {"pos_weight": [3.0, 0.5], "weight": [-1.0, 1.0]}[option]
    loss_fn = nn.BCEWithLogitsLoss(**{option: torch.tensor(values, dtype=DTYPE)})
    x, y = torch.randn(4, 3, dtype=DTYPE), torch.full((4, 2), target, dtype=DTYPE)
    step = fxcurv.compile(model, loss_fn, ["diag_ggn_exact"])
    for run in (step, torch.jit.script(step)):  # TorchScript re-raises as torch.jit.Error
        with pytest.raises((RuntimeError, torch.jit.Error), match="negative second derivative"):
            run(x, y)


def test_nll_after_log_softmax_over_the_last_axis_is_cross_entropy_too():
    """``F.log_softmax(z, dim=-1)`` + ``NLLLoss`` (before: only dim=1 was recognised, so the
    curvature quantities were refused): the same results as cross-entropy on the logits;
    logits that are not ``[N, C]`` (the last axis is then not the class axis) raise when the
    step runs."""
    case, _, _ = computed("logsoftmax_nll")
    logits = case.model[:-1]
    model = nn.Sequential(logits, nn.LogSoftmax(dim=-1))
    _, _, *values = fxcurv.compile(model, nn.NLLLoss(), EXACT)(case.x, case.y)
    _, _, *expected = fxcurv.compile(logits, nn.CrossEntropyLoss(), EXACT)(case.x, case.y)
    for quantity, value, want in zip(EXACT, values, expected):
        for p in want:
            torch.testing.assert_close(_flat(value[f"0.{p}"]), _flat(want[p]), rtol=1e-12,
                                       atol=1e-15, msg=f"{quantity}[{p}]")
    step = fxcurv.compile(nn.Sequential(nn.Conv1d(2, 3, 1), nn.LogSoftmax(dim=-1)).to(DTYPE),
                          nn.NLLLoss(), ["diag_ggn_exact"], verify=False)
    with pytest.raises(ValueError, match=r"only for \[N, C\] logits, got 3 dimensions"):
        step(torch.randn(2, 2, 4, dtype=DTYPE), torch.randint(0, 3, (2, 4)))
