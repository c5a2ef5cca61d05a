"""Recurrent layers' ops (``fxcurv/recurrent.py`` lowers ``nn.RNN``/``nn.LSTM``/``nn.GRU``).

``y = check_sequence(x, T, time_dim, where)`` is ``x`` itself after checking that it is a
batched sequence ``[N, T, F]`` / ``[T, N, F]`` with the ``T`` steps the graph was unrolled for;
``Jᵀg = g``.

``(output, h_T, c_T, workspace) = lstm_layer(x, W_ih, W_hh, b_ih, b_hh, h_0, c_0, reverse)``
is one LSTM layer in one direction as one node, the form a gradient-only step uses (no
quantity needs the inside of the recurrence). Over ``x`` ``[N, T, I]`` (batch first), per step
``t`` (``T−1 … 0`` when ``reverse``)::

    i, f, g, o = chunk(x_t W_ihᵀ + b_ih + h_{t−1} W_hhᵀ + b_hh, 4)
    c_t = σ(f) c_{t−1} + σ(i) tanh(g);   h_t = σ(o) tanh(c_t)

``output[:, t] = h_t`` ``[N, T, H]``. ``workspace`` holds what the Jacobian-transpose reads;
it has no derivative. ``Jᵀ`` of the used pieces' cotangents (``ḡ_out``, ``h̄_T``, ``c̄_T``) is
backpropagation through time, giving ``(x̄, W̄_ih, W̄_hh, b̄_ih, b̄_hh, h̄_0, c̄_0)`` in one call.
On the CPU in float32 both directions are PyTorch's fused oneDNN kernels
(``mkldnn_rnn_layer`` and its backward, what ``nn.LSTM`` runs there); elsewhere (float64,
CUDA) the same recurrence as plain ops, the workspace then being ``[T, N, 5H]``
(``σ(i), σ(f), tanh(g), σ(o), c_t`` per step). Leading vector axes of the cotangents are
taken one vector at a time. The op has first-order rules only (trait ``FIRST_ORDER``): a
step requesting any quantity unrolls the layer instead, and refuses the op if it meets it.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import FIRST_ORDER, FRESH, PIECES, Ctx, affine, register
from .shape import SHARED

FUSED_KERNELS = torch.backends.mkldnn.is_available()


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


affine([check_sequence], "check_sequence", "input, length, time_dim, where",
       doc="y = x (its rank and number of time steps checked);  Jᵀg = g.",
       vjp={"input": lambda g, c: g}, sandwich=SHARED)


def check_padded_steps(output: Tensor, lengths: Tensor, total_length: Optional[int], length: int,
                       where: str) -> Tensor:
    """``output`` unchanged, after checking that ``pad_packed_sequence`` pads to ``length``
    steps, as the step's output has: to ``total_length`` where given, else to the batch's
    longest length (a data-dependent check: an assertion op in an exported program)."""
    if total_length is not None:
        if total_length != length:
            raise ValueError("fxcurv: {} pads to total_length={}, but the step was compiled "
                             "for sequence_length={}".format(where, total_length, length))
        return output
    if not torch.jit.is_scripting() and torch.compiler.is_compiling():  # torch.export
        torch._assert_async(lengths.max() == length, "fxcurv: {} pads to the longest sequence "
                            "of the batch, which is not sequence_length={}".format(where, length))
        return output
    longest = int(lengths.max())
    if longest != length:
        raise ValueError("fxcurv: {} pads to the longest sequence of the batch, {} steps, but "
                         "the step was compiled for sequence_length={}; pass "
                         "total_length={} to pad_packed_sequence (or trim the batch's padding "
                         "to its longest sequence)".format(where, longest, length, length))
    return output


affine([check_padded_steps], "check_padded_steps",
       "output, lengths, total_length, length, where",
       doc="y = output (the number of steps pad_packed_sequence pads to checked);  Jᵀg = g.",
       vjp={"output": lambda g, c: g, "lengths": None}, sandwich=SHARED)


def check_cell_input(input: Tensor, where: str) -> Tensor:
    """``input`` unchanged, after checking that it is a batch ``[N, F]`` (a recurrent cell's
    1-D unbatched input has no sample axis)."""
    if input.dim() != 2:
        raise ValueError("fxcurv: {} needs batched 2-D input [N, features], got {} dimensions"
                         .format(where, input.dim()))
    return input


affine([check_cell_input], "check_cell_input", "input, where",
       doc="y = x (checked to be a batch [N, F]);  Jᵀg = g.",
       vjp={"input": lambda g, c: g}, sandwich=SHARED)


def _fused(x: Tensor, weight: Tensor) -> bool:
    """Whether the oneDNN kernels run this layer (CPU, float32, not empty; TorchScript,
    which cannot read the build flag, assumes a build with oneDNN, as PyTorch's own are)."""
    fits = x.device.type == "cpu" and x.dtype == torch.float32 and \
        weight.dtype == torch.float32 and x.numel() > 0
    if not torch.jit.is_scripting():
        fits = fits and _has_kernels()
    return fits


def _has_kernels() -> bool:
    return FUSED_KERNELS


def _bias_or_zeros(bias: Optional[Tensor], weight: Tensor) -> Tensor:
    return torch.zeros(weight.size(0), dtype=weight.dtype, device=weight.device) \
        if bias is None else bias


def _state_or_zeros(state: Optional[Tensor], x: Tensor, hidden: int) -> Tensor:
    return torch.zeros(x.size(0), hidden, dtype=x.dtype, device=x.device) \
        if state is None else state


def lstm_layer(input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Optional[Tensor],
               bias_hh: Optional[Tensor], h0: Optional[Tensor], c0: Optional[Tensor],
               reverse: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(output [N, T, H], h_T [N, H], c_T [N, H], workspace)`` of one LSTM layer and
    direction over ``input`` ``[N, T, I]`` (module docstring); absent states are zeros."""
    hidden = weight_hh.size(1)
    h = _state_or_zeros(h0, input, hidden)
    c = _state_or_zeros(c0, input, hidden)
    if _fused(input, weight_ih):
        grad_mode = torch.is_grad_enabled()
        torch.set_grad_enabled(True)  # the kernel writes its workspace only in grad mode
        output, h_last, c_last, workspace = torch.ops.aten.mkldnn_rnn_layer(
            input.transpose(0, 1).contiguous(), weight_ih, weight_hh,
            _bias_or_zeros(bias_ih, weight_ih), _bias_or_zeros(bias_hh, weight_ih), h, c,
            reverse, [], 2, hidden, 1, True, False, False, True)  # mode 2: LSTM
        torch.set_grad_enabled(grad_mode)
        return output.transpose(0, 1), h_last, c_last, workspace
    return _lstm_steps(input, weight_ih, weight_hh, bias_ih, bias_hh, h, c, reverse)


def _time_order(length: int, reverse: bool) -> List[int]:
    return list(range(length - 1, -1, -1)) if reverse else list(range(length))


def _lstm_steps(x: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Optional[Tensor],
                bias_hh: Optional[Tensor], h: Tensor, c: Tensor,
                reverse: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`lstm_layer` as plain ops; the workspace ``[T, N, 5H]`` holds
    ``σ(i), σ(f), tanh(g), σ(o), c_t`` of every step ``t``."""
    projected = F.linear(x, weight_ih, bias_ih)
    if bias_hh is not None:
        projected = projected + bias_hh
    length = x.size(1)
    outputs: List[Tensor] = [h] * length
    saved: List[Tensor] = [h] * length
    for t in _time_order(length, reverse):
        gates = torch.addmm(projected[:, t], h, weight_hh.t()).chunk(4, 1)
        i, f = torch.sigmoid(gates[0]), torch.sigmoid(gates[1])
        g, o = torch.tanh(gates[2]), torch.sigmoid(gates[3])
        c = f * c + i * g
        h = o * torch.tanh(c)
        outputs[t] = h
        saved[t] = torch.cat([i, f, g, o, c], 1)
    return torch.stack(outputs, 1), h, c, torch.stack(saved, 0)


def lstm_layer_vjp(output_bar: Optional[Tensor], h_bar: Optional[Tensor],
                   c_bar: Optional[Tensor], lead: int, input: Tensor, weight_ih: Tensor,
                   weight_hh: Tensor, bias_ih: Optional[Tensor], bias_hh: Optional[Tensor],
                   h0: Optional[Tensor], c0: Optional[Tensor], reverse: bool, output: Tensor,
                   h_last: Tensor, c_last: Tensor, workspace: Tensor) -> List[Tensor]:
    """``[x̄, W̄_ih, W̄_hh, b̄_ih, b̄_hh, h̄_0, c̄_0]`` of :func:`lstm_layer` for cotangents of
    its pieces (``None``: that piece is unused), each with ``lead`` leading vector axes (the
    kernel computes all seven at once)."""
    hidden = weight_hh.size(1)
    h = _state_or_zeros(h0, input, hidden)
    c = _state_or_zeros(c0, input, hidden)
    lead_shape = _lead_shape([output_bar, h_bar, c_bar], lead)
    count = 1
    for size in lead_shape:
        count *= size
    vectors = _cotangents(output_bar, count, list(output.shape), output)
    hs = _cotangents(h_bar, count, list(h_last.shape), output)
    cs = _cotangents(c_bar, count, list(c_last.shape), output)
    per_vector: List[List[Tensor]] = []
    for v in range(count):
        if _fused(input, weight_ih):
            per_vector.append(_fused_backward(
                vectors[v], hs[v], cs[v], input, weight_ih, weight_hh, bias_ih, bias_hh, h, c,
                reverse, output, h_last, c_last, workspace))
        else:
            per_vector.append(_steps_backward(vectors[v], hs[v], cs[v], input, weight_ih,
                                              weight_hh, h, c, reverse, workspace))
    if lead == 0:
        return per_vector[0]
    results: List[Tensor] = []
    for k in range(7):
        stacked = torch.stack([grads[k] for grads in per_vector], 0)
        results.append(stacked.reshape(lead_shape + list(stacked.shape[1:])))
    return results


def _lead_shape(bars: List[Optional[Tensor]], lead: int) -> List[int]:
    """The leading vector axes of the cotangents that are given (at least one is)."""
    for bar in bars:
        if bar is not None:
            return list(bar.shape[:lead])
    return []


def _cotangents(bar: Optional[Tensor], count: int, shape: List[int], like: Tensor) -> Tensor:
    """A piece's cotangent as ``[count, *shape]`` (zeros when the piece is unused)."""
    if bar is None:
        return torch.zeros([count] + shape, dtype=like.dtype, device=like.device)
    return bar.reshape([count] + shape)


def _fused_backward(output_bar: Tensor, h_bar: Tensor, c_bar: Tensor, x: Tensor,
                    weight_ih: Tensor, weight_hh: Tensor, bias_ih: Optional[Tensor],
                    bias_hh: Optional[Tensor], h0: Tensor, c0: Tensor, reverse: bool,
                    output: Tensor, h_last: Tensor, c_last: Tensor,
                    workspace: Tensor) -> List[Tensor]:
    """One cotangent through oneDNN's LSTM backward kernel (time-major inside)."""
    grads = torch.ops.aten.mkldnn_rnn_layer_backward(
        x.transpose(0, 1).contiguous(), weight_ih, weight_hh,
        _bias_or_zeros(bias_ih, weight_ih), _bias_or_zeros(bias_hh, weight_ih), h0, c0,
        output.transpose(0, 1), h_last, c_last, output_bar.transpose(0, 1).contiguous(),
        h_bar.contiguous(), c_bar.contiguous(), reverse, 2, weight_hh.size(1), 1,
        True, True, False, [], False, workspace)
    return [grads[0].transpose(0, 1), grads[1], grads[2], grads[3], grads[4], grads[5],
            grads[6]]


def _steps_backward(output_bar: Tensor, h_bar: Tensor, c_bar: Tensor, x: Tensor,
                    weight_ih: Tensor, weight_hh: Tensor, h0: Tensor, c0: Tensor,
                    reverse: bool, workspace: Tensor) -> List[Tensor]:
    """Backpropagation through time of :func:`_lstm_steps` for one cotangent: per step, from
    ``h̄_t`` (``ḡ_out[:, t]`` plus the later steps' share) and ``c̄_t``,
    ``ō = h̄ tanh c_t``, ``c̄ += h̄ σ(o) (1 − tanh² c_t)``, ``ī = c̄ g``, ``ḡ = c̄ σ(i)``,
    ``f̄ = c̄ c_{t−1}``, the gate pre-activations' cotangent ``z̄`` through σ' and tanh',
    ``h̄_{t−1} = z̄ W_hh``, ``c̄_{t−1} = c̄ σ(f)``; then the weights from all steps at once."""
    length, hidden = x.size(1), weight_hh.size(1)
    order = _time_order(length, reverse)
    gate_bars: List[Tensor] = [h0] * length
    previous: List[Tensor] = [h0] * length
    h_bar_t, c_bar_t = h_bar, c_bar
    for k in range(length - 1, -1, -1):
        t = order[k]
        i, f, g, o, c_t = workspace[t].chunk(5, 1)
        c_prev = c0 if k == 0 else workspace[order[k - 1]][:, 4 * hidden:]
        previous[t] = h0 if k == 0 else _hidden_of(workspace[order[k - 1]], hidden)
        h_bar_t = h_bar_t + output_bar[:, t]
        tanh_c = torch.tanh(c_t)
        c_bar_t = c_bar_t + h_bar_t * o * (1 - tanh_c * tanh_c)
        z_bar = torch.cat([c_bar_t * g * i * (1 - i), c_bar_t * c_prev * f * (1 - f),
                           c_bar_t * i * (1 - g * g), h_bar_t * tanh_c * o * (1 - o)], 1)
        gate_bars[t] = z_bar
        h_bar_t = z_bar.mm(weight_hh)
        c_bar_t = c_bar_t * f
    z = torch.stack(gate_bars, 1)                     # [N, T, 4H]
    flat = z.flatten(0, 1)
    bias_bar = flat.sum(0)
    return [z.matmul(weight_ih), flat.t().mm(x.flatten(0, 1)),
            flat.t().mm(torch.stack(previous, 1).flatten(0, 1)), bias_bar, bias_bar,
            h_bar_t, c_bar_t]


def _hidden_of(saved: Tensor, hidden: int) -> Tensor:
    """``h_t = σ(o) tanh(c_t)`` from a step's workspace row ``[N, 5H]``."""
    return saved[:, 3 * hidden:4 * hidden] * torch.tanh(saved[:, 4 * hidden:])


_LSTM_ARGS = ("input", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "h0", "c0")


def _lstm_vjp(position: int):
    """Jᵀ for argument ``position`` of :data:`_LSTM_ARGS`: piece ``position`` of the one
    :func:`lstm_layer_vjp` call that all the arguments' rules emit (merged by the cleanup)."""
    def vjp(g, c: Ctx):
        from .shape import Pieces  # noqa: PLC0415 (shape imports this module's names)
        if not isinstance(g, Pieces):
            raise TypeError("the result of lstm_layer is used as a whole; pick its pieces")
        bars: List[Optional[object]] = [None, None, None]
        for piece, index in zip(*g.lists()):
            index = index % 4
            bars[index] = piece if bars[index] is None else bars[index] + piece
        args = [getattr(c.args, name) for name in _LSTM_ARGS] + [c.bound["reverse"]]
        pieces = [c.out[k] for k in range(4)]
        return c.call(lstm_layer_vjp, *bars, c.lead, *args, *pieces)[position]
    return vjp


register([lstm_layer], "lstm_layer", ", ".join(_LSTM_ARGS) + ", reverse",
         doc="(output, h_T, c_T, workspace) = one LSTM layer and direction;  Jᵀ is "
             "backpropagation through time (first order only).",
         vjp={name: _lstm_vjp(k) for k, name in enumerate(_LSTM_ARGS)},
         traits=(PIECES, FRESH, FIRST_ORDER))
