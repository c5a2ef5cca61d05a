"""Models written for BackPACK's converter (``backpack.custom_module``: ``Parallel`` +
``SumModule`` branches, ``ScaleModule``, ``Permute``, ``Slicing``, ``Pad``, and models converted
by ``extend(model, use_converter=True)``) compile, and give BackPACK's own numbers; models
whose hooks ``extend`` registered compile as the un-extended model."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fxcurv

backpack = pytest.importorskip("backpack")
from backpack import backpack as backpack_context, extend  # noqa: E402
from backpack.custom_module.branching import Parallel, SumModule  # noqa: E402
from backpack.custom_module.pad import Pad  # noqa: E402
from backpack.custom_module.permute import Permute  # noqa: E402
from backpack.custom_module.scale_module import ScaleModule  # noqa: E402
from backpack.custom_module.slicing import Slicing  # noqa: E402
from backpack.extensions import BatchGrad, BatchL2Grad, DiagGGNExact  # noqa: E402

DTYPE = torch.float64


def custom_modules() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        Parallel(nn.Sequential(nn.Tanh(), nn.Conv2d(3, 3, 1)), ScaleModule(0.5),
                 merge_module=SumModule()),
        Pad((1, 1, 1, 1)), Slicing((slice(None), slice(None), slice(1, 4), slice(0, 5))),
        Permute(0, 2, 1, 3), Permute(1, 2, init_transpose=True), nn.Flatten(),
        nn.Linear(45, 4))


class Residual(nn.Module):
    """A residual block, as BackPACK's converter rewrites it (``x + f(x)`` -> SumModule)."""

    def __init__(self):
        super().__init__()
        self.conv, self.act = nn.Conv2d(2, 2, 3, padding=1), nn.Tanh()
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc((x + self.act(self.conv(x))).flatten(1))


def converted() -> nn.Module:
    from backpack.custom_module.graph_utils import convert_module_to_backpack
    return convert_module_to_backpack(Residual(), debug=False)


@pytest.mark.parametrize("make", [custom_modules, converted], ids=["custom_modules", "converted"])
def test_backpack_converter_models_match_backpack(make):
    torch.manual_seed(0)
    model = make().to(DTYPE)
    x, y = torch.randn(3, 2, 4, 4, dtype=DTYPE), torch.tensor([0, 3, 1])
    if make is converted:
        assert any(isinstance(m, SumModule) for m in model.modules())
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), ["batch_l2", "diag_ggn_exact"])
    loss, grad, batch_l2, diag_ggn = step(x, y)
    extended, loss_fn = extend(model, use_converter=False), extend(nn.CrossEntropyLoss())
    with backpack_context(BatchL2Grad(), DiagGGNExact()):
        loss_fn(extended(x), y).backward()
    torch.testing.assert_close(loss, loss_fn(model(x), y).detach())
    for name, p in model.named_parameters():
        torch.testing.assert_close(grad[name], p.grad, rtol=1e-10, atol=1e-12, msg=name)
        torch.testing.assert_close(batch_l2[name], p.batch_l2, rtol=1e-10, atol=1e-12, msg=name)
        torch.testing.assert_close(diag_ggn[name], p.diag_ggn_exact, rtol=1e-10, atol=1e-12,
                                   msg=name)


# -- models prepared with backpack.extend: BackPACK's own hooks are inert for the values -----
QUANTITIES = ["batch_grad", "diag_ggn_exact"]


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(64, 4))


def small_resnet() -> nn.Module:
    models = pytest.importorskip("torchvision.models.resnet")
    return models.ResNet(models.BasicBlock, [1, 1, 1, 1], num_classes=4).eval()


def hooked(model: nn.Module) -> list[tuple]:
    """Each module's forward and backward hooks, in order."""
    return [(list(m._forward_hooks.items()), list(m._backward_hooks.items()))
            for m in model.modules()]


@pytest.mark.parametrize("make, use_converter", [(cnn, False), (small_resnet, True)],
                         ids=["cnn", "converted_resnet"])
def test_an_extended_model_gives_the_numbers_of_the_unextended_one(make, use_converter):
    """``extend(model)`` registers ``hook_store_io`` (forward) and ``hook_run_extensions``
    (full backward) on every layer; fxcurv traces and checks the model without them, so the
    step is the un-extended model's, bit for bit, also when called inside
    ``with backpack(...)`` (which then computes nothing: the step runs none of its hooks)."""
    torch.manual_seed(0)
    model = make().to(DTYPE)
    x, y = torch.randn(3, 2 if make is cnn else 3, 8, 8, dtype=DTYPE), torch.tensor([0, 3, 1])
    expected = fxcurv.compile(model, nn.CrossEntropyLoss(), QUANTITIES)(x, y)
    extended = extend(copy.deepcopy(model), use_converter=use_converter)
    loss_fn = extend(nn.CrossEntropyLoss())
    assert any(m._backward_hooks for m in extended.modules())
    if use_converter:
        assert any(isinstance(m, SumModule) for m in extended.modules())
    before = hooked(extended)
    step = fxcurv.compile(extended, loss_fn, QUANTITIES)
    with backpack_context(BatchGrad(), DiagGGNExact()):
        inside = step(x, y)  # the first call, with its eager check, inside the block
    outside = step(x, y)
    assert hooked(extended) == before  # BackPACK's hooks are back in place
    assert not any(hasattr(p, "grad_batch") or hasattr(p, "diag_ggn_exact")
                   for p in extended.parameters())
    assert not any(hasattr(m, "input0") or hasattr(m, "output") for m in extended.modules())
    params = dict(model.named_parameters())
    grad = torch.autograd.grad(nn.CrossEntropyLoss()(model(x), y), list(params.values()))
    for got in (inside, outside):
        torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
        for ours, theirs in zip(got[1:], expected[1:]):
            assert ours.keys() == theirs.keys()
            for name in theirs:
                torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0, msg=name)
    for (name, p), g in zip(params.items(), grad):
        torch.testing.assert_close(outside[1][name], g, rtol=1e-10, atol=1e-12, msg=name)
    with backpack_context(BatchGrad()):  # eager BackPACK still works on the extended model
        loss_fn(extended(x), y).backward()
    for name, p in extended.named_parameters():
        torch.testing.assert_close(p.grad_batch, outside[2][name], rtol=1e-10, atol=1e-12,
                                   msg=name)


def hook_run_extensions(module, grad_input, grad_output):
    """Named like BackPACK's backward hook, but not it: it changes the gradient."""
    return (grad_input[0] * 3,)


@pytest.mark.parametrize("hook", [hook_run_extensions, lambda m, gi, go: None],
                         ids=["lookalike", "user_hook"])
def test_other_backward_hooks_on_an_extended_model_are_refused(hook):
    model = extend(cnn().to(DTYPE))
    model[3].register_full_backward_hook(hook)
    before = hooked(model)
    with pytest.raises(fxcurv.CompileError) as info:
        fxcurv.compile(model, nn.CrossEntropyLoss(), ["batch_grad"])
    assert "backward hook" in str(info.value) and "3 (Conv2d)" in str(info.value)
    assert hooked(model) == before  # BackPACK's hooks are put back after a refusal too


def test_importing_fxcurv_does_not_import_backpack():
    """BackPACK stays optional and out of the way: ``import fxcurv`` (and tracing a model
    without BackPACK's modules) leaves it unimported; its converter modules are found in
    ``sys.modules`` once a model built from them has imported them."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415
    code = ("import sys, torch, fxcurv\n"
            "fxcurv.compile(torch.nn.Linear(3, 2), torch.nn.MSELoss())\n"
            "assert 'backpack' not in sys.modules, 'backpack imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
