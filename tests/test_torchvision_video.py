"""torchvision's video classifiers (``torchvision.models.video``), small configurations, float64,
eval mode, cross-entropy on clips ``[N, 3, T, H, W]``.

Checked against brute force with the helpers of ``test_torchvision_zoo.py``: ``grad`` and
``batch_l2`` against per-sample autograd, ``diag_ggn_exact`` against one VJP per column of
each sample's loss-Hessian square root; ``kfac`` runs (finite factors).

What each family exercises: ``r3d`` and ``r2plus1d`` 3-D convolutions and BatchNorm3d (the
(2+1)-D factorisation's mid-planes); ``swin3d`` shifted 3-D window attention whose fx-wrapped
helpers (``shifted_window_attention_3d``, ``_compute_attention_mask_3d``) iterate over sizes
and fill a mask by item assignment at slices computed from them, traced through with an
example batch (``docs/tracing.md``), the windows partitioned into rows of axis 0 (several rows
per sample); ``mvit_v1`` multiscale attention with pooled keys and values, whose helpers
(``_unsqueeze``, ``_squeeze``) branch on the rank, also with an example batch. Before: swin3d
and mvit raised at compile time (the helpers could not be inlined on symbolic values).

MViT v2 (``mvit_v2_s``: relative position embeddings, residual pooling) with an example:
torchvision's ``_add_rel_pos`` computes its temporal term by moving the samples to axis 1
(``r_q.permute(2, 0, 1, 3, 4, 5).reshape(q_t, B * ..., dim)``, a matmul, ``.transpose(0, 1)``);
while tracing it is ``fxcurv.library.mvit_relative_positions``, the same value as an einsum
over the samples' axis (before: every quantity but the gradient refused at that permute).
``s3d`` needs 16 frames of 224×224
(its final pooling window is fixed): it compiles without an example and its gradient matches
autograd, checked outside the suite (a float32 sweep: 40 s on two cores).
"""
from __future__ import annotations

from functools import lru_cache

import pytest
import torch
import torch.nn as nn

import fxcurv

torchvision = pytest.importorskip("torchvision")
from torchvision.models.video import mvit, resnet  # noqa: E402
from torchvision.models.video import swin_transformer as swin3d  # noqa: E402

from family_checks import family_checks  # noqa: E402
from test_torchvision_zoo import DTYPE, assert_logits_of_order_one, calibrate  # noqa: E402

CLASSES = 10
CLIP = (3, 4, 16, 16)  # one sample: channels, frames, height, width


def _video_resnet(conv_maker, stem) -> nn.Module:
    """Its first two stages (64 and 128 channels: the widths are fixed), its head on 128."""
    model = resnet.VideoResNet(resnet.BasicBlock, [conv_maker] * 4, [1, 1, 1, 1], stem,
                               num_classes=CLASSES)
    model.layer3, model.layer4 = nn.Identity(), nn.Identity()
    model.fc = nn.Linear(128, CLASSES)
    return model


def _mvit(v2: bool) -> nn.Module:
    blocks = [mvit.MSBlockConfig(num_heads=1, input_channels=8, output_channels=16,
                                 kernel_q=[3, 3, 3], kernel_kv=[3, 3, 3], stride_q=[1, 1, 1],
                                 stride_kv=[1, 2, 2]),
              mvit.MSBlockConfig(num_heads=2, input_channels=16, output_channels=16,
                                 kernel_q=[3, 3, 3], kernel_kv=[3, 3, 3], stride_q=[1, 2, 2],
                                 stride_kv=[1, 1, 1])]
    version = dict(residual_pool=True, rel_pos_embed=True, proj_after_attn=True) if v2 else {}
    return mvit._mvit(blocks, 0.0, None, False, spatial_size=CLIP[2:], temporal_size=CLIP[1],
                      num_classes=CLASSES, patch_embed_kernel=(3, 7, 7),
                      patch_embed_stride=(2, 4, 4), patch_embed_padding=(1, 3, 3), **version)


FAMILIES = {  # family -> builder
    "r3d": lambda: _video_resnet(resnet.Conv3DSimple, resnet.BasicStem),
    "r2plus1d": lambda: _video_resnet(resnet.Conv2Plus1D, resnet.R2Plus1dStem),
    # a 2x2x2 window shifted by 1 on a 2x4x4 feature map: the shifted-window mask is built
    "swin3d": lambda: swin3d.SwinTransformer3d([2, 4, 4], 8, [2, 2], [1, 2], [2, 2, 2],
                                               stochastic_depth_prob=0.1,
                                               num_classes=CLASSES),
    "mvit_v1": lambda: _mvit(v2=False),
    "mvit_v2": lambda: _mvit(v2=True),
}
WITH_EXAMPLE = {"swin3d", "mvit_v1", "mvit_v2"}


@lru_cache(maxsize=None)
def prepared(family: str):
    torch.manual_seed(0)
    model = calibrate(FAMILIES[family]().to(DTYPE), CLIP)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, *CLIP, dtype=DTYPE, generator=gen)
    y = torch.tensor([1, 7])
    assert_logits_of_order_one(model, x, family)
    return model, x, y


family_checks(globals(), list(FAMILIES), prepared, WITH_EXAMPLE)


def test_swin3d_needs_an_example_and_says_so():
    """Without an example the helper stays one node whose inlining fails on symbolic sizes:
    the error names it and what would help."""
    model, _, _ = prepared("swin3d")
    with pytest.raises(fxcurv.CompileError, match="shifted_window_attention_3d.*example="):
        fxcurv.compile(model, nn.CrossEntropyLoss(), ["batch_l2"])


@pytest.mark.parametrize("q_thw,k_thw", [((2, 4, 4), (2, 2, 2)), ((1, 2, 3), (2, 4, 3))])
def test_mvit_relative_positions_equal_torchvisions(q_thw, k_thw):
    """The replacement of ``_add_rel_pos`` gives torchvision's value, also for queries and keys
    of different sizes (pooled keys; tables interpolated to ``2·max - 1`` rows)."""
    from fxcurv.library import mvit_relative_positions
    gen = torch.Generator().manual_seed(0)
    heads, dim = 2, 3
    queries, keys = 1 + q_thw[0] * q_thw[1] * q_thw[2], 1 + k_thw[0] * k_thw[1] * k_thw[2]
    attn = torch.randn(2, heads, queries, keys, dtype=DTYPE, generator=gen)
    q = torch.randn(2, heads, queries, dim, dtype=DTYPE, generator=gen)
    tables = [torch.randn(2 * max(a, b) - 1, dim, dtype=DTYPE, generator=gen)
              for a, b in zip(q_thw[1:] + q_thw[:1], k_thw[1:] + k_thw[:1])]  # h, w, t
    expected = mvit._add_rel_pos(attn.clone(), q, q_thw, k_thw, *tables)
    torch.testing.assert_close(mvit_relative_positions(attn.clone(), q, q_thw, k_thw, *tables),
                               expected, rtol=1e-12, atol=1e-12)
