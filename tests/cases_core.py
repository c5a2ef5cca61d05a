"""Rule cases: activations, arithmetic, reductions, shape ops, linear, losses, softmax."""
from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F

from fxcurv.rules.losses import check_scalar_loss
from fxcurv.rules.recurrent import (check_cell_input, check_padded_steps, check_sequence,
                                   lstm_layer)
from fxcurv.rules.linalg import sdpa_mask
from fxcurv.rules.losses import classes_last
from fxcurv.rules.shape import (assigned, assigned_number, axes_keep_samples, index_spec,
                                keeps_sample_axis, leading_mask, loss_rows_are_samples,
                                masked_assign, rows_hold_samples)
from rule_harness import case

torch.fx.wrap("check_scalar_loss")  # traced as a call, as compile emits it

g = torch.Generator().manual_seed(0)
torch.fx.wrap("check_sequence")  # a leaf call when cases are traced
torch.fx.wrap("lstm_layer")
torch.fx.wrap("check_cell_input")
torch.fx.wrap("check_padded_steps")
torch.fx.wrap("keeps_sample_axis")
torch.fx.wrap("rows_hold_samples")
torch.fx.wrap("assigned")
torch.fx.wrap("assigned_number")
torch.fx.wrap("masked_assign")
torch.fx.wrap("leading_mask")
torch.fx.wrap("loss_rows_are_samples")
torch.fx.wrap("axes_keep_samples")
torch.fx.wrap("classes_last")
torch.fx.wrap("sdpa_mask")


def rand(*shape, positive=False):
    t = torch.randn(*shape, dtype=torch.float64, generator=g)
    return t.abs() + 0.5 if positive else t


def tied_maxima(*shape):
    """``rand(*shape)`` with each sample's maximum attained twice (a tie)."""
    t = rand(*shape)
    top = t.flatten(1).amax(1) + 1.0
    t.view(shape[0], -1)[:, 0] = top
    t.view(shape[0], -1)[:, -1] = top
    return t


def labels(high, *shape):
    return torch.randint(0, high, shape, generator=g)


ACTIVATIONS = [
    case("relu", lambda x: F.relu(x), rand(3, 4)),
    case("relu_method_inplace", lambda x: (x * 1).relu_(), rand(3, 4)),
    case("torch_relu", lambda x: torch.relu(x), rand(3, 4)),
    case("sigmoid", lambda x: torch.sigmoid(x), rand(3, 4)),
    case("tanh", lambda x: x.tanh(), rand(3, 4)),
    case("erf", lambda x: torch.special.erf(x), rand(3, 4)),
    case("leaky_relu", lambda x: F.leaky_relu(x, 0.2), rand(3, 4)),
    case("elu", lambda x: F.elu(x, alpha=0.7), rand(3, 4)),
    case("selu", lambda x: F.selu(x), rand(3, 4)),
    case("log_sigmoid", lambda x: F.logsigmoid(x), rand(3, 4)),
    case("gelu", lambda x: F.gelu(x), rand(3, 4)),
    case("gelu_tanh", lambda x: F.gelu(x, approximate="tanh"), rand(3, 4)),
    case("silu", lambda x: F.silu(x), rand(3, 4)),
    case("prelu_per_channel", lambda x, a: F.prelu(x, a), rand(3, 4, 5), rand(4),
         params=("a",)),
    case("prelu_shared", lambda x, a: F.prelu(x, a), rand(3, 4), rand(1), params=("a",)),
    case("glu", lambda x: F.glu(x, 1), rand(3, 6, 2)),
    case("softmin", lambda x: F.softmin(x, dim=-1), rand(3, 4)),
    case("softplus", lambda x: F.softplus(x, beta=2.0, threshold=1.0), rand(3, 4)),
    case("softsign", lambda x: F.softsign(x), rand(3, 4)),
    case("tanhshrink", lambda x: F.tanhshrink(x), rand(3, 4)),
    case("celu", lambda x: F.celu(x, alpha=0.6), rand(3, 4)),
    case("threshold", lambda x: F.threshold(x, 0.1, -2.0), rand(3, 4)),
    case("softshrink", lambda x: F.softshrink(x, 0.3), rand(3, 4)),
    case("rsqrt", lambda x: torch.rsqrt(x), rand(3, 4, positive=True)),
    case("reciprocal", lambda x: torch.reciprocal(x), rand(3, 4, positive=True)),
    case("log1p", lambda x: torch.log1p(x), rand(3, 4, positive=True)),
    case("expm1", lambda x: x.expm1(), rand(3, 4)),
    case("sin", lambda x: torch.sin(x), rand(3, 4)),
    case("cos", lambda x: x.cos(), rand(3, 4)),
    case("atan", lambda x: torch.atan(x), rand(3, 4)),
    case("asinh", lambda x: torch.asinh(x), rand(3, 4)),
    case("sinh", lambda x: torch.sinh(x), rand(3, 4)),
    case("cosh", lambda x: torch.cosh(x), rand(3, 4)),
    case("max_of_two_tensors", lambda x, y: torch.max(x, y), rand(3, 4), rand(4)),
    case("amax", lambda x: torch.amax(x, 1), rand(3, 4, 2)),
    case("amax_ties_keepdim", lambda x: x.amax((1, 2), keepdim=True), tied_maxima(3, 4, 2)),
    case("amin_negative_dim", lambda x: x.amin(-1), rand(3, 2, 4)),
    case("min_of_two_tensors_method", lambda x, y: x.min(y), rand(3, 4), rand(3, 4)),
    case("normalize", lambda x: F.normalize(x, dim=-1), rand(3, 2, 4)),
    case("normalize_p3", lambda x: F.normalize(x, p=3.0), rand(3, 4)),
    case("rms_norm", lambda x, w: F.rms_norm(x, [4], w), rand(3, 2, 4), rand(4)),
    case("rms_norm_default_eps", lambda x: F.rms_norm(x, [2, 4]), rand(3, 2, 4)),
    case("weight_norm_rows", lambda v, g: torch._weight_norm(v, g, 0), rand(3, 4, 2),
         rand(3, 1, 1)),
    case("weight_norm_axis_1", lambda v, g: torch._weight_norm(v, g, 1), rand(3, 4),
         rand(1, 4)),
    case("weight_norm_whole", lambda v, g: torch._weight_norm(v, g, -1), rand(3, 4), rand([])),
    case("exp", lambda x: torch.exp(x), rand(3, 4)),
    case("exp2", lambda x: torch.exp2(x), rand(3, 4)),
    case("nan_to_num", lambda x: torch.nan_to_num(x, nan=0.5), rand(3, 4)),
    case("nan_to_num_of_log", lambda x: torch.nan_to_num(torch.log(x), nan=0.5), rand(3, 4)),
    case("lerp", lambda x, y: torch.lerp(x, y, 0.3), rand(3, 4), rand(3, 4)),
    case("lerp_tensor_weight", lambda x, y: x.lerp(y.tanh(), torch.sigmoid(x)), rand(3, 4),
         rand(3, 4)),
    case("hypot", lambda x, y: torch.hypot(x, y), rand(3, 4), rand(3, 4)),
    case("atan2", lambda x, y: torch.atan2(x, y), rand(3, 4), rand(3, 4)),
    case("atan2_broadcast", lambda x, y: x.atan2(y), rand(3, 4), rand(3, 1)),
    case("log", lambda x: torch.log(x), rand(3, 4, positive=True)),
    case("sqrt", lambda x: x.sqrt(), rand(3, 4, positive=True)),
    case("square", lambda x: x.square(), rand(3, 4)),
]

ARITHMETIC = [
    case("add_broadcast", lambda x, y: x + y, rand(3, 4), rand(4)),
    case("add_scalar", lambda x: 2.0 + x, rand(3, 4)),
    case("iadd", lambda x, y: _iadd(x, y), rand(3, 4), rand(3, 1)),
    case("torch_add_alpha", lambda x, y: torch.add(x, y, alpha=3), rand(3, 4), rand(1, 4)),
    case("sub_broadcast", lambda x, y: x - y, rand(3, 4), rand(3, 1)),
    case("rsub_scalar", lambda x: 1 - x, rand(3, 4)),
    case("mul_broadcast", lambda x, y: x * y, rand(2, 3, 4), rand(3, 1)),
    case("mul_self", lambda x: x * x, rand(3, 4)),
    case("mul_same_shape", lambda x, y: x * y, rand(3, 4), rand(3, 4)),
    case("div_same_shape", lambda x, y: x / y, rand(3, 4), rand(3, 4, positive=True)),
    case("mul_scalar", lambda x: x * 3.0, rand(3, 4)),
    case("div_broadcast", lambda x, y: x / y, rand(3, 4), rand(4, positive=True)),
    case("rdiv_scalar", lambda x: 1.0 / x, rand(3, 4, positive=True)),
    case("neg", lambda x: -x, rand(3, 4)),
    case("pow_scalar", lambda x: x ** 3, rand(3, 4)),
    case("pow_tensor", lambda x, y: x ** y, rand(3, 4, positive=True), rand(4)),
    case("sum_all", lambda x: x.sum(), rand(3, 4)),
    case("sum_dim", lambda x: torch.sum(x, 1), rand(3, 4, 2)),
    case("sum_dims_keepdim", lambda x: x.sum((1, -1), keepdim=True), rand(3, 4, 2)),
    case("mean_all", lambda x: x.mean(), rand(3, 4)),
    case("mean_dim", lambda x: torch.mean(x, -1), rand(3, 4, 2)),
    case("mul_param", lambda x, w: x * w, rand(3, 4, 2), rand(4, 1), params=("w",)),
    case("add_param", lambda x, b: x + b, rand(3, 4), rand(4), params=("b",)),
]


def _iadd(x, y):
    z = x * 1
    z += y
    return z


SHAPES = [
    case("flatten", lambda x: x.flatten(1), rand(3, 2, 4)),
    case("torch_flatten", lambda x: torch.flatten(x, 1, 2), rand(3, 2, 4, 2)),
    case("view", lambda x: x.view(x.size(0), -1), rand(3, 2, 4)),
    case("view_tuple", lambda x: x.view((3, 8)), rand(3, 2, 4)),
    case("reshape", lambda x: x.reshape(3, 4, 2), rand(3, 8)),
    case("torch_reshape", lambda x: torch.reshape(x, (3, 4, 2)), rand(3, 8)),
    case("squeeze", lambda x: x.squeeze(1), rand(3, 1, 4)),
    case("unsqueeze", lambda x: torch.unsqueeze(x, 1), rand(3, 4)),
    case("permute", lambda x: x.permute(0, 2, 1), rand(3, 2, 4)),
    case("torch_permute", lambda x: torch.permute(x, (0, 2, 3, 1)), rand(3, 2, 4, 2)),
    case("transpose", lambda x: x.transpose(1, 2), rand(3, 2, 4)),
    case("transpose_negative", lambda x: torch.transpose(x, -1, -2), rand(3, 2, 4)),
    case("t", lambda x: x.t(), rand(3, 4)),
    case("contiguous", lambda x: x.transpose(1, 2).contiguous(), rand(3, 2, 4)),
    case("matrix_T", lambda x: x.T, rand(3, 4)),
    case("pad", lambda x: F.pad(x, (1, 2, 0, 1)), rand(3, 2, 4)),
    case("unflatten", lambda x: x.unflatten(-1, (2, -1)), rand(3, 2, 4)),
    case("select_last_position", lambda x: x.select(1, -1), rand(3, 4, 2)),
    case("select_negative_dim", lambda x: torch.select(x, -2, 1), rand(3, 4, 2)),
    case("keeps_sample_axis",
         lambda x: keeps_sample_axis(x.reshape(x.size(0), -1), x.size(0), "here"),
         rand(3, 2, 4)),
    case("assigned",  # x[:, 1::2, 0] = v (item assignment, out of place)
         lambda x, v: assigned(x, v, index_spec((slice(None), slice(1, None, 2), 0))),
         rand(3, 4, 2), rand(3, 2)),
    case("assigned_broadcast_from_the_end",  # x[..., 1:3] = v with v broadcast
         lambda x, v: assigned(x * 1, v, index_spec((Ellipsis, slice(1, 3)))),
         rand(3, 2, 4), rand(3, 1, 2)),
    case("assigned_number",
         lambda x: assigned_number(x, 2.0, index_spec((slice(None), 1))), rand(3, 4)),
    case("masked_assign",  # x[mask] = number, the mask over x's leading axes
         lambda x: masked_assign(x, x[:, :, 0] > 0.3, -1.0), rand(3, 4, 2)),
    case("leading_mask", lambda x: x * leading_mask(x[:, :, 0] > 0.3, x), rand(3, 4, 2)),
    case("rows_hold_samples",
         lambda x: rows_hold_samples(x.reshape(x.size(0), -1), x.size(0), "here"),
         rand(3, 2, 4)),
    case("loss_rows_are_samples", lambda x: loss_rows_are_samples(x, x.size(0), "here"),
         rand(3, 4)),
    case("axes_keep_samples", lambda x: axes_keep_samples(x, [2], ["it moves"], "here") * 2,
         rand(3, 2, 4)),
    case("classes_last", lambda x: classes_last(x, 4, -1, "here") * 2, rand(3, 2, 4)),
    case("convert_methods", lambda x: x.double() * x.cpu(), rand(3, 4)),
    case("convert_to_dtype_of", lambda x: x.to(x.dtype).exp() + x.type_as(x) + x.to(x),
         rand(3, 4)),
    case("convert_to_integers", lambda x: x * (3 * x).round().to(torch.int64), rand(3, 4)),
    case("sdpa_float_mask", lambda x: sdpa_mask(x, x.dtype) * x, rand(3, 4)),
    case("reshape_as", lambda x: x.reshape_as(x.flatten(1)), rand(3, 4, 2)),
    case("view_as", lambda x: x.flatten(1).view_as(x) * 2, rand(3, 2, 4)),
    case("narrow", lambda x: x.narrow(1, 1, 2), rand(3, 4, 2)),
    case("narrow_negative", lambda x: torch.narrow(x, -1, -3, 3), rand(3, 2, 4)),
    case("movedim", lambda x: torch.movedim(x, 1, -1), rand(3, 4, 2, 2)),
    case("moveaxis_several", lambda x: x.moveaxis((1, 2), (3, 1)), rand(3, 4, 2, 5)),
    case("repeat_interleave", lambda x: x.repeat_interleave(2, dim=1), rand(3, 4, 2)),
    case("repeat_interleave_negative", lambda x: torch.repeat_interleave(x, 3, -2),
         rand(3, 2, 2)),
    case("repeat_interleave_by_a_size",
         lambda x: x.repeat_interleave(x.size(-1) // 2, dim=1), rand(3, 4, 4)),
    case("sliding_windows", lambda x: x.unfold(1, 3, 2), rand(3, 7, 2)),
    case("sliding_windows_negative", lambda x: x.unfold(-1, 2, 1), rand(3, 2, 5)),
    case("unflatten_function", lambda x: torch.unflatten(x, 1, (2, 3)), rand(3, 6)),
    case("channel_shuffle", lambda x: torch.channel_shuffle(x, 3), rand(2, 6, 2, 1)),
    case("unfold_overlapping", lambda x: F.unfold(x, (2, 3), padding=1, stride=(1, 2)),
         rand(2, 2, 3, 4)),
    case("fold", lambda x: F.fold(x, (3, 3), 2), rand(2, 8, 4)),
    case("pad_reflect_1d", lambda x: F.pad(x, (2, 1), mode="reflect"), rand(3, 2, 4)),
    case("pad_reflect_2d", lambda x: F.pad(x, (1, 1, 2, 0), mode="reflect"), rand(2, 2, 3, 4)),
    case("pad_replicate_2d", lambda x: F.pad(x, (0, 2, 1, 1), mode="replicate"),
         rand(2, 2, 3, 3)),
    case("pad_replicate_3d", lambda x: F.pad(x, (1, 0, 0, 1, 1, 1), mode="replicate"),
         rand(2, 1, 2, 2, 3)),
    case("pad_reflect_3d", lambda x: F.pad(x, (1, 1, 1, 0, 0, 1), mode="reflect"),
         rand(2, 1, 2, 3, 3)),
    case("pad_circular_2d", lambda x: F.pad(x, (2, 1, 0, 1), mode="circular"),
         rand(2, 2, 3, 4)),
    case("conv2d_padding_mode_reflect",
         lambda x, w: F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), w), rand(2, 2, 3, 3),
         rand(3, 2, 2, 2), params=("w",)),
    case("cat", lambda x, y: torch.cat([x, y], dim=1), rand(3, 2), rand(3, 4)),
    case("cat_negative_dim", lambda x, y: torch.cat((x, y, x), -1), rand(3, 2), rand(3, 4)),
    case("cat_after_a_legacy_empty_piece",  # Hugging Face's empty key/value cache
         lambda e, x: torch.cat([e, x], -2), torch.zeros(0, dtype=torch.float64),
         rand(3, 4, 2), const=("e",)),
    case("detach", lambda x: x * x.detach(), rand(3, 4)),
    case("clone", lambda x: x.transpose(1, 2).clone(), rand(3, 2, 4)),
    case("clone_alone", lambda x: x.clone(), rand(3, 2)),
    case("contiguous_alone", lambda x: x.contiguous(), rand(3, 2)),
    case("torch_clone", lambda x: torch.clone(x) * x, rand(3, 4)),
    case("metadata_attributes", lambda x: x * x.shape[1] / x.ndim + torch.zeros(
        1, dtype=x.dtype, device=x.device), rand(3, 4)),
    case("matrix_mT", lambda x: x.mT * 2, rand(3, 2, 4)),
    case("max_values", lambda x: torch.max(x, 1).values, rand(3, 4)),
    case("max_keepdim_first", lambda x: x.max(-1, keepdim=True)[0] * x, rand(3, 2, 4)),
    case("min_values", lambda x: torch.min(x, 2).values, rand(3, 4, 2)),
    case("min_method", lambda x: x.min(1, True)[0], rand(3, 4)),
    case("sort_values", lambda x: torch.sort(x, 1, descending=True).values, rand(3, 4)),
    case("sort_method_default_dim", lambda x: x.sort()[0] * x.sort().indices, rand(3, 2, 4)),
    case("topk_values", lambda x: torch.topk(x, 2, dim=1).values, rand(3, 4)),
    case("topk_method_smallest", lambda x: x.topk(3, largest=False)[0], rand(3, 2, 5)),
    case("check_sequence", lambda x: check_sequence(x, 2, 1, "a test"), rand(3, 2, 4)),
    case("check_cell_input", lambda x: check_cell_input(x, "a test"), rand(3, 4)),
    case("check_padded_steps", lambda x, n: check_padded_steps(x, n, None, 2, "a test"),
         rand(3, 2, 4), torch.tensor([2, 1, 2])),
]


def _lstm_all_pieces(x, w_ih, w_hh, b_ih, b_hh, h0, c0):
    """One LSTM layer (hidden 2, 3 steps) with given states; output and both final states."""
    out, h, c, _ = lstm_layer(x, w_ih, w_hh, b_ih, b_hh, h0, c0, False)
    return out + (h - 2 * c).unsqueeze(1)


def _lstm_reverse_output_squared(x, w_ih, w_hh):
    """Backwards in time, no biases, zero initial states; only the output is used."""
    return lstm_layer(x, w_ih, w_hh, None, None, None, None, True)[0].square()


def _lstm_final_cell_state(x, w_ih, w_hh, b):
    """Only the final cell state is used (a cotangent enters through ``c_T`` alone)."""
    return 3 * lstm_layer(x, w_ih, w_hh, b, None, None, None, False)[2]


RECURRENT = [
    case("lstm_layer", _lstm_all_pieces, rand(3, 3, 4), rand(8, 4), rand(8, 2), rand(8),
         rand(8), rand(3, 2), rand(3, 2)),
    case("lstm_layer_reverse_no_bias_no_state", _lstm_reverse_output_squared,
         rand(3, 3, 4), rand(8, 4), rand(8, 2)),
    case("lstm_layer_final_cell_state", _lstm_final_cell_state, rand(3, 3, 4), rand(8, 4),
         rand(8, 2), rand(8)),
]

VECTORS = [
    case("mv", lambda a, v: torch.mv(a, v), rand(3, 4), rand(4), params=("v",)),
    case("vdot", lambda a, b: torch.vdot(a, b), rand(5), rand(5)),
    case("dot_method", lambda a: a.dot(a), rand(4)),
]

LINEAR = [
    case("linear", lambda x, w, b: F.linear(x, w, b), rand(4, 3), rand(2, 3), rand(2),
         params=("w", "b")),
    case("linear_no_bias", lambda x, w: F.linear(x, w), rand(4, 3), rand(2, 3), params=("w",)),
    case("linear_sequence", lambda x, w, b: F.linear(x, w, b), rand(4, 5, 3), rand(2, 3),
         rand(2), params=("w", "b")),
]

LOSSES = [
    case("huber_loss", lambda x, t: F.huber_loss(x, t, delta=0.7), rand(5, 3), rand(5, 3),
         const=("t",)),
    case("smooth_l1_loss_sum", lambda x, t: F.smooth_l1_loss(x, t, reduction="sum", beta=0.5),
         rand(5, 3), rand(5, 3), const=("t",)),
    case("smooth_l1_loss_beta_0", lambda x, t: F.smooth_l1_loss(x, t, beta=0.0), rand(5, 3),
         rand(5, 3), const=("t",)),
    case("l1_loss_none", lambda x, t: F.l1_loss(x, t, reduction="none"), rand(5, 3),
         rand(5, 3), const=("t",)),
    case("kl_div_batchmean", lambda x, t: F.kl_div(x, t, reduction="batchmean"), rand(5, 3),
         torch.softmax(rand(5, 3), 1) * torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64),
         const=("t",)),
    case("kl_div_log_target_none", lambda x, t: F.kl_div(x, t, reduction="none",
                                                        log_target=True),
         rand(5, 3), rand(5, 3)),
    case("binary_cross_entropy", lambda p, t, w: F.binary_cross_entropy(p, t, w),
         torch.sigmoid(rand(5, 3)), torch.rand(5, 3, dtype=torch.float64, generator=g),
         rand(3, positive=True), const=("t", "w")),
    case("binary_cross_entropy_sum", lambda p, t: F.binary_cross_entropy(p, t, reduction="sum"),
         torch.sigmoid(rand(5, 3)), torch.rand(5, 3, dtype=torch.float64, generator=g),
         const=("t",)),
    case("gaussian_nll_loss", lambda x, t, v: F.gaussian_nll_loss(x, t, v, full=True),
         rand(5, 3), rand(5, 3), rand(5, 3, positive=True)),
    case("gaussian_nll_loss_short_var",
         lambda x, t, v: F.gaussian_nll_loss(x, t, v, reduction="sum"), rand(5, 3),
         rand(5, 3), rand(5, positive=True), const=("t",)),
    case("gaussian_nll_loss_float_var",
         lambda x, t: F.gaussian_nll_loss(x, t, 0.7, reduction="none"), rand(5, 3),
         rand(5, 3), const=("t",)),
    case("poisson_nll_loss", lambda x, t: F.poisson_nll_loss(x, t), rand(5, 3),
         torch.poisson(torch.full((5, 3), 2.0, dtype=torch.float64), generator=g),
         const=("t",)),
    case("poisson_nll_loss_full", lambda x, t: F.poisson_nll_loss(
        x, t, log_input=False, full=True, reduction="sum"), rand(5, 3, positive=True),
         torch.poisson(torch.full((5, 3), 2.0, dtype=torch.float64), generator=g),
         const=("t",)),
    case("soft_margin_loss", lambda x, t: F.soft_margin_loss(x, t), rand(5, 3),
         torch.sign(rand(5, 3)), const=("t",)),
    case("multilabel_soft_margin_loss", lambda x, t, w: F.multilabel_soft_margin_loss(
        x, t, w, reduction="sum"), rand(5, 3), labels(2, 5, 3).to(torch.float64),
         rand(3, positive=True), const=("t", "w")),
    case("cosine_similarity", lambda a, b: F.cosine_similarity(a, b), rand(5, 3), rand(5, 3)),
    case("cosine_similarity_broadcast", lambda a, b: F.cosine_similarity(a, b, dim=-1),
         rand(5, 2, 3), rand(2, 3)),
    case("margin_ranking_loss", lambda a, b, t: F.margin_ranking_loss(a, b, t, margin=0.2),
         rand(6), rand(6), torch.sign(rand(6)), const=("t",)),
    case("hinge_embedding_loss", lambda x, t: F.hinge_embedding_loss(x, t, reduction="sum"),
         rand(6, 2), torch.sign(rand(6, 2)), const=("t",)),
    case("multi_margin_loss", lambda x, y, w: F.multi_margin_loss(x, y, p=2, weight=w),
         rand(5, 4), labels(4, 5), rand(4, positive=True), const=("w",)),
    case("cross_entropy_mean", lambda x, y: F.cross_entropy(x, y), rand(5, 4), labels(4, 5)),
    case("nll_after_log_softmax_last_axis",
         lambda x, y: F.nll_loss(F.log_softmax(x, -1), y), rand(5, 4), labels(4, 5)),
    case("cross_entropy_sum", lambda x, y: F.cross_entropy(x, y, reduction="sum"),
         rand(5, 4), labels(4, 5)),
    case("cross_entropy_none", lambda x, y: F.cross_entropy(x, y, reduction="none"),
         rand(5, 4), labels(4, 5)),
    case("cross_entropy_spatial", lambda x, y: F.cross_entropy(x, y), rand(3, 4, 2, 2),
         labels(4, 3, 2, 2)),
    case("cross_entropy_ignore", lambda x, y: F.cross_entropy(x, y, ignore_index=1),
         rand(6, 4), labels(4, 6)),
    case("cross_entropy_weight_smoothing",
         lambda x, y, w: F.cross_entropy(x, y, weight=w, reduction="sum"),
         rand(5, 4), labels(4, 5), rand(4, positive=True), const=("w",)),
    case("cross_entropy_label_smoothing",
         lambda x, y: F.cross_entropy(x, y, label_smoothing=0.1), rand(5, 4), labels(4, 5)),
    case("cross_entropy_probabilities", lambda x, t: F.cross_entropy(x, t),
         rand(5, 4), torch.softmax(rand(5, 4), 1), const=("t",)),
    case("nll_loss", lambda x, y: F.nll_loss(F.log_softmax(x, dim=1), y),
         rand(5, 4), labels(4, 5)),
    case("nll_loss_sum_weight", lambda x, y, w: F.nll_loss(x, y, weight=w, reduction="sum"),
         rand(5, 4), labels(4, 5), rand(4, positive=True), const=("w",)),
    case("mse_loss_mean", lambda x, y: F.mse_loss(x, y), rand(5, 3), rand(5, 3)),
    case("mse_loss_sum", lambda x, y: F.mse_loss(x, y, reduction="sum"), rand(5, 3), rand(5, 3)),
    case("bce_with_logits", lambda x, y: F.binary_cross_entropy_with_logits(x, y),
         rand(5, 3), torch.rand(5, 3, dtype=torch.float64, generator=g), const=("y",)),
    case("bce_with_logits_weight",
         lambda x, y, w: F.binary_cross_entropy_with_logits(x, y, weight=w), rand(5, 3),
         torch.rand(5, 3, dtype=torch.float64, generator=g), rand(5, 1, positive=True),
         const=("y", "w")),
    case("bce_with_logits_pos_weight",
         lambda x, y, p: F.binary_cross_entropy_with_logits(x, y, pos_weight=p, reduction="sum"),
         rand(5, 3), torch.rand(5, 3, dtype=torch.float64, generator=g), rand(3, positive=True),
         const=("y", "p")),
    case("check_scalar_loss", lambda x: check_scalar_loss((x * x).sum()), rand(5, 3)),
    case("log_softmax", lambda x: F.log_softmax(x, dim=1), rand(3, 4)),
    case("log_softmax_method", lambda x: x.log_softmax(-1), rand(3, 4)),
    case("softmax", lambda x: F.softmax(x, dim=-1), rand(3, 4)),
    case("torch_softmax", lambda x: torch.softmax(x, 1), rand(3, 4, 2)),
]



def _with_zero_distance(x, w):
    """``x`` with row 1 equal to row 2 of ``w`` (a zero distance: PyTorch's 0 subgradient)."""
    x = x.clone()
    x[1] = w[2]
    return x


_PROTOTYPES = rand(4, 3)
METRIC = [
    case("cdist_prototypes", lambda x, w: torch.cdist(x, w), rand(5, 3), rand(4, 3)),
    case("cdist_zero_distance", lambda x, w: torch.cdist(x, w),
         _with_zero_distance(rand(5, 3), _PROTOTYPES), _PROTOTYPES),
    case("cdist_p1_zero_distance", lambda x, w: torch.cdist(x, w, p=1.0),
         _with_zero_distance(rand(5, 3), _PROTOTYPES), _PROTOTYPES),
    case("cdist_p3_batched", lambda x, w: torch.cdist(x, w, p=3.0), rand(5, 2, 3), rand(4, 3)),
    case("cdist_matmul_mode", lambda x, w: torch.cdist(x, w), rand(30, 3), rand(27, 3)),
    case("cdist_per_sample_pairs", lambda a, b: torch.cdist(a, b, p=1.5), rand(5, 2, 3),
         rand(5, 4, 3)),
    case("cdist_rows_of_two_activations", lambda a: torch.cdist(a, torch.tanh(a)), rand(5, 3)),
    case("pairwise_distance", lambda a, b: F.pairwise_distance(a, b, keepdim=True), rand(5, 3),
         rand(5, 3)),
    case("tensor_split_sections", lambda x: torch.tensor_split(x, 3, dim=1)[1], rand(3, 7)),
    case("tensor_split_indices", lambda x: x.tensor_split([1, 4, 9], -1)[1] * 2, rand(3, 2, 5)),
    case("triplet_margin_loss", lambda a, p, n: F.triplet_margin_loss(a, p, n, margin=0.5),
         rand(6, 3), rand(6, 3), rand(6, 3)),
    case("triplet_margin_loss_swap_p1", lambda a, p, n: F.triplet_margin_loss(
        a, p, n, margin=2.0, p=1, swap=True, reduction="none"), rand(6, 3), rand(6, 3),
         rand(6, 3)),
    case("cosine_embedding_loss", lambda a, b, t: F.cosine_embedding_loss(a, b, t, margin=-0.2),
         rand(6, 3), rand(6, 3), torch.tensor([1.0, -1.0, 1.0, -1.0, 0.0, -1.0],
                                              dtype=torch.float64), const=("t",)),
    case("multilabel_margin_loss", lambda x, y: F.multilabel_margin_loss(x, y), rand(4, 5),
         torch.tensor([[3, 0, -1, 1, 1], [1, 1, 4, 2, 0], [-1, 2, 0, 0, 0], [4, 4, -1, 0, 2]])),
]

CASES = ACTIVATIONS + ARITHMETIC + SHAPES + RECURRENT + VECTORS + LINEAR + LOSSES + METRIC
