"""Shape ops (a permutation or reshape of the entries: ``Jᵀ`` is the inverse move), padding,
concatenation, and ops whose output has no derivative (fills, masks, ``detach``)."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from .helpers import permute_back, reshape_lead, reverse_dims, split_back, unpad
from .registry import Ctx, register


AFFINE = {"hessian_is_zero": True, "jointly_affine": True}  # pure data movement: y = P x


def _reshape_back(g, c: Ctx):
    """``Jᵀg`` of any op that only rearranges entries in memory order: reshape to the input."""
    return c.call(reshape_lead, g, c.lead, c.args.input.shape)


def _shift(dim: int, lead: int) -> int:
    """An axis index of the op's operand, counted in a tensor with ``lead`` leading axes."""
    return dim + lead if dim >= 0 else dim


def _varargs(values: tuple) -> list:
    """``x.view(2, 3)`` and ``x.view((2, 3))`` both give ``[2, 3]``."""
    if len(values) == 1 and isinstance(values[0], (list, tuple)):
        return list(values[0])
    return list(values)


def _flatten_mixes(b: dict) -> Optional[str]:
    if b["start_dim"] == 0 and b["end_dim"] != 0:
        return "it flattens the sample axis 0 into other axes"
    return None


def _moves_axis0(dims: list) -> Optional[str]:
    return "it moves the sample axis 0" if dims and dims[0] != 0 else None


register([torch.flatten, "flatten"], "flatten", "input, start_dim=0, end_dim=-1",
         doc="y = x reshaped (axes start..end merged);  Jᵀg = g reshaped to x.", **AFFINE,
         vjp={"input": _reshape_back}, mixes_samples=_flatten_mixes)
register(["view", "reshape"], "reshape", "input, *shape",
         doc="y = x reshaped;  Jᵀg = g reshaped to x.", **AFFINE, vjp={"input": _reshape_back})
register([torch.reshape], "reshape", "input, shape",
         doc="y = x reshaped;  Jᵀg = g reshaped to x.", **AFFINE, vjp={"input": _reshape_back})
register([torch.squeeze, "squeeze"], "squeeze", "input, dim=None",
         doc="y = x without size-1 axes;  Jᵀg = g reshaped to x.", **AFFINE, vjp={"input": _reshape_back})
register([torch.unsqueeze, "unsqueeze"], "unsqueeze", "input, dim",
         doc="y = x with a new size-1 axis;  Jᵀg = g reshaped to x.", **AFFINE, vjp={"input": _reshape_back})
register(["contiguous", "clone", torch.clone], "identity", "input, memory_format=None",
         doc="y = x;  Jᵀg = g.", **AFFINE, vjp={"input": lambda g, c: g})

register(["permute"], "permute", "input, *dims",
         doc="y = x with axes permuted;  Jᵀg = g with the inverse permutation.", **AFFINE,
         vjp={"input": lambda g, c: c.call(permute_back, g, c.lead, _varargs(c.bound["dims"]))},
         mixes_samples=lambda b: _moves_axis0(_varargs(b["dims"])))
register([torch.permute], "permute", "input, dims",
         doc="y = x with axes permuted;  Jᵀg = g with the inverse permutation.", **AFFINE,
         vjp={"input": lambda g, c: c.call(permute_back, g, c.lead, list(c.bound["dims"]))},
         mixes_samples=lambda b: _moves_axis0(list(b["dims"])))
register([torch.transpose, "transpose", "swapaxes"], "transpose", "input, dim0, dim1",
         doc="y = x with two axes swapped;  Jᵀg swaps them back.", **AFFINE,
         vjp={"input": lambda g, c: g.transpose(_shift(c.bound["dim0"], c.lead),
                                                _shift(c.bound["dim1"], c.lead))},
         mixes_samples=lambda b: ("it moves the sample axis 0"
                                  if 0 in (b["dim0"], b["dim1"]) else None))
register([torch.t, "t"], "t", "input",
         doc="y = xᵀ (2-D);  Jᵀg = gᵀ.", **AFFINE, vjp={"input": lambda g, c: g.transpose(-1, -2)},
         mixes_samples=lambda b: "it moves the sample axis 0")


def _pad_unsupported(b: dict) -> Optional[str]:
    if b["mode"] != "constant":
        return f"padding mode '{b['mode']}' has no rule (only 'constant')"
    return None


register([F.pad], "pad", "input, pad, mode='constant', value=None",
         doc="y = x with constant borders;  Jᵀg = g cropped back to x.", **AFFINE,
         vjp={"input": lambda g, c: c.call(unpad, g, list(c.bound["pad"]))},
         unsupported=_pad_unsupported)


def _cat_vjp(g, c: Ctx) -> list:
    dim = c.bound["dim"]
    sizes = [t.size(dim) for t in c.args.tensors]
    pieces = c.call(split_back, g, c.lead, dim, sizes)
    return [pieces[i] for i in range(len(sizes))]


register([torch.cat, torch.concat, torch.concatenate], "cat", "tensors, dim=0",
         doc="y = [x₁, x₂, ...] along dim;  Jᵀg splits g into the pieces.", **AFFINE,
         vjp={"tensors": _cat_vjp},
         mixes_samples=lambda b: "it concatenates along the sample axis 0"
         if b["dim"] == 0 else None)


register([getattr], "getattr", "obj, name",
         doc="x.T / x.mT: y = x with the last two axes swapped;  Jᵀg swaps them back. Other "
             "attributes (shape, dtype, device) have no derivative.",
         constant=lambda b: b["name"] not in ("T", "mT"), **AFFINE,
         vjp={"obj": lambda g, c: g.transpose(-1, -2) if c.bound["name"] == "mT"
              else c.call(reverse_dims, g, c.lead)})


def _constant(targets: list, name: str, params: str) -> None:
    register(targets, name, params, constant=True,
             doc="No derivative: the output does not depend differentiably on the inputs.")


_constant([torch.zeros_like, torch.ones_like, torch.empty_like, torch.rand_like,
           torch.randn_like], "fill_like", "input, *args, **kwargs")
_constant([torch.full_like], "full_like", "input, fill_value, **kwargs")
_constant([torch.bernoulli, "bernoulli"], "bernoulli", "input, *args, **kwargs")
_constant([torch.detach, "detach"], "detach", "input")
_constant(["size", "dim", "numel", "ndimension", "nelement"], "size", "input, *args")
_constant([torch.argmax, "argmax", torch.argmin, "argmin"], "argmax", "input, *args, **kwargs")
