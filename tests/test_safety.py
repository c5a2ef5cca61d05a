"""What the symbolic trace cannot see must not become a silently wrong number: non-scalar
losses (refused at compile time, or checked at call time where the graph cannot tell),
parameters replaced after compile (a StepError), and the first call's check against eager
autograd (``verify=True``)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxcurv
from fxcurv import CompileError, StepError


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def batch(n: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,))


def eager(model: nn.Module, loss_fn, x, y) -> tuple[torch.Tensor, dict]:
    loss = loss_fn(model(x), y)
    names, params = zip(*model.named_parameters())
    return loss, dict(zip(names, torch.autograd.grad(loss, params)))


# -- family 5: the loss must be a scalar ------------------------------------------------------
VECTOR_LOSSES = {
    "CrossEntropyLoss(none)": nn.CrossEntropyLoss(reduction="none"),
    "cross_entropy(none)": lambda out, y: F.cross_entropy(out, y, reduction="none"),
    "mse_loss(none)": lambda out, y: F.mse_loss(out, F.one_hot(y, 3).double(), reduction="none"),
    "squared error": lambda out, y: (out - F.one_hot(y, 3)) ** 2,
    "sum over classes": lambda out, y: out.sum(1) * 2.0 + 1.0,
    "tanh of the output": lambda out, y: torch.tanh(out),
}


@pytest.mark.parametrize("loss_fn", VECTOR_LOSSES.values(), ids=VECTOR_LOSSES.keys())
def test_a_loss_that_keeps_the_batch_axis_is_refused_at_compile_time(loss_fn):
    with pytest.raises(CompileError) as info:
        fxcurv.compile(mlp(), loss_fn)
    message = str(info.value)
    assert "not a scalar" in message and "node 'loss'" in message
    assert "reduction='mean'" in message and ".mean()" in message


REDUCED_LOSSES = {
    "unreduced then mean": lambda out, y: F.cross_entropy(out, y, reduction="none").mean(),
    "unreduced then weighted sum": lambda out, y: (
        F.cross_entropy(out, y, reduction="none") * 0.5).sum() + 2.0,
    "squared error mean": lambda out, y: ((out - F.one_hot(y, 3)) ** 2).mean(),
    "module mean": nn.CrossEntropyLoss(),
    "module sum": nn.CrossEntropyLoss(reduction="sum"),
}


@pytest.mark.parametrize("loss_fn", REDUCED_LOSSES.values(), ids=REDUCED_LOSSES.keys())
def test_scalar_losses_compile_without_a_call_time_check(loss_fn):
    model, (x, y) = mlp(), batch()
    step = fxcurv.compile(model, loss_fn)
    assert "check_scalar_loss" not in step.code  # the graph proves the loss is a scalar
    loss, grad = step(x, y)
    expected_loss, expected_grad = eager(model, loss_fn, x, y)
    torch.testing.assert_close(loss, expected_loss)
    for name, value in expected_grad.items():
        torch.testing.assert_close(grad[name], value)


def test_a_loss_of_unknown_shape_is_checked_on_every_call():
    """``out.sum(0)`` reduces the batch axis: only the call can tell it is ``[C]``."""
    step = fxcurv.compile(mlp(), lambda out, y: out.sum(0), verify=False)
    assert "check_scalar_loss" in step.code
    x, y = batch()
    with pytest.raises(ValueError, match=r"shape \[3\], not a scalar.*\.mean\(\)"):
        step(x, y)
    with pytest.raises(Exception, match="not a scalar"):
        torch.jit.script(step)(x, y)


def test_a_loss_of_unknown_shape_that_is_a_scalar_runs():
    model, (x, y) = mlp(), batch()
    loss_fn = lambda out, y: out.sum(0)[1]  # noqa: E731 - a scalar the graph cannot prove
    step = fxcurv.compile(model, loss_fn)
    loss, grad = step(x, y)
    expected_loss, expected_grad = eager(model, loss_fn, x, y)
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(grad["2.weight"], expected_grad["2.weight"])


# -- family 6: parameters replaced after compile ----------------------------------------------
def replace_weight(model):
    model[2].weight = nn.Parameter(torch.zeros_like(model[2].weight))


def replace_layer(model):
    model[2] = nn.Linear(6, 3).double()


def assign_state(model):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)


@pytest.mark.parametrize("replace", [replace_weight, replace_layer, assign_state])
def test_a_parameter_replaced_after_compile_raises(replace):
    model, (x, y) = mlp(), batch()
    step = fxcurv.compile(model, nn.CrossEntropyLoss())
    step(x, y)
    replace(model)
    name = "0.weight" if replace is assign_state else "2.weight"
    with pytest.raises(StepError, match=rf"parameter `{name}` was replaced after compile; "
                                        "compile again"):
        step(x, y)
    step = fxcurv.compile(model, nn.CrossEntropyLoss())  # compiling again reads the new ones
    loss, grad = step(x, y)
    torch.testing.assert_close(grad["2.weight"], eager(model, nn.CrossEntropyLoss(), x, y)[1][
        "2.weight"])


def test_in_place_updates_are_read_live():
    """optimizer.step(), load_state_dict (copying) and .to(same dtype) keep the objects."""
    model, (x, y) = mlp(), batch()
    loss_fn = nn.CrossEntropyLoss()
    step = fxcurv.compile(model, loss_fn)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    _, grad = step(x, y)
    for name, param in model.named_parameters():
        param.grad = grad[name]
    optimizer.step()
    model.load_state_dict({k: v * 1.5 for k, v in model.state_dict().items()})
    model.to(torch.float64)
    loss, grad = step(x, y)
    expected_loss, expected_grad = eager(model, loss_fn, x, y)
    torch.testing.assert_close(loss, expected_loss)
    for name, value in expected_grad.items():
        torch.testing.assert_close(grad[name], value)


# -- the first-call check -----------------------------------------------------------------------
def doubling_hook(module, inputs, output):
    return output * 2


def test_first_call_check_catches_what_the_trace_missed():
    """A hook registered after compile: the step, frozen at compile, does not run it."""
    model, (x, y) = mlp(), batch()
    step = fxcurv.compile(model, nn.CrossEntropyLoss())
    model[2].register_forward_hook(doubling_hook)
    with pytest.raises(StepError, match="first-call check failed: the step's loss differs"):
        step(x, y)
    with pytest.raises(StepError):  # still loud on the next call
        step(x, y)
    unchecked = fxcurv.compile(model, nn.CrossEntropyLoss(), verify=False)
    assert unchecked.meta["fxcurv"]["verify"] == "off"
    unchecked(x, y)


def test_first_call_check_compares_gradients():
    """A hook that changes only the backward: same loss, another gradient."""
    model, (x, y) = mlp(), batch()
    step = fxcurv.compile(model, nn.CrossEntropyLoss())
    model[1].register_forward_hook(lambda m, i, out: out.detach() + (out - out.detach()) * 3)
    with pytest.raises(StepError, match=r"gradient of `0\.(weight|bias)` differs"):
        step(x, y)


class HalfPrecisionInside(nn.Module):
    """A float64 model whose middle computes in float32, as EfficientViT's attention and
    LLaMA's RMSNorm do whatever the model's dtype."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x).float()).to(x.dtype))


def test_first_call_check_allows_the_precision_the_step_computes_in():
    from fxcurv.guard import compare, lowest_precision
    model = HalfPrecisionInside().double()
    step = fxcurv.compile(model, nn.CrossEntropyLoss())
    assert lowest_precision(step.graph) == torch.float32
    assert lowest_precision(fxcurv.compile(mlp(), nn.CrossEntropyLoss()).graph) in \
        (None, torch.float64)
    step(torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,)))
    loss, grad = torch.tensor(1.0, dtype=torch.float64), {"w": torch.ones(3, dtype=torch.float64)}
    near = {"w": grad["w"] * (1 + 1e-5)}
    compare(loss, near, loss, grad, torch.float32)   # within float32's tolerance
    with pytest.raises(StepError, match="relative tolerance 1.2e-07"):
        compare(loss, near, loss, grad)


def test_a_call_under_autocast_passes_the_check_and_returns_parameter_dtypes(device):
    """Under ``torch.autocast`` the step's matrix products run in bfloat16, as eager
    autograd's do: the first-call check allows bfloat16's tolerance (before: a StepError on a
    0.3 % difference), and every parameter's results come back in float32, as ``p.grad``
    does (before: the weights' in bfloat16, the biases' in float32)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 3)).to(device)
    x, y = torch.randn(6, 8, device=device), torch.randint(0, 3, (6,), device=device)
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), ["diag_ggn_exact", "kfac"])
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss, grad, diag_ggn, kfac = step(x, y)
        eager_loss, eager_grad = eager(model, nn.CrossEntropyLoss(), x, y)
    plain = fxcurv.compile(model, nn.CrossEntropyLoss(), ["diag_ggn_exact"])(x, y)
    for name, p in model.named_parameters():
        assert grad[name].dtype == diag_ggn[name].dtype == torch.float32, name
        assert all(factor.dtype == torch.float32 for factor in kfac[name]), name
        torch.testing.assert_close(grad[name], eager_grad[name], rtol=2e-2, atol=1e-3)
        torch.testing.assert_close(diag_ggn[name], plain[2][name], rtol=5e-2, atol=1e-3)
    torch.testing.assert_close(loss, eager_loss)


EAGER_RUNS = []


class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0
        self.fc = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):
        EAGER_RUNS.append(1)  # runs only when the forward runs eagerly (not in the step)
        self.calls += 1  # what the forward stores on the model is undone after the check
        return self.bn(self.fc(x))


def test_first_call_check_runs_once_leaves_buffers_and_modes_alone():
    torch.manual_seed(0)
    model = Counting().double()
    x, y = batch()
    step = fxcurv.compile(model, nn.CrossEntropyLoss())  # train mode: batch statistics
    calls = len(EAGER_RUNS)
    model.eval()  # after compile: the step keeps train mode, and so does the check
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    with torch.inference_mode():
        step(x, y)
        step(x, y)
    assert len(EAGER_RUNS) == calls + 1 and model.calls == 0
    assert not model.training and not model.bn.training
    for name, value in model.named_buffers():
        assert torch.equal(value, buffers[name]), name
    assert step.meta["fxcurv"]["verify"] == "first call"


def test_first_call_check_is_skipped_with_a_note_when_the_forward_draws_random_numbers():
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Linear(6, 3)).double()
    step = fxcurv.compile(model, nn.CrossEntropyLoss())
    assert step.meta["fxcurv"]["verify"].startswith("skipped: the forward draws random")
    x, y = batch()
    with pytest.warns(UserWarning, match="first-call check .* was skipped") as record:
        step(x, y)
    assert record[0].filename == __file__  # the note points at the user's call
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(x, y)  # the note comes once
        fxcurv.compile(model, nn.CrossEntropyLoss(), verify=False)(x, y)


def test_guards_stay_out_of_torchscript_and_export():
    model, (x, y) = mlp(), batch()
    step = fxcurv.compile(model, nn.CrossEntropyLoss())
    scripted = torch.jit.script(step)
    n = torch.export.Dim("N", min=2)
    exported = torch.export.export(step, (x, y), dynamic_shapes={"x": {0: n}, "y": {0: n}})
    expected = step(x, y)
    for result in (scripted(x, y), exported.module()(x, y)):
        torch.testing.assert_close(result[0], expected[0])
        torch.testing.assert_close(result[1], expected[1])


def test_a_step_with_guards_can_be_saved():
    """``torch.save`` pickles the step; its guard pickles as an inert one (not the model)."""
    import io

    step = fxcurv.compile(mlp(), lambda out, y: F.cross_entropy(out, y))  # a lambda: no pickle
    torch.save(step, io.BytesIO())
