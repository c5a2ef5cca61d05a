"""``compile(..., example=(x, y))``: Python branches on sizes decided on an example batch.

Models written like timm's VGG head (``if x.shape[-2] < k: pool``) and Twins' windowed
attention (pad to a multiple of the window when ``pad > 0``, crop after): without an example
fx cannot trace them (the error says to pass one); with one, every quantity matches
brute force in float64, for the example's batch size and others, and a call with other
shapes past the sample axis raises. A branch on the number of samples is refused.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

import fxcurv

DTYPE = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


class PooledHead(nn.Module):
    """timm's ``ConvMlp``: pool the map up to the kernel size only when it is smaller."""

    def __init__(self, kernel: int = 3):
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 3, kernel)

    def forward(self, x):
        x = torch.tanh(self.conv(x))
        if x.shape[-2] < self.kernel or x.shape[-1] < self.kernel:
            x = F.adaptive_avg_pool2d(x, self.kernel)
        if x.shape[-1] > self.kernel:
            x = F.adaptive_avg_pool2d(x, self.kernel)
        return self.head(x).flatten(1)


class PaddedWindows(nn.Module):
    """Twins' locally grouped attention: pad the map to whole windows when needed, attend
    within each window, crop back."""

    def __init__(self, window: int = 3):
        super().__init__()
        self.window = window
        self.embed = nn.Conv2d(2, 4, 1)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = self.embed(x).permute(0, 2, 3, 1)                     # [N, H, W, C]
        n, h, w, c = x.shape
        pad_r = (self.window - w % self.window) % self.window
        pad_b = (self.window - h % self.window) % self.window
        if pad_r > 0 or pad_b > 0:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = x.shape[1], x.shape[2]
        windows = x.reshape(n, hp // self.window, self.window, wp // self.window,
                            self.window, c).transpose(2, 3)
        windows = windows.reshape(n, -1, self.window * self.window, c)
        attended = torch.softmax(windows @ windows.transpose(-2, -1), -1) @ self.mix(windows)
        x = attended.reshape(n, hp // self.window, wp // self.window, self.window,
                             self.window, c).transpose(2, 3).reshape(n, hp, wp, c)
        if pad_r > 0 or pad_b > 0:
            x = x[:, :h, :w, :].contiguous()
        return self.head(x.mean((1, 2)))


class TokenGrid(nn.Module):
    """Tokens ``[N, T, C]`` folded back into a ``√T × √T`` map: ``int(T ** .5)`` of a traced
    size (segmentation heads on ViTs, ConViT) is the example's value."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(2, 4, 1)
        self.conv = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)          # [N, T, C]
        side = int(tokens.shape[1] ** 0.5)
        grid = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)
        return self.conv(torch.tanh(grid)).mean((2, 3))


class BatchBranch(nn.Module):
    def __init__(self, threshold: int = 2):
        super().__init__()
        self.fc, self.threshold = nn.Linear(4, 3), threshold

    def forward(self, x):
        if x.shape[0] > self.threshold:
            return self.fc(x) * 2
        return self.fc(x)


def data(n: int, side: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, side, side, dtype=DTYPE, generator=g), \
        torch.randint(0, 3, (n,), generator=g)


def per_sample_grads(model, x, y):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xn, yn):
        return F.cross_entropy(functional_call(model, p, (xn[None],)), yn[None]) / len(y)
    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


@pytest.mark.parametrize("build, side", [(PooledHead, 2), (PooledHead, 5),
                                         (PaddedWindows, 4), (TokenGrid, 3)],
                         ids=["pooled_small", "pooled_large", "padded_windows", "int_of_a_size"])
def test_branches_on_sizes_follow_the_example(build, side):
    torch.manual_seed(0)
    model, loss_fn = build().to(DTYPE), nn.CrossEntropyLoss()
    x, y = data(4, side)
    with pytest.raises(fxcurv.CompileError, match=r"example=\(x, y\)"):
        fxcurv.compile(model, loss_fn, ["batch_grad"])
    step = fxcurv.compile(model, loss_fn, ["batch_grad", "diag_ggn_exact"], example=(x, y))
    for n in (4, 3, 1):  # any number of samples
        xn, yn = data(n, side, seed=n)
        loss, gradient, batch_grad, _ = step(xn, yn)
        torch.testing.assert_close(loss, loss_fn(model(xn), yn).detach(), **TOL)
        expected = per_sample_grads(model, xn, yn)
        for name, value in expected.items():
            torch.testing.assert_close(batch_grad[name], value, **TOL, msg=name)
            torch.testing.assert_close(gradient[name], value.sum(0), **TOL, msg=name)
    with pytest.raises(ValueError, match="traced on an example"):
        step(*data(2, side + 1))


def test_a_branch_on_the_number_of_samples_is_checked_when_the_step_runs():
    """``if x.shape[0] > 2`` goes one way for the example (4 samples) and for one more: the
    step takes that way and raises, naming the branch, for a batch that would go the other
    (Hugging Face's mask code: ``if batch_size != position_ids.shape[0]``)."""
    x, y = torch.randn(6, 4, dtype=DTYPE), torch.tensor([0, 1, 2, 0, 1, 2])
    model = BatchBranch().to(DTYPE)
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), ["batch_grad"], example=(x[:4], y[:4]))
    for n in (3, 6):
        loss, grad, _ = step(x[:n], y[:n])
        expected = torch.autograd.grad(nn.CrossEntropyLoss()(model(x[:n]), y[:n]),
                                       list(model.parameters()))
        torch.testing.assert_close(list(grad.values()), list(expected))
    with pytest.raises(ValueError, match=r"branches on the number of samples at node 'gt' "
                                         r"\(op gt, .*line \d+: if x.shape\[0\] > "
                                         r"self.threshold:\)"):
        step(x[:2], y[:2])
    torch.jit.script(step)(x[:3], y[:3])


def test_a_branch_that_differs_for_one_more_sample_is_refused():
    x, y = torch.randn(4, 4, dtype=DTYPE), torch.tensor([0, 1, 2, 0])
    with pytest.raises(fxcurv.CompileError, match="branches on the number of samples"):
        fxcurv.compile(BatchBranch(threshold=4).to(DTYPE), nn.CrossEntropyLoss(),
                       example=(x, y))


def test_an_example_without_branches_changes_nothing():
    """No branch taken: no shape check, the step serves any shape as without an example."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).to(DTYPE)
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), example=data(2, 5))
    assert "example" not in step.code
    step(*data(3, 7))


def test_a_branch_on_data_stays_a_trace_error():
    class DataBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    x, y = torch.randn(4, 4, dtype=DTYPE), torch.tensor([0, 1, 2, 0])
    with pytest.raises(fxcurv.CompileError, match="could not trace"):
        fxcurv.compile(DataBranch().to(DTYPE), nn.CrossEntropyLoss(), example=(x, y))


def test_a_stepped_example_keeps_torchscript():
    model = PooledHead().to(DTYPE)
    x, y = data(2, 2)
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), ["batch_l2"], example=(x, y))
    scripted = torch.jit.script(step)
    for got, want in zip(scripted(x, y)[2].values(), step(x, y)[2].values()):
        torch.testing.assert_close(got, want, **TOL)
    with pytest.raises(Exception, match="traced on an example"):
        scripted(*data(2, 3))


@pytest.mark.parametrize("example", [torch.zeros(2, 4), (torch.zeros(2, 4),)],
                         ids=["a_tensor", "one_item"])
def test_an_example_that_is_not_a_pair_is_refused(example):
    with pytest.raises(fxcurv.CompileError, match=r"example must be a pair \(x, y\)"):
        fxcurv.compile(BatchBranch().to(DTYPE), nn.CrossEntropyLoss(), example=example)


class Unpacked(nn.Module):
    """Hugging Face's attention reshape, ``(*x.shape[:-1], -1, d)``, and a module object
    called from outside the model (Hugging Face's kernel-hub wrappers of functions)."""

    def __init__(self, outside: nn.Module):
        super().__init__()
        self.fc, self.outside = nn.Linear(4, 4), [outside]  # (a list: not a submodule)

    def forward(self, x):
        h = self.fc(x)
        heads = h.view(*h.shape[:-1], -1, 2)                 # [N, T, 2, 2]
        return self.outside[0](heads).flatten(2).mean(1)


class Halves(nn.Module):
    def forward(self, h):
        first, second = h.unbind(-1)
        return torch.tanh(first) * second


def test_unpacked_shapes_and_modules_outside_the_model_trace_with_an_example():
    x, y = torch.randn(3, 5, 4, dtype=DTYPE), torch.tensor([0, 1, 0])
    assert_exact_with_an_example_only(Unpacked(Halves()).to(DTYPE), x, y,
                                      r"unpacks them \(\(\*x.shape\[:-1\]")


def assert_exact_with_an_example_only(model, x, y, refusal: str) -> None:
    """Without an example: a ``CompileError`` matching ``refusal``; with one: per-sample
    gradients equal to ``per_sample_grads``."""
    with pytest.raises(fxcurv.CompileError, match=refusal):
        fxcurv.compile(model, nn.CrossEntropyLoss(), ["batch_grad"])
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), ["batch_grad"], example=(x, y))
    per_sample = per_sample_grads(model, x, y)
    for name, value in step(x, y)[2].items():
        torch.testing.assert_close(value, per_sample[name])


class PositionBias(nn.Module):
    """A position table sliced by sizes read as ``h.shape[-2]`` (an axis counted from the
    end: T5's relative position bias) and ``x.shape[:2][1]`` (a slice of a shape: BART)."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(4, 4), nn.Linear(4, 3)
        self.table, self.other = nn.Parameter(torch.randn(8, 4)), nn.Parameter(torch.randn(8, 4))

    def forward(self, x):                                       # [N, T, 4]
        h = self.fc(x)
        h = h + self.table[:h.shape[-2]] + self.other[:x.shape[:2][1]]
        return self.head(torch.tanh(h).mean(1))


def test_sizes_counted_from_the_end_hold_no_samples_with_an_example():
    """The example's ranks place ``h.shape[-2]`` on axis 1: the sliced table holds no
    samples and its per-sample gradients are exact. Without an example the axis could be 0,
    and the slice is refused as indexing the samples."""
    torch.manual_seed(0)
    x, y = torch.randn(3, 5, 4, dtype=DTYPE), torch.tensor([0, 2, 1])
    assert_exact_with_an_example_only(PositionBias().to(DTYPE), x, y,
                                      "it indexes the sample axis 0")



class StridePool(nn.Module):
    """Funnel Transformer's stride pooling: ``axis %= x.ndim`` builds the index, ``torch.cat``
    takes NumPy's ``axis=`` keyword."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):                                       # [N, T, 4]
        h = torch.tanh(self.fc(x))
        axis = -2
        axis %= h.ndim
        first = tuple([slice(None)] * axis + [slice(None, 1)])
        h = torch.cat([h[first], h], axis=axis)
        return self.head(h[tuple([slice(None)] * axis + [slice(None, None, 2)])].mean(1))


def test_a_rank_read_as_the_example_and_numpys_axis_keyword():
    """``x.ndim`` is the example's rank (the step then checks the example's shapes) and
    ``axis=`` is ``dim=``: per-sample gradients exact (before: a trace error, then a rule
    that could not bind ``axis``); a batch of another rank raises."""
    torch.manual_seed(0)
    x, y = torch.randn(3, 5, 4, dtype=DTYPE), torch.tensor([0, 2, 1])
    model = StridePool().to(DTYPE)
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), ["batch_grad"], example=(x, y))
    per_sample = per_sample_grads(model, x, y)
    for name, value in step(x, y)[2].items():
        torch.testing.assert_close(value, per_sample[name])
    with pytest.raises(ValueError, match="shape"):
        step(torch.randn(3, 5, 2, 4, dtype=DTYPE), y)


def test_a_fake_value_is_never_one_of_another_tensor_with_a_reused_id():
    """The example's fake values are looked up by ``id``: a tensor freed while tracing (the
    one-more-sample batch, a temporary attribute) may leave its id to a new one, which must
    get its own fake value, not the freed tensor's. (A constant the tracer creates for the
    forward, such as Funnel's, could take the id of the freed one-more-sample batch: its
    fake value then had the wrong shape, later ops had none, and a branch on a size failed
    to trace, in one full suite run of several.)"""
    from fxcurv.example import ExampleValues  # noqa: PLC0415
    values = ExampleValues((torch.randn(2, 3), torch.zeros(2)), nn.Linear(3, 1))
    freed, new = torch.randn(5), torch.randn(4, 4)
    values.fakes[id(new)] = (freed, values._fake(freed))  # as if ``new`` had freed's old id
    assert values._fake(new).shape == (4, 4)
    assert values._fake(new) is values._fake(new)  # (one fake per live tensor)
