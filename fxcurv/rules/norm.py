"""Normalisation and regularisation layers: dropout (lowered to a mask multiply)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import Ctx, register


def _lower_dropout(c: Ctx):
    """Train mode: ``y = x ⊙ m / (1 - p)`` with ``m ~ Bernoulli(1 - p)`` drawn once, so the
    backward multiplies by the same mask; eval mode (or p = 0): ``y = x``."""
    p, x = c.bound["p"], c.args.input
    if not c.bound["training"] or p == 0:
        return x
    if p == 1:
        return x * 0
    keep = torch.bernoulli(torch.full_like(x, 1.0 - p))
    return x * (keep / (1.0 - p))


register([F.dropout, torch.dropout], "dropout", "input, p=0.5, training=True, inplace=False",
         doc=_lower_dropout.__doc__, lower=_lower_dropout)
