"""torchvision's classification zoo: one builder per family, small widths and inputs, float64,
cross-entropy, eval mode, with BatchNorm running statistics set from a batch and logits kept
O(1) (with ``weights=None`` eval BatchNorm is the identity and logits can reach 1e8, which
makes every curvature vanish and every check vacuous).

Checked against brute force: ``grad`` (autograd), ``batch_l2`` (per-sample autograd),
``diag_ggn_exact`` (per sample: the loss Hessian in the logits from ``torch.func.hessian``, its
eigen square root, and one VJP per column), ``diag_h`` (reverse-over-reverse autograd on a few
small parameters) and that ``kfac`` and ``kflr`` run (a list of finite square factors per
parameter). Swin V2's ``diag_h`` is refused at compile time (the test asserts the refusal).
Also: LR-ASPP segmentation (``F.interpolate``), a resnet converted by BackPACK's converter, a
GPT-2-style block small (values) and at full width (d = 768, 12 heads: compiles).
"""
from __future__ import annotations

import time
from functools import lru_cache, partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

import fxcurv

torchvision = pytest.importorskip("torchvision")
from torchvision import models as M  # noqa: E402
from torchvision.models import convnext, densenet, efficientnet, regnet, vgg  # noqa: E402
from torchvision.models import swin_transformer as swin  # noqa: E402

DTYPE = torch.float64
TOL = dict(rtol=1e-8, atol=1e-12)
QUANTITIES = ["batch_l2", "diag_ggn_exact", "kfac", "kflr"]


def _small_head(model: nn.Module, features: int) -> nn.Module:
    """VGG and AlexNet hard-code a 4096-wide classifier on 7x7 (6x6) pooled maps: a narrow one
    of the same form on globally pooled features (kfac's input factor of the first classifier
    layer would otherwise be [25088, 25088])."""
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Sequential(nn.Dropout(), nn.Linear(features, 16), nn.ReLU(True),
                                     nn.Linear(16, 10))
    return model


def _efficientnet_v2() -> nn.Module:
    setting = [efficientnet.FusedMBConvConfig(1, 3, 1, 8, 8, 1),
               efficientnet.FusedMBConvConfig(4, 3, 2, 8, 16, 1),
               efficientnet.MBConvConfig(4, 3, 2, 16, 24, 1)]
    return efficientnet.EfficientNet(setting, 0.2, stochastic_depth_prob=0.2, num_classes=10,
                                     norm_layer=partial(nn.BatchNorm2d, eps=1e-3),
                                     last_channel=32)


def _efficientnet() -> nn.Module:
    setting, last = efficientnet._efficientnet_conf("efficientnet_b0", width_mult=0.25,
                                                    depth_mult=0.25)
    return efficientnet.EfficientNet(setting, 0.2, stochastic_depth_prob=0.2, num_classes=10,
                                     last_channel=last)


def _regnet_y() -> nn.Module:
    params = regnet.BlockParams.from_init_params(depth=2, w_0=8, w_a=8.0, w_m=2.0,
                                                 group_width=8, se_ratio=0.25)
    return regnet.RegNet(params, num_classes=10)


# family -> (builder, image side); every builder: weights=None, num_classes=10
FAMILIES = {
    "resnet": (lambda: M.ResNet(M.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10), 16),
    "vgg": (lambda: _small_head(vgg.VGG(vgg.make_layers([8, "M", 16, "M", 32], True),
                                       num_classes=10), 32), 16),
    "mobilenet_v2": (lambda: M.mobilenet_v2(num_classes=10, width_mult=0.25), 16),
    "mobilenet_v3": (lambda: M.mobilenet_v3_small(num_classes=10, width_mult=0.25), 16),
    "efficientnet": (_efficientnet, 16),
    "efficientnet_v2": (_efficientnet_v2, 16),
    "convnext": (lambda: convnext.ConvNeXt([convnext.CNBlockConfig(8, 16, 1),
                                            convnext.CNBlockConfig(16, None, 1)],
                                           stochastic_depth_prob=0.1, num_classes=10), 16),
    "regnet": (_regnet_y, 16),
    "shufflenet": (lambda: M.ShuffleNetV2([1, 1, 1], [8, 16, 32, 64, 64], num_classes=10),
                   16),
    "squeezenet": (lambda: M.squeezenet1_1(num_classes=10), 32),
    "densenet": (lambda: densenet.DenseNet(4, (1, 1), 8, bn_size=2, num_classes=10), 16),
    "googlenet": (lambda: M.GoogLeNet(num_classes=10, aux_logits=False, init_weights=False),
                  16),
    "inception": (lambda: M.Inception3(num_classes=10, aux_logits=False, init_weights=False),
                  75),
    "mnasnet": (lambda: M.MNASNet(0.25, num_classes=10), 16),
    "alexnet": (lambda: _small_head(M.alexnet(num_classes=10), 256), 63),
    "swin": (lambda: M.SwinTransformer([2, 2], 8, [1, 1], [1, 2], [2, 2],
                                       stochastic_depth_prob=0.1, num_classes=10), 16),
    "swin_v2": (lambda: M.SwinTransformer([2, 2], 8, [1, 1], [1, 2], [2, 2],
                                          stochastic_depth_prob=0.1, num_classes=10,
                                          block=swin.SwinTransformerBlockV2,
                                          downsample_layer=swin.PatchMergingV2), 16),
    "vit": (lambda: M.VisionTransformer(8, 4, 1, 2, 8, 16, num_classes=10), 8),
    "maxvit": (lambda: M.MaxVit((16, 16), 8, 2, [8, 16], [1, 1], 4, 0.1, num_classes=10), 16),
}
SLOW = {"inception", "googlenet", "resnet", "mobilenet_v2", "mnasnet", "maxvit", "swin"}
# diag_h's cost grows with the square of the smooth activations' entries per sample, and with
# the samples: a smaller image, or one sample (maxvit's input size is fixed), for suite time
DIAG_H_SIDE = {"efficientnet": 8}  # (16 x 16: 15 s on two cores; 8 x 8: 3 s)
DIAG_H_SAMPLES = {"maxvit": 1}  # (two samples: 14 s; one: 7 s)
# family -> why diag_h is refused at compile time (the error says)
DIAG_H_REFUSED = {
    # the continuous position bias 16·sigmoid(MLP(table)) is computed from parameters alone:
    # a second derivative on a value without a sample axis
    "swin_v2": "a second derivative of sigmoid acts on",
}


def _params(family: str) -> list:
    return pytest.param(family, marks=[pytest.mark.slow] if family in SLOW else [])


ALL = [_params(f) for f in FAMILIES]
# Inception v3 is convolutions, BatchNorm and ReLU only: its Hessian diagonal is the GGN
# diagonal, checked for it above, and its diag_h run (75 x 75 images) adds 6 s to the suite
DIAG_H_FAMILIES = [_params(f) for f in FAMILIES if f != "inception"]


def calibrate(model: nn.Module, side) -> nn.Module:
    """Running statistics of every BatchNorm from a batch (cumulative average), then eval mode
    and the last layer scaled so the logits have standard deviation ~1 (drawn at random first
    where the builder initialises it to zero, as ViT's head). ``side``: an image's side, or
    the shape of one sample (a video clip's ``(3, T, H, W)``)."""
    shape = (3, side, side) if isinstance(side, int) else tuple(side)
    gen = torch.Generator().manual_seed(2)
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        model(torch.randn(8, *shape, dtype=DTYPE, generator=gen))
        model.eval()
        images = torch.randn(8, *shape, dtype=DTYPE, generator=gen)
        last = [m for m in model.modules()
                if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d))][-1]
        if not last.weight.any():
            last.weight.normal_(generator=gen)
        logits = model(images)
        scale = 1.0 / logits.std().item()
        last.weight.mul_(scale)
        if last.bias is not None:
            last.bias.mul_(scale)
    return model


@lru_cache(maxsize=None)
def prepared(family: str):
    """``(model, x, y)`` of a family, calibrated; logits checked to be O(1)."""
    make, side = FAMILIES[family]
    torch.manual_seed(0)
    model = calibrate(make().to(DTYPE), side)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, side, side, dtype=DTYPE, generator=gen)
    y = torch.tensor([1, 7])
    assert_logits_of_order_one(model, x, family)
    return model, x, y


def assert_logits_of_order_one(model: nn.Module, x: torch.Tensor, family: str) -> None:
    """Logits of spread 0.1 to 10 (else every curvature check is vacuous or overflows)."""
    with torch.no_grad():
        spread = model(x).std().item()
    assert 0.1 < spread < 10, f"logits of {family} are not O(1): std {spread}"


@lru_cache(maxsize=None)
def results(family: str) -> tuple:
    model, x, y = prepared(family)
    # (no first-call check against eager autograd: every test compares with its own reference)
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), QUANTITIES, verify=False)
    return step(x, y)


def _params_of(model: nn.Module) -> dict:
    return {k: v.detach() for k, v in model.named_parameters()}


def _logits(model, params, xn):
    return torch.func.functional_call(model, params, (xn[None],))[0]


def per_sample_grads(model, x, y) -> list[dict]:
    """``∂ℓ_n/∂θ`` of each sample's share of the mean loss (1/N of its cross-entropy)."""
    params = _params_of(model)
    grads = []
    for n in range(x.size(0)):
        def loss(p, n=n):
            return F.cross_entropy(_logits(model, p, x[n])[None], y[n:n + 1]) / x.size(0)
        grads.append(torch.func.grad(loss)(params))
    return grads


def ggn_diagonal(model, x, y) -> dict:
    """``Σ_n Σ_c (J_nᵀ s_nc)²`` with ``S_n`` the eigen square root of ``∂²ℓ_n/∂f²``."""
    params = _params_of(model)
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for n in range(x.size(0)):
        logits, pullback = torch.func.vjp(lambda p, n=n: _logits(model, p, x[n]), params)
        hessian = torch.func.hessian(lambda f, n=n: F.cross_entropy(f[None], y[n:n + 1]))(
            logits.detach()) / x.size(0)
        values, vectors = torch.linalg.eigh(hessian)
        root = vectors * values.clamp(min=0).sqrt()
        for column in root.T:
            for name, value in pullback(column)[0].items():
                total[name] += value.square()
    return total


# torch's hardsigmoid backward multiplies by 1/6 rounded to float32, in every dtype
HARDSIGMOID_SLOPE = float(torch.tensor(1.0 / 6.0, dtype=torch.float32))


class _TwiceDifferentiable(TorchFunctionMode):
    """``hardsigmoid`` through ``relu6(x + 3)``, with torch's value and torch's first
    derivative (its float32 slope: an exact 1/6 would put a 2^-24 relative difference into
    every Hessian entry behind a squeeze-excitation gate): torch's hardsigmoid backward has no
    derivative, so autograd cannot take a Hessian through it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.hardsigmoid:
            ramp = F.relu6(args[0] + 3.0)
            return F.hardsigmoid(args[0]).detach() + HARDSIGMOID_SLOPE * (ramp - ramp.detach())
        return func(*args, **kwargs)


def hessian_diagonal(model, x, y, names: list[str], entries: int = 4) -> dict:
    """The exact Hessian diagonal of the mean loss at the first ``entries`` entries of each
    parameter in ``names`` (one double-backward pass per entry)."""
    params = dict(model.named_parameters())
    wanted = [params[name] for name in names]
    with _TwiceDifferentiable(), sdpa_kernel(SDPBackend.MATH):  # fused kernels: no 2nd order
        loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, wanted, create_graph=True)
    result = {}
    for name, param, grad in zip(names, wanted, grads):
        flat, diagonal = grad.reshape(-1), []
        for i in range(min(entries, flat.numel())):
            row = torch.autograd.grad(flat[i], param, retain_graph=True)[0].reshape(-1)
            diagonal.append(row[i])
        result[name] = torch.stack(diagonal).detach()
    return result


def small_parameters(model: nn.Module) -> list[str]:
    """The last parameter and the first with at most 32 entries (deep in the network: the
    Hessian there sees every later layer's second-order terms)."""
    named = [(k, v) for k, v in model.named_parameters()]
    first = next(k for k, v in named if v.numel() <= 32)
    return sorted({first, named[-1][0]})


@pytest.mark.parametrize("family", ALL)
def test_grad_and_batch_l2_match_per_sample_autograd(family):
    model, x, y = prepared(family)
    assert_first_order_matches(model, x, y, *results(family)[:3])


def assert_first_order_matches(model, x, y, loss, grad, batch_l2) -> None:
    """Loss, gradient and ``batch_l2`` of a mean cross-entropy against per-sample autograd."""
    per_sample = per_sample_grads(model, x, y)
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y).detach(), rtol=1e-12, atol=0)
    for name in grad:
        torch.testing.assert_close(grad[name], sum(g[name] for g in per_sample), **TOL,
                                   msg=name)
        expected = torch.stack([g[name].square().sum() for g in per_sample])
        torch.testing.assert_close(batch_l2[name], expected, **TOL, msg=name)


@pytest.mark.parametrize("family", ALL)
def test_diag_ggn_exact_matches_square_root_columns(family):
    model, x, y = prepared(family)
    assert_diag_ggn_matches(model, x, y, results(family)[3])


def assert_diag_ggn_matches(model, x, y, diag_ggn) -> None:
    """``diag_ggn_exact`` against :func:`ggn_diagonal` (and that it is not zero)."""
    expected = ggn_diagonal(model, x, y)
    assert sum(v.abs().sum() for v in expected.values()) > 1e-6  # not vacuous
    for name, value in expected.items():
        torch.testing.assert_close(diag_ggn[name], value, **TOL, msg=name)


@pytest.mark.parametrize("family", DIAG_H_FAMILIES)
def test_diag_h_matches_autograd_on_small_parameters(family):
    model, x, y = prepared(family)
    if family in DIAG_H_REFUSED:
        with pytest.raises(fxcurv.CompileError, match=DIAG_H_REFUSED[family]):
            fxcurv.compile(model, nn.CrossEntropyLoss(), ["diag_h"])
        return
    if family in DIAG_H_SIDE:  # a smaller image: fewer residual columns (suite time)
        x = x[..., :DIAG_H_SIDE[family], :DIAG_H_SIDE[family]].contiguous()
    x, y = x[:DIAG_H_SAMPLES.get(family)], y[:DIAG_H_SAMPLES.get(family)]
    _, _, diag_h = fxcurv.compile(model, nn.CrossEntropyLoss(), ["diag_h"], verify=False)(x, y)
    names = small_parameters(model)
    for name, value in hessian_diagonal(model, x, y, names).items():
        assert value.abs().sum() > 0, name  # not vacuous
        torch.testing.assert_close(diag_h[name].reshape(-1)[:len(value)], value, **TOL, msg=name)


def test_diag_h_compiles_within_seconds_on_squeeze_excitation():
    """regnet_y's ``diag_h`` (squeeze-excitation cross terms) compiles in about half a second
    on one core; a compile that grows with the model's size again (it once took a minute)
    fails here."""
    model, _, _ = prepared("regnet")
    start = time.perf_counter()
    fxcurv.compile(model, nn.CrossEntropyLoss(), ["diag_h"], verify=False)
    assert time.perf_counter() - start < 15.0


@pytest.mark.parametrize("family", ALL)
def test_kfac_and_kflr_run(family):
    """Finite square factors for every parameter (BatchNorm, LayerNorm scales: their GGN
    block); kflr's input factor is kfac's (both ``Σ_n x_n x_nᵀ / N``)."""
    model, _, _ = prepared(family)
    kfac, kflr = results(family)[4:6]
    for quantity in (kfac, kflr):
        assert list(quantity) == [k for k, _ in model.named_parameters()]
        for name, factors in quantity.items():
            assert isinstance(factors, list) and 1 <= len(factors) <= 2, name
            for factor in factors:  # [G, A], [G], per group [groups, ., .] (grouped convs)
                assert torch.isfinite(factor).all() and factor.abs().sum() > 0, name
                assert factor.shape[-1] == factor.shape[-2] or factor.dim() == 1, name
    for name in layer_weights(model):
        torch.testing.assert_close(kflr[name][1], kfac[name][1], rtol=1e-12, atol=0)


def layer_weights(model: nn.Module) -> list[str]:
    """Weights of the linear and convolution layers (Kronecker factors ``[G, A]``)."""
    return [f"{path}.weight" for path, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d))]


class GPT2Block(nn.Module):
    """A GPT-2-style block (pre-norm, affine LayerNorm, causal scaled_dot_product_attention,
    GELU MLP) with a token embedding and a head, small: d = 16, 4 heads."""

    def __init__(self, vocab: int = 11, d: int = 16, heads: int = 4):
        super().__init__()  # (GPT-2 small: d = 768, 12 heads)
        self.heads = heads
        self.embed, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.randn(6, d) * 0.1)
        self.ln1, self.ln2, self.ln_f = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens):
        h = self.embed(tokens) + self.pos  # 6 positions
        b, t, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(a.transpose(1, 2).reshape(b, t, d))
        h = h + self.out(F.gelu(self.fc(self.ln2(h)), approximate="tanh"))
        return self.head(self.ln_f(h)).mean(1)


def test_gpt2_block_compiles_for_every_quantity():
    torch.manual_seed(0)
    model = GPT2Block().to(DTYPE)
    tokens, y = torch.randint(0, 11, (3, 6)), torch.tensor([1, 4, 9])
    # every quantity but kfra, which (as BackPACK's) propagates along a chain without branches
    names = [name for name in fxcurv.QUANTITIES if name != "kfra"]
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), names)
    vectors = {k: torch.randn(2, *v.shape, dtype=DTYPE) for k, v in model.named_parameters()}
    outputs = step(tokens, y, vectors)
    assert len(outputs) == 2 + len(names)
    per_sample = per_sample_grads(model, tokens, y)
    for name, value in outputs[1].items():
        torch.testing.assert_close(value, sum(g[name] for g in per_sample), **TOL, msg=name)
    diag_h = outputs[2 + names.index("diag_h")]
    for name, value in hessian_diagonal(model, tokens, y, ["ln_f.weight", "head.bias"],
                                        entries=16).items():
        torch.testing.assert_close(diag_h[name].reshape(-1), value, **TOL, msg=name)


class _SegmentationLogits(nn.Module):
    """A segmentation model's ``"out"`` entry, ``[N, classes, H, W]``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["out"]


def test_lraspp_segmentation_matches_per_sample_autograd():
    """torchvision's LR-ASPP head on MobileNetV3-Large (full width): hardswish, hardsigmoid
    gates ``x * s``, and ``F.interpolate`` (bilinear, to a size read off a tensor's shape);
    cross-entropy over every pixel."""
    torch.manual_seed(0)
    model = M.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                     num_classes=3)
    model = calibrate(_SegmentationLogits(model.to(DTYPE)), 32)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, dtype=DTYPE, generator=gen)
    y = torch.randint(0, 3, (2, 32, 32), generator=gen)
    loss, grad, batch_l2 = fxcurv.compile(model, nn.CrossEntropyLoss(), ["batch_l2"])(x, y)
    params = _params_of(model)
    per_sample = [torch.func.grad(lambda p, n=n: F.cross_entropy(
        torch.func.functional_call(model, p, (x[n:n + 1],)), y[n:n + 1]) / 2)(params)
        for n in range(2)]
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y).detach(), rtol=1e-12, atol=0)
    for name in grad:
        torch.testing.assert_close(grad[name], per_sample[0][name] + per_sample[1][name],
                                   **TOL, msg=name)
        expected = torch.stack([g[name].square().sum() for g in per_sample])
        torch.testing.assert_close(batch_l2[name], expected, **TOL, msg=name)


def test_gpt2_block_at_full_width_compiles_for_every_quantity():
    """d = 768, 12 heads (GPT-2 small's block): every quantity compiles (the step is the same
    graph for any width); the first-order and GGN quantities run on 2 sequences of 6 tokens,
    ``grad`` checked against autograd and ``kflr``'s input factors against ``kfac``'s."""
    torch.manual_seed(0)
    model = GPT2Block(d=768, heads=12).to(DTYPE)
    every = [name for name in fxcurv.QUANTITIES if name != "kfra"]
    assert isinstance(fxcurv.compile(model, nn.CrossEntropyLoss(), every), torch.fx.GraphModule)
    cheap = ["batch_l2", "variance", "diag_ggn_exact", "kfac", "kflr"]
    tokens, y = torch.randint(0, 11, (2, 6)), torch.tensor([1, 4])
    loss, grad, *outputs = fxcurv.compile(model, nn.CrossEntropyLoss(), cheap)(tokens, y)
    expected = torch.autograd.grad(F.cross_entropy(model(tokens), y), list(model.parameters()))
    for (name, _), value in zip(model.named_parameters(), expected):
        torch.testing.assert_close(grad[name], value, **TOL, msg=name)
    kfac, kflr = outputs[3], outputs[4]
    for name, factors in kflr.items():
        assert all(torch.isfinite(f).all() for f in factors), name
    for name in layer_weights(model):  # the same input factor A
        torch.testing.assert_close(kflr[name][1], kfac[name][1], **TOL, msg=name)


def test_resnet_converted_by_backpack_gives_the_same_quantities():
    """BackPACK's converter (``extend(model, use_converter=True)`` without the hooks) rewrites
    the residual additions into ``SumModule`` branches of a GraphModule: it compiles and
    gives the original model's numbers (themselves checked against brute force above)."""
    pytest.importorskip("backpack")
    from backpack.custom_module.branching import SumModule
    from backpack.custom_module.graph_utils import convert_module_to_backpack
    model, x, y = prepared("resnet")
    converted = convert_module_to_backpack(M.ResNet(M.resnet.BasicBlock, [1, 1, 1, 1],
                                                    num_classes=10).to(DTYPE), debug=False)
    converted.load_state_dict(model.state_dict())
    assert any(isinstance(m, SumModule) for m in converted.modules())
    ours = fxcurv.compile(converted.eval(), nn.CrossEntropyLoss(), QUANTITIES)(x, y)
    torch.testing.assert_close(ours[0], results("resnet")[0], rtol=1e-12, atol=0)
    for got, expected in zip(ours[1:4], results("resnet")[1:4]):
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=1e-10, atol=1e-14, msg=name)


@pytest.mark.parametrize("family", ["resnet", "mobilenet_v2", "shufflenet"])
def test_train_mode_batchnorm_gets_the_full_batch_ggn(family):
    """In train mode BatchNorm couples the batch: ``diag_ggn_exact`` is the diagonal of the
    full-batch GGN ``Jᵀ H J``, checked against one autograd VJP per column of the square root
    of ``H`` (``[N·K, N·K]``, from ``torch.func.hessian`` of the loss in all logits), the
    model run in train mode (dropout off); ``kfac`` runs (finite factors)."""
    model, x, y = prepared(family)
    model = model.train()
    for module in model.modules():  # (dropout would draw differently in eager mode)
        if isinstance(module, nn.Dropout):
            module.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    step = fxcurv.compile(model, nn.CrossEntropyLoss(), ["diag_ggn_exact", "kfac"])
    _, _, diag, kfac = step(x, y)
    params = dict(model.named_parameters())
    logits = model(x)
    hessian = torch.func.hessian(lambda out: F.cross_entropy(out, y))(logits.detach())
    values, vectors = torch.linalg.eigh(hessian.reshape(logits.numel(), logits.numel()))
    columns = vectors * values.clamp(min=0).sqrt()
    expected = {name: torch.zeros_like(p) for name, p in params.items()}
    for column in columns.T:
        vjps = torch.autograd.grad(logits, list(params.values()), column.reshape(logits.shape),
                                   retain_graph=True, allow_unused=True)
        for name, vjp in zip(params, vjps):
            if vjp is not None:
                expected[name] += vjp.square()
    model.load_state_dict(state)  # (the eager call updated the running statistics)
    for name in params:
        torch.testing.assert_close(diag[name], expected[name], **TOL)
    assert sum(v.sum() for v in expected.values()) > 0
    for name, factors in kfac.items():
        assert all(torch.isfinite(f).all() for f in factors), name
