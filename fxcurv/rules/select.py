"""Selections along an axis that return ``(values, indices)``: ``max``/``min`` with a ``dim``,
``sort``, ``topk``. ``values = x.gather(dim, indices)`` with ``indices`` from the forward, so
the op is piecewise linear: ``Jᵀg`` scatters ``g`` back to the chosen positions (as autograd
does, ties go to the index the forward returned) and the second derivative is zero.
``indices`` (position 1, or the ``.indices`` field) is an integer result with no derivative;
picking the pieces is ``getitem``'s rule (``shape.py``).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.fx as fx
from torch import Tensor

from .registry import PIECES, Ctx, register


def scatter_back(g: Tensor, lead: int, shape: List[int], dim: int, index: Tensor,
                 keepdim: bool) -> Tensor:
    """Jacobian-transpose of ``values = x.gather(dim, index)``: ``g`` ``[*lead, *out]`` added
    at ``index`` along ``dim`` into zeros ``[*lead, *shape]`` (``keepdim=False``: ``dim`` was
    removed from ``out`` and from ``index``)."""
    axis = dim % len(shape)
    if not keepdim:
        g = g.unsqueeze(lead + axis)
        index = index.unsqueeze(axis)
    zeros = torch.zeros(list(g.shape[:lead]) + list(shape), dtype=g.dtype, device=g.device)
    return zeros.scatter_add(lead + axis, index.expand(g.shape), g)


def _selection_vjp(keepdim_arg: Optional[str]):
    """Jᵀ for the values piece of a selection; ``keepdim_arg`` names the op's keepdim flag
    (None: the axis is kept, as for sort and topk)."""
    def vjp(g, c: Ctx):
        from .shape import Pieces  # noqa: PLC0415 (shape imports this module's names)
        if not isinstance(g, Pieces):
            raise TypeError("the (values, indices) result is used as a whole; pick .values")
        pieces, positions = g.lists()
        values = [p for p, pos in zip(pieces, positions) if pos % 2 == 0]
        total = values[0]
        for more in values[1:]:
            total = total + more
        keepdim = True if keepdim_arg is None else bool(c.bound[keepdim_arg])
        return c.call(scatter_back, total, c.lead, c.args.input.shape, c.bound["dim"],
                      c.out[1], keepdim)
    return vjp


def _needs_int_dim(b: dict) -> Optional[str]:
    if b["dim"] is None:
        return ("max/min over all entries (no dim) has no rule; use torch.amax / torch.amin "
                "or give a dim")
    if not isinstance(b["dim"], (int, fx.Node)):
        return "max/min with a dim that is not an int has no rule"
    return None


def _lower_two_tensors(pairwise):
    """``torch.max(a, b)`` / ``torch.min(a, b)`` (a tensor in place of ``dim``): the
    elementwise ``maximum`` / ``minimum`` torch dispatches them to; other calls stay."""
    def lower(c: Ctx):
        if not isinstance(c.bound["dim"], fx.Node):
            return None
        return pairwise(c.args.input, c.args.dim)
    return lower


def _mixes(b: dict) -> Optional[str]:
    dim = b.get("dim")
    return "it selects along the sample axis 0" if isinstance(dim, int) and dim == 0 else None


_SELECT = {"hessian_is_zero": True, "mixes_samples": _mixes, "traits": (PIECES,)}
_DOC = ("(values, indices): values = x.gather(dim, indices);  Jᵀg scatters g to indices "
        "(zeros elsewhere);  second derivative 0.")
for _targets, _name, _pairwise in (([torch.max, "max"], "max", torch.maximum),
                                   ([torch.min, "min"], "min", torch.minimum)):
    register(_targets, _name, "input, dim=None, keepdim=False",
             doc=_DOC + " With a tensor in place of dim: lowered to the elementwise " +
             _pairwise.__name__ + ".",
             vjp={"input": _selection_vjp("keepdim")}, unsupported=_needs_int_dim,
             lower=_lower_two_tensors(_pairwise), **_SELECT)
register([torch.sort, "sort"], "sort", "input, dim=-1, descending=False, stable=False",
         doc=_DOC, vjp={"input": _selection_vjp(None)}, **_SELECT)
register([torch.topk, "topk"], "topk", "input, k, dim=-1, largest=True, sorted=True",
         doc=_DOC, vjp={"input": _selection_vjp(None)}, **_SELECT)

SELECTIONS = ("max", "min", "sort", "topk")  # rules whose output is (values, indices)
