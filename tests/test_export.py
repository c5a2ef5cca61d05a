"""torch.export of a compiled step, beside TorchScript: same outputs, any batch size."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.export import Dim

import fxcurv

DTYPE = torch.float64
QUANTITIES = [["batch_grad", "batch_l2", "variance"], ["diag_ggn_exact", "sqrt_ggn_exact"],
              ["kflr", "kfra"], ["diag_h", "diag_h_batch"]]


def cnn():
    """Small on purpose: the Hessian family's residual factor of the tanh has one lead vector
    per activation entry (2·4·4 here), and export unrolls the per-lead loops."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(8, 5)).to(DTYPE)


def batch(n):
    g = torch.Generator().manual_seed(n)
    return torch.randn(n, 1, 6, 6, dtype=DTYPE, generator=g), torch.randint(0, 5, (n,),
                                                                           generator=g)


def flat(outputs):
    for value in outputs:
        if isinstance(value, dict):
            for item in value.values():
                yield from (item if isinstance(item, list) else [item])
        else:
            yield value


@pytest.mark.dynamic_export
@pytest.mark.parametrize("quantities", QUANTITIES, ids=["-".join(q) for q in QUANTITIES])
def test_export_with_a_dynamic_batch_size(quantities, tmp_path):
    step = fxcurv.compile(cnn(), nn.CrossEntropyLoss(), quantities)
    samples = Dim("samples", min=2)
    exported = torch.export.export(step, batch(4),
                                   dynamic_shapes={"x": {0: samples}, "y": {0: samples}})
    path = tmp_path / "step.pt2"
    torch.export.save(exported, str(path))
    loaded = torch.export.load(str(path)).module()
    for n in (4, 7):
        for ours, reference in zip(flat(loaded(*batch(n))), flat(step(*batch(n)))):
            torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-14)


def test_export_of_a_product_step():
    step = fxcurv.compile(cnn(), nn.CrossEntropyLoss(), ["hmp"])
    vectors = {name: torch.randn(2, *p.shape, dtype=DTYPE) for name, p in cnn().named_parameters()}
    exported = torch.export.export(step, (*batch(4), vectors)).module()
    for ours, reference in zip(flat(exported(*batch(4), vectors)),
                               flat(step(*batch(4), vectors))):
        torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-14)


def test_interpolate_with_integer_scale_factors_scripts():
    """``F.interpolate(h, scale_factor=2)`` is valid eager code that TorchScript's
    ``interpolate`` (float scales only) rejects: the step calls it with ``2.0`` and scripts."""
    import torch.nn.functional as F  # noqa: PLC0415

    class Upsampling(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3, padding=1)

        def forward(self, x):
            h = F.interpolate(self.conv(x), scale_factor=2, mode="bilinear")
            return F.interpolate(h, scale_factor=(1, 2), mode="nearest").flatten(1)[:, :4]

    x, y = torch.randn(3, 2, 4, 4, dtype=DTYPE), torch.tensor([0, 3, 1])
    step = fxcurv.compile(Upsampling().to(DTYPE), nn.CrossEntropyLoss(),
                          ["batch_grad", "diag_ggn_exact"])
    assert "scale_factor = 2.0" in step.code
    for expected, got in zip(flat(step(x, y)), flat(torch.jit.script(step)(x, y))):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
