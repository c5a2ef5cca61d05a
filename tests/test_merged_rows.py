"""Samples merged into rows inside the model: a CNN applied to every frame of a clip
(``x.flatten(0, 1)`` of ``[N, T, C, H, W]``), Swin's window partition (``[N·W, w·w, C]``),
``unflatten(0, (N, T))`` back to samples before a recurrent layer, one layer applied to both one
and two rows per sample, a per-sample query repeated for each of its windows
(``repeat_interleave`` along axis 0, GCViT).

Each sample then has ``k`` rows of axis 0 in sample order, and its per-row parameter terms add
up to its own (``passes/sample_axis.py``, ``merged_rows``; ``passes/per_sample.py``). Every
quantity that allows this is checked in float64 against per-sample brute force with no fxcurv
code: per-sample gradients by autograd on each sample alone, per-sample GGNs
``J_nᵀ H_n J_n`` by ``jacrev`` and ``hessian``. The Hessian family and KFRA (whose residual
columns start at each op's rows) still need one row per sample: the step raises naming the
node. Before: every quantity but the gradient raised for all three models."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, hessian, jacrev

import fxcurv

DTYPE = torch.float64
TOL = dict(rtol=1e-9, atol=1e-12)


class Frames(nn.Module):
    """A CNN on every frame, its features averaged over the clip: ``[N, T, C, H, W]`` ->
    ``[N·T, C, H, W]`` -> conv, tanh, linear per frame -> ``[N, T, F]`` -> mean -> head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.norm = nn.GroupNorm(1, 3)
        self.fc = nn.Linear(3 * 4 * 4, 5)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        n, t = x.shape[0], x.shape[1]
        h = torch.tanh(self.norm(self.conv(x.flatten(0, 1))))   # [N·T, 3, 4, 4]
        h = torch.sigmoid(self.fc(h.view(n * t, -1)))            # [N·T, 5]
        return self.head(h.view(n, t, -1).mean(1))


class Windows(nn.Module):
    """Swin-style attention inside non-overlapping windows: ``[N, H, W, C]`` -> windows
    ``[N·nW, w·w, C]`` -> multi-head attention with a per-window additive mask (the view
    ``[-1, nW, heads, T, T]`` and back) -> windows reversed -> LayerNorm, mean, head."""

    def __init__(self, dim=4, heads=2, window=2, side=4):
        super().__init__()
        self.embed = nn.Linear(3, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)
        self.heads, self.window, self.side = heads, window, side
        windows = (side // window) ** 2
        self.register_buffer("mask", torch.randn(windows, window ** 2, window ** 2))

    def partition(self, x):
        n, h, w, c = x.shape
        s = self.window
        x = x.view(n, h // s, s, w // s, s, c).permute(0, 1, 3, 2, 4, 5).contiguous()
        return x.view(-1, s * s, c)

    def reverse(self, windows, h, w):
        s = self.window
        c = windows.shape[-1]
        x = windows.view(-1, h // s, w // s, s, s, c).permute(0, 1, 3, 2, 4, 5).contiguous()
        return x.view(-1, h, w, c)

    def forward(self, x):
        x = self.embed(x)
        _, h, w, c = x.shape
        windows = self.partition(x)                                 # [N·nW, T, C]
        rows, t, _ = windows.shape
        qkv = self.qkv(windows).reshape(rows, t, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)              # [N·nW, heads, T, d]
        attn = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)
        count = self.mask.shape[0]
        attn = attn.view(-1, count, self.heads, t, t) + self.mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, self.heads, t, t).softmax(-1)
        out = (attn @ v).transpose(1, 2).reshape(rows, t, c)
        x = x + self.reverse(self.proj(out), h, w)
        return self.head(self.norm(x).mean((1, 2)))


class FramesThenLSTM(nn.Module):
    """Per-frame features, split back by ``unflatten(0, (N, T))``, an LSTM over the clip."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.lstm = nn.LSTM(4, 3, batch_first=True)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        frames = torch.relu(self.fc(x.reshape(-1, 6)))             # [N·T, 4]
        out, _ = self.lstm(frames.unflatten(0, (x.size(0), -1)))
        return self.head(out[:, -1])


class Shared(nn.Module):
    """One layer on each sample's row and on two rows per sample (a stack flattened into
    rows): its uses have different numbers of rows (before: the gradient's joined use failed
    to concatenate them)."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        rows = torch.stack([h, h.flip(-1)], 1).flatten(0, 1)          # [2N, 4]
        return self.head(h + torch.tanh(self.fc(rows)).view(x.size(0), 2, -1).sum(1))


class GlobalQuery(nn.Module):
    """GCViT's global attention: windows as rows ``[N·W, w, D]`` and a query per sample
    repeated for each of its windows, ``q.repeat_interleave(rows // N, dim=0)``."""

    def __init__(self):
        super().__init__()
        self.query, self.key, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(8, 3)

    def forward(self, x):                                       # [N, 4, 4]
        windows = x.view(-1, 2, 4)                              # [N·2, 2, 4]
        q = self.query(x.mean(1))                               # [N, 4]
        q = q.repeat_interleave(windows.shape[0] // q.shape[0], dim=0)
        scores = torch.softmax((self.key(windows) * q[:, None, :]).sum(-1), -1)  # [N·2, 2]
        pooled = (scores[..., None] * windows).sum(1)           # [N·2, 4]
        return self.head(torch.tanh(pooled).view(x.size(0), -1))


def _data(name: str):
    gen = torch.Generator().manual_seed(3)
    if name == "frames":
        return torch.randn(3, 2, 2, 4, 4, generator=gen, dtype=DTYPE), \
            torch.randint(0, 4, (3,), generator=gen)
    if name == "windows":
        return torch.randn(3, 4, 4, 3, generator=gen, dtype=DTYPE), \
            torch.randint(0, 3, (3,), generator=gen)
    if name == "global":
        return torch.randn(3, 4, 4, generator=gen, dtype=DTYPE), \
            torch.randint(0, 3, (3,), generator=gen)
    if name == "shared":
        return torch.randn(3, 4, generator=gen, dtype=DTYPE), \
            torch.randint(0, 3, (3,), generator=gen)
    return torch.randn(3, 4, 6, generator=gen, dtype=DTYPE), \
        torch.randint(0, 2, (3,), generator=gen)


MODELS = {"frames": Frames, "windows": Windows, "lstm": FramesThenLSTM, "shared": Shared,
          "global": GlobalQuery}
FIRST_ORDER = ["batch_grad", "batch_l2", "sum_grad_squared", "variance"]
GGN = ["diag_ggn_exact", "diag_ggn_exact_batch", "sqrt_ggn_exact", "ggnmp", "kflr"]


@functools.lru_cache(maxsize=None)
def case(name: str):
    torch.manual_seed(0)
    model = MODELS[name]().to(DTYPE)
    for p in model.parameters():  # unit scale: every term well away from rounding
        p.data.normal_()
    return model, *_data(name)


@functools.lru_cache(maxsize=None)
def brute_force(name: str):
    """``(grads [N, P], ggns [N, P, P])`` per sample, each sample through the model alone."""
    model, x, y = case(name)
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = list(params)
    sizes = [p.numel() for p in params.values()]
    theta = torch.cat([p.reshape(-1) for p in params.values()])

    def output(flat, xn):
        pieces = dict(zip(names, (t.reshape(params[n].shape)
                                  for n, t in zip(names, flat.split(sizes)))))
        return functional_call(model, pieces, (xn,))

    grads, ggns = [], []
    for n in range(x.size(0)):
        xn, yn = x[n:n + 1], y[n:n + 1]

        def loss(flat, xn=xn, yn=yn):
            return F.cross_entropy(output(flat, xn), yn) / x.size(0)
        grads.append(torch.func.grad(loss)(theta))
        jac = jacrev(output)(theta, xn).reshape(-1, theta.numel())
        f = output(theta, xn)
        h = hessian(lambda z, yn=yn: F.cross_entropy(z, yn) / x.size(0))(f)
        h = h.reshape(f.numel(), f.numel())
        ggns.append(jac.T @ h @ jac)
    return names, sizes, torch.stack(grads), torch.stack(ggns)


def _flat(values: dict, lead: int = 0) -> torch.Tensor:
    return torch.cat([v.reshape(*v.shape[:lead], -1) for v in values.values()], dim=-1)


@functools.lru_cache(maxsize=None)
def compiled(name: str):
    model, x, y = case(name)
    vectors = {n: torch.randn(2, *p.shape, dtype=DTYPE, generator=torch.Generator()
                              .manual_seed(7)) for n, p in model.named_parameters()}
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), FIRST_ORDER + GGN + ["kfac"],
                          sequence_length=x.size(1) if name == "lstm" else None)
    _, grad, *values = step(x, y, vectors)
    return step, vectors, grad, dict(zip(FIRST_ORDER + GGN + ["kfac"], values))


@pytest.mark.parametrize("name", list(MODELS))
def test_first_order_quantities_are_per_sample(name):
    _, _, expected, _ = brute_force(name)
    _, _, grad, got = compiled(name)
    torch.testing.assert_close(_flat(got["batch_grad"], 1), expected, **TOL)
    torch.testing.assert_close(_flat(grad), expected.sum(0), **TOL)
    torch.testing.assert_close(torch.stack(list(got["batch_l2"].values())).sum(0),
                               expected.square().sum(1), **TOL)
    torch.testing.assert_close(_flat(got["sum_grad_squared"]), expected.square().sum(0),
                               **TOL)
    n = expected.size(0)
    variance = expected.square().sum(0) / n - (expected.sum(0) / n).square()
    torch.testing.assert_close(_flat(got["variance"]), variance, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("name", list(MODELS))
def test_ggn_quantities_are_the_per_sample_ggn(name):
    names, sizes, _, ggns = brute_force(name)
    step, vectors, _, got = compiled(name)
    ggn = ggns.sum(0)
    torch.testing.assert_close(_flat(got["diag_ggn_exact"]), ggn.diagonal(), **TOL)
    torch.testing.assert_close(_flat(got["diag_ggn_exact_batch"], 1),
                               ggns.diagonal(dim1=1, dim2=2), **TOL)
    factor = _flat(got["sqrt_ggn_exact"], 2)                            # [C, N, P]
    torch.testing.assert_close(torch.einsum("cnp,cnq->npq", factor, factor), ggns, **TOL)
    flat_vectors = _flat(vectors, 1)                                     # [V, P]
    starts = [0] + torch.tensor(sizes).cumsum(0).tolist()
    for (param, product), a, b in zip(got["ggnmp"].items(), starts, starts[1:]):
        expected = flat_vectors[:, a:b] @ ggn[a:b, a:b]
        torch.testing.assert_close(product.reshape(2, -1), expected, **TOL, msg=param)


@pytest.mark.parametrize("name", list(MODELS))
def test_kronecker_factors_run_and_blocks_are_exact(name):
    """Kronecker factors count a sample's rows as samples of the layer (conventions.md); a
    parameter without Kronecker structure (a norm's scale) gets its exact GGN block."""
    names, sizes, _, ggns = brute_force(name)
    _, _, _, got = compiled(name)
    starts = [0] + torch.tensor(sizes).cumsum(0).tolist()
    for param, a, b in zip(names, starts, starts[1:]):
        for quantity in ("kflr", "kfac"):
            factors = got[quantity][param]
            assert all(torch.isfinite(f).all() for f in factors), (quantity, param)
        factors = got["kflr"][param]
        if len(factors) == 1 and factors[0].dim() == 2 and factors[0].size(0) == b - a and \
                "weight" in param and ("norm" in param):
            torch.testing.assert_close(factors[0], ggns.sum(0)[a:b, a:b], **TOL)


def test_kflr_of_a_linear_layer_on_frames_counts_frames_as_positions():
    """``fc`` sees ``N·T`` rows: ``G = Σ_{rows, c} s sᵀ`` and ``A = Σ x xᵀ / (N·T)``, what
    the same layer on ``[N, T, I]`` gives (the "expand" convention)."""
    model, x, y = case("frames")
    _, _, _, got = compiled("frames")
    frames = torch.tanh(model.norm(model.conv(x.flatten(0, 1)))).flatten(1)
    torch.testing.assert_close(got["kflr"]["fc.weight"][1],
                               frames.T @ frames / frames.size(0), **TOL)


def test_the_merged_step_scripts_and_exports_with_the_same_outputs():
    step, vectors, grad, got = compiled("windows")
    _, x, y = case("windows")
    scripted = torch.jit.script(step)
    exported = torch.export.export(step, (x, y, vectors)).module()
    for program in (scripted, exported):
        _, grad_again, *values = program(x, y, vectors)
        torch.testing.assert_close(grad_again, grad, **TOL)
        torch.testing.assert_close(values[0], got["batch_grad"], **TOL)
        torch.testing.assert_close(values[4], got["diag_ggn_exact"], **TOL)


@pytest.mark.parametrize("quantity", ["diag_h", "hmp", "pchmp_clip"])
def test_quantities_that_need_one_row_per_sample_raise_naming_the_reshape(quantity):
    model, x, y = case("frames")
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), [quantity])
    args = (x, y) if quantity == "diag_h" else \
        (x, y, {n: torch.randn(1, *p.shape, dtype=DTYPE) for n, p in model.named_parameters()})
    with pytest.raises(ValueError, match=r"node 'flatten' reshapes the sample axis 0 \(3 "
                                         r"samples, shape \[6, 2, 4, 4\] after\).*Hessian"):
        step(*args)


def test_kfra_needs_one_row_per_sample():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.outer = nn.Linear(3, 3), nn.Linear(12, 2)

        def forward(self, x):
            return self.outer(torch.relu(self.inner(x.flatten(0, 1))).view(x.size(0), -1))

    model = Tokens().to(DTYPE)
    x, y = torch.randn(3, 4, 3, dtype=DTYPE), torch.randint(0, 2, (3,))
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), ["kfra"])
    with pytest.raises(ValueError, match=r"node 'flatten' reshapes the sample axis 0"):
        step(x, y)
    fxcurv.compile(model, nn.CrossEntropyLoss(), ["kflr"])(x, y)


def test_rows_that_mix_samples_raise_naming_the_reshape():
    """``view(2, -1)`` of 4 samples puts two samples in one row: refused when the step runs
    (the gradient alone is still right)."""
    class Pairs(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x).view(2, -1).view(x.size(0), -1)

    model = Pairs().to(DTYPE)
    x, y = torch.randn(4, 4, dtype=DTYPE), torch.randint(0, 3, (4,))
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), ["batch_grad"])
    with pytest.raises(ValueError, match=r"node 'view' puts samples together in one row of "
                                         r"the sample axis 0 \(4 samples, shape \[2, 6\] "
                                         r"after\)"):
        step(x, y)


def test_values_with_one_row_per_sample_get_no_regrouping():
    """Only what a merging reshape reaches is regrouped: the head after ``view(n, t, -1)``
    (``n = x.shape[0]``) and the plain classifier keep the ops' own formulas."""
    step = compiled("frames")[0]
    code = step.code
    assert "rows_into_positions" in code and "rows_by_sample" in code
    head_lines = [line for line in code.splitlines() if "head_weight" in line and
                  ("rows_into_positions" in line or "rows_by_sample" in line)]
    assert not head_lines


def test_monte_carlo_ggn_is_unbiased_on_merged_rows():
    model, x, y = case("frames")
    _, _, _, ggns = brute_force("frames")
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), ["diag_ggn_mc"], mc_samples=20000)
    torch.manual_seed(0)
    _, _, mc = step(x, y)
    exact = ggns.sum(0).diagonal()
    error = (_flat(mc) - exact).norm() / exact.norm()
    assert error < 0.05, error
