"""Losses and (log-)softmax. A loss ``L = reduce_n ℓ(f_n, y_n)`` has ``∂L/∂f`` computed by a
helper (``*_grad``: the gradient of the reduced loss for ``mean``/``sum``, of each element for
``none``), then scaled by the cotangent ``g`` of the loss value (shape ``[*lead]`` for a scalar
loss, ``[*lead, *loss.shape]`` for ``reduction='none'``).

Mean divisors follow PyTorch (and BackPACK): cross-entropy and NLL divide by the number of
non-ignored positions ``N·d1·...`` (by the summed class weights when ``weight`` is given), MSE and
BCE-with-logits by ``numel``.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor
from torch.nn import _reduction as _Reduction

from ..errors import node_error
from .helpers import block_diagonal
from .registry import Ctx, affine, loss, register, rule_for


def scale_by_loss_cotangent(g: Tensor, grad: Tensor, lead: int, reduction: str,
                            class_axis: bool) -> Tensor:
    """``g ⊙ ∂L/∂f``: broadcast the loss cotangent ``g`` over the loss input's axes."""
    if reduction == "none":
        if class_axis:
            g = g.unsqueeze(lead + 1)
        return g * grad
    for _ in range(grad.dim()):
        g = g.unsqueeze(-1)
    return g * grad


def _class_weight(target: Tensor, weight: Optional[Tensor], like: Tensor) -> Tensor:
    """``w[y]`` per position (ones without ``weight``), in ``like``'s dtype."""
    if weight is None:
        return torch.ones(target.shape, dtype=like.dtype, device=like.device)
    return weight.to(like.dtype)[target]


def cross_entropy_grad(x: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                       reduction: str, label_smoothing: float) -> Tensor:
    """``∂L/∂x`` of ``F.cross_entropy`` for ``x: [N, C, d...]`` (class axis 1).

    Class targets ``y``: ``w_y (softmax(x) - t)`` with ``t = (1-ε) onehot(y) + ε/C``, zero at
    ignored positions; ``mean`` divides by ``Σ w_y`` over kept positions. Probability targets
    ``t``: ``softmax(x) Σ_c w_c t_c - w ⊙ t``; ``mean`` divides by the number of positions.
    """
    classes = x.size(1)
    p = torch.softmax(x, 1)
    if target.is_floating_point():
        t = target.to(x.dtype) * (1.0 - label_smoothing) + label_smoothing / classes
        if weight is not None:
            shape = [1, classes] + [1] * (x.dim() - 2)
            t = t * weight.to(x.dtype).reshape(shape)
        grad = p * t.sum(1, keepdim=True) - t
        if reduction == "mean":
            grad = grad / (x.numel() // classes)
        return grad
    keep = target != ignore_index
    safe = torch.where(keep, target, torch.zeros_like(target))
    onehot = F.one_hot(safe, classes).movedim(-1, 1).to(x.dtype)
    t = onehot * (1.0 - label_smoothing) + label_smoothing / classes
    w = _class_weight(safe, weight, x) * keep.to(x.dtype)
    grad = (p - t) * w.unsqueeze(1)
    if reduction == "mean":
        grad = grad / w.sum()
    return grad


def nll_loss_grad(x: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                  reduction: str) -> Tensor:
    """``∂L/∂x`` of ``F.nll_loss``: ``-w_y onehot(y)``, ``mean`` divided by ``Σ w_y``."""
    keep = target != ignore_index
    safe = torch.where(keep, target, torch.zeros_like(target))
    onehot = F.one_hot(safe, x.size(1)).movedim(-1, 1).to(x.dtype)
    w = _class_weight(safe, weight, x) * keep.to(x.dtype)
    grad = -onehot * w.unsqueeze(1)
    if reduction == "mean":
        grad = grad / w.sum()
    return grad


def mse_grad(x: Tensor, target: Tensor, reduction: str) -> Tensor:
    """``∂L/∂x`` of ``F.mse_loss``: ``2(x - y)``, divided by ``numel`` for ``mean``."""
    grad = 2.0 * (x - target)
    if reduction == "mean":
        grad = grad / x.numel()
    return grad


def bce_with_logits_grad(x: Tensor, target: Tensor, weight: Optional[Tensor],
                         pos_weight: Optional[Tensor], reduction: str) -> Tensor:
    """``∂L/∂x`` of ``F.binary_cross_entropy_with_logits``: ``σ(x)(1 - y + p·y) - p·y``
    (``p`` = pos_weight, 1 by default) times ``weight``; ``mean`` divides by ``numel``."""
    s = torch.sigmoid(x)
    if pos_weight is None:
        grad = s - target
    else:
        py = pos_weight * target
        grad = s * (1.0 - target + py) - py
    if weight is not None:
        grad = grad * weight
    if reduction == "mean":
        grad = grad / x.numel()
    return grad


def check_same_shape(output: Tensor, target: Tensor, loss: str) -> Tensor:
    """Raise a clear error when a regression target does not match the model output."""
    if output.shape != target.shape:
        raise ValueError("fxcurv: {}: target shape {} does not match the model output shape {}; "
                         "broadcasting them would give a wrong loss".format(
                             loss, list(target.shape), list(output.shape)))
    return target


affine([check_same_shape], "check_same_shape", "output, target, loss",
       doc="Call-time shape check; the identity on the target.",
       vjp={"target": lambda g, c: g, "output": None})


def check_scalar_loss(loss: Tensor) -> Tensor:
    """Call-time check where the graph cannot tell the loss's shape: one number."""
    if loss.numel() != 1:
        raise ValueError("fxcurv: loss_fn returned a tensor of shape {}, not a scalar; reduce "
                         "it (reduction='mean' or 'sum', or .mean() / .sum() at the end of "
                         "the callable) and compile again".format(list(loss.shape)))
    return loss


affine([check_scalar_loss], "check_scalar_loss", "loss",
       doc="Call-time check that the loss is one number; the identity.",
       vjp={"loss": lambda g, c: g})


def _legacy_args(b: dict) -> Optional[str]:
    if b.get("size_average") is not None or b.get("reduce") is not None:
        return "the deprecated 'size_average'/'reduce' arguments are not supported"
    if b.get("reduction") not in ("mean", "sum", "none"):
        return f"reduction {b.get('reduction')!r} is unknown"
    return None


def _loss_vjp(grad_fn, *names, class_axis=True):
    """Input cotangent ``g ⊙ grad_fn(input, target, *consts)``."""
    def vjp(g, c: Ctx):
        consts = [c.bound[name] if name not in ("weight", "pos_weight")
                  else getattr(c.args, name) for name in names]
        grad = c.call(grad_fn, c.args.input, c.args.target, *consts)
        return c.call(scale_by_loss_cotangent, g, grad, c.lead, c.bound["reduction"], class_axis)
    return vjp


def _softmax_dim(b: dict) -> Optional[str]:
    if b["dim"] is None:
        return "softmax needs an explicit 'dim'"
    return None


def _normalises_samples(b: dict) -> Optional[str]:
    """A softmax over axis 0 couples the samples (each row's value depends on every row)."""
    return "it normalises over the sample axis 0" if b["dim"] == 0 else None


def _shift(dim: int, lead: int) -> int:
    return dim + lead if dim >= 0 else dim


def _fused_backward(c: Ctx) -> bool:
    """A gradient (no lead axes) of a softmax without a dtype cast: torch's fused kernel."""
    return c.lead == 0 and c.bound.get("dtype") is None


def _log_softmax_vjp(g, c: Ctx):
    if _fused_backward(c):
        return torch.ops.aten._log_softmax_backward_data(g, c.out, c.bound["dim"], c.out.dtype)
    dim = _shift(c.bound["dim"], c.lead)
    return _in_input_dtype(g - torch.exp(c.out) * g.sum(dim, keepdim=True), c)


def _softmax_vjp(g, c: Ctx):
    if _fused_backward(c):
        return torch.ops.aten._softmax_backward_data(g, c.out, c.bound["dim"], c.out.dtype)
    dim = _shift(c.bound["dim"], c.lead)
    return _in_input_dtype(c.out * (g - (g * c.out).sum(dim, keepdim=True)), c)


def _in_input_dtype(t, c: Ctx):
    """``Jᵀg`` of a softmax computed in ``dtype=`` (Bloom's ``softmax(x, dtype=float32)`` of
    a float64 ``x``) back in the input's dtype, as autograd's cast back gives it."""
    return t if c.bound.get("dtype") is None else t.to(c.args.input.dtype)


def softmax_residual_block(g: Tensor, y: Tensor, dim: int, log: bool) -> Tensor:
    """Per-sample residual of ``y = softmax(x)`` (``log``: ``log_softmax``, ``s = exp y``)
    along ``dim`` (not the sample axis 0): ``[N, rows, K, K]`` along the last axis, else
    the rows placed in one dense block ``[N, 1, D, D]``.
    Per row, ``u = g ⊙ s``, ``a = Σ u``: ``Σ_i g_i ∂²s_i/∂x_j∂x_k = δ_jk (u_j - a s_j)
    - u_j s_k - s_j u_k + 2 a s_j s_k``; for ``log_softmax`` ``-(Σ g)(diag(s) - s sᵀ)``."""
    if dim % y.dim() == 0:
        raise RuntimeError("fxcurv: a second derivative of softmax along the sample axis 0 "
                           "mixes the samples")
    s = y.exp() if log else y
    axis = dim % s.dim()
    s_rows, g_rows = s.movedim(axis, -1), g.movedim(axis, -1)
    outer = s_rows.unsqueeze(-1) * s_rows.unsqueeze(-2)
    if log:
        total = g_rows.sum(-1, keepdim=True).unsqueeze(-1)
        rows = -total * (torch.diag_embed(s_rows) - outer)
    else:
        u = g_rows * s_rows
        a = u.sum(-1, keepdim=True)
        mixed = u.unsqueeze(-1) * s_rows.unsqueeze(-2)
        rows = torch.diag_embed(u - a * s_rows) - mixed - mixed.transpose(-1, -2) \
            + 2.0 * a.unsqueeze(-1) * outer
    size = s.size(axis)
    if axis == s.dim() - 1:
        return rows.reshape(s.size(0), -1, size, size)
    block = block_diagonal(rows.reshape(s.size(0), -1, size, size))
    moved: List[int] = list(s_rows.shape[1:])
    block = block.reshape([s.size(0)] + moved + moved)       # rows in the moved-axis order
    last = s.dim() - 1
    block = block.movedim(last, axis).movedim(2 * last, last + axis)
    return block.reshape(s.size(0), 1, s[0].numel(), s[0].numel())


def _softmax_block(log: bool):
    def rule(g, c: Ctx):
        return c.call(softmax_residual_block, g, c.out, c.bound["dim"], log)
    return rule


for _name, _vjp, _doc in [
        ("log_softmax", _log_softmax_vjp, "y = x - logsumexp(x);  Jᵀg = g - softmax(x) Σ g "
                                          "(a gradient: torch's fused backward kernel)."),
        ("softmax", _softmax_vjp, "y = softmax(x);  Jᵀg = y ⊙ (g - Σ y ⊙ g) (a gradient: "
                                  "torch's fused backward kernel).")]:
    _block = {("input",): _softmax_block(_name == "log_softmax")}
    register([getattr(F, _name)], _name, "input, dim=None, _stacklevel=3, dtype=None",
             doc=_doc, vjp={"input": _vjp}, unsupported=_softmax_dim, residual_block=_block,
             mixes_samples=_normalises_samples)
    register([getattr(torch, _name), _name], _name, "input, dim=None, dtype=None",
             doc=_doc, vjp={"input": _vjp}, unsupported=_softmax_dim, residual_block=_block,
             mixes_samples=_normalises_samples)


# -- square roots of the loss Hessian (GGN family) -------------------------------------------
# ``S`` with ``H = Σ_c S[c] S[c]ᵀ`` per sample, ``[C or M, *input.shape]``; mean reduction
# multiplies by ``1/√divisor`` (CONVENTIONS.md). Class axis 1.

def _mean_scale(reduction: str, divisor: int) -> float:
    """``1/√divisor`` for mean reduction (written as a power, which keeps a symbolic batch
    size symbolic under ``torch.export``)."""
    return divisor ** -0.5 if reduction == "mean" else 1.0


def cross_entropy_position_weight(x: Tensor, target: Tensor, weight: Optional[Tensor],
                                  ignore_index: int, label_smoothing: float) -> Tensor:
    """The factor each position's Hessian ``diag(p) - p pᵀ`` carries, ``[N, d...]``: ``w_y``
    (0 where ignored) for class targets, ``Σ_c w_c t_c`` for probability targets ``t``
    (label smoothing applied); 1 without weights."""
    classes = x.size(1)
    if target.is_floating_point():
        t = target.to(x.dtype) * (1.0 - label_smoothing) + label_smoothing / classes
        if weight is not None:
            t = t * weight.to(x.dtype).reshape([1, classes] + [1] * (x.dim() - 2))
        return t.sum(1)
    keep = target != ignore_index
    safe = torch.where(keep, target, torch.zeros_like(target))
    return _class_weight(safe, weight, x) * keep.to(x.dtype)


def _ce_scaled(factor: Tensor, x: Tensor, target: Tensor, weight: Optional[Tensor],
               ignore_index: int, reduction: str, label_smoothing: float) -> Tensor:
    """``factor [K, N, C, d...]`` times ``√(position weight)`` and, for mean, ``1/√divisor``
    (the same divisor as the gradient's: ``Σ w_y`` over kept positions)."""
    scale = cross_entropy_position_weight(x, target, weight, ignore_index, label_smoothing)
    factor = factor * scale.sqrt().unsqueeze(0).unsqueeze(2)
    if reduction == "mean":
        factor = factor / cross_entropy_divisor(x, target, weight, ignore_index).sqrt()
    return factor


def cross_entropy_sqrt_hessian(x: Tensor, target: Tensor, weight: Optional[Tensor],
                               ignore_index: int, reduction: str,
                               label_smoothing: float) -> Tensor:
    """``S[c, n, k] = √p_c (δ_kc - p_k)`` (column c of ``diag(√p) - p √pᵀ``), ``[C, N, C]``,
    times ``√w`` of the position (class weight, 0 if ignored) and ``1/√divisor`` for mean.

    With extra axes ``x: [N, C, d...]`` every position is its own sample: the factor is
    block-diagonal over positions, ``[C·D, N, C, d...]`` with column ``c·D + j`` living at
    position ``j`` only (``D = Π d``), in BackPACK's column order.
    """
    classes = x.size(1)
    p = torch.softmax(x, 1)
    eye = torch.eye(classes, dtype=x.dtype, device=x.device)
    eye = eye.reshape([classes, 1, classes] + [1] * (x.dim() - 2))
    factor = p.sqrt().movedim(1, 0).unsqueeze(2) * (eye - p.unsqueeze(0))
    factor = _ce_scaled(factor, x, target, weight, ignore_index, reduction, label_smoothing)
    if x.dim() == 2:
        return factor
    flat = factor.flatten(3)                                            # [C, N, C, D]
    blocks = torch.diag_embed(flat, offset=0, dim1=1, dim2=4)           # [C, D, N, C, D]
    return blocks.reshape([-1] + list(factor.shape[1:]))


def cross_entropy_sqrt_hessian_low_rank(x: Tensor, target: Tensor, weight: Optional[Tensor],
                                        ignore_index: int, reduction: str,
                                        label_smoothing: float) -> Tensor:
    """The exact factor with ``C - 1`` columns, ``[C - 1, N, C]`` (2-d ``x``; else
    :func:`cross_entropy_sqrt_hessian`): ``M = diag(√p) - p √pᵀ`` (``S[c] = M[:, c]``) has
    the null vector ``v = √p`` (``|v| = 1``), so ``M Q`` with ``Q`` the first ``C - 1``
    columns of the reflection ``R = I - 2uuᵀ/|u|²``, ``u = v + e_C`` (``R v = -e_C``, so
    ``Q Qᵀ = I - vvᵀ``), has the same ``M Mᵀ = diag(p) - ppᵀ``; ``√pᵀ Q = 0`` leaves
    ``M Q = diag(√p) Q``: ``S[j, n, k] = √p_k (δ_kj - 2 u_k u_j / |u|²)``, ``|u|² = 2 + 2v_C``.
    Scaled like the exact factor."""
    if x.dim() != 2:
        return cross_entropy_sqrt_hessian(x, target, weight, ignore_index, reduction,
                                          label_smoothing)
    classes = x.size(1)
    v = torch.softmax(x, 1).sqrt()                                    # [N, C]
    u = torch.cat([v[:, :-1], v[:, -1:] + 1.0], 1)
    coefficient = u[:, :-1].t() * (-2.0 / (2.0 + 2.0 * v[:, -1]))      # [C - 1, N]
    factor = (coefficient.unsqueeze(2) * u.unsqueeze(0)).mul_(v.unsqueeze(0))
    eye = torch.eye(classes - 1, classes, dtype=x.dtype, device=x.device)
    factor.add_(eye.unsqueeze(1) * v.unsqueeze(0))                      # + δ_kj √p_k
    return _ce_scaled(factor, x, target, weight, ignore_index, reduction, label_smoothing)


def cross_entropy_sqrt_hessian_mc(x: Tensor, target: Tensor, weight: Optional[Tensor],
                                  ignore_index: int, reduction: str, label_smoothing: float,
                                  samples: int) -> Tensor:
    """``S[m] = (p - onehot(ŷ_m)) / √M`` with ``ŷ_m ~ Categorical(softmax(x))`` per position,
    scaled like the exact factor."""
    classes = x.size(1)
    p = torch.softmax(x, 1)
    flat = p.movedim(1, -1).reshape(-1, classes)
    drawn = torch.multinomial(flat, samples, replacement=True).t()  # [M, positions]
    onehot = F.one_hot(drawn, classes).to(x.dtype)                    # [M, positions, C]
    onehot = onehot.reshape([samples] + list(p.movedim(1, -1).shape)).movedim(-1, 2)
    factor = (p.unsqueeze(0) - onehot) / math.sqrt(samples)
    return _ce_scaled(factor, x, target, weight, ignore_index, reduction, label_smoothing)


def mse_sqrt_hessian(x: Tensor, reduction: str) -> Tensor:
    """``S[c, n] = √2 e_c`` over the ``C = numel/N`` output entries of a sample, ``[C, *x.shape]``."""
    features = x.numel() // x.size(0)
    eye = torch.eye(features, dtype=x.dtype, device=x.device) * math.sqrt(2.0)
    factor = eye.unsqueeze(1).expand(features, x.size(0), features)
    return factor.reshape([features] + list(x.shape)) * _mean_scale(reduction, x.numel())


def mse_sqrt_hessian_mc(x: Tensor, reduction: str, samples: int) -> Tensor:
    """``S[m] = 2(x - ŷ_m)/√M`` with ``ŷ_m ~ N(x, 1/2)``, i.e. ``√2 ε/√M``, ``ε ~ N(0, I)``."""
    noise = torch.randn([samples] + list(x.shape), dtype=x.dtype, device=x.device)
    return noise * (math.sqrt(2.0) / math.sqrt(samples)) * _mean_scale(reduction, x.numel())


def bce_curvature(x: Tensor, target: Tensor, weight: Optional[Tensor],
                  pos_weight: Optional[Tensor]) -> Tensor:
    """``∂²ℓ/∂x² = w σ(x)(1-σ(x)) (p y + 1 - y)`` per entry, ``w`` the weight and ``p`` the
    pos_weight (1 where absent)."""
    s = torch.sigmoid(x)
    curvature = s * (1.0 - s)
    if pos_weight is not None:
        curvature = curvature * (pos_weight * target + 1.0 - target)
    if weight is not None:
        curvature = curvature * weight
    if pos_weight is not None or weight is not None:  # no square root of a negative entry
        assert_all((curvature >= 0).all(), negative_curvature(
            "binary_cross_entropy_with_logits", "a target outside [0, 1] with pos_weight, or "
            "a negative weight"))
    return curvature.expand(x.shape)


def negative_curvature(loss: str, cause: str) -> str:
    """The call-time error of a loss whose second derivative is negative somewhere."""
    return ("fxcurv: " + loss + " has a negative second derivative here (" + cause + "), "
            "which has no square-root factor: the GGN family and diag_h would be NaN. Keep "
            "targets in [0, 1] and weights >= 0")


def assert_all(condition: Tensor, message: str) -> None:
    """Raise ``message`` at call time unless the boolean 0-dim ``condition`` holds."""
    if torch.jit.is_scripting():  # TorchScript drops the assertion op: test and raise
        if not bool(condition):
            raise RuntimeError(message)
    else:  # an op (no host sync on CUDA, kept by torch.export)
        torch._assert_async(condition, message)


def bce_sqrt_hessian(x: Tensor, reduction: str, target: Tensor, weight: Optional[Tensor],
                     pos_weight: Optional[Tensor]) -> Tensor:
    """``S[c, n] = √(∂²ℓ/∂x²) e_c`` (:func:`bce_curvature`) over the ``C = numel/N`` outputs
    (C = 1: BackPACK's)."""
    return diagonal_sqrt_hessian(x, bce_curvature(x, target, weight, pos_weight), reduction)


def diagonal_sqrt_hessian(x: Tensor, curvature: Tensor, reduction: str) -> Tensor:
    """``S[c, n] = √h e_c`` for a loss Hessian ``diag(h)`` (``h`` shaped like ``x``, >= 0)
    over the ``C = numel/N`` entries of a sample, ``1/√numel`` for mean."""
    features = x.numel() // x.size(0)
    root = curvature.sqrt().reshape(x.size(0), features)
    eye = torch.eye(features, dtype=x.dtype, device=x.device)
    factor = eye.unsqueeze(1) * root.unsqueeze(0)                       # [C, N, C]
    return factor.reshape([features] + list(x.shape)) * _mean_scale(reduction, x.numel())


def bce_sqrt_hessian_mc(x: Tensor, reduction: str, samples: int,
                        weight: Optional[Tensor]) -> Tensor:
    """``S[m] = √w (σ(x) - ŷ_m)/√M`` with ``ŷ_m ~ Bernoulli(σ(x))``."""
    s = torch.sigmoid(x)
    drawn = torch.bernoulli(s.unsqueeze(0).expand([samples] + list(x.shape)))
    factor = (s.unsqueeze(0) - drawn) / math.sqrt(samples) * _mean_scale(reduction, x.numel())
    return factor if weight is None else factor * weight.sqrt()


def _bce_sqrt_hessian_mc(c: Ctx, samples: int):
    """Sampled labels give the Hessian of a weighted likelihood; with ``pos_weight`` the loss
    is none, so its Monte-Carlo factor is refused, not approximated."""
    if c.bound["pos_weight"] is not None:
        raise node_error(c.node, "binary_cross_entropy_with_logits with pos_weight is not the "
                         "likelihood of the sampled labels, so its Monte-Carlo Hessian factor "
                         "is undefined", "Request the exact quantities (diag_ggn_exact, kflr, "
                         "sqrt_ggn_exact) or drop pos_weight.")
    return c.call(bce_sqrt_hessian_mc, c.args.input, c.bound["reduction"], samples,
                  c.args.weight)


# -- mean divisors (data parallelism) -------------------------------------------------------
# The divisor a rank's ``reduction='mean'`` used, computed from its local batch; the data-
# parallel pass sums them over the ranks and rescales each rank's results by its share.

def cross_entropy_divisor(x: Tensor, target: Tensor, weight: Optional[Tensor],
                          ignore_index: int) -> Tensor:
    """PyTorch's mean divisor of ``cross_entropy`` / ``nll_loss``: ``Σ w_y`` over the kept
    positions for class targets (their number without ``weight``), the number of positions
    for probability targets."""
    if target.is_floating_point():
        return positions_divisor(x)
    keep = target != ignore_index
    safe = torch.where(keep, target, torch.zeros_like(target))
    return (_class_weight(safe, weight, x) * keep.to(x.dtype)).sum()


def positions_divisor(x: Tensor) -> Tensor:
    """``N · d1 · ...`` for ``x: [N, C, d1, ...]``: what the cross-entropy factors divide by."""
    return torch.full([], x.numel() // x.size(1), dtype=x.dtype, device=x.device)


def numel_divisor(x: Tensor) -> Tensor:
    """``numel``: the mean divisor of ``mse_loss`` and ``binary_cross_entropy_with_logits``."""
    return torch.full([], x.numel(), dtype=x.dtype, device=x.device)


def _class_divisor(c: Ctx, part: str):
    """The gradient and the Hessian factor of cross-entropy share one divisor."""
    return c.call(cross_entropy_divisor, c.args.input, c.args.target, c.args.weight,
                  c.bound["ignore_index"])


# -- the losses ------------------------------------------------------------------------------
def _cross_entropy_unsupported(b: dict) -> Optional[str]:
    if b["weight"] is not None and b["label_smoothing"]:
        return "cross_entropy with both class weights and label smoothing is not supported"
    return _legacy_args(b)


def _ce_arguments(c: Ctx) -> list:
    return [c.args.input, c.args.target, c.args.weight, c.bound["ignore_index"],
            c.bound["reduction"], c.bound["label_smoothing"]]


loss([F.cross_entropy], "cross_entropy",
     "input, target, weight=None, size_average=None, ignore_index=-100, reduce=None, "
     "reduction='mean', label_smoothing=0.0",
     doc="ℓ = -log softmax(f)_y;  ∂ℓ/∂f = softmax(f) - onehot(y).",
     vjp={"input": _loss_vjp(cross_entropy_grad, "weight", "ignore_index", "reduction",
                             "label_smoothing", class_axis=True)},
     unsupported=_cross_entropy_unsupported,
     sqrt_hessian=lambda c: c.call(cross_entropy_sqrt_hessian, *_ce_arguments(c)),
     sqrt_hessian_mc=lambda c, m: c.call(cross_entropy_sqrt_hessian_mc, *_ce_arguments(c), m),
     sqrt_hessian_low_rank=lambda c: c.call(cross_entropy_sqrt_hessian_low_rank,
                                            *_ce_arguments(c)),
     mean_divisor=_class_divisor, class_axis=True)


def classes_last(x: Tensor, classes: int, rank: int, where: str) -> Tensor:
    """``x`` unchanged, after checking that its last axis holds the ``classes`` (-1: any
    number) and it has ``rank`` axes (-1: any, at least 2), so that the rows of
    ``x.reshape(-1, classes)`` (or ``x.flatten(0, rank - 2)``) are its entries over the other
    axes (row-major)."""
    if x.dim() < 2 or (classes != -1 and x.size(-1) != classes) or \
            (rank != -1 and x.dim() != rank):
        raise ValueError(
            "fxcurv: the input of {} is a {} value viewed as rows of {} classes, which are not "
            "its last axis ({} axes expected): exact curvature (GGN, Hessian, kflr, products) needs one row per "
            "sample. Pass the [N, C, T] layout (cross_entropy(logits.transpose(1, 2), y)), or "
            "request first-order or Monte-Carlo quantities".format(where, list(x.shape),
                                                                   classes, rank))
    return x


affine([classes_last], "classes_last", "x, classes, rank, where",
       doc="y = x (checked to have the classes on its last axis);  Jᵀg = g.",
       vjp={"x": lambda g, c: g}, jvp={"x": lambda t, c: t}, sandwich={"x": "shared"})


def targets_of_rows(target: Tensor, x: Tensor) -> Tensor:
    """The targets of the rows of ``x.reshape(-1, C)`` laid out for ``x.movedim(-1, 1)``:
    class indices ``[N·T...]`` -> ``[N, T...]`` (``x``'s shape without the classes);
    probabilities ``[N·T..., C]`` -> ``[N, C, T...]``."""
    if target.is_floating_point():
        return target.reshape(x.shape).movedim(-1, 1)
    return target.reshape(x.shape[:-1])


register([targets_of_rows], "targets_of_rows", "target, x", constant=True,
         doc="Targets of merged rows put on the input's own axes (a reshape; probabilities also "
             "move their class axis): inserted only for targets that do not depend on the "
             "parameters (passes/sample_axis.py), so no derivative.")


def class_rows(logits: Tensor) -> Tensor:
    """``logits`` unchanged, after checking they are ``[N, C]`` (where ``log_softmax`` over
    the last axis is over the classes, axis 1, as ``nll_loss`` reads them)."""
    if logits.dim() != 2:
        raise ValueError("fxcurv: log_softmax(dim=-1) before nll_loss is a cross-entropy only "
                         "for [N, C] logits, got {} dimensions; use log_softmax(dim=1)"
                         .format(logits.dim()))
    return logits


affine([class_rows], "class_rows", "logits",
       doc="y = x (checked to be [N, C]);  Jᵀg = g.", vjp={"logits": lambda g, c: g})


def _after_log_softmax(c: Ctx):
    """``nll_loss(log_softmax(z, 1), y, ...)`` -> ``cross_entropy(z, y, ...)`` (the same
    function) when the log-probabilities feed nothing else, so the loss's Hessian is taken
    w.r.t. the logits: the GGN of a model ending in ``LogSoftmax`` + ``NLLLoss`` is that of
    the logits with cross-entropy, not zero. ``log_softmax(z, -1)`` too, with a call-time
    check that ``z`` is ``[N, C]`` (:func:`class_rows`). None otherwise (the call stays)."""
    source = c.bound["input"]
    rule = rule_for(source) if isinstance(source, fx.Node) else None
    if rule is None or rule.name != "log_softmax" or len(source.users) != 1:
        return None
    bound = rule.bind(source)
    if bound["dim"] not in (1, -1) or bound.get("dtype") is not None:
        return None
    logits = c.emit.proxy(bound["input"])
    if bound["dim"] == -1:
        logits = c.call(class_rows, logits)
    return c.call(F.cross_entropy, logits, c.args.target,
                  **{key: getattr(c.args, key) for key in ("weight", "ignore_index",
                                                           "reduction")})


loss([F.nll_loss], "nll_loss",
     "input, target, weight=None, size_average=None, ignore_index=-100, reduce=None, "
     "reduction='mean'",
     doc="ℓ = -f_y;  ∂ℓ/∂f = -onehot(y).",
     vjp={"input": _loss_vjp(nll_loss_grad, "weight", "ignore_index", "reduction",
                             class_axis=True)},
     unsupported=_legacy_args, mean_divisor=_class_divisor, lower=_after_log_softmax,
     class_axis=True)


def _target_vjp(sign_grad):
    def vjp(g, c: Ctx):
        return -_loss_vjp(sign_grad, "reduction", class_axis=False)(g, c)
    return vjp


def _regression(name: str) -> dict:
    """The ``numel`` mean divisor and target shape check of MSE and BCE-with-logits."""
    return dict(
        mean_divisor=lambda c, part: c.call(numel_divisor, c.args.input),
        check_target=lambda c: c.call(check_same_shape, c.args.input, c.args.target, name))


loss([F.mse_loss], "mse_loss",
     "input, target, size_average=None, reduce=None, reduction='mean', weight=None",
     doc="ℓ = (f - y)²;  ∂ℓ/∂f = 2(f - y) = -∂ℓ/∂y.",
     vjp={"input": _loss_vjp(mse_grad, "reduction", class_axis=False),
          "target": _target_vjp(mse_grad)},
     unsupported=lambda b: _legacy_args(b) or (
         "the 'weight' argument of mse_loss is not supported" if b["weight"] is not None
         else None),
     sqrt_hessian=lambda c: c.call(mse_sqrt_hessian, c.args.input, c.bound["reduction"]),
     sqrt_hessian_mc=lambda c, m: c.call(mse_sqrt_hessian_mc, c.args.input,
                                         c.bound["reduction"], m),
     **_regression("mse_loss"))
loss([F.binary_cross_entropy_with_logits], "binary_cross_entropy_with_logits",
     "input, target, weight=None, size_average=None, reduce=None, reduction='mean', "
     "pos_weight=None",
     doc="ℓ = -w[p y log σ(f) + (1 - y) log(1 - σ(f))];  ∂ℓ/∂f = w[σ(f)(p y + 1 - y) - p y];  "
         "∂²ℓ/∂f² = w σ(f)(1 - σ(f))(p y + 1 - y) (w: weight, p: pos_weight).",
     vjp={"input": _loss_vjp(bce_with_logits_grad, "weight", "pos_weight", "reduction",
                             class_axis=False)},
     unsupported=_legacy_args,
     sqrt_hessian=lambda c: c.call(bce_sqrt_hessian, c.args.input, c.bound["reduction"],
                                   c.args.target, c.args.weight, c.args.pos_weight),
     sqrt_hessian_mc=_bce_sqrt_hessian_mc, **_regression("binary_cross_entropy_with_logits"))


# -- elementwise regression losses, lowered to ruled ops ---------------------------------------
def _reduced(c: Ctx, values):
    """``values`` reduced as the loss's ``reduction`` says."""
    reduction = c.bound["reduction"]
    if reduction == "mean":
        return values.mean()
    return values.sum() if reduction == "sum" else values


def _huber_like(c: Ctx, width: float, scale: float):
    """``ℓ = s·½d²/w`` where ``|d| < w``, else ``s·(|d| - ½w)``, ``d = f - y``: ``s = w``
    (``w = δ``) is Huber, ``s = 1`` (``w = β``) smooth L1, ``w = 0`` L1 (``|d|``)."""
    d = c.args.input - c.args.target
    size = d.abs()
    if width == 0:
        return _reduced(c, size)
    inside = d.square() * (0.5 * scale / width)
    outside = (size - 0.5 * width) * scale if scale != 1 else size - 0.5 * width
    return _reduced(c, torch.where(size < width, inside, outside))


def _no_weight(b: dict) -> Optional[str]:
    if b.get("weight") is not None:
        return "the 'weight' argument of this loss is not supported"
    return _legacy_args(b)


register([F.huber_loss], "huber_loss", "input, target, reduction='mean', delta=1.0, weight=None",
         doc="ℓ = ½d² where |d| < δ, else δ(|d| - ½δ), d = f - y;  lowered to abs, mul, where "
             "and the reduction (ℓ'' = 1 inside, 0 outside).",
         lower=lambda c: _huber_like(c, c.bound["delta"], c.bound["delta"]),
         unsupported=_no_weight)
register([F.smooth_l1_loss], "smooth_l1_loss",
         "input, target, size_average=None, reduce=None, reduction='mean', beta=1.0",
         doc="ℓ = ½d²/β where |d| < β, else |d| - ½β (β = 0: |d|), d = f - y;  lowered to abs, "
             "mul, where and the reduction.",
         lower=lambda c: _huber_like(c, c.bound["beta"], 1.0), unsupported=_no_weight)
_L1_LOSS = F.l1_loss  # PyTorch's (the tracer puts l1_loss_keeping_weight in its place)


def l1_loss_keeping_weight(input, target, size_average=None, reduce=None, reduction="mean",
                           weight=None):
    """``F.l1_loss`` while tracing: with a ``weight``, written out as PyTorch computes it
    (``|f - y| ⊙ w``, summed, divided by ``Σ w`` for ``mean``), since PyTorch's dispatch for
    traced values drops that argument (torch 2.14); without one, PyTorch's call (recorded as
    a call of this function, whose rule is l1_loss's)."""
    if weight is None:
        return _L1_LOSS(input, target, size_average, reduce, reduction)
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    errors = torch.abs(input - target) * weight
    if reduction == "none":
        return errors
    if reduction == "sum":
        return torch.sum(errors)
    if reduction == "mean":
        return torch.sum(errors) / torch.sum(weight)
    raise ValueError(f"l1_loss: reduction {reduction!r} is unknown")


register([F.l1_loss, l1_loss_keeping_weight], "l1_loss",
         "input, target, size_average=None, reduce=None, reduction='mean', weight=None",
         doc="ℓ = |f - y|;  lowered to abs and the reduction (ℓ'' = 0: a zero GGN).",
         lower=lambda c: _huber_like(c, 0.0, 1.0), unsupported=_no_weight)
