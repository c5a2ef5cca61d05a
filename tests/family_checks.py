"""The three checks a model family gets in ``test_timm_zoo.py`` and
``test_torchvision_video.py``: ``grad`` and ``batch_l2`` against per-sample autograd,
``diag_ggn_exact`` against one VJP per column of each sample's loss-Hessian square root, and
``kfac`` running (finite factors), all from one compiled step per family."""
from __future__ import annotations

from functools import lru_cache
from typing import Callable

import pytest
import torch
import torch.nn as nn

import fxcurv
from test_torchvision_zoo import assert_diag_ggn_matches, assert_first_order_matches


def family_checks(namespace: dict, families: list, prepared: Callable, with_example: set) -> None:
    """Put the three tests over ``families`` into a test module's ``namespace``
    (``globals()``), each family's ``(model, x, y) = prepared(family)`` compiled once (with
    ``example=(x, y)`` for those in ``with_example``)."""

    @lru_cache(maxsize=None)
    def results(family: str) -> tuple:
        model, x, y = prepared(family)
        example = (x, y) if family in with_example else None
        return fxcurv.compile(model, nn.CrossEntropyLoss(),
                              ["batch_l2", "diag_ggn_exact", "kfac"], example=example)(x, y)

    @pytest.mark.parametrize("family", families)
    def test_grad_and_batch_l2_match_per_sample_autograd(family):
        model, x, y = prepared(family)
        assert_first_order_matches(model, x, y, *results(family)[:3])

    @pytest.mark.parametrize("family", families)
    def test_diag_ggn_exact_matches_square_root_columns(family):
        model, x, y = prepared(family)
        assert_diag_ggn_matches(model, x, y, results(family)[3])

    @pytest.mark.parametrize("family", families)
    def test_kfac_runs(family):
        model, _, _ = prepared(family)
        kfac = results(family)[4]
        assert list(kfac) == [name for name, _ in model.named_parameters()]
        for name, factors in kfac.items():
            assert all(torch.isfinite(f).all() for f in factors), name

    for test in (test_grad_and_batch_l2_match_per_sample_autograd,
                 test_diag_ggn_exact_matches_square_root_columns, test_kfac_runs):
        namespace[test.__name__] = test
