"""The first-order fast paths (float64, against autograd and direct formulas).

* max pooling: the forward returns its argmax indices once (``max_pool_with_indices``) and
  every propagation's Jacobian-transpose reads them (no recomputed argmax);
* convolutions: one ``convolution_backward`` call gives a gradient's ``x̄``, ``W̄`` and ``b̄``,
  with ``x̄`` left out of its output mask where nothing needs it (the first layer);
* a contraction's ``Σ_{lead, n} W̄_n²`` (conv layout) built one lead vector at a time;
* first-order quantities: the gradient of a weight whose per-sample terms are built is their
  sum (no ``W̄`` from the backward pass); a CPU max pool in the channels-last layout.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxcurv
from fxcurv.rules.contraction import contraction_batch, contraction_sum_squares

TOL = dict(rtol=1e-10, atol=1e-12)


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1),
        nn.Conv2d(4, 5, 2, padding="same"), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(5 * 2 * 2, 3)).double()


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model, loss_fn = cnn(), nn.CrossEntropyLoss()
    x, y = torch.randn(6, 2, 9, 9, dtype=torch.float64), torch.randint(0, 3, (6,))
    return model, loss_fn, x, y


def test_gradient_shares_pool_indices_and_conv_backward(setup, one_thread):
    model, loss_fn, x, y = setup
    step = fxcurv.compile(model, loss_fn, ["diag_ggn_exact"])
    code = step.code
    assert code.count("max_pool_with_indices(") == 2 and "max_pool_argmax" not in code
    assert code.count("conv_grads(") == 2
    assert "output_mask = [False, True, True]" in code  # no x̄ for the first layer
    assert "output_mask = [True, True, True]" in code
    assert_gradient_of_autograd(step, model, loss_fn, x, y)


def assert_gradient_of_autograd(step, model, loss_fn, x, y):
    """The step's gradient, plain and scripted, is autograd's."""
    model.zero_grad()
    loss_fn(model(x), y).backward()
    for scripted in (False, True):
        _, grad, _ = (torch.jit.script(step) if scripted else step)(x, y)
        for name, p in model.named_parameters():
            torch.testing.assert_close(grad[name], p.grad, **TOL)


@pytest.mark.parametrize("lead,groups,swap", [(0, 1, False), (1, 2, False), (2, 1, True)])
def test_weight_sum_squares_by_lead_vector(lead, groups, swap):
    torch.manual_seed(lead)
    lead_shape = [3, 2][:lead]
    left = torch.randn(lead_shape + [4, groups, 6, 5], dtype=torch.float64)
    right = torch.randn(4, groups, 7, 5, dtype=torch.float64)
    weight = torch.empty(groups * 7, 6, 1, 1) if swap else torch.empty(groups * 6, 7, 1, 1)
    expected = contraction_batch(left, right, weight, lead, swap, True, False).square()
    expected = expected.sum(list(range(lead + 1)))
    actual = contraction_sum_squares(left, right, weight, lead, swap, True, False)
    torch.testing.assert_close(actual, expected, **TOL)


@pytest.mark.parametrize("values", ["normal", "ties", "nan"])
def test_channels_last_max_pool_matches_torch(values):
    """The CPU pool in the channels-last layout: torch's values and argmax (ties and NaNs
    included: the first maximum of the window, a NaN wins), contiguous."""
    from fxcurv.rules.pooling import max_pool_with_indices
    torch.manual_seed(1)
    x = torch.randn(3, 5, 11, 10)
    if values == "ties":
        x = torch.randint(0, 3, x.shape).float()
    elif values == "nan":
        x[x > 1.2] = float("nan")
    for kernel, stride, padding, dilation, ceil in [([3, 3], [2, 2], [1, 1], [1, 1], False),
                                                    ([2, 3], [1, 2], [1, 1], [2, 1], True)]:
        pooled, argmax = max_pool_with_indices(x, kernel, stride, padding, dilation, ceil)
        expected = torch.nn.functional.max_pool2d_with_indices(x, kernel, stride, padding,
                                                               dilation, ceil)
        assert pooled.is_contiguous() and argmax.is_contiguous()
        torch.testing.assert_close(pooled, expected[0], rtol=0, atol=0, equal_nan=True)
        assert torch.equal(argmax, expected[1])


@pytest.mark.parametrize("quantity", ["batch_grad", "batch_l2", "sum_grad_squared",
                                      "variance"])
def test_first_order_gradient_from_per_sample_terms(setup, quantity, one_thread):
    """A first-order quantity that builds a weight's per-sample terms returns their sum as
    the gradient: no ``W̄`` from ``convolution_backward`` (the bias summed on its own)."""
    model, loss_fn, x, y = setup
    step = fxcurv.compile(model, loss_fn, [quantity])
    assert "output_mask = [False, False, True]" in step.code
    assert "output_mask = [True, False, True]" in step.code
    assert step.code.count("_weight_grad_of_terms") >= 3
    assert_gradient_of_autograd(step, model, loss_fn, x, y)
