"""timm's models (``timm.create_model(name, pretrained=False)``, small configurations, float64,
eval mode, cross-entropy), as a user of the de-facto model zoo would compile them.

Checked against brute force with the helpers of ``test_torchvision_zoo.py``: ``grad`` and
``batch_l2`` against per-sample autograd, ``diag_ggn_exact`` against one VJP per column of
each sample's loss-Hessian square root; ``kfac`` runs (finite factors). timm initialises heads
and layer scales near zero (logits of 1e-5: every curvature check would be vacuous), so the
parameters are redrawn at unit scale (``_spread``) and the logits checked to be O(1).

What each family exercises: ``vit`` and ``cait`` timm's attention (``qkv.permute(2, 0, 3, 1,
4).unbind(0)``, class attention), ``beit`` a relative position bias passed to SDPA as a
parameter-dependent float mask, ``eva02`` rotary embeddings with dtype conversions and a
SwiGLU MLP, ``pit`` pooling-based token stages, ``mixer`` token-mixing MLPs, ``convnext``
LayerNorm over channels-last permutes, ``efficientnet`` (tinynet) squeeze-excitation and
BatchNorm, ``swin``, ``swinv2`` and ``davit`` window attention on windows partitioned into
rows of axis 0 (``[N·nW, w·w, C]``: several rows per sample, ``test_merged_rows.py``; before,
every quantity but ``grad`` raised when the step ran), ``gcvit`` a global query repeated for
each sample's windows (``repeat_interleave`` along axis 0), with an example batch.
"""
from __future__ import annotations

import math
from functools import lru_cache

import pytest
import torch
import torch.nn as nn

timm = pytest.importorskip("timm")
from family_checks import family_checks  # noqa: E402
from test_torchvision_zoo import assert_logits_of_order_one  # noqa: E402

CLASSES = 5
VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=16, num_heads=2)
FAMILIES = {  # family -> (timm name or builder, keyword arguments, image side)
    "vit": ("vit_tiny_patch16_224", VIT, 32),
    "beit": ("beit_base_patch16_224", VIT, 32),
    "eva02": ("eva02_tiny_patch14_224", {**VIT, "img_size": 28, "patch_size": 14}, 28),
    "cait": ("cait_xxs24_224", VIT, 32),
    "pit": ("pit_ti_224", dict(img_size=32, patch_size=8, stride=4, depth=(1, 1, 1),
                               heads=(2, 2, 2), base_dims=(8, 8, 8)), 32),
    "mixer": ("mixer", dict(img_size=32, patch_size=8, num_blocks=2, embed_dim=16), 32),
    "convnext": ("convnext_atto", dict(depths=(1, 1, 1, 1), dims=(8, 16, 16, 16)), 32),
    "efficientnet": ("tinynet_e", {}, 32),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, patch_size=4, window_size=4,
                                                  embed_dim=8, depths=(1, 1),
                                                  num_heads=(2, 2)), 32),
    "swinv2": ("swinv2_tiny_window8_256", dict(img_size=32, patch_size=4, window_size=4,
                                               embed_dim=8, depths=(1, 1), num_heads=(2, 2)),
               32),
    "davit": ("davit_tiny", dict(depths=(1, 1), embed_dims=(8, 16), num_heads=(2, 2),
                                 window_size=2), 32),
    "gcvit": ("gcvit", dict(img_size=64, depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2),
                            embed_dim=8, mlp_ratio=2.0), 64),
}
# compiled with an example batch (Python branches on sizes, fxcurv/example.py)
WITH_EXAMPLE = {"gcvit"}


def _build(name: str, kwargs: dict) -> nn.Module:
    if name == "mixer":  # (the registered mixers fix patch_size)
        from timm.models.mlp_mixer import MlpMixer
        return MlpMixer(num_classes=CLASSES, **kwargs)
    if name == "gcvit":  # (the registered ones fix depths and widths)
        from timm.models.gcvit import GlobalContextVit
        return GlobalContextVit(num_classes=CLASSES, **kwargs)
    return timm.create_model(name, pretrained=False, num_classes=CLASSES, **kwargs)


def _spread(model: nn.Module) -> None:
    """Weights ``N(0, 1/fan_in)``; vectors (biases, norm and layer scales, tokens, tables)
    ``1 + 0.3 N(0, 1)`` for norm weights and layer scales (``weight``, ``gamma``) and
    ``0.3 N(0, 1)`` otherwise."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and not name.endswith(("token", "pos_embed", "table")):
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))
            elif name.endswith(("weight", "gamma", "gamma_1", "gamma_2")):
                p.normal_(1.0, 0.3)
            else:
                p.normal_(0.0, 0.3)


@lru_cache(maxsize=None)
def prepared(family: str):
    name, kwargs, side = FAMILIES[family]
    torch.manual_seed(0)
    model = _build(name, kwargs)
    _spread(model)
    model = model.double().eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, side, side, dtype=torch.float64, generator=gen)
    y = torch.tensor([1, 3])
    assert_logits_of_order_one(model, x, family)
    return model, x, y


family_checks(globals(), list(FAMILIES), prepared, WITH_EXAMPLE)
