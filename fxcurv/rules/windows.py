"""Swin's shifted-window attention (``torchvision.models.swin_transformer``), lowered to ruled
ops. torchvision's function branches in Python on the padded feature size (no shift along an
axis no longer than a window), which fx cannot trace; here that choice and the region mask are
scriptable helpers of sizes (constants, no derivative), and the windows keep the sample axis
first (``[N, windows, heads, L, L]``) so per-sample quantities stay defined.

Math (per window of ``L`` positions, heads ``h``): ``A = softmax(q kᵀ/√d + B + M) v`` with the
relative-position bias ``B`` and the mask ``M`` (-100 between positions from different regions
of a shifted window, else 0); Swin V2: ``q kᵀ`` of unit rows times ``exp(min(τ, log 100))``.
"""
from __future__ import annotations

import math
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import node_error
from .registry import Ctx, register


def window_shifts(window: List[int], shift: List[int], height: int, width: int) -> List[int]:
    """The shift along each axis: none where the padded map is no longer than a window."""
    return [0 if window[0] >= height else shift[0], 0 if window[1] >= width else shift[1]]


def negated(values: List[int]) -> List[int]:
    return [-v for v in values]


def _regions(size: int, window: int, shift: int, device: torch.device) -> Tensor:
    """Region of each position along one axis after a cyclic shift: 0 before the last window,
    1 in the last window before the wrapped-around part, 2 in that part; 0 without shift."""
    pos = torch.arange(size, device=device)
    if shift == 0:
        return torch.zeros_like(pos)
    return (pos >= size - window).long() + (pos >= size - shift).long()


def window_mask(x: Tensor, window: List[int], shifts: List[int]) -> Tensor:
    """``[windows, 1, L, L]`` additive mask of the padded map ``x`` ``[N, H, W, C]``: -100
    between positions of one window that belong to different regions, 0 otherwise."""
    height, width = x.size(1), x.size(2)
    rows = _regions(height, window[0], shifts[0], x.device)
    cols = _regions(width, window[1], shifts[1], x.device)
    region = rows.unsqueeze(1) * 3 + cols.unsqueeze(0)
    region = region.view(height // window[0], window[0], width // window[1], window[1])
    region = region.permute(0, 2, 1, 3).reshape(-1, window[0] * window[1])
    differ = region.unsqueeze(1) != region.unsqueeze(2)
    mask = torch.zeros(differ.shape, dtype=x.dtype, device=x.device).masked_fill(differ, -100.0)
    return mask.unsqueeze(1)


register([window_shifts, negated, window_mask], "window_sizes", "*args", constant=True,
         doc="Shifts and masks of shifted windows: functions of sizes, no derivative.")


def _unit_rows(t):
    """``F.normalize(t, dim=-1)``: rows divided by ``max(‖row‖, 1e-12)``."""
    return t / torch.clamp(torch.sqrt(torch.sum(t.square(), -1, keepdim=True)), min=1e-12)


def _windows(x, window: list):
    """``[N, H, W, C]`` -> ``[N, windows, L, C]`` (row-major windows)."""
    n, height, width, channels = x.size(0), x.size(1), x.size(2), x.size(3)
    x = x.view(n, height // window[0], window[0], width // window[1], window[1], channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(n, -1, window[0] * window[1], channels)


def _scores(c: Ctx, q, k, channels):
    """``q kᵀ/√d`` (Swin V1) or unit-row ``q kᵀ`` times the clamped logit scale (V2)."""
    if c.bound["logit_scale"] is None:
        return (q * (channels // c.bound["num_heads"]) ** -0.5).matmul(k.transpose(-2, -1))
    scale = torch.exp(torch.clamp(c.args.logit_scale, max=math.log(100.0)))
    return _unit_rows(q).matmul(_unit_rows(k).transpose(-2, -1)) * scale


def _qkv_bias(c: Ctx):
    """Swin V2 uses no key bias: the middle third of ``qkv_bias`` is replaced by zeros."""
    bias = c.args.qkv_bias
    if bias is None or c.bound["logit_scale"] is None:
        return bias
    third = bias.numel() // 3
    return torch.cat([bias[:third], bias[third:2 * third] * 0.0, bias[2 * third:]])


def _lower_shifted_window_attention(c: Ctx):
    """Pad to whole windows, shift, attend within windows, shift back, crop (as torchvision)."""
    if c.bound["training"] and (c.bound["attention_dropout"] > 0 or c.bound["dropout"] > 0):
        raise node_error(c.node, "shifted_window_attention with dropout in train mode has no "
                         "lowering", "Use eval mode or attention_dropout = dropout = 0.")
    window, heads, x = list(c.bound["window_size"]), c.bound["num_heads"], c.args.input
    n, height, width, channels = x.size(0), x.size(1), x.size(2), x.size(3)
    pad_r = (window[1] - width % window[1]) % window[1]
    pad_b = (window[0] - height % window[0]) % window[0]
    x = F.pad(x, [0, 0, 0, pad_r, 0, pad_b])
    shifts = c.call(window_shifts, window, list(c.bound["shift_size"]), x.size(1), x.size(2))
    padded = torch.roll(x, c.call(negated, shifts), [1, 2])
    tokens = _windows(padded, window)                       # [N, nW, L, C]
    qkv = F.linear(tokens, c.args.qkv_weight, _qkv_bias(c))
    qkv = qkv.reshape(n, tokens.size(1), tokens.size(2), 3, heads, channels // heads)
    pieces = qkv.unbind(3)
    q, k, v = (pieces[i].transpose(2, 3) for i in range(3))         # [N, nW, h, L, d]
    scores = _scores(c, q, k, channels) + c.args.relative_position_bias \
        + c.call(window_mask, padded, window, shifts)
    out = torch.softmax(scores, -1).matmul(v).transpose(2, 3).reshape(
        n, tokens.size(1), tokens.size(2), channels)
    out = F.linear(out, c.args.proj_weight, c.args.proj_bias)
    out = out.view(n, x.size(1) // window[0], x.size(2) // window[1], window[0], window[1],
                   channels).permute(0, 1, 3, 2, 4, 5).reshape(n, x.size(1), x.size(2), channels)
    return torch.roll(out, shifts, [1, 2])[:, :height, :width, :]


try:
    from torchvision.models.swin_transformer import shifted_window_attention as _swin_attention
except ImportError:  # torchvision is optional
    _swin_attention = None
if _swin_attention is not None:
    register([_swin_attention], "shifted_window_attention",
             "input, qkv_weight, proj_weight, relative_position_bias, window_size, num_heads, "
             "shift_size, attention_dropout=0.0, dropout=0.0, qkv_bias=None, proj_bias=None, "
             "logit_scale=None, training=True",
             doc=__doc__.split("\n\n")[1], lower=_lower_shifted_window_attention)
