"""Normalisation and regularisation layers: batch norm, layer norm, embedding, dropout.

Normalisation ``y = γ ⊙ x̂ + β`` with ``x̂ = (x - μ) / σ``, ``σ = sqrt(var + eps)``:

* ``batch_norm`` (``x: [N, C, *]``, ``γ, β: [C]``): statistics per channel (axis 1), from the
  running buffers in eval mode (an affine map of ``x``), from the batch in train mode (over every
  axis but 1, biased variance; every sample then depends on every other one).
* ``layer_norm`` (``x: [*, *S]``, ``γ, β: S = normalized_shape``): statistics of each position
  over the last ``len(S)`` axes.

With statistics of ``x`` itself the input Jacobian-transpose is the projected form
``x̄ = γ/σ ⊙ (g - mean(g) - x̂ ⊙ mean(g ⊙ x̂))`` (means over the normalised axes), with
constant statistics simply ``x̄ = g ⊙ γ/σ``; always ``γ̄ = Σ g ⊙ x̂`` and ``β̄ = Σ g`` over
every axis but the parameter's. Per sample, the sums keep the sample axis.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .contraction import Contraction
from .helpers import merge_middle
from .reductions import norm_of
from .registry import COUPLES_ROWS, RANDOM, VIEW, Ctx, by_product, fresh, register


# -- scriptable helpers (runtime shape logic) -----------------------------------------------
def channel_view(t: Tensor, x: Tensor) -> Tensor:
    """Per-channel ``[C]`` -> ``[C, 1, ..., 1]``, broadcastable against ``x: [N, C, *]``
    (and against leading vector axes in front of it)."""
    return t.reshape([-1] + [1] * (x.dim() - 2))


def other_axes(ndim: int, keep: List[int]) -> List[int]:
    """The axes of an ``ndim``-D tensor not in ``keep`` (negative indices count from the end)."""
    kept = [k % ndim for k in keep]
    others: List[int] = []
    for d in range(ndim):
        if d not in kept:
            others.append(d)
    return others


def sum_except(t: Tensor, keep: List[int]) -> Tensor:
    """Sum ``t`` over every axis not in ``keep``; the kept axes remain, in order."""
    dims = other_axes(t.dim(), keep)
    return t.sum(dims) if len(dims) > 0 else t


def mean_except(t: Tensor, keep: List[int]) -> Tensor:
    """Mean of ``t`` over every axis not in ``keep``, reduced axes kept with size 1."""
    dims = other_axes(t.dim(), keep)
    return t.mean(dims, keepdim=True) if len(dims) > 0 else t


def drop_padding(g: Tensor, indices: Tensor, num_rows: int,
                 padding_idx: Optional[int]) -> Tensor:
    """Zero the cotangent vectors at positions that look up ``padding_idx`` (negative: from
    the end): PyTorch gives the padding row no gradient."""
    if padding_idx is None:
        return g
    keep = indices != padding_idx % num_rows
    return g * keep.unsqueeze(-1).to(g.dtype)


def scatter_rows(g: Tensor, rows: Tensor, num_rows: int, lead: int) -> Tensor:
    """``table[*l, r] = Σ_{i: rows_i = r} g[*l, i]`` for ``g: [*lead, *rows.shape, D]``;
    returns ``[*lead, num_rows, D]``."""
    head: List[int] = list(g.shape[:lead])
    vectors = g.reshape(head + [-1, g.size(-1)])
    table = torch.zeros(head + [num_rows, g.size(-1)], dtype=g.dtype, device=g.device)
    return table.index_add(lead, rows.reshape(-1), vectors)


def embedding_weight_vjp(g: Tensor, indices: Tensor, weight: Tensor, lead: int,
                         padding_idx: Optional[int]) -> Tensor:
    """``W̄[r] = Σ_{i: idx_i = r} g_i`` ``[*lead, V, D]``, zero at ``padding_idx``."""
    g = drop_padding(g, indices, weight.size(0), padding_idx)
    return scatter_rows(g, indices, weight.size(0), lead)


def embedding_factors(g: Tensor, indices: Tensor, weight: Tensor, lead: int,
                      padding_idx: Optional[int]) -> Tuple[Tensor, Tensor]:
    """The weight's contraction factors: ``W̄_n = Σ_t onehot(idx_nt) g_ntᵀ`` with
    ``L = g [*lead, N, 1, T, D]`` (zero at ``padding_idx``) and the index factor
    ``R = idx [N, 1, T]``."""
    g = drop_padding(g, indices, weight.size(0), padding_idx)
    samples = indices.size(0)
    return merge_middle(g, lead + 1).unsqueeze(lead + 1), indices.reshape([samples, 1, -1])


def embedding_index_gram(indices: Tensor, weight: Tensor, padding_idx: Optional[int]) -> Tensor:
    """``A = Σ_{n,t} e eᵀ / (N·T)`` over the one-hot rows ``e = onehot(idx_nt)``: the diagonal
    ``[V, V]`` of index counts over the ``N·T`` lookups, zero at ``padding_idx``."""
    rows = weight.size(0)
    flat = indices.reshape(-1)
    counts = torch.zeros([rows], dtype=weight.dtype, device=weight.device)
    counts = counts.index_add(0, flat, torch.ones([flat.numel()], dtype=weight.dtype,
                                                  device=weight.device))
    if padding_idx is not None:
        counts[padding_idx % rows] = 0.0
    return torch.diag(counts / flat.numel())


def embedding_output_gram(g: Tensor, indices: Tensor, weight: Tensor, lead: int,
                          padding_idx: Optional[int]) -> Tensor:
    """``G = Σ s sᵀ`` ``[D, D]`` over every leading, sample and position axis of
    ``g: [*lead, N, *, D]``, lookups of ``padding_idx`` (no gradient) left out."""
    flat = drop_padding(g, indices, weight.size(0), padding_idx).reshape(-1, g.size(-1))
    return torch.matmul(flat.t(), flat)


# -- batch_norm ------------------------------------------------------------------------------
BN_TRAIN_MIXES = "BatchNorm in train mode normalises with batch statistics, mixing samples"


def _bn_keep(c: Ctx, sample: bool = False) -> list:
    """Axes of ``g`` a per-channel sum keeps: the lead axes, the sample axis (per sample
    only) and the channel axis."""
    return list(range(c.lead)) + ([c.lead] if sample else []) + [c.lead + 1]


def _bn_normalized(c: Ctx):
    """``(x̂, 1/σ)`` with ``1/σ`` broadcastable to ``x``: running statistics in eval mode,
    batch statistics (over every axis but 1, biased variance) in train mode."""
    x = c.args.input
    if c.bound["training"]:
        mean = c.call(mean_except, x, [1])
        var = c.call(mean_except, (x - mean).square(), [1])
    else:
        mean = c.call(channel_view, c.args.running_mean, x)
        var = c.call(channel_view, c.args.running_var, x)
    inv_std = torch.rsqrt(var + c.bound["eps"])
    return (x - mean) * inv_std, inv_std


def _bn_input_vjp(g, c: Ctx):
    """Eval: ``x̄ = g γ/σ``. Train: ``x̄ = γ/σ (g - mean(g) - x̂ mean(g x̂))``, the means over
    the sample and spatial axes of each vector in ``g``."""
    x_hat, inv_std = _bn_normalized(c)
    scale = inv_std
    if c.bound["weight"] is not None:
        scale = scale * c.call(channel_view, c.args.weight, c.args.input)
    if not c.bound["training"]:
        return g * scale
    mean_g = c.call(mean_except, g, _bn_keep(c))
    mean_g_x_hat = c.call(mean_except, g * x_hat, _bn_keep(c))
    return scale * (g - mean_g - x_hat * mean_g_x_hat)


def _bn_param_rule(per_sample: bool, times_x_hat: bool):
    """``γ̄ = Σ g x̂`` (``times_x_hat``) or ``β̄ = Σ g``, summed over every axis but the
    channel (and the sample axis when ``per_sample``: eval mode only)."""
    def rule(g, c: Ctx):
        if per_sample and c.bound["training"]:
            raise ValueError(f"{BN_TRAIN_MIXES}: it has no per-sample parameter gradients")
        values = g * _bn_normalized(c)[0] if times_x_hat else g
        return c.call(sum_except, values, _bn_keep(c, sample=per_sample))
    return rule


def _bn_unsupported(b: dict) -> Optional[str]:
    has_stats = b["running_mean"] is not None or b["running_var"] is not None
    if b["training"] and has_stats:
        return ("batch_norm with training=True and running statistics updates running_mean/"
                "running_var in place, and the compiled step never mutates the model: pass "
                "running_mean=None, running_var=None (BatchNorm modules are lowered so)")
    if not b["training"] and (b["running_mean"] is None or b["running_var"] is None):
        return "batch_norm with training=False needs running_mean and running_var"
    return None


register([F.batch_norm], "batch_norm",
         "input, running_mean, running_var, weight=None, bias=None, training=False, "
         "momentum=0.1, eps=1e-05",
         doc="y = γ (x - μ)/σ + β per channel (axis 1), x: [N, C, *], γ, β: [C]. Eval: μ, σ² "
             "running buffers, x̄ = g γ/σ. Train: batch statistics, x̄ = γ/σ (g - mean g - "
             "x̂ mean(g x̂)). γ̄ = Σ g x̂, β̄ = Σ g over all axes but 1; per sample [N, C] "
             "(eval only).",
         vjp={"input": _bn_input_vjp, "running_mean": None, "running_var": None,
              "weight": _bn_param_rule(False, True), "bias": _bn_param_rule(False, False)},
         batch_grad={"weight": _bn_param_rule(True, True),
                     "bias": _bn_param_rule(True, False)},
         mixes_samples=lambda b: BN_TRAIN_MIXES if b["training"] else None,
         traits=(COUPLES_ROWS,),  # train mode: x̄ above is the full-batch Jacobian-transpose
         # eval: affine in x, γ, β; train: the batch statistics make it non-linear in x
         hessian_is_zero=lambda b: ("weight", "bias") if b["training"] else True,
         unsupported=_bn_unsupported)


# -- layer_norm ------------------------------------------------------------------------------
def _ln_axes(c: Ctx) -> list:
    """The normalised axes, counted from the end: ``[-len(S), ..., -1]``."""
    return list(range(-len(c.bound["normalized_shape"]), 0))


def _ln_keep(c: Ctx, sample: bool = False) -> list:
    """Axes of ``g`` a parameter sum keeps: lead (and sample) axes and the normalised ones."""
    return list(range(c.lead + int(sample))) + _ln_axes(c)


def _ln_statistics(c: Ctx):
    """``[μ, 1/σ]`` of the forward call (its by-product, ``layer_norm_statistics``)."""
    return c.call(layer_norm_statistics, c.out, c.args.input, c.args.normalized_shape,
                  c.args.weight, c.args.bias, c.bound["eps"])


def _ln_normalized(c: Ctx):
    """``x̂ = (x - μ)/σ``, from the forward's statistics."""
    statistics = _ln_statistics(c)
    return (c.args.input - statistics[0]) * statistics[1]


@fresh
def layer_norm_input_vjp(g: Tensor, x: Tensor, normalized_shape: List[int],
                         statistics: Tensor, weight: Optional[Tensor], lead: int) -> Tensor:
    """``x̄ = 1/σ (ĝ - mean(ĝ) - x̂ mean(ĝ x̂))`` with ``ĝ = g γ`` (means over the normalised
    axes) for ``g`` ``[*lead, *x.shape]``: one ``native_layer_norm_backward`` call whose rows
    are the lead vectors' copies of ``x`` (and of its statistics)."""
    count = 1
    for size in g.shape[:lead]:
        count *= size
    rows = [count] + list(x.shape)
    mean, inv_std = statistics[0], statistics[1]
    grads = torch.ops.aten.native_layer_norm_backward(
        g.reshape(rows), x.expand(rows).contiguous(), normalized_shape,
        mean.expand([count] + list(mean.shape)).contiguous(),
        inv_std.expand([count] + list(inv_std.shape)).contiguous(), weight, None,
        [True, False, False])  # (the kernel reads the statistics as laid out in memory)
    return grads[0].reshape(g.shape)


def _ln_input_vjp(g, c: Ctx):
    return c.call(layer_norm_input_vjp, g, c.args.input, c.args.normalized_shape,
                  _ln_statistics(c), c.args.weight, c.lead)


def layer_norm_with_statistics(x: Tensor, normalized_shape: List[int], weight: Optional[Tensor],
                               bias: Optional[Tensor],
                               eps: float) -> Tuple[Tensor, Tensor]:
    """``(y, [μ, 1/σ])``: ``F.layer_norm``'s output and its statistics stacked, ``[2, *, 1,
    ..., 1]``, from one ``native_layer_norm`` call (the kernel ``F.layer_norm`` runs)."""
    y, mean, inv_std = torch.native_layer_norm(x, normalized_shape, weight, bias, eps)
    return y, torch.stack([mean, inv_std])


@by_product(layer_norm_with_statistics, "statistics")
def layer_norm_statistics(y: Tensor, x: Tensor, normalized_shape: List[int],
                          weight: Optional[Tensor], bias: Optional[Tensor],
                          eps: float) -> Tensor:
    """The statistics ``[μ, 1/σ]`` behind the forward's ``y = layer_norm(x)``; the cleanup pass
    (``share_by_products``) makes that forward call return them, so they are not recomputed."""
    return layer_norm_with_statistics(x, normalized_shape, weight, bias, eps)[1]


@fresh
def layer_norm_grads(g: Tensor, x: Tensor, normalized_shape: List[int],
                     statistics: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                     output_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    """``(x̄, γ̄, β̄)`` of a gradient (lead 0) in one ``native_layer_norm_backward`` call, as
    autograd computes them (the formulas of the rule's docstring); ``output_mask`` says which
    are wanted (the others are undefined). The input, weight and bias rules emit the same
    call, merged into one node by the cleanup pass."""
    mask = [output_mask[0], output_mask[1] and weight is not None,
            output_mask[2] and bias is not None]
    return torch.ops.aten.native_layer_norm_backward(g, x, normalized_shape, statistics[0],
                                                     statistics[1], weight, bias, mask)


def _ln_gradients(g, c: Ctx):
    """The shared ``layer_norm_grads`` call of a gradient (lead 0): ``(x̄, γ̄, β̄)``."""
    return c.call(layer_norm_grads, g, c.args.input, c.args.normalized_shape, _ln_statistics(c),
                  c.args.weight, c.args.bias, output_mask=[True, True, True])


def _ln_gradient_of(position: int, vjp):
    """The vjp rule ``vjp`` for lead > 0; output ``position`` of the shared call for a
    gradient."""
    return lambda g, c: _ln_gradients(g, c)[position] if c.lead == 0 else vjp(g, c)


def _ln_param_rule(per_sample: bool, times_x_hat: bool):
    """``γ̄ = Σ g x̂`` (``times_x_hat``) or ``β̄ = Σ g`` over all positions (of each sample
    when ``per_sample``)."""
    def rule(g, c: Ctx):
        values = g * _ln_normalized(c) if times_x_hat else g
        return c.call(sum_except, values, _ln_keep(c, sample=per_sample))
    return rule


def layer_norm_residual_block(g: Tensor, x: Tensor, weight: Optional[Tensor], eps: float,
                              normalized: int) -> Tensor:
    """Per-sample residual ``[N, B, K, K]`` of ``layer_norm`` in its input: a block per
    position (``B`` per sample, ``K`` normalised entries each). With ``h = g γ``,
    ``h̃ = h - mean h``, ``a = hᵀx̂``, ``P = I - 11ᵀ/K``:
    ``Σ_i h_i ∂²x̂_i/∂x_j∂x_k = -(h̃ x̂ᵀ + x̂ h̃ᵀ + a P - (3a/K) x̂ x̂ᵀ) / (K σ²)``."""
    if x.dim() <= normalized:
        raise RuntimeError("fxcurv: a second derivative of layer_norm over the sample axis 0 "
                           "mixes the samples")
    samples, count = x.size(0), 1
    for axis in range(x.dim() - normalized, x.dim()):
        count *= x.size(axis)
    h = g if weight is None else g * weight
    rows, h_rows = x.reshape(samples, -1, count), h.reshape(samples, -1, count)
    centered = rows - rows.mean(-1, keepdim=True)
    inverse_var = 1.0 / (centered.square().mean(-1, keepdim=True) + eps)
    x_hat = centered * inverse_var.sqrt()
    h_centered = h_rows - h_rows.mean(-1, keepdim=True)
    a = (h_rows * x_hat).sum(-1, keepdim=True).unsqueeze(-1)
    projection = torch.eye(count, dtype=x.dtype, device=x.device) - 1.0 / count
    mixed = h_centered.unsqueeze(-1) * x_hat.unsqueeze(-2)
    outer = x_hat.unsqueeze(-1) * x_hat.unsqueeze(-2)
    blocks = (mixed + mixed.transpose(-1, -2) + a * projection - (3.0 / count) * a * outer) \
        * (-inverse_var.unsqueeze(-1) / count)
    return blocks


def _ln_residual_block(g, c: Ctx):
    return c.call(layer_norm_residual_block, g, c.args.input, c.args.weight, c.bound["eps"],
                  len(c.bound["normalized_shape"]))


register([F.layer_norm], "layer_norm", "input, normalized_shape, weight=None, bias=None, eps=1e-05",
         doc="y = γ (x - μ)/σ + β over the last len(S) axes, x: [*, *S], γ, β: S. "
             "x̄ = 1/σ (ĝ - mean ĝ - x̂ mean(ĝ x̂)) with ĝ = g γ; γ̄ = Σ g x̂, β̄ = Σ g over "
             "the other axes; per sample [N, *S].",
         vjp={"input": _ln_gradient_of(0, _ln_input_vjp),
              "weight": _ln_gradient_of(1, _ln_param_rule(False, True)),
              "bias": _ln_gradient_of(2, _ln_param_rule(False, False))},
         batch_grad={"weight": _ln_param_rule(True, True),
                     "bias": _ln_param_rule(True, False)},
         hessian_is_zero=("weight", "bias"),  # non-linear (not elementwise) in the input
         residual_block={("input",): _ln_residual_block})


# -- RMS norm (lowered) ----------------------------------------------------------------------
def rms_norm_default_eps(x: Tensor) -> Tensor:
    """torch's default ``eps`` of ``rms_norm``: the machine epsilon of ``x``'s computation
    type (float64 for float64, else float32), as a 0-d tensor of ``x``'s dtype."""
    # torch.finfo(...).eps of float64 and float32 (TorchScript has no finfo)
    eps = 2.220446049250313e-16 if x.dtype == torch.float64 else 1.1920928955078125e-07
    return torch.full([], eps, dtype=x.dtype, device=x.device)


register([rms_norm_default_eps], "rms_norm_default_eps", "x", constant=True,
         doc="A constant of the input's dtype: no derivative.")


def _lower_rms_norm(c: Ctx):
    """``y = γ ⊙ x / √(mean(x²) + eps)``, the mean over the last ``len(S)`` axes
    (``S = normalized_shape``, ``γ: S``): ``square``, ``mean``, ``rsqrt``, ``mul`` (as torch
    computes it; ``eps = None``: the dtype's machine epsilon)."""
    x, eps = c.args.input, c.bound["eps"]
    axes = list(range(-len(c.bound["normalized_shape"]), 0))
    if eps is None:
        eps = c.call(rms_norm_default_eps, x)
    y = x * torch.rsqrt(x.square().mean(axes, keepdim=True) + eps)
    return y if c.args.weight is None else y * c.args.weight


register([F.rms_norm, torch.rms_norm], "rms_norm", "input, normalized_shape, weight=None, eps=None",
         doc=_lower_rms_norm.__doc__, lower=_lower_rms_norm)


# -- weight norm (lowered) -------------------------------------------------------------------
def _lower_weight_norm(c: Ctx):
    """``w = v ⊙ g / ‖v‖`` (torch's ``_weight_norm``, behind ``nn.utils.weight_norm`` and
    ``nn.utils.parametrizations.weight_norm``): the 2-norm of each slice of ``v`` along
    ``dim`` (``g``: ``v.size(dim)`` entries, 1 elsewhere), of all of ``v`` for ``dim = -1``;
    ``transpose``, ``reshape``, the 2-norm (:func:`norm_of`), ``div``, ``mul``."""
    v, g, dim = c.args.v, c.args.g, c.bound["dim"]
    if dim == -1:
        norms = norm_of(c, v, 2.0, None, False)
    else:
        rows = v if dim == 0 else v.transpose(0, dim)
        norms = norm_of(c, rows.reshape(rows.size(0), -1), 2.0, 1, False)
    return v * (g / norms.reshape(g.shape))


register([torch._weight_norm], "weight_norm", "v, g, dim=0", doc=_lower_weight_norm.__doc__,
         lower=_lower_weight_norm)


# -- local response norm (lowered) -----------------------------------------------------------
def _lower_local_response_norm(c: Ctx):
    """``y = x / (k + α · mean_{window} x²)^β``, the mean over ``size`` neighbouring channels
    (zero-padded: ``size//2`` before, ``(size-1)//2`` after; divided by ``size``), as torch
    computes it: ``square``, ``reshape`` to ``[N, 1, C, positions]``, ``pad``,
    ``avg_pool2d`` over ``(size, 1)``, ``mul``, ``add``, ``pow``, ``div``."""
    b, x = c.bound, c.args.input
    size = b["size"]
    squares = x.square().reshape(x.size(0), 1, x.size(1), -1)
    padded = F.pad(squares, (0, 0, size // 2, (size - 1) // 2))
    window_mean = F.avg_pool2d(padded, (size, 1), stride=1).reshape(x.shape)
    return x / (window_mean * b["alpha"] + b["k"]).pow(b["beta"])


register([F.local_response_norm], "local_response_norm",
         "input, size, alpha=0.0001, beta=0.75, k=1.0", doc=_lower_local_response_norm.__doc__,
         lower=_lower_local_response_norm)


# -- embedding -------------------------------------------------------------------------------
def _embedding_unsupported(b: dict) -> Optional[str]:
    if b["max_norm"] is not None:
        return ("embedding with max_norm renormalises rows of the weight in place in the "
                "forward, and the compiled step never mutates the model: use max_norm=None "
                "(renormalise the weight outside the step, e.g. after optimizer.step())")
    if b["scale_grad_by_freq"]:
        return ("embedding with scale_grad_by_freq=True scales gradients by in-batch index "
                "counts, which is not a derivative: use scale_grad_by_freq=False")
    if b["sparse"]:
        return "embedding with sparse=True asks for sparse gradients: use sparse=False"
    return None


def _embedding_weight_rule(helper):
    return lambda g, c: c.call(helper, g, c.args.input, c.args.weight, c.lead,
                               c.bound["padding_idx"])


def _embedding_contraction(g, c: Ctx) -> Contraction:
    factors = _embedding_weight_rule(embedding_factors)(g, c)
    return Contraction(factors[0], factors[1], c.args.weight, swap=True, index=True)


def _embedding_kron(g, c: Ctx):
    """``[A, G]``: the input (one-hot) factor first, as the weight is ``[V, D]``."""
    padding_idx = c.bound["padding_idx"]
    return [c.call(embedding_index_gram, c.args.input, c.args.weight, padding_idx),
            c.call(embedding_output_gram, g, c.args.input, c.args.weight, c.lead, padding_idx)]


register([F.embedding], "embedding",
         "input, weight, padding_idx=None, max_norm=None, norm_type=2.0, "
         "scale_grad_by_freq=False, sparse=False",
         doc="y[i] = W[idx_i], idx: [N, *] integers, W: [V, D], y: [N, *, D]. "
             "W̄[r] = Σ_{i: idx_i = r} g_i [V, D], zero at padding_idx; per sample [N, V, D]. "
             "Kronecker factors (kfac/kflr) in the weight's axis order, [A, G] (W ≈ A ⊗ G, "
             "BackPACK has none): y_nt = onehot(idx_nt) W, A = Σ_{n,t} e eᵀ / (N·T) [V, V] "
             "(diagonal: index counts / (N·T), the 'expand' convention of linear), "
             "G = Σ s sᵀ [D, D] over the leading, sample and position axes of the factor at "
             "the output; lookups of padding_idx are left out of both.",
         vjp={"input": None, "weight": _embedding_weight_rule(embedding_weight_vjp)},
         contraction={"weight": _embedding_contraction},
         kron={"weight": _embedding_kron}, hessian_is_zero=True,
         unsupported=_embedding_unsupported)


# -- embedding bag (lowered) -----------------------------------------------------------------
def bags_of(input: Tensor) -> Tensor:
    """``input`` unchanged, after checking it is ``[N, L]``: one bag of ``L`` indices per
    sample (torch's rule for ``embedding_bag`` without offsets)."""
    if input.dim() != 2:
        raise ValueError("fxcurv: embedding_bag without offsets needs a 2-D input [N, L] of "
                         "bags, got {} dimensions".format(input.dim()))
    return input


def bag_members(input: Tensor, weight: Tensor, padding_idx: int) -> Tensor:
    """``[N, L, 1]``: 1 for the entries of each bag that count, 0 for ``padding_idx``
    (negative: from the end of the table), in the weight's dtype."""
    padding = padding_idx + weight.size(0) if padding_idx < 0 else padding_idx
    return (input != padding).unsqueeze(-1).to(weight.dtype)


register([bags_of], "bags_of", "input", constant=True, doc="Integer indices: no derivative.")
register([bag_members], "bag_members", "input, weight, padding_idx", constant=True,
         doc="A 0/1 mask of integer indices: no derivative.")


def _lower_embedding_bag(c: Ctx):
    """``y_n = ⊕_l W[idx_nl]`` over each sample's bag ``idx_n`` (``[N, L]``): ``sum`` (times
    ``per_sample_weights``), ``mean`` or ``max``, entries equal to ``padding_idx`` left out
    (an empty bag gives 0): ``embedding`` then ``mul``, ``sum``/``mean``/``max`` over ``L``."""
    b = c.bound
    rows = F.embedding(c.call(bags_of, c.args.input), c.args.weight)  # [N, L, D]
    if c.args.per_sample_weights is not None:
        rows = rows * c.args.per_sample_weights.unsqueeze(-1)
    if b["mode"] == "max":
        return torch.max(rows, 1)[0]
    if b["padding_idx"] is None:
        return rows.sum(1) if b["mode"] == "sum" else rows.mean(1)
    members = c.call(bag_members, c.args.input, c.args.weight, b["padding_idx"])
    total = (rows * members).sum(1)
    return total if b["mode"] == "sum" else total / members.sum(1).clamp(min=1)


def _embedding_bag_unsupported(b: dict) -> Optional[str]:
    if b["offsets"] is not None:
        return ("embedding_bag with offsets (a flat 1-D input of bags) has no sample axis: "
                "pass a 2-D input [N, L] of equal-sized bags (pad with padding_idx)")
    if b["mode"] not in ("sum", "mean", "max"):
        return f"embedding_bag mode {b['mode']!r} is unknown"
    if b["mode"] == "max" and b["padding_idx"] is not None:
        return "embedding_bag in max mode with a padding_idx has no rule"
    return _embedding_unsupported(b)


register([F.embedding_bag], "embedding_bag",
         "input, weight, offsets=None, max_norm=None, norm_type=2, scale_grad_by_freq=False, "
         "mode='mean', sparse=False, per_sample_weights=None, include_last_offset=False, "
         "padding_idx=None",
         doc=_lower_embedding_bag.__doc__, lower=_lower_embedding_bag,
         unsupported=_embedding_bag_unsupported)


# -- dropout ---------------------------------------------------------------------------------


def feature_keep_mask(x: Tensor, keep: float, unbatched_rank: int) -> Tensor:
    """A Bernoulli(``keep``) draw per channel, ``[N, C, 1, ...]``, as torch's feature dropout
    draws it; an input of rank ``unbatched_rank`` has no batch axis in torch's reading
    (``[C, *]``: one draw per entry of axis 0, ``[C, 1, ...]``)."""
    if x.dim() == unbatched_rank:
        size = [x.size(0)] + [1] * (x.dim() - 1)
    else:
        size = [x.size(0), x.size(1)] + [1] * (x.dim() - 2)
    return torch.bernoulli(torch.full(size, keep, dtype=x.dtype, device=x.device))


register([feature_keep_mask], "feature_keep_mask", "x, keep, unbatched_rank", constant=True,
         traits=(RANDOM,), doc="A random mask: no derivative.")

# torch's alpha dropout: the negative saturation value -λα of SELU
ALPHA_DROPOUT_SATURATION = 1.7580993408473766


def _keep_mask(c: Ctx, unbatched_rank: Optional[int]):
    """Entrywise (``unbatched_rank`` None) or per-channel Bernoulli(1 - p) mask of the input."""
    keep = 1.0 - c.bound["p"]
    if unbatched_rank is None:
        return torch.bernoulli(torch.full_like(c.args.input, keep))
    return c.call(feature_keep_mask, c.args.input, keep, unbatched_rank)


def _lower_dropout_variant(c: Ctx, alpha: bool, unbatched_rank: Optional[int]):
    """Eval mode (or p = 0): ``y = x``; p = 1: ``y = 0·x``. Train mode, with a mask ``m``
    drawn once per call (per entry, or per channel for feature dropout): dropout
    ``y = x ⊙ m/(1 - p)``; alpha dropout ``y = x ⊙ a m + α a (m - 1 + p)`` with
    ``α = 1.7581`` and ``a = ((α² p + 1)(1 - p))^{-1/2}`` (torch's formula: the output keeps
    SELU's mean and variance). Every backward pass multiplies by the same ``m``."""
    p, x = c.bound["p"], c.args.input
    if not c.bound["training"] or p == 0:
        return x
    if p == 1:
        return x * 0
    mask = _keep_mask(c, unbatched_rank)
    if not alpha:
        return x * (mask / (1.0 - p))
    a = 1.0 / math.sqrt((ALPHA_DROPOUT_SATURATION ** 2 * p + 1) * (1 - p))
    shift = ALPHA_DROPOUT_SATURATION * a
    return x * (mask * a) + (mask * shift + (shift * p - shift))


_DROPOUT_PARAMS = "input, p=0.5, training=True, inplace=False"
register([F.dropout, torch.dropout], "dropout", _DROPOUT_PARAMS,
         doc=_lower_dropout_variant.__doc__,
         lower=lambda c: _lower_dropout_variant(c, False, None), traits=(VIEW,))  # eval: y is x
_ALPHA_DROPOUT_PARAMS = "input, p=0.5, training=False, inplace=False"  # F.*'s own defaults
register([F.alpha_dropout, torch.alpha_dropout], "alpha_dropout", _ALPHA_DROPOUT_PARAMS,
         doc=_lower_dropout_variant.__doc__,
         lower=lambda c: _lower_dropout_variant(c, True, None), traits=(VIEW,))
register([F.feature_alpha_dropout, torch.feature_alpha_dropout], "feature_alpha_dropout",
         _ALPHA_DROPOUT_PARAMS, doc=_lower_dropout_variant.__doc__,
         lower=lambda c: _lower_dropout_variant(c, True, -1), traits=(VIEW,))
for _rank, _dropout in ((2, F.dropout1d), (-1, F.dropout2d), (4, F.dropout3d)):
    register([_dropout], _dropout.__name__, _DROPOUT_PARAMS, doc=_lower_dropout_variant.__doc__,
             lower=lambda c, rank=_rank: _lower_dropout_variant(c, False, rank),
             traits=(VIEW,))


# -- stochastic depth (torchvision.ops.stochastic_depth) -------------------------------------
def stochastic_depth_mask(x: Tensor, p: float, row: bool) -> Tensor:
    """The train-mode multiplier of stochastic depth: ``Bernoulli(1 - p) / (1 - p)``, one
    draw per sample (``[N, 1, ..., 1]``, mode "row") or one for the batch (mode "batch")."""
    survival = 1.0 - p
    size = [x.size(0)] + [1] * (x.dim() - 1) if row else [1] * x.dim()
    noise = torch.bernoulli(torch.full(size, survival, dtype=x.dtype, device=x.device))
    return noise / survival if survival > 0.0 else noise


register([stochastic_depth_mask], "stochastic_depth_mask", "x, p, row", constant=True,
         traits=(RANDOM,), doc="A random mask: no derivative.")


def _lower_stochastic_depth(c: Ctx):
    """Eval mode (or p = 0): ``y = x``. Train mode: ``y = x ⊙ m`` with the mask of
    :func:`stochastic_depth_mask` drawn once per call, so every backward pass multiplies by
    the same mask (as dropout)."""
    if not c.bound["training"] or c.bound["p"] == 0.0:
        return c.args.input
    if c.bound["mode"] not in ("row", "batch"):
        raise ValueError("stochastic_depth mode must be 'row' or 'batch', got "
                         f"{c.bound['mode']!r}")
    return c.args.input * c.call(stochastic_depth_mask, c.args.input, c.bound["p"],
                                 c.bound["mode"] == "row")


try:
    from torchvision.ops.stochastic_depth import stochastic_depth as _tv_stochastic_depth
except ImportError:  # torchvision is optional
    _tv_stochastic_depth = None
if _tv_stochastic_depth is not None:
    register([_tv_stochastic_depth], "stochastic_depth", "input, p, mode, training=True",
             doc=_lower_stochastic_depth.__doc__, lower=_lower_stochastic_depth,
             traits=(VIEW,))  # eval: y is x


# -- group and instance norm (lowered to layer_norm over each group's entries) ---------------
def per_channel(t, c: Ctx, name: str, op):
    """``t op param`` with a per-channel ``param`` ``[C]`` on axis 1 of ``t`` ``[N, C, *]``
    (the channel axis moved last, where ``[C]`` broadcasts, and back)."""
    param = getattr(c.args, name)
    if param is None:
        return t
    return op(t.transpose(1, -1), param).transpose(1, -1)


def _grouped_layer_norm(c: Ctx, groups):
    """``y = x̂ γ + β``, ``x̂`` normalised over each sample's group of channels (and positions):
    ``layer_norm`` of ``x`` reshaped to ``[N, G, C/G · positions]`` over its last axis."""
    x = c.args.input
    rows = x.reshape(x.size(0), groups, -1)
    normed = F.layer_norm(rows, [rows.size(2)], None, None, c.bound["eps"]).reshape(x.shape)
    scaled = per_channel(normed, c, "weight", lambda a, b: a * b)
    return per_channel(scaled, c, "bias", lambda a, b: a + b)


register([F.group_norm], "group_norm", "input, num_groups, weight=None, bias=None, eps=1e-05",
         doc=_grouped_layer_norm.__doc__ + " Lowered to reshape, layer_norm, mul, add.",
         lower=lambda c: _grouped_layer_norm(c, c.bound["num_groups"]))


def _lower_instance_norm(c: Ctx):
    """Statistics of the input: group norm with one group per channel. Running statistics
    (``use_input_stats=False``): eval-mode ``batch_norm``, an affine map of ``x``."""
    if c.bound["use_input_stats"]:
        return _grouped_layer_norm(c, c.args.input.size(1))
    return F.batch_norm(c.args.input, c.args.running_mean, c.args.running_var, c.args.weight,
                        c.args.bias, False, 0.0, c.bound["eps"])


register([F.instance_norm], "instance_norm",
         "input, running_mean=None, running_var=None, weight=None, bias=None, "
         "use_input_stats=True, momentum=0.1, eps=1e-05",
         doc=_lower_instance_norm.__doc__, lower=_lower_instance_norm)


# -- PReLU (a parameter per channel, so beside the per-channel helper) ------------------------
def _lower_prelu(c: Ctx):
    """``y = x`` where ``x > 0``, else ``a·x``, with ``a`` ``[C]`` on the channel axis 1 (or one
    ``a`` for all): ``where`` and a per-channel ``mul`` (``y' = 1`` or ``a`` as torch's, ``a``
    also at 0; ``∂y/∂a = x`` where ``x ≤ 0``)."""
    x = c.args.input
    return torch.where(x > 0, x, per_channel(x, c, "weight", lambda t, a: t * a))


register([torch.prelu], "prelu", "input, weight", doc=_lower_prelu.__doc__, lower=_lower_prelu)
