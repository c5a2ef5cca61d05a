"""Rule cases: convolutions, transposed convolutions, max / average / adaptive pooling,
resampling (``F.interpolate``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rule_harness import case

g = torch.Generator().manual_seed(1)


def rand(*shape):
    return torch.randn(*shape, dtype=torch.float64, generator=g)


WB = ("w", "b")

CONV = [
    case("conv1d", lambda x, w, b: F.conv1d(x, w, b), rand(2, 3, 6), rand(4, 3, 3), rand(4),
         params=WB),
    case("conv1d_stride_pad_dilation",
         lambda x, w, b: F.conv1d(x, w, b, stride=2, padding=2, dilation=2),
         rand(3, 2, 6), rand(3, 2, 2), rand(3), params=WB),
    case("conv1d_same_even_kernel", lambda x, w, b: F.conv1d(x, w, b, padding="same"),
         rand(2, 2, 5), rand(3, 2, 4), rand(3), params=WB),
    case("conv2d", lambda x, w, b: F.conv2d(x, w, b), rand(2, 3, 5, 4), rand(2, 3, 3, 2),
         rand(2), params=WB),
    case("conv2d_no_bias_stride_remainder", lambda x, w: torch.conv2d(x, w, None, (2, 3), 1),
         rand(2, 2, 6, 6), rand(3, 2, 3, 2), params=("w",)),
    case("conv2d_groups", lambda x, w, b: F.conv2d(x, w, b, padding=1, groups=2),
         rand(2, 4, 4, 4), rand(6, 2, 3, 3), rand(6), params=WB),
    case("conv2d_same_dilation",
         lambda x, w, b: F.conv2d(x, w, b, padding="same", dilation=(1, 2)),
         rand(2, 2, 5, 5), rand(3, 2, 2, 3), rand(3), params=WB),
    case("conv2d_valid", lambda x, w, b: F.conv2d(x, w, b, padding="valid"),
         rand(2, 2, 4, 4), rand(2, 2, 3, 3), rand(2), params=WB),
    case("conv2d_few_positions_gram_l2", lambda x, w, b: F.conv2d(x, w, b), rand(3, 4, 3, 4),
         rand(4, 4, 3, 3), rand(4), params=WB),
    case("conv2d_depthwise_multiplier_stride",
         lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1, groups=3),
         rand(2, 3, 5, 4), rand(6, 1, 3, 3), rand(6), params=WB),
    case("conv2d_depthwise_small_map", lambda x, w: F.conv2d(x, w, None, padding=2, groups=2),
         rand(2, 2, 1, 2), rand(2, 1, 5, 3), params=("w",)),
    case("conv1d_depthwise_dilation", lambda x, w, b: F.conv1d(x, w, b, 2, 1, 2, groups=2),
         rand(2, 2, 7), rand(2, 1, 3), rand(2), params=WB),
    case("conv3d", lambda x, w, b: F.conv3d(x, w, b, stride=(1, 2, 1), padding=(0, 1, 1)),
         rand(2, 2, 3, 4, 3), rand(3, 2, 2, 2, 2), rand(3), params=WB),
    case("conv3d_groups_same", lambda x, w, b: F.conv3d(x, w, b, padding="same", groups=2),
         rand(2, 4, 3, 3, 3), rand(4, 2, 2, 3, 2), rand(4), params=WB),
]

CONV_TRANSPOSE = [
    case("conv_transpose1d", lambda x, w, b: F.conv_transpose1d(x, w, b, stride=2),
         rand(2, 3, 4), rand(3, 2, 3), rand(2), params=WB),
    case("conv_transpose1d_output_padding_dilation",
         lambda x, w, b: F.conv_transpose1d(x, w, b, 3, 1, 2, 1, 2),
         rand(2, 2, 4), rand(2, 3, 3), rand(3), params=WB),
    case("conv_transpose1d_output_padding_over_stride",
         lambda x, w, b: F.conv_transpose1d(x, w, b, 1, 0, 1, 1, 2),
         rand(2, 2, 4), rand(2, 3, 2), rand(3), params=WB),
    case("conv_transpose2d", lambda x, w, b: F.conv_transpose2d(x, w, b),
         rand(2, 3, 3, 4), rand(3, 2, 2, 3), rand(2), params=WB),
    case("conv_transpose2d_groups_output_padding",
         lambda x, w, b: F.conv_transpose2d(x, w, b, stride=2, padding=1, output_padding=(1, 0),
                                            groups=2),
         rand(2, 4, 3, 3), rand(4, 3, 3, 2), rand(6), params=WB),
    case("conv_transpose2d_few_positions_gram_l2", lambda x, w: F.conv_transpose2d(x, w),
         rand(3, 4, 1, 2), rand(4, 2, 2, 2), params=("w",)),
    case("conv_transpose3d", lambda x, w, b: F.conv_transpose3d(x, w, b, stride=(2, 1, 1)),
         rand(2, 2, 2, 3, 2), rand(2, 2, 2, 2, 2), rand(2), params=WB),
    case("conv_transpose3d_groups_dilation",
         lambda x, w: torch.conv_transpose3d(x, w, None, 1, 1, 0, 2, 2),
         rand(2, 4, 3, 2, 3), rand(4, 1, 2, 2, 2), params=("w",)),
]

MAX_POOL = [
    case("max_pool1d_overlapping", lambda x: F.max_pool1d(x, 3, stride=1), rand(2, 3, 6)),
    case("max_pool1d_ceil_padding", lambda x: F.max_pool1d(x, 2, padding=1, ceil_mode=True),
         rand(2, 2, 5)),
    case("adaptive_max_pool1d_overlapping", lambda x: F.adaptive_max_pool1d(x, 4),
         rand(2, 3, 7)),
    case("adaptive_max_pool2d", lambda x: F.adaptive_max_pool2d(x, (2, 3)), rand(2, 3, 5, 6)),
    case("adaptive_max_pool2d_unbatched", lambda x: F.adaptive_max_pool2d(x, 2),
         rand(3, 4, 4)),
    case("adaptive_max_pool3d", lambda x: F.adaptive_max_pool3d(x, (1, 2, 2)),
         rand(2, 2, 3, 3, 4)),
    case("adaptive_max_pool2d_after_relu", lambda x: F.adaptive_max_pool2d(F.relu(x), 1),
         rand(2, 3, 3, 3)),
    case("max_pool2d", lambda x: F.max_pool2d(x, 2), rand(2, 3, 4, 4)),
    case("max_pool2d_overlapping_dilation",
         lambda x: F.max_pool2d(x, (3, 2), stride=1, padding=(1, 0), dilation=(1, 2)),
         rand(2, 2, 5, 5)),
    case("max_pool2d_ceil", lambda x: F.max_pool2d(x, 2, stride=2, ceil_mode=True),
         rand(3, 2, 5, 5)),
    case("max_pool2d_unbatched", lambda x: F.max_pool2d(x, 2, 1), rand(3, 4, 4)),
    case("max_pool3d", lambda x: F.max_pool3d(x, 2), rand(2, 2, 4, 4, 4)),
    case("max_pool3d_overlapping_ceil", lambda x: F.max_pool3d(x, 2, 1, 1, ceil_mode=True),
         rand(2, 2, 3, 3, 2)),
]

AVG_POOL = [
    case("avg_pool1d", lambda x: F.avg_pool1d(x, 2), rand(2, 3, 6)),
    case("avg_pool1d_pad_exclude_ceil",
         lambda x: F.avg_pool1d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False),
         rand(2, 2, 6)),
    case("avg_pool2d", lambda x: F.avg_pool2d(x, 2), rand(2, 3, 4, 4)),
    case("avg_pool2d_overlapping_pad", lambda x: F.avg_pool2d(x, 3, stride=1, padding=1),
         rand(2, 2, 4, 5)),
    case("avg_pool2d_exclude_pad_ceil",
         lambda x: F.avg_pool2d(x, (3, 2), (2, 2), (1, 1), ceil_mode=True,
                                count_include_pad=False),
         rand(2, 2, 5, 6)),
    case("avg_pool2d_divisor", lambda x: F.avg_pool2d(x, 2, 1, divisor_override=3),
         rand(2, 2, 4, 4)),
    case("avg_pool3d", lambda x: F.avg_pool3d(x, 2), rand(2, 2, 4, 4, 4)),
    case("avg_pool3d_pad_exclude",
         lambda x: F.avg_pool3d(x, 3, 2, 1, count_include_pad=False), rand(2, 2, 3, 4, 5)),
]

ADAPTIVE_POOL = [
    case("adaptive_avg_pool1d", lambda x: F.adaptive_avg_pool1d(x, 4), rand(2, 3, 6)),
    case("adaptive_avg_pool2d", lambda x: F.adaptive_avg_pool2d(x, (3, 2)), rand(2, 3, 5, 5)),
    case("adaptive_avg_pool2d_global", lambda x: F.adaptive_avg_pool2d(x, 1), rand(2, 3, 4, 3)),
    case("adaptive_avg_pool3d", lambda x: F.adaptive_avg_pool3d(x, (2, 3, 2)),
         rand(2, 2, 3, 5, 4)),
]

INTERPOLATE = [
    case("interpolate_nearest_size", lambda x: F.interpolate(x, size=(5, 3)), rand(2, 3, 3, 2)),
    case("interpolate_nearest_scale", lambda x: F.interpolate(x, scale_factor=1.7),
         rand(2, 2, 3, 2)),
    case("interpolate_nearest_exact_1d",
         lambda x: F.interpolate(x, size=7, mode="nearest-exact"), rand(2, 3, 4)),
    case("interpolate_bilinear_size_of_a_tensor",  # as torchvision's segmentation heads
         lambda x: F.interpolate(x[..., :2, :2], size=x.shape[-2:], mode="bilinear"),
         rand(2, 2, 5, 3)),
    case("interpolate_bilinear_scale_align_corners",
         lambda x: F.interpolate(x, scale_factor=(2.5, 1.5), mode="bilinear",
                                 align_corners=True), rand(2, 2, 3, 2)),
    case("interpolate_bicubic_down", lambda x: F.interpolate(x, size=(2, 3), mode="bicubic"),
         rand(2, 2, 5, 4)),
    case("interpolate_linear_recompute",
         lambda x: F.interpolate(x, scale_factor=1.5, mode="linear",
                                 recompute_scale_factor=True), rand(2, 3, 4)),
    case("interpolate_trilinear", lambda x: F.interpolate(x, size=(3, 2, 4), mode="trilinear"),
         rand(2, 2, 2, 3, 2)),
    case("interpolate_area", lambda x: F.interpolate(x, size=(2, 3), mode="area"),
         rand(2, 2, 5, 4)),
]

CASES = CONV + CONV_TRANSPOSE + MAX_POOL + AVG_POOL + ADAPTIVE_POOL + INTERPOLATE
