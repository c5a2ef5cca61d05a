"""Convolutions and transposed convolutions, 1-, 2- and 3-d, with stride, padding (ints, tuples,
``'same'``, ``'valid'``), dilation, output_padding and groups.

Lead axes of ``g`` are folded into the batch axis for ``x̄``, and stacked as extra output
channels inside each group for ``W̄`` (one ``convolution_backward`` call serves all of them).
Per-sample weight terms are declared as contractions (:mod:`fxcurv.rules.contraction`) of
``g`` with the unfolded input (im2col, exact sliding-window views), or of the unfolded ``g``
with the input for a transposed convolution.
"""
from __future__ import annotations

from typing import Any, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .contraction import Contraction
from .helpers import symmetric_gram
from .registry import AFFINE, Ctx, fresh, register


# -- runtime helpers (TorchScript-scriptable) -------------------------------------------
def numel(sizes: List[int]) -> int:
    """Product of ``sizes`` (1 for an empty list)."""
    total = 1
    for size in sizes:
        total *= size
    return total


def pad_spatial(t: Tensor, pads: List[int]) -> Tensor:
    """Zero-pad (negative: crop) the last ``len(pads) // 2`` axes of ``t`` by
    ``pads = [before_0, after_0, before_1, after_1, ...]``, first spatial axis first; no
    copy when all are 0."""
    if all([p == 0 for p in pads]):
        return t
    reversed_pads: List[int] = []
    for i in range(len(pads) // 2 - 1, -1, -1):
        reversed_pads.append(pads[2 * i])
        reversed_pads.append(pads[2 * i + 1])
    return F.pad(t, reversed_pads)


def same_pads(weight: Tensor, dilation: List[int]) -> List[int]:
    """``padding='same'``: ``d·(k - 1)`` zeros per axis, the odd one after (as torch pads)."""
    pads: List[int] = []
    for i in range(len(dilation)):
        total = dilation[i] * (weight.size(2 + i) - 1)
        pads.append(total // 2)
        pads.append(total - total // 2)
    return pads


@fresh
def conv_input_vjp(g: Tensor, x: Tensor, weight: Tensor, lead: int, stride: List[int],
                   pads: List[int], dilation: List[int], groups: int) -> Tensor:
    """``x̄ = convᵀ(g, W)`` without padding, then cropped by the input's padding and
    zero-extended over input entries that no window reaches; lead axes join the batch."""
    d = len(stride)
    if groups > 1 and groups == x.size(1):
        return depthwise_input_vjp(g.flatten(0, lead), x, weight, stride, pads,
                                   dilation).reshape(list(g.shape[:lead]) + list(x.shape))
    full = torch.convolution(g.flatten(0, lead), weight, None, stride, [0] * d, dilation, True,
                             [0] * d, groups)
    crop: List[int] = []
    for i in range(d):
        crop.append(-pads[2 * i])
        crop.append(x.size(2 + i) + pads[2 * i] - full.size(2 + i))
    return pad_spatial(full, crop).reshape(list(g.shape[:lead]) + list(x.shape))


def conv_input_tangent(t: Tensor, weight: Tensor, lead: int, stride: List[int],
                       pads: List[int], dilation: List[int], groups: int) -> Tensor:
    """``J_x t = conv(t, W)`` (no bias): ``[*lead, N, Cin, *in] -> [*lead, N, Cout, *out]``,
    the lead axes joining the batch."""
    d = len(stride)
    y = torch.convolution(pad_spatial(t.flatten(0, lead), pads), weight, None, stride, [0] * d,
                          dilation, False, [0] * d, groups)
    return y.reshape(list(t.shape[:lead + 1]) + list(y.shape[1:]))


def conv_weight_tangent(x: Tensor, vectors: Tensor, stride: List[int], pads: List[int],
                        dilation: List[int], groups: int) -> Tensor:
    """``J_W V = conv(x, V_v)`` for each vector ``V_v`` ``[Cout, Cin/G, *k]`` as one
    convolution with the vectors' output channels side by side within each group:
    ``[V, N, Cout, *out]``."""
    d, count = len(stride), vectors.size(0)
    per_group = vectors.size(1) // groups
    stacked = vectors.reshape([count, groups, per_group] + list(vectors.shape[2:]))
    stacked = stacked.transpose(0, 1).reshape([groups * count * per_group]
                                              + list(vectors.shape[2:]))
    y = torch.convolution(pad_spatial(x, pads), stacked, None, stride, [0] * d, dilation,
                          False, [0] * d, groups)                 # [N, G·V·Cout/G, *out]
    y = y.reshape([x.size(0), groups, count, per_group] + list(y.shape[2:]))
    return y.transpose(1, 2).flatten(2, 3).transpose(0, 1)


def channel_bias_tangent(vectors: Tensor, out: Tensor) -> Tensor:
    """``J_b v``: each vector ``[C]`` at every sample and position of ``out`` ``[N, C, *s]``,
    ``[V, *out.shape]``."""
    shape = [vectors.size(0), 1, vectors.size(1)] + [1] * (out.dim() - 2)
    return vectors.reshape(shape).expand([vectors.size(0)] + list(out.shape))


def depthwise_input_vjp(g: Tensor, x: Tensor, weight: Tensor, stride: List[int],
                        pads: List[int], dilation: List[int]) -> Tensor:
    """:func:`conv_input_vjp` of a depthwise convolution (one input channel per group, ``m``
    output channels each), ``g: [B, C·m, *out] -> [B, C, *in]``, as one strided add per
    kernel tap ``a``: ``x̄[c, o·s + a·d - p] += Σ_j g[c·m + j, o] W[c·m + j, 0, a]`` over the
    positions ``o`` whose input lies inside ``x`` (torch's depthwise transposed convolution is
    a slow loop on CPU: one tap at a time is a few elementwise passes)."""
    d = len(stride)
    kernel: List[int] = list(weight.shape[2:])
    out: List[int] = list(g.shape[2:])
    channels = x.size(1)
    grad = g.new_zeros([g.size(0), channels] + list(x.shape[2:]))
    taps = weight.reshape(weight.size(0), -1)
    for tap in range(numel(kernel)):
        target, source, rest, empty = grad, g, tap, False
        for i in range(d - 1, -1, -1):
            shift = (rest % kernel[i]) * dilation[i] - pads[2 * i]
            rest = rest // kernel[i]
            first = max(0, -((shift) // stride[i]))  # first o with o·s + shift >= 0
            last = min(out[i] - 1, (x.size(2 + i) - 1 - shift) // stride[i])
            if last < first:
                empty = True
                break
            start = first * stride[i] + shift
            target = torch.ops.aten.slice(target, 2 + i, start,
                                          start + (last - first) * stride[i] + 1, stride[i])
            source = torch.ops.aten.slice(source, 2 + i, first, last + 1, 1)
        if not empty:
            term = source * taps[:, tap].reshape([-1] + [1] * d)
            if term.size(1) != channels:
                term = term.reshape([term.size(0), channels, -1] + list(term.shape[2:])).sum(2)
            target.add_(term)
    return grad


@fresh
def conv_transpose_input_vjp(g: Tensor, x: Tensor, weight: Tensor, lead: int,
                             stride: List[int], padding: List[int], dilation: List[int],
                             groups: int) -> Tensor:
    """``x̄ = conv(g, W)``, cropped to ``x`` (an output_padding ≥ stride adds windows past it)."""
    d = len(stride)
    y = torch.convolution(g.flatten(0, lead), weight, None, stride, padding, dilation, False,
                          [0] * d, groups)
    crop: List[int] = []
    for i in range(d):
        crop.append(0)
        crop.append(x.size(2 + i) - y.size(2 + i))
    return pad_spatial(y, crop).reshape(list(g.shape[:lead]) + list(x.shape))


def stack_lead_channels(g: Tensor, lead: int, groups: int) -> Tensor:
    """``[*lead, N, C, *out] -> [N, G·L·C/G, *out]``: the ``L`` lead vectors as extra output
    channels inside each of the ``G`` groups (channel order ``(group, lead, channel)``)."""
    head: List[int] = list(g.shape[:lead])
    rest: List[int] = list(g.shape[lead:])
    spatial: List[int] = rest[2:]
    stacked = g.reshape([numel(head), rest[0], groups, rest[1] // groups] + spatial)
    return stacked.movedim(0, 2).reshape([rest[0], -1] + spatial)


def conv_weight_vjp(g: Tensor, x: Tensor, weight: Tensor, lead: int, stride: List[int],
                    pads: List[int], dilation: List[int], groups: int, transposed: bool,
                    output_padding: List[int]) -> Tensor:
    """``W̄ = Σ_n ∂⟨g_n, conv(x_n, W)⟩/∂W`` for every lead vector of ``g``, ``[*lead, *W]``:
    the lead vectors are stacked as output channels of a larger weight (see above)."""
    head: List[int] = list(g.shape[:lead])
    stacked_lead = numel(head)
    x, padding = symmetric_padding(x, pads)
    shape: List[int] = list(weight.shape)
    if transposed:  # [Cin, Cout/G, *k] -> [Cin, L·Cout/G, *k]
        split = [shape[0], stacked_lead, shape[1]] + shape[2:]
        stacked_shape = [shape[0], stacked_lead * shape[1]] + shape[2:]
    else:  # [Cout, Cin/G, *k] -> [G·L·Cout/G, Cin/G, *k]
        split = [groups, stacked_lead, shape[0] // groups] + shape[1:]
        stacked_shape = [stacked_lead * shape[0]] + shape[1:]
    shape_only = weight if stacked_lead == 1 else weight.new_zeros(stacked_shape)
    _, stacked, _ = torch.ops.aten.convolution_backward(
        stack_lead_channels(g, lead, groups), x, shape_only, None, stride, padding, dilation,
        transposed, output_padding, groups, [False, True, False])
    return stacked.reshape(split).movedim(1, 0).reshape(head + shape)


@fresh
def conv_grads(g: Tensor, x: Tensor, weight: Tensor, stride: List[int], pads: List[int],
               dilation: List[int], groups: int, transposed: bool, output_padding: List[int],
               output_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    """``(x̄, W̄, b̄)`` of a gradient (lead 0) in one ``convolution_backward`` call, as autograd
    computes them; ``output_mask`` says which are wanted (the others are undefined). The input,
    weight and bias rules emit the same call, merged into one node by the cleanup pass, which
    also drops the unused outputs from the mask (``prune_output_masks``). Without ``W̄``,
    ``b̄ = Σ_{n,p} g`` is summed here: the CPU (oneDNN) kernel computes ``W̄`` whenever
    ``b̄`` is asked of it (e.g. when ``W̄`` comes from the per-sample terms)."""
    padded, padding = symmetric_padding(x, pads)
    bias_alone = output_mask[2] and not output_mask[1]
    unused = g.new_empty([0])  # (stands in for the outputs not asked for)
    x_bar, w_bar, b_bar = unused, unused, unused
    if output_mask[0] or output_mask[1]:
        x_bar, w_bar, b_bar = torch.ops.aten.convolution_backward(
            g, padded, weight, [g.size(1)], stride, padding, dilation, transposed,
            output_padding, groups, [output_mask[0], output_mask[1], output_mask[2] and
                                     not bias_alone])
    if bias_alone:
        b_bar = g.sum([0] + list(range(2, g.dim())))
    if output_mask[0] and padded.shape != x.shape:  # crop the explicit (asymmetric) padding
        x_bar = pad_spatial(x_bar, [-p for p in pads])
    return x_bar, w_bar, b_bar


def conv_vectors_jvp(x: Tensor, vectors: Tensor, stride: List[int], pads: List[int],
                     dilation: List[int], groups: int, transposed: bool,
                     output_padding: List[int]) -> Tensor:
    """``u_v = J_W V_v``: the layer's map applied to ``x`` with each weight-shaped vector
    ``V_v`` as the weight (no bias), ``[V, N, Cout, *out]``. One convolution: the vectors are
    stacked as output channels inside each group (``(group, vector, channel)`` order)."""
    count = vectors.size(0)
    kernel: List[int] = list(vectors.shape[3:])
    if transposed:  # [V, Cin, Cout/G, *k] -> [Cin, V·Cout/G, *k]
        stacked = vectors.movedim(0, 1).reshape([vectors.size(1), -1] + kernel)
    else:  # [V, Cout, Cin/G, *k] -> [G·V·Cout/G, Cin/G, *k]
        split = [count, groups, vectors.size(1) // groups, vectors.size(2)] + kernel
        stacked = vectors.reshape(split).movedim(0, 1).reshape([-1, vectors.size(2)] + kernel)
    x, padding = symmetric_padding(x, pads)
    y = torch.convolution(x, stacked, None, stride, padding, dilation, transposed,
                          output_padding, groups)
    spatial: List[int] = list(y.shape[2:])
    y = y.reshape([y.size(0), groups, count, -1] + spatial).movedim(2, 0)
    return y.reshape([count, y.size(1), -1] + spatial)


def conv_weight_product(g: Tensor, x: Tensor, weight: Tensor, vectors: Tensor,
                        stride: List[int], pads: List[int], dilation: List[int], groups: int,
                        transposed: bool, output_padding: List[int]) -> Tensor:
    """``Σ_{k,n} q_kn ⟨q_kn, V_v⟩`` ``[V, *W]`` (``q_kn`` the per-sample weight terms of
    ``g[k, n]``, ``g`` ``[K, N, Cout, *out]``), never built: ``u = J V``
    (:func:`conv_vectors_jvp`), projections ``w_nkv = ⟨g_kn, u_vn⟩``, ``r_vn = Σ_k w_nkv
    g_kn``, then ``Jᵀ r`` with the vectors as the lead axis (:func:`conv_weight_vjp`): two
    convolution calls and two batched matmuls that read ``g`` in place, no unfolded input
    (about twice as fast as the contraction with ``U(x)`` on 3c3d's layers, CPU)."""
    u = conv_vectors_jvp(x, vectors, stride, pads, dilation, groups, transposed,
                         output_padding)
    by_sample = g.reshape([-1, u.size(1), u[0, 0].numel()]).transpose(0, 1)  # [N, K, C·P]
    projections = torch.matmul(by_sample, u.flatten(2).permute(1, 2, 0))      # [N, K, V]
    r = torch.matmul(projections.transpose(1, 2), by_sample)                  # [N, V, C·P]
    r = r.transpose(0, 1).reshape(u.shape)
    return conv_weight_vjp(r, x, weight, 1, stride, pads, dilation, groups, transposed,
                           output_padding)


def symmetric_padding(x: Tensor, pads: List[int]) -> Tuple[Tensor, List[int]]:
    """``x`` and the symmetric padding that torch's conv kernels take; an asymmetric one
    (``'same'`` with an even span) is applied to ``x`` explicitly."""
    padding: List[int] = []
    symmetric = True
    for i in range(len(pads) // 2):
        padding.append(pads[2 * i])
        symmetric = symmetric and pads[2 * i] == pads[2 * i + 1]
    if symmetric:
        return x, padding
    return pad_spatial(x, pads), [0] * len(padding)


def sliding_windows(x: Tensor, kernel: List[int], stride: List[int], pads: List[int],
                    dilation: List[int]) -> Tensor:
    """The padded input's windows as a view (no copy) ``[N, C, *out, *k]``."""
    windows = pad_spatial(x, pads)
    for i in range(len(kernel)):  # each unfold appends a window axis; keep every dilation-th
        span = dilation[i] * (kernel[i] - 1) + 1
        windows = windows.unfold(2 + i, span, stride[i]).unfold(-1, 1, dilation[i]).squeeze(-1)
    return windows


def unfold(x: Tensor, kernel: List[int], stride: List[int], pads: List[int],
           dilation: List[int]) -> Tensor:
    """im2col ``[N, C, *in] -> [N, C, K, *out]``: entry ``(c, k, p)`` is the padded input that
    kernel offset ``k`` meets at output position ``p`` (sliding-window views, exact)."""
    d = len(kernel)
    windows = sliding_windows(x, kernel, stride, pads, dilation)
    order = [0, 1] + list(range(2 + d, 2 + 2 * d)) + list(range(2, 2 + d))
    out: List[int] = list(windows.shape[2:2 + d])
    return windows.permute(order).reshape([x.size(0), x.size(1), numel(kernel)] + out)


def channel_groups(t: Tensor, lead: int, groups: int) -> Tensor:
    """``[*lead, N, C, *spatial] -> [*lead, N, G, C/G, P]`` (positions flattened)."""
    head: List[int] = list(t.shape[:lead + 1])
    return t.reshape(head + [groups, t.size(lead + 1) // groups, -1])


def conv_patches(x: Tensor, weight: Tensor, stride: List[int], pads: List[int],
                 dilation: List[int], groups: int) -> Tensor:
    """``U(x)`` by group, ``[N, G, Cin/G·K, P]``."""
    cols = unfold(x, list(weight.shape[2:]), stride, pads, dilation)
    return cols.reshape([x.size(0), groups, -1, numel(list(cols.shape[3:]))])


def conv_transpose_patches(g: Tensor, x: Tensor, weight: Tensor, lead: int, stride: List[int],
                           padding: List[int], dilation: List[int],
                           groups: int) -> Tuple[Tensor, Tensor]:
    """``U(g)`` by group ``[*lead, N, G, Cout/G·K, P]`` and ``x`` by group ``[N, G, Cin/G, P]``,
    ``x`` zero-extended to the windows of ``U(g)`` (an output_padding ≥ stride adds some)."""
    pads: List[int] = []
    for p in padding:
        pads.append(p)
        pads.append(p)
    cols = unfold(g.flatten(0, lead), list(weight.shape[2:]), stride, pads, dilation)
    extend: List[int] = []
    for i in range(len(stride)):
        extend.append(0)
        extend.append(cols.size(3 + i) - x.size(2 + i))
    inputs = channel_groups(pad_spatial(x, extend), 0, groups)
    head: List[int] = list(g.shape[:lead + 1])
    return cols.reshape(head + [groups, -1, inputs.size(-1)]), inputs


def conv_output_gram(g: Tensor, lead: int, groups: int) -> Tensor:
    """``G = Σ_{lead,n} b bᵀ`` with ``b = Σ_p g[..., :, p]`` (the factor summed over output
    positions: the bias's GGN), ``g: [*lead, N, Cout, *out]``; ``[Cout, Cout]``, or for
    ``groups > 1`` the diagonal blocks ``[G, Cout/G, Cout/G]``."""
    b = g.flatten(lead + 2).sum(-1)                           # [*lead, N, Cout]
    b = b.reshape([-1, groups, b.size(-1) // groups])         # [lead·N, G, Cout/G]
    gram = torch.einsum("mgi,mgj->gij", b, b)
    return gram[0] if groups == 1 else gram


def conv_matrix_gram(matrix: Tensor, out: Tensor, groups: int) -> Tensor:
    """:func:`conv_output_gram` from the dense output curvature ``M = Σ s sᵀ`` of one sample's
    ``[Cout, *out]`` (``out`` the layer's output): ``G = Σ_{p,q} M[(:, p), (:, q)]``."""
    channels = out.size(1)
    positions = matrix.size(0) // channels
    gram = matrix.reshape(channels, positions, channels, positions).sum([1, 3])
    if groups == 1:
        return gram
    size = channels // groups
    return gram.reshape(groups, size, groups, size).diagonal(0, 0, 2).permute(2, 0, 1)


def group_gram(cols: Tensor, samples: int) -> Tensor:
    """``cols cols ᵀ / N`` per group, ``cols: [G, A, M]`` (``M`` sample·position columns) ->
    ``[A, A]`` for one group, else ``[G, A, A]``."""
    gram = symmetric_gram(cols).div_(samples)
    return gram[0] if cols.size(0) == 1 else gram


def conv_input_gram(patches: Tensor, groups: int) -> Tensor:
    """``A = Σ_n U_n U_nᵀ / N`` over all positions, ``patches = U: [N, G, Cin/G·K, P]``;
    ``[Cin·K, Cin·K]``, or for ``groups > 1`` the diagonal blocks ``[G, Cin/G·K, Cin/G·K]``."""
    cols = patches.permute(1, 2, 0, 3).reshape(groups, patches.size(2), -1)
    return group_gram(cols, patches.size(0))


def conv_input_factor(x: Tensor, weight: Tensor, stride: List[int], pads: List[int],
                      dilation: List[int], groups: int) -> Tensor:
    """:func:`conv_input_gram` of :func:`conv_patches`, with the windows copied once, straight
    into the ``[G, Cin/G·K, N·P]`` layout of the product."""
    kernel: List[int] = list(weight.shape[2:])
    d = len(kernel)
    windows = sliding_windows(x, kernel, stride, pads, dilation)    # [N, C, *out, *k]
    order = [1] + list(range(2 + d, 2 + 2 * d)) + [0] + list(range(2, 2 + d))
    cols = windows.permute(order).reshape(groups, x.size(1) // groups * numel(kernel), -1)
    return group_gram(cols, x.size(0))


def conv_transpose_unfold(x: Tensor, weight: Tensor, stride: List[int], padding: List[int],
                          dilation: List[int], output_padding: List[int],
                          groups: int) -> Tensor:
    """Transposed im2col by group ``[N, G, Cin/G·K, P]``: entry ``(c, k, p)`` is the input
    ``x[n, c, i]`` that kernel offset ``k`` carries to output position ``p = s·i - pad + d·k``
    (0 if none), so ``y[n, o, p] = Σ_{c,k} W[c, o, k] U[n, c, k, p]`` within each group. A
    transposed convolution with a one-hot kernel ``[Cin, Cin·K, *k]`` builds it exactly."""
    channels = x.size(1)
    kernel: List[int] = list(weight.shape[2:])
    size = channels * numel(kernel)
    one_hot = torch.eye(size, dtype=x.dtype, device=x.device)
    one_hot = one_hot.reshape([channels, numel(kernel), size]).transpose(1, 2)
    cols = torch.convolution(x, one_hot.reshape([channels, size] + kernel), None, stride,
                             padding, dilation, True, output_padding, 1)
    return cols.reshape([x.size(0), groups, size // groups, -1])


# -- rules -------------------------------------------------------------------------------
SPATIAL_DIMS = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3,
                torch.conv_transpose1d: 1, torch.conv_transpose2d: 2, torch.conv_transpose3d: 3}


def ints(value: Any, d: int) -> list:
    """An int or a sequence of ints (one for all axes, or one per axis) -> ``d`` ints."""
    if isinstance(value, int):
        return [value] * d
    values = list(value)
    return values * d if len(values) == 1 else values


class Setting:
    """A call's static stride, dilation, groups, output_padding and padding, ``d`` ints each;
    ``pads``: ``[before, after]`` per axis, a runtime helper call for ``'same'`` (it depends on
    the kernel size; ``padding`` is None then)."""

    def __init__(self, c: Ctx):
        b, d = c.bound, SPATIAL_DIMS[c.node.target]
        self.stride = ints(b["stride"], d)
        self.dilation = ints(b["dilation"], d)
        self.groups = b["groups"]
        self.output_padding = ints(b.get("output_padding", 0), d)
        if b["padding"] == "same":
            self.padding = None
            self.pads = c.call(same_pads, c.args.weight, self.dilation)
        else:
            self.padding = [0] * d if b["padding"] == "valid" else ints(b["padding"], d)
            self.pads = [p for p in self.padding for _ in range(2)]


def _gradients(g, c: Ctx, transposed: bool):
    """The shared ``conv_grads`` call of a gradient (lead 0): ``(x̄, W̄, b̄)``."""
    s = Setting(c)
    return c.call(conv_grads, g, c.args.input, c.args.weight, s.stride, s.pads, s.dilation,
                  s.groups, transposed, s.output_padding, output_mask=[True, True, True])


def _gradient_of(arg: int, transposed: bool, vjp):
    """The vjp rule ``vjp`` for lead > 0; output ``arg`` of the shared call for a gradient."""
    return lambda g, c: _gradients(g, c, transposed)[arg] if c.lead == 0 else vjp(g, c)


def _conv_input(g, c: Ctx):
    s = Setting(c)
    return c.call(conv_input_vjp, g, c.args.input, c.args.weight, c.lead, s.stride, s.pads,
                  s.dilation, s.groups)


def _conv_weight(g, c: Ctx):
    s = Setting(c)
    return c.call(conv_weight_vjp, g, c.args.input, c.args.weight, c.lead, s.stride, s.pads,
                  s.dilation, s.groups, False, [0] * len(s.stride))


def _conv_patches(c: Ctx):
    s = Setting(c)
    return c.call(conv_patches, c.args.input, c.args.weight, s.stride, s.pads, s.dilation,
                  s.groups)


def _conv_jvp() -> dict:
    """Forward tangents of a convolution (block products, ``passes/curvature/products.py``)."""
    def input_tangent(t, c: Ctx):
        s = Setting(c)
        return c.call(conv_input_tangent, t, c.args.weight, c.lead, s.stride, s.pads,
                      s.dilation, s.groups)

    def weight_tangent(vectors, c: Ctx):
        s = Setting(c)
        return c.call(conv_weight_tangent, c.args.input, vectors, s.stride, s.pads, s.dilation,
                      s.groups)

    return {"input": input_tangent, "weight": weight_tangent,
            "bias": lambda v, c: c.call(channel_bias_tangent, v, c.out)}


def _transpose_input(g, c: Ctx):
    s = Setting(c)
    return c.call(conv_transpose_input_vjp, g, c.args.input, c.args.weight, c.lead, s.stride,
                  s.padding, s.dilation, s.groups)


def _transpose_weight(g, c: Ctx):
    s = Setting(c)
    return c.call(conv_weight_vjp, g, c.args.input, c.args.weight, c.lead, s.stride, s.pads,
                  s.dilation, s.groups, True, s.output_padding)


def _transpose_patches(g, c: Ctx, lead: int):
    s = Setting(c)
    return c.call(conv_transpose_patches, g, c.args.input, c.args.weight, lead, s.stride,
                  s.padding, s.dilation, s.groups)


def _conv_contraction(g, c: Ctx) -> Contraction:
    """``W̄_n = Σ_p g_p U(x)_pᵀ`` per group: ``g`` and the unfolded input by group."""
    grads = c.call(channel_groups, g, c.lead, c.bound["groups"])
    return Contraction(grads, _conv_patches(c), c.args.weight, last=True,
                       product=_weight_product(g, c, False))


def _transpose_contraction(g, c: Ctx) -> Contraction:
    """``W̄_n = Σ_p x_p U(g)_pᵀ`` per group, transposed to ``[Cin, Cout/G, *k]``."""
    patches = _transpose_patches(g, c, c.lead)
    return Contraction(patches[0], patches[1], c.args.weight, swap=True, last=True,
                       product=_weight_product(g, c, True))


def _weight_product(g, c: Ctx, transposed: bool):
    """The contraction's ``product``: :func:`conv_weight_product` (lead 1 only)."""
    if c.lead != 1:
        return None
    s = Setting(c)
    output_padding = s.output_padding if transposed else [0] * len(s.stride)
    return lambda vectors: c.call(conv_weight_product, g, c.args.input, c.args.weight,
                                  vectors, s.stride, s.pads, s.dilation, s.groups, transposed,
                                  output_padding)


def _bias_batch(g, c: Ctx):
    """``b̄_n = Σ_p g[n, :, p]`` ``[*lead, N, C]``."""
    return g.flatten(c.lead + 2).sum(-1)


# Kronecker factors (KFAC / KFLR). groups == 1: BackPACK's ``[G, A]`` (2-D matrices).
# groups > 1 (BackPACK raises): block-diagonal per group, ``G: [groups, Cout/G, Cout/G]`` and
# ``A: [groups, Cin/G·K, Cin/G·K]``; weight block j (output channels of group j for conv,
# ``W[j·Cin/G:(j+1)·Cin/G].transpose(0, 1)`` for conv_transpose) ≈ ``G[j] ⊗ A[j]``; the
# bias gets ``[G]`` with the full ``[Cout, Cout]`` matrix, as with groups == 1.
def _conv_input_factor(c: Ctx):
    s = Setting(c)
    return c.call(conv_input_factor, c.args.input, c.args.weight, s.stride, s.pads, s.dilation,
                  s.groups)


def _transpose_input_factor(c: Ctx):
    s = Setting(c)
    patches = c.call(conv_transpose_unfold, c.args.input, c.args.weight, s.stride, s.padding,
                     s.dilation, s.output_padding, s.groups)
    return c.call(conv_input_gram, patches, s.groups)


def _kron_weight(input_factor):
    """``kron`` of a weight: ``G`` from the factor at the output, ``A = input_factor(c)``."""
    return lambda g, c: [c.call(conv_output_gram, g, c.lead, c.bound["groups"]),
                         input_factor(c)]


def _kron_matrix_weight(input_factor):
    """``kron_matrix`` of a weight: ``G`` from the dense matrix at the output."""
    return lambda m, c: [c.call(conv_matrix_gram, m, c.out, c.bound["groups"]),
                         input_factor(c)]


def _kron_bias(g, c: Ctx):
    return [c.call(conv_output_gram, g, c.lead, 1)]


def _kron_matrix_bias(m, c: Ctx):
    return [c.call(conv_matrix_gram, m, c.out, 1)]


KRON_DOC = (" Kronecker factors (kfac/kflr, BackPACK's convention): weight [G, A] with "
            "G = Σ_{c,n} b bᵀ, b = Σ_p s[c,n,:,p] (the factor at the output summed over "
            "positions), A = Σ_n U_n U_nᵀ / N, U_n: [Cin·K, P] the unfolded input; bias [G]. "
            "groups > 1: block-diagonal per group, G: [groups, Cout/G, Cout/G], "
            "A: [groups, Cin/G·K, Cin/G·K], weight block j ≈ G[j] ⊗ A[j]. KFRA: "
            "G = Σ_{p,q} M[(:,p),(:,q)] from the dense output curvature M; its sandwich "
            "Jᵀ M J is shared by all samples (x̄ applied to M's rows and columns).")


def _fields(transposed: bool, input_map, weight_map, contraction, input_factor) -> dict:
    """The rule fields of a convolution or its transpose, from its input and weight maps,
    its weight's contraction form and its Kronecker input factor."""
    return dict(
        vjp={"input": _gradient_of(0, transposed, input_map),
             "weight": _gradient_of(1, transposed, weight_map),
             "bias": _gradient_of(2, transposed, lambda g, c: _bias_batch(g, c).sum(c.lead))},
        contraction={"weight": contraction}, batch_grad={"bias": _bias_batch},
        kron={"weight": _kron_weight(input_factor), "bias": _kron_bias},
        kron_matrix={"weight": _kron_matrix_weight(input_factor), "bias": _kron_matrix_bias},
        sandwich={"input": "shared"}, hessian_is_zero=True, bilinear=(("input", "weight"),))


_RULES = {
    "conv": dict(
        doc="y[n,o,p] = b[o] + Σ_{c,k} W[o,c,k] x̃[n, G(o)·Cin/G + c, s·p + d·k] (x̃: x "
            "zero-padded, G(o) the group of o);  x: [N, Cin, *in], W: [Cout, Cin/G, *k], "
            "b: [Cout], y: [N, Cout, *out]. With U(x): [N, Cin, K, *out] the unfolded input: "
            "x̄ = conv_transpose(g, W) cropped to x;  W̄[o,c,k] = Σ_{n,p} g[n,o,p] U(x)[n,c,k,p] "
            "within each group (per sample: Σ_p only);  b̄ = Σ_{n,p} g[n,:,p]." + KRON_DOC,
        params="input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1",
        diagonal_squares={"weight": "form", "bias": "unit"}, jvp=_conv_jvp(),
        **_fields(False, _conv_input, _conv_weight, _conv_contraction, _conv_input_factor)),
    "conv_transpose": dict(
        doc="y = convᵀ(x, W) + b, the adjoint of conv's input map: ⟨g, convᵀ(x, W)⟩ = "
            "⟨conv(g, W), x⟩;  x: [N, Cin, *in], W: [Cin, Cout/G, *k], b: [Cout], "
            "y: [N, Cout, *out]. x̄ = conv(g, W) (same stride, padding, dilation, groups), "
            "cropped to x;  W̄[c,o,k] = Σ_{n,p} x[n,c,p] U(g)[n,o,k,p] within each group "
            "(per sample: Σ_p only);  b̄ = Σ_{n,p} g[n,:,p]." + KRON_DOC + " As BackPACK, the "
            "weight factors are those of W.transpose(0, 1) ([Cout, Cin, *k] for groups = 1; "
            "block j is W[j·Cin/G:(j+1)·Cin/G].transpose(0, 1)), with U the transposed "
            "unfold: y[n,o,p] = Σ_{c,k} W[c,o,k] U[n,c,k,p].",
        params="input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, "
               "dilation=1",
        **_fields(True, _transpose_input, _transpose_weight, _transpose_contraction,
                  _transpose_input_factor)),
}

for _target, _d in SPATIAL_DIMS.items():
    _family = "conv_transpose" if "transpose" in _target.__name__ else "conv"
    register([_target], f"{_family}{_d}d", **_RULES[_family])


# -- unfold / fold (im2col and its adjoint) ----------------------------------------------------
def unfold_vjp(g: Tensor, input_shape: List[int], lead: int, kernel: List[int],
               dilation: List[int], padding: List[int], stride: List[int]) -> Tensor:
    """Jᵀ of ``unfold`` (``[N, C, H, W] -> [N, C·kh·kw, L]``): ``fold`` of ``g``, each patch
    entry added back where it was read; lead axes join the batch axis."""
    grads = g.reshape([-1] + list(g.shape[g.dim() - 2:]))
    spatial: List[int] = list(input_shape[len(input_shape) - 2:])
    back = F.fold(grads, spatial, kernel, dilation, padding, stride)
    return back.reshape(list(g.shape[:lead]) + list(input_shape))


def fold_vjp(g: Tensor, input_shape: List[int], lead: int, kernel: List[int],
             dilation: List[int], padding: List[int], stride: List[int]) -> Tensor:
    """Jᵀ of ``fold`` (``[N, C·kh·kw, L] -> [N, C, H, W]``): ``unfold`` of ``g``."""
    grads = g.reshape([-1] + list(g.shape[g.dim() - 3:]))
    back = F.unfold(grads, kernel, dilation, padding, stride)
    return back.reshape(list(g.shape[:lead]) + list(input_shape))


def _patches(c: Ctx) -> list:
    b = c.bound
    return [ints(b[k], 2) for k in ("kernel_size", "dilation", "padding", "stride")]


register([F.unfold], "unfold", "input, kernel_size, dilation=1, padding=0, stride=1",
         traits=(AFFINE,),
         doc="y[n, (c, i, j), l] = x[n, c, patch l at (i, j)] (im2col);  Jᵀg = fold(g) "
             "(entries of overlapping patches add up);  linear.",
         vjp={"input": lambda g, c: c.call(unfold_vjp, g, c.args.input.shape, c.lead,
                                           *_patches(c))})
register([F.fold], "fold",
         "input, output_size, kernel_size, dilation=1, padding=0, stride=1", traits=(AFFINE,),
         doc="y = Σ of the patches in x put back in place (col2im, the adjoint of unfold);  "
             "Jᵀg = unfold(g);  linear.",
         vjp={"input": lambda g, c: c.call(fold_vjp, g, c.args.input.shape, c.lead,
                                           *_patches(c))})
