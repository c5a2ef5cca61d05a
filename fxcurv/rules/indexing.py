"""Index-driven data movement: gather, index_select, rows of a table picked by an integer
tensor (``table[index]``), flip, roll, pixel (un)shuffle. Each is linear in its data operand
(``y = P x`` for a selection or permutation ``P``), so its Hessian is zero and ``Jᵀg = Pᵀg``
scatters (sums) or moves the cotangent back; index operands have no derivative.
"""
from __future__ import annotations

from typing import Any, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import KEPT, Ctx, affine, register


def _lead_zeros(g: Tensor, lead: int, shape: List[int]) -> Tensor:
    """Zeros ``[*g.shape[:lead], *shape]`` in ``g``'s dtype and device."""
    head: List[int] = list(g.shape[:lead])
    return torch.zeros(head + shape, dtype=g.dtype, device=g.device)


def gather_back(g: Tensor, x: Tensor, dim: int, index: Tensor, lead: int) -> Tensor:
    """Jacobian-transpose of ``gather(x, dim, index)``: ``g`` scatter-added at ``index``."""
    head: List[int] = list(g.shape[:lead])
    full = index.expand(head + list(index.shape))
    return _lead_zeros(g, lead, list(x.shape)).scatter_add(dim % x.dim() + lead, full, g)


def index_select_back(g: Tensor, x: Tensor, dim: int, index: Tensor, lead: int) -> Tensor:
    """Jacobian-transpose of ``index_select(x, dim, index)``: ``g`` index-added at ``index``."""
    return _lead_zeros(g, lead, list(x.shape)).index_add(dim % x.dim() + lead, index, g)


def _along(what: str):
    """``mixes_samples`` of an op that moves entries along ``dim``: axis 0 mixes samples."""
    return lambda b: f"it {what} along the sample axis 0" if b["dim"] == 0 else None


def _back_along(helper) -> dict:
    """``Jᵀg`` of an op that picks entries of ``input`` at ``index`` along ``dim``: ``g`` added
    back into zeros of the input's shape by ``helper``; the index has no derivative."""
    return {"input": lambda g, c: c.call(helper, g, c.args.input, c.bound["dim"], c.args.index,
                                         c.lead), "index": None}


def input_part(inputs: Any, key: Any) -> Any:
    """``inputs[key]`` of a structured model input or target (``fxcurv/inputs.py``): one of a
    tuple, list or dict of tensors. A tensor is refused: its ``x[0]`` would be sample 0, not a
    part, and the step was compiled for parts."""
    if isinstance(inputs, Tensor):
        raise ValueError(f"fxcurv: the step reads [{key!r}] of the input x or target y as a "
                         "part of a tuple, list or dict of tensors, but got a tensor of shape "
                         f"{list(inputs.shape)}; pass the parts (indexing the samples of a "
                         "tensor by a constant is not supported)")
    return inputs[key]


register([input_part], "input_part", "inputs, key", constant=True, samples=KEPT,
         doc="A part of a structured input or target (a tuple, list or dict of tensors, each "
             "with the samples along axis 0): data, no derivative.")

affine([torch.gather, "gather"], "gather", "input, dim, index, *, sparse_grad=False",
       doc="y[..i..] = x[..index[..i..]..] along dim (index: same rank as x);  Jᵀg = zeros "
           "of x's shape with g scatter-added at index.  Linear: zero Hessian.",
       vjp=_back_along(gather_back), mixes_samples=_along("gathers"))

affine([torch.index_select, "index_select"], "index_select", "input, dim, index",
       doc="y = x with the entries index[k] of axis dim (index: 1-D);  Jᵀg = zeros of x's "
           "shape with g index-added along dim.  Linear: zero Hessian.",
       vjp=_back_along(index_select_back), mixes_samples=_along("selects"))


def checked_index(index: Tensor) -> Tensor:
    """Call-time check of ``x[index]``: an integer tensor, flattened (a boolean mask selects a
    data-dependent number of entries)."""
    if index.dtype == torch.bool or index.dtype == torch.uint8:
        raise ValueError("fxcurv: x[mask] with a boolean mask selects a data-dependent number "
                         "of entries; use torch.where(mask, x, 0) or integer indices")
    return index.reshape(-1)


def rows_shape(index: Tensor, x: Tensor, axis: int) -> List[int]:
    """The shape of ``x[:, .., index]`` (``index`` at ``axis``):
    ``[*x.shape[:axis], *index.shape, *x.shape[axis + 1:]]``."""
    return list(x.shape[:axis]) + list(index.shape) + list(x.shape[axis + 1:])


def lower_tensor_index(x, index, axis: int = 0):
    """``x[:, .., index]`` for an integer tensor ``index`` at ``axis`` (advanced indexing of
    one axis), as ``index_select(x, axis, index.flatten())`` reshaped to
    :func:`rows_shape`."""
    flat = x.tracer.create_proxy("call_function", checked_index, (index,), {})
    picked = torch.index_select(x, axis, flat)
    shape = x.tracer.create_proxy("call_function", rows_shape, (index, x, axis), {})
    return picked.reshape(shape)


register([checked_index, rows_shape], "index_check", "index, *args", constant=True,
         doc="Call-time check / shape of x[index]: no derivative.")


def per_sample_take(input: Tensor, rows: Tensor, index: Tensor) -> Tensor:
    """``input[rows, index]`` where ``rows = torch.arange(N)``: row ``n`` of the result is
    ``input[n, index[n]]`` (last-token pooling, ``h[torch.arange(N), lengths - 1]``). Checked
    when the step runs: ``rows`` covers the ``N`` samples and ``index`` has one entry each."""
    samples = input.size(0)
    if rows.numel() != samples or index.dim() != 1 or index.size(0) != samples:
        raise ValueError(f"fxcurv: x[torch.arange(n), index] picks one entry per sample: x has "
                         f"{samples} samples, arange {rows.numel()} and index shape "
                         f"{list(index.shape)} (one entry per sample needed)")
    return input[rows, index]


def take_with_lead(t: Tensor, rows: Tensor, index: Tensor, lead: int) -> Tensor:
    """:func:`per_sample_take` of ``t`` ``[*lead, N, T, *rest]`` -> ``[*lead, N, *rest]``."""
    head: List[int] = list(t.shape[:lead])
    flat = t.reshape([-1] + list(t.shape[lead:]))
    return flat[:, rows, index].reshape(head + [t.size(lead)] + list(t.shape[lead + 2:]))


def put_with_lead(g: Tensor, x: Tensor, rows: Tensor, index: Tensor, lead: int) -> Tensor:
    """Jacobian-transpose of :func:`per_sample_take`: ``g`` ``[*lead, N, *rest]`` put at
    ``[n, index[n]]`` of zeros ``[*lead, *x.shape]``."""
    head: List[int] = list(g.shape[:lead])
    flat = g.reshape([-1] + list(g.shape[lead:]))
    zeros = torch.zeros([flat.size(0)] + list(x.shape), dtype=g.dtype, device=g.device)
    vectors = torch.arange(flat.size(0), device=g.device).unsqueeze(1)
    filled = zeros.index_put((vectors, rows.unsqueeze(0), index.unsqueeze(0)), flat)
    return filled.reshape(head + list(x.shape))


affine([per_sample_take], "per_sample_take", "input, rows, index",
       doc="y[n] = x[n, index[n]] (x[torch.arange(N), index]: last-token pooling);  "
           "Jᵀg = zeros of x's shape with g[n] at [n, index[n]].  Linear: zero Hessian; row n "
           "reads sample n alone.",
       vjp={"input": lambda g, c: c.call(put_with_lead, g, c.args.input, c.args.rows,
                                         c.args.index, c.lead),
            "rows": None, "index": None},
       jvp={"input": lambda t, c: c.call(take_with_lead, t, c.args.rows, c.args.index, 1)})


def _dims_of(b: dict) -> list:
    dims = b["dims"]
    if isinstance(dims, int):
        return [dims]
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        return list(dims[0])
    return list(dims)


def _shifted(dims: list, lead: int) -> list:
    return [d + lead if d >= 0 else d for d in dims]


def _moves_samples(b: dict) -> Optional[str]:
    dims = _dims_of(b) if b["dims"] is not None else [0]
    return "it moves entries along the sample axis 0" if 0 in dims else None


_FLIP = dict(doc="y = x reversed along dims;  Jᵀg = g reversed along the same dims.",
             vjp={"input": lambda g, c: g.flip(_shifted(_dims_of(c.bound), c.lead))},
             mixes_samples=_moves_samples)
affine([torch.flip], "flip", "input, dims", **_FLIP)
affine(["flip"], "flip", "input, *dims", **_FLIP)


def _roll_unsupported(b: dict) -> Optional[str]:
    if b["dims"] is None or b["dims"] == ():
        return "roll without dims (over the flattened tensor) has no rule: give dims"
    return None


def roll_back(g: Tensor, shifts: List[int], dims: List[int], lead: int) -> Tensor:
    """Jacobian-transpose of ``roll(x, shifts, dims)``: ``g`` rolled back by ``-shifts``."""
    return torch.roll(g, [-s for s in shifts], [d + lead if d >= 0 else d for d in dims])


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _roll_vjp(g, c: Ctx):
    shifts = c.args.shifts  # a list, an int, or a node computing a list (sizes)
    if not hasattr(shifts, "node"):
        shifts = _as_list(shifts)
    return c.call(roll_back, g, shifts, _as_list(c.bound["dims"]), c.lead)


affine([torch.roll, "roll"], "roll", "input, shifts, dims=None",
       doc="y = x cyclically shifted by shifts along dims;  Jᵀg = g shifted back (-shifts).",
       vjp={"input": _roll_vjp}, unsupported=_roll_unsupported,
       mixes_samples=_moves_samples)

affine([F.pixel_shuffle], "pixel_shuffle", "input, upscale_factor",
       doc="y[*, C, H·r, W·r] = x[*, C·r², H, W] rearranged;  Jᵀg = pixel_unshuffle(g, r).",
       vjp={"input": lambda g, c: F.pixel_unshuffle(g, c.bound["upscale_factor"])},
       sandwich={"input": "shared"})
affine([F.pixel_unshuffle], "pixel_unshuffle",
       "input, downscale_factor",
       doc="the inverse move of pixel_shuffle;  Jᵀg = pixel_shuffle(g, r).",
       vjp={"input": lambda g, c: F.pixel_shuffle(g, c.bound["downscale_factor"])},
       sandwich={"input": "shared"})
