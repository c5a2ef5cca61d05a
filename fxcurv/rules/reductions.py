"""Reductions and scans beyond sum/mean: logsumexp, var/std, norms (lowered to ruled ops by
the normalize pass, so every quantity, second order included, composes their rules) and cumsum.
"""
from __future__ import annotations

from typing import Any, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .arith import _dims, _reduces_samples
from .helpers import reduced_count
from .registry import Ctx, affine, register, unary


def _finite_max(x, dims, keepdim: bool):
    """``max_dim x`` of a detached ``x``, 0 where it is infinite (a constant, no derivative)."""
    peak = torch.amax(x.detach(), dims, keepdim=keepdim)
    return peak.masked_fill(torch.isinf(peak), 0.0)


def _lower_logsumexp(c: Ctx):
    """``y = log Σ_dim exp(x - m) + m`` with ``m = max_dim x`` taken from ``x.detach()`` (a
    constant shift: the value and every derivative are those of ``log Σ exp x``)."""
    x, dims, keepdim = c.args.input, _dims(c.bound["dim"]), c.bound["keepdim"]
    total = torch.sum(torch.exp(x - _finite_max(x, dims, True)), dims, keepdim=keepdim)
    return torch.log(total) + _finite_max(x, dims, keepdim)


register([torch.logsumexp, "logsumexp"], "logsumexp", "input, dim, keepdim=False",
         doc=_lower_logsumexp.__doc__, lower=_lower_logsumexp)


def _correction(b: dict) -> tuple[Any, float]:
    """``(dim, correction)`` of ``var``/``std`` from any of torch's spellings
    (``x.var(1)``, ``x.var(unbiased=False)``, ``torch.var(x, True)``, ``correction=0``)."""
    dim, unbiased = b["dim"], b["unbiased"]
    if isinstance(dim, bool):
        dim, unbiased = None, dim
    if b["correction"] is not None:
        return dim, b["correction"]
    return dim, 0.0 if unbiased is False else 1.0


def _variance(c: Ctx):
    """``var = Σ_dim (x - mean_dim x)² / (count - correction)``."""
    dim, correction = _correction(c.bound)
    dims, x = _dims(dim), c.args.input
    centered = x - torch.mean(x, dims, keepdim=True)
    total = torch.sum(centered.square(), dims, keepdim=c.bound["keepdim"])
    return total / (c.call(reduced_count, x.shape, dims) - correction)


def _var_mixes(b: dict) -> Optional[str]:
    return _reduces_samples({"dim": _correction(b)[0]})


_MOMENT = "input, dim=None, unbiased=None, keepdim=False, *, correction=None"
register([torch.var, "var"], "var", _MOMENT, lower=_variance, mixes_samples=_var_mixes,
         doc="var = Σ_dim (x - mean x)² / (count - correction) (correction 1 unless "
             "unbiased=False or given), lowered to sub, mean, square, sum, div.")
register([torch.std, "std"], "std", _MOMENT, mixes_samples=_var_mixes,
         lower=lambda c: c.call(norm_root, _variance(c), 2.0),
         doc="std = √var, lowered as var then norm_root (zero derivative at var = 0, as "
             "torch's std backward).")


def _norm_order(b: dict, key: str) -> Any:
    order = b[key]
    return 2.0 if order in (None, "fro") else order


def _norm_unsupported(key: str):
    def check(b: dict) -> Optional[str]:
        order = _norm_order(b, key)
        if isinstance(order, bool) or not isinstance(order, (int, float)) or order <= 0 \
                or order == float("inf"):
            return (f"norm of order {order!r} has no rule (only finite positive p and 'fro'; "
                    "write max/abs norms with amax of abs, nuclear norms are not supported)")
        return None
    return check


def norm_root(total: Tensor, order: float) -> Tensor:
    """``y = s^(1/p)`` of a sum of ``p``-th powers (``√s`` for ``p = 2``): the last step of a
    ``p``-norm or of ``std`` (``p = 2``, ``s`` the variance)."""
    return torch.sqrt(total) if order == 2.0 else total.pow(1.0 / order)


def _at_zero_is_zero(y: Tensor, value: Tensor) -> Tensor:
    """``value`` where ``y != 0``, else 0 (torch's norm and std backward at ``‖x‖ = 0``)."""
    return torch.where(y == 0, torch.zeros_like(value), value)


unary([norm_root], "norm_root", "input, order",
      doc="y = s^{1/p};  y' = y/(p s), y'' = y (1 - p)/(p² s²) for s > 0; both 0 at s = 0, "
          "where torch's norm and std backward give the zero subgradient.",
      vjp={"input": lambda g, c: _at_zero_is_zero(
          c.out, g * (c.out / (c.args.input * c.args.order)))},
      residual={"input": lambda g, c: _at_zero_is_zero(
          c.out, g * (c.out * (1 - c.args.order)
                      / (c.args.input.square() * (c.args.order * c.args.order))))})


def norm_of(c: Ctx, x, order: float, dim: Any, keepdim: bool):
    """``‖x‖_p = (Σ_dim |x|^p)^(1/p)``: ``√Σ x²`` for p = 2, ``Σ |x|`` for p = 1, the root
    by :func:`norm_root`."""
    dims = _dims(dim)
    if order == 2:
        return c.call(norm_root, torch.sum(x.square(), dims, keepdim=keepdim), 2.0)
    if order == 1:
        return torch.sum(torch.abs(x), dims, keepdim=keepdim)
    return c.call(norm_root, torch.sum(torch.abs(x) ** order, dims, keepdim=keepdim),
                  float(order))


def _lower_norm(key: str):
    return lambda c: norm_of(c, c.args.input, _norm_order(c.bound, key), c.bound["dim"],
                             c.bound["keepdim"])


def _norm_mixes(b: dict) -> Optional[str]:
    return _reduces_samples({"dim": b["dim"]})


register([torch.norm, "norm"], "norm",
         "input, p='fro', dim=None, keepdim=False, out=None, dtype=None",
         lower=_lower_norm("p"), unsupported=_norm_unsupported("p"), mixes_samples=_norm_mixes,
         doc="‖x‖_p over dim (all axes by default) = (Σ |x|^p)^(1/p), lowered to square/abs, "
             "pow, sum, sqrt.")
register([torch.linalg.vector_norm], "vector_norm",
         "x, ord=2, dim=None, keepdim=False, *, dtype=None",
         lower=lambda c: _lower_norm("ord")(_as_input(c)), unsupported=_norm_unsupported("ord"),
         mixes_samples=_norm_mixes, doc="torch.linalg.vector_norm: as norm.")


def _as_input(c: Ctx) -> Ctx:
    """``vector_norm`` names its operand ``x``: present it as ``input`` to the norm lowering."""
    c.args.input = c.args.x
    return c


def _lower_normalize(c: Ctx):
    """``y = x / max(‖x‖_p, eps)``, the norm over ``dim`` kept for broadcasting (as torch):
    the norm's lowering, ``clamp``, ``div``."""
    b = c.bound
    norm = norm_of(c, c.args.input, _norm_order(b, "p"), b["dim"], True)
    return c.args.input / norm.clamp(min=b["eps"])


register([F.normalize], "normalize", "input, p=2.0, dim=1, eps=1e-12, out=None",
         lower=_lower_normalize, unsupported=lambda b: _norm_unsupported("p")(b) or (
             "normalize with out= has no rule" if b["out"] is not None else None),
         mixes_samples=_norm_mixes, doc=_lower_normalize.__doc__)


def extreme_vjp(g: Tensor, x: Tensor, dims: List[int], keepdim: bool, largest: bool,
                lead: int) -> Tensor:
    """Jᵀ of ``amax`` / ``amin`` over ``dims`` (all axes when empty), torch's: ``g`` shared
    equally among the entries that attain the extreme (``g · [x = y] / #ties``)."""
    axes: List[int] = []
    for d in dims:
        axes.append(d % x.dim())
    if len(axes) == 0:
        axes = list(range(x.dim()))
    extreme = torch.amax(x, axes, keepdim=True) if largest else torch.amin(x, axes, True)
    hits = (x == extreme).to(g.dtype)
    share = hits / hits.sum(axes, keepdim=True)
    if not keepdim:
        for axis in sorted(axes):
            g = g.unsqueeze(axis + lead)
    return g * share


def _extreme_mixes(b: dict) -> Optional[str]:
    return _reduces_samples({"dim": b["dim"] if len(_dims(b["dim"]) or []) else None})


for _target, _name, _largest in ((torch.amax, "amax", True), (torch.amin, "amin", False)):
    register([_target, _name], _name, "input, dim=(), keepdim=False",
             doc=f"y = {'max' if _largest else 'min'} of x over dim (all axes when empty);  "
                 "x̄ = g shared equally among the entries attaining it (torch's);  piecewise "
                 "linear: y'' = 0.",
             vjp={"input": lambda g, c, largest=_largest: c.call(
                 extreme_vjp, g, c.args.input, list(_dims(c.bound["dim"]) or []),
                 c.bound["keepdim"], largest, c.lead)},
             hessian_is_zero=True, mixes_samples=_extreme_mixes)


def cumsum_back(g: torch.Tensor, dim: int, lead: int) -> torch.Tensor:
    """Jacobian-transpose of ``cumsum(x, dim)``: the reversed cumulative sum of ``g``."""
    axis = dim + lead if dim >= 0 else dim
    return g.flip([axis]).cumsum(axis).flip([axis])


affine([torch.cumsum, "cumsum"], "cumsum", "input, dim, dtype=None",
       doc="y_i = Σ_{j <= i} x_j along dim;  (Jᵀg)_j = Σ_{i >= j} g_i (reversed cumsum); "
           "linear.",
       vjp={"input": lambda g, c: c.call(cumsum_back, g, c.bound["dim"], c.lead)},
       mixes_samples=lambda b: "it accumulates along the sample axis 0"
       if b["dim"] == 0 else None)
