"""The benchmark's workloads: model, loss, batch shape and the quantities timed on each.

Every workload is built deterministically from a seed (parameters, inputs, targets, product
vectors), so a memory run in a fresh process builds the very same setup as the timing run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn

# The quantities timed by default on the original workloads (``grad``: gradient only).
CORE_QUANTITIES = ("grad", "batch_grad", "batch_l2", "sum_grad_squared", "variance",
                   "diag_ggn_exact", "diag_ggn_mc", "kfac", "kflr", "diag_h")
HESSIAN_QUANTITIES = ("grad", "diag_h", "diag_h_batch", "hmp", "pchmp_abs", "pchmp_clip",
                      "diag_ggn_exact")
FIRST_ORDER_AND_DIAG_GGN = ("grad", "batch_grad", "batch_l2", "sum_grad_squared", "variance",
                            "diag_ggn_exact", "diag_ggn_mc")

# ----------------------------------------------------------------------------------- models


class SelfAttention(nn.Module):
    """Multi-head self-attention written with ``Linear``, ``matmul`` and ``softmax``; with
    ``causal_tokens`` set, position t attends to positions <= t only (an additive mask)."""

    def __init__(self, dim: int, heads: int, causal_tokens: int = 0):
        super().__init__()
        self.heads, self.scale = heads, 1.0 / math.sqrt(dim // heads)
        self.query, self.key, self.value = (nn.Linear(dim, dim) for _ in range(3))
        self.out = nn.Linear(dim, dim)
        self.causal = causal_tokens > 0
        if self.causal:
            mask = torch.full((causal_tokens, causal_tokens), float("-inf")).triu(1)
            self.register_buffer("mask", mask, persistent=False)

    def split(self, t: torch.Tensor) -> torch.Tensor:  # [N, T, D] -> [N, heads, T, D/heads]
        return t.reshape(t.size(0), t.size(1), self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x))
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        if self.causal:
            scores = scores + self.mask
        mixed = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2)
        return self.out(mixed.reshape(x.size(0), x.size(1), -1))


class TransformerBlock(nn.Module):
    """Pre-norm block ``h = x + attn(ln(x)); h = h + mlp(ln(h))``, mean over tokens, head."""

    def __init__(self, dim: int = 128, heads: int = 4, num_classes: int = 10):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = SelfAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.norm1(x))
        h = h + self.mlp(self.norm2(h))
        return self.head(h.mean(1))


class GPT2Block(nn.Module):
    """A GPT-2-small-sized block: causal self-attention and a GELU MLP, each after an affine
    LayerNorm, with residuals; final LayerNorm and a per-token head. Output ``[N, C, T]`` (the
    classes on axis 1, as ``CrossEntropyLoss`` wants for a target per token)."""

    def __init__(self, dim: int = 768, heads: int = 12, tokens: int = 256,
                 num_classes: int = 256):
        super().__init__()
        self.norm1, self.norm2, self.norm_out = (nn.LayerNorm(dim) for _ in range(3))
        self.attention = SelfAttention(dim, heads, causal_tokens=tokens)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.norm1(x))
        h = h + self.mlp(self.norm2(h))
        return self.head(self.norm_out(h)).transpose(1, 2)


class FirstOutput(nn.Module):
    """The first entry of a recurrent layer's ``(output, state)`` result."""

    def forward(self, result: tuple) -> torch.Tensor:
        return result[0]


class LastStep(nn.Module):
    """``[N, T, H] -> [N, H]``: the last time step of a batch-first sequence."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, -1]


def lstm_classifier(features: int = 32, hidden: int = 128, num_classes: int = 10) -> nn.Module:
    """LSTM (batch first), its output at the last time step, a linear head."""
    return nn.Sequential(nn.LSTM(features, hidden, batch_first=True), FirstOutput(),
                         LastStep(), nn.Linear(hidden, num_classes))


def for_backpack(model: nn.Module) -> nn.Module:
    """The same model with BackPACK's own modules in place of :class:`FirstOutput` and
    :class:`LastStep` (its hooks need a module it knows at every step); parameters shared."""
    from backpack.custom_module.reduce_tuple import ReduceTuple
    from backpack.custom_module.slicing import Slicing
    if not isinstance(model, nn.Sequential):
        return model
    swap = {FirstOutput: lambda: ReduceTuple(index=0),
            LastStep: lambda: Slicing((slice(None), -1))}
    return nn.Sequential(*[swap[type(m)]() if type(m) in swap else m for m in model])


def seed_cnn() -> nn.Module:
    """BackPACK's DiagGGN MNIST example CNN (the project's seed)."""
    return nn.Sequential(
        nn.Conv2d(1, 20, 5, 1), nn.ReLU(), nn.MaxPool2d(2, 2),
        nn.Conv2d(20, 50, 5, 1), nn.ReLU(), nn.MaxPool2d(2, 2),
        nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10))


def mlp(widths=(512, 256), activation=nn.ReLU, num_classes: int = 10) -> nn.Module:
    """Flatten, then ``Linear`` layers of the given widths with ``activation``, and a head."""
    layers, previous = [nn.Flatten()], 784
    for width in widths:
        layers += [nn.Linear(previous, width), activation()]
        previous = width
    return nn.Sequential(*layers, nn.Linear(previous, num_classes))


def cnn_tanh() -> nn.Module:
    """A small tanh CNN for 20x20 images: every convolution feeds a smooth activation, so
    every layer has a Hessian residual (the Hessian family on convolutions)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.Tanh(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3), nn.Tanh(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(3 * 3 * 16, 10))


def c3d3() -> nn.Module:
    """DeepOBS' CIFAR-10 3c3d. TensorFlow's 'same' max-pooling (3x3, stride 2) pads one zero
    after; ``padding=1`` pads one before and after, which gives the same shapes
    (28 -> 14, 12 -> 6, 6 -> 3) and, after a ReLU, a maximum over the same values but for the
    windows' alignment. Convolutions: 5x5 'valid', 3x3 'valid', 3x3 'same' (``padding=1``)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 5), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1),
        nn.Conv2d(64, 96, 3), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1),
        nn.Conv2d(96, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1),
        nn.Flatten(), nn.Linear(3 * 3 * 128, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
        nn.Linear(256, 10))


def c100_cnn() -> nn.Module:
    """A small CIFAR-100 CNN: three 3x3 'same' convolutions (32, 64, 128 channels), each with
    ReLU and 2x2 max-pooling, then a linear head to 100 classes."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(4 * 4 * 128, 100))


def all_cnn_c(num_classes: int = 100) -> nn.Module:
    """All-CNN-C (Springenberg et al.) as in DeepOBS' CIFAR-100 problem, without dropout."""
    def conv(c_in, c_out, k, stride=1, padding=1):
        return [nn.Conv2d(c_in, c_out, k, stride, padding), nn.ReLU()]
    return nn.Sequential(
        *conv(3, 96, 3), *conv(96, 96, 3), *conv(96, 96, 3, 2), *conv(96, 192, 3),
        *conv(192, 192, 3), *conv(192, 192, 3, 2), *conv(192, 192, 3, 1, 0),
        *conv(192, 192, 1, 1, 0), *conv(192, num_classes, 1, 1, 0),
        nn.AvgPool2d(6), nn.Flatten())


# -------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Workload:
    """A model (``build()``), its input ``sample_shape`` and target shape per sample, the
    default batch, what it is (``doc``) and the quantities timed on it by default. ``cpu``:
    part of the default run on the CPU (the heaviest ones run by default on CUDA only).
    ``compile_options``: keyword arguments of ``fxcurv.compile`` the model needs (passed
    when this version of fxcurv has them)."""
    name: str
    build: Callable[[], nn.Module]
    sample_shape: tuple
    batch_size: int
    doc: str
    num_classes: int = 10
    target_shape: tuple = ()
    quantities: tuple = CORE_QUANTITIES
    cpu: bool = True
    compile_options: dict = field(default_factory=dict)


WORKLOADS = {w.name: w for w in [
    Workload("seed_cnn", seed_cnn, (1, 28, 28), 128,
             "MNIST CNN of the seeds: conv 20 5x5, relu, maxpool 2, conv 50 5x5, relu, maxpool 2, "
             "linear 500, relu, linear 10"),
    Workload("mlp", mlp, (784,), 256, "MLP 784-512-256-10 with ReLU"),
    Workload("3c3d", c3d3, (3, 32, 32), 64,
             "DeepOBS CIFAR-10 3c3d: conv 64 5x5, conv 96 3x3, conv 128 3x3 'same', each with "
             "relu and maxpool 3/2 (padding 1), linear 512, 256, 10"),
    Workload("transformer", TransformerBlock, (64, 128), 32,
             "pre-norm transformer block (4 heads, width 128, GELU MLP 512), mean over the 64 "
             "tokens, linear head 10"),
    Workload("mlp_sigmoid", lambda: mlp((128, 64), nn.Sigmoid), (784,), 64,
             "MLP 784-128-64-10 with sigmoid (the Hessian family on a smooth activation)",
             quantities=HESSIAN_QUANTITIES),
    Workload("mlp_tanh_c100", lambda: mlp((256, 128), nn.Tanh, 100), (784,), 64,
             "MLP 784-256-128-100 with tanh, 100 classes", num_classes=100,
             quantities=HESSIAN_QUANTITIES),
    Workload("cnn_tanh", cnn_tanh, (1, 20, 20), 8,
             "CNN for 20x20 images: conv 8 3x3, tanh, maxpool 2, conv 16 3x3, tanh, maxpool 2, "
             "linear 10 (the Hessian family on convolutions with a smooth activation)",
             quantities=HESSIAN_QUANTITIES),
    Workload("c100_cnn", c100_cnn, (3, 32, 32), 32,
             "CIFAR-100 CNN: conv 32, 64, 128 3x3 'same', each with relu and maxpool 2, "
             "linear 100", num_classes=100, quantities=("grad", "diag_ggn_exact", "kfac")),
    Workload("all_cnn_c", all_cnn_c, (3, 32, 32), 128,
             "DeepOBS CIFAR-100 All-CNN-C (nine convolutions, no dropout), 100 classes",
             num_classes=100, quantities=("grad", "diag_ggn_exact", "kfac"), cpu=False),
    Workload("gpt2_block", GPT2Block, (256, 768), 8,
             "GPT-2-small-sized block: width 768, 12 heads, 256 tokens, causal attention, "
             "affine LayerNorms, GELU MLP 3072, final LayerNorm, a 256-class head per token",
             num_classes=256, target_shape=(256,), quantities=("grad", "kfac")),
    Workload("lstm", lstm_classifier, (32, 32), 32,
             "LSTM (32 features, hidden 128, batch first) over 32 steps, linear head 10 on the "
             "last step", quantities=FIRST_ORDER_AND_DIAG_GGN,
             compile_options={"sequence_length": 32}),
]}


def default_workloads(device: str) -> list:
    """The workloads of a plain ``python -m fxcurv.bench`` on ``device``."""
    return [name for name, w in WORKLOADS.items() if w.cpu or device.startswith("cuda")]


@dataclass
class Setup:
    """One workload's model, loss, batch and product vectors, on the bench's device."""
    model: nn.Module
    loss_fn: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    vectors: dict
    compile_options: dict = field(default_factory=dict)


def prepare(workload: str, device: str, batch_size: Optional[int], num_vectors: int,
            seed: int = 0) -> Setup:
    """Build a workload deterministically (parameters and batch seeded by ``seed``)."""
    spec = WORKLOADS[workload]
    n = batch_size or spec.batch_size
    torch.manual_seed(seed)
    model = spec.build().to(device)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, *spec.sample_shape, generator=gen).to(device)
    y = torch.randint(0, spec.num_classes, (n, *spec.target_shape), generator=gen).to(device)
    vectors = {name: torch.randn(num_vectors, *p.shape, generator=gen).to(device)
               for name, p in model.named_parameters() if p.requires_grad}
    return Setup(model, nn.CrossEntropyLoss(), x, y, vectors, dict(spec.compile_options))
