"""Arithmetic with broadcasting and reductions: add, sub, mul, div, neg, pow, sum, mean.

For a broadcasting binary op ``y = a ∘ b`` the Jacobian-transpose of operand ``a`` is the
elementwise factor ``∂y/∂a`` times ``g``, summed over the axes that broadcasting created
(``sum_to_shape``). A Python-scalar operand has no cotangent.
"""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx

from .helpers import expand_reduced, reduced_count, sum_to_batch, sum_to_shape
from .registry import (AFFINE, BOOLEAN, KEPT, REDUCED, Ctx, elementwise, reduction, register,
                       rule_for)
from .shape import is_scalar_node


def _is_tensor(c: Ctx, name: str) -> bool:
    """A tensor operand (not a Python number, nor a size such as ``x.size(-1) ** -0.5``)."""
    value = c.bound[name]
    return isinstance(value, fx.Node) and not is_scalar_node(value)


def unbroadcast(t: Any, c: Ctx, name: str) -> Any:
    """Reduce ``t`` to the shape of operand ``name`` (a no-op when the other is a scalar)."""
    other = "other" if name == "input" else "input"
    if not _is_tensor(c, other):
        return t
    return c.call(sum_to_shape, t, c.lead, getattr(c.args, name).shape)


def batch_unbroadcast(t: Any, c: Ctx, name: str) -> Any:
    """Per-sample reduction of ``t`` to a parameter operand: ``[*lead, N, *operand.shape]``."""
    return c.call(sum_to_batch, t, c.lead, getattr(c.args, name).shape)


def _binary(targets: list, name: str, doc: str, d_input, d_other, params="input, other",
            **second_order):
    """Register ``y = input ∘ other`` from its elementwise factors ``d_input(g, c)``, ..."""
    elementwise(
        targets, name, params, doc=doc, **second_order,
        vjp={"input": lambda g, c: unbroadcast(d_input(g, c), c, "input"),
             "other": lambda g, c: unbroadcast(d_other(g, c), c, "other")},
        batch_grad={"input": lambda g, c: batch_unbroadcast(d_input(g, c), c, "input"),
                    "other": lambda g, c: batch_unbroadcast(d_other(g, c), c, "other")})


_binary([operator.add, torch.add, "add"], "add",
        "y = a + α·b;  ∂y/∂a = 1, ∂y/∂b = α.",
        lambda g, c: g, lambda g, c: g if c.args.alpha == 1 else g * c.args.alpha,
        params="input, other, alpha=1", traits=(AFFINE,))
_binary([operator.sub, torch.sub, "sub"], "sub",
        "y = a - α·b;  ∂y/∂a = 1, ∂y/∂b = -α.",
        lambda g, c: g, lambda g, c: -g if c.args.alpha == 1 else g * (-c.args.alpha),
        params="input, other, alpha=1", traits=(AFFINE,))
_binary([operator.mul, torch.mul, "mul"], "mul",
        "y = a·b;  ∂y/∂a = b, ∂y/∂b = a;  ∂²y/∂a² = ∂²y/∂b² = 0, ∂²y/∂a∂b = 1.",
        lambda g, c: g * c.args.other, lambda g, c: g * c.args.input, hessian_is_zero=True,
        cross={("input", "other"): lambda g, c: g}, bilinear=(("input", "other"),))
_binary([operator.truediv, torch.div, torch.true_divide, "div",
         "true_divide"], "div",
        "y = a / b;  ∂y/∂a = 1/b, ∂y/∂b = -y/b;  ∂²y/∂b² = 2y/b², ∂²y/∂a∂b = -1/b².",
        lambda g, c: g / c.args.other, lambda g, c: -g * c.out / c.args.other,
        params="input, other, rounding_mode=None", hessian_is_zero=("input",),
        cross={("input", "other"): lambda g, c: -g / c.args.other.square()},
        residual={"other": lambda g, c: unbroadcast(2 * g * c.out / c.args.other.square(), c,
                                                    "other")})
def _atan2_second(g, c: Ctx, kind: str):
    """``g`` times a second derivative of ``θ = atan2(a, b)``, ``r² = a² + b²``:
    ``∂²θ/∂a² = -2ab/r⁴``, ``∂²θ/∂b² = 2ab/r⁴``, ``∂²θ/∂a∂b = (a² - b²)/r⁴``."""
    a, b = c.args.input, c.args.other
    r4 = (a * a + b * b).square()
    if kind == "cross":
        return g * (a * a - b * b) / r4
    value = g * (2 * a * b) / r4
    return unbroadcast(-value if kind == "input" else value, c, kind)


_binary([torch.atan2, torch.arctan2, "atan2", "arctan2"], "atan2",
        "θ = atan2(a, b);  ∂θ/∂a = b/r², ∂θ/∂b = -a/r² (r² = a² + b², torch's backward);  "
        "∂²θ/∂a² = -2ab/r⁴, ∂²θ/∂b² = 2ab/r⁴, ∂²θ/∂a∂b = (a² - b²)/r⁴.",
        lambda g, c: g * c.args.other / (c.args.input.square() + c.args.other.square()),
        lambda g, c: -g * c.args.input / (c.args.input.square() + c.args.other.square()),
        residual={"input": lambda g, c: _atan2_second(g, c, "input"),
                  "other": lambda g, c: _atan2_second(g, c, "other")},
        cross={("input", "other"): lambda g, c: _atan2_second(g, c, "cross")})
_binary([operator.pow, torch.pow, "pow"], "pow",
        "y = aᵇ;  ∂y/∂a = b·a^(b-1), ∂y/∂b = y·log a;  ∂²y/∂a² = b(b-1)a^(b-2), "
        "∂²y/∂b² = y·log² a.",
        lambda g, c: g * (c.args.other * c.args.input ** (c.args.other - 1)),
        lambda g, c: g * (c.out * torch.log(c.args.input)), params="input, other",
        residual={"input": lambda g, c: unbroadcast(
            g * (c.args.other * (c.args.other - 1) * c.args.input ** (c.args.other - 2)), c,
            "input"),
            "other": lambda g, c: unbroadcast(g * (c.out * torch.log(c.args.input).square()),
                                              c, "other")})

elementwise([operator.neg, torch.neg, "neg"], "neg", "input", doc="y = -x;  y' = -1.",
            vjp={"input": lambda g, c: -g}, traits=(AFFINE,))


def _dims(dim: Any) -> Optional[list]:
    """``dim`` of sum/mean as a list (``None``: all axes)."""
    if dim is None:
        return None
    return [dim] if isinstance(dim, int) else list(dim)


def _reduces_samples(b: dict) -> Optional[str]:
    dims = _dims(b["dim"])
    if dims is None or len(dims) == 0 or 0 in dims:
        return "it reduces over the sample axis 0"
    return None


def _sum_samples(b: dict) -> Optional[str]:
    """KEPT where only axes given as positive numbers are reduced; REDUCED (0-dim) for a sum
    over all axes without ``keepdim``."""
    dims = _dims(b["dim"])
    if dims and all(d > 0 for d in dims):
        return KEPT
    return REDUCED if not dims and not b["keepdim"] else None


def _sum_vjp(g, c: Ctx):
    return c.call(expand_reduced, g, c.lead, c.args.input.shape, _dims(c.bound["dim"]),
                  c.bound["keepdim"])


def _mean_vjp(g, c: Ctx):
    count = c.call(reduced_count, c.args.input.shape, _dims(c.bound["dim"]))
    return _sum_vjp(g, c) / count


def _unstacked(average: bool):
    """``stack(ts, d).sum(d)`` -> ``t₁ + t₂ + ...`` (``mean``: over their number): an ensemble
    of heads stacked along axis 0 and averaged (timm's CrossViT) never moves the samples;
    else None (the call stays)."""
    def lower(c: Ctx):
        source = c.bound["input"]
        stack = rule_for(source) if isinstance(source, fx.Node) else None
        if stack is None or stack.name != "stack" or c.bound["keepdim"] or \
                c.bound["dtype"] is not None:
            return None
        bound = stack.bind(source)
        if not isinstance(c.bound["dim"], int) or c.bound["dim"] != bound["dim"] or \
                c.bound["dim"] < 0 or not isinstance(bound["tensors"], (list, tuple)):
            return None
        pieces = [c.emit.proxy(t) for t in bound["tensors"]]
        total = pieces[0]
        for piece in pieces[1:]:
            total = total + piece
        return total / len(pieces) if average else total
    return lower


reduction([torch.sum, "sum"], "sum", "input, dim=None, keepdim=False, dtype=None",
          doc="y = Σ_dim x;  Jᵀg broadcasts g back over the summed axes.",
          vjp={"input": _sum_vjp}, mixes_samples=_reduces_samples,
          samples=_sum_samples, lower=_unstacked(False))
reduction([torch.mean, "mean"], "mean", "input, dim=None, keepdim=False, dtype=None",
          doc="y = mean_dim x;  Jᵀg broadcasts g/count back over the averaged axes.",
          vjp={"input": _mean_vjp}, mixes_samples=_reduces_samples,
          samples=_sum_samples, lower=_unstacked(True))


elementwise([torch.masked_fill, "masked_fill"], "masked_fill", "input, mask, value",
            doc="y = value where mask else x (mask broadcasts to x);  Jᵀg = g with 0 where "
                "mask.",
            vjp={"input": lambda g, c: g.masked_fill(c.args.mask, 0.0), "mask": None,
                 "value": None},
            traits=(AFFINE,), samples=None)



def _tie_share(g, c: Ctx, mine, theirs):
    """torch's ``maximum``/``minimum`` backward: ``g`` where this operand wins, ``g/2`` on ties."""
    return torch.where(mine == theirs, g / 2, torch.where(mine > theirs, g, g * 0))


_binary([torch.maximum, "maximum"], "maximum",
        "y = max(a, b);  ∂y/∂a = [a > b] (½ on ties), ∂y/∂b = [b > a];  piecewise linear: "
        "every second derivative is 0.",
        lambda g, c: _tie_share(g, c, c.args.input, c.args.other),
        lambda g, c: _tie_share(g, c, c.args.other, c.args.input),
        traits=(AFFINE,))
_binary([torch.minimum, "minimum"], "minimum",
        "y = min(a, b);  ∂y/∂a = [a < b] (½ on ties), ∂y/∂b = [b < a];  piecewise linear.",
        lambda g, c: _tie_share(g, c, -c.args.input, -c.args.other),
        lambda g, c: _tie_share(g, c, -c.args.other, -c.args.input),
        traits=(AFFINE,))


def _where_part(name: str, per_sample: bool):
    """``g`` where the condition picks operand ``name`` (``input``: true, ``other``: false),
    0 elsewhere, summed to that operand's shape (per sample for a parameter)."""
    def rule(g, c: Ctx):
        zero = g * 0
        picked = torch.where(c.args.condition, g, zero) if name == "input" else torch.where(
            c.args.condition, zero, g)
        helper = sum_to_batch if per_sample else sum_to_shape
        return c.call(helper, picked, c.lead, getattr(c.args, name).shape)
    return rule


elementwise([torch.where, "where"], "where", "condition, input, other",
            doc="y = a where cond else b (cond, a, b broadcast);  ∂y/∂a = [cond], "
                "∂y/∂b = [not cond], summed over broadcast axes; jointly linear in (a, b); cond "
                "has no derivative.",
            vjp={"condition": None, "input": _where_part("input", False),
                 "other": _where_part("other", False)},
            batch_grad={"input": _where_part("input", True), "other": _where_part("other", True)},
            traits=(AFFINE,), samples=None)


register([operator.gt, operator.ge, operator.lt, operator.le, operator.eq, operator.ne,
          operator.and_, operator.or_, operator.invert, torch.gt, torch.ge, torch.lt, torch.le,
          torch.eq, torch.ne, torch.logical_and, torch.logical_or, torch.logical_not,
          torch.isnan, torch.isinf, torch.isfinite, "gt", "ge", "lt", "le", "eq", "ne",
          "logical_not"], "comparison", "input, *args, **kwargs", (BOOLEAN,), constant=True,
         doc="Comparisons and boolean logic: piecewise constant, no derivative.")
register([torch.sign, "sign"], "sign", "input", constant=True,
         doc="y = sign(x): piecewise constant, no derivative.")
register([torch.floor, "floor", torch.ceil, "ceil", torch.round, "round", torch.trunc, "trunc"],
         "rounding", "input, *args, **kwargs", constant=True,
         doc="y = floor / ceil / round / trunc of x: piecewise constant, no derivative (autograd "
             "gives zero; e.g. an old drop-path mask (keep + rand).floor_()).")
