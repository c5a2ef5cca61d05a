"""First-order quantities of matmul, bmm, einsum and embedding parameters, whose fast paths
are derived from their contraction form (``fxcurv.rules.contraction``), against per-sample
gradients by ``torch.func`` (``vmap(grad)``, ``test_models.reference_first_order``), float64.

Positions are chosen so that ``batch_l2`` takes the Gram form for some models and the
explicit per-sample terms for others. ``bmm`` does not broadcast, so a parameter reaches it
through an ``expand`` (the parameter-side path, no contraction): checked all the same.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import fxcurv
from test_models import assert_dicts_close, reference_first_order

QUANTITIES = ["batch_grad", "batch_l2", "sum_grad_squared", "variance"]


class Product(nn.Module):
    """``head(tanh(product(x, w)).flatten(1))`` for a product of data and one parameter."""

    def __init__(self, product, weight_shape: tuple, features: int):
        super().__init__()
        self.product = product
        self.w = nn.Parameter(torch.randn(*weight_shape))
        self.head = nn.Linear(features, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.product(x, self.w)).flatten(1))


def _embedding(positions: int) -> nn.Module:
    return nn.Sequential(nn.Embedding(7, 4, padding_idx=0), nn.Flatten(),
                         nn.Linear(4 * positions, 3))


# (model, data, uses a contraction form for w)
CASES = {
    "matmul_right_gram": lambda: (Product(lambda x, w: x @ w, (5, 6), 2 * 6),
                                  torch.randn(6, 2, 5), True),
    "matmul_right_explicit": lambda: (Product(torch.matmul, (3, 2), 7 * 2),
                                      torch.randn(6, 7, 3), True),
    "matmul_2d": lambda: (Product(torch.matmul, (5, 4), 4), torch.randn(6, 5), True),
    "matmul_left": lambda: (Product(lambda x, w: w @ x, (4, 3), 4 * 5),
                            torch.randn(6, 3, 5), True),
    "matmul_heads": lambda: (Product(lambda x, w: x @ w, (2, 3, 4), 2 * 5 * 4),
                             torch.randn(6, 2, 5, 3), True),
    "matmul_broadcast_heads": lambda: (Product(lambda x, w: x @ w, (1, 3, 4), 2 * 5 * 4),
                                       torch.randn(6, 2, 5, 3), True),
    "bmm_expanded": lambda: (Product(lambda x, w: torch.bmm(x, w.expand(x.size(0), -1, -1)),
                                     (1, 3, 4), 5 * 4), torch.randn(6, 5, 3), False),
    "einsum": lambda: (Product(lambda x, w: torch.einsum("nti,io->nto", x, w), (5, 6),
                               2 * 6), torch.randn(6, 2, 5), True),
    "einsum_param_first": lambda: (Product(lambda x, w: torch.einsum("hd,ntd->nht", w, x),
                                           (4, 3), 4 * 5), torch.randn(6, 5, 3), True),
    "einsum_groups_swapped": lambda: (
        Product(lambda x, w: torch.einsum("nhtd,hed->nhte", x, w), (2, 4, 3), 2 * 5 * 4),
        torch.randn(6, 2, 5, 3), True),
    "einsum_three_operands": lambda: (
        Product(lambda x, w: torch.einsum("ni,ij,nj->nj", x, w, x), (4, 4), 4),
        torch.randn(6, 4), False),
    "einsum_of_the_parameter": lambda: (  # parameter side: w's einsum never meets the data
        Product(lambda x, w: x @ torch.einsum("ij,jk->ik", w, torch.eye(3, dtype=w.dtype)),
                (4, 3), 3), torch.randn(6, 4), False),
    "embedding_gram": lambda: (_embedding(2), torch.randint(0, 7, (6, 2)), True),
    "embedding_explicit": lambda: (_embedding(5), torch.randint(0, 7, (6, 5)), True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_first_order_matches_per_sample_autograd(name):
    torch.manual_seed(0)
    model, x, contracted = CASES[name]()
    model = model.double()
    x = x.double() if x.is_floating_point() else x
    y = torch.randint(0, 3, (x.shape[0],))
    loss_fn = nn.CrossEntropyLoss()
    step = fxcurv.compile(model, loss_fn, QUANTITIES)
    # the linear head's weight and, where it has a form, the parameter under test
    assert step.code.count("_contraction_l2_total(") == 1 + contracted
    _, _, *ours = step(x, y)
    expected = reference_first_order(SimpleNamespace(model=model, loss_fn=loss_fn), x, y)
    for quantity, actual in zip(QUANTITIES, ours):
        assert_dicts_close(actual, expected[quantity], quantity)


def _embedding_tanh(positions: int) -> nn.Module:
    """A smooth activation right after the lookup: its residual reaches the table through
    the index form (weighted per column)."""
    return nn.Sequential(nn.Embedding(7, 4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * positions, 3))


HESSIAN_CASES = {**{name: CASES[name] for name in CASES if name != "einsum_three_operands"},
                 "embedding_tanh": lambda: (_embedding_tanh(3), torch.randint(0, 7, (6, 3)),
                                            True)}


@pytest.mark.parametrize("name", list(HESSIAN_CASES))
def test_hessian_diagonal_matches_autograd(name):
    """``diag_h`` and ``diag_h_batch``: the residuals' signed square sums, column-weighted in
    one pass over each propagated factor (``contraction.weighted_squares``, or the
    per-sample terms), or pulled back at the residual's producer, against the Hessian of
    the mean loss (and of each sample's share) by ``torch.func.hessian``."""
    torch.manual_seed(0)
    model, x, _ = HESSIAN_CASES[name]()
    model = model.double()
    x = x.double() if x.is_floating_point() else x
    y = torch.randint(0, 3, (x.shape[0],))
    _, _, diag_h, diag_h_batch = fxcurv.compile(model, nn.CrossEntropyLoss(),
                                                ["diag_h", "diag_h_batch"])(x, y)
    params = {k: v.detach() for k, v in model.named_parameters()}
    for name_, value in params.items():
        def loss(p, rows=slice(None)):
            logits = torch.func.functional_call(model, {**params, name_: p}, (x[rows],))
            return nn.functional.cross_entropy(logits, y[rows], reduction="sum") / x.shape[0]
        expected = torch.func.hessian(loss)(value).reshape(value.numel(), -1).diagonal()
        torch.testing.assert_close(diag_h[name_].reshape(-1), expected, msg=name_)
        per_sample = [torch.func.hessian(lambda p, n=n: loss(p, slice(n, n + 1)))(value)
                      .reshape(value.numel(), -1).diagonal() for n in range(x.shape[0])]
        torch.testing.assert_close(diag_h_batch[name_].reshape(x.shape[0], -1),
                                   torch.stack(per_sample), msg=name_)
