"""The call-time check of an unrolled recurrent layer's input (``fxcurv/recurrent.py``).

``y = check_sequence(x, T, time_dim, where)`` is ``x`` itself after checking that it is a
batched sequence ``[N, T, F]`` / ``[T, N, F]`` with the ``T`` steps the graph was unrolled for;
``Jᵀg = g``.
"""
from __future__ import annotations

from torch import Tensor

from .registry import affine
from .shape import SHARED


def check_sequence(input: Tensor, length: int, time_dim: int, where: str) -> Tensor:
    """``input`` unchanged, after checking its rank and its number of time steps."""
    if input.dim() != 3:
        raise ValueError("fxcurv: {} was compiled for batched 3-D input, got {} dimensions"
                         .format(where, input.dim()))
    if input.size(time_dim) != length:
        raise ValueError("fxcurv: {} was compiled for sequence_length={} but its input has {} "
                         "time steps; compile again with sequence_length={}"
                         .format(where, length, input.size(time_dim), input.size(time_dim)))
    return input


affine([check_sequence], "check_sequence", "input, length, time_dim, where", doc=__doc__,
       vjp={"input": lambda g, c: g}, sandwich=SHARED)
