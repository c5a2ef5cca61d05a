"""Library helpers replaced while tracing by equal functions whose ops keep the samples on
axis 0 (the rules' sample axis).

A replacement computes the same value as the helper it stands for; only the order of its ops
differs, so that per-sample and curvature quantities are defined through it. Each is used in
place of the library's function while a model is traced (:func:`replaced_helpers`), whatever
module calls it, and the generated step shows the replacement's ops.

* torchvision MViT v2's relative positions ``_add_rel_pos``: torchvision computes the temporal
  term as ``r_q.permute(2, 0, 1, 3, 4, 5).reshape(q_t, B·H·q_h·q_w, dim) @ Rtᵀ`` followed by
  ``.transpose(0, 1)``, which moves the samples to axis 1 and back;
  :func:`mvit_relative_positions` writes it as the einsum ``bythwc,tkc->bythwk``, like the
  height and width terms.
"""
from __future__ import annotations

import sys
from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator, List
from unittest import mock

import torch
from torch import Tensor


def _distances(queries: int, keys: int) -> Tensor:
    """``[queries, keys]`` integer offsets into a relative-position table of ``2·max - 1``
    rows, the shorter axis's positions scaled up to the longer one's (MViT v2)."""
    query_scale = max(keys / queries, 1.0)
    key_scale = max(queries / keys, 1.0)
    rows = torch.arange(queries)[:, None] * query_scale
    columns = (torch.arange(keys)[None, :] + (1.0 - keys)) * key_scale
    return (rows - columns).long()


def mvit_relative_positions(attn: Tensor, q: Tensor, q_thw: List[int], k_thw: List[int],
                            rel_pos_h: Tensor, rel_pos_w: Tensor, rel_pos_t: Tensor) -> Tensor:
    """``attn[:, :, 1:, 1:] += rel_pos`` with ``rel_pos[b, y, (t, h, w), (t', h', w')] =
    q_{bythw}·R_t[t, t'] + q_{bythw}·R_h[h, h'] + q_{bythw}·R_w[w, w']`` (the class token, row
    and column 0, gets none): ``attn`` ``[B, H, 1 + q_t·q_h·q_w, 1 + k_t·k_h·k_w]``, ``q``
    ``[B, H, 1 + q_t·q_h·q_w, dim]``, each table ``R`` read at :func:`_distances` of the
    table interpolated to ``2·max(q, k) - 1`` rows (torchvision's ``_interpolate``)."""
    from torchvision.models.video.mvit import _interpolate  # noqa: PLC0415 (optional dependency)

    q_t, q_h, q_w = q_thw
    k_t, k_h, k_w = k_thw
    tables = []
    for table, queries, keys in ((rel_pos_t, q_t, k_t), (rel_pos_h, q_h, k_h),
                                 (rel_pos_w, q_w, k_w)):
        tables.append(_interpolate(table, int(2 * max(queries, keys) - 1))[
            _distances(queries, keys)])                       # [queries, keys, dim]
    batch, heads, _, dim = q.shape
    r_q = q[:, :, 1:].reshape(batch, heads, q_t, q_h, q_w, dim)
    by_t = torch.einsum("bythwc,tkc->bythwk", r_q, tables[0])     # [B, H, q_t, q_h, q_w, k_t]
    by_h = torch.einsum("bythwc,hkc->bythwk", r_q, tables[1])     # [..., k_h]
    by_w = torch.einsum("bythwc,wkc->bythwk", r_q, tables[2])     # [..., k_w]
    rel_pos = (by_t[:, :, :, :, :, :, None, None] + by_h[:, :, :, :, :, None, :, None]
               + by_w[:, :, :, :, :, None, None, :]).reshape(batch, heads, q_t * q_h * q_w,
                                                             k_t * k_h * k_w)
    attn[:, :, 1:, 1:] += rel_pos
    return attn


REPLACED = {  # module -> {helper's name: replacement}
    "torchvision.models.video.mvit": {"_add_rel_pos": mvit_relative_positions},
}


def _replacements() -> Iterator[tuple[object, str, Callable]]:
    """``(module, name, replacement)`` for each module of :data:`REPLACED` already imported
    (a model using the helper has imported it; nothing is imported here)."""
    for module_name, helpers in REPLACED.items():
        module = sys.modules.get(module_name)
        for name, replacement in helpers.items():
            if module is not None and hasattr(module, name):
                yield module, name, replacement


@contextmanager
def replaced_helpers():
    """While tracing, each library helper of :func:`_replacements` is its replacement."""
    with ExitStack() as stack:
        for module, name, replacement in _replacements():
            stack.enter_context(mock.patch.object(module, name, replacement))
        yield
