"""Real models: torchvision's resnet18 (eval mode) and a small VisionTransformer configuration
(2 layers, 2 heads, width 8). First-order quantities against per-sample
gradients from torch.func; ``diag_ggn_exact`` against an independent computation: the loss
Hessian per sample from torch.func, its eigen square root, and one torch.func.vjp per column,
``diag(G) = Σ_{n,c} (J_nᵀ s_nc)²``."""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

import fxcurv

torchvision = pytest.importorskip("torchvision")
DTYPE = torch.float64
TOL = dict(rtol=1e-8, atol=1e-12)


def _build(name: str):
    torch.manual_seed(0)
    if name == "resnet18":
        return torchvision.models.resnet18(num_classes=3).eval().to(DTYPE), (2, 3, 32, 32)
    vit = torchvision.models.VisionTransformer(image_size=8, patch_size=4, num_layers=2,
                                               num_heads=2, hidden_dim=8, mlp_dim=16,
                                               num_classes=3)
    return vit.eval().to(DTYPE), (3, 3, 8, 8)


@pytest.fixture(scope="module", params=["resnet18", "vit"])
def real(request):
    model, shape = _build(request.param)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, dtype=DTYPE, generator=g)
    y = torch.randint(0, 3, (shape[0],), generator=g)
    start = time.perf_counter()
    step = fxcurv.compile(model, torch.nn.CrossEntropyLoss(),
                          ["batch_grad", "batch_l2", "variance", "diag_ggn_exact"])
    print(f"{request.param} compile time: {time.perf_counter() - start:.2f} s")
    return model, x, y, step(x, y)


def test_first_order(real):
    model, x, y, (loss, grad, batch_grad, l2, variance, _) = real
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_n(p, xn, yn):
        return F.cross_entropy(torch.func.functional_call(model, p, (xn[None],)), yn[None])

    expected = torch.func.vmap(torch.func.grad(loss_n), in_dims=(None, 0, 0))(params, x, y)
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y).detach(), rtol=1e-12, atol=0)
    for name, g in expected.items():
        g = g / x.size(0)
        torch.testing.assert_close(batch_grad[name], g, **TOL, msg=name)
        torch.testing.assert_close(grad[name], g.sum(0), **TOL, msg=name)
        torch.testing.assert_close(l2[name], g.flatten(1).square().sum(1), **TOL, msg=name)
        torch.testing.assert_close(variance[name], g.square().mean(0) - g.mean(0).square(),
                                   **TOL, msg=name)


def test_diag_ggn_exact(real):
    model, x, y, outputs = real
    diag = outputs[-1]
    params = {k: v.detach() for k, v in model.named_parameters()}
    out, pullback = torch.func.vjp(lambda p: torch.func.functional_call(model, p, (x,)), params)
    hessian = torch.func.hessian(lambda o: F.cross_entropy(o, y))(out.detach())
    expected = {k: torch.zeros_like(v) for k, v in params.items()}
    for n in range(x.size(0)):
        values, vectors = torch.linalg.eigh(hessian[n, :, n, :])
        roots = vectors * values.clamp(min=0).sqrt()
        for c in range(roots.size(1)):
            cotangent = torch.zeros_like(out)
            cotangent[n] = roots[:, c]
            for name, column in pullback(cotangent)[0].items():
                expected[name] += column.square()
    for name, value in expected.items():
        torch.testing.assert_close(diag[name], value, **TOL, msg=name)
