"""Elementwise activations ``y = f(x)``: the Jacobian is ``diag(f'(x))``.

Each rule multiplies the cotangent by ``f'``; broadcasting from the right makes the same code
serve any number of leading vector axes. Factors are built with ``torch.where`` on ``g`` so a
float64 cotangent never meets a float32 constant.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor

from .registry import FRESH, INTO_FIRST, MONOTONE, RANDOM, Ctx, marked, register, unary

SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946


def gelu_derivative(x: Tensor, approximate: str) -> Tensor:
    """``d/dx gelu``: exact ``Φ(x) + x φ(x)``; tanh form ``0.5(1+t) + 0.5x(1-t²)·k(1+3ax²)``."""
    if approximate == "tanh":
        k = math.sqrt(2.0 / math.pi)
        inner = k * (x + 0.044715 * x * x * x)
        t = torch.tanh(inner)
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * x * x)
    cdf = 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return cdf + x * pdf


def gelu_second_derivative(x: Tensor, approximate: str) -> Tensor:
    """``gelu''``: exact ``φ(x)(2 - x²)``; tanh form ``(1-t²)u' + x(1-t²)(u'' - 2t u'²)/2``
    with ``u = k(x + a x³)``, ``t = tanh u``."""
    if approximate == "tanh":
        k = math.sqrt(2.0 / math.pi)
        t = torch.tanh(k * (x + 0.044715 * x * x * x))
        du = k * (1.0 + 3.0 * 0.044715 * x * x)
        ddu = 6.0 * 0.044715 * k * x
        return (1.0 - t * t) * du + 0.5 * x * (1.0 - t * t) * (ddu - 2.0 * t * du * du)
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return pdf * (2.0 - x * x)


THRESHOLD_BACKWARD = marked(INTO_FIRST, marked(FRESH, torch.ops.aten.threshold_backward))
# g·y(1 - y) and g·(1 - y²) in one op each (not three), written into g where it is a temporary
SIGMOID_BACKWARD = marked(INTO_FIRST, marked(FRESH, torch.ops.aten.sigmoid_backward))
TANH_BACKWARD = marked(INTO_FIRST, marked(FRESH, torch.ops.aten.tanh_backward))

unary([F.relu, torch.relu, "relu"], "relu", "input, inplace=False", traits=(MONOTONE,),
      doc="y = max(x, 0);  y' = [x > 0];  y'' = 0 (x̄ = g·[y > 0] in one pass with "
          "torch's threshold_backward, which broadcasts y over the lead axes).",
      vjp={"input": lambda g, c: THRESHOLD_BACKWARD(g, c.out, 0)}, hessian_is_zero=True)

unary([torch.sigmoid, F.sigmoid, "sigmoid"], "sigmoid", "input",
      doc="y = σ(x);  y' = y(1 - y);  y'' = y'(1 - 2y) (x̄ = g·y(1 - y) in one op with "
          "torch's sigmoid_backward, which broadcasts y over the lead axes).",
      vjp={"input": lambda g, c: SIGMOID_BACKWARD(g, c.out)},
      residual={"input": lambda g, c: g * (c.out * (1 - c.out) * (1 - 2 * c.out))})

unary([torch.tanh, F.tanh, "tanh"], "tanh", "input",
      doc="y = tanh x;  y' = 1 - y²;  y'' = -2y(1 - y²) (x̄ = g·(1 - y²) in one op with "
          "torch's tanh_backward).",
      vjp={"input": lambda g, c: TANH_BACKWARD(g, c.out)},
      residual={"input": lambda g, c: g * (-2 * c.out * (1 - c.out * c.out))})

unary([F.leaky_relu, "leaky_relu"], "leaky_relu", "input, negative_slope=0.01, inplace=False",
      traits=(MONOTONE,),
      doc="y = x if x > 0 else a·x;  y' = 1 or a;  y'' = 0.",
      vjp={"input": lambda g, c: torch.where(c.args.input > 0, g, g * c.args.negative_slope)},
      hessian_is_zero=True)

unary([F.elu, "elu"], "elu", "input, alpha=1.0, inplace=False",
      doc="y = x if x > 0 else α(eˣ - 1);  y' = 1 or y + α;  y'' = 0 or y + α.",
      vjp={"input": lambda g, c: torch.where(c.args.input > 0, g, g * (c.out + c.args.alpha))},
      residual={"input": lambda g, c: torch.where(c.args.input > 0, g * 0,
                                                     g * (c.out + c.args.alpha))})

unary([F.selu, torch.selu, "selu"], "selu", "input, inplace=False",
      doc="y = s·x if x > 0 else s·α(eˣ - 1);  y' = s or y + s·α.",
      vjp={"input": lambda g, c: torch.where(c.args.input > 0, g * SELU_SCALE,
                                                g * (c.out + SELU_SCALE * SELU_ALPHA))},
      residual={"input": lambda g, c: torch.where(c.args.input > 0, g * 0,
                                                     g * (c.out + SELU_SCALE * SELU_ALPHA))})

unary([F.logsigmoid], "log_sigmoid", "input",
      doc="y = log σ(x);  y' = σ(-x);  y'' = -σ(x)σ(-x).",
      vjp={"input": lambda g, c: g * torch.sigmoid(-c.args.input)},
      residual={"input": lambda g, c: -g * (torch.sigmoid(c.args.input)
                                            * torch.sigmoid(-c.args.input))})

def _gelu_vjp(g, c):
    """``g ⊙ gelu'(x)``; a gradient (no lead axes) by torch's own ``gelu_backward`` kernel."""
    if c.lead == 0:
        return torch.ops.aten.gelu_backward(g, c.args.input, approximate=c.args.approximate)
    return g * c.call(gelu_derivative, c.args.input, c.args.approximate)


unary([F.gelu, "gelu"], "gelu", "input, approximate='none'",
      doc="y = x Φ(x);  y' = Φ(x) + x φ(x) (or the tanh approximation's derivative; "
          "a gradient: torch's gelu_backward kernel).",
      vjp={"input": _gelu_vjp},
      residual={"input": lambda g, c: g * c.call(gelu_second_derivative, c.args.input,
                                                   c.args.approximate)})

unary([F.silu, "silu"], "silu", "input, inplace=False",
      doc="y = x σ(x);  y' = σ(x)(1 + x(1 - σ(x))).",
      vjp={"input": lambda g, c: g * _silu_derivative(c.args.input)},
      residual={"input": lambda g, c: g * _silu_second_derivative(c.args.input)})


def _silu_derivative(x):
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def _silu_second_derivative(x):
    """``(x σ)'' = σ(1 - σ)(2 + x(1 - 2σ))``."""
    s = torch.sigmoid(x)
    return s * (1 - s) * (2 + x * (1 - 2 * s))


def _softplus_residual(g, c):
    """``y'' = β σ(βx)(1 - σ(βx))`` below the threshold, 0 above it."""
    scaled = c.args.input * c.args.beta
    s = torch.sigmoid(scaled)
    return torch.where(scaled > c.args.threshold, g * 0, g * (s * (1 - s) * c.args.beta))


unary([F.softplus, "softplus"], "softplus", "input, beta=1.0, threshold=20.0",
      doc="y = log(1 + e^{βx})/β (linear above threshold);  y' = σ(βx) or 1.",
      vjp={"input": lambda g, c: torch.where(c.args.input * c.args.beta > c.args.threshold,
                                                g, g * torch.sigmoid(c.args.input * c.args.beta))},
      residual={"input": _softplus_residual})

unary([torch.exp, "exp"], "exp", "input",
      doc="y = eˣ;  y' = y;  y'' = y.", vjp={"input": lambda g, c: g * c.out},
      residual={"input": lambda g, c: g * c.out})

unary([torch.exp2, "exp2"], "exp2", "input",
      doc="y = 2ˣ;  y' = ln2·y;  y'' = ln²2·y.",
      vjp={"input": lambda g, c: g * c.out * math.log(2.0)},
      residual={"input": lambda g, c: g * c.out * math.log(2.0) ** 2})

unary([torch.log, "log"], "log", "input",
      doc="y = log x;  y' = 1/x;  y'' = -1/x².", vjp={"input": lambda g, c: g / c.args.input},
      residual={"input": lambda g, c: -g / c.args.input.square()})

unary([torch.sqrt, "sqrt"], "sqrt", "input",
      doc="y = √x;  y' = 1/(2y);  y'' = -1/(4y³).", vjp={"input": lambda g, c: g / (2 * c.out)},
      residual={"input": lambda g, c: -g / (4 * c.out * c.out * c.out)})

unary([torch.rsqrt, "rsqrt"], "rsqrt", "input",
      doc="y = 1/√x;  y' = -y³/2;  y'' = 3y⁵/4.",
      vjp={"input": lambda g, c: g * (-0.5 * c.out * c.out * c.out)},
      residual={"input": lambda g, c: g * (0.75 * c.out.square().square() * c.out)})

unary([torch.reciprocal, "reciprocal"], "reciprocal", "input",
      doc="y = 1/x;  y' = -y²;  y'' = 2y³.",
      vjp={"input": lambda g, c: g * (-c.out.square())},
      residual={"input": lambda g, c: g * (2 * c.out.square() * c.out)})

unary([torch.log1p, "log1p"], "log1p", "input",
      doc="y = log(1 + x);  y' = 1/(1 + x);  y'' = -1/(1 + x)².",
      vjp={"input": lambda g, c: g / (c.args.input + 1)},
      residual={"input": lambda g, c: -g / (c.args.input + 1).square()})

unary([torch.expm1, "expm1"], "expm1", "input",
      doc="y = eˣ - 1;  y' = y'' = eˣ (= y + 1).",
      vjp={"input": lambda g, c: g * (c.out + 1)},
      residual={"input": lambda g, c: g * (c.out + 1)})

unary([torch.sin, "sin"], "sin", "input",
      doc="y = sin x;  y' = cos x;  y'' = -sin x.",
      vjp={"input": lambda g, c: g * torch.cos(c.args.input)},
      residual={"input": lambda g, c: -g * c.out})

unary([torch.cos, "cos"], "cos", "input",
      doc="y = cos x;  y' = -sin x;  y'' = -cos x.",
      vjp={"input": lambda g, c: -g * torch.sin(c.args.input)},
      residual={"input": lambda g, c: -g * c.out})

unary([torch.atan, torch.arctan, "atan", "arctan"], "atan", "input",
      doc="y = atan x;  y' = 1/(1 + x²);  y'' = -2x/(1 + x²)².",
      vjp={"input": lambda g, c: g / (c.args.input.square() + 1)},
      residual={"input": lambda g, c: g * (-2 * c.args.input
                                           / (c.args.input.square() + 1).square())})

unary([torch.asinh, torch.arcsinh, "asinh", "arcsinh"], "asinh", "input",
      doc="y = asinh x;  y' = (1 + x²)^{-1/2};  y'' = -x (1 + x²)^{-3/2}.",
      vjp={"input": lambda g, c: g * torch.rsqrt(c.args.input.square() + 1)},
      residual={"input": lambda g, c: g * (-c.args.input
                                           * torch.rsqrt(c.args.input.square() + 1) ** 3)})

unary([torch.sinh, "sinh"], "sinh", "input",
      doc="y = sinh x;  y' = cosh x;  y'' = sinh x.",
      vjp={"input": lambda g, c: g * torch.cosh(c.args.input)},
      residual={"input": lambda g, c: g * c.out})

unary([torch.cosh, "cosh"], "cosh", "input",
      doc="y = cosh x;  y' = sinh x;  y'' = cosh x.",
      vjp={"input": lambda g, c: g * torch.sinh(c.args.input)},
      residual={"input": lambda g, c: g * c.out})

ERF_SCALE = 2.0 / math.sqrt(math.pi)

unary([torch.erf, torch.special.erf, "erf"], "erf", "input",
      doc="y = erf x;  y' = (2/√π) e^{-x²};  y'' = -2x y'.",
      vjp={"input": lambda g, c: g * (ERF_SCALE * torch.exp(-c.args.input.square()))},
      residual={"input": lambda g, c: g * (-2.0 * ERF_SCALE * c.args.input
                                           * torch.exp(-c.args.input.square()))})

unary([torch.square, "square"], "square", "input",
      doc="y = x²;  y' = 2x;  y'' = 2.", vjp={"input": lambda g, c: g * (2 * c.args.input)},
      residual={"input": lambda g, c: g * 2})


unary([F.tanhshrink], "tanhshrink", "input",
      doc="y = x - tanh x;  y' = tanh² x;  y'' = 2 tanh x (1 - tanh² x).",
      vjp={"input": lambda g, c: g * torch.tanh(c.args.input).square()},
      residual={"input": lambda g, c: g * _tanhshrink_second_derivative(c.args.input)})


def _tanhshrink_second_derivative(x):
    t = torch.tanh(x)
    return 2 * t * (1 - t * t)


def _softsign_slope(x):
    """``1/(1 + |x|)``."""
    return 1 / (1 + x.abs())


unary([F.softsign], "softsign", "input",
      doc="y = x/(1 + |x|);  y' = 1/(1 + |x|)²;  y'' = -2 sign(x)/(1 + |x|)³ (0 at 0, as "
          "torch's double backward).",
      vjp={"input": lambda g, c: g * _softsign_slope(c.args.input).square()},
      residual={"input": lambda g, c: g * (-2 * torch.sign(c.args.input)
                                           * _softsign_slope(c.args.input) ** 3)})

def celu_input_scale(alpha: float) -> float:
    """``1/α`` as torch's CELU backward takes it: ``α`` rounded to float32 first."""
    return 1.0 / torch.tensor(alpha, dtype=torch.float32).item()


def _celu_slope(c: Ctx):
    """torch's ``elu_backward`` for CELU, ``α s e^{x s}`` with ``s = 1/float32(α)`` (exact
    ``e^{x/α}`` up to the float32 rounding of ``α``, which torch applies in float64 too)."""
    scale = celu_input_scale(c.bound["alpha"])
    return c.args.alpha * scale * torch.exp(c.args.input * scale)


unary([F.celu, torch.celu, "celu"], "celu", "input, alpha=1.0, inplace=False",
      doc="y = x if x > 0 else α(e^{x/α} - 1);  y' = 1 or e^{x/α};  y'' = 0 or e^{x/α}/α "
          "(as torch's backward: 1/α from α rounded to float32).",
      vjp={"input": lambda g, c: torch.where(c.args.input > 0, g, g * _celu_slope(c))},
      residual={"input": lambda g, c: torch.where(
          c.args.input > 0, g * 0,
          g * (_celu_slope(c) * celu_input_scale(c.bound["alpha"])))})


# -- piecewise-linear activations (y'' = 0 almost everywhere) --------------------------------
def _inside(x, low, high, g):
    """``g`` where ``low < x < high``, 0 elsewhere (torch's derivative at the kinks)."""
    return torch.where((x > low) & (x < high), g, g * 0)


unary([F.hardtanh, "hardtanh"], "hardtanh",
      "input, min_val=-1.0, max_val=1.0, inplace=False", traits=(MONOTONE,),
      doc="y = min(max(x, lo), hi) (ReLU6: lo = 0, hi = 6);  y' = [lo < x < hi];  y'' = 0.",
      vjp={"input": lambda g, c: _inside(c.args.input, c.args.min_val, c.args.max_val, g)},
      hessian_is_zero=True)

unary([F.relu6, "relu6"], "relu6", "input, inplace=False", traits=(MONOTONE,),
      doc="y = min(max(x, 0), 6);  y' = [0 < x < 6];  y'' = 0.",
      vjp={"input": lambda g, c: _inside(c.args.input, 0.0, 6.0, g)},
      hessian_is_zero=True)

# torch's hardsigmoid_backward multiplies by 1/6 rounded to float32 in every dtype
HARDSIGMOID_SLOPE = float(torch.tensor(1.0 / 6.0, dtype=torch.float32))

unary([F.hardsigmoid, "hardsigmoid"], "hardsigmoid", "input, inplace=False",
      doc="y = relu6(x + 3)/6;  y' = 1/6 on -3 < x < 3, else 0 (1/6 as float32, as "
          "torch's kernel);  y'' = 0.",
      vjp={"input": lambda g, c: _inside(c.args.input, -3.0, 3.0,
                                         g * HARDSIGMOID_SLOPE)},
      hessian_is_zero=True)


def _hardswish_vjp(g, c):
    """torch's ``hardswish_backward``: 0 for x < -3, x/3 + 1/2 for -3 <= x <= 3, 1 above."""
    x = c.args.input
    return torch.where(x < -3.0, g * 0, torch.where(x <= 3.0, g * (x / 3.0 + 0.5), g))


unary([F.hardswish, "hardswish"], "hardswish", "input, inplace=False",
      doc="y = x·relu6(x + 3)/6;  y' = 0, x/3 + 1/2, 1 (x < -3, |x| <= 3, x > 3);  "
          "y'' = 1/3 on -3 < x < 3, else 0 (an elementwise residual).",
      vjp={"input": _hardswish_vjp},
      residual={"input": lambda g, c: _inside(c.args.input, -3.0, 3.0, g / 3.0)})

unary([torch.nan_to_num, "nan_to_num"], "nan_to_num", "input, nan=0.0, posinf=None, neginf=None",
      doc="y = x where finite, else the replacement;  y' = [x finite] (torch's);  y'' = 0.",
      vjp={"input": lambda g, c: g * torch.isfinite(c.args.input)}, hessian_is_zero=True)

register([torch.lerp, "lerp"], "lerp", "input, end, weight",
         doc="y = x + w (e - x): lowered to sub, mul, add.",
         lower=lambda c: c.args.input + c.args.weight * (c.args.end - c.args.input))
register([torch.hypot, "hypot"], "hypot", "input, other",
         doc="y = √(a² + b²): lowered to mul, add, sqrt (torch's backward a/y, b/y; 0/0 at the "
             "origin as torch's).",
         lower=lambda c: (c.args.input * c.args.input + c.args.other * c.args.other).sqrt())

unary([torch.abs, "abs"], "abs", "input",
      doc="y = |x|;  y' = sign(x) (0 at 0, as torch);  y'' = 0.",
      vjp={"input": lambda g, c: g * torch.sign(c.args.input)}, hessian_is_zero=True)


unary([F.threshold, torch.threshold, "threshold"], "threshold",
      "input, threshold, value, inplace=False",
      doc="y = x if x > t else v;  y' = [x > t] (torch's threshold_backward);  y'' = 0.",
      vjp={"input": lambda g, c: torch.where(c.args.input > c.args.threshold, g, g * 0)},
      hessian_is_zero=True)

unary([F.softshrink, "softshrink"], "softshrink", "input, lambd=0.5",
      doc="y = x - λ if x > λ, x + λ if x < -λ, else 0;  y' = [|x| > λ];  y'' = 0.",
      vjp={"input": lambda g, c: torch.where(c.args.input.abs() > c.args.lambd, g, g * 0)},
      hessian_is_zero=True)


def _lower_rrelu(c: Ctx):
    """Eval mode: ``leaky_relu`` with the mean slope ``(l + u)/2``. Train mode:
    ``y = x ⊙ a`` with ``a = 1`` where ``x > 0``, else a slope drawn from ``U(l, u)`` once
    per call and entry (:func:`rrelu_slopes`), so the backward multiplies by the same ``a``."""
    low, high, x = c.bound["lower"], c.bound["upper"], c.args.input
    if not c.bound["training"]:
        return F.leaky_relu(x, (low + high) / 2)
    return x * c.call(rrelu_slopes, x, low, high)


def rrelu_slopes(x: Tensor, low: float, high: float) -> Tensor:
    """RReLU's train-mode multiplier: 1 where ``x > 0``, else a draw from ``U(low, high)``."""
    drawn = torch.empty_like(x).uniform_(low, high)
    return torch.where(x > 0, torch.ones_like(x), drawn)


register([rrelu_slopes], "rrelu_slopes", "x, low, high", constant=True, traits=(RANDOM,),
         doc="A random multiplier: no derivative.")
register([F.rrelu, "rrelu"], "rrelu",
         "input, lower=1.0 / 8, upper=1.0 / 3, training=False, inplace=False",
         doc=_lower_rrelu.__doc__, lower=_lower_rrelu)


def _clamp_vjp(g, c):
    """torch's ``clamp_backward``: ``g`` where ``min <= x <= max`` (bounds inclusive)."""
    x, low, high = c.args.input, c.args.min, c.args.max
    keep = None
    if low is not None:
        keep = x >= low
    if high is not None:
        keep = (x <= high) if keep is None else keep & (x <= high)
    return g if keep is None else torch.where(keep, g, g * 0)


def _clamp_unsupported(b: dict):
    if isinstance(b["min"], fx.Node) or isinstance(b["max"], fx.Node):
        return "clamp with tensor bounds has no rule (only number bounds)"
    return None


unary([torch.clamp, torch.clip, "clamp", "clip"], "clamp", "input, min=None, max=None",
      doc="y = min(max(x, lo), hi) with number bounds;  y' = [lo <= x <= hi];  y'' = 0.",
      vjp={"input": _clamp_vjp}, hessian_is_zero=True, unsupported=_clamp_unsupported)


def _lower_glu(c: Ctx):
    """``y = a ⊙ σ(b)`` with ``a, b`` the halves of ``x`` along ``dim``: ``chunk``, ``sigmoid``,
    ``mul``."""
    halves = c.args.input.chunk(2, c.bound["dim"])
    return halves[0] * torch.sigmoid(halves[1])


register([F.glu], "glu", "input, dim=-1", doc=_lower_glu.__doc__, lower=_lower_glu)


def _lower_softmin(c: Ctx):
    """``y = softmax(-x, dim)``."""
    return torch.softmax(-c.args.input, c.bound["dim"])


def _softmin_unsupported(b: dict):
    if b["dim"] is None or b["dtype"] is not None:
        return ("softmin without a dim (the implicit choice depends on the rank) or with a "
                "dtype has no rule; give nn.Softmin / F.softmin a dim")
    return None


register([F.softmin], "softmin", "input, dim=None, _stacklevel=3, dtype=None",
         doc=_lower_softmin.__doc__, lower=_lower_softmin, unsupported=_softmin_unsupported)
