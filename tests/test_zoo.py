"""A zoo of small models outside BackPACK's reach, every quantity against ``torch.func`` brute
force in float64 (issue 5).

Each model is compiled once with every quantity it supports; every result is compared with a
reference computed without fxcurv (rtol 1e-9, atol 1e-12), and every quantity it does not
support must raise a ``CompileError`` naming the node and the quantity. Then the step is
scripted with TorchScript and must give the same outputs.

Supported quantities per model. The 14 quantities: ``batch_grad batch_l2 sum_grad_squared
variance`` (first order), ``diag_ggn_exact diag_ggn_exact_batch sqrt_ggn_exact kflr`` (GGN),
``diag_h diag_h_batch`` (Hessian), ``hmp ggnmp pchmp_abs pchmp_clip`` (products); loss and
``grad`` always. A model supports all 14 but those in its last column, each refused with a
``CompileError`` naming the node in brackets; "2nd" stands for the five quantities that need
second derivatives of the model's ops: ``diag_h diag_h_batch hmp pchmp_abs pchmp_clip``.

| model          | item (what it exercises)                     | loss      | refused (node)                  |
|----------------|----------------------------------------------|-----------|---------------------------------|
| residual       | h = h + tanh(linear(h)), two blocks          | CE        | -                               |
| branches       | torch.cat of two branches, chunk and split   | MSE       | -                               |
| slicing        | h[:, :3] and h[..., 1:]                      | CE sum    | -                               |
| many_uses      | h used thrice: tanh(h) + sigmoid(h) - h/2    | BCE [N,3] | -                               |
| tied           | embedding weight as head, proj.t()           | CE        | -                               |
| gated          | h * sigmoid(h)                               | CE        | -                               |
| reductions     | [N, T, D]: mean over T, sum over features    | MSE sum   | -                               |
| functional     | only F.* and raw nn.Parameters               | CE        | -                               |
| transformer    | layer_norm, masked MultiheadAttention, MLP   | CE        | -                               |
| hand_attention | softmax(q kᵀ/√d) v by matmul, mean over T    | CE        | -                               |
| post_loss      | MLP; 2 * cross_entropy + (out ** 2).mean()/2 | callable  | -                               |
| bilinear       | einsum("ni,kij,nj->nk", a, W, b), W param    | MSE       | -                               |
| conv_bn        | conv2d, batch_norm (eval), adaptive pool     | CE        | -                               |
| excite         | h * s, t * h, s * t (broadcast gates)        | CE        | -                               |
| divided        | tanh(linear(x)) / d, d a raw parameter       | CE        | 2nd (truediv)                   |
| nll            | log_softmax then NLLLoss                     | NLL       | -                               |
| smooth_acts    | softsign, tanhshrink, CELU, softshrink, ...  | CE        | -                               |
| rms_norm       | nn.RMSNorm over [D] (affine) and [T, D]      | CE        | -                               |
| weight_norm    | weight_norm parametrizations (dim 0, None)   | MSE       | 2nd (_weight_norm_square)       |
| conv_lrn       | conv, local_response_norm, adaptive max pool | CE        | -                               |
| spectral_norm  | spectral_norm parametrizations (eval mode)   | CE        | 2nd (truediv)                   |
| padded         | reflect, replicate and circular padding      | CE        | -                               |
| patches        | unfold, unflatten, ChannelShuffle, fold      | CE        | -                               |
| prototypes     | tensor_split, -cdist to prototypes, p = 2, 1 | CE        | -                               |
| probe_pooling  | probe.repeat(N, 1, 1) as attention query     | CE        | -                               |

(CE: ``CrossEntropyLoss``, MSE: ``MSELoss``, BCE: ``BCEWithLogitsLoss``; mean unless "sum".)

Beyond the table, :func:`test_more_refusals` pins down two more messages: Monte-Carlo
quantities with the callable post-loss arithmetic; an einsum whose two activations share
parameters (its cross block) is checked against the Hessian. ``kflr`` of a parameter without
Kronecker structure (``Spec.kron_blocks``) is its exact GGN block ``[G]``.

References (no fxcurv code involved), with ``f`` the model output and ``L`` the loss of the
whole batch (NLL after log_softmax: ``f`` are the logits and ``L = nll(log_softmax(f))``, as
fxcurv fuses it into cross-entropy):

* loss and ``grad``: autograd.
* per-sample gradients ``g_n``: ``vmap(grad(...))`` over samples of ``L`` evaluated at the
  output ``f⁰`` with sample n's row replaced by the model output of ``x_n`` alone. This is the
  full loss restricted to sample n, so the mean's ``1/N`` and any post-loss arithmetic are
  carried as they are; ``Σ_n g_n = grad``. ``batch_l2``, ``sum_grad_squared`` and
  ``variance = Σ g_n²/N - (Σ g_n/N)²`` follow from ``g_n``.
* GGN: ``G_n = J_nᵀ H_n J_n`` over the flattened parameters, ``J_n`` by ``jacrev`` of sample
  n's output, ``H_n`` block n of ``hessian`` of ``L`` w.r.t. ``f`` (the other blocks are
  checked to be zero), projected onto the PSD cone by ``eigh`` (fxcurv does so per sample for
  callable losses; for the built-in losses the projection changes nothing).
* Hessian blocks: ``hessian`` of ``L`` w.r.t. the flattened parameters; per sample, of ``L``
  with only sample n's output depending on them.
* positive-curvature Hessian (HBP): the Hessian of ``L + ½ Σ_sites (m(R) - R)(z - z⁰)²`` with
  the residuals ``R`` frozen at the current parameters, so that its Hessian is
  ``GGN + Σ_sites Jᵀ m(R) J``. Sites are recorded with a ``TorchFunctionMode``: elementwise
  activations (``R = f''(z) ⊙ ∂L/∂f(z)``, ``z`` their input), and products ``a * b`` of two
  values that share parameters (with ``g = ∂L/∂(ab)`` the Hessian form gets
  ``2g δa δb = h (δa+δb)² - h (δa-δb)²``, ``h = g/2``: ``z = (a + b, a - b)`` with residuals
  ``(h, -h)``), which is fxcurv's factorisation (``passes/curvature/diag_hessian.py``);
  softmax, layer_norm (in the input) and matmuls of two values that share parameters are
  dense per-sample blocks ``R_n`` (``hessian`` of ``Σ g ⊙ f``), the term
  ``½ Σ_n δ_nᵀ (m(R_n) - R_n) δ_n`` with ``m`` on the eigenvalues (torch's fused
  ``MultiheadAttention`` hides its sites: the transformer checks the identities only).
  ``m = abs`` (pchmp_abs), ``clamp(min=0)`` (pchmp_clip). Self-check: with
  ``m = 0`` the construction gives the brute-force GGN's per-parameter blocks (no site
  missed).
"""
from __future__ import annotations

import copy
import functools
import io
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, hessian, jacrev, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

import fxcurv
from fxcurv import CompileError
from setups import Gated, linear_inputs, randomize_bn

DTYPE = torch.float64
TOL = dict(rtol=1e-9, atol=1e-12)         # vs torch.func
SAME = dict(rtol=1e-12, atol=1e-14)       # TorchScript vs eager
V = 2                                     # vectors for the products
FIRST = ("batch_grad", "batch_l2", "sum_grad_squared", "variance")
GGN = ("diag_ggn_exact", "diag_ggn_exact_batch", "sqrt_ggn_exact", "kflr")
HESSIAN = ("diag_h", "diag_h_batch")
PRODUCTS = ("hmp", "ggnmp", "pchmp_abs", "pchmp_clip")
QUANTITIES = FIRST + GGN + HESSIAN + PRODUCTS
RESIDUAL = ("diag_h", "diag_h_batch", "hmp", "pchmp_abs", "pchmp_clip")  # need 2nd derivatives
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning",
                                        "ignore::UserWarning")


@pytest.fixture(autouse=True, scope="module")
def _single_threaded(one_thread):
    """Run this module with one intra-op thread (the shared ``one_thread`` fixture)."""


# ------------------------------------------------------------------------------------ models
class Residual(nn.Module):
    """1. ``h = h + tanh(linear(h))``, two blocks, then a head."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.blocks = nn.ModuleList(nn.Linear(5, 5) for _ in range(2))
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return self.head(h)


class Branches(nn.Module):
    """2. Two branches concatenated, then cut again by ``chunk`` and by ``split``."""

    def __init__(self):
        super().__init__()
        self.left, self.right = nn.Linear(4, 3), nn.Linear(4, 3)
        self.head_a, self.head_b = nn.Linear(3, 2), nn.Linear(3, 2)

    def forward(self, x):
        h = torch.cat([torch.tanh(self.left(x)), torch.sigmoid(self.right(x))], dim=1)
        a, b = h.chunk(2, dim=1)
        c, d = torch.split(h, [2, 4], dim=1)
        return self.head_a(a) + self.head_b(torch.tanh(b)) + 0.5 * c.sum(1, keepdim=True) \
            + d[:, :2]


class Slicing(nn.Module):
    """3. getitem slices of an activation: ``h[:, :3]`` and ``h[..., 1:]``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.head_a, self.head_b = nn.Linear(3, 3), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return self.head_a(h[:, :3]) + self.head_b(torch.sigmoid(h[..., 1:]))


class ManyUses(nn.Module):
    """4. One value used in three places."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = self.fc(x)
        return self.head(torch.tanh(h) + torch.sigmoid(h) - 0.5 * h)


class Tied(nn.Module):
    """5. Tokens ``[N, T]``: the embedding weight is also the output head (``F.linear``), and a
    raw square parameter is used transposed."""

    def __init__(self, vocab: int = 5, d: int = 4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.proj = nn.Parameter(torch.randn(d, d) / 2)
        self.bias = nn.Parameter(torch.randn(d) / 2)

    def forward(self, tokens):
        h = self.emb(tokens).mean(1)
        h = torch.tanh(h @ self.proj.t() + self.bias)
        return F.linear(h, self.emb.weight)


class Reductions(nn.Module):
    """7. ``[N, T, D]``: a mean over the sequence axis and a sum over the features."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.head_t, self.head_f = nn.Linear(5, 2), nn.Linear(3, 2)

    def forward(self, x):
        h = torch.tanh(self.fc(x))                                   # [N, T=3, 5]
        return self.head_t(h.mean(1)) + self.head_f(h.sum(-1))


class Functional(nn.Module):
    """8. Only ``torch.nn.functional`` and raw ``nn.Parameter``s."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(5, 4) / 2)
        self.b1 = nn.Parameter(torch.randn(5))
        self.w2 = nn.Parameter(torch.randn(3, 5) / 2)
        self.b2 = nn.Parameter(torch.randn(3))

    def forward(self, x):
        h = F.softplus(F.linear(x, self.w1, self.b1))
        h = F.gelu(h - 1.0) + F.silu(h)
        return F.linear(h, self.w2) + self.b2


D, T, HEADS = 4, 3, 2


class Transformer(nn.Module):
    """9. Pre-norm block on ``[N, T, D]``: layer_norm, ``nn.MultiheadAttention`` with a key
    padding mask hiding the last position (built by item assignment of ``True``; before: an
    in-place op without a rule), GELU MLP, residuals, mean over T, linear head."""

    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = nn.MultiheadAttention(D, HEADS, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(D, 6), nn.Linear(6, D)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        h = self.ln1(x)
        padding = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool, device=x.device)
        padding[:, -1] = True
        x = x + self.attn(h, h, h, key_padding_mask=padding, need_weights=False)[0]
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return self.head(x.mean(1))


class HandAttention(nn.Module):
    """10. Single-head attention written out with matmul and softmax."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        scores = torch.matmul(self.q(x), self.k(x).transpose(-2, -1)) / math.sqrt(D)
        return self.head(torch.matmul(torch.softmax(scores, dim=-1), self.v(x)).mean(1))


def post_loss_mlp() -> nn.Module:
    """11. A plain MLP; the post-loss arithmetic is in the loss."""
    return nn.Sequential(nn.Linear(4, 5), nn.Softplus(), nn.Linear(5, 3))


def post_loss(out, y):
    return 2 * F.cross_entropy(out, y) + 0.5 * (out ** 2).mean()


class Bilinear(nn.Module):
    """12. ``einsum`` bilinear layer with a parameter, on two branches."""

    def __init__(self):
        super().__init__()
        self.left, self.right = nn.Linear(4, 3), nn.Linear(4, 3)
        self.weight = nn.Parameter(torch.randn(2, 3, 3) / 2)

    def forward(self, x):
        a, b = torch.tanh(self.left(x)), self.right(x)
        return torch.einsum("ni,kij,nj->nk", a, self.weight, b)


class ConvBN(nn.Module):
    """13. conv2d, BatchNorm (eval, random statistics), tanh, adaptive average pooling."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 2)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        h = torch.tanh(self.bn(self.conv(x)))
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


class Excite(nn.Module):
    """15. Squeeze-excitation and spatial gates: products whose arguments broadcast against
    each other and share parameters (``h * s``, ``s: [N, C, 1, 1]``; ``t * h``,
    ``t: [N, 1, H, W]``; ``s * t``, both broadcast)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 3, 1)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        s = torch.sigmoid(self.fc(h.mean((2, 3), keepdim=True)))
        t = torch.sigmoid(h.mean(1, keepdim=True))
        return self.head((h * s + t * h + s * t).mean((2, 3)))


class Divided(nn.Module):
    """16. A layer's output divided by a raw parameter (``h / d``, ``d: [3]``)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.d = nn.Parameter(torch.rand(3) + 1)

    def forward(self, x):
        return torch.tanh(self.fc(x)) / self.d


class LogSoftmaxNet(nn.Module):
    """14. ``log_softmax`` output for ``NLLLoss``; ``return_logits`` (for the reference) stops
    before it."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(4, 5), nn.Linear(5, 3)
        self.return_logits = False

    def forward(self, x):
        logits = self.out(torch.sigmoid(self.fc(x)))
        return logits if self.return_logits else F.log_softmax(logits, dim=1)


class SmoothActivations(nn.Module):
    """17. softsign, tanhshrink, CELU, softshrink and threshold between layers."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4 if i == 0 else 5, 5) for i in range(4))
        self.acts = nn.ModuleList([nn.Softsign(), nn.Tanhshrink(), nn.CELU(0.7),
                                   nn.Sequential(nn.Softshrink(0.2), nn.Threshold(-0.1, 0.3))])
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        for layer, act in zip(self.layers, self.acts):
            x = act(layer(x))
        return self.head(x)


class RMSNormNet(nn.Module):
    """18. ``nn.RMSNorm`` over features (default eps, affine) and over ``[T, D]`` (no affine)."""

    def __init__(self):
        super().__init__()
        self.fc, self.norm = nn.Linear(D, D), nn.RMSNorm(D)
        self.plain = nn.RMSNorm([T, D], eps=1e-3, elementwise_affine=False)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        h = self.plain(torch.tanh(self.norm(self.fc(x))))
        return self.head(h.mean(1))


class WeightNormed(nn.Module):
    """19. ``weight_norm`` parametrizations: a linear layer (per output row) and a convolution
    (``dim=None``: one norm of the whole weight)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(2, 3, 2), dim=None)
        self.fc = nn.utils.parametrizations.weight_norm(nn.Linear(9, 3))

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


class ConvLRN(nn.Module):
    """20. AlexNet-style: conv, local response norm, relu, adaptive max pool, linear."""

    def __init__(self):
        super().__init__()
        self.conv, self.lrn = nn.Conv2d(2, 4, 2), nn.LocalResponseNorm(3, alpha=0.3, k=1.2)
        self.head = nn.Linear(4 * 2, 3)

    def forward(self, x):
        h = F.adaptive_max_pool2d(F.relu(self.lrn(self.conv(x))), (2, 1))
        return self.head(h.flatten(1))


class SpectralNormed(nn.Module):
    """21. ``spectral_norm`` parametrizations in eval mode (the stored ``u``, ``v`` after a
    few train-mode power iterations): a transposed convolution (``dim=1``) and a linear
    layer."""

    def __init__(self):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        self.up, self.fc = sn(nn.ConvTranspose1d(2, 3, 2)), sn(nn.Linear(15, 3))
        with torch.no_grad():
            for _ in range(3):
                self(torch.randn(2, 2, 4))
        self.eval()

    def forward(self, x):
        return self.fc(torch.tanh(self.up(x)).flatten(1))


class Padded(nn.Module):
    """22. Border padding: ``Conv2d(padding_mode="reflect")``, ``ReplicationPad2d``,
    ``CircularPad2d`` (before: refused, only constant padding had a rule)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")
        self.pads = nn.Sequential(nn.ReplicationPad2d((1, 0, 0, 1)), nn.CircularPad2d(1))
        self.head = nn.Linear(2 * 6 * 5, 3)

    def forward(self, x):
        return self.head(self.pads(torch.tanh(self.conv(x))).flatten(1))


class Patches(nn.Module):
    """23. Patch embedding by ``F.unfold`` (im2col), a linear map per patch, ``unflatten``
    back to channels, ``ChannelShuffle``, ``F.fold`` (col2im) and a head."""

    def __init__(self):
        super().__init__()
        self.embed, self.shuffle = nn.Linear(2 * 2 * 2, 4), nn.ChannelShuffle(2)
        self.head = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        patches = F.unfold(x, 2, stride=2).transpose(1, 2)       # [N, L=4, 8]
        h = torch.tanh(self.embed(patches)).transpose(1, 2)       # [N, 4, L]
        h = self.shuffle(h.unflatten(2, (2, 2)))                  # [N, 4, 2, 2]
        back = F.fold(h.flatten(2).repeat(1, 4, 1), (3, 3), 2, stride=1)  # [N, 4, 3, 3]
        return self.head(back.flatten(1))


class Prototypes(nn.Module):
    """24. Prototypical head: an embedding cut by ``tensor_split``, logits the negative
    ``cdist`` (p = 2, and p = 1 halved) of each part to prototype parameters. References set
    ``written_out``: torch's cdist has no forward-mode derivative, and its batched backward
    (vmap) gives wrong values."""

    def __init__(self):
        super().__init__()
        self.embed, self.written_out = nn.Linear(4, 5), False
        self.prototypes = nn.Parameter(torch.randn(3, 2))

    def forward(self, x):
        parts = torch.tensor_split(torch.tanh(self.embed(x)), [2, 3], dim=1)
        return -self.distances(parts[0], 2.0) - 0.5 * self.distances(parts[2], 1.0)

    def distances(self, h, p: float):
        if self.written_out:
            return ((h[:, None] - self.prototypes[None]).abs() ** p).sum(-1) ** (1 / p)
        return torch.cdist(h, self.prototypes, p=p)


class ProbePooling(nn.Module):
    """25. Attention pooling by a learned query copied once per sample (SigLIP's head:
    ``probe.repeat(batch_size, 1, 1)``; before, every quantity but the gradient was refused,
    the copy taken for a mix of samples): softmax of ``q kᵀ/√d`` over positions, then a head."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Linear(D, D), nn.Linear(D, 3)
        self.probe = nn.Parameter(torch.randn(1, 1, D))

    def forward(self, x):
        h = torch.tanh(self.embed(x))                                     # [N, T, D]
        q = self.probe.repeat(x.shape[0], 1, 1)                           # [N, 1, D]
        weights = torch.softmax(q @ h.transpose(1, 2) / D ** 0.5, dim=-1)  # [N, 1, T]
        return self.head((weights @ h).squeeze(1))


# ------------------------------------------------------------------------------------- specs
def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=DTYPE)


def _labels(gen, classes, *shape):
    return torch.randint(0, classes, shape, generator=gen)


@dataclass
class Spec:
    make: Callable[[], nn.Module]
    loss_fn: Callable
    batch: Callable[[torch.Generator], tuple]
    # refused quantity -> (node named in the CompileError, regex of the reason)
    refused: dict = field(default_factory=dict)
    logits: bool = False                  # NLL after log_softmax: GGN at the logits
    # pchmp_* against the site definition (False: torch's fused attention hides its softmax
    # and products from the recorded sites; the identities of the definition are checked)
    pch_reference: bool = True
    # parameters without Kronecker structure: kflr gives their GGN block [G], G: [P, P]
    kron_blocks: tuple = ()

    @property
    def supported(self) -> tuple[str, ...]:
        return tuple(q for q in QUANTITIES if q not in self.refused)


SPECS: dict[str, Spec] = {
    "residual": Spec(Residual, nn.CrossEntropyLoss(),
                     lambda g: (_randn(g, 4, 4), _labels(g, 3, 4))),
    "branches": Spec(Branches, nn.MSELoss(), lambda g: (_randn(g, 3, 4), _randn(g, 3, 2))),
    "slicing": Spec(Slicing, nn.CrossEntropyLoss(reduction="sum"),
                    lambda g: (_randn(g, 3, 4), _labels(g, 3, 3))),
    "many_uses": Spec(ManyUses, nn.BCEWithLogitsLoss(),
                      lambda g: (_randn(g, 4, 4), torch.rand(4, 3, generator=g, dtype=DTYPE))),
    "tied": Spec(Tied, nn.CrossEntropyLoss(), lambda g: (_labels(g, 5, 3, 4), _labels(g, 5, 3)),
                 kron_blocks=("emb.weight", "proj"), pch_reference=False),
    "gated": Spec(Gated, nn.CrossEntropyLoss(), lambda g: (_randn(g, 3, 4), _labels(g, 3, 3))),
    "reductions": Spec(Reductions, nn.MSELoss(reduction="sum"),
                       lambda g: (_randn(g, 3, T, 4), _randn(g, 3, 2))),
    "functional": Spec(Functional, nn.CrossEntropyLoss(),
                       lambda g: (_randn(g, 4, 4), _labels(g, 3, 4)),
                       kron_blocks=("b2",)),
    "transformer": Spec(Transformer, nn.CrossEntropyLoss(),
                        lambda g: (_randn(g, 3, T, D), _labels(g, 3, 3)),
                        kron_blocks=("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias"),
                        pch_reference=False),
    "hand_attention": Spec(HandAttention, nn.CrossEntropyLoss(),
                           lambda g: (_randn(g, 3, T, D), _labels(g, 3, 3))),
    "post_loss": Spec(post_loss_mlp, post_loss, lambda g: (_randn(g, 4, 4), _labels(g, 3, 4))),
    "bilinear": Spec(Bilinear, nn.MSELoss(), lambda g: (_randn(g, 3, 4), _randn(g, 3, 2)),
                     kron_blocks=("weight",)),
    "conv_bn": Spec(lambda: randomize_bn(ConvBN()).eval(), nn.CrossEntropyLoss(),
                    lambda g: (_randn(g, 3, 2, 4, 4), _labels(g, 3, 3)),
                    kron_blocks=("bn.weight", "bn.bias")),
    "excite": Spec(Excite, nn.CrossEntropyLoss(), lambda g: (_randn(g, 3, 2, 4, 4),
                                                             _labels(g, 3, 3))),
    "divided": Spec(Divided, nn.CrossEntropyLoss(), lambda g: (_randn(g, 3, 4), _labels(g, 3, 3)),
                    refused={q: ("truediv", "acts on 'd', a value without a sample axis")
                             for q in RESIDUAL}),
    "nll": Spec(LogSoftmaxNet, nn.NLLLoss(), lambda g: (_randn(g, 4, 4), _labels(g, 3, 4)),
                logits=True),
    "smooth_acts": Spec(SmoothActivations, nn.CrossEntropyLoss(),
                        lambda g: (_randn(g, 4, 4), _labels(g, 3, 4))),
    "rms_norm": Spec(RMSNormNet, nn.CrossEntropyLoss(),
                     lambda g: (_randn(g, 3, T, D), _labels(g, 3, 3)),
                     kron_blocks=("norm.weight",), pch_reference=False),
    "weight_norm": Spec(WeightNormed, nn.MSELoss(),
                        lambda g: (_randn(g, 3, 2, 4), _randn(g, 3, 3)),
                        kron_blocks=tuple(f"{m}.parametrizations.weight.original{i}"
                                          for m in ("conv", "fc") for i in (0, 1)),
                        refused={q: ("_weight_norm_square", "a value without a sample axis")
                                 for q in RESIDUAL}),
    "conv_lrn": Spec(ConvLRN, nn.CrossEntropyLoss(),
                     lambda g: (_randn(g, 3, 2, 4, 3), _labels(g, 3, 3)), pch_reference=False),
    "spectral_norm": Spec(SpectralNormed, nn.CrossEntropyLoss(),
                          lambda g: (_randn(g, 3, 2, 4), _labels(g, 3, 3)),
                          kron_blocks=("up.parametrizations.weight.original",
                                       "fc.parametrizations.weight.original"),
                          refused={q: ("truediv", "a value without a sample axis")
                                   for q in RESIDUAL}),
    "padded": Spec(Padded, nn.CrossEntropyLoss(),
                   lambda g: (_randn(g, 3, 2, 3, 2), _labels(g, 3, 3))),
    "patches": Spec(Patches, nn.CrossEntropyLoss(),
                    lambda g: (_randn(g, 3, 2, 4, 4), _labels(g, 3, 3))),
    "prototypes": Spec(Prototypes, nn.CrossEntropyLoss(),
                       lambda g: (_randn(g, 3, 4), _labels(g, 3, 3)),
                       kron_blocks=("prototypes",), pch_reference=False),
    "probe_pooling": Spec(ProbePooling, nn.CrossEntropyLoss(),
                          lambda g: (_randn(g, 3, T, D), _labels(g, 3, 3)),
                          kron_blocks=("probe",)),
}
NAMES = list(SPECS)


def names_supporting(*quantities: str) -> list[str]:
    return [n for n in NAMES if all(q in SPECS[n].supported for q in quantities)]


PCH_CHECKED = [n for n in names_supporting("pchmp_abs", "pchmp_clip")
               if SPECS[n].pch_reference]


@dataclass
class Case:
    name: str
    spec: Spec
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    vectors: Optional[dict]

    @property
    def params(self) -> dict:
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def reference_pair(self) -> tuple[nn.Module, Callable]:
        """The model and loss the references differentiate: the same ``L(θ)``, split at the
        output whose loss Hessian fxcurv uses (the logits for NLL after log_softmax)."""
        if not self.spec.logits and not hasattr(self.model, "written_out"):
            return self.model, self.spec.loss_fn
        model = copy.deepcopy(self.model)
        if hasattr(model, "written_out"):   # the same function without torch's own kernel
            model.written_out = True
        if not self.spec.logits:
            return model, self.spec.loss_fn
        model.return_logits = True
        return model, lambda z, y: F.nll_loss(F.log_softmax(z, dim=1), y)


@functools.lru_cache(maxsize=None)
def case_of(name: str) -> Case:
    spec = SPECS[name]
    torch.manual_seed(NAMES.index(name))
    model = spec.make().to(DTYPE)
    x, y = spec.batch(torch.Generator().manual_seed(100 + NAMES.index(name)))
    vectors = None
    if any(q in PRODUCTS for q in spec.supported):
        gen = torch.Generator().manual_seed(200 + NAMES.index(name))
        vectors = {n: torch.randn(V, *p.shape, generator=gen, dtype=DTYPE)
                   for n, p in model.named_parameters()}
    return Case(name, spec, model, x, y, vectors)


@functools.lru_cache(maxsize=None)
def compiled(name: str):
    """``(step, args, outputs)``: one step with every supported quantity, called once."""
    case = case_of(name)
    step = fxcurv.compile(case.model, case.spec.loss_fn, list(case.spec.supported))
    args = (case.x, case.y) if case.vectors is None else (case.x, case.y, case.vectors)
    loss, grads, *values = step(*args)
    return step, args, (loss, grads, dict(zip(case.spec.supported, values)))


def ours(name: str, quantity: str) -> dict:
    value = compiled(name)[2][2][quantity]
    assert list(value) == list(case_of(name).params), quantity
    return value


# -------------------------------------------------------------------------------- references
class Flat:
    """The trainable parameters as one vector ``θ`` and back."""

    def __init__(self, params: dict):
        self.params = params
        self.names = list(params)
        self.sizes = [p.numel() for p in params.values()]
        self.theta = torch.cat([p.reshape(-1) for p in params.values()])
        starts = torch.tensor([0, *self.sizes]).cumsum(0).tolist()
        self.slices = {n: slice(a, b) for n, a, b in zip(self.names, starts, starts[1:])}

    def unflatten(self, theta) -> dict:
        return {n: t.reshape(self.params[n].shape)
                for n, t in zip(self.names, theta.split(self.sizes))}

    def block(self, matrix, name):
        """The ``(name, name)`` block of ``[..., P, P]``."""
        s = self.slices[name]
        return matrix[..., s, s]


def psd(matrix):
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return vectors @ torch.diag(values.clamp(min=0)) @ vectors.T


@dataclass
class Reference:
    flat: Flat
    loss: torch.Tensor
    grad: dict
    batch_grad: dict                      # [N, *p.shape], Σ_n = grad
    ggn: torch.Tensor                     # [N, P, P], G_n
    hessian: Optional[torch.Tensor]       # [P, P]
    hessian_batch: Optional[torch.Tensor]  # [N, P, P]
    pch: dict                             # "abs" / "clip" / "zero" -> [P, P]


def per_sample_gradients(case: Case, model, loss_fn) -> dict:
    """``vmap(grad)``: sample n's output by the model on ``x_n`` alone, put into row n of
    ``f⁰``, then the whole batch's loss."""
    params = case.params
    f0 = functional_call(model, params, (case.x,)).detach()
    rows = torch.eye(len(case.x), dtype=DTYPE)

    def loss_of_sample(p, x_n, row):
        out_n = functional_call(model, p, (x_n.unsqueeze(0),))          # [1, ...]
        row = row.reshape(-1, *[1] * (f0.dim() - 1))
        return loss_fn(f0 * (1 - row) + row * out_n, case.y)

    return vmap(grad(loss_of_sample), in_dims=(None, 0, 0))(params, case.x, rows)


def ggn_per_sample(case: Case, flat: Flat, model, loss_fn) -> torch.Tensor:
    """``[N, P, P]``: ``J_nᵀ psd(H_n) J_n``."""
    f0 = functional_call(model, flat.params, (case.x,)).detach()
    n, k = f0.shape[0], f0[0].numel()
    h = hessian(lambda out: loss_fn(out, case.y))(f0).reshape(n, k, n, k)
    blocks = []
    for i in range(n):
        off = torch.cat([h[i, :, :i], h[i, :, i + 1:]], 1)
        assert not off.any(), "reference self-check: the loss couples samples"
        j = jacrev(lambda t: functional_call(model, flat.unflatten(t),
                                             (case.x[i:i + 1],)))(flat.theta).reshape(k, -1)
        blocks.append(j.T @ psd(h[i, :, i]) @ j)
    return torch.stack(blocks)


UNARY = {torch.tanh, torch.Tensor.tanh, torch.sigmoid, torch.Tensor.sigmoid, F.softplus,
         F.gelu, F.silu, F.softsign, F.tanhshrink, F.celu}
PRODUCT = {torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__}
BLOCK = {torch.softmax, torch.Tensor.softmax, F.softmax, F.layer_norm}  # dense residual blocks
MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__}


class Sites(TorchFunctionMode):
    """Records the calls with a second-order residual: elementwise activations and products
    of two tensors, as ``(kind, func, args, kwargs, output)``."""

    def __init__(self):
        super().__init__()
        self.sites = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in UNARY:
            self.sites.append(("unary", func, args, kwargs, out))
        elif func in PRODUCT and all(isinstance(a, torch.Tensor) for a in args[:2]):
            self.sites.append(("product", func, args, kwargs, out))
        elif func in BLOCK:
            self.sites.append(("block", func, args, kwargs, out))
        elif func in MATMUL and all(isinstance(a, torch.Tensor) for a in args[:2]):
            self.sites.append(("matmul", func, args, kwargs, out))
        return out


def per_sample_blocks(fn, values: list, g) -> torch.Tensor:
    """``[N, D, D]``: sample n's block of ``∂²(Σ g ⊙ fn(*values))/∂(values)²``, the values'
    per-sample entries flattened and concatenated (the blocks across samples are zero)."""
    sizes, samples = [v.numel() for v in values], values[0].size(0)

    def total(flat):
        parts = [p.reshape(v.shape) for p, v in zip(torch.split(flat, sizes), values)]
        return (g * fn(*parts)).sum()

    full = hessian(total)(torch.cat([v.reshape(-1) for v in values]))
    index = torch.cat([torch.arange(size).reshape(samples, -1) + sum(sizes[:i])
                       for i, size in enumerate(sizes)], 1)
    assert all(not full[i][:, j].any() for i in index for j in index if i[0] != j[0]), \
        "reference self-check: a residual block couples samples"
    return torch.stack([full[i][:, i] for i in index])


def modified_block(blocks, m):
    """``m`` applied to the eigenvalues of each symmetric block ``[N, D, D]``."""
    values, vectors = torch.linalg.eigh(blocks)
    return vectors @ torch.diag_embed(m(values)) @ vectors.transpose(1, 2)


def _depends_on(value, params: dict) -> set:
    used = torch.autograd.grad(value.sum(), list(params.values()), retain_graph=True,
                               allow_unused=True)
    return {n for n, g in zip(params, used) if g is not None}


def pch_references(case: Case, flat: Flat, model, loss_fn) -> dict:
    """``[P, P]`` positive-curvature Hessians for ``m = abs, clip`` and, as a self-check,
    ``m = 0`` (must be the GGN)."""
    params = {n: p.clone().requires_grad_() for n, p in flat.params.items()}
    with Sites() as mode:
        out = functional_call(model, params, (case.x,))
    loss = loss_fn(out, case.y)
    sites = mode.sites
    gradients = torch.autograd.grad(loss, [s[4] for s in sites], retain_graph=True)
    terms = []       # per site: None or (residuals [R...], inputs at θ⁰, how to form z)
    for (kind, func, args, kwargs, _), g in zip(sites, gradients):
        if kind == "unary":
            z = args[0].detach().requires_grad_()
            first, = torch.autograd.grad((g * func(z, *args[1:], **kwargs)).sum(), z,
                                         create_graph=True)
            residual, = torch.autograd.grad(first.sum(), z)        # diag: f'' elementwise
            terms.append(([residual], [args[0].detach()]))
        elif kind == "block":         # softmax, layer_norm: a dense block in the input
            rest = args[1:]
            blocks = per_sample_blocks(lambda z: func(z, *rest, **kwargs), [args[0].detach()],
                                       g)
            terms.append(("block", blocks, [args[0].detach()]))
        else:
            a, b = args[:2]
            if not _depends_on(a, params) & _depends_on(b, params):
                terms.append(None)
            elif kind == "matmul" or not a.shape == b.shape == g.shape:
                # the cross block of two activations (bilinear, or broadcast products)
                blocks = per_sample_blocks(func, [a.detach(), b.detach()], g)
                terms.append(("block", blocks, [a.detach(), b.detach()]))
            else:
                terms.append(([g / 2, -g / 2], [a.detach(), b.detach()]))

    def modified(m):
        def fn(theta):
            with Sites() as again:
                out = functional_call(model, flat.unflatten(theta), (case.x,))
            assert [s[1] for s in again.sites] == [s[1] for s in sites]
            total = loss_fn(out, case.y)
            for site, term in zip(again.sites, terms):
                if term is None:
                    continue
                if term[0] == "block":    # ½ Σ_n δ_nᵀ (m(R_n) - R_n) δ_n
                    _, blocks, at = term
                    delta = torch.cat([(arg - a0).flatten(1) for arg, a0 in zip(site[2], at)],
                                      1)
                    change = modified_block(blocks, m) - blocks
                    total = total + 0.5 * torch.einsum("nd,nde,ne->", delta, change, delta)
                    continue
                residuals, at = term
                deltas = [arg - a0 for arg, a0 in zip(site[2], at)]
                zs = deltas if len(deltas) == 1 else [deltas[0] + deltas[1],
                                                      deltas[0] - deltas[1]]
                for r, z in zip(residuals, zs):
                    total = total + 0.5 * ((m(r) - r) * z ** 2).sum()
            return total
        return hessian(fn)(flat.theta)

    return {"abs": modified(torch.abs), "clip": modified(lambda r: r.clamp(min=0)),
            "zero": modified(torch.zeros_like)}


@functools.lru_cache(maxsize=None)
def reference(name: str) -> Reference:
    case = case_of(name)
    model, loss_fn = case.reference_pair()
    loss = case.spec.loss_fn(case.model(case.x), case.y)
    trainable = [p for p in case.model.parameters() if p.requires_grad]
    grads = dict(zip(case.params, torch.autograd.grad(loss, trainable)))
    flat = Flat(case.params)
    batch_grad = per_sample_gradients(case, model, loss_fn)
    ggn = ggn_per_sample(case, flat, model, loss_fn)
    full = per = None
    pch = {}
    if any(q in case.spec.supported for q in RESIDUAL):       # ggnmp alone needs none
        def loss_at(theta, row=None):
            out = functional_call(model, flat.unflatten(theta), (case.x,))
            if row is not None:               # only sample n's output depends on θ
                row = row.reshape(-1, *[1] * (out.dim() - 1))
                out = f0 * (1 - row) + row * out
            return loss_fn(out, case.y)

        f0 = functional_call(model, flat.params, (case.x,)).detach()
        with sdpa_kernel(SDPBackend.MATH):  # forward-mode AD needs torch's unfused attention
            full = hessian(loss_at)(flat.theta)
            per = vmap(hessian(loss_at), in_dims=(None, 0))(
                flat.theta, torch.eye(len(case.x), dtype=DTYPE))
    if case.spec.pch_reference and any(q in case.spec.supported
                                       for q in ("pchmp_abs", "pchmp_clip")):
        pch = pch_references(case, flat, model, loss_fn)
    return Reference(flat, loss.detach(), grads, batch_grad, ggn, full, per, pch)


def close(actual, expected, what: str, tol=TOL) -> None:
    assert actual.shape == expected.shape, f"{what}: {tuple(actual.shape)} vs " \
                                           f"{tuple(expected.shape)}"
    torch.testing.assert_close(actual, expected, **tol, msg=what)


def products(ref: Reference, matrix, vectors: dict, name: str):
    """``matrix`` block of ``name`` times the ``V`` vectors, ``[V, *p.shape]``."""
    v = vectors[name]
    return (v.reshape(len(v), -1) @ ref.flat.block(matrix, name).T).reshape(v.shape)


# --------------------------------------------------------------------------------- tests
def test_the_zoo_is_big_enough_and_the_table_matches_the_specs():
    assert len(SPECS) >= 12
    rows = {}
    for line in __doc__.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] in SPECS:
            rows[cells[0]] = cells[-1]
    assert set(rows) == set(SPECS)
    for name, spec in SPECS.items():
        listed = {}
        for words, node in re.findall(r"([^;()]+)\(([^)]+)\)", rows[name]):
            for word in words.split():
                for quantity in (RESIDUAL if word == "2nd" else (word,)):
                    listed[quantity] = node
        assert listed == {q: node for q, (node, _) in spec.refused.items()}, name


@pytest.mark.parametrize("name", NAMES)
def test_loss_and_grad_match_autograd(name):
    _, _, (loss, grads, _) = compiled(name)
    ref = reference(name)
    close(loss, ref.loss, "loss")
    assert list(grads) == list(ref.grad)
    for p in ref.grad:
        close(grads[p], ref.grad[p], f"grad[{p}]")


@pytest.mark.parametrize("name", NAMES)
def test_first_order_quantities_match_vmap_grad(name):
    ref = reference(name)
    n = len(case_of(name).x)
    for p, g in ref.batch_grad.items():
        close(g.sum(0), ref.grad[p], f"reference self-check Σ_n g_n = grad [{p}]")
        close(ours(name, "batch_grad")[p], g, f"batch_grad[{p}]")
        close(ours(name, "batch_l2")[p], g.reshape(n, -1).square().sum(1), f"batch_l2[{p}]")
        close(ours(name, "sum_grad_squared")[p], g.square().sum(0), f"sum_grad_squared[{p}]")
        close(ours(name, "variance")[p], g.square().sum(0) / n - (g.sum(0) / n).square(),
              f"variance[{p}]")


@pytest.mark.parametrize("name", NAMES)
def test_diag_ggn_exact_and_batch(name):
    ref = reference(name)
    for p, param in ref.flat.params.items():
        diag = ref.flat.block(ref.ggn, p).diagonal(dim1=-2, dim2=-1)         # [N, P_p]
        close(ours(name, "diag_ggn_exact")[p], diag.sum(0).reshape(param.shape),
              f"diag_ggn_exact[{p}]")
        close(ours(name, "diag_ggn_exact_batch")[p], diag.reshape(-1, *param.shape),
              f"diag_ggn_exact_batch[{p}]")


@pytest.mark.parametrize("name", NAMES)
def test_sqrt_ggn_exact_squared_is_the_per_sample_ggn_block(name):
    ref = reference(name)
    case = case_of(name)
    columns = reference_output_size(name)
    for p, param in ref.flat.params.items():
        s = ours(name, "sqrt_ggn_exact")[p]
        assert s.shape == (columns, len(case.x), *param.shape), p
        s = s.reshape(columns, len(case.x), -1)
        close(torch.einsum("cni,cnj->nij", s, s), ref.flat.block(ref.ggn, p),
              f"Σ_c s sᵀ [{p}]")
        close(s.square().sum([0, 1]).reshape(param.shape), ours(name, "diag_ggn_exact")[p],
              f"squared sum of sqrt_ggn_exact = diag_ggn_exact [{p}]")


def reference_output_size(name: str) -> int:
    case = case_of(name)
    model, _ = case.reference_pair()
    return model(case.x[:1]).numel()


@pytest.mark.parametrize("name", names_supporting("kflr"))
def test_kflr_shapes_and_linear_layer_factors(name):
    """Shapes: ``[G, A]`` with ``G: [p.shape[0]]²``, ``A: [prod(p.shape[1:])]²`` for a weight,
    ``[G]`` for a bias. Values, for every ``nn.Linear`` on ``[N, I]`` inputs: G is the bias's
    GGN block and A = Σ_n x_n x_nᵀ / N. A parameter without Kronecker structure (norm scales
    and shifts, raw parameters used elementwise, transposed or by two ops): ``[G]``, its exact
    GGN block ``[P, P]``."""
    case, ref = case_of(name), reference(name)
    factors = ours(name, "kflr")
    for p, param in ref.flat.params.items():
        if p in case.spec.kron_blocks:
            assert len(factors[p]) == 1, p
            close(factors[p][0], ref.flat.block(ref.ggn, p).sum(0), f"kflr GGN block [{p}]")
            continue
        expected = [(param.shape[0],) * 2]
        if param.dim() > 1:
            expected.append((param[0].numel(),) * 2)
        assert [tuple(f.shape) for f in factors[p]] == expected, p
    model, _ = case.reference_pair()
    inputs = linear_inputs(model, case.x)
    checked = 0
    for layer, x in inputs.items():
        if x.dim() != 2:
            continue
        weight, bias = f"{layer}.weight", f"{layer}.bias"
        if weight not in factors:  # a parametrized weight (weight_norm): its [G] above
            continue
        g_bias = ref.flat.block(ref.ggn, bias).sum(0)
        close(factors[bias][0], g_bias, f"kflr G [{bias}]")
        close(factors[weight][0], g_bias, f"kflr G [{weight}]")
        close(factors[weight][1], x.T @ x / len(x), f"kflr A [{weight}]")
        checked += 1
    assert checked or case.spec.kron_blocks


@pytest.mark.parametrize("name", names_supporting("diag_h", "diag_h_batch"))
def test_diag_h_and_batch_match_the_hessian(name):
    ref = reference(name)
    for p, param in ref.flat.params.items():
        close(ours(name, "diag_h")[p],
              ref.flat.block(ref.hessian, p).diagonal().reshape(param.shape), f"diag_h[{p}]")
        close(ours(name, "diag_h_batch")[p],
              ref.flat.block(ref.hessian_batch, p).diagonal(dim1=1, dim2=2)
              .reshape(-1, *param.shape), f"diag_h_batch[{p}]")
        close(ref.flat.block(ref.hessian_batch, p).sum(0), ref.flat.block(ref.hessian, p),
              f"reference self-check Σ_n H_n = H [{p}]")


@pytest.mark.parametrize("name", names_supporting("hmp"))
def test_hmp_is_the_hessian_block_times_vectors(name):
    ref, vectors = reference(name), case_of(name).vectors
    for p in ref.flat.params:
        close(ours(name, "hmp")[p], products(ref, ref.hessian, vectors, p), f"hmp[{p}]")


@pytest.mark.parametrize("name", names_supporting("ggnmp"))
def test_ggnmp_is_the_ggn_block_times_vectors(name):
    ref, vectors = reference(name), case_of(name).vectors
    for p in ref.flat.params:
        close(ours(name, "ggnmp")[p], products(ref, ref.ggn.sum(0), vectors, p), f"ggnmp[{p}]")


@pytest.mark.parametrize("mode", ["abs", "clip"])
@pytest.mark.parametrize("name", PCH_CHECKED)
def test_pchmp_matches_the_definition(name, mode):
    ref, vectors = reference(name), case_of(name).vectors
    ggn = ref.ggn.sum(0)
    for p in ref.flat.params:
        # (blocks only: across two parameters a layer's weight-input term is no site)
        close(ref.flat.block(ref.pch["zero"], p), ref.flat.block(ggn, p),
              f"reference self-check: every residual site recorded [{p}]")
        close(ours(name, f"pchmp_{mode}")[p], products(ref, ref.pch[mode], vectors, p),
              f"pchmp_{mode}[{p}]")
        # identities of the definition: abs + H = 2 clip; abs - clip and clip - GGN are PSD
        block = {k: ref.flat.block(m, p) for k, m in
                 (("abs", ref.pch["abs"]), ("clip", ref.pch["clip"]), ("h", ref.hessian),
                  ("ggn", ggn))}
        close(block["abs"] + block["h"], 2 * block["clip"], f"abs + H = 2 clip [{p}]")
        for big, small in (("abs", "clip"), ("clip", "ggn")):
            gap = torch.linalg.eigvalsh(block[big] - block[small])
            assert gap.min() > -1e-10 * (1 + gap.abs().max()), (p, big, small)


@pytest.mark.parametrize("name", [n for n in names_supporting("pchmp_abs", "pchmp_clip", "hmp")
                                  if n not in PCH_CHECKED])
def test_pchmp_identities_where_sites_are_hidden(name):
    """Fused torch attention hides its sites from the reference: ``hmp + pchmp_abs =
    2 pchmp_clip`` (hmp itself is checked against the Hessian), and abs differs from clip."""
    gap = 0.0
    for p in case_of(name).params:
        abs_, clip = ours(name, "pchmp_abs")[p], ours(name, "pchmp_clip")[p]
        close(ours(name, "hmp")[p] + abs_, 2 * clip, f"hmp + pchmp_abs = 2 pchmp_clip [{p}]")
        gap = max(gap, (abs_ - clip).abs().max().item())
    assert gap > 1e-6


@pytest.mark.parametrize("name", PCH_CHECKED)
def test_the_four_curvatures_differ(name):
    """Self-check that the products test something: every model has residuals of both signs,
    so pchmp_abs, pchmp_clip, hmp and ggnmp are four different blocks for some parameter."""
    ref = reference(name)
    matrices = {"abs": ref.pch["abs"], "clip": ref.pch["clip"], "hessian": ref.hessian,
                "ggn": ref.ggn.sum(0)}
    for i, (a, first) in enumerate(matrices.items()):
        for b, second in list(matrices.items())[i + 1:]:
            gap = max((ref.flat.block(first, p) - ref.flat.block(second, p)).abs().max()
                      for p in ref.flat.params)
            assert gap > 1e-3, (a, b)


@pytest.mark.parametrize("name,quantity", [(n, q) for n in NAMES for q in SPECS[n].refused])
def test_refused_quantities_name_the_node_and_the_quantity(name, quantity):
    case = case_of(name)
    node, reason = case.spec.refused[quantity]
    with pytest.raises(CompileError) as info:
        fxcurv.compile(case.model, case.spec.loss_fn, [quantity])
    message = str(info.value)
    assert f"node '{node}'" in message, message
    assert f"for quantity '{quantity}'" in message, message
    assert re.search(reason, message), message


class SharedBilinear(nn.Module):
    """Both einsum activations come from the same layer: a cross second derivative."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.weight = nn.Parameter(torch.randn(2, 3, 3))

    def forward(self, x):
        h = self.fc(x)
        return torch.einsum("ni,kij,nj->nk", torch.tanh(h), self.weight, h)


@pytest.mark.parametrize("make,loss_fn,quantity,node,reason", [
    (post_loss_mlp, post_loss, "diag_ggn_mc", "loss",
     "Monte-Carlo curvature samples targets from the likelihood of a built-in loss"),
    (post_loss_mlp, post_loss, "kfac", "loss",
     "Monte-Carlo curvature samples targets from the likelihood of a built-in loss"),
], ids=["mc_post_loss", "kfac_post_loss"])
def test_more_refusals(make, loss_fn, quantity, node, reason):
    torch.manual_seed(0)
    with pytest.raises(CompileError) as info:
        fxcurv.compile(make().to(DTYPE), loss_fn, [quantity])
    message = str(info.value)
    assert f"node '{node}'" in message and f"for quantity '{quantity}'" in message, message
    assert re.search(reason, message), message


def test_einsum_whose_activations_share_parameters_gives_the_exact_hessian():
    """Both einsum activations come from the same layer: their cross block (einsum's
    ``residual_block``) enters diag_h and hmp exactly."""
    torch.manual_seed(0)
    model, loss_fn = SharedBilinear().to(DTYPE), nn.MSELoss()
    x, y = torch.randn(3, 4, dtype=DTYPE), torch.randn(3, 2, dtype=DTYPE)
    vectors = {n: torch.randn(V, *p.shape, dtype=DTYPE) for n, p in model.named_parameters()}
    _, _, diag_h, hmp = fxcurv.compile(model, loss_fn, ["diag_h", "hmp"])(x, y, vectors)
    for name, p in model.named_parameters():
        block = hessian(lambda t: loss_fn(functional_call(model, {name: t}, (x,)), y))(
            p.detach()).reshape(p.numel(), p.numel())
        close(diag_h[name], block.diagonal().reshape(p.shape), f"diag_h[{name}]")
        close(hmp[name], (vectors[name].flatten(1) @ block).reshape(vectors[name].shape),
              f"hmp[{name}]")


def _flatten(value) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for k in value for t in _flatten(value[k])]
    return [t for v in value for t in _flatten(v)]


@pytest.mark.parametrize("name", NAMES)
def test_torchscript_step_gives_the_same_outputs(name):
    step, args, (loss, grads, values) = compiled(name)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(step), buffer)
    buffer.seek(0)
    scripted = torch.jit.load(buffer)(*args)
    assert len(scripted) == 2 + len(values)
    expected = _flatten([loss, grads, *values.values()])
    actual = _flatten(list(scripted))
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        close(a, e, f"scripted output {i}", tol=SAME)
