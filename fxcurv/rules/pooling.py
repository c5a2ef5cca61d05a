"""Pooling, 1-, 2- and 3-d: max, average and adaptive average; resampling (``F.interpolate``).

Every pool is linear in ``x`` given the windows, so ``Jᵀ`` spreads each output's cotangent
back over its window: ``max_pool`` routes ``g`` to the argmax of each window (the indices the
forward call returns, see ``max_pool_argmax``; overlapping windows add up), ``avg_pool`` /
``adaptive_avg_pool`` give every window entry ``g / divisor`` (torch's own pooling
backward kernels). ``x: [N, C, *in]`` (or ``[C, *in]``), ``y: [N, C, *out]``; lead axes of
``g`` are folded into the batch axis and restored.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .conv import ints, numel
from .registry import WINDOW_MAX, Ctx, affine, by_product, fresh, register


# -- runtime helpers (TorchScript-scriptable) -------------------------------------------
def max_pool_with_indices(x: Tensor, kernel: List[int], stride: List[int],
                          padding: List[int], dilation: List[int],
                          ceil_mode: bool) -> Tuple[Tensor, Tensor]:
    """The pooled values and each window's argmax as a flat index into the input's spatial
    axes, both ``[*batch, *out]``. A batched 2-d pool of 4 or more channels on the CPU runs
    in the channels-last layout (torch's CPU kernel for it vectorises over the channels:
    3-10x faster than the one for contiguous input, same values and argmax) and returns
    contiguous results."""
    d = len(kernel)
    if d == 1:
        return F.max_pool1d_with_indices(x, kernel, stride, padding, dilation, ceil_mode)
    if d == 2:
        if x.dim() == 4 and x.size(1) >= 4 and x.device.type == "cpu":
            pooled, argmax = F.max_pool2d_with_indices(
                x.contiguous(memory_format=torch.channels_last), kernel, stride, padding,
                dilation, ceil_mode)
            return pooled.contiguous(), argmax.contiguous()
        return F.max_pool2d_with_indices(x, kernel, stride, padding, dilation, ceil_mode)
    return F.max_pool3d_with_indices(x, kernel, stride, padding, dilation, ceil_mode)


@by_product(max_pool_with_indices, "indices")
def max_pool_argmax(pooled: Tensor, x: Tensor, kernel: List[int], stride: List[int],
                    padding: List[int], dilation: List[int], ceil_mode: bool) -> Tensor:
    """The argmax indices behind the forward's ``pooled = max_pool(x)``; the cleanup pass
    (``share_by_products``) makes that forward call return them, so they are not recomputed."""
    return max_pool_with_indices(x, kernel, stride, padding, dilation, ceil_mode)[1]


@fresh
def max_pool_vjp(g: Tensor, input_shape: List[int], argmax: Tensor, lead: int,
                 kernel: List[int], stride: List[int], padding: List[int], dilation: List[int],
                 ceil_mode: bool) -> Tensor:
    """``x̄[i] = Σ_{p: argmax(p) = i} g[p]`` (windows may overlap), ``[*lead, *input_shape]``:
    the forward's indices route ``g`` (:func:`routed_to_argmax`). Only the input's shape is
    read, so the (full-size) pool input need not live until the backward pass."""
    overlap = False
    for i in range(len(kernel)):
        overlap = overlap or stride[i] < dilation[i] * (kernel[i] - 1) + 1
    routed = routed_to_argmax(g, input_shape, argmax, lead, len(kernel), overlap)
    return routed.reshape(list(g.shape[:lead]) + list(input_shape))


def max_pool_tangent(t: Tensor, argmax: Tensor, lead: int, spatial: int) -> Tensor:
    """``J t``: each window's entry of ``t`` ``[*lead, (N,) C, *in]`` at the forward's argmax
    ``[(N,) C, *out]`` (indices into the ``spatial`` flattened last axes) ->
    ``[*lead, (N,) C, *out]``."""
    flat = t.flatten(t.dim() - spatial)
    index = argmax.flatten(argmax.dim() - spatial).expand(list(flat.shape[:-1]) + [-1])
    return flat.gather(-1, index).reshape(list(t.shape[:lead]) + list(argmax.shape))


def adaptive_max_pool_with_indices(x: Tensor,
                                   output_size: List[int]) -> Tuple[Tensor, Tensor]:
    """The adaptively pooled values and each window's argmax (a flat index into the input's
    spatial axes), ``[*batch, *output_size]`` both."""
    d = len(output_size)
    if d == 1:
        return torch.adaptive_max_pool1d(x, output_size)
    if d == 2:
        return torch.ops.aten.adaptive_max_pool2d(x, output_size)
    return torch.ops.aten.adaptive_max_pool3d(x, output_size)


@by_product(adaptive_max_pool_with_indices, "indices")
def adaptive_max_argmax(pooled: Tensor, x: Tensor, output_size: List[int]) -> Tensor:
    """The argmax indices behind the forward's ``pooled = adaptive_max_pool(x)`` (shared with
    the forward call by the cleanup pass, as :func:`max_pool_argmax`)."""
    return adaptive_max_pool_with_indices(x, output_size)[1]


@fresh
def adaptive_max_pool_vjp(g: Tensor, input_shape: List[int], argmax: Tensor, lead: int,
                          d: int) -> Tensor:
    """``x̄[i] = Σ_{p: argmax(p) = i} g[p]`` over ``d`` spatial axes; adaptive windows may
    overlap (an input may win several), so the routing adds up."""
    routed = routed_to_argmax(g, input_shape, argmax, lead, d, True)
    return routed.reshape(list(g.shape[:lead]) + list(input_shape))


def routed_to_argmax(g: Tensor, input_shape: List[int], argmax: Tensor, lead: int, d: int,
                     overlap: bool) -> Tensor:
    """:func:`max_pool_vjp` as ``[L, B, in]`` (``L`` lead vectors, spatial axes flattened):
    one scatter into zeros, the indices broadcast over the lead axes (a view, never copied
    per lead vector); ``scatter_add_`` where windows overlap (an input may win several)."""
    stacked_lead = numel(list(g.shape[:lead]))
    spatial_in = numel(list(input_shape[len(input_shape) - d:]))
    batch = numel(list(input_shape)) // spatial_in
    values = g.reshape([stacked_lead, batch, -1])
    index = argmax.reshape([1, batch, -1]).expand(values.shape)
    routed = torch.zeros([stacked_lead, batch, spatial_in], dtype=g.dtype, device=g.device)
    if overlap:
        return routed.scatter_add_(2, index, values)
    return routed.scatter_(2, index, values)


def max_pool_sandwich(matrix: Tensor, argmax: Tensor, x: Tensor, kernel: List[int],
                      stride: List[int], padding: List[int], dilation: List[int]) -> Tensor:
    """KFRA's ``(1/N) Σ_n P_nᵀ M P_n`` ``[D_in, D_in]``, ``P_n[p, i] = [argmax_n(p) = i]``
    (``x: [N, C, *in]``, ``argmax: [N, C, *out]``, ``M: [D_out, D_out]``). Windows that do
    not overlap: input ``i`` lies in one window ``w(i)``, so ``M_in = M[w, w] ⊙ (1/N) Σ_n
    s_n s_nᵀ`` with ``s_n`` the 0/1 mask of selected inputs (:func:`selected_moments`);
    otherwise summed sample by sample (:func:`routed_sample_by_sample`)."""
    if x.dim() == len(kernel) + 1:  # unbatched ``[C, *in]``: a sample is one channel
        x, argmax = x.unsqueeze(1), argmax.unsqueeze(1)
    samples, channels = x.size(0), x.size(1)
    pixels = x[0, 0].numel()
    offsets = torch.arange(channels, device=x.device).reshape(1, channels, 1) * pixels
    index = (argmax.reshape(samples, channels, -1) + offsets).reshape(samples, -1)
    overlap, tiled = False, True
    for i in range(len(kernel)):
        overlap = overlap or stride[i] < dilation[i] * (kernel[i] - 1) + 1
        tiled = tiled and stride[i] == kernel[i] and dilation[i] == 1 and padding[i] == 0 \
            and x.size(2 + i) == argmax.size(2 + i) * kernel[i]
    if overlap:
        return routed_sample_by_sample(matrix, index, channels * pixels)
    result = selected_moments(matrix, index, channels * pixels)
    if tiled:  # M[w, w] is M with every window axis broadcast: multiply through views
        split: List[int] = [channels]
        spread: List[int] = [channels]
        for i in range(len(kernel)):
            split += [argmax.size(2 + i), kernel[i]]
            spread += [argmax.size(2 + i), 1]
        result.view(split + split).mul_(matrix.reshape(spread + spread))
        return result
    window = torch.zeros(channels * pixels, dtype=index.dtype, device=x.device).scatter_(
        0, index.flatten(), torch.arange(index.size(1), device=x.device).repeat(samples))
    for start in range(0, result.size(0), 512):  # row blocks of M[w, w]
        rows = window[start:start + 512]
        result[start:start + 512].mul_(matrix.index_select(0, rows).index_select(1, window))
    return result


def selected_moments(like: Tensor, index: Tensor, d_in: int) -> Tensor:
    """``(1/N) Σ_n s_n s_nᵀ`` ``[D_in, D_in]``, ``s_n`` the 0/1 mask of the inputs that
    ``index[n]`` ``[N, D_out]`` selects (``like``'s dtype)."""
    selected = like.new_zeros(index.size(0), d_in).scatter_(1, index, 1.0)
    return torch.matmul(selected.t(), selected).div_(index.size(0))


def routed_sample_by_sample(matrix: Tensor, index: Tensor, d_in: int) -> Tensor:
    """``(1/N) Σ_n P_nᵀ M P_n`` for any windows: ``P_nᵀ M`` (rows added at ``index[n]``),
    then ``· P_n`` (columns added), one sample at a time (``[D_in, D_out]`` memory)."""
    result = matrix.new_zeros(d_in, d_in)
    routed = matrix.new_zeros(d_in, matrix.size(0))
    for n in range(index.size(0)):
        routed.zero_().index_add_(0, index[n], matrix)
        result.index_add_(1, index[n], routed)
    return result.div_(index.size(0))


def lead_as_batch(g: Tensor, x: Tensor, lead: int, d: int) -> Tuple[Tensor, Tensor]:
    """``g: [*lead, *batch, *out] -> [L, B, *out]`` and ``x: [*batch, *in]`` as an expanded
    (not copied) ``[L, B, *in]``: the 4-/5-d operands of torch's pooling backward kernels."""
    stacked_lead = numel(list(g.shape[:lead]))
    spatial: List[int] = list(x.shape[x.dim() - d:])
    batch = numel(list(x.shape[:x.dim() - d]))
    grads = g.reshape([stacked_lead, batch] + list(g.shape[g.dim() - d:]))
    inputs = x.reshape([1, batch] + spatial).expand([stacked_lead, batch] + spatial)
    return grads, inputs


@fresh
def avg_pool_vjp(g: Tensor, x: Tensor, lead: int, kernel: List[int], stride: List[int],
                 padding: List[int], ceil_mode: bool, count_include_pad: bool,
                 divisor_override: Optional[int]) -> Tensor:
    """``x̄[i] = Σ_{p ∋ i} g[p] / divisor(p)``; 1-d pools run as 2-d pools of height 1."""
    shape: List[int] = list(g.shape[:lead]) + list(x.shape)
    if len(kernel) == 1:
        g, x = g.unsqueeze(-2), x.unsqueeze(-2)
        kernel, stride, padding = [1] + kernel, [1] + stride, [0] + padding
    grads, inputs = lead_as_batch(g, x, lead, len(kernel))
    if len(kernel) == 2:
        grad = torch.ops.aten.avg_pool2d_backward(grads, inputs, kernel, stride, padding,
                                                  ceil_mode, count_include_pad, divisor_override)
    else:
        grad = torch.ops.aten.avg_pool3d_backward(grads, inputs, kernel, stride, padding,
                                                  ceil_mode, count_include_pad, divisor_override)
    return grad.reshape(shape)


@fresh
def adaptive_avg_pool_vjp(g: Tensor, x: Tensor, lead: int, d: int) -> Tensor:
    """``x̄[i] = Σ_{p ∋ i} g[p] / |window(p)|`` (windows from the input and output sizes)."""
    shape: List[int] = list(g.shape[:lead]) + list(x.shape)
    if d == 1:
        g, x, d = g.unsqueeze(-2), x.unsqueeze(-2), 2
    grads, inputs = lead_as_batch(g, x, lead, d)
    if d == 2:
        grad = torch.ops.aten._adaptive_avg_pool2d_backward(grads, inputs)
    else:
        grad = torch.ops.aten._adaptive_avg_pool3d_backward(grads, inputs)
    return grad.reshape(shape)


@fresh
def interpolate_vjp(g: Tensor, x: Tensor, out_shape: List[int], lead: int, mode: str,
                    align_corners: bool, scales: Optional[List[float]]) -> Tensor:
    """``x̄ = Rᵀ g`` for ``y = R x = interpolate(x)`` (``R`` fixed by the sizes, mode and scale
    factors): torch's upsample backward kernels with the forward's scales, ``area`` as the
    adaptive average pool it is; lead axes of ``g`` join the batch axis."""
    d = x.dim() - 2
    if mode == "area":
        return adaptive_avg_pool_vjp(g, x, lead, d)
    grads = g.flatten(0, lead)
    size: List[int] = [grads.size(0)] + list(x.shape[1:])
    out: List[int] = list(out_shape[2:])
    s: List[Optional[float]] = [None, None, None]
    if scales is not None:
        for i in range(d):
            s[i] = scales[i]
    if mode == "nearest":
        if d == 1:
            grad = torch.ops.aten.upsample_nearest1d_backward(grads, out, size, s[0])
        elif d == 2:
            grad = torch.ops.aten.upsample_nearest2d_backward(grads, out, size, s[0], s[1])
        else:
            grad = torch.ops.aten.upsample_nearest3d_backward(grads, out, size, s[0], s[1],
                                                              s[2])
    elif mode == "nearest-exact":
        if d == 1:
            grad = torch.ops.aten._upsample_nearest_exact1d_backward(grads, out, size, s[0])
        elif d == 2:
            grad = torch.ops.aten._upsample_nearest_exact2d_backward(grads, out, size, s[0],
                                                                     s[1])
        else:
            grad = torch.ops.aten._upsample_nearest_exact3d_backward(grads, out, size, s[0],
                                                                     s[1], s[2])
    elif mode == "linear":
        grad = torch.ops.aten.upsample_linear1d_backward(grads, out, size, align_corners, s[0])
    elif mode == "bilinear":
        grad = torch.ops.aten.upsample_bilinear2d_backward(grads, out, size, align_corners,
                                                           s[0], s[1])
    elif mode == "bicubic":
        grad = torch.ops.aten.upsample_bicubic2d_backward(grads, out, size, align_corners,
                                                          s[0], s[1])
    else:
        grad = torch.ops.aten.upsample_trilinear3d_backward(grads, out, size, align_corners,
                                                            s[0], s[1], s[2])
    return grad.reshape(list(g.shape[:lead]) + list(x.shape))


# -- rules -------------------------------------------------------------------------------
SPATIAL_DIMS = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3,
                F.max_pool1d_with_indices: 1, F.max_pool2d_with_indices: 2,
                F.max_pool3d_with_indices: 3,
                F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3,
                F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3}


def _window(c: Ctx) -> tuple[list, list, list]:
    """Static kernel, stride (default: the kernel) and padding of a pooling call, ``d`` each."""
    b, d = c.bound, SPATIAL_DIMS[c.node.target]
    kernel = ints(b["kernel_size"], d)
    stride = ints(b["stride"], d) if b["stride"] else kernel  # None or () mean the kernel
    return kernel, stride, ints(b["padding"], d)


def _max_pool_vjp(g, c: Ctx):
    kernel, stride, padding = _window(c)
    dilation, ceil_mode = ints(c.bound["dilation"], len(kernel)), c.bound["ceil_mode"]
    argmax = c.call(max_pool_argmax, c.out, c.args.input, kernel, stride, padding, dilation,
                    ceil_mode)
    return c.call(max_pool_vjp, g, c.args.input.shape, argmax, c.lead, kernel, stride, padding,
                  dilation, ceil_mode)


def _max_pool_jvp(t, c: Ctx):
    kernel, stride, padding = _window(c)
    dilation, ceil_mode = ints(c.bound["dilation"], len(kernel)), c.bound["ceil_mode"]
    argmax = c.call(max_pool_argmax, c.out, c.args.input, kernel, stride, padding, dilation,
                    ceil_mode)
    return c.call(max_pool_tangent, t, argmax, c.lead, len(kernel))


def _max_pool_sandwich(m, c: Ctx):
    kernel, stride, padding = _window(c)
    dilation = ints(c.bound["dilation"], len(kernel))
    argmax = c.call(max_pool_argmax, c.out, c.args.input, kernel, stride, padding, dilation,
                    c.bound["ceil_mode"])
    return c.call(max_pool_sandwich, m, argmax, c.args.input, kernel, stride, padding,
                  dilation)


def _avg_pool_vjp(g, c: Ctx):
    kernel, stride, padding = _window(c)
    return c.call(avg_pool_vjp, g, c.args.input, c.lead, kernel, stride, padding,
                  c.bound["ceil_mode"], c.bound["count_include_pad"],
                  c.bound.get("divisor_override"))


def _returns_indices(b: dict) -> Optional[str]:
    if b["return_indices"]:
        return ("max pooling with return_indices=True has no rule (its output is a tuple with "
                "integer indices); pool with return_indices=False, or recompute the indices "
                "outside the differentiated model")
    return None


def _size_none(b: dict) -> Optional[str]:
    sizes = b["output_size"] if isinstance(b["output_size"], (list, tuple)) else []
    if any(size is None for size in sizes):
        return ("adaptive pooling with None in output_size (keep that input size) cannot be "
                "compiled by TorchScript; give every output size explicitly")
    return None


_MAX_POOL = "input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, " \
            "return_indices=False"
_AVG_POOL = "input, kernel_size, stride=None, padding=0, ceil_mode=False, " \
            "count_include_pad=True"

for _d in (1, 2, 3):
    register([getattr(F, f"max_pool{_d}d"), getattr(F, f"max_pool{_d}d_with_indices")],
             f"max_pool{_d}d", _MAX_POOL, vjp={"input": _max_pool_vjp},
             jvp={"input": _max_pool_jvp}, hessian_is_zero=True,
             sandwich={"input": _max_pool_sandwich}, traits=(WINDOW_MAX,),
             unsupported=_returns_indices,
             doc="y[p] = max_{i ∈ window(p)} x[i];  x̄[i] = Σ_{p: argmax(p) = i} g[p] "
                 "(the forward's argmax indices; overlapping windows add up).")
    register([getattr(F, f"avg_pool{_d}d")], f"avg_pool{_d}d",
             _AVG_POOL + (", divisor_override=None" if _d > 1 else ""),
             vjp={"input": _avg_pool_vjp}, hessian_is_zero=True, sandwich={"input": "shared"},
             doc="y[p] = Σ_{i ∈ window(p)} x[i] / divisor(p) (the window size, clipped to the "
                 "input unless count_include_pad, or divisor_override);  "
                 "x̄[i] = Σ_{p ∋ i} g[p] / divisor(p).")
    register([getattr(F, f"adaptive_avg_pool{_d}d")], f"adaptive_avg_pool{_d}d",
             "input, output_size",
             vjp={"input": lambda g, c: c.call(adaptive_avg_pool_vjp, g, c.args.input, c.lead,
                                               SPATIAL_DIMS[c.node.target])},
             unsupported=_size_none, hessian_is_zero=True, sandwich={"input": "shared"},
             doc="y[p] = mean of x over window(p) = [⌊p·in/out⌋, ⌈(p+1)·in/out⌉) per axis;  "
                 "x̄[i] = Σ_{p ∋ i} g[p] / |window(p)|.")


def _adaptive_output_size(c: Ctx) -> list:
    return ints(c.bound["output_size"], SPATIAL_DIMS[c.node.target])


def _adaptive_max_argmax(c: Ctx):
    return c.call(adaptive_max_argmax, c.out, c.args.input, _adaptive_output_size(c))


for _d in (1, 2, 3):
    _adaptive_max = getattr(F, f"adaptive_max_pool{_d}d")
    SPATIAL_DIMS[_adaptive_max] = _d
    register([_adaptive_max], f"adaptive_max_pool{_d}d", "input, output_size, return_indices=False",
             vjp={"input": lambda g, c: c.call(
                 adaptive_max_pool_vjp, g, c.args.input.shape, _adaptive_max_argmax(c), c.lead,
                 SPATIAL_DIMS[c.node.target])},
             unsupported=lambda b: _returns_indices(b) or _size_none(b), hessian_is_zero=True,
             traits=(WINDOW_MAX,),
             doc="y[p] = max of x over window(p) = [⌊p·in/out⌋, ⌈(p+1)·in/out⌉) per axis;  "
                 "x̄[i] = Σ_{p: argmax(p) = i} g[p] (the forward's argmax indices; windows "
                 "may overlap).")


_RESAMPLE_MODES = ("nearest", "nearest-exact", "area", "linear", "bilinear", "bicubic",
                   "trilinear")


def _interpolate_scales(b: dict) -> Optional[list]:
    """The scale factors torch's kernels index with (None: from the sizes), three entries."""
    factor = b["scale_factor"]
    if b["size"] is not None or b["recompute_scale_factor"] or b["mode"] == "area" \
            or factor is None:
        return None
    if isinstance(factor, (list, tuple)):
        return [float(f) for f in factor]
    return [float(factor)] * 3


def _interpolate_unsupported(b: dict) -> Optional[str]:
    if b["mode"] not in _RESAMPLE_MODES:
        return f"interpolate mode {b['mode']!r} has no rule"
    if b["antialias"]:
        return "interpolate with antialias=True has no rule; resample with antialias=False"
    factor = b["scale_factor"]
    factors = factor if isinstance(factor, (list, tuple)) else [factor]
    if not all(f is None or isinstance(f, (int, float)) for f in factors):
        return "interpolate's scale_factor must be a number (or numbers) fixed at trace time"
    return None


def _float_scales(c: Ctx):
    """``interpolate(x, scale_factor=2)`` -> ``scale_factor=2.0`` (the same call; TorchScript's
    ``interpolate`` takes float scale factors only); None keeps calls without integer ones."""
    factor = c.bound["scale_factor"]
    factors = factor if isinstance(factor, (list, tuple)) else [factor]
    if not any(isinstance(f, int) and not isinstance(f, bool) for f in factors):
        return None
    floats = [float(f) for f in factors]
    bound = dict(c.bound, input=c.args.input,
                 scale_factor=floats if isinstance(factor, (list, tuple)) else floats[0])
    return c.call(F.interpolate, **bound)


def _interpolate_vjp(g, c: Ctx):
    b = c.bound
    return c.call(interpolate_vjp, g, c.args.input, c.out.shape, c.lead, b["mode"],
                  bool(b["align_corners"]), _interpolate_scales(b))


affine([F.interpolate], "interpolate",
       "input, size=None, scale_factor=None, mode='nearest', align_corners=None, "
       "recompute_scale_factor=None, antialias=False",
       vjp={"input": _interpolate_vjp}, unsupported=_interpolate_unsupported,
       sandwich={"input": "shared"}, lower=_float_scales,
       doc="y = R x, R the resampling matrix of the mode (nearest: each output copies one "
           "input; linear, bilinear, trilinear, bicubic: fixed weights of neighbours; area: "
           "adaptive average pooling) and sizes;  x̄ = Rᵀ g (torch's upsample backward "
           "kernels, with the forward's scale factors).")
