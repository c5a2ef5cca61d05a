"""Recurrent layers (``nn.RNN`` tanh/relu, ``nn.LSTM``, ``nn.GRU``, unrolled at trace time):
every quantity against a brute-force float64 reference, two layers, uni- and bidirectional.

References: per-sample gradients, Jacobians and Hessians of the real modules by
``torch.autograd`` (one sample at a time); the GGN as ``Σ_n J_nᵀ H_n J_n``; Kronecker factors
by their definition (the "expand" convention: ``G = Σ`` over the uses of a weight of the
output factor's Gram matrix, ``A`` the mean of the uses' input Gram matrices ``Σ a aᵀ / rows``)
from a hand-unrolled copy of the layer with a zero probe added to each linear output.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call

import fxcurv
from fxcurv.rules.recurrent import lstm_layer

torch.fx.wrap("lstm_layer")  # a leaf call when a model calls the fused op itself

DTYPE = torch.float64
N, T, I, H, C = 3, 3, 3, 2, 3
TOL = dict(rtol=1e-7, atol=1e-10)
KINDS = {"rnn_tanh": (nn.RNN, {}), "rnn_relu": (nn.RNN, {"nonlinearity": "relu"}),
         "lstm": (nn.LSTM, {}), "gru": (nn.GRU, {})}


class Tagger(nn.Module):
    """A recurrent body, then a linear head at every step: logits ``[N, C, T]``."""

    def __init__(self, kind: str, bidirectional: bool, layers: int = 2, bias: bool = True):
        super().__init__()
        cls, extra = KINDS[kind]
        self.rnn = cls(I, H, num_layers=layers, bidirectional=bidirectional, bias=bias,
                       batch_first=True, **extra)
        self.head = nn.Linear(H * (2 if bidirectional else 1), C)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out).permute(0, 2, 1)


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, T, I, dtype=DTYPE, generator=g)
    return x, torch.randint(0, C, (N, T), generator=g)


def make(kind: str, bidirectional: bool, **kw) -> nn.Module:
    torch.manual_seed(1)
    return Tagger(kind, bidirectional, **kw).to(DTYPE)


# -- brute force ------------------------------------------------------------------------------
class Flat:
    """The model as a function of one flat parameter vector."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [p.shape for _, p in model.named_parameters()]
        self.vec = torch.cat([p.detach().flatten() for p in model.parameters()])

    def split(self, vec) -> dict:
        sizes = [s.numel() for s in self.shapes]
        return {n: v.view(s) for n, v, s in zip(self.names, vec.split(sizes), self.shapes)}

    def out(self, vec, x):
        return functional_call(self.model, self.split(vec), (x,))

    def blocks(self, vec) -> dict:
        """``[P]`` (or ``[..., P]`` over the last axis) -> ``{name: [..., *shape]}``."""
        sizes = [s.numel() for s in self.shapes]
        parts = vec.split(sizes, -1)
        return {n: p.reshape(*p.shape[:-1], *s) for n, p, s in zip(self.names, parts,
                                                                    self.shapes)}


def sample_loss(f, y_n):
    """Sample n's share of the mean cross-entropy over ``N·T'`` positions (``T' = 1`` for
    ``[N, C]`` logits)."""
    return F.cross_entropy(f, y_n, reduction="sum") / y_n.numel() / N


def brute_force(model: nn.Module, x, y, hessians: bool = False) -> dict:
    """Per-sample gradients, GGN (and with ``hessians`` Hessian) blocks, the exact GGN
    factor."""
    flat = Flat(model)
    grads, ggns, blocks, factors = [], [], [], []
    for n in range(N):
        xn, yn = x[n:n + 1], y[n:n + 1]
        out = flat.out(flat.vec, xn)
        jac = jacobian(lambda v: flat.out(v, xn).flatten(), flat.vec)         # [C·T, P]
        h_out = hessian(lambda f: sample_loss(f.view(out.shape), yn), out.flatten())
        grads.append(jacobian(lambda v: sample_loss(flat.out(v, xn), yn), flat.vec))
        ggns.append(jac.T @ h_out @ jac)
        if hessians:
            blocks.append(hessian(lambda v: sample_loss(flat.out(v, xn), yn), flat.vec))
        factors.append(jac.T @ loss_factor(out.detach().reshape(1, C, -1)))   # [P, C·T]
    return {"flat": flat, "grads": torch.stack(grads), "ggn": torch.stack(ggns),
            "hessian": torch.stack(blocks) if hessians else None,
            "factor": torch.stack(factors)}


def loss_factor(out):
    """``S`` ``[C·T, C·T]`` with ``S Sᵀ`` the Hessian of a sample's loss w.r.t. its logits
    ``[1, C, T]`` (flattened): column ``c·T + t`` is column c of ``diag(√p) − p √pᵀ`` at
    position t, scaled by ``1/√(N·T)`` (CONVENTIONS.md)."""
    steps = out.size(2)
    s = torch.zeros(C, steps, C, steps, dtype=DTYPE)
    for t in range(steps):
        p = out[0, :, t].softmax(0)
        s[:, t, :, t] = (torch.diag(p.sqrt()) - torch.outer(p, p.sqrt())) / (N * steps) ** 0.5
    return s.reshape(C * steps, C * steps)


def diagonal_blocks(flat: Flat, matrices) -> dict:
    """``[..., P, P]`` -> each parameter's diagonal ``{name: [..., *shape]}``."""
    return flat.blocks(matrices.diagonal(dim1=-2, dim2=-1))


def block_products(flat: Flat, matrix, vectors: dict) -> dict:
    """Each parameter's own block of ``matrix`` times its vectors ``[V, *shape]``."""
    result, start = {}, 0
    for name, shape in zip(flat.names, flat.shapes):
        size = shape.numel()
        block = matrix[start:start + size, start:start + size]
        result[name] = (vectors[name].flatten(1) @ block).view(-1, *shape)
        start += size
    return result


def assert_dicts(actual: dict, expected: dict, what: str, **tol) -> None:
    assert list(actual) == list(expected), what
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], **(tol or TOL),
                                   msg=lambda m: f"{what}[{key}]: {m}")


# -- every quantity ---------------------------------------------------------------------------
FIRST_AND_GGN = ["batch_grad", "batch_l2", "sum_grad_squared", "variance", "diag_ggn_exact",
                 "diag_ggn_exact_batch", "sqrt_ggn_exact", "ggnmp"]


def vectors_for(model: nn.Module, count: int = 2) -> dict:
    g = torch.Generator().manual_seed(3)
    return {n: torch.randn(count, *p.shape, dtype=DTYPE, generator=g)
            for n, p in model.named_parameters()}


def check_first_order_and_ggn(model: nn.Module, x, y) -> None:
    """Every first-order and exact-GGN quantity (and ggnmp) against :func:`brute_force`."""
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), FIRST_AND_GGN, sequence_length=T)
    vectors = vectors_for(model)
    loss, grad, bg, l2, sgs, var, dg, dgb, sqrt, ggnmp = step(x, y, vectors)
    ref = brute_force(model, x, y)
    flat = ref["flat"]
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y))
    per_sample = flat.blocks(ref["grads"])
    assert_dicts(grad, {k: v.sum(0) for k, v in per_sample.items()}, "grad")
    assert_dicts(bg, per_sample, "batch_grad")
    assert_dicts(l2, {k: v.flatten(1).square().sum(1) for k, v in per_sample.items()},
                 "batch_l2")
    assert_dicts(sgs, {k: v.square().sum(0) for k, v in per_sample.items()},
                 "sum_grad_squared")
    assert_dicts(var, {k: (v.square().mean(0) - v.mean(0).square())
                       for k, v in per_sample.items()}, "variance")
    assert_dicts(dg, diagonal_blocks(flat, ref["ggn"].sum(0)), "diag_ggn_exact")
    assert_dicts(dgb, diagonal_blocks(flat, ref["ggn"]), "diag_ggn_exact_batch")
    assert_dicts(sqrt, {k: v.permute(1, 0, *range(2, v.dim()))
                        for k, v in flat.blocks(ref["factor"].transpose(1, 2)).items()},
                 "sqrt_ggn_exact")
    assert_dicts(ggnmp, block_products(flat, ref["ggn"].sum(0), vectors), "ggnmp")


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_first_order_and_ggn(kind, bidirectional, one_thread):
    model = make(kind, bidirectional)
    check_first_order_and_ggn(model, *batch())


class TimeMajor(nn.Module):
    """``batch_first=False`` without bias: the model moves its samples to axis 1 and back."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(I, H, num_layers=2, bidirectional=True, bias=False)
        self.head = nn.Linear(2 * H, C)

    def forward(self, x):
        out, _ = self.rnn(x.transpose(0, 1))
        return self.head(out.permute(1, 0, 2)).permute(0, 2, 1)


class FinalStates(nn.Module):
    """Classification from the final states ``h_n[-1]``, ``c_n[-1]`` of a two-layer LSTM
    whose initial states come from the input (``unsqueeze(0)`` / ``stack``)."""

    def __init__(self):
        super().__init__()
        self.init = nn.Linear(I, H)
        self.rnn = nn.LSTM(I, H, num_layers=2, batch_first=True)
        self.head = nn.Linear(H, C)

    def forward(self, x):
        h0 = torch.tanh(self.init(x[:, 0]))
        _, (h, c) = self.rnn(x, (torch.stack([h0, -h0]), torch.stack([h0 * 0.5, h0])))
        return self.head(h[-1] + c[-1])


class GivenState(nn.Module):
    """An RNN (relu) whose initial state is a layer of the input, ``unsqueeze(0)``-ed."""

    def __init__(self):
        super().__init__()
        self.init = nn.Linear(I, H)
        self.rnn = nn.RNN(I, H, nonlinearity="relu", batch_first=True)
        self.head = nn.Linear(H, C)

    def forward(self, x):
        out, h = self.rnn(x, self.init(x[:, -1]).unsqueeze(0))
        return self.head(out + h.transpose(0, 1)).permute(0, 2, 1)


@pytest.mark.parametrize("make_model", [TimeMajor, FinalStates, GivenState])
def test_layouts_states_and_no_bias(make_model, one_thread):
    torch.manual_seed(2)
    model = make_model().to(DTYPE)
    x, y = batch()
    if make_model is FinalStates:
        y = y[:, 0]
    check_first_order_and_ggn(model, x, y)


# -- Kronecker factors: the expand convention -------------------------------------------------
def _cell(mode: str, xp, hp, h, c):
    """One step as PyTorch documents it (independent of fxcurv's lowering)."""
    if mode in ("RNN_TANH", "RNN_RELU"):
        return (torch.tanh if mode == "RNN_TANH" else torch.relu)(xp + hp), c
    if mode == "LSTM":
        i, f, g, o = (xp + hp).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    (xr, xz, xn), (hr, hz, hn) = xp.chunk(3, 1), hp.chunk(3, 1)
    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return (1 - z) * n + z * h, c


def unrolled(model: Tagger, x, probes: dict):
    """``model(x)`` by hand, with ``probes[key]`` added to the output of each linear use of a
    recurrent weight (key ``(layer, direction, "ih")`` for the input projection of all steps,
    ``(layer, direction, t)`` for the hidden projection at step t); also each use's input."""
    m, seq, inputs = model.rnn, x, {}
    for layer in range(m.num_layers):
        outs = []
        for d in range(2 if m.bidirectional else 1):
            sfx = f"_l{layer}{'_reverse' if d else ''}"
            w_ih, w_hh = getattr(m, "weight_ih" + sfx), getattr(m, "weight_hh" + sfx)
            b_ih = getattr(m, "bias_ih" + sfx) if m.bias else None
            b_hh = getattr(m, "bias_hh" + sfx) if m.bias else None
            inputs[(layer, d, "ih")] = seq
            xp = F.linear(seq, w_ih, b_ih) + probes.get((layer, d, "ih"), 0)
            h = c = torch.zeros(x.size(0), H, dtype=DTYPE)
            hs = [None] * T
            for t in (range(T - 1, -1, -1) if d else range(T)):
                inputs[(layer, d, t)] = h
                hp = F.linear(h, w_hh, b_hh) + probes.get((layer, d, t), 0)
                h, c = _cell(m.mode, xp[:, t], hp, h, c)
                hs[t] = h
            outs.append(torch.stack(hs, 1))
        seq = torch.cat(outs, 2)
    return model.head(seq).permute(0, 2, 1), inputs


def kronecker_reference(model: Tagger, x, y) -> dict:
    """``{weight name: [G, A]}`` and ``{bias name: [G]}`` of the recurrent layer by the expand
    convention, from per-sample probe Jacobians and the loss Hessian w.r.t. the logits."""
    _, inputs = unrolled(model, x, {})
    keys = list(inputs)
    grams = {key: 0 for key in keys}
    for n in range(N):
        zero = tuple(torch.zeros(1, T, GATES(model) * H, dtype=DTYPE) if key[2] == "ih"
                     else torch.zeros(1, GATES(model) * H, dtype=DTYPE) for key in keys)
        def out(*p, n=n):
            return unrolled(model, x[n:n + 1], dict(zip(keys, p)))[0].flatten()
        jacs = jacobian(out, zero)
        h_out = hessian(lambda f: sample_loss(f.view(1, C, T), y[n:n + 1]),
                        out(*zero).detach())
        for key, jac in zip(keys, jacs):
            jac = jac.reshape(C * T, -1, GATES(model) * H)            # [C·T, positions, O]
            grams[key] = grams[key] + torch.einsum("kto,kl,ltp->op", jac, h_out, jac)
    result = {}
    for layer in range(model.rnn.num_layers):
        for d in range(2 if model.rnn.bidirectional else 1):
            sfx = f"_l{layer}{'_reverse' if d else ''}"
            seq = inputs[(layer, d, "ih")].flatten(0, 1)
            result["rnn.weight_ih" + sfx] = [grams[(layer, d, "ih")], seq.T @ seq / (N * T)]
            g_hh = sum(grams[(layer, d, t)] for t in range(T))
            a_hh = sum(inputs[(layer, d, t)].T @ inputs[(layer, d, t)] / N for t in range(T))
            result["rnn.weight_hh" + sfx] = [g_hh, a_hh / T]
            if model.rnn.bias:
                result["rnn.bias_ih" + sfx] = [grams[(layer, d, "ih")]]
                result["rnn.bias_hh" + sfx] = [g_hh]
    return {k: [f.detach() for f in v] for k, v in result.items()}


def GATES(model: Tagger) -> int:  # noqa: N802
    return {"RNN_TANH": 1, "RNN_RELU": 1, "LSTM": 4, "GRU": 3}[model.rnn.mode]


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_kflr_by_the_expand_convention(kind, bidirectional, one_thread):
    model = make(kind, bidirectional)
    x, y = batch()
    with torch.no_grad():
        torch.testing.assert_close(unrolled(model, x, {})[0], model(x))  # the reference is
    _, _, kflr = fxcurv.compile(model, nn.CrossEntropyLoss(), ["kflr"],  # the model
                                sequence_length=T)(x, y)
    for name, factors in kronecker_reference(model, x, y).items():
        assert len(kflr[name]) == len(factors), name
        for i, (got, want) in enumerate(zip(kflr[name], factors)):
            torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"{name}[{i}]: {m}")


# -- Hessian ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_hessian_quantities(kind, bidirectional, one_thread):
    """``diag_h``, ``diag_h_batch``, ``hmp``: the exact Hessian, whose residual terms include
    every gate's second derivative and the cross terms of ``W_hh`` with the hidden state it
    produced (linear's ``cross_factors``)."""
    model = make(kind, bidirectional)
    x, y = batch()
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), ["diag_h", "diag_h_batch", "hmp"],
                          sequence_length=T)
    vectors = vectors_for(model)
    _, _, diag_h, diag_h_batch, hmp = step(x, y, vectors)
    ref = brute_force(model, x, y, hessians=True)
    flat = ref["flat"]
    assert_dicts(diag_h, diagonal_blocks(flat, ref["hessian"].sum(0)), "diag_h")
    assert_dicts(diag_h_batch, diagonal_blocks(flat, ref["hessian"]), "diag_h_batch")
    assert_dicts(hmp, block_products(flat, ref["hessian"].sum(0), vectors), "hmp")


# -- Monte-Carlo ------------------------------------------------------------------------------
def test_monte_carlo_quantities_average_to_the_exact_ones(one_thread):
    """``diag_ggn_mc(_batch)`` and ``kfac`` with many samples approach their exact
    counterparts (bidirectional two-layer LSTM); ``sqrt_ggn_mc`` squares to ``diag_ggn_mc``
    and ``diag_ggn_mc_batch`` sums to it in the same draw."""
    model = make("lstm", True)
    x, y = batch()
    quantities = ["diag_ggn_mc", "diag_ggn_mc_batch", "sqrt_ggn_mc", "kfac",
                  "diag_ggn_exact", "kflr"]
    torch.manual_seed(0)
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), quantities, mc_samples=4000,
                          sequence_length=T)
    _, _, mc, mc_batch, sqrt_mc, kfac, exact, kflr = step(x, y)
    for name in mc:
        torch.testing.assert_close(mc_batch[name].sum(0), mc[name], **TOL)
        torch.testing.assert_close(sqrt_mc[name].square().sum([0, 1]), mc[name], **TOL)
        scale = exact[name].abs().max()
        torch.testing.assert_close(mc[name], exact[name], rtol=0, atol=0.1 * scale)
        g_scale = kflr[name][0].abs().max()
        torch.testing.assert_close(kfac[name][0], kflr[name][0], rtol=0, atol=0.1 * g_scale)
        if len(kflr[name]) > 1:
            torch.testing.assert_close(kfac[name][1], kflr[name][1])


# -- refusals, call-time checks, TorchScript --------------------------------------------------
class Body(nn.Module):
    def __init__(self, rnn: nn.Module, packed: bool = False):
        super().__init__()
        self.rnn, self.packed = rnn, packed
        self.head = nn.Linear(rnn.hidden_size if not getattr(rnn, "proj_size", 0)
                              else rnn.proj_size, C)

    def forward(self, x):
        if self.packed:
            x = nn.utils.rnn.pack_padded_sequence(x, [T] * N, batch_first=True)
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


@pytest.mark.parametrize("rnn,packed,argument", [
    (nn.LSTM(I, H, batch_first=True, proj_size=1), False, "proj_size=1"),
    (nn.GRU(I, H, batch_first=True), True, "PackedSequence"),
    (nn.RNN(I, H, num_layers=2, dropout=0.5, batch_first=True), False, "dropout=0.5"),
], ids=["proj_size", "packed", "dropout"])
def test_unsupported_arguments_are_refused(rnn, packed, argument):
    with pytest.raises(fxcurv.CompileError) as info:
        fxcurv.compile(Body(rnn, packed).train(), nn.CrossEntropyLoss(), ["batch_grad"],
                       sequence_length=T)
    message = str(info.value)
    assert argument in message and "test_recurrent.py" in message, message
    if not packed:  # (the packed output is refused where it is read: out[:, -1])
        assert f"{type(rnn).__name__} at 'rnn'" in message and "self.rnn(x)" in message


class LearnedStart(nn.Module):
    """A two-layer bidirectional body whose initial states are parameters ``[L·D, 1, H]``
    expanded over the samples (``h0.expand(-1, N, -1).contiguous()``), head on the last step."""

    def __init__(self, kind: str):
        super().__init__()
        cls, extra = KINDS[kind]
        self.rnn = cls(I, H, num_layers=2, bidirectional=True, batch_first=True, **extra)
        self.h0, self.c0 = nn.Parameter(torch.randn(4, 1, H)), nn.Parameter(torch.randn(4, 1, H))
        self.head = nn.Linear(2 * H, C)

    def forward(self, x):
        h0 = self.h0.expand(-1, x.shape[0], -1).contiguous()
        c0 = self.c0.expand(-1, x.shape[0], -1).contiguous()
        out, _ = self.rnn(x, (h0, c0) if isinstance(self.rnn, nn.LSTM) else h0)
        return self.head(out[:, -1])


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_learned_initial_states_expanded_over_the_samples(kind, one_thread):
    """The layer picks its states by layer and direction, ``h0[k]`` of an expand that keeps
    axis 0, rewritten to ``h0_param[k].expand(N, H)`` (before: refused as an index of the
    sample axis): per-sample gradients of the states too, and the GGN, against brute force."""
    torch.manual_seed(0)
    model = LearnedStart(kind).to(DTYPE)
    x, y = batch()
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), ["batch_grad", "diag_ggn_exact"],
                          sequence_length=T)
    _, _, batch_grad, diag_ggn = step(x, y[:, 0])
    assert_dicts(torch.jit.script(step)(x, y[:, 0])[2], batch_grad, "scripted batch_grad")
    ref = brute_force(model, x, y[:, 0])
    flat = ref["flat"]
    assert_dicts(batch_grad, flat.blocks(ref["grads"]), "batch_grad")
    assert_dicts(diag_ggn, diagonal_blocks(flat, ref["ggn"].sum(0)), "diag_ggn_exact")


# -- variable lengths: pack_padded_sequence ---------------------------------------------------
LENGTHS = torch.tensor([2, 3, 1])  # (N = 3 samples of up to T = 3 steps)


class Packed(nn.Module):
    """``x`` ``[N, T, I]`` with ``lengths``, packed time-major (unsorted) through a two-layer
    recurrent body; the head reads ``h_n`` (both directions' last layer) or, with ``padded``,
    the output through ``pad_packed_sequence`` (batch first; the mean over each sample's
    steps)."""

    def __init__(self, kind: str, bidirectional: bool, padded: bool = False,
                 total_length: bool = True):
        super().__init__()
        cls, extra = KINDS[kind]
        self.rnn = cls(I, H, num_layers=2, bidirectional=bidirectional, batch_first=False,
                       **extra)
        self.head = nn.Linear(H * (2 if bidirectional else 1), C)
        self.padded, self.total_length = padded, total_length

    def forward(self, inputs):
        x, lengths = inputs
        packed = nn.utils.rnn.pack_padded_sequence(x.transpose(0, 1), lengths.cpu(),
                                                   enforce_sorted=False)
        out, state = self.rnn(packed)
        if self.padded:
            total = x.shape[1] if self.total_length else None
            steps, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True,
                                                        total_length=total)
            return self.head(steps.sum(1) / lengths.unsqueeze(1).to(steps.dtype))
        h_n = state[0] if isinstance(state, tuple) else state
        return self.head(torch.cat([h_n[-2], h_n[-1]], 1) if self.rnn.bidirectional
                         else h_n[-1])


def each_sample_alone(model: nn.Module, x, y) -> tuple[dict, dict]:
    """Per-sample gradients and the GGN diagonal, each sample run alone on its own steps
    (``torch.autograd.functional.jacobian`` of its logits in the flat parameters, the
    cross-entropy's Hessian)."""
    flat = Flat(model)
    grads, ggn_diag = [], 0
    for n in range(N):
        inputs = (x[n:n + 1, :int(LENGTHS[n])], LENGTHS[n:n + 1])
        jac = jacobian(lambda v: flat.out(v, inputs)[0], flat.vec)            # [C, P]
        prob = flat.out(flat.vec, inputs)[0].detach().softmax(0)
        h_out = (torch.diag(prob) - torch.outer(prob, prob)) / N
        grads.append((prob - F.one_hot(y[n], C).to(DTYPE)) / N @ jac)
        ggn_diag = ggn_diag + torch.einsum("cd,cp,dp->p", h_out, jac, jac)
    return flat.blocks(torch.stack(grads)), flat.blocks(ggn_diag)


PACKED_CASES = {  # each kind in both directions, each read-out in both directions
    "rnn_tanh-uni-h_n": ("rnn_tanh", False, False), "rnn_tanh-bi-pad": ("rnn_tanh", True, True),
    "lstm-uni-pad": ("lstm", False, True), "lstm-bi-h_n": ("lstm", True, False),
    "gru-uni-h_n": ("gru", False, False), "gru-bi-pad": ("gru", True, True),
}


@pytest.mark.parametrize("kind,bidirectional,padded", PACKED_CASES.values(),
                         ids=PACKED_CASES.keys())
def test_packed_sequences_match_each_sample_run_alone(kind, bidirectional, padded, one_thread):
    """Each sample's states stop at its length (the reverse direction starts there), so
    per-sample gradients and the GGN equal those of each sample run alone on its own steps
    (before: a PackedSequence was refused); a gradient-only step (unrolled, not fused) too."""
    torch.manual_seed(0)
    model = Packed(kind, bidirectional, padded).to(DTYPE)
    x, y = torch.randn(N, T, I, dtype=DTYPE), torch.tensor([0, 2, 1])
    per_sample, diag = each_sample_alone(model, x, y)
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), ["batch_grad", "diag_ggn_exact"],
                          sequence_length=T)
    _, grad, batch_grad, diag_ggn = step((x, LENGTHS), y)
    assert_dicts(batch_grad, per_sample, "batch_grad")
    assert_dicts(grad, {k: v.sum(0) for k, v in per_sample.items()}, "grad")
    assert_dicts(diag_ggn, diag, "diag_ggn_exact")
    _, alone = fxcurv.compile(model, nn.CrossEntropyLoss(), sequence_length=T)((x, LENGTHS), y)
    assert_dicts(alone, grad, "gradient-only grad")


class PaddedReadOut(nn.Module):
    """An LSTM on a packed batch read back by ``pad_packed_sequence(out, batch_first=True,
    padding_value=..., total_length=...)``, or by ``pad_packed_sequence`` of ``what``
    (``"tensor"``: the padded input itself, not a packed output)."""

    def __init__(self, padding_value: float = 0.0, total_length: int = T, what: str = "output"):
        super().__init__()
        self.rnn, self.head = nn.LSTM(I, H, batch_first=True), nn.Linear(H, C)
        self.padding_value, self.total_length, self.what = padding_value, total_length, what

    def forward(self, inputs):
        x, lengths = inputs
        out, _ = self.rnn(nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                                            enforce_sorted=False))
        steps, _ = nn.utils.rnn.pad_packed_sequence(
            x if self.what == "tensor" else out, batch_first=True,
            padding_value=self.padding_value, total_length=self.total_length)
        return self.head(torch.tanh(steps).sum(1))


def test_pad_packed_padding_value_and_its_refusals():
    """A padding value fills the padded steps as eager does (each sample alone, padded to the
    same total length, gives the same per-sample gradients). A ``total_length`` other than
    ``sequence_length`` and ``pad_packed_sequence`` of something not packed by a recurrent
    layer are refused at compile time, naming the call."""
    torch.manual_seed(0)
    model = PaddedReadOut(padding_value=-2.0).to(DTYPE)
    x, y = torch.randn(N, T, I, dtype=DTYPE), torch.tensor([0, 2, 1])
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), ["batch_grad"], sequence_length=T)
    loss, _, batch_grad = step((x, LENGTHS), y)
    torch.testing.assert_close(loss, F.cross_entropy(model((x, LENGTHS)), y))
    per_sample, _ = each_sample_alone(model, x, y)
    assert_dicts(batch_grad, per_sample, "batch_grad")
    for bad, match in [(PaddedReadOut(total_length=T + 1), "total_length=4 differs"),
                       (PaddedReadOut(what="tensor"), "got a tensor, not the output")]:
        with pytest.raises(fxcurv.CompileError, match=match) as info:
            fxcurv.compile(bad.to(DTYPE), nn.CrossEntropyLoss(), ["batch_grad"],
                           sequence_length=T)
        assert "test_recurrent.py" in str(info.value)


def test_pad_packed_without_total_length_checks_the_longest_length():
    """Without ``total_length`` eager pads to the batch's longest sequence: the step checks
    that it is ``sequence_length`` when it runs (an exported step too; a step of a tuple
    input does not script, ``fxcurv/backend.py``)."""
    model = Packed("lstm", False, padded=True, total_length=False).to(DTYPE)
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), ["batch_grad"], sequence_length=T)
    x, y = torch.randn(N, T, I, dtype=DTYPE), torch.tensor([0, 2, 1])
    loss = step((x, LENGTHS), y)[0]
    with pytest.raises(ValueError, match="longest sequence of the batch, 2 steps.*total_length"):
        step((x, torch.tensor([2, 1, 2])), y)
    exported = torch.export.export(step, ((x, LENGTHS), y)).module()
    torch.testing.assert_close(exported((x, LENGTHS), y)[0], loss)
    with pytest.raises(RuntimeError, match="longest sequence"):  # an assertion op there
        exported((x, torch.tensor([2, 1, 2])), y)


def test_dropout_in_eval_mode_and_the_sequence_length():
    model = Body(nn.GRU(I, H, num_layers=2, dropout=0.5, batch_first=True)).to(DTYPE).eval()
    with pytest.raises(fxcurv.CompileError, match="sequence_length"):
        fxcurv.compile(model, nn.CrossEntropyLoss(), ["batch_grad"])
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), ["batch_grad"], sequence_length=T)
    x, y = batch()
    with pytest.raises(ValueError, match="compiled for sequence_length=3 but its input has 4"):
        step(torch.randn(N, T + 1, I, dtype=DTYPE), y[:, 0])
    with pytest.raises(ValueError, match="batched 3-D input"):
        step(torch.randn(N, I, dtype=DTYPE), y[:, 0])
    loss, grad, _ = step(x, y[:, 0])
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y[:, 0]))


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_generated_code_is_readable_and_scriptable(one_thread):
    model = make("gru", True)
    x, y = batch()
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), ["diag_ggn_exact", "kflr"],
                          sequence_length=T)
    for name in ("rnn_l0_t0_r", "rnn_l0_t2_z", "rnn_l1_reverse_t1_n", "rnn_l0_reverse_t0_h",
                 "rnn_l1_x_proj"):
        assert f"{name} = " in step.code, name
    eager = step(x, y)
    scripted = torch.jit.script(step)(x, y)
    for a, b in zip(eager[1:], scripted[1:]):
        for name in a:
            for u, v in zip(a[name] if isinstance(a[name], list) else [a[name]],
                            b[name] if isinstance(b[name], list) else [b[name]]):
                torch.testing.assert_close(u, v, rtol=1e-12, atol=0)


# -- BackPACK (RNN and LSTM: first order and the GGN diagonals) -------------------------------
BACKPACK_EXACT = ["batch_grad", "batch_l2", "sum_grad_squared", "variance", "diag_ggn_exact",
                  "diag_ggn_exact_batch"]


def backpack_problem(kind):
    """BackPACK's own shape of a recurrent test problem: ``kind(input_size=4, hidden_size=3,
    num_layers=1, batch_first=True)`` over 5 steps, ``ReduceTuple(index=0)``, a linear head and
    ``Permute(0, 2, 1)`` to ``[N, C, T]`` logits, cross-entropy over the time steps."""
    from backpack.custom_module.permute import Permute
    from backpack.custom_module.reduce_tuple import ReduceTuple
    torch.manual_seed(0)
    model = nn.Sequential(kind(input_size=4, hidden_size=3, num_layers=1, batch_first=True),
                          ReduceTuple(index=0), nn.Linear(3, 3), Permute(0, 2, 1)).to(DTYPE)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 5, 4, dtype=DTYPE, generator=g)
    return model, x, torch.randint(0, 3, (8, 5), generator=g)


def run_backpack(model, x, y, extensions) -> list:
    import copy

    import backpack
    model = backpack.extend(copy.deepcopy(model))
    loss_fn = backpack.extend(nn.CrossEntropyLoss())
    with backpack.backpack(*extensions):
        loss_fn(model(x), y).backward()
    return [{n: getattr(p, e.savefield) for n, p in model.named_parameters()}
            for e in extensions]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", [nn.RNN, nn.LSTM], ids=["rnn", "lstm"])
def test_equal_backpack(kind, one_thread):
    """fxcurv equals BackPACK 1.7.1 on its own recurrent problem (float64), exact quantities
    to round-off; BackPACK's Monte-Carlo diagonals (many samples) approach fxcurv's exact
    ones."""
    from backpack import extensions as ext
    model, x, y = backpack_problem(kind)
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), BACKPACK_EXACT, sequence_length=5)
    _, _, *ours = step(x, y)
    theirs = run_backpack(model, x, y, [ext.BatchGrad(), ext.BatchL2Grad(), ext.SumGradSquared(),
                                        ext.Variance(), ext.DiagGGNExact(),
                                        ext.BatchDiagGGNExact()])
    for name, a, b in zip(BACKPACK_EXACT, ours, theirs):
        assert_dicts(a, b, f"{name} vs BackPACK")
    torch.manual_seed(0)
    mc, mc_batch = run_backpack(model, x, y, [ext.DiagGGNMC(mc_samples=2000),
                                              ext.BatchDiagGGNMC(mc_samples=2000)])
    for key, exact in ours[4].items():
        scale = exact.abs().max()
        torch.testing.assert_close(mc[key], exact, rtol=0, atol=0.1 * scale)
        torch.testing.assert_close(mc_batch[key].sum(0), exact, rtol=0, atol=0.1 * scale)


# -- gradient-only steps: an LSTM layer as one fused node -------------------------------------
def _fused_models():
    """LSTMs the fused node must cover: two layers both ways (output used), final states from
    given initial states (``h_n``, ``c_n`` used), time-major without bias."""
    torch.manual_seed(3)
    return {"tagger_bi": Tagger("lstm", True), "tagger_no_bias": Tagger("lstm", False, bias=False),
            "final_states": FinalStates()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("which", ["tagger_bi", "tagger_no_bias", "final_states"])
def test_gradient_only_lstm_is_one_node_per_layer_and_direction(which, dtype, one_thread):
    """Without quantities each LSTM layer and direction is one ``lstm_layer`` node (oneDNN's
    kernels in float32 on the CPU, plain ops in float64) and the gradient equals eager
    autograd's, also under ``torch.no_grad()`` (the kernel needs grad mode for its workspace)."""
    from fxcurv.rules.recurrent import FUSED_KERNELS, _fused
    model = _fused_models()[which].to(dtype)
    x, y = batch()
    x = x.to(dtype)
    if which == "final_states":
        y = y[:, 0]
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), [], sequence_length=T)
    layers = model.rnn.num_layers * (2 if model.rnn.bidirectional else 1)
    assert step.code.count("fxcurv_rules_recurrent_lstm_layer(") == layers
    assert "sigmoid" not in step.code
    assert _fused(x, x) == (FUSED_KERNELS and dtype == torch.float32)
    loss = nn.CrossEntropyLoss()(model(x), y)
    expected = torch.autograd.grad(loss, list(model.parameters()))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else TOL
    with torch.no_grad():
        ours, grad = step(x, y)
    torch.testing.assert_close(ours, loss.detach(), **tol)
    for (name, _), e in zip(model.named_parameters(), expected):
        torch.testing.assert_close(grad[name], e, **tol, msg=name)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_gradient_only_lstm_scripts_and_quantities_unroll(one_thread):
    """The fused step scripts (same numbers); requesting a quantity unrolls the layer, and the
    fused op itself is refused by a step that requests one."""
    model = _fused_models()["tagger_bi"].float()
    x, y = batch()
    x = x.float()
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), [], sequence_length=T)
    eager, scripted = step(x, y), torch.jit.script(step)(x, y)
    for name in eager[1]:
        torch.testing.assert_close(scripted[1][name], eager[1][name], rtol=0, atol=0)
    unrolled = fxcurv.compile(model, nn.CrossEntropyLoss(), ["batch_l2"], sequence_length=T)
    assert "lstm_layer(" not in unrolled.code and "rnn_l1_reverse_t2_c" in unrolled.code

    class Fused(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(I, H, batch_first=True)

        def forward(self, x):
            w = self.rnn
            return lstm_layer(x, w.weight_ih_l0, w.weight_hh_l0, w.bias_ih_l0, w.bias_hh_l0,
                              None, None, False)[0][:, -1]

    with pytest.raises(fxcurv.CompileError, match="diag_ggn_exact.*first-order rules only"):
        fxcurv.compile(Fused(), nn.CrossEntropyLoss(), ["diag_ggn_exact"])


# -- recurrent cells (nn.RNNCell, nn.LSTMCell, nn.GRUCell) called in the model's own loop -----
CELL_KINDS = {"rnn_tanh": (nn.RNNCell, {}), "rnn_relu": (nn.RNNCell, {"nonlinearity": "relu"}),
              "lstm": (nn.LSTMCell, {}), "gru": (nn.GRUCell, {})}


class CellLoop(nn.Module):
    """A cell stepped over the sequence by hand, a head at every step (``[N, C, T]``); with
    ``given_state`` the initial state is a layer of the first input (LSTM: ``(h, c)``)."""

    def __init__(self, kind: str, given_state: bool, bias: bool = True):
        super().__init__()
        cls, extra = CELL_KINDS[kind]
        self.cell = cls(I, H, bias=bias, **extra)
        self.init = nn.Linear(I, H) if given_state else None
        self.head = nn.Linear(H, C)

    def forward(self, x):
        state = None
        if self.init is not None:
            h0 = torch.tanh(self.init(x[:, 0]))
            state = (h0, 0.5 * h0) if isinstance(self.cell, nn.LSTMCell) else h0
        outputs = []
        for t in range(T):
            state = self.cell(x[:, t], state)
            outputs.append(state[0] if isinstance(state, tuple) else state)
        return self.head(torch.stack(outputs, 1)).permute(0, 2, 1)


@pytest.mark.parametrize("given_state", [False, True], ids=["zero_state", "given_state"])
@pytest.mark.parametrize("kind", list(CELL_KINDS))
def test_cells_first_order_ggn_and_hessian(kind, given_state, one_thread):
    """Every first-order and exact-GGN quantity and the exact Hessian quantities of a model
    that loops a cell itself, against brute force (float64)."""
    torch.manual_seed(4)
    model = CellLoop(kind, given_state, bias=not given_state).to(DTYPE)
    x, y = batch()
    check_first_order_and_ggn(model, x, y)
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), ["diag_h", "hmp"])
    vectors = vectors_for(model)
    _, _, diag_h, hmp = step(x, y, vectors)
    ref = brute_force(model, x, y, hessians=True)
    assert_dicts(diag_h, diagonal_blocks(ref["flat"], ref["hessian"].sum(0)), "diag_h")
    assert_dicts(hmp, block_products(ref["flat"], ref["hessian"].sum(0), vectors), "hmp")


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_cell_step_scripts(one_thread):
    """A cell model's step (LSTM cell, given states) scripts and gives the same numbers."""
    torch.manual_seed(4)
    model = CellLoop("lstm", True).to(DTYPE)
    x, y = batch()
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), ["diag_ggn_exact"])
    eager, scripted = step(x, y), torch.jit.script(step)(x, y)
    for a, b in zip(eager[1:], scripted[1:]):
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-12, atol=0)


def test_cell_needs_batched_input():
    """An unbatched (1-D) input has no sample axis: the step says so when it runs."""
    model = nn.Sequential(nn.GRUCell(I, H), nn.Linear(H, C)).to(DTYPE)
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), ["batch_grad"])
    with pytest.raises(ValueError, match="GRUCell '0' needs batched 2-D input"):
        step(torch.randn(I, dtype=DTYPE), torch.tensor(1))
    x, y = batch()
    _, grad, _ = step(x[:, 0], y[:, 0])
    loss = nn.CrossEntropyLoss()(model(x[:, 0]), y[:, 0])
    expected = torch.autograd.grad(loss, list(model.parameters()))
    for (name, _), g in zip(model.named_parameters(), expected):
        torch.testing.assert_close(grad[name], g, **TOL)
