"""Rule cases for the ops real models use (issue 16): hard activations, clamp/abs/where,
minimum/maximum, reductions (logsumexp, var/std, norms, cumsum), index-driven moves (gather,
index_select, table[index], flip, roll, pixel shuffle), stochastic depth."""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from rule_harness import case

g = torch.Generator().manual_seed(16)


def rand(*shape, scale=1.0):
    return torch.randn(*shape, dtype=torch.float64, generator=g) * scale


def _kinks(*shape):
    """Values spread over [-5, 5] away from the kinks at -3, 0, 3 (and ±1, 6)."""
    t = rand(*shape, scale=3.0)
    return t + 0.05 * torch.sign(t)


ACTIVATIONS = [
    case("hardtanh", lambda x: F.hardtanh(x), _kinks(3, 4)),
    case("relu6", lambda x: F.relu6(x), _kinks(3, 4) + 3),
    case("relu6_inplace", lambda x: F.hardtanh(x * 1, 0.0, 6.0, inplace=True), _kinks(3, 4) + 3),
    case("hardsigmoid", lambda x: F.hardsigmoid(x), _kinks(3, 4)),
    case("hardswish", lambda x: F.hardswish(x), _kinks(3, 5)),
    case("abs", lambda x: torch.abs(x), rand(3, 4)),
    case("abs_method", lambda x: x.abs(), rand(3, 4)),
    case("clamp", lambda x: torch.clamp(x, -0.5, 0.7), rand(3, 4)),
    case("clamp_min_method", lambda x: x.clamp(min=0.1), rand(3, 4)),
    case("clip_max", lambda x: x.clip(max=0.2), rand(3, 4)),
    case("mish", lambda x: F.mish(x), rand(3, 4)),
]

SELECTIONS = [
    case("maximum", lambda x, y: torch.maximum(x, y), rand(3, 4), rand(3, 4)),
    case("minimum_broadcast", lambda x, y: torch.minimum(x, y), rand(3, 4), rand(4)),
    case("maximum_param", lambda x, w: x.maximum(w), rand(3, 4), rand(4), params=("w",)),
    case("where", lambda x, y: torch.where(x > 0, x, y), rand(3, 4), rand(3, 4)),
    case("where_scalar", lambda x: torch.where(x > 0.3, x, 0.0), rand(3, 4)),
    case("where_param", lambda x, w: torch.where(x > 0, w, x), rand(3, 4), rand(4),
         params=("w",)),
]

REDUCTIONS = [
    case("logsumexp", lambda x: torch.logsumexp(x, 1), rand(3, 4)),
    case("logsumexp_keepdim", lambda x: x.logsumexp(-1, keepdim=True), rand(3, 2, 4)),
    case("var", lambda x: x.var(1), rand(3, 4)),
    case("var_biased_keepdim", lambda x: torch.var(x, (1, 2), unbiased=False, keepdim=True),
         rand(3, 2, 4)),
    case("std", lambda x: torch.std(x, -1), rand(3, 5)),
    case("std_correction", lambda x: x.std(1, correction=0), rand(3, 5)),
    case("norm", lambda x: x.norm(dim=1), rand(3, 4)),
    case("norm_p1", lambda x: torch.norm(x, p=1, dim=-1, keepdim=True), rand(3, 4)),
    case("norm_p3", lambda x: torch.norm(x, p=3, dim=1), rand(3, 4)),
    case("vector_norm", lambda x: torch.linalg.vector_norm(x, dim=(1, 2)), rand(3, 2, 4)),
    case("cumsum", lambda x: torch.cumsum(x, 1), rand(3, 4)),
    case("cumsum_method", lambda x: x.cumsum(-1), rand(3, 2, 4)),
]

MOVES = [
    case("gather", lambda x, i: torch.gather(x, 1, i), rand(3, 4),
         torch.tensor([[0, 0], [2, 1], [3, 3]])),
    case("gather_label_smoothing", lambda x, y: x.log_softmax(1).gather(1, y.unsqueeze(1)),
         rand(3, 4), torch.tensor([1, 0, 3])),
    case("index_select", lambda x, i: torch.index_select(x, 1, i), rand(3, 4),
         torch.tensor([2, 0, 2]), const=("i",)),
    case("table_index", lambda t, i: t[i], rand(3, 4), torch.tensor([[2, 0], [1, 2]]),
         const=("i",)),
    case("table_index_rows", lambda t, i: t[i.view(-1)] * 2, rand(3, 2, 2),
         torch.tensor([[2, 0], [1, 2]]), const=("i",)),
    case("per_sample_take", lambda x, i: x[torch.arange(x.shape[0]), i], rand(3, 4, 2),
         torch.tensor([1, 3, -1])),
    case("per_sample_take_2d", lambda x, i: x[torch.arange(x.size(0), device=x.device), i] * 2,
         rand(3, 4), torch.tensor([0, 3, 2])),
    case("flip", lambda x: torch.flip(x, (1, 2)), rand(3, 2, 4)),
    case("flip_method", lambda x: x.flip(-1), rand(3, 4)),
    case("roll", lambda x: torch.roll(x, shifts=(1, -2), dims=(1, 2)), rand(3, 2, 4)),
    case("swapaxes", lambda x: torch.swapaxes(x, 1, 2), rand(3, 2, 4)),
    case("pixel_shuffle", lambda x: F.pixel_shuffle(x, 2), rand(2, 8, 2, 3)),
    case("pixel_unshuffle", lambda x: F.pixel_unshuffle(x, 2), rand(2, 2, 4, 2)),
]

try:  # torchvision is optional
    import torchvision.ops  # noqa: F401
except ImportError:
    torchvision = None
# the module, looked up at call time, so fx sees the call torch.fx.wrap keeps as one node
_STOCHASTIC_DEPTH = sys.modules.get("torchvision.ops.stochastic_depth")
REGULARISERS = [] if _STOCHASTIC_DEPTH is None else [
    case("stochastic_depth_eval",
         lambda x: _STOCHASTIC_DEPTH.stochastic_depth(x, 0.3, "row", False), rand(3, 4)),
]

_SWIN = sys.modules.get("torchvision.models.swin_transformer")
if _SWIN is None and _STOCHASTIC_DEPTH is not None:
    import torchvision.models.swin_transformer as _SWIN
ATTENTION = [] if _SWIN is None else [
    case("shifted_window_attention",
         lambda x, w, p, b: _SWIN.shifted_window_attention(x, w, p, b, [2, 2], 2, [1, 1],
                                                           training=False),
         rand(2, 4, 4, 4), rand(12, 4), rand(4, 4), rand(1, 2, 4, 4)),
    case("shifted_window_attention_padded",
         lambda x, w, p, b: _SWIN.shifted_window_attention(x, w, p, b, [2, 2], 2, [1, 1],
                                                           training=False),
         rand(2, 3, 5, 4), rand(12, 4), rand(4, 4), rand(1, 2, 4, 4)),
]

CASES = REGULARISERS + ATTENTION + ACTIVATIONS + SELECTIONS + REDUCTIONS + MOVES

NORMS = [
    case("group_norm", lambda x, w, b: F.group_norm(x, 2, w, b), rand(3, 4, 2, 3), rand(4),
         rand(4), params=("w", "b")),
    case("group_norm_plain", lambda x: F.group_norm(x, 1), rand(3, 4, 5)),
    case("instance_norm", lambda x, w, b: F.instance_norm(x, weight=w, bias=b),
         rand(3, 2, 4, 3), rand(2), rand(2), params=("w", "b")),
    case("instance_norm_running",
         lambda x, m, v: F.instance_norm(x, m, v, use_input_stats=False), rand(3, 2, 5),
         rand(2), rand(2).abs() + 0.5, const=("m", "v")),
]
CASES = CASES + NORMS
