"""Models written for BackPACK's converter (``backpack.custom_module``: ``Parallel`` +
``SumModule`` branches, ``ScaleModule``, ``Permute``, ``Slicing``, ``Pad``, and models converted
by ``extend(model, use_converter=True)``) compile, and give BackPACK's own numbers."""
from __future__ import annotations

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
from backpack.extensions import BatchL2Grad, DiagGGNExact  # noqa: E402

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
