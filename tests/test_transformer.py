"""Transformer pieces end to end (float64): a pre-norm block on ``[N, T, D]`` with
``nn.MultiheadAttention``, the same attention written by hand and with
``F.scaled_dot_product_attention``.

References: loss and grad by autograd; ``batch_grad`` by ``vmap(grad)`` over samples (a sample
is one sequence, its positions summed inside it), scaled like BackPACK's (``Σ_n = grad``);
``diag_ggn_exact`` by the brute-force ``diag(Σ_n J_nᵀ H_n J_n)`` with ``torch.func``; the
step scripted with TorchScript (saved and loaded) gives the same outputs.
"""
from __future__ import annotations

import copy
import functools
import io
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, hessian, jacrev, vmap

import fxcurv

TOL = dict(rtol=1e-10, atol=1e-12)
N, T, D, HEADS, CLASSES = 3, 4, 6, 2, 3
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")


# --------------------------------------------------------------------------------- models
class ModuleAttention(nn.Module):
    """``nn.MultiheadAttention`` (self-attention) as a ``[N, T, D] -> [N, T, D]`` block."""

    def __init__(self, batch_first: bool = True, **kwargs):
        super().__init__()
        self.attn = nn.MultiheadAttention(D, HEADS, batch_first=batch_first, **kwargs)
        self.batch_first = batch_first

    def forward(self, x):
        if not self.batch_first:
            x = x.transpose(0, 1)
        out, _ = self.attn(x, x, x, need_weights=False)
        return out if self.batch_first else out.transpose(0, 1)


class HandAttention(nn.Module):
    """q/k/v linear layers, ``softmax(q kᵀ/√d) v`` per head written out, output linear."""

    def __init__(self, sdpa: bool = False, causal: bool = False):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.out = nn.Linear(D, D)
        self.sdpa, self.causal = sdpa, causal

    def heads(self, t):
        return t.view(t.size(0), t.size(1), HEADS, D // HEADS).transpose(1, 2)

    def forward(self, x):
        q, k, v = self.heads(self.q(x)), self.heads(self.k(x)), self.heads(self.v(x))
        if self.sdpa:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(D // HEADS)
            if self.causal:
                future = torch.ones_like(scores, dtype=torch.bool).triu(1)
                scores = scores.masked_fill(future, float("-inf"))
            out = torch.softmax(scores, dim=-1) @ v
        return self.out(out.transpose(1, 2).reshape(x.size(0), x.size(1), D))


class TimmAttention(nn.Module):
    """timm's ``Attention`` (ViT, DeiT, MAE): one ``qkv`` linear, ``[N, T, 3, H, d]`` permuted
    to ``[3, N, H, T, d]`` and split along axis 0 (``unbind(0)``, or ``qkv[0]``, ``qkv[1]``,
    ``qkv[2]`` in older versions), fused SDPA or written out. The permute moves the sample axis
    only to pick q, k and v; the pieces are rewritten as ``x[:, :, i].permute(0, 2, 1, 3)``."""

    def __init__(self, fused: bool = True, indexed: bool = False):
        super().__init__()
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.fused, self.indexed = fused, indexed

    def forward(self, x):
        n, t, c = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4)
        q, k, v = (qkv[0], qkv[1], qkv[2]) if self.indexed else qkv.unbind(0)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * (c // HEADS) ** -0.5) @ k.transpose(-2, -1)
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(n, t, c))


class BiasedAttention(nn.Module):
    """BEiT's attention: a learned relative position bias ``[H, T, T]`` (from a table) passed
    to SDPA as a float ``attn_mask``, so the mask depends on parameters."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.table = nn.Parameter(0.5 * torch.randn(2 * T - 1, HEADS))
        index = torch.arange(T)[:, None] - torch.arange(T)[None, :] + T - 1
        self.register_buffer("index", index, persistent=False)

    def forward(self, x):
        n, t, c = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.table[self.index.view(-1)].view(t, t, HEADS).permute(2, 0, 1)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0))
        return self.proj(x.transpose(1, 2).reshape(n, t, c))


class Block(nn.Module):
    """layer_norm -> attention -> residual -> layer_norm -> GELU MLP -> residual -> mean over
    T -> linear head."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attention = attention
        self.fc1, self.fc2 = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, x):
        x = x + self.attention(self.ln1(x))
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return self.head(x.mean(1))


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaBlock(nn.Module):
    """A LLaMA-style block: RMSNorm, rotary position embeddings, grouped-query attention (3
    query heads share one key/value head, ``repeat_interleave``), causal SDPA, SwiGLU MLP;
    mean over T, linear head."""

    def __init__(self):
        super().__init__()
        self.heads, self.head_dim = 3, D // 3
        self.norm1, self.norm2 = nn.RMSNorm(D), nn.RMSNorm(D)
        self.q = nn.Linear(D, D, bias=False)
        self.kv = nn.Linear(D, 2 * self.head_dim, bias=False)
        self.o = nn.Linear(D, D, bias=False)
        self.gate, self.up = nn.Linear(D, 2 * D, bias=False), nn.Linear(D, 2 * D, bias=False)
        self.down = nn.Linear(2 * D, D, bias=False)
        self.head = nn.Linear(D, CLASSES)
        inv_freq = 1.0 / 10000 ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rotary(self, t, cos, sin):
        return t * cos + _rotate_half(t) * sin

    def forward(self, x):
        n, t, _ = x.shape
        h = self.norm1(x)
        q = self.q(h).view(n, t, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(h).view(n, t, 1, 2 * self.head_dim).transpose(1, 2).chunk(2, -1)
        freqs = torch.outer(torch.arange(t, device=x.device).to(x.dtype),
                            self.inv_freq.to(x.dtype))
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        q, k = self.rotary(q, cos, sin), self.rotary(k, cos, sin)
        k, v = k.repeat_interleave(self.heads, dim=1), v.repeat_interleave(self.heads, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(n, t, D))
        h = self.norm2(x)
        x = x + self.down(F.silu(self.gate(h)) * self.up(h))
        return self.head(x.mean(1))


MODELS = {
    "llama": LlamaBlock,
    "multihead_attention": lambda: Block(ModuleAttention()),
    "multihead_attention_no_bias": lambda: Block(ModuleAttention(bias=False)),
    "by_hand": lambda: Block(HandAttention()),
    "by_hand_causal": lambda: Block(HandAttention(causal=True)),
    "sdpa": lambda: Block(HandAttention(sdpa=True)),
    "sdpa_causal": lambda: Block(HandAttention(sdpa=True, causal=True)),
    "timm": lambda: Block(TimmAttention()),
    "timm_written_out_indexed": lambda: Block(TimmAttention(fused=False, indexed=True)),
    "relative_position_bias": lambda: Block(BiasedAttention()),
}
QUANTITIES = ["batch_grad", "diag_ggn_exact"]


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = MODELS[name]().double()
    x = torch.randn(N, T, D, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (N,))
    return model, nn.CrossEntropyLoss(), x, y


@functools.lru_cache(maxsize=None)
def compiled(name: str):
    model, loss_fn, x, y = build(name)
    step = fxcurv.compile(model, loss_fn, QUANTITIES)
    return model, loss_fn, x, y, step, step(x, y)


# ----------------------------------------------------------------------------- references
def params_of(model):
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def reference_grad(model, loss_fn, x, y):
    model = copy.deepcopy(model)
    loss = loss_fn(model(x), y)
    names = list(params_of(model))
    grads = torch.autograd.grad(loss, [p for n, p in model.named_parameters() if n in names])
    return loss.detach(), dict(zip(names, grads))


def reference_batch_grad(model, loss_fn, x, y):
    """``g_n = ∇_θ ℓ(f(x_n), y_n) / N`` (mean reduction), one sequence per sample."""
    def per_sample(params, x_n, y_n):
        out = functional_call(model, params, (x_n.unsqueeze(0),))
        return loss_fn(out, y_n.unsqueeze(0)) / x.shape[0]
    return vmap(grad(per_sample), in_dims=(None, 0, 0))(params_of(model), x, y)


def reference_diag_ggn(model, loss_fn, x, y):
    """``diag(Σ_n J_nᵀ H_n J_n)`` from the model Jacobian and the loss Hessian."""
    params = params_of(model)
    names, sizes = list(params), [p.numel() for p in params.values()]
    theta = torch.cat([p.reshape(-1) for p in params.values()])

    def output(flat):
        pieces = {n: t.reshape(params[n].shape) for n, t in zip(names, flat.split(sizes))}
        return functional_call(model, pieces, (x,))

    f = output(theta).detach()
    h = hessian(lambda out: loss_fn(out, y))(f).reshape(f.numel(), f.numel())
    j = jacrev(output)(theta).reshape(f.numel(), -1)
    diag = torch.einsum("ip,ij,jp->p", j, h, j)
    return {n: d.reshape(params[n].shape) for n, d in zip(names, diag.split(sizes))}


def assert_dicts_close(actual, expected, what):
    assert list(actual) == list(expected), what
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], **TOL, msg=f"{what}[{key}]")


# ---------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", list(MODELS))
def test_loss_and_grad_match_autograd(name):
    model, loss_fn, x, y, _, (loss, grads, *_) = compiled(name)
    ref_loss, ref_grads = reference_grad(model, loss_fn, x, y)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert_dicts_close(grads, ref_grads, "grad")


@pytest.mark.parametrize("name", list(MODELS))
def test_batch_grad_matches_vmap_grad(name):
    model, loss_fn, x, y, _, (_, grads, batch_grad, _) = compiled(name)
    reference = reference_batch_grad(model, loss_fn, x, y)
    assert_dicts_close(batch_grad, reference, "batch_grad")
    assert_dicts_close({k: v.sum(0) for k, v in batch_grad.items()}, grads, "Σ_n batch_grad")


@pytest.mark.parametrize("name", list(MODELS))
def test_diag_ggn_exact_matches_brute_force(name):
    model, loss_fn, x, y, _, (*_, diag_ggn) = compiled(name)
    assert_dicts_close(diag_ggn, reference_diag_ggn(model, loss_fn, x, y), "diag_ggn_exact")


@pytest.mark.parametrize("name", ["multihead_attention", "by_hand_causal", "sdpa_causal"])
def test_torchscript_round_trip(name):
    _, _, x, y, step, outputs = compiled(name)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(step), buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    scripted = loaded(x, y)
    torch.testing.assert_close(scripted[0], outputs[0], rtol=1e-12, atol=0)
    for actual, expected in zip(scripted[1:], outputs[1:]):
        assert_dicts_close(actual, expected, "scripted")


def test_parameters_keep_their_names():
    *_, step, (_, grads, _, _) = compiled("multihead_attention")
    assert {"attention.attn.in_proj_weight", "attention.attn.in_proj_bias",
            "attention.attn.out_proj.weight", "attention.attn.out_proj.bias"} <= set(grads)
    assert "attention_attn_in_proj_weight" in step.code


# ------------------------------------------------------------ MultiheadAttention variants
class AttentionHead(nn.Module):
    """An attention module on ``[N, T, D]`` with a mean-over-T linear head; ``call`` runs the
    attention so each test can pick its arguments."""

    def __init__(self, attn: nn.Module, call):
        super().__init__()
        self.attn, self.call = attn, call
        self.head = nn.Linear(D, CLASSES)

    def forward(self, x):
        return self.head(self.call(self.attn, x).mean(1))


def _causal(attn, x):
    mask = torch.ones(T, T, dtype=torch.bool).triu(1)              # True: not allowed
    return attn(x, x, x, attn_mask=mask, need_weights=False)[0]


def _padding(attn, x):
    padded = (x[:, :, 0] > 0.5) & (torch.arange(T) > 0)            # True: ignore; keep key 0
    return attn(x, x, x, key_padding_mask=padded)[0]


def _float_mask(attn, x):
    mask = torch.linspace(-1.0, 1.0, T * T, dtype=torch.float64).reshape(T, T)
    return attn(x, x, x, attn_mask=mask, need_weights=False)[0]


def _per_sample_head_mask(attn, x):
    blocked = (x[:, :, :1] * x[:, None, :, 1]) > 0                 # [N, T, T], True: blocked
    blocked = (blocked & ~torch.eye(T, dtype=torch.bool)).repeat_interleave(HEADS, 0)
    padding = torch.zeros(T, dtype=x.dtype).masked_fill(torch.arange(T) == 2, -1.5)
    return attn(x, x, x, attn_mask=blocked, key_padding_mask=padding.expand(x.size(0), T),
                need_weights=False)[0]


def _weights_used(attn, x):
    out, weights = attn(x, x, x)                                   # averaged over heads
    return out + weights.sum(-1, keepdim=True) * weights[:, :, :1]


def _weights_per_head(attn, x):
    out, weights = attn(x, x, x, average_attn_weights=False)
    return out * weights.mean(1).sum(-1, keepdim=True)


def _cross(attn, x):
    memory = x.flip(-1)[:, :, :4] * 2.0
    return attn(x, memory, memory[:, :, :3], need_weights=False)[0]


def _cross_same_dim(attn, x):
    return attn(x, x * 2.0, x.tanh(), need_weights=False)[0]


def _self(attn, x):
    return attn(x, x, x, need_weights=False)[0]


VARIANTS = {
    "causal_bool_mask": (lambda: nn.MultiheadAttention(D, HEADS, batch_first=True), _causal),
    "key_padding_mask": (lambda: nn.MultiheadAttention(D, HEADS, batch_first=True), _padding),
    "float_mask": (lambda: nn.MultiheadAttention(D, HEADS, batch_first=True), _float_mask),
    "per_sample_head_mask": (lambda: nn.MultiheadAttention(D, HEADS, batch_first=True),
                             _per_sample_head_mask),
    "weights_averaged": (lambda: nn.MultiheadAttention(D, HEADS, batch_first=True),
                         _weights_used),
    "weights_per_head": (lambda: nn.MultiheadAttention(D, HEADS, batch_first=True),
                         _weights_per_head),
    "kdim_vdim": (lambda: nn.MultiheadAttention(D, HEADS, batch_first=True, kdim=4, vdim=3),
                  _cross),
    "cross_attention": (lambda: nn.MultiheadAttention(D, HEADS, batch_first=True),
                        _cross_same_dim),
    "bias_kv_zero_attn": (lambda: nn.MultiheadAttention(D, HEADS, batch_first=True,
                                                        add_bias_kv=True, add_zero_attn=True),
                          _self),
    "dropout_eval": (lambda: nn.MultiheadAttention(D, HEADS, dropout=0.5, batch_first=True),
                     _self),
}


def _variant(name: str):
    torch.manual_seed(1)
    make, call = VARIANTS[name]
    model = AttentionHead(make(), call).double()
    if name == "dropout_eval":
        model.eval()
    x = torch.randn(N, T, D, dtype=torch.float64)
    return model, nn.CrossEntropyLoss(), x, torch.randint(0, CLASSES, (N,))


def check_all(model, loss_fn, x, y):
    """loss, grad, batch_grad and diag_ggn_exact against their references."""
    loss, grads, batch_grad, diag_ggn = fxcurv.compile(model, loss_fn, QUANTITIES)(x, y)
    ref_loss, ref_grads = reference_grad(model, loss_fn, x, y)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert_dicts_close(grads, ref_grads, "grad")
    assert_dicts_close(batch_grad, reference_batch_grad(model, loss_fn, x, y), "batch_grad")
    assert_dicts_close(diag_ggn, reference_diag_ggn(model, loss_fn, x, y), "diag_ggn_exact")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_multihead_attention_variants(name):
    check_all(*_variant(name))


@pytest.mark.parametrize("name", ["per_sample_head_mask", "bias_kv_zero_attn", "kdim_vdim"])
def test_multihead_attention_variants_script(name):
    model, loss_fn, x, y = _variant(name)
    step = fxcurv.compile(model, loss_fn, QUANTITIES)
    expected, actual = step(x, y), torch.jit.script(step)(x, y)
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-12, atol=0)
    for a, e in zip(actual[1:], expected[1:]):
        assert_dicts_close(a, e, "scripted")


def test_multihead_attention_self_attention_has_kronecker_factors():
    """Self-attention projects with the packed in_proj_weight in one linear layer, so KFAC
    applies to it as to any linear layer ([3E, 3E] and [E, E] factors)."""
    model, loss_fn, x, y = _variant("dropout_eval")          # attention and a linear head
    _, _, kflr = fxcurv.compile(model, loss_fn, ["kflr"])(x, y)
    factors = kflr["attn.in_proj_weight"]
    assert [tuple(f.shape) for f in factors] == [(3 * D, 3 * D), (D, D)]


def test_multihead_attention_sequence_first_gives_grad_and_per_sample():
    """The model moves its samples to axis 1 for a sequence-first layer, whose lowering moves
    them back: the moves cancel (an exact rewrite), so per-sample gradients are defined."""
    torch.manual_seed(2)
    model = Block(ModuleAttention(batch_first=False)).double()
    x, y = torch.randn(N, T, D, dtype=torch.float64), torch.randint(0, CLASSES, (N,))
    loss, grads, batch_grad = fxcurv.compile(model, nn.CrossEntropyLoss(), ["batch_grad"])(x, y)
    ref_loss, ref_grads = reference_grad(model, nn.CrossEntropyLoss(), x, y)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert_dicts_close(grads, ref_grads, "grad")
    assert_dicts_close(batch_grad, reference_batch_grad(model, nn.CrossEntropyLoss(), x, y),
                       "batch_grad")


def test_a_sample_axis_move_that_stays_is_refused_for_per_sample_quantities():
    class Mixing(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(D, CLASSES)

        def forward(self, x):
            return self.fc(x.transpose(0, 1)).mean(0)   # [T, N, C] -> samples averaged away

    with pytest.raises(fxcurv.CompileError, match="sample axis 0"):
        fxcurv.compile(Mixing().double(), nn.CrossEntropyLoss(), ["batch_grad"])


class Picked(nn.Module):
    """``x.permute(1, 2, 0)[0]`` is ``x[:, 0]`` transposed, ``[D, N]``: transposed back it is a
    per-sample value; a softmax over its last axis (the samples) first mixes them."""

    def __init__(self, mix: bool):
        super().__init__()
        self.inp, self.fc, self.mix = nn.Linear(D, D), nn.Linear(D, CLASSES), mix

    def forward(self, x):
        h = self.inp(x).permute(1, 2, 0)[0]
        return self.fc((h.softmax(-1) if self.mix else h).transpose(0, 1))


def test_a_pick_after_a_permute_keeps_the_samples_where_they_come_back():
    model, loss_fn, x, y = Picked(mix=False).double(), nn.CrossEntropyLoss(), \
        torch.randn(N, T, D, dtype=torch.float64), torch.randint(0, CLASSES, (N,))
    _, _, batch_grad = fxcurv.compile(model, loss_fn, ["batch_grad"])(x, y)
    assert_dicts_close(batch_grad, reference_batch_grad(model, loss_fn, x, y), "batch_grad")
    with pytest.raises(fxcurv.CompileError, match="sample axis 0"):
        fxcurv.compile(Picked(mix=True).double(), loss_fn, ["batch_grad"])


def test_multihead_attention_train_mode_dropout_draws_one_mask():
    """Train-mode dropout is a mask drawn once per call (as nn.Dropout): the gradient is that
    of the loss with the same mask, so two calls with the same seed agree."""
    torch.manual_seed(3)
    model = AttentionHead(nn.MultiheadAttention(D, HEADS, dropout=0.5, batch_first=True),
                          _self).double()
    x, y = torch.randn(N, T, D, dtype=torch.float64), torch.randint(0, CLASSES, (N,))
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), ["batch_grad"])
    assert "bernoulli" in step.code
    torch.manual_seed(0)
    first = step(x, y)
    torch.manual_seed(0)
    second = step(x, y)
    assert_dicts_close(first[1], second[1], "same seed")
    assert_dicts_close({k: v.sum(0) for k, v in first[2].items()}, first[1], "Σ_n batch_grad")


def test_scaled_dot_product_attention_dropout_draws_one_mask():
    torch.manual_seed(5)

    class Dropped(HandAttention):
        def forward(self, x):
            q, k, v = self.heads(self.q(x)), self.heads(self.k(x)), self.heads(self.v(x))
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
            return self.out(out.transpose(1, 2).reshape(x.size(0), x.size(1), D))

    model = Block(Dropped()).double()
    x, y = torch.randn(N, T, D, dtype=torch.float64), torch.randint(0, CLASSES, (N,))
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), ["batch_grad"])
    assert "bernoulli" in step.code
    loss, grads, batch_grad = step(x, y)
    assert_dicts_close({k: v.sum(0) for k, v in batch_grad.items()}, grads, "Σ_n batch_grad")


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder(norm_first):
    """nn.TransformerEncoder(Layer) lowered without its fused fast path."""
    torch.manual_seed(4)
    layer = nn.TransformerEncoderLayer(D, HEADS, dim_feedforward=8, dropout=0.0,
                                       batch_first=True, norm_first=norm_first)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                          nn.Flatten(), nn.Linear(T * D, CLASSES)).double().eval()
    x, y = torch.randn(N, T, D, dtype=torch.float64), torch.randint(0, CLASSES, (N,))
    check_all(model, nn.CrossEntropyLoss(), x, y)


class Decoder(nn.Module):
    """nn.TransformerDecoderLayer (traced as it is: masked self-attention, cross-attention to
    a memory computed from x, feed-forward)."""

    def __init__(self):
        super().__init__()
        self.decoder = nn.TransformerDecoderLayer(D, HEADS, dim_feedforward=8, dropout=0.0,
                                                  batch_first=True)
        self.head = nn.Linear(D, CLASSES)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(T))

    def forward(self, x):
        memory = x[:, :2] * 2.0
        return self.head(self.decoder(x, memory, tgt_mask=self.causal).mean(1))


def test_transformer_decoder_layer():
    torch.manual_seed(6)
    model = Decoder().double()
    x, y = torch.randn(N, T, D, dtype=torch.float64), torch.randint(0, CLASSES, (N,))
    check_all(model, nn.CrossEntropyLoss(), x, y)


# ------------------------------------------------------------------------ clear errors
class Gather(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, CLASSES)

    def forward(self, x):  # two index tensors (one tensor after slices is index_select)
        return self.fc(x)[:, torch.tensor([0, 2]), torch.tensor([1, 0])]


class PickPositions(nn.Module):
    """``h[:, index]`` with a constant index tensor at axis 1 (before: refused)."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(D, D), nn.Linear(D, CLASSES)
        self.register_buffer("positions", torch.tensor([[0, 2], [3, 3]]))

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x))[:, self.positions].sum((1, 2)))


class HeadEnsemble(nn.Module):
    """timm's CrossViT: several heads stacked along axis 0 and averaged over it (before:
    refused, the stack moves the samples to axis 1)."""

    def __init__(self, reduce):
        super().__init__()
        self.heads = nn.ModuleList([nn.Linear(D, CLASSES) for _ in range(3)])
        self.reduce = reduce

    def forward(self, x):
        h = x.mean(1)
        return self.reduce(torch.stack([head(h) for head in self.heads], dim=0))


@pytest.mark.parametrize("reduce", [lambda t: torch.mean(t, dim=0), lambda t: t.sum(0)],
                         ids=["mean", "sum"])
def test_a_stack_reduced_over_its_axis_is_a_sum(reduce):
    model, loss_fn = HeadEnsemble(reduce).double(), nn.CrossEntropyLoss()
    x, y = torch.randn(N, T, D, dtype=torch.float64), torch.randint(0, CLASSES, (N,))
    step = fxcurv.compile(model, loss_fn, ["batch_grad", "diag_ggn_exact"])
    assert "stack" not in step.code
    _, _, batch_grad, diag = step(x, y)
    assert_dicts_close(batch_grad, reference_batch_grad(model, loss_fn, x, y), "batch_grad")
    assert_dicts_close(diag, reference_diag_ggn(model, loss_fn, x, y), "diag_ggn_exact")


def test_a_tensor_index_after_slices_is_an_index_select():
    model, loss_fn = PickPositions().double(), nn.CrossEntropyLoss()
    x, y = torch.randn(N, T, D, dtype=torch.float64), torch.randint(0, CLASSES, (N,))
    step = fxcurv.compile(model, loss_fn, ["batch_grad", "diag_ggn_exact"])
    assert "index_select" in step.code
    _, _, batch_grad, diag = step(x, y)
    assert_dicts_close(batch_grad, reference_batch_grad(model, loss_fn, x, y), "batch_grad")
    assert_dicts_close(diag, reference_diag_ggn(model, loss_fn, x, y), "diag_ggn_exact")


class EinsumDiagonal(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(D, D))
        self.fc = nn.Linear(T, CLASSES)

    def forward(self, x):
        return self.fc(torch.einsum("ntd,dd->nt", x, self.w))


class PiecesSlice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 2 * CLASSES)

    def forward(self, x):
        return torch.cat(self.fc(x).mean(1).chunk(2, dim=-1)[1:], -1)


@pytest.mark.parametrize("model, message", [
    (Gather(), "advanced indexing"),
    (EinsumDiagonal(), "repeated index"),
    (PiecesSlice(), "constant int position"),
])
def test_unsupported_indexing_and_einsum_fail_at_compile_time(model, message):
    with pytest.raises(fxcurv.CompileError, match=message):
        fxcurv.compile(model.double(), nn.CrossEntropyLoss())


class EncoderDecoder(nn.Module):
    """``nn.Transformer`` (one encoder and one decoder layer) translating ``x`` into a shifted
    copy of itself, with a causal target mask built in ``forward``; mean over T, head."""

    def __init__(self, norm_first: bool):
        super().__init__()
        self.transformer = nn.Transformer(D, HEADS, 1, 1, 2 * D, dropout=0.0,
                                          batch_first=True, norm_first=norm_first)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, x):
        mask = nn.Transformer.generate_square_subsequent_mask(x.size(1), dtype=x.dtype)
        out = self.transformer(x, x.roll(1, 1), tgt_mask=mask, tgt_is_causal=True)
        return self.head(out.mean(1))


@pytest.mark.parametrize("norm_first", [False, True])
def test_nn_transformer_encoder_decoder(norm_first):
    """``nn.Transformer`` and ``nn.TransformerDecoder`` (before: torch.fx could not trace
    their shape checks and causal-mask detection): loss, gradient, per-sample gradients and
    the exact GGN diagonal against torch.func."""
    torch.manual_seed(3)
    model = EncoderDecoder(norm_first).double()
    check_all(model, nn.CrossEntropyLoss(), torch.randn(N, T, D, dtype=torch.float64),
              torch.randint(0, CLASSES, (N,)))
