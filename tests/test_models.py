"""Whole-model tests over the zoo in ``models.py`` (float64).

References:

* loss and gradient: ``torch.autograd`` on the model itself (on a deep copy, so a BatchNorm in
  train mode does not update the buffers of the model under test).
* per-sample gradients: BackPACK's ``g_n = J_nᵀ ∂L/∂f_n``, where ``f_n`` is sample n's model
  output and ``∂L/∂f_n`` the gradient of the *reduced* loss with respect to it. We compute
  ``G = ∂L/∂f`` once by autograd on the batch, then
  ``g_n = torch.func.grad(θ -> ⟨f(θ, x_n), G_n⟩)`` vectorised over samples with
  ``torch.func.vmap`` and ``torch.func.functional_call``. ``G`` already carries every
  reduction's scaling (``1/N`` for CE on ``[N, C]``, ``1/(N·d)`` for CE on ``[N, C, d]``,
  ``1/numel`` for MSE mean and BCE mean, none for sum or a plain callable loss), so no per-loss
  scale factor is needed, and ``Σ_n g_n = grad`` (checked too).
  Then ``batch_l2 = ‖g_n‖²``, ``sum_grad_squared = Σ_n g_n²``,
  ``variance = Σ_n g_n²/N − (Σ_n g_n/N)²``.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch.func import functional_call, grad, vmap

import fxcurv
from models import SCRIPTED, ZOO, ModelCase

FIRST_ORDER = ["batch_grad", "batch_l2", "sum_grad_squared", "variance"]
NAMES = list(ZOO)
PER_SAMPLE = [n for n in NAMES if ZOO[n]().per_sample]
MIXING = [n for n in NAMES if n not in PER_SAMPLE]
TOL = dict(rtol=1e-10, atol=1e-12)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")


# -------------------------------------------------------------------------------- helpers
@functools.lru_cache(maxsize=None)
def compiled(name: str):
    """``(case, step)`` compiled once per model: all four quantities where defined.

    Tests using it must not modify the model (the live-parameter test builds its own)."""
    case = ZOO[name]()
    quantities = FIRST_ORDER if case.per_sample else []
    return case, fxcurv.compile(case.model, case.loss_fn, quantities)


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def reference_loss_grad(case: ModelCase, x, y):
    model = copy.deepcopy(case.model)
    params = trainable(model)
    loss = case.loss_fn(model(x), y)
    grads = torch.autograd.grad(loss, list(params.values()))
    return loss.detach(), dict(zip(params, grads))


def reference_first_order(case: ModelCase, x, y) -> dict[str, dict[str, torch.Tensor]]:
    """``batch_grad``, ``batch_l2``, ``sum_grad_squared``, ``variance`` by vmap(grad)."""
    model = copy.deepcopy(case.model)
    params = {n: p.detach() for n, p in trainable(model).items()}
    out = model(x).detach().requires_grad_(True)
    (cot,) = torch.autograd.grad(case.loss_fn(out, y), out)

    def contribution(p, x_n, cot_n):
        f_n = functional_call(model, p, (x_n.unsqueeze(0),)).squeeze(0)
        return (f_n * cot_n).sum()

    batch_grad = vmap(grad(contribution), in_dims=(None, 0, 0))(params, x, cot)
    n = x.shape[0]
    sgs = {k: g.square().sum(0) for k, g in batch_grad.items()}
    return {
        "batch_grad": batch_grad,
        "batch_l2": {k: g.flatten(1).square().sum(1) for k, g in batch_grad.items()},
        "sum_grad_squared": sgs,
        "variance": {k: sgs[k] / n - (g.sum(0) / n).square() for k, g in batch_grad.items()},
    }


def assert_dicts_close(actual: dict, expected: dict, what: str, **tol):
    tol = tol or TOL
    assert list(actual) == list(expected), f"{what}: keys {list(actual)} != {list(expected)}"
    for key in expected:
        assert actual[key].shape == expected[key].shape, \
            f"{what}[{key}]: shape {tuple(actual[key].shape)} != {tuple(expected[key].shape)}"
        torch.testing.assert_close(actual[key], expected[key], **tol, msg=f"{what}[{key}]")


def assert_outputs_equal(actual, expected, what: str):
    assert len(actual) == len(expected), what
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-12, atol=0, msg=f"{what}: loss")
    for i, (a, e) in enumerate(zip(actual[1:], expected[1:])):
        assert_dicts_close(a, e, f"{what}: output {i + 1}", rtol=1e-12, atol=0)


def check_against_references(case: ModelCase, outputs, x, y):
    loss, grads, *quantities = outputs
    ref_loss, ref_grads = reference_loss_grad(case, x, y)
    torch.testing.assert_close(loss, ref_loss, **TOL, msg="loss")
    assert_dicts_close(grads, ref_grads, "grad")
    if quantities:
        ref = reference_first_order(case, x, y)
        assert_dicts_close({k: v.sum(0) for k, v in ref["batch_grad"].items()}, ref_grads,
                           "reference Σ_n g_n vs autograd grad (reference self-check)")
        for name, value in zip(FIRST_ORDER, quantities):
            assert_dicts_close(value, ref[name], name)


# ---------------------------------------------------------------------------------- tests
def test_zoo_covers_the_brief():
    assert len(ZOO) >= 18
    assert {"seed_cnn", "conv_transpose2d", "batchnorm2d_eval", "embedding_mean",
            "layernorm_seq"} <= set(SCRIPTED)


@pytest.mark.parametrize("name", NAMES)
def test_loss_and_grad_match_autograd(name):
    case, step = compiled(name)
    x, y = case.batch()
    loss, grads, *_ = step(x, y)
    ref_loss, ref_grads = reference_loss_grad(case, x, y)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert_dicts_close(grads, ref_grads, "grad")


@pytest.mark.parametrize("name", PER_SAMPLE)
def test_first_order_match_torch_func(name):
    case, step = compiled(name)
    x, y = case.batch()
    check_against_references(case, step(x, y), x, y)


@pytest.mark.parametrize("quantity", FIRST_ORDER + ["grad_batch"])
@pytest.mark.parametrize("name", MIXING)
def test_mixing_samples_rejects_per_sample_quantities(name, quantity):
    case = ZOO[name]()
    with pytest.raises(fxcurv.CompileError, match="per-sample"):
        fxcurv.compile(case.model, case.loss_fn, [quantity])


def test_grad_batch_alias_equals_batch_grad():
    case = ZOO["mlp_sequential"]()
    step = fxcurv.compile(case.model, case.loss_fn, ["grad_batch", "batch_grad"])
    x, y = case.batch()
    _, _, alias, canonical = step(x, y)
    assert_dicts_close(alias, canonical, "grad_batch vs batch_grad", rtol=0, atol=0)


def test_module_and_functional_mlp_agree():
    """Sequential of modules and F.* with raw parameters: same numbers, names differ."""
    seq, fun = ZOO["mlp_sequential"](), ZOO["mlp_functional"]()
    with torch.no_grad():
        for p, q in zip(seq.model.parameters(), fun.model.parameters()):
            q.copy_(p)
    x, y = seq.batch()
    a = compiled("mlp_sequential")[1](x, y)
    b = fxcurv.compile(fun.model, fun.loss_fn, FIRST_ORDER)(x, y)
    torch.testing.assert_close(a[0], b[0], rtol=1e-14, atol=0)
    for da, db in zip(a[1:], b[1:]):
        for va, vb in zip(da.values(), db.values()):
            torch.testing.assert_close(va, vb, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", SCRIPTED)
def test_torchscript_same_outputs_and_save_load(name, tmp_path):
    case, step = compiled(name)
    x, y = case.batch()
    eager = step(x, y)
    scripted = torch.jit.script(step)
    assert_outputs_equal(scripted(x, y), eager, "scripted")
    path = tmp_path / f"{name}.pt"
    scripted.save(str(path))
    loaded = torch.jit.load(str(path))
    assert_outputs_equal(loaded(x, y), eager, "loaded")
    x2, y2 = case.batch(case.batch_size + 1)
    assert_outputs_equal(loaded(x2, y2), step(x2, y2), "loaded, other batch size")


@pytest.mark.parametrize("name", NAMES)
def test_no_grad_and_inference_mode(name):
    case, step = compiled(name)
    x, y = case.batch()
    expected = step(x, y)
    with torch.no_grad():
        assert_outputs_equal(step(x, y), expected, "no_grad")
    with torch.inference_mode():
        assert_outputs_equal(step(x, y), expected, "inference_mode")


@pytest.mark.parametrize("name", NAMES)
def test_other_batch_size(name):
    case, step = compiled(name)
    step(*case.batch())
    for n in (case.batch_size + 1, 1):
        x, y = case.batch(n)
        check_against_references(case, step(x, y), x, y)


@pytest.mark.parametrize("name", NAMES)
def test_reads_parameters_live(name):
    case = ZOO[name]()
    quantities = FIRST_ORDER if case.per_sample else []
    step = fxcurv.compile(case.model, case.loss_fn, quantities)
    x, y = case.batch()
    loss_before = step(x, y)[0]
    params = list(trainable(case.model).values())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        params[0].add_(1.0)  # as an optimizer would, in place
        for p in params[1:]:  # every parameter moves; small steps keep the seed CNN tame
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    outputs = step(x, y)
    assert not torch.equal(outputs[0], loss_before), "the step did not see the new parameters"
    check_against_references(case, outputs, x, y)


@pytest.mark.parametrize("name", NAMES)
def test_does_not_mutate_model(name):
    case = ZOO[name]()
    before = {k: v.clone() for k, v in case.model.state_dict().items()}
    training = [m.training for m in case.model.modules()]
    quantities = FIRST_ORDER if case.per_sample else []
    step = fxcurv.compile(case.model, case.loss_fn, quantities)
    x, y = case.batch()
    step(x, y)
    step(*case.batch(case.batch_size + 1))
    after = case.model.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert torch.equal(after[k], before[k]), f"{k} changed"
    assert [m.training for m in case.model.modules()] == training
    assert all(p.grad is None for p in case.model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_float32_model_gives_float32_outputs(name):
    case = ZOO[name]().to(torch.float32)
    quantities = FIRST_ORDER if case.per_sample else []
    step = fxcurv.compile(case.model, case.loss_fn, quantities)
    x, y = case.batch()
    loss, grads, *rest = step(x, y)
    assert loss.dtype == torch.float32
    for what, values in zip(["grad"] + quantities, [grads, *rest]):
        for key, value in values.items():
            assert value.dtype == torch.float32, f"{what}[{key}] is {value.dtype}"
    _, ref_grads = reference_loss_grad(case, x, y)
    assert_dicts_close(grads, ref_grads, "float32 grad", rtol=1e-4, atol=1e-5)
