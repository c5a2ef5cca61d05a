"""Model and batch setups shared by the tests that compare with BackPACK or brute force.

A plain module next to the tests (like ``rule_harness.py``):
``from setups import with_head, randomize_bn, default_dtype, make_batch``.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor


@contextmanager
def default_dtype(dtype: torch.dtype):
    """``torch``'s default dtype is ``dtype`` inside the block, and restored after it."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def with_head(body: list, in_shape: tuple, num_out: int = 3) -> nn.Sequential:
    """``body`` then Flatten and a Linear to ``num_out`` outputs, its input size found by a
    dummy pass of one sample of shape ``in_shape``."""
    with torch.no_grad():
        size = nn.Sequential(*body, nn.Flatten())(torch.zeros(1, *in_shape)).shape[1]
    return nn.Sequential(*body, nn.Flatten(), nn.Linear(size, num_out))


def randomize_bn(module: nn.Module, num_batches_tracked: int | None = None) -> nn.Module:
    """Random running statistics and affine parameters (so eval differs from train) for every
    BatchNorm in ``module`` (``module`` itself included); also sets their
    ``num_batches_tracked`` when given. Returns ``module``."""
    for bn in module.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                bn.running_mean.copy_(torch.randn_like(bn.running_mean))
                bn.running_var.copy_(torch.rand_like(bn.running_var) + 0.5)
                bn.weight.copy_(torch.randn_like(bn.weight))
                bn.bias.copy_(torch.randn_like(bn.bias))
                if num_batches_tracked is not None:
                    bn.num_batches_tracked.fill_(num_batches_tracked)
    return module


def linear_inputs(model: nn.Module, x: torch.Tensor) -> dict:
    """``{module name: input}`` of every ``nn.Linear`` in one forward pass of ``x``."""
    inputs = {}
    hooks = [m.register_forward_hook(lambda m, i, o, k=k: inputs.__setitem__(k, i[0].detach()))
             for k, m in model.named_modules() if isinstance(m, nn.Linear)]
    model(x)
    for hook in hooks:
        hook.remove()
    return inputs


def make_batch(in_shape: tuple, vocab: int | None, loss: str, n: int, num_out: int = 3,
               dtype: torch.dtype = torch.float64):
    """A batch ``(x, y)`` of ``n`` samples, seeded by ``n``: ``x`` standard normal
    ``[n, *in_shape]``, or integers below ``vocab`` when it is given; ``y`` class indices
    ``[n]`` for a loss named ``ce*``, uniform ``[n, num_out]`` for ``bce*``, else standard
    normal ``[n, num_out]``."""
    gen = torch.Generator().manual_seed(n)
    if vocab is None:
        x = torch.randn(n, *in_shape, generator=gen, dtype=dtype)
    else:
        x = torch.randint(0, vocab, (n, *in_shape), generator=gen)
    if loss.startswith("ce"):
        y = torch.randint(0, num_out, (n,), generator=gen)
    elif loss.startswith("bce"):
        y = torch.rand(n, num_out, generator=gen, dtype=dtype)
    else:
        y = torch.randn(n, num_out, generator=gen, dtype=dtype)
    return x, y


# ------------------------------------------------------------------ models used by several files
class ResidualMLP(nn.Module):
    """``h = h + activation(linear(h))`` per block, then a head."""

    def __init__(self, d: int = 4, blocks: int = 2, d_out: int = 3,
                 activation: Callable[[Tensor], Tensor] = torch.relu):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(d, d) for _ in range(blocks))
        self.head = nn.Linear(d, d_out)
        self.activation = activation

    def forward(self, x):
        h = x
        for block in self.blocks:
            h = h + self.activation(block(h))
        return self.head(h)


class FunctionalWithScale(nn.Module):
    """Raw parameters for a two-layer model written with F.*: ``w1 [5, 4]``, ``b1 [5]``, a
    ``scale [5]`` for an elementwise product, ``w2 [3, 5]``, ``b2 [3]``. Subclasses define
    ``forward``."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(5, 4))
        self.b1 = nn.Parameter(torch.randn(5))
        self.scale = nn.Parameter(torch.randn(5))
        self.w2 = nn.Parameter(torch.randn(3, 5))
        self.b2 = nn.Parameter(torch.randn(3))


class LayerNormNet(nn.Module):
    """Linear -> LayerNorm -> Linear, ``[N, 4]`` -> ``[N, 3]``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.norm(self.fc(x)))


class Gated(nn.Module):
    """``h * sigmoid(h)``: an elementwise product of two activations of ``fc``'s output."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = self.fc(x)
        return self.head(h * torch.sigmoid(h))
