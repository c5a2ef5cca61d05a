"""KFRA: equal to BackPACK's on the chains it supports; a clear error on branching graphs."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fxcurv

backpack = pytest.importorskip("backpack")
from backpack.extensions import KFRA  # noqa: E402


def chains():
    torch.manual_seed(0)
    return {
        "mlp": (nn.Sequential(nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 4), nn.ReLU(),
                              nn.Linear(4, 3)), (7, 5)),
        "cnn_maxpool": (nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Flatten(), nn.Linear(8, 3)), (3, 1, 6, 6)),
        "cnn_tanh_avgpool": (nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(),
                                           nn.AvgPool2d(2), nn.Conv2d(2, 2, 2), nn.Flatten(),
                                           nn.Linear(8, 3)), (3, 1, 6, 6)),
    }


LOSSES = {"ce_mean": nn.CrossEntropyLoss(), "ce_sum": nn.CrossEntropyLoss(reduction="sum"),
          "mse_mean": nn.MSELoss(), "mse_sum": nn.MSELoss(reduction="sum")}


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("chain", list(chains()))
def test_kfra_equals_backpack(chain, loss, float64):
    model, shape = chains()[chain]
    loss_fn = LOSSES[loss]
    x = torch.randn(*shape)
    y = torch.randint(0, 3, (shape[0],)) if "ce" in loss else torch.randn(shape[0], 3)
    _, _, kfra = fxcurv.compile(model, loss_fn, ["kfra"])(x, y)
    extended, extended_loss = backpack.extend(copy.deepcopy(model)), backpack.extend(
        copy.deepcopy(loss_fn))
    with backpack.backpack(KFRA()):
        extended_loss(extended(x), y).backward()
    for name, param in extended.named_parameters():
        assert len(kfra[name]) == len(param.kfra)
        for ours, theirs in zip(kfra[name], param.kfra):
            torch.testing.assert_close(ours, theirs, rtol=1e-8, atol=1e-12)


def test_kfra_torchscript_round_trip(float64, tmp_path):
    model, shape = chains()["mlp"]
    x, y = torch.randn(*shape), torch.randint(0, 3, (shape[0],))
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), ["kfra"])
    path = str(tmp_path / "kfra.pt")
    torch.jit.script(step).save(path)
    eager, loaded = step(x, y)[2], torch.jit.load(path)(x, y)[2]
    for name in eager:
        for a, b in zip(eager[name], loaded[name]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_kfra_on_a_residual_graph_is_refused():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            h = self.fc1(x)
            return self.fc2(h + torch.tanh(h))

    with pytest.raises(fxcurv.CompileError, match=r"quantity 'kfra'.*chain.*kflr"):
        fxcurv.compile(Residual(), nn.CrossEntropyLoss(), ["kfra"])
