"""Rule cases: norm family (batch norm, layer norm, embedding, dropout).

The harness checks per-sample rules by slicing every non-parameter tensor input at sample
``n``, so eval-mode batch-norm cases with ``params`` pass their running statistics as ``N``
identical rows ``[N, C]`` and read row 0 (``rm[0]``); cases without ``params`` pass them as
``[C]``. Train-mode batch norm mixes samples, so its cases have no ``params``.

Embedding cases with ``padding_idx`` never look up the padding row: PyTorch zeroes that row's
gradient although the output depends on it, so the adjoint identity with ``torch.func.jvp``
does not hold there (the zeroing is checked against ``torch.func.vjp`` and per-sample
autograd outside this table).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rule_harness import case

g = torch.Generator().manual_seed(1)


def rand(*shape, positive=False):
    t = torch.randn(*shape, dtype=torch.float64, generator=g)
    return t.abs() + 0.5 if positive else t


def labels(high, *shape):
    return torch.randint(0, high, shape, generator=g)


def rows(stat, n):
    """A running statistic ``[C]`` repeated for each of ``n`` samples: ``[n, C]``."""
    return stat.expand(n, -1).clone()


def _bn_eval(x, rm, rv, w, b):
    return F.batch_norm(x, rm[0], rv[0], w, b, False, 0.0, 1e-5)


def _bn_eval_case(case_id, x, channels, params=("w", "b")):
    n = x.shape[0]
    rm, rv = rand(channels), rand(channels, positive=True)
    return case(case_id, _bn_eval, x, rows(rm, n), rows(rv, n), rand(channels), rand(channels),
                params=params, const=("rm", "rv"))


BATCH_NORM = [
    _bn_eval_case("batch_norm_eval_1d_flat", rand(4, 3), 3),
    _bn_eval_case("batch_norm_eval_1d", rand(4, 3, 5), 3),
    _bn_eval_case("batch_norm_eval_2d", rand(3, 2, 3, 3), 2),
    _bn_eval_case("batch_norm_eval_3d", rand(2, 2, 2, 3, 2), 2),
    case("batch_norm_eval_2d_no_affine",
         lambda x, rm, rv: F.batch_norm(x, rm, rv, training=False, eps=1e-3),
         rand(3, 2, 3, 3), rand(2), rand(2, positive=True), const=("rm", "rv")),
    case("batch_norm_eval_weight_only",
         lambda x, rm, rv, w: F.batch_norm(x, rm[0], rv[0], w),
         rand(4, 3, 2), rows(rand(3), 4), rows(rand(3, positive=True), 4), rand(3),
         params=("w",), const=("rm", "rv")),
    case("batch_norm_eval_bias_only",
         lambda x, rm, rv, b: F.batch_norm(x, rm[0], rv[0], None, b),
         rand(4, 3, 2), rows(rand(3), 4), rows(rand(3, positive=True), 4), rand(3),
         params=("b",), const=("rm", "rv")),
    case("batch_norm_train_1d",
         lambda x, w, b: F.batch_norm(x, None, None, w, b, True, 0.0, 1e-5),
         rand(5, 3), rand(3), rand(3)),
    case("batch_norm_train_2d",
         lambda x, w, b: F.batch_norm(x, None, None, w, b, True, 0.0, 1e-5),
         rand(3, 2, 3, 3), rand(2), rand(2)),
    case("batch_norm_train_3d_no_affine",
         lambda x: F.batch_norm(x, None, None, None, None, True, 0.0, 1e-5),
         rand(2, 2, 2, 3, 2)),
]

LAYER_NORM = [
    case("layer_norm", lambda x, w, b: F.layer_norm(x, (4,), w, b),
         rand(3, 4), rand(4), rand(4), params=("w", "b")),
    case("layer_norm_sequence", lambda x, w, b: F.layer_norm(x, (4,), w, b, eps=1e-3),
         rand(3, 5, 4), rand(4), rand(4), params=("w", "b")),
    case("layer_norm_two_axes", lambda x, w, b: F.layer_norm(x, [5, 4], w, b),
         rand(3, 5, 4), rand(5, 4), rand(5, 4), params=("w", "b")),
    case("layer_norm_flat_two_axes", lambda x, w, b: F.layer_norm(x, (3, 4), w, b),
         rand(2, 3, 4), rand(3, 4), rand(3, 4), params=("w", "b")),
    case("layer_norm_no_affine", lambda x: F.layer_norm(x, (5, 4)), rand(3, 5, 4)),
    case("layer_norm_no_affine_2d", lambda x: F.layer_norm(x, (4,)), rand(3, 4)),
    case("layer_norm_weight_only", lambda x, w: F.layer_norm(x, (4,), w),
         rand(3, 4), rand(4), params=("w",)),
    case("layer_norm_bias_only", lambda x, b: F.layer_norm(x, (4,), bias=b),
         rand(3, 5, 4), rand(4), params=("b",)),
]

EMBEDDING = [
    case("embedding", lambda x, w: F.embedding(x, w), labels(6, 5), rand(6, 3), params=("w",)),
    case("embedding_sequence", lambda x, w: F.embedding(x, w),
         labels(6, 4, 5), rand(6, 3), params=("w",)),
    case("embedding_padding", lambda x, w: F.embedding(x, w, padding_idx=0),
         labels(5, 4, 5) + 1, rand(6, 3), params=("w",)),
    case("local_response_norm", lambda x: F.local_response_norm(x, 3, alpha=0.5, k=1.5),
         rand(2, 5, 3, 2)),
    case("local_response_norm_1d_even", lambda x: F.local_response_norm(x, 2, beta=0.5),
         rand(2, 4, 3)),
    case("embedding_bag_mean", lambda x, w: F.embedding_bag(x, w), labels(6, 5, 3), rand(6, 3),
         params=("w",)),
    case("embedding_bag_sum_weighted",
         lambda x, w, s: F.embedding_bag(x, w, mode="sum", per_sample_weights=s),
         labels(6, 5, 3), rand(6, 3), rand(5, 3), params=("w",)),
    case("embedding_bag_max", lambda x, w: F.embedding_bag(x, w, mode="max"),
         labels(6, 5, 3), rand(6, 3), params=("w",)),
    case("embedding_bag_mean_padding", lambda x, w: F.embedding_bag(x, w, padding_idx=-2),
         torch.tensor([[4, 4, 4], [0, 4, 1], [2, 3, 5], [4, 1, 1]]), rand(6, 3),
         params=("w",)),
    case("embedding_padding_negative", lambda x, w: F.embedding(x, w, padding_idx=-1),
         labels(5, 6), rand(6, 3), params=("w",)),
]

DROPOUT = [
    case("dropout_eval", lambda x: F.dropout(x, 0.3, training=False), rand(3, 4)),
    case("dropout_p0_train", lambda x: F.dropout(x, 0.0, training=True), rand(3, 4)),
    case("dropout1d_eval", lambda x: F.dropout1d(x, 0.3, training=False), rand(3, 2, 4)),
    case("dropout2d_eval", lambda x: F.dropout2d(x, 0.3, training=False), rand(3, 2, 2, 2)),
    case("dropout3d_p0_train", lambda x: F.dropout3d(x, 0.0), rand(3, 2, 1, 2, 2)),
    case("alpha_dropout_eval", lambda x: F.alpha_dropout(x, 0.3), rand(3, 4)),
    case("feature_alpha_dropout_eval", lambda x: F.feature_alpha_dropout(x, 0.3),
         rand(3, 2, 2)),
]

CASES = BATCH_NORM + LAYER_NORM + EMBEDDING + DROPOUT
