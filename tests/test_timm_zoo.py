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
BatchNorm.
"""
from __future__ import annotations

import math
from functools import lru_cache

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxcurv

timm = pytest.importorskip("timm")
from test_torchvision_zoo import ggn_diagonal, per_sample_grads  # noqa: E402

TOL = dict(rtol=1e-8, atol=1e-12)
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
}


def _build(name: str, kwargs: dict) -> nn.Module:
    if name == "mixer":  # (the registered mixers fix patch_size)
        from timm.models.mlp_mixer import MlpMixer
        return MlpMixer(num_classes=CLASSES, **kwargs)
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
    with torch.no_grad():
        spread = model(x).std().item()
    assert 0.1 < spread < 10, f"logits of {family} are not O(1): std {spread}"
    return model, x, y


@lru_cache(maxsize=None)
def results(family: str) -> tuple:
    model, x, y = prepared(family)
    return fxcurv.compile(model, nn.CrossEntropyLoss(), ["batch_l2", "diag_ggn_exact",
                                                         "kfac"])(x, y)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_grad_and_batch_l2_match_per_sample_autograd(family):
    model, x, y = prepared(family)
    loss, grad, batch_l2 = results(family)[:3]
    per_sample = per_sample_grads(model, x, y)
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y).detach(), rtol=1e-12, atol=0)
    for name in grad:
        torch.testing.assert_close(grad[name], sum(g[name] for g in per_sample), **TOL,
                                   msg=name)
        expected = torch.stack([g[name].square().sum() for g in per_sample])
        torch.testing.assert_close(batch_l2[name], expected, **TOL, msg=name)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_diag_ggn_exact_matches_square_root_columns(family):
    model, x, y = prepared(family)
    expected = ggn_diagonal(model, x, y)
    assert sum(v.abs().sum() for v in expected.values()) > 1e-6  # not vacuous
    for name, value in expected.items():
        torch.testing.assert_close(results(family)[3][name], value, **TOL, msg=name)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_kfac_runs(family):
    model, _, _ = prepared(family)
    kfac = results(family)[4]
    assert list(kfac) == [name for name, _ in model.named_parameters()]
    for name, factors in kfac.items():
        assert all(torch.isfinite(f).all() for f in factors), name
