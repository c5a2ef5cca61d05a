"""Every compile-time and call-time error names what is wrong, where, and what to do."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxcurv
from fxcurv import CompileError


class SineModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        hidden = torch.sin(self.fc(x))  # no rule; its decomposition reaches prims.sin
        return self.out(hidden)


class BranchOnValue(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        h = self.fc(x)
        if h.sum() > 0:  # data-dependent control flow
            h = -h
        return h


def test_op_without_rule_names_node_module_line_quantity_and_hint():
    with pytest.raises(CompileError) as info:
        fxcurv.compile(SineModel(), nn.CrossEntropyLoss(), ["batch_grad"])
    message = str(info.value)
    assert "node 'sin'" in message and "op sin" in message
    assert "SineModel" in message                      # the module
    assert "hidden = torch.sin(self.fc(x))" in message  # the user's source line
    assert "prims.sin" in message                       # the primitive that is missing
    assert "test_errors.py" in message
    assert "quantity 'batch_grad'" in message
    assert "register a rule" in message                  # what to do


def test_untraceable_model_explains_control_flow():
    with pytest.raises(CompileError) as info:
        fxcurv.compile(BranchOnValue(), nn.CrossEntropyLoss())
    message = str(info.value)
    assert "could not trace" in message
    assert "if h.sum() > 0:" in message
    assert "control flow" in message and "torch.where" in message


def test_unknown_quantity_lists_valid_ones():
    with pytest.raises(CompileError, match=r"unknown quantity 'diag_ggn'.*batch_grad.*variance"):
        fxcurv.compile(nn.Linear(3, 2), nn.MSELoss(), ["diag_ggn"])


def test_quantities_given_as_a_string():
    with pytest.raises(CompileError, match=r"write \['batch_grad'\]"):
        fxcurv.compile(nn.Linear(3, 2), nn.MSELoss(), "batch_grad")


def test_quantity_requested_twice():
    with pytest.raises(CompileError, match="requested twice"):
        fxcurv.compile(nn.Linear(3, 2), nn.MSELoss(), ["batch_l2", "batch_l2"])


def test_not_yet_implemented_quantity_is_not_called_unknown(monkeypatch):
    from fxcurv import quantities
    pending = quantities.QUANTITIES["kfra"].__class__(**{
        **quantities.QUANTITIES["kfra"].__dict__, "implemented": False})
    monkeypatch.setitem(quantities.QUANTITIES, "kfra", pending)
    with pytest.raises(CompileError, match="'kfra' is not implemented in this version"):
        fxcurv.compile(nn.Linear(3, 2), nn.MSELoss(), ["kfra"])


def test_bad_mc_samples():
    with pytest.raises(CompileError, match="mc_samples must be a positive int"):
        fxcurv.compile(nn.Linear(3, 2), nn.MSELoss(), mc_samples=0)


def test_model_without_trainable_parameters():
    model = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(CompileError, match="no trainable parameters"):
        fxcurv.compile(model, nn.MSELoss())


def test_batchnorm_train_mode_with_per_sample_quantity():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
    with pytest.raises(CompileError) as info:
        fxcurv.compile(model, nn.CrossEntropyLoss(), ["batch_l2"])
    message = str(info.value)
    assert "node 'batch_norm'" in message and "module 1 (BatchNorm1d)" in message
    assert "train mode" in message and "quantity 'batch_l2'" in message
    assert "model.eval()" in message


def test_reduction_over_the_batch_inside_the_model_with_per_sample_quantity():
    class Centered(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            h = self.fc(x)
            return h - h.mean(0)

    with pytest.raises(CompileError, match="sample axis 0.*per-sample quantities are undefined"):
        fxcurv.compile(Centered(), nn.MSELoss(), ["batch_grad"])


def test_unsupported_argument_is_named():
    with pytest.raises(CompileError, match="reduction 'bogus' is unknown"):
        fxcurv.compile(nn.Linear(3, 2),
                       lambda out, y: nn.functional.mse_loss(out, y, reduction="bogus"))


def test_model_returning_a_tuple():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x), x

    with pytest.raises(CompileError, match="must return a single tensor"):
        fxcurv.compile(Two(), lambda out, y: out[0].sum())


@pytest.mark.parametrize("x, y, message", [
    (torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2),
     r"x has dtype torch.float64 but the model's parameters are torch.float32"),
    (torch.randn(4, 3), torch.randn(5, 2), r"y has 5 samples along axis 0 but the input x has 4"),
    (torch.randn(4, 3), torch.randn(4, 3), r"mse_loss: target shape \[4, 3\] does not match"),
])
def test_wrong_input_or_target_at_call_time(x, y, message):
    step = fxcurv.compile(nn.Linear(3, 2), nn.MSELoss())
    with pytest.raises(Exception, match=message):
        step(x, y)
    with pytest.raises(Exception, match=message):
        torch.jit.script(step)(x, y)
