"""BatchNorm in train mode: the batch as one sample whose positions are its rows.

BatchNorm normalising with batch statistics couples the rows of a batch, so per-sample
quantities are undefined; the full-batch GGN ``G = Jᵀ H J`` (``J`` the Jacobian of all
outputs ``[N, K]`` w.r.t. the parameters, ``H = diag(H_n)`` the loss Hessian) is. fxcurv
gives ``diag_ggn_exact``, ``sqrt_ggn_exact``, ``ggnmp``, ``kflr`` and ``kfac`` on such a batch
(docs/conventions.md). Ground truth here is independent: ``torch.func.jacrev`` of the whole
batch's output and ``torch.func.hessian`` of the loss, in float64. Kronecker ``G`` factors are
``Σ_rows Σ_n J_{n,row}ᵀ H_n J_{n,row}`` with ``J_{n,row}`` the Jacobian of sample ``n``'s
output w.r.t. the layer's output at row ``row`` (summed over a conv's positions, BackPACK's
convention: the G of a conv weight is its bias's GGN block); the same formula is checked in
eval mode first, where it is the separable KFLR.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, hessian, jacrev

import fxcurv

DTYPE = torch.float64
N = 6
EXACT = ["diag_ggn_exact", "sqrt_ggn_exact", "ggnmp", "kflr"]
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    return _randomised(model.to(DTYPE))


def cnn() -> nn.Module:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(12, 2))
    return _randomised(model.to(DTYPE))


def _randomised(model: nn.Module) -> nn.Module:
    """BatchNorm's affine parameters and running statistics away from 1 and 0 (eval mode
    would be nearly the identity otherwise)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 2.0)
    return model


CASES = {
    "mlp_ce": (mlp, nn.CrossEntropyLoss(), lambda g: (torch.randn(N, 4, dtype=DTYPE, generator=g),
                                                     torch.randint(0, 3, (N,), generator=g)),
               ["0", "3"]),
    "cnn_mse": (cnn, nn.MSELoss(), lambda g: (torch.randn(N, 2, 4, 4, dtype=DTYPE, generator=g),
                                              torch.randn(N, 2, dtype=DTYPE, generator=g)),
                ["0", "4"]),
}


def _data(case: str):
    return CASES[case][2](torch.Generator().manual_seed(7))


def _outputs(model: nn.Module, x, delta=None, layer=None):
    """The model's outputs, BatchNorm buffers passed fresh (train mode writes them), and
    ``delta`` added to ``layer``'s output when given."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    handle = None if layer is None else \
        layer.register_forward_hook(lambda module, inputs, out: out + delta)
    try:
        return functional_call(model, (params, buffers), (x,))
    finally:
        if handle is not None:
            handle.remove()


@functools.lru_cache(maxsize=None)
def brute_force(case: str, train: bool):
    """``(G [P, P], slices per parameter, {layer: Kronecker G})`` by torch.func."""
    build, loss_fn, _, layers = CASES[case]
    model = build().train(train)
    x, y = _data(case)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}

    def outputs(p):
        return functional_call(model, (p, {k: b.clone() for k, b in buffers.items()}), (x,))

    out = outputs(params)
    h = hessian(lambda o: loss_fn(o, y))(out).reshape(out.numel(), out.numel())
    jac = jacrev(outputs)(params)
    flat = torch.cat([jac[k].reshape(out.numel(), -1) for k in params], 1)
    slices, start = {}, 0
    for k, v in params.items():
        slices[k] = slice(start, start + v.numel())
        start += v.numel()
    kron = {}
    for name in layers:
        layer = dict(model.named_modules())[name]
        s = _layer_output(model, layer, x)
        j = jacrev(lambda d: _outputs(model, x, d, layer))(torch.zeros_like(s))
        j = j.reshape(out.numel(), N, s.size(1), -1).sum(3)   # [N·K, rows, D]
        kron[name] = sum(j[:, r].T @ h @ j[:, r] for r in range(N))
    return flat.T @ h @ flat, slices, kron


def _layer_output(model, layer, x):
    seen = []
    handle = layer.register_forward_hook(lambda module, inputs, out: seen.append(out.detach()))
    try:
        _outputs(model, x)
    finally:
        handle.remove()
    return seen[0]


@functools.lru_cache(maxsize=None)
def compiled(case: str, train: bool):
    build, loss_fn, _, _ = CASES[case]
    model = build().train(train)
    x, y = _data(case)
    vectors = {k: torch.randn(2, *p.shape, dtype=DTYPE, generator=torch.Generator()
                              .manual_seed(3)) for k, p in model.named_parameters()}
    _, _, *values = fxcurv.compile(model, loss_fn, EXACT)(x, y, vectors)
    return dict(zip(EXACT, values)), vectors


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", list(CASES))
def test_exact_ggn_quantities_equal_the_full_batch_ggn(case, train):
    """diag_ggn_exact, sqrt_ggn_exact (``SᵀS``), ggnmp and the [G] blocks of BatchNorm's
    scale and shift equal blocks of ``Jᵀ H J`` of the whole batch (eval: the control)."""
    ggn, slices, _ = brute_force(case, train)
    values, vectors = compiled(case, train)
    for name, where in slices.items():
        block = ggn[where, where]
        torch.testing.assert_close(values["diag_ggn_exact"][name].flatten(), block.diagonal(),
                                   rtol=1e-10, atol=1e-13)
        factor = values["sqrt_ggn_exact"][name]
        assert factor.shape[1] == N
        flat = factor.reshape(-1, block.size(0))
        torch.testing.assert_close(flat.T @ flat, block, rtol=1e-10, atol=1e-13)
        v = vectors[name].reshape(2, -1)
        torch.testing.assert_close(values["ggnmp"][name].reshape(2, -1), v @ block,
                                   rtol=1e-10, atol=1e-13)
    for name in [n for n in slices if n.startswith("1.")]:  # BatchNorm: no Kronecker factors
        (g,) = values["kflr"][name]
        torch.testing.assert_close(g, ggn[slices[name], slices[name]], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", list(CASES))
def test_kflr_g_is_the_row_sum_of_output_ggn_blocks(case, train):
    """kflr's G of each conv / linear layer: ``Σ_rows Σ_n J_{n,row}ᵀ H_n J_{n,row}`` (in eval
    mode the separable KFLR; in train mode each row's block sums every sample's output)."""
    _, _, kron = brute_force(case, train)
    values, _ = compiled(case, train)
    for layer, expected in kron.items():
        g, _ = values["kflr"][f"{layer}.weight"]
        torch.testing.assert_close(g, expected, rtol=1e-10, atol=1e-13)
        assert torch.equal(values["kflr"][f"{layer}.bias"][0], g)


def test_the_coupling_changes_the_ggn():
    """A control that the train-mode checks are not vacuous: train and eval mode GGNs differ."""
    train, _, _ = brute_force("mlp_ce", True)
    evaluation, _, _ = brute_force("mlp_ce", False)
    assert (train - evaluation).norm() > 0.1 * train.norm()


@pytest.mark.parametrize("case", list(CASES))
def test_kfac_converges_to_kflr_on_a_coupled_batch(case):
    """Each Monte-Carlo draw samples every sample's label at once and back-propagates their
    sum through the batch statistics: ``E[kfac] = kflr`` (relative error ~1% at M = 10⁴;
    tolerance 5%, as in test_ggn_mc.py). The A factors do not depend on the draw."""
    build, loss_fn, _, _ = CASES[case]
    model = build().train()
    x, y = _data(case)
    exact = fxcurv.compile(model, loss_fn, ["kflr"])(x, y)[2]  # low rank (C - 1 columns) alone
    for name, factors in compiled(case, True)[0]["kflr"].items():
        for alone, value in zip(exact[name], factors):
            torch.testing.assert_close(alone, value, rtol=1e-10, atol=1e-14)
    torch.manual_seed(11)
    sampled = fxcurv.compile(model, loss_fn, ["kfac"], mc_samples=10_000)(x, y)[2]
    for name, factors in exact.items():
        for expected, estimate in zip(factors, sampled[name]):
            relative = ((estimate - expected).norm() / expected.norm()).item()
            assert relative < 0.05, f"{name}: {relative:.3f}"


@pytest.mark.parametrize("case", list(CASES))
def test_diag_ggn_mc_converges_to_diag_ggn_exact_on_a_coupled_batch(case):
    """The same draws as ``kfac``'s (every sample's label at once, back-propagated through
    the batch statistics): ``E[diag_ggn_mc] = diag_ggn_exact`` of the whole batch."""
    build, loss_fn, _, _ = CASES[case]
    model = build().train()
    x, y = _data(case)
    exact = compiled(case, True)[0]["diag_ggn_exact"]
    torch.manual_seed(12)
    sampled = fxcurv.compile(model, loss_fn, ["diag_ggn_mc"], mc_samples=10_000)(x, y)[2]
    largest = max(value.norm() for value in exact.values())
    for name, expected in exact.items():  # (a bias before BatchNorm: zero up to rounding)
        relative = ((sampled[name] - expected).norm() / (expected.norm() + 1e-3 * largest))
        assert relative.item() < 0.05, f"{name}: {relative.item():.3f}"


def test_column_chunks_give_the_same_coupled_results():
    """The ``K·N`` sample-local columns run in chunks that cut through samples."""
    model, loss_fn = cnn().train(), nn.MSELoss()
    x, y = _data("cnn_mse")
    quantities = ["diag_ggn_exact", "sqrt_ggn_exact", "kflr"]
    whole = fxcurv.compile(model, loss_fn, quantities, column_chunk=None)(x, y)
    chunked = fxcurv.compile(model, loss_fn, quantities, column_chunk=5)
    assert "chunks" in chunked.code
    parts = chunked(x, y)
    for i in (2, 3):
        for name, value in whole[i].items():
            torch.testing.assert_close(parts[i][name], value, rtol=1e-12, atol=1e-14)
    for name, factors in whole[4].items():
        for value, part in zip(factors, parts[4][name]):
            torch.testing.assert_close(part, value, rtol=1e-12, atol=1e-14)


def test_torchscript_and_export_of_a_coupled_step():
    model, loss_fn = mlp().train(), nn.CrossEntropyLoss()
    x, y = _data("mlp_ce")
    step = fxcurv.compile(model, loss_fn, ["diag_ggn_exact", "kflr"])
    expected = step(x, y)
    scripted = torch.jit.script(step)(x, y)
    exported = torch.export.export(step, (x, y)).module()(x, y)
    for result in (scripted, exported):
        for name, value in expected[2].items():
            torch.testing.assert_close(result[2][name], value, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("quantity", ["batch_grad", "diag_ggn_mc_batch", "diag_ggn_exact_batch",
                                      "sqrt_ggn_mc", "diag_h", "hmp", "kfra"])
def test_quantities_that_need_separate_samples_are_refused(quantity):
    with pytest.raises(fxcurv.CompileError) as info:
        fxcurv.compile(mlp().train(), nn.CrossEntropyLoss(), [quantity])
    message = str(info.value)
    assert "BatchNorm in train mode" in message and f"'{quantity}'" in message
    assert "BatchNorm1d" in message and "kfac" in message
