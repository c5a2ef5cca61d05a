"""Shape ops (a permutation or reshape of the entries: ``Jᵀ`` is the inverse move), padding,
concatenation, and ops whose output has no derivative (fills, masks, ``detach``)."""
from __future__ import annotations

import operator
from typing import Any, List, Optional, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor

from ..errors import op_name
from .helpers import permute_back, reshape_lead, reverse_dims, split_back, sum_to_shape, unpad
from .registry import (FRESH, PIECES, RANDOM, RESHAPES, VIEW, Ctx, affine, concatenation,
                       marked, permutation, register, rule_for)
from .select import SELECTIONS

SHARED = {"input": "shared"}  # the same move for every sample (KFRA's sandwich: Pᵀ M P)


def _reshape_back(g, c: Ctx):
    """``Jᵀg`` of any op that only rearranges entries in memory order: reshape to the input."""
    return c.call(reshape_lead, g, c.lead, c.args.input.shape)


def _reshape_forward(t, c: Ctx):
    """``J t`` of the same ops: the tangent reshaped to the output."""
    return c.call(reshape_lead, t, c.lead, c.out.shape)


def _shift(dim: int, lead: int) -> int:
    """An axis index of the op's operand, counted in a tensor with ``lead`` leading axes."""
    return dim + lead if dim >= 0 else dim


def varargs(values: tuple) -> list:
    """``x.view(2, 3)`` and ``x.view((2, 3))`` both give ``[2, 3]``."""
    if len(values) == 1 and isinstance(values[0], (list, tuple)):
        return list(values[0])
    return list(values)


# -- exact rewrites of axis moves that cancel (``lower`` returning None keeps the call) -------
def _axes(name: str, bound: dict, size) -> Optional[list]:
    """The permutation ``p`` (``y`` axis k is ``x`` axis ``p[k]``) of a transpose or permute
    of a ``size``-D tensor (a transpose of two non-negative axes without ``size``: the
    smallest rank it needs); None when unknown."""
    if name == "permute":
        dims = varargs(bound["dims"]) if not isinstance(bound["dims"], list) else bound["dims"]
        return [d % len(dims) if isinstance(d, int) else None for d in dims]
    a, b = bound["dim0"], bound["dim1"]
    if not isinstance(a, int) or not isinstance(b, int):
        return None
    if size is None:
        if a < 0 or b < 0:
            return None
        size = max(a, b) + 1
    a, b = a % size, b % size
    axes = list(range(size))
    axes[a], axes[b] = axes[b], axes[a]
    return axes


def _source(c: Ctx, arg: str) -> tuple:
    """``(node, rule, bound arguments)`` of the call that computed argument ``arg``."""
    source = c.bound[arg]
    rule = rule_for(source) if isinstance(source, fx.Node) else None
    return (source, rule, rule.bind(source)) if rule is not None else (None, None, None)


def _undo_moves(c: Ctx):
    """``transpose``/``permute`` of a ``transpose``/``permute`` that compose to the identity ->
    the original tensor; ``stack(ts, 0).transpose(0, 1)`` -> ``stack(ts, 1)``; else None
    (the call stays). So a sequence model's ``[T, N, F]`` layout (``batch_first=False``)
    does not hide the samples from per-sample quantities."""
    name = rule_for(c.node).name
    source, inner, inner_bound = _source(c, "input")
    if inner is None:
        return None
    axes = _axes(name, c.bound, None)
    if inner.name == "stack" and inner_bound["dim"] == 0 and axes is not None and \
            axes[:2] == [1, 0] and axes[2:] == list(range(2, len(axes))):
        return c.call(source.target, [c.emit.proxy(t) for t in inner_bound["tensors"]], 1)
    if inner.name in ("transpose", "permute"):
        size = len(varargs(c.bound["dims"])) if name == "permute" else \
            len(varargs(inner_bound["dims"])) if inner.name == "permute" else None
        outer, first = _axes(name, c.bound, size), _axes(inner.name, inner_bound, size)
        if outer is not None and first is not None and len(outer) == len(first) and all(
                first[outer[k]] == k for k in range(len(outer))):
            return c.emit.proxy(inner_bound["input"])
    return None


def _picked(index) -> tuple:
    """``(axis, k)`` for an index that picks position ``k`` of one axis and keeps the others
    (``x[k]``, ``x[:, k]``, ``x[:, :, k]``); ``(None, None)`` otherwise."""
    elements = index if isinstance(index, tuple) else (index,)
    full = slice(None, None, None)
    axis = 0
    while axis < len(elements) and elements[axis] == full:
        axis += 1
    if axis != len(elements) - 1:
        return None, None
    position = elements[axis]
    if not isinstance(position, int) or isinstance(position, bool):
        return None, None
    return axis, position


def _pick_back(c: Ctx):
    """``stack(ts, d)[:, .., k]`` (``k`` at axis ``d``) -> ``ts[k]``; ``unsqueeze(a, d)[:, ..,
    0]`` -> ``a`` (stacked final states ``[L, N, H]`` picked by layer); a piece ``k`` of a
    moved tensor, ``x.permute(p)[k]`` or ``x.permute(p).unbind(0)[k]`` (timm's attention:
    ``qkv.permute(2, 0, 3, 1, 4).unbind(0)``) -> ``x.select(p[0], k)`` with the other axes in
    ``p``'s order (:func:`_select_moved`); a pick of an expand that keeps axis 0, also through
    ``contiguous`` (:func:`_pick_before_expand`); else None."""
    axis, position = _picked(c.bound["idx"])
    source, inner, inner_bound = _source(c, "obj") if position is not None else \
        (None, None, None)
    if inner is not None and inner.name == "stack" and inner_bound["dim"] == axis:
        return c.emit.proxy(list(inner_bound["tensors"])[position])
    if inner is not None and inner.name == "unsqueeze" and inner_bound["dim"] == axis and \
            position in (0, -1):
        return c.emit.proxy(inner_bound["input"])
    if inner is not None and inner.name == "unbind" and inner_bound["dim"] == 0 and axis == 0:
        source = inner_bound["input"]
        inner = rule_for(source) if isinstance(source, fx.Node) else None
        inner_bound = inner.bind(source) if inner is not None else None
    if inner is not None and inner.name in ("permute", "transpose") and axis == 0:
        return _select_moved(c, inner.name, inner_bound, position)
    if inner is not None and inner.name == "identity" and axis == 0:  # x.contiguous()[k]
        source = inner_bound["input"]
        inner = rule_for(source) if isinstance(source, fx.Node) else None
        inner_bound = inner.bind(source) if inner is not None else None
    if inner is not None and inner.name == "expand" and axis == 0:
        return _pick_before_expand(c, inner_bound, position)
    return None


def _pick_before_expand(c: Ctx, bound: dict, position: int):
    """``x.expand(-1, s1, ..)[k]`` -> ``x[k].expand(s1, ..)``: axis 0 kept by the expand
    (a learned initial state ``h0.expand(-1, N, -1)`` of a recurrent layer, picked by layer,
    whose samples are the expanded axis 1); None for any other expand."""
    sizes = varargs(bound["sizes"])
    if not sizes or sizes[0] != -1:
        return None
    return c.emit.proxy(bound["input"])[position].expand(
        fx.node.map_arg(list(sizes[1:]), c.emit.proxy))


def _select_moved(c: Ctx, name: str, bound: dict, position: int):
    """Entry ``position`` of axis 0 of ``x.permute(p)`` (or ``x.transpose(0, 1)``) as
    ``x[:, .., position].permute(q)`` (the index at axis ``p[0]``), ``q`` the rest of ``p``
    renumbered: the same values without moving the sample axis where ``p`` only moves it to
    pick along another axis. None if the permutation is unknown or starts at axis 0 (nothing
    to rewrite)."""
    axes = _axes(name, bound, None)
    if axes is None or None in axes or axes[0] == 0:
        return None
    picked = axes[0]
    rest = [a - (a > picked) for a in axes[1:]]
    if name == "transpose" and picked != 1:
        return None  # (x's axis 0 would go to picked - 1: a move of the samples either way)
    piece = c.emit.proxy(bound["input"])[on_axis(picked, position)]
    return piece if name == "transpose" or rest == list(range(len(rest))) else \
        piece.permute(rest)


def _moves_axis0(dims: list) -> Optional[str]:
    return "it moves the sample axis 0" if dims and dims[0] != 0 else None


# Jᵀg = g reshaped to x, J t = t reshaped to y
RESHAPE = dict(vjp={"input": _reshape_back}, jvp={"input": _reshape_forward},
               traits=(VIEW, RESHAPES))


def keeps_sample_axis(output: Tensor, samples: int, where: str) -> Tensor:
    """``output`` unchanged, after checking that a reshape inside the model left one row of
    axis 0 per sample: a row-major reshape that keeps axis 0's size keeps each sample's
    entries in its own row. The check of a step whose quantities need it (the Hessian family,
    KFRA, BatchNorm in train mode); the others allow :func:`rows_hold_samples`."""
    if output.dim() == 0 or output.size(0) != samples:
        raise ValueError(
            "fxcurv: {} reshapes the sample axis 0 ({} samples, shape {} after): the Hessian "
            "family (diag_h, hmp, pchmp_*), kfra and a model with BatchNorm in train mode "
            "need axis 0 to stay the samples inside the model (first-order, GGN and "
            "Kronecker quantities allow several rows per sample). Keep the batch axis first "
            "(x.reshape(x.size(0), ...); nn.Linear acts on the last axis of [N, T, D] "
            "directly), or compile for the gradient alone".format(
                where, samples, list(output.shape)))
    return output


def rows_hold_samples(output: Tensor, samples: int, where: str) -> Tensor:
    """``output`` unchanged, after checking that a reshape inside the model left each row of
    axis 0 within one sample: ``k`` rows per sample in sample order (``x.flatten(0, 1)`` of
    frames ``[N, T, C, H, W]``, a window partition ``[N·W, w, w, C]``), which holds for a
    row-major reshape of a value whose axis 0 holds the samples' rows in order exactly when
    its ``R`` rows are a multiple of the ``N`` samples. Fewer rows, or a number that is not a
    multiple, split a row between samples (``x.view(2, -1)``)."""
    rows = output.size(0) if output.dim() > 0 else 0
    if rows < samples or rows % max(samples, 1) != 0:
        raise ValueError(
            "fxcurv: {} puts samples together in one row of the sample axis 0 ({} samples, "
            "shape {} after): fxcurv's per-sample and curvature quantities need each row of "
            "axis 0 inside the model to belong to one sample (a multiple of the samples, in "
            "their order). Keep the batch axis first (x.reshape(x.size(0), ...)), or compile for "
            "the gradient alone".format(where, samples, list(output.shape)))
    return output


def loss_rows_are_samples(input: Tensor, samples: int, where: str) -> Tensor:
    """``input`` of a built-in loss unchanged, after checking it has one row per sample: the
    exact square-root factor of the loss Hessian has one column per class and row, and the
    step gives each sample the columns of its row; rows that merge samples and positions
    (``logits.view(-1, C)`` of ``[N, T, C]``) would be summed into one column per sample."""
    if input.dim() == 0 or input.size(0) != samples:
        raise ValueError(
            "fxcurv: the input of {} has {} rows for {} samples (a reshape such as "
            "logits.view(-1, C) merged the sample axis): exact curvature (GGN, Hessian, "
            "kflr, products) needs one row per sample. Pass the [N, C, T] layout instead "
            "(cross_entropy(logits.transpose(1, 2), y) with y of shape [N, T]), or request "
            "first-order or Monte-Carlo quantities".format(where, input.size(0), samples))
    return input


affine([loss_rows_are_samples], "loss_rows_are_samples", "input, samples, where",
       doc="y = the loss input (checked to have one row per sample);  Jᵀg = g.",
       vjp={"input": lambda g, c: g}, jvp={"input": lambda t, c: t},
       sandwich={"input": "shared"})


def axes_keep_samples(input: Tensor, ranks: List[int], reasons: List[str],
                      where: str) -> Tensor:
    """``input`` of an op with negative axis arguments unchanged, after checking that at its
    rank none of them is the sample axis 0: ``reasons[i]`` is what the op does to the samples
    at rank ``ranks[i]`` (``x.transpose(-3, -2)`` of a 3-D ``x`` moves axis 0)."""
    for rank, reason in zip(ranks, reasons):
        if input.dim() == rank:
            raise ValueError(
                "fxcurv: {} has a {}-D input, so its negative axis is the sample axis 0: {}, "
                "so per-sample quantities are undefined. Count axes from the front (dim=1, "
                "...) or keep the samples on axis 0, or compile for the gradient "
                "alone".format(where, rank, reason))
    return input


affine([axes_keep_samples], "axes_keep_samples", "input, ranks, reasons, where",
       doc="y = the op's input (checked not to have the sample axis among its negative "
           "axes);  Jᵀg = g.",
       vjp={"input": lambda g, c: g}, jvp={"input": lambda t, c: t},
       sandwich={"input": "shared"})


affine([keeps_sample_axis, rows_hold_samples], "sample_rows_check", "output, samples, where",
       doc="y = the reshape's output (checked to keep one row per sample, or each row "
           "within one sample);  Jᵀg = g.",
       vjp={"output": lambda g, c: g}, jvp={"output": lambda t, c: t},
       sandwich={"output": "shared"})
permutation([torch.flatten, "flatten"], "flatten", "input, start_dim=0, end_dim=-1",
            doc="y = x reshaped (axes start..end merged);  Jᵀg = g reshaped to x.",
            sandwich=SHARED, **RESHAPE)
permutation(["view", "reshape"], "reshape", "input, *shape",
            doc="y = x reshaped;  Jᵀg = g reshaped to x.", sandwich=SHARED, **RESHAPE)
permutation([torch.reshape], "reshape", "input, shape",
            doc="y = x reshaped;  Jᵀg = g reshaped to x.", sandwich=SHARED, **RESHAPE)
register(["reshape_as", "view_as"], "reshape_as", "input, other",
         doc="y = x reshaped to other's shape (timm's ScaledStdConv2d);  lowered to reshape.",
         lower=lambda c: c.args.input.reshape(c.args.other.shape))
def unflattened_shape(shape: List[int], dim: int, sizes: List[int]) -> List[int]:
    """``shape`` with axis ``dim`` split into ``sizes`` (one may be -1), as ``unflatten``.
    Splitting the sample axis 0 (``h.unflatten(0, (N, T))`` of frames merged into rows) is a
    reshape that the step checks to keep rows within samples (``passes/sample_axis.py``)."""
    axis = dim + len(shape) if dim < 0 else dim
    return list(shape[:axis]) + sizes + list(shape[axis + 1:])


register([unflattened_shape], "unflattened_shape", "shape, dim, sizes", constant=True,
         doc="Integer sizes: no derivative.")


def _lower_unflatten(c: Ctx):
    """``reshape`` to :func:`unflattened_shape` (checked when the step runs)."""
    x = c.args.input
    return x.reshape(c.call(unflattened_shape, x.shape, c.bound["dim"],
                            list(c.args.sizes)))


register([torch.unflatten, "unflatten"], "unflatten", "input, dim, sizes",
         doc="y = x with axis dim split into sizes;  lowered to reshape.",
         lower=_lower_unflatten)


# -- item assignment ``x[idx] = v`` (basic indexing), out of place -----------------------------
_TO_THE_END = 2 ** 62  # a slice's stop of None


def index_spec(index: Any) -> Optional[List[Any]]:
    """A basic index of ``x[index] = v`` as five ints per indexed axis, ``[axis, kind, a, b,
    c]``: ``kind`` 0 selects entry ``a``, 1 slices ``a:b:c``; ``axis`` counts from the front,
    or from the end after an ``...``. Full slices are left out. An entry or a slice bound may
    be a traced size (a node :func:`is_scalar_node` calls a number: torchvision's Swin3D
    fills its attention mask at ``[-window_size[i]:-shift_size[i]]`` with a window clipped to
    the input's size); the step stays a constant int. None for anything else (a tensor
    index, ``None``, a negative or traced step)."""
    items = index if isinstance(index, tuple) else (index,)
    if sum(item is Ellipsis for item in items) > 1:
        return None
    end = items.index(Ellipsis) if Ellipsis in items else len(items)
    spec: List[Any] = []
    for position, item in enumerate(items):
        axis = position if position < end else position - len(items)
        if item is Ellipsis or item == slice(None):
            continue
        if _is_int(item):
            spec += [axis, 0, item, 0, 0]
        elif isinstance(item, slice) and all(v is None or _is_int(v)
                                             for v in (item.start, item.stop)) and \
                (item.step is None or (isinstance(item.step, int) and item.step > 0)):
            spec += [axis, 1, 0 if item.start is None else item.start,
                     _TO_THE_END if item.stop is None else item.stop, item.step or 1]
        else:
            return None
    return spec


def _is_int(value: Any) -> bool:
    """A Python int, or a traced one (a size, arithmetic on sizes); not a bool."""
    if isinstance(value, fx.Node):
        return is_scalar_node(value)
    return isinstance(value, int) and not isinstance(value, bool)


def indexed_region(t: Tensor, spec: List[int], lead: int) -> Tensor:
    """The view ``t[index]`` of an index encoded by :func:`index_spec` (``lead`` more leading
    axes in ``t``): slices first, then selections from the last axis inward, so that every
    axis keeps its number until it is selected."""
    view = t
    count = len(spec) // 5
    for i in range(count):
        if spec[5 * i + 1] == 1:
            axis = spec[5 * i] + lead if spec[5 * i] >= 0 else spec[5 * i]
            view = torch.ops.aten.slice(view, axis, spec[5 * i + 2], spec[5 * i + 3],
                                        spec[5 * i + 4])
    chosen: List[int] = []
    for i in range(count):
        if spec[5 * i + 1] == 0:
            chosen.append(i)
    while len(chosen) > 0:  # positive axes from the largest, then negative ones from the front
        best = 0
        for j in range(1, len(chosen)):
            a, b = spec[5 * chosen[j]], spec[5 * chosen[best]]
            if (a >= 0 and (b < 0 or a > b)) or (a < 0 and b < 0 and a < b):
                best = j
        i = chosen.pop(best)
        axis = spec[5 * i] + lead if spec[5 * i] >= 0 else spec[5 * i]
        view = view.select(axis, spec[5 * i + 2])
    return view


def assigned(input: Tensor, value: Tensor, spec: List[int]) -> Tensor:
    """``y = input.clone(); y[index] = value`` (``index`` as :func:`index_spec`): item
    assignment out of place."""
    result = input.clone()
    indexed_region(result, spec, 0).copy_(value)
    return result


def assigned_number(input: Tensor, value: Union[int, float], spec: List[int]) -> Tensor:
    """:func:`assigned` of a Python number (``mask[:, :k] = float("-inf")``)."""
    result = input.clone()
    indexed_region(result, spec, 0).fill_(value)
    return result


def region_zeroed(g: Tensor, spec: List[int], lead: int) -> Tensor:
    """``Jᵀg`` of :func:`assigned` for its input: ``g`` with the assigned region set to 0."""
    result = g.clone()
    indexed_region(result, spec, lead).zero_()
    return result


def region_of(g: Tensor, spec: List[int], lead: int, shape: List[int]) -> Tensor:
    """``Jᵀg`` of :func:`assigned` for its value: ``g[index]`` summed to the value's shape
    (undoing its broadcast)."""
    return sum_to_shape(indexed_region(g, spec, lead), lead, shape).clone()


def leading_mask(mask: Tensor, input: Tensor) -> Tensor:
    """A boolean mask over ``input``'s leading axes, with ``input``'s other axes as size 1
    (``x[mask] = v`` masks whole trailing blocks)."""
    return mask.reshape(list(mask.shape) + [1] * (input.dim() - mask.dim()))


def masked_assign(input: Tensor, mask: Tensor, value: Union[int, float]) -> Tensor:
    """``y = input.clone(); y[mask] = value`` for a boolean ``mask`` over ``input``'s leading
    axes and a number ``value`` (lowered to ``masked_fill``)."""
    return input.masked_fill(leading_mask(mask, input), value)


register([leading_mask], "leading_mask", "mask, input", constant=True,
         doc="A boolean mask reshaped: no derivative.")
register([masked_assign], "masked_assign", "input, mask, value",
         doc="y = x with y[mask] = a number (a boolean mask over x's leading axes);  lowered "
             "to masked_fill of the mask with x's trailing axes as size 1.",
         lower=lambda c: c.args.input.masked_fill(
             c.call(leading_mask, c.args.mask, c.args.input), c.bound["value"]))


def _assigns_samples(b: dict) -> Optional[str]:
    """Assigning into part of axis 0 replaces some samples' rows (an axis counted from the
    end is checked where it could be axis 0, ``passes/sample_axis.py``)."""
    return "it assigns into part of the sample axis 0" if 0 in b["spec"][0::5] else None


affine([assigned], "assigned", "input, value, spec", traits=(FRESH,),
       doc="y = x with y[index] = v (item assignment, basic index);  x̄ = g with the region "
           "zeroed, v̄ = g[index] summed to v's shape.",
       mixes_samples=_assigns_samples,
       vjp={"input": lambda g, c: c.call(region_zeroed, g, c.bound["spec"], c.lead),
            "value": lambda g, c: c.call(region_of, g, c.bound["spec"], c.lead,
                                         c.args.value.shape),
            "spec": None})
affine([assigned_number], "assigned_number", "input, value, spec", traits=(FRESH,),
       doc="y = x with y[index] = a number;  x̄ = g with the region zeroed.",
       mixes_samples=_assigns_samples,
       vjp={"input": lambda g, c: c.call(region_zeroed, g, c.bound["spec"], c.lead),
            "value": None, "spec": None})


def on_axis(dim: int, item: Any) -> tuple:
    """The basic index that applies ``item`` (an int or a slice) to axis ``dim`` alone."""
    if dim >= 0:
        return (slice(None),) * dim + (item,)
    return (Ellipsis, item) + (slice(None),) * (-dim - 1)


def _lower_select(c: Ctx):
    """``x.select(dim, i)`` is ``x[:, ..., i]`` (``i`` on axis ``dim``): basic indexing."""
    return c.args.input[on_axis(c.bound["dim"], c.bound["index"])]


register([torch.select, "select"], "select", "input, dim, index",
         doc=_lower_select.__doc__ + " Lowered to getitem.", lower=_lower_select,
         unsupported=lambda b: None if isinstance(b["dim"], int) and isinstance(b["index"], int)
         else "select with a traced dim or index has no rule")


def _lower_channel_shuffle(c: Ctx):
    """``[N, g·k, *] -> [N, g, k, *] -> [N, k, g, *] -> [N, g·k, *]``: ``reshape``,
    ``transpose``, ``reshape``."""
    x = c.args.input
    split = x.reshape(c.call(unflattened_shape, x.shape, 1, [c.bound["groups"], -1]))
    return split.transpose(1, 2).reshape(x.shape)


register([torch.channel_shuffle, torch.native_channel_shuffle],
         "channel_shuffle", "input, groups", doc=_lower_channel_shuffle.__doc__,
         lower=_lower_channel_shuffle)


permutation([torch.squeeze, "squeeze"], "squeeze", "input, dim=None",
            doc="y = x without size-1 axes;  Jᵀg = g reshaped to x.", **RESHAPE)
permutation([torch.unsqueeze, "unsqueeze"], "unsqueeze", "input, dim",
            doc="y = x with a new size-1 axis;  Jᵀg = g reshaped to x.", axis_rank_offset=1,
            **RESHAPE)
permutation(["contiguous"], "identity", "input, memory_format=None", traits=(VIEW,),
            doc="y = x;  Jᵀg = g.", vjp={"input": lambda g, c: g}, sandwich=SHARED)
permutation(["clone", torch.clone], "clone", "input, memory_format=None",
            doc="y = x (a copy);  Jᵀg = g.", vjp={"input": lambda g, c: g}, sandwich=SHARED)

def cast_back(g: Tensor, like: Tensor) -> Tensor:
    """``g`` in ``like``'s dtype and on its device (the Jacobian-transpose of a conversion)."""
    return g.to(dtype=like.dtype, device=like.device)


def _to_integers(b: dict) -> bool:
    """A conversion to a non-floating dtype (``x.to(torch.long)``): no derivative. A dtype
    read from a tensor (``x.to(h.dtype)``) is taken to be floating (it converts a value the
    parameters reach; an integer one would have no derivative to lose)."""
    targets = list(b["args"]) + [b["kwargs"].get("dtype")]
    return any(isinstance(t, torch.dtype) and not t.is_floating_point and not t.is_complex
               for t in targets)


permutation(["to", "type_as", "float", "double", "half", "bfloat16", "cpu", "cuda"], "convert",
            "input, *args, **kwargs",
            doc="y = x in another dtype or on another device (rounded where the dtype is "
                "narrower);  Jᵀg = g converted back, as autograd does. To an integer dtype: "
                "no derivative.",
            vjp={"input": lambda g, c: c.call(cast_back, g, c.args.input), "args": None,
                 "kwargs": None},
            constant=_to_integers, sandwich=SHARED)

_PERMUTE_DOC = "y = x with axes permuted;  Jᵀg = g with the inverse permutation."
permutation(["permute"], "permute", "input, *dims", doc=_PERMUTE_DOC, traits=(VIEW,),
            vjp={"input": lambda g, c: c.call(permute_back, g, c.lead,
                                              varargs(c.bound["dims"]))},
            mixes_samples=lambda b: _moves_axis0(varargs(b["dims"])), lower=_undo_moves)
permutation([torch.permute], "permute", "input, dims", doc=_PERMUTE_DOC, traits=(VIEW,),
            vjp={"input": lambda g, c: c.call(permute_back, g, c.lead, list(c.bound["dims"]))},
            mixes_samples=lambda b: _moves_axis0(list(b["dims"])), lower=_undo_moves)
permutation([torch.transpose, torch.swapaxes, torch.swapdims, "transpose", "swapaxes",
             "swapdims"], "transpose", "input, dim0, dim1",
            doc="y = x with two axes swapped;  Jᵀg swaps them back.", traits=(VIEW,),
            vjp={"input": lambda g, c: g.transpose(_shift(c.bound["dim0"], c.lead),
                                                   _shift(c.bound["dim1"], c.lead))},
            mixes_samples=lambda b: ("it moves the sample axis 0"
                                     if 0 in (b["dim0"], b["dim1"]) else None),
            lower=_undo_moves)
permutation([torch.t, "t"], "t", "input", doc="y = xᵀ (2-D);  Jᵀg = gᵀ.", traits=(VIEW,),
            vjp={"input": lambda g, c: g.transpose(-1, -2)},
            mixes_samples=lambda b: "it moves the sample axis 0")


def border_pad_vjp(g: Tensor, x: Tensor, pad: List[int], mode: str, lead: int) -> Tensor:
    """Jacobian-transpose of ``F.pad(x, pad, mode)`` for ``reflect`` / ``replicate``: torch's
    own backward kernels (each border entry adds its cotangent to the entry it copies), the
    lead axes and any axes before the channel folded into one batch axis. The kernels read
    only the input's shape: they get a zero-stride view of the right size."""
    d = len(pad) // 2
    tail: List[int] = list(x.shape[x.dim() - d - 1:])
    grads = g.reshape([-1] + list(g.shape[g.dim() - d - 1:]))
    shape_only = torch.zeros([1], dtype=g.dtype, device=g.device).expand(
        [grads.size(0)] + tail)
    if mode == "reflect":
        if d == 1:
            grad = torch.ops.aten.reflection_pad1d_backward(grads, shape_only, pad)
        elif d == 2:
            grad = torch.ops.aten.reflection_pad2d_backward(grads, shape_only, pad)
        else:
            grad = torch.ops.aten.reflection_pad3d_backward(grads, shape_only, pad)
    elif d == 1:
        grad = torch.ops.aten.replication_pad1d_backward(grads, shape_only, pad)
    elif d == 2:
        grad = torch.ops.aten.replication_pad2d_backward(grads, shape_only, pad)
    else:
        grad = torch.ops.aten.replication_pad3d_backward(grads, shape_only, pad)
    return grad.reshape(list(g.shape[:lead]) + list(x.shape))


def _pad_vjp(g, c: Ctx):
    if c.bound["mode"] == "constant":
        return c.call(unpad, g, list(c.args.pad))  # pads may be sizes
    return c.call(border_pad_vjp, g, c.args.input, list(c.bound["pad"]), c.bound["mode"],
                  c.lead)


def _pad_unsupported(b: dict) -> Optional[str]:
    mode, pad = b["mode"], b["pad"]
    if mode not in ("constant", "reflect", "replicate", "circular"):
        return f"padding mode '{mode}' has no rule"
    if mode != "constant" and not all(isinstance(p, int) for p in pad):
        return f"padding mode '{mode}' with pad widths computed from sizes has no rule"
    if mode != "constant" and (len(pad) % 2 or not 2 <= len(pad) <= 6):
        return f"padding mode '{mode}' pads 1 to 3 trailing axes (2, 4 or 6 widths)"
    if mode == "circular" and any(p < 0 for p in pad):
        return "circular padding with negative widths (cropping) has no rule"
    return None


def _lower_circular_pad(c: Ctx):
    """Circular padding (``Conv2d(padding_mode="circular")``): each padded axis (the last
    first) gets its last ``left`` entries prepended and its first ``right`` appended, with
    slicing and ``cat``; other modes stay one ``pad`` call."""
    if c.bound["mode"] != "circular":
        return None
    x, pad = c.args.input, list(c.bound["pad"])
    for i in range(len(pad) // 2):
        left, right, axis = pad[2 * i], pad[2 * i + 1], -(i + 1)
        trailing = (slice(None),) * i
        pieces = ([x[(Ellipsis, slice(-left, None)) + trailing]] if left else []) + [x] + (
            [x[(Ellipsis, slice(None, right)) + trailing]] if right else [])
        x = torch.cat(pieces, axis) if len(pieces) > 1 else x
    return x


affine([F.pad], "pad", "input, pad, mode='constant', value=None",
       doc="y = x with borders: constant (Jᵀg = g cropped back to x), reflect or replicate "
           "(Jᵀ adds each border entry's cotangent to the entry it copies: torch's backward "
           "kernels); circular: lowered to slicing and cat.",
       vjp={"input": _pad_vjp}, unsupported=_pad_unsupported, lower=_lower_circular_pad)


def cat_sizes(tensors: List[Tensor], dim: int) -> List[int]:
    """Each piece's size along ``dim`` in ``cat(tensors, dim)``; 0 for a legacy empty piece
    (1-D of size 0, which ``torch.cat`` skips at any rank: Hugging Face's empty key/value
    cache, ``cat([torch.tensor([]), k], -2)``)."""
    rank = 1
    for t in tensors:
        rank = max(rank, t.dim())
    sizes: List[int] = []
    for t in tensors:
        sizes.append(0 if t.dim() == 1 and t.numel() == 0 and rank > 1 else t.size(dim))
    return sizes


def _cat_vjp(g, c: Ctx) -> list:
    dim = c.bound["dim"]
    sizes = c.call(cat_sizes, c.args.tensors, dim)
    pieces = c.call(split_back, g, c.lead, dim, sizes)
    return [pieces[i] for i in range(len(c.args.tensors))]


def _whole_tuple(b: dict) -> Optional[str]:
    """cat/stack of a tuple value used as a whole (``torch.stack(x.unbind(1))``): the number
    of pieces is not in the graph."""
    if isinstance(b["tensors"], fx.Node):
        return ("its tensors are one tuple value (e.g. the result of unbind/split) rather than "
                "a list of pieces; pick them: torch.stack([t[0], t[1], ...])")
    return None


concatenation([torch.cat, torch.concat, torch.concatenate], "cat", "tensors, dim=0",
              doc="y = [x₁, x₂, ...] along dim;  Jᵀg splits g into the pieces.",
              vjp={"tensors": _cat_vjp}, unsupported=_whole_tuple,
              mixes_samples=lambda b: "it concatenates along the sample axis 0"
              if b["dim"] == 0 else None)


# attributes of a tensor that carry no derivative (metadata, and ``.data``, which autograd
# does not track); every other attribute of a differentiable value has a rule or is refused
NO_DERIVATIVE_ATTRIBUTES = frozenset((
    "shape", "dtype", "device", "ndim", "requires_grad", "layout", "is_cuda", "is_cpu",
    "is_sparse", "is_quantized", "is_meta", "is_mkldnn", "is_nested", "is_leaf", "data",
    "itemsize", "nbytes", "grad_fn"))
TRANSPOSE_ATTRIBUTES = ("T", "mT")


def _getattr_unsupported(b: dict) -> Optional[str]:
    name = b["name"]
    if name in NO_DERIVATIVE_ATTRIBUTES or name in TRANSPOSE_ATTRIBUTES:
        return None
    return (f"the attribute '.{name}' of a value that depends on the parameters has no rule "
            f"(known: .T, .mT, and {', '.join(sorted(NO_DERIVATIVE_ATTRIBUTES))}, which carry "
            "no derivative)")


def _lower_transpose_attribute(c: Ctx):
    """``x.mT`` is ``x.transpose(-2, -1)`` (its sample check then reads the rank when the step
    runs); ``x.T.T`` is ``x``; other attributes stay."""
    obj, name = c.bound["obj"], c.bound["name"]
    if name == "mT":
        return c.args.obj.transpose(-2, -1)
    if name == "T" and isinstance(obj, fx.Node) and obj.op == "call_function" and \
            obj.target is getattr and obj.args[1] == "T":
        return c.emit.proxy(obj.args[0])
    return None


permutation([getattr], "getattr", "obj, name",
            doc="x.T / x.mT: y = x with the axes reversed / the last two swapped (lowered to "
                "transpose(-2, -1); x.T.T to x);  Jᵀg moves them back. Metadata (shape, dtype, device, ndim, ...) and .data have no derivative; "
                "any other attribute is refused.",
            constant=lambda b: b["name"] in NO_DERIVATIVE_ATTRIBUTES,
            unsupported=_getattr_unsupported, traits=(VIEW,),
            lower=_lower_transpose_attribute,
            mixes_samples=lambda b: ("its .T reverses the axes, moving the sample axis 0"
                                     if b["name"] == "T" else None),
            vjp={"obj": lambda g, c: g.transpose(-1, -2) if c.bound["name"] == "mT"
                 else c.call(reverse_dims, g, c.lead)})


def _constant(targets: list, name: str, params: str, traits: tuple = ()) -> None:
    register(targets, name, params, traits, constant=True,
             doc="No derivative: the output does not depend differentiably on the inputs.")


_constant([torch.zeros_like, torch.ones_like, torch.empty_like], "fill_like",
          "input, *args, **kwargs")
_constant([torch.rand_like, torch.randn_like, torch.randint_like], "random_like",
          "input, *args, **kwargs", (RANDOM,))
_constant([torch.full_like], "full_like", "input, fill_value, **kwargs")
# new tensors of a given size (new memory: an in-place fill of one is exact, e.g. timm's
# drop path ``x.new_empty([N, 1, 1]).bernoulli_(keep)``)
_constant(["new_empty", "new_zeros", "new_ones", "new_full"], "new_filled",
          "input, *args, **kwargs", (FRESH,))
_constant([torch.empty, torch.zeros, torch.ones, torch.full], "filled", "*args, **kwargs",
          (FRESH,))
_constant([torch.bernoulli, "bernoulli"], "bernoulli", "input, *args, **kwargs", (RANDOM,))
# draws without a rule (factories; normal is differentiable in its mean: no rule yet)
for _draw in (torch.multinomial, torch.normal, torch.rand, torch.randn, torch.randint,
              torch.randperm, "bernoulli_"):
    marked(RANDOM, _draw)
register([torch.detach, "detach"], "detach", "input", constant=True, traits=(VIEW,),
         doc="No derivative: y = x (sharing its memory) outside autograd.")
_constant(["size", "dim", "numel", "ndimension", "nelement"], "size", "input, *args")
_constant([torch.argmax, "argmax", torch.argmin, "argmin"], "argmax", "input, *args, **kwargs")


# -- scalar-valued nodes ---------------------------------------------------------------------
_SCALAR_METHODS = ("dim", "numel", "nelement", "ndimension")
_SCALAR_ARITHMETIC = (operator.add, operator.sub, operator.mul, operator.truediv,
                      operator.floordiv, operator.pow, operator.mod, operator.neg)


def shape_read(node: Any) -> Optional[tuple]:
    """``(t, a)`` where ``node`` is a shape value of tensor ``t`` whose item 0 is the size of
    axis ``a``: ``t.shape`` / ``t.size()`` (``a = 0``), a slice of one (``t.shape[2:]``:
    ``a = 2``; -1 where the slice does not say, a negative start or a step); None for any
    other value."""
    if not isinstance(node, fx.Node):
        return None
    if (node.op == "call_function" and node.target is getattr and node.args[1] == "shape") \
            or (node.op == "call_method" and node.target == "size" and len(node.args) == 1
                and not node.kwargs):
        return node.args[0], 0
    if node.op == "call_function" and node.target is operator.getitem and \
            isinstance(node.args[1], slice):
        whole = shape_read(node.args[0])
        if whole is None:
            return None
        part, start = node.args[1], node.args[1].start or 0
        known = whole[1] >= 0 and isinstance(start, int) and start >= 0 and \
            part.step in (None, 1)
        return whole[0], whole[1] + start if known else -1
    return None


def _is_shape(node: Any) -> bool:
    """``x.shape`` / ``x.size()``, or a slice of one (``x.shape[:2]``): a tuple of ints."""
    return shape_read(node) is not None


def is_scalar_node(node: Any) -> bool:
    """True if ``node`` computes a Python number, not a tensor: sizes (``x.size(1)``,
    ``x.shape[-1]``), arithmetic on them (``d ** -0.5``), and helpers annotated ``-> int`` or
    ``-> float``. Such an operand of ``*`` or ``/`` is a scalar factor with no cotangent."""
    if not isinstance(node, fx.Node):
        return isinstance(node, (int, float)) and not isinstance(node, bool)
    if node.op == "call_method":
        return node.target in _SCALAR_METHODS or (node.target == "size" and not _is_shape(node))
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return _is_shape(node.args[0])
    if node.target is getattr:
        return node.args[1] == "ndim"
    if node.target in _SCALAR_ARITHMETIC:
        return all(is_scalar_node(a) for a in node.args)
    returns = getattr(node.target, "__annotations__", {}).get("return")
    return returns in (int, float, "int", "float")


# -- indexing: x[1:3], x[..., 0], x[:, None] -------------------------------------------------
BIG = 9223372036854775807  # an open slice end (int64 max), as aten::slice reads it
SLICE, INDEX, NEW_AXIS, ELLIPSIS = 0, 1, 2, 3  # element kinds (literals in the helpers)


def index_back(g: Tensor, lead: int, shape: List[int], kinds: List[int], starts: List[int],
               stops: List[int], steps: List[int]) -> Tensor:
    """Jacobian-transpose of basic indexing ``y = x[index]``: ``g`` scattered into zeros
    ``[*lead, *shape]``. ``index`` per element: ``kinds`` 0 slice(start, stop, step),
    1 an integer (``starts``), 2 ``None`` (new axis), 3 ``...``."""
    used = 0
    for kind in kinds:
        if kind == 0 or kind == 1:
            used += 1
    ellipsis = len(shape) - used
    new_axes: List[int] = []
    integers: List[int] = []
    out_axis, in_axis = lead, 0
    for kind in kinds:
        if kind == 2:
            new_axes.append(out_axis)
            out_axis += 1
        elif kind == 3:
            out_axis += ellipsis
            in_axis += ellipsis
        elif kind == 0:
            out_axis += 1
            in_axis += 1
        else:
            integers.append(lead + in_axis)
            in_axis += 1
    for axis in new_axes[::-1]:
        g = g.squeeze(axis)
    for axis in integers:
        g = g.unsqueeze(axis)
    in_axis = 0
    for i, kind in enumerate(kinds):
        if kind == 3:
            in_axis += ellipsis
        elif kind != 2:
            g = _scatter_axis(g, lead + in_axis, shape[in_axis], kind, starts[i], stops[i],
                              steps[i])
            in_axis += 1
    return g


def _scatter_axis(g: Tensor, axis: int, size: int, kind: int, start: int, stop: int,
                  step: int) -> Tensor:
    """Put ``g`` at ``start:stop:step`` (or at the integer ``start``) of a zero axis ``size``."""
    if kind == 1:
        start = start + size if start < 0 else start
        stop, step = start + 1, 1
    elif start == 0 and stop >= size and step == 1:
        return g  # a full slice
    full: List[int] = list(g.shape)
    full[axis] = size
    zeros = torch.zeros(full, dtype=g.dtype, device=g.device)
    return torch.slice_scatter(zeros, g, axis, start, stop, step)


def _index_elements(idx: Any) -> Union[list, str]:
    """``(kind, start, stop, step)`` per index element, or why the index is unsupported."""
    elements = []
    for item in (idx if isinstance(idx, tuple) else (idx,)):
        if item is None:
            elements.append((NEW_AXIS, 0, 0, 1))
        elif item is Ellipsis:
            elements.append((ELLIPSIS, 0, 0, 1))
        elif isinstance(item, slice):
            parts = (item.start, item.stop, item.step)
            if any(isinstance(p, fx.Node) and not is_scalar_node(p) for p in parts):
                return "a slice bound is a tensor"
            elements.append((SLICE, 0 if item.start is None else item.start,
                             BIG if item.stop is None else item.stop,
                             1 if item.step is None else item.step))
        elif isinstance(item, bool) or not is_scalar_node(item):
            what = "a tensor" if isinstance(item, fx.Node) else type(item).__name__
            return (f"indexing with {what} (advanced indexing: tensors, lists, masks) has no "
                    "rule; only basic indexing with ints, slices, None and ... is supported")
        else:
            elements.append((INDEX, item, 0, 1))
    return elements


def _integer_piece(b: dict) -> bool:
    """``indices`` (odd position) of a selection's ``(values, indices)``: no derivative."""
    obj, idx = b["obj"], b["idx"]
    rule = rule_for(obj) if isinstance(obj, fx.Node) else None
    return rule is not None and rule.name in SELECTIONS and isinstance(idx, int) and idx % 2 == 1


def _tuple_source(node: Any) -> bool:
    """True if ``node`` produces a tuple of tensors (split, max with a dim, ...) that
    ``getitem`` picks."""
    rule = rule_for(node) if isinstance(node, fx.Node) else None
    return rule is not None and rule.has(PIECES)


class Pieces:
    """The cotangent of a tuple-valued node (``split``/``chunk``/``unbind``): ``{position:
    cotangent}`` for the pieces that are used; ``+`` (accumulation) merges and sums."""

    def __init__(self, items: dict):
        self.items = dict(items)

    def __add__(self, other: "Pieces") -> "Pieces":
        merged = dict(self.items)
        for key, value in other.items.items():
            merged[key] = merged[key] + value if key in merged else value
        return Pieces(merged)

    def lists(self) -> tuple[list, list]:
        """``(cotangents, positions)``, positions as written (``-1`` is the last piece)."""
        keys = list(self.items)
        return [self.items[k] for k in keys], keys


def _getitem_vjp(g, c: Ctx):
    if _tuple_source(c.bound["obj"]):
        return Pieces({c.bound["idx"]: g})
    elements = fx.node.map_arg(_index_elements(c.bound["idx"]), c.emit.proxy)
    kinds, starts, stops, steps = (list(column) for column in zip(*elements)) if elements \
        else ([], [], [], [])
    return c.call(index_back, g, c.lead, c.args.obj.shape, kinds, starts, stops, steps)


def _getitem_unsupported(b: dict) -> Optional[str]:
    obj, idx = b["obj"], b["idx"]
    if _tuple_source(obj):
        if isinstance(idx, int) and not isinstance(idx, bool):
            return None
        return (f"picking a piece of the result of {op_name(obj)} needs a constant int "
                f"position, got {idx!r}")
    if isinstance(obj, fx.Node) and "with_indices" in getattr(obj.target, "__name__", ""):
        return f"indexing the (values, indices) result of {obj.target.__name__} has no rule"
    reason = _index_elements(idx)
    return reason if isinstance(reason, str) else None


def _getitem_mixes(b: dict) -> Optional[str]:
    obj, idx = b["obj"], b["idx"]
    if _tuple_source(obj) or _is_shape(obj):
        return None
    first = (idx if isinstance(idx, tuple) else (idx,))[:1]
    if not first or first[0] is Ellipsis or (
            isinstance(first[0], slice) and first[0].start in (None, 0)
            and first[0].stop in (None, BIG) and first[0].step in (None, 1)):
        return None
    return "it indexes the sample axis 0 (anything but ':' or '...' first)"


affine([operator.getitem], "getitem", "obj, idx",
       doc="y = x[index] (ints, slices, None, ...);  Jᵀg scatters g into zeros of x's shape. "
           "On the tuple of split/chunk/unbind/max/min/sort/topk: y = pieces[i];  Jᵀg is g "
           "at position i (indices of max/min/sort/topk: no derivative).",
       vjp={"obj": _getitem_vjp}, unsupported=_getitem_unsupported,
       mixes_samples=_getitem_mixes, constant=_integer_piece, traits=(VIEW,), lower=_pick_back)


# -- split, chunk, unbind (tuples of pieces), stack ------------------------------------------
def split_sizes(length: int, size: int) -> List[int]:
    """The piece sizes of ``split(x, size)`` along an axis of ``length``."""
    sizes: List[int] = []
    start = 0
    while start < length:
        sizes.append(min(size, length - start))
        start += size
    return sizes


def chunk_sizes(length: int, chunks: int) -> List[int]:
    """The piece sizes of ``chunk(x, chunks)``: ``split`` with size ``ceil(length / chunks)``."""
    return split_sizes(length, max((length + chunks - 1) // chunks, 1))


def zeros_with_lead(like: Tensor, lead: int, shape: List[int]) -> Tensor:
    """Zeros ``[*like.shape[:lead], *shape]`` with ``like``'s dtype and device."""
    return torch.zeros(list(like.shape[:lead]) + list(shape), dtype=like.dtype,
                       device=like.device)


def unsplit(pieces: List[Tensor], positions: List[int], lead: int, shape: List[int], dim: int,
            sizes: List[int]) -> Tensor:
    """Jacobian-transpose of ``split``: the used pieces' cotangents at their positions along
    ``dim``, zeros elsewhere, ``[*lead, *shape]``."""
    axis = dim + lead if dim >= 0 else dim
    ordered = _in_order(pieces, positions, len(sizes))
    if _exact_parts(ordered, lead, shape, dim, sizes):
        return torch.cat(ordered, axis)   # every piece once, no broadcasting: no zeros
    parts = list(torch.split(zeros_with_lead(pieces[0], lead, shape), sizes, axis))
    for position, piece in zip(positions, pieces):
        parts[position] = parts[position] + piece
    return torch.cat(parts, axis)


def unstack(pieces: List[Tensor], positions: List[int], lead: int, shape: List[int],
            dim: int) -> Tensor:
    """Jacobian-transpose of ``unbind``: the used slices' cotangents stacked along ``dim``."""
    axis = dim + lead if dim >= 0 else dim
    at = dim if dim >= 0 else dim + len(shape)
    ordered = _in_order(pieces, positions, shape[at])
    sliced = shape[:at] + shape[at + 1:]
    if _exact_parts(ordered, lead, sliced, 0, []):
        return torch.stack(ordered, axis)   # every slice once, no broadcasting: no zeros
    parts = list(torch.unbind(zeros_with_lead(pieces[0], lead, shape), axis))
    for position, piece in zip(positions, pieces):
        parts[position] = parts[position] + piece
    return torch.stack(parts, axis)


def _in_order(pieces: List[Tensor], positions: List[int], count: int) -> List[Tensor]:
    """``pieces`` sorted by position when each of the ``count`` positions occurs exactly once,
    else ``[]``."""
    if len(positions) != count:
        return []
    ordered: List[Tensor] = [pieces[0]] * count
    seen: List[bool] = [False] * count
    for position, piece in zip(positions, pieces):
        if position < 0 or position >= count or seen[position]:
            return []
        seen[position] = True
        ordered[position] = piece
    return ordered


def _exact_parts(ordered: List[Tensor], lead: int, shape: List[int], dim: int,
                 sizes: List[int]) -> bool:
    """Whether ``ordered`` (non-empty) are the parts of a ``[*lead, *shape]`` tensor cut along
    ``dim`` into ``sizes`` (``[]``: slices, ``shape`` being a slice's shape) with one lead
    shape and dtype, none broadcast (so joining them needs no zeros and no additions)."""
    if len(ordered) == 0:
        return False
    head = ordered[0].shape[:lead]
    for k, piece in enumerate(ordered):
        expected = list(shape)
        if len(sizes) > 0:
            expected[dim] = sizes[k]
        if piece.dim() != lead + len(shape) or piece.shape[:lead] != head or \
                list(piece.shape[lead:]) != expected or piece.dtype != ordered[0].dtype:
            return False
    return True


def _pieces(g) -> tuple[list, list]:
    if not isinstance(g, Pieces):
        raise TypeError("the cotangent of a split/chunk/unbind result must be Pieces (the "
                        "tuple is used as a whole, e.g. passed to cat: pick its pieces instead)")
    return g.lists()


def _split_vjp(size_helper, sizes_name: str):
    """Jᵀ of split/chunk: ``size_helper(length, k)`` gives the piece sizes (None: a list)."""
    def vjp(g, c: Ctx):
        pieces, positions = _pieces(g)
        dim, spec = c.bound["dim"], getattr(c.args, sizes_name)
        x = _first_arg(c)
        sizes = list(spec) if isinstance(spec, (list, tuple)) else \
            c.call(size_helper, x.size(dim), spec)
        return c.call(unsplit, pieces, positions, c.lead, x.shape, dim, sizes)
    return vjp


def _first_arg(c: Ctx):
    return getattr(c.args, next(iter(c.bound)))


def _unbind_vjp(g, c: Ctx):
    pieces, positions = _pieces(g)
    return c.call(unstack, pieces, positions, c.lead, _first_arg(c).shape, c.bound["dim"])


def _along_samples(what: str):
    return lambda b: f"it {what} along the sample axis 0" if b["dim"] == 0 else None


_PIECES_DOC = ("(y₁, y₂, ...) = pieces of x along dim;  Jᵀ puts each used piece's cotangent "
               "back at its place (zeros for unused pieces).")
affine([torch.split], "split", "tensor, split_size_or_sections, dim=0", doc=_PIECES_DOC,
       vjp={"tensor": _split_vjp(split_sizes, "split_size_or_sections")},
       mixes_samples=_along_samples("splits"), traits=(VIEW, PIECES))
affine(["split"], "split", "input, split_size, dim=0", doc=_PIECES_DOC,
       vjp={"input": _split_vjp(split_sizes, "split_size")},
       mixes_samples=_along_samples("splits"), traits=(VIEW, PIECES))
affine([torch.chunk, "chunk"], "chunk", "input, chunks, dim=0", doc=_PIECES_DOC,
       vjp={"input": _split_vjp(chunk_sizes, "chunks")},
       mixes_samples=_along_samples("chunks"), traits=(VIEW, PIECES))
affine([torch.unbind, "unbind"], "unbind", "input, dim=0", doc=_PIECES_DOC,
       vjp={"input": _unbind_vjp}, mixes_samples=_along_samples("unbinds"), traits=(VIEW, PIECES))


def _stack_vjp(g, c: Ctx) -> list:
    dim = c.bound["dim"]
    pieces = torch.unbind(g, _shift(dim, c.lead))
    return [pieces[i] for i in range(len(c.bound["tensors"]))]


concatenation([torch.stack], "stack", "tensors, dim=0",
              doc="y = [x₁, x₂, ...] stacked along a new axis dim;  Jᵀg unbinds g along it.",
              vjp={"tensors": _stack_vjp}, mixes_samples=_along_samples("stacks"),
              unsupported=_whole_tuple, axis_rank_offset=1)


# -- broadcasting copies: expand, expand_as, broadcast_to, repeat ----------------------------
def unrepeat(g: Tensor, lead: int, shape: List[int], repeats: List[int]) -> Tensor:
    """Jacobian-transpose of ``x.repeat(repeats)``: sum the copies, ``[*lead, *shape]``."""
    padded = [1] * (len(repeats) - len(shape)) + list(shape)
    split: List[int] = list(g.shape[:lead])
    for r, s in zip(repeats, padded):
        split += [r, s]
    summed = [lead + 2 * i for i in range(len(repeats))]
    return g.reshape(split).sum(summed).reshape(list(g.shape[:lead]) + list(shape))


def unrepeat_per_sample(g: Tensor, lead: int, shape: List[int], repeats: List[int]) -> Tensor:
    """Per-sample Jacobian-transpose of ``x.repeat(repeats)`` for an ``x`` without a sample
    axis copied once per sample along axis 0 (SigLIP's ``probe.repeat(batch_size, 1, 1)``):
    ``[*lead, N, ...]`` -> ``[*lead, N, *shape]``, the copies along the other axes summed.
    ``x``'s axis 0 (after padding its shape with 1s to the repeats' length) must have size 1:
    otherwise its rows are not one copy per sample, which raises."""
    padded = [1] * (len(repeats) - len(shape)) + list(shape)
    if padded[0] != 1:
        raise ValueError("fxcurv: x.repeat(n, ...) along the sample axis of an x with {} rows "
                         "gives each sample a different row; per-sample quantities need one "
                         "copy of x per sample (a size-1 axis 0)".format(padded[0]))
    summed = unrepeat(g, lead + 1, padded[1:], repeats[1:])
    return summed.reshape(list(g.shape[:lead + 1]) + list(shape))


def to_batch(t: Tensor, lead: int, shape: List[int]) -> Tensor:
    """Per-sample undo of broadcasting, ``[*lead, N, *broadcast]`` -> ``[*lead, N, *shape]``,
    for an operand of ``shape`` without a sample axis; one as long as ``t``'s per-lead shape
    has a size-1 axis 0 that broadcast against the samples (kept, per sample)."""
    if t.dim() - lead == len(shape):
        return sum_to_shape(t, lead + 1, list(shape[1:])).unsqueeze(lead + 1)
    return sum_to_shape(t, lead + 1, shape)


def _sum_back(g, c: Ctx):
    """Jᵀ of a broadcasting copy: sum ``g`` over the broadcast axes back to the input."""
    return c.call(sum_to_shape, g, c.lead, c.args.input.shape)


def _sum_back_per_sample(g, c: Ctx):
    """A parameter broadcast over the samples (``bias.expand(N, 1, E)``): per sample."""
    return c.call(to_batch, g, c.lead, c.args.input.shape)


_EXPAND_DOC = ("y = x broadcast to a larger shape (no copy);  Jᵀg sums g over the broadcast "
               "axes; per sample (a parameter expanded over the samples) all but axis 0.")
_EXPAND = dict(vjp={"input": _sum_back}, batch_grad={"input": _sum_back_per_sample},
               traits=(VIEW,))
affine(["expand"], "expand", "input, *sizes", doc=_EXPAND_DOC, **_EXPAND)
affine([torch.broadcast_to], "broadcast_to", "input, size", doc=_EXPAND_DOC, **_EXPAND)
affine(["expand_as"], "expand_as", "input, other", doc=_EXPAND_DOC,
       vjp={"input": _sum_back, "other": None}, batch_grad={"input": _sum_back_per_sample},
       traits=(VIEW,))
affine(["repeat"], "repeat", "input, *repeats",
       doc="y = x tiled repeats[i] times along axis i;  Jᵀg sums the copies; per sample (an x "
           "without samples copied once per sample: a size-1 axis 0) all but axis 0.",
       vjp={"input": lambda g, c: c.call(unrepeat, g, c.lead, c.args.input.shape,
                                         varargs(c.args.repeats))},
       batch_grad={"input": lambda g, c: c.call(unrepeat_per_sample, g, c.lead,
                                                c.args.input.shape, varargs(c.args.repeats))},
       mixes_samples=lambda b: "it repeats along the sample axis 0 (or adds axes before it)"
       if varargs(b["repeats"])[0] != 1 else None)


# -- tensor_split: lowered to split ------------------------------------------------------------
def section_size(length: int, sections: int, k: int) -> int:
    """Size of piece ``k`` of ``tensor_split(x, sections)`` along an axis of ``length``: the
    first ``length % sections`` pieces one longer."""
    return (length + sections - 1 - k) // sections


def index_piece_size(length: int, start: int, stop: int) -> int:
    """Size of ``x[start:stop]`` along an axis of ``length`` (``0 <= start <= stop``)."""
    return min(stop, length) - min(start, length)


register([section_size, index_piece_size], "tensor_split_size", "length, *bounds",
         constant=True, doc="Integer sizes: no derivative.")


def _split_spec(b: dict):
    """``tensor_split``'s sections (an int) or indices (a list) from any of its spellings."""
    for key in ("indices_or_sections", "sections", "indices"):
        if b[key] is not None:
            return b[key]
    return None


def _tensor_split_unsupported(b: dict) -> Optional[str]:
    spec = _split_spec(b)
    if isinstance(spec, int) and not isinstance(spec, bool) and spec > 0:
        return None
    if isinstance(spec, (list, tuple)) and all(
            isinstance(i, int) and not isinstance(i, bool) for i in spec) and \
            all(0 <= i <= j for i, j in zip([0, *spec], spec)):
        return None
    return (f"tensor_split by {spec!r} has no rule (only a positive number of sections or "
            "non-negative, non-decreasing integer indices)")


def _lower_tensor_split(c: Ctx):
    """``split`` with the sizes of ``tensor_split``'s pieces (from the axis length when the
    step runs)."""
    x, dim, spec = c.args.input, c.bound["dim"], _split_spec(c.bound)
    length = x.size(dim)
    if isinstance(spec, int):
        sizes = [c.call(section_size, length, spec, k) for k in range(spec)]
    else:
        bounds = [0, *spec]
        sizes = [c.call(index_piece_size, length, a, b) for a, b in zip(bounds, spec)]
        sizes.append(c.call(index_piece_size, length, spec[-1] if spec else 0, 2 ** 62))
    return torch.split(x, sizes, dim)


register([torch.tensor_split, "tensor_split"], "tensor_split",
         "input, indices_or_sections=None, dim=0, *, sections=None, indices=None",
         doc="(y₁, y₂, ...) = x cut along dim into n near-equal sections or at indices;  "
             "lowered to split (the piece sizes from the axis length).",
         lower=_lower_tensor_split, unsupported=_tensor_split_unsupported)


# -- narrow, movedim, repeat_interleave, Tensor.unfold ---------------------------------------
def _lower_narrow(c: Ctx):
    """``x.narrow(dim, start, length)`` is ``x[:, ..., start:start + length]`` (on axis
    ``dim``): basic indexing."""
    start, length = c.bound["start"], c.bound["length"]
    stop = start + length
    piece = slice(start, None if start < 0 <= stop else stop)
    return c.args.input[on_axis(c.bound["dim"], piece)]


register([torch.narrow, "narrow"], "narrow", "input, dim, start, length",
         doc=_lower_narrow.__doc__ + " Lowered to getitem.", lower=_lower_narrow,
         unsupported=lambda b: None if all(isinstance(b[k], int) for k in
                                           ("dim", "start", "length"))
         else "narrow with a traced dim, start or length has no rule")


def _axes_list(value) -> List[int]:
    return [value] if isinstance(value, int) else list(value)


def _movedim_back(g, c: Ctx):
    """``Jᵀg``: the moved axes moved back (axes of the operand shifted past ``c.lead``)."""
    source = [_shift(d, c.lead) for d in _axes_list(c.bound["source"])]
    destination = [_shift(d, c.lead) for d in _axes_list(c.bound["destination"])]
    return torch.movedim(g, destination, source)


def _movedim_forward(t, c: Ctx):
    """``J t`` of a tangent with one leading axis: the same move."""
    source = [_shift(d, 1) for d in _axes_list(c.bound["source"])]
    destination = [_shift(d, 1) for d in _axes_list(c.bound["destination"])]
    return torch.movedim(t, source, destination)


permutation([torch.movedim, torch.moveaxis, "movedim", "moveaxis"], "movedim",
            "input, source, destination", traits=(VIEW,),
            doc="y = x with the axes source moved to destination;  Jᵀg moves them back.",
            vjp={"input": _movedim_back}, jvp={"input": _movedim_forward},
            mixes_samples=lambda b: "it moves the sample axis 0" if 0 in
            _axes_list(b["source"]) + _axes_list(b["destination"]) else None)


def repeat_interleave_back(g: Tensor, repeats: int, dim: int, lead: int) -> Tensor:
    """``Jᵀg`` of ``repeat_interleave(x, repeats, dim)``: the ``repeats`` copies of each entry
    summed (``g`` with ``lead`` leading axes)."""
    if dim >= 0:
        return g.unflatten(dim + lead, (-1, repeats)).sum(dim + lead + 1)
    return g.unflatten(dim, (-1, repeats)).sum(dim)


def _repeat_interleave_unsupported(b: dict) -> Optional[str]:
    repeats = b["repeats"]
    if isinstance(repeats, bool) or not (isinstance(repeats, int) or is_scalar_node(repeats)) \
            or not isinstance(b["dim"], int):
        return ("repeat_interleave has a rule for an int repeats (a number or one computed "
                "from sizes) along a given dim (a tensor of repeats, or dim=None, flattens "
                "first: use .flatten() then dim=0)")
    return None


affine([torch.repeat_interleave, "repeat_interleave"], "repeat_interleave",
       "input, repeats, dim=None, *, output_size=None",
       doc="y = x with each entry along dim repeated r times;  Jᵀg = g summed over each "
           "entry's r copies.  Linear: zero Hessian. Along the sample axis 0 each sample "
           "gets r rows in sample order (GCViT's global query per window): checked when "
           "the step runs, like a reshape.",
       vjp={"input": lambda g, c: c.call(repeat_interleave_back, g, c.args.repeats,
                                         c.bound["dim"], c.lead)},
       jvp={"input": lambda t, c: t.repeat_interleave(c.args.repeats,
                                                      _shift(c.bound["dim"], 1))},
       unsupported=_repeat_interleave_unsupported, traits=(RESHAPES,))


def sliding_windows_back(g: Tensor, x: Tensor, dim: int, size: int, step: int,
                         lead: int) -> Tensor:
    """``Jᵀg`` of ``x.unfold(dim, size, step)``: each window's cotangent added back at its
    entries (overlapping windows add up); ``g`` with ``lead`` leading axes."""
    sizes: List[int] = list(g.shape[:lead]) + list(x.shape)
    return torch.ops.aten.unfold_backward(g, sizes, dim % x.dim() + lead, size, step)


affine(["unfold"], "sliding_windows", "input, dimension, size, step",
       doc="Tensor.unfold: y[..., i, ..., k] = x[..., i·step + k, ...] (windows of size along "
           "dimension, as a last axis);  Jᵀg adds each window back (overlaps sum).  Linear.",
       vjp={"input": lambda g, c: c.call(sliding_windows_back, g, c.args.input,
                                         c.bound["dimension"], c.bound["size"],
                                         c.bound["step"], c.lead)},
       jvp={"input": lambda t, c: t.unfold(_shift(c.bound["dimension"], 1), c.bound["size"],
                                           c.bound["step"])},
       mixes_samples=lambda b: ("it takes windows along the sample axis 0"
                                if b["dimension"] == 0 else None))
