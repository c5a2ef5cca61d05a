"""Data parallelism: the small helpers a distributed step calls, and compile-time checks.

The generated code of ``fxcurv.compile(..., process_group=group)`` (see
``passes/distributed.py``) calls these between its collectives. Every rank describes its batch
by one row of counts, ``[N_r, d_r (gradient), d_r (hessian)]``: its number of samples and the
divisors its ``reduction='mean'`` used (1 for ``sum``). After an all-gather every rank holds
the ``[W, 3]`` table, from which it takes its share ``d_r / D`` (``D = Σ_r d_r``) of every
result and the global ``N``. All helpers are TorchScript-compatible.
"""
from __future__ import annotations

import hashlib
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import CompileError

SAMPLES, GRADIENT, HESSIAN = 0, 1, 2   # the columns of the counts table


def rank_counts(batch_size: int, gradient: Optional[Tensor], hessian: Optional[Tensor],
                like: Tensor) -> Tensor:
    """This rank's row ``[[N_r, d_r gradient, d_r hessian]]`` (float64, on ``like``'s device);
    ``None`` divisors (``reduction='sum'``) count as 1."""
    row = torch.ones([1, 3], dtype=torch.float64, device=like.device)
    row[0, 0] = batch_size  # an int (float() would fix a symbolic size under torch.export)
    if gradient is not None:
        row[0, 1] = gradient.to(torch.float64)
    if hessian is not None:
        row[0, 2] = hessian.to(torch.float64)
    return row


def rank_share(counts: Tensor, local: Tensor, column: int, power: float, like: Tensor) -> Tensor:
    """``(local / Σ_ranks)^power`` of one column: this rank's weight in a global sum."""
    share = (local[0, column] / counts[:, column].sum()) ** power
    return share.to(like.dtype)


def total_count(counts: Tensor, column: int, like: Tensor) -> Tensor:
    """``Σ_ranks`` of one column (the global N for column 0), in ``like``'s dtype."""
    return counts[:, column].sum().to(like.dtype)


def check_divisors(counts: Tensor) -> Tensor:
    """Hessian-family results add terms scaled by the gradient's divisor to terms scaled by
    the loss factor's; data parallelism can rescale the sum only when the two agree."""
    same = (counts[:, 1] == counts[:, 2]).all()
    message = ("fxcurv (data parallel): the Hessian-family quantities need the loss to divide "
               "its gradient and its Hessian factor by the same count, but cross-entropy with "
               "class weights or ignored targets divides the gradient by the kept weight sum "
               "and the factor by the number of positions; use reduction='sum', or drop "
               "weight / ignore_index")
    if not torch.jit.is_scripting():
        if torch.compiler.is_exporting():  # a run-time assertion in the exported program
            torch._assert_async(same, message)
            return counts
    if not bool(same):
        raise ValueError(message)
    return counts


def sample_sizes(counts: Tensor) -> List[int]:
    """Every rank's ``N_r`` as ints (one host synchronisation per step)."""
    sizes: List[int] = counts[:, 0].to(torch.int64).tolist()
    return sizes


def pad_samples(value: Tensor, sizes: List[int], axis: int) -> Tensor:
    """Move the sample axis to the front and zero-pad it to the largest ``N_r`` (all-gather
    needs equal sizes on every rank)."""
    if not torch.jit.is_scripting():
        if torch.compiler.is_exporting():
            raise RuntimeError(
                "fxcurv: torch.export cannot export a data-parallel step that gathers per-sample "
                "quantities: the other ranks' batch sizes, and so the output shapes, are only "
                "known at run time. Export a step without per-sample quantities, or use "
                "torch.jit.script(step), which supports it.")
    moved = value.movedim(axis, 0)
    rows = max(sizes)
    if moved.size(0) < rows:
        pad = torch.zeros([rows - moved.size(0)] + list(moved.shape[1:]), dtype=moved.dtype,
                          device=moved.device)
        moved = torch.cat([moved, pad])
    return moved.contiguous()


def unpad_samples(gathered: Tensor, sizes: List[int], axis: int) -> Tensor:
    """``[W·max N_r, ...]`` -> the ranks' real samples in rank order, sample axis back at
    ``axis``: the concatenated global batch."""
    rows = max(sizes)
    blocks = gathered.reshape([len(sizes), rows] + list(gathered.shape[1:]))
    parts = [blocks[r, :sizes[r]] for r in range(len(sizes))]
    return torch.cat(parts).movedim(0, axis)


def sum_squares_from_variance(variance: Tensor, grad: Tensor, batch_size: int) -> Tensor:
    """``Σ_n g_n² = N (variance + (Σ_n g_n / N)²)``: undoes the local variance (exact up to
    rounding relative to ``Σ g²`` itself, as the local variance was computed from it)."""
    return (variance + (grad / batch_size).square()) * batch_size


def variance_from_sums(sum_squares: Tensor, grad: Tensor, total: Tensor) -> Tensor:
    """``Σ g²/N - (Σ g/N)²`` with the global sums and the global N."""
    return sum_squares / total - (grad / total).square()


def check_independent_generators(group, device: torch.device, quantity: str) -> None:
    """Monte-Carlo quantities draw from each rank's own torch generator: ranks whose generator
    states are equal would draw correlated (often identical) samples. Compare them once, at
    compile time (a collective: every rank compiles the same step)."""
    if device.type == "cuda":
        state = torch.cuda.get_rng_state(device)
    else:
        state = torch.get_rng_state()
    digest = hashlib.sha1(bytes(state.tolist())).hexdigest()
    digests: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(digests, digest, group=group)
    if len(set(digests)) < len(digests):
        raise CompileError(
            f"quantity {quantity!r}: Monte-Carlo samples are drawn from each rank's torch "
            f"generator, and ranks of this process group have the same {device.type} generator "
            "state, so they would draw the same samples. Seed every rank differently before "
            "compiling, e.g. torch.manual_seed(seed + dist.get_rank()) after building the "
            "model (DistributedDataParallel makes the parameters equal anyway).")
