"""Every compile-time and call-time error names what is wrong, where, and what to do."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxcurv
from fxcurv import CompileError


class TangentModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        hidden = torch.tan(self.fc(x))  # no rule; its decomposition reaches prims.tan
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
        fxcurv.compile(TangentModel(), nn.CrossEntropyLoss(), ["batch_grad"])
    message = str(info.value)
    assert "node 'tan'" in message and "op tan" in message
    assert "TangentModel" in message                   # the module
    assert "hidden = torch.tan(self.fc(x))" in message  # the user's source line
    assert "prims.tan" in message                       # the primitive that is missing
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

    with pytest.raises(CompileError, match="sample axis 0.*per-sample quantities such as .batch_grad. are undefined"):
        fxcurv.compile(Centered(), nn.MSELoss(), ["batch_grad"])


def test_unsupported_argument_is_named():
    with pytest.raises(CompileError, match="reduction 'bogus' is unknown"):
        fxcurv.compile(nn.Linear(3, 2),
                       lambda out, y: nn.functional.mse_loss(out, y, reduction="bogus"))


@pytest.mark.parametrize("options, message", [
    ({"scale_factor": 2.0, "mode": "bilinear", "antialias": True}, "antialias=True has no rule"),
    ({"size": (4, 4), "mode": "nearest-bogus"}, "interpolate mode 'nearest-bogus' has no rule"),
])
def test_unsupported_interpolate_arguments_are_named(options, message):
    """Resampling the rule cannot differentiate exactly is refused at compile time, naming
    the node and the argument."""

    class Resample(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)

        def forward(self, x):
            return nn.functional.interpolate(self.conv(x), **options).mean((2, 3))

    with pytest.raises(CompileError, match=f"node 'interpolate'.*{message}"):
        fxcurv.compile(Resample(), nn.CrossEntropyLoss())


def test_loss_returning_a_tuple():
    """A model may return several tensors (tests/test_structured.py); the loss returns one."""
    with pytest.raises(CompileError, match="loss_fn must return a single tensor"):
        fxcurv.compile(nn.Linear(3, 2), lambda out, y: (out.sum(), out.mean()))


def test_loss_reading_no_model_output():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x), self.fc.weight

    with pytest.raises(CompileError, match="reads no output of the model's forward"):
        fxcurv.compile(Two(), lambda out, y: out[1].sum())


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


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(3, 3), BranchOnValue())

    def forward(self, x):
        return self.block(x)


def test_control_flow_error_names_the_module_path_and_the_line():
    with pytest.raises(CompileError) as info:
        fxcurv.compile(Nested(), nn.CrossEntropyLoss())
    message = str(info.value)
    assert "module block.1 (BranchOnValue)" in message
    assert 'test_errors.py", line' in message and "if h.sum() > 0:" in message
    assert "torch/fx" not in message


USER_SCRIPT = '''
import importlib.util, sys
root = sys.argv[1]
spec = importlib.util.spec_from_file_location(  # the checkout's fxcurv, not the installed one
    "fxcurv", root + "/fxcurv/__init__.py", submodule_search_locations=[root + "/fxcurv", root])
fxcurv = importlib.util.module_from_spec(spec)
sys.modules["fxcurv"] = fxcurv
spec.loader.exec_module(fxcurv)
assert fxcurv.__file__.startswith(root) and fxcurv.passes.__file__.startswith(root)
import torch, torch.nn as nn

def vector_loss(out, y):
    return (out - 1.0) ** 2  # USER LINE A

class Branch(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # USER LINE B
            x = -x
        return x

class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3, 2, proj_size=1)

    def forward(self, x):
        out, _ = self.rnn(x)  # USER LINE C
        return out.sum(0)

for model, loss_fn, options in (
        (nn.Linear(3, 2), vector_loss, {}),
        (nn.Sequential(nn.Linear(3, 2), Branch()), nn.CrossEntropyLoss(), {}),
        (Recurrent(), nn.MSELoss(), {"sequence_length": 2})):
    try:
        fxcurv.compile(model, loss_fn, **options)
    except fxcurv.CompileError as err:
        print(err)
'''


def test_source_lines_found_in_a_checkout_named_fxcurv(tmp_path):
    """Frames are told apart by where the files really are: a checkout (and the user's
    code) inside a folder named ``fxcurv`` still gets the user's line, never torch's."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    root = tmp_path / "fxcurv"
    for package in ("fxcurv", "passes"):
        shutil.copytree(repo / package, root / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    script = root / "user_check.py"
    script.write_text(USER_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(root)], cwd="/",
                            capture_output=True, text=True, timeout=300, check=True)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3, result.stdout + result.stderr
    assert f'File "{script}", line' in lines[0] and "# USER LINE A" in lines[0]
    assert f'File "{script}", line' in lines[1] and "# USER LINE B" in lines[1]
    assert f'File "{script}", line' in lines[2] and "# USER LINE C" in lines[2]
    assert "module 1 (Branch)" in lines[1]
    assert "proxy.py" not in result.stdout and "torch/fx" not in result.stdout


class _NormScaled(nn.Module):
    """``h · ‖h‖_∞``: a lowered op (vector_norm) called with an order its rule refuses."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        h = self.linear(x)
        return h * torch.linalg.vector_norm(h, ord=float("inf"), dim=1, keepdim=True)


@pytest.mark.parametrize("make, loss_fn", [
    (_NormScaled, nn.CrossEntropyLoss()),
    (lambda: nn.Sequential(nn.Linear(4, 3), nn.LogSoftmax(1)),
     lambda out, y: nn.functional.nll_loss(out, y, reduce=False).sum()),
], ids=["norm_of_order_inf", "nll_loss_legacy_reduce"])
def test_unsupported_call_of_a_lowered_op_is_refused_not_lowered(make, loss_fn):
    """A call whose arguments the rule does not support stays as it is and is refused (before:
    lowered anyway; an inf-norm became (Σ|x|^inf)^0, the legacy ``reduce`` was dropped: wrong
    numbers with ``verify=False``)."""
    with pytest.raises(CompileError, match="order inf|deprecated 'size_average'/'reduce'"):
        fxcurv.compile(make(), loss_fn, [], verify=False)


class _Bags(nn.Module):
    """An ``EmbeddingBag`` called as configured, then a head."""

    def __init__(self, offsets: bool = False, **options):
        super().__init__()
        self.bag, self.head, self.offsets = nn.EmbeddingBag(6, 4, **options), nn.Linear(4, 3), offsets

    def forward(self, x):
        if self.offsets:
            return self.head(self.bag(x.flatten(), torch.arange(0, x.numel(), x.size(1))))
        return self.head(self.bag(x))


@pytest.mark.parametrize("options, message", [
    ({"offsets": True}, "embedding_bag with offsets"),
    ({"mode": "max", "padding_idx": 0}, "max mode with a padding_idx"),
    ({"max_norm": 1.0}, "max_norm renormalises"),
])
def test_embedding_bag_refusals(options, message):
    """Bags as a flat input with offsets have no sample axis; the other refusals are
    embedding's (in-place renormalisation) or combinations without a rule."""
    with pytest.raises(CompileError, match=f"node 'embedding_bag'.*{message}"):
        fxcurv.compile(_Bags(**options), nn.CrossEntropyLoss(), ["batch_grad"])


def test_embedding_bag_needs_a_2d_input_when_it_runs():
    step = fxcurv.compile(_Bags(), nn.CrossEntropyLoss(), [], verify=False)
    with pytest.raises(ValueError, match=r"needs a 2-D input \[N, L\]"):
        step(torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2]))


def test_spectral_norm_in_train_mode_is_refused():
    """Train mode updates the power-iteration vectors in place at every forward, which the
    compiled step never does: refused at compile time, naming the module (eval mode
    compiles: tests/test_zoo.py, model spectral_norm)."""
    model = nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(4, 3)))
    with pytest.raises(CompileError, match=r"module 0\.parametrizations\.weight\.0 "
                                           r"\(spectral_norm\) is in train mode"):
        fxcurv.compile(model, nn.CrossEntropyLoss(), [])


def test_unflatten_that_splits_samples_raises_when_the_step_runs():
    """``unflatten(0, (2, -1))`` of 4 samples puts two samples in each row: a reshape of the
    sample axis, checked when the step runs (a negative ``dim`` that lands on axis 0 too).
    The gradient alone needs no rows and stays right."""
    class Split(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.fc, self.dim = nn.Linear(4, 3), dim

        def forward(self, x):
            return self.fc(x).unflatten(self.dim, (2, -1)).flatten(0, 1)

    x, y = torch.randn(4, 4), torch.randn(4, 3)
    for dim in (0, -2):
        step = fxcurv.compile(Split(dim), nn.MSELoss(), ["batch_grad"])
        with pytest.raises(ValueError, match=r"puts samples together in one row of the "
                                             r"sample axis 0 "
                                             r"\(4 samples, shape \[2, 2, 3\] after\)"):
            step(x, y)
    model = Split(0)
    _, grad = fxcurv.compile(model, nn.MSELoss(), [], verify=False)(x, y)
    expected = torch.autograd.grad(nn.MSELoss()(model(x), y), list(model.parameters()))
    torch.testing.assert_close(list(grad.values()), list(expected))
