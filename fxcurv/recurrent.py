"""Recurrent layers unrolled at trace time: ``nn.RNN`` (tanh, relu), ``nn.LSTM``, ``nn.GRU``.

A recurrent call becomes ops that have rules, one readable block per time step. Per layer and
direction (inside, the batch is first: ``[N, T, F]``):

* the input projection of all steps at once, ``x̂ = F.linear(x, W_ih, b_ih)`` ``[N, T, G·H]``
  (so ``W_ih``'s Kronecker factors count the steps as positions of a sequence);
* per step ``t`` the hidden projection ``ĥ_t = F.linear(h_{t-1}, W_hh, b_hh)`` (``h_{-1}`` the
  given initial state or zeros: ``W_hh`` is applied at each of the ``T`` steps) and the gates
      RNN:   ``h_t = tanh(x̂_t + ĥ_t)``  (or ``relu``)
      LSTM:  ``i, f, g, o = chunk(x̂_t + ĥ_t, 4)``;  ``c_t = σ(f) c_{t-1} + σ(i) tanh(g)``;
             ``h_t = σ(o) tanh(c_t)``
      GRU:   ``r, z = σ(x̂_r + ĥ_r), σ(x̂_z + ĥ_z)``;  ``n = tanh(x̂_n + r ĥ_n)``;
             ``h_t = n + z (h_{t-1} − n)``  (``= (1 − z) n + z h_{t-1}``)
* the outputs stacked over time; the reverse direction runs ``t = T−1 … 0`` and its features
  are concatenated after the forward ones; layer ``l + 1`` reads the output of layer ``l``.

A gradient-only step (no quantities) keeps each LSTM layer and direction as one node instead,
:func:`~fxcurv.rules.recurrent.lstm_layer` (PyTorch's fused kernels on the CPU).

A cell (``nn.RNNCell``, ``nn.LSTMCell``, ``nn.GRUCell``) is one such step, wherever the model
calls it (:func:`lower_cell`).

The graph's structure depends on the number of steps, which a symbolic trace does not know:
``compile(..., sequence_length=T)`` fixes it, and the step checks ``T`` when it runs.
Variable lengths: ``pack_padded_sequence(x, lengths, ...)`` is, while tracing, a
:class:`PaddedSequence` (the padded batch and its lengths), and a recurrent layer given one
runs on the padded steps with each sample's state carried unchanged past its length
(``h_t = where(t < length, h_t', h_{t−1})``, so ``h_n`` is each sample's state at its last step
and the reverse direction starts at it), its padded outputs zero; ``pad_packed_sequence`` of
the result is that padded output (without ``total_length``, the step checks when it runs that
the batch's longest sequence has ``sequence_length`` steps). The packed ``data`` and
``batch_sizes`` themselves (their sizes depend on the lengths' values) are refused.

Refused at compile time: ``proj_size > 0``, a ``PackedSequence`` built any other way, and
dropout between layers in train mode (its masks would differ per step; ``model.eval()`` removes
it).
"""
from __future__ import annotations

import traceback
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence

from .errors import CompileError, user_frame
from .rules.recurrent import check_cell_input, check_padded_steps, check_sequence, lstm_layer

RECURRENT = (nn.RNN, nn.LSTM, nn.GRU)
CELLS = (nn.RNNCell, nn.LSTMCell, nn.GRUCell)
CELL_NOTE = ("one step as ops with rules, every quantity but kfra (a cell called in a loop: "
             "its weights are used at every call); batched 2-D input (checked when the step "
             "runs), given or zero states, bias")
SUPPORT_NOTE = ("every quantity but kfra (kfac, kflr: weights shared over the steps by the "
                "expand convention); layers, bidirectional, batch_first, bias, initial "
                "states, pack_padded_sequence (variable lengths); refused: proj_size > 0, "
                "dropout between layers in train mode")
GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "LSTM": 4, "GRU": 3}


class PaddedSequence:
    """What ``pack_padded_sequence(padded, lengths, batch_first)`` stands for while tracing:
    the padded batch ``[N, T, *]`` (batch first) and the lengths ``[N]`` (a traced tensor or a
    constant). Only a recurrent layer and ``pad_packed_sequence`` read it."""

    def __init__(self, padded: Any, lengths: Any, steps: Optional[int] = None):
        self.padded, self.lengths, self.steps = padded, lengths, steps  # steps: T, if known

    def __getattr__(self, name: str):
        raise _read_packed(f"'{name}'")

    def __getitem__(self, index: Any):
        raise _read_packed(f"[{index!r}]")

    def __iter__(self):
        raise _read_packed("unpacked")


def _read_packed(what: str) -> CompileError:
    return CompileError(
        f"a PackedSequence is read ({what}){_caller()}: fxcurv represents a packed batch by its "
        "padded steps and lengths while tracing, and the packed data's size depends on the "
        "lengths' values. Read a recurrent layer's output through pad_packed_sequence (or use "
        "its h_n) instead.")


def pack_padded(input: Any, lengths: Any, batch_first: bool = False,
                enforce_sorted: bool = True) -> PaddedSequence:
    """``pack_padded_sequence`` while tracing: :class:`PaddedSequence` of ``input`` (made batch
    first) and ``lengths`` (sorted or not: a padded batch keeps the samples' order, which is
    the order eager's ``h_n`` and ``pad_packed_sequence`` give back)."""
    if not isinstance(lengths, fx.Proxy):
        lengths = torch.as_tensor(lengths, dtype=torch.int64)
    return PaddedSequence(input if batch_first else input.transpose(0, 1), lengths)


def pad_packed(sequence: Any, batch_first: bool = False, padding_value: float = 0.0,
               total_length: Optional[int] = None) -> tuple:
    """``pad_packed_sequence`` of a recurrent layer's :class:`PaddedSequence` output:
    ``(padded, lengths)``, padded positions ``padding_value``; the step checks when it runs
    that ``total_length`` (if traced) or, without it, the longest length is the number of steps
    (:func:`~fxcurv.rules.recurrent.check_padded_steps`)."""
    if not isinstance(sequence, PaddedSequence):
        got = "a tensor" if isinstance(sequence, (fx.Proxy, torch.Tensor)) else \
            type(sequence).__name__
        raise CompileError(f"pad_packed_sequence{_caller()} got {got}, not the output of a "
                           "recurrent layer run on pack_padded_sequence.")
    padded, lengths, steps = sequence.padded, sequence.lengths, sequence.steps
    if isinstance(total_length, int) and total_length != steps:
        raise CompileError(f"pad_packed_sequence{_caller()}: total_length={total_length} differs "
                           f"from sequence_length={steps} the recurrent layer was compiled for. "
                           "Pass total_length=sequence_length (or None).")
    if not isinstance(total_length, int):  # None, or a traced size: checked when it runs
        padded = padded.tracer.create_proxy(
            "call_function", check_padded_steps,
            (padded, lengths, total_length, steps, f"pad_packed_sequence{_caller()}"), {})
    if padding_value != 0.0:
        padded = padded + (_valid_steps(lengths, padded, steps) == 0) * padding_value
    return (padded if batch_first else padded.transpose(0, 1)), lengths


def _valid_steps(lengths: Any, like: Any, steps: int) -> Any:
    """``[N, T, 1]`` float: 1 at steps ``t < lengths[n]``, 0 past them."""
    times = torch.arange(steps, device=like.device)
    return (times.unsqueeze(0) < lengths.to(like.device).unsqueeze(1)).unsqueeze(2).to(
        like.dtype)


def lower_recurrent(m: nn.RNNBase, path: str, length: Optional[int], fused: bool, input: Any,
                    hx: Any = None) -> tuple:
    """``m(input, hx)`` as unrolled ops (with ``fused``, an LSTM's layers as one
    :func:`~fxcurv.rules.recurrent.lstm_layer` node each); returns ``(output, h_n)`` or
    ``(output, (h_n, c_n))`` as the module does. On a :class:`PaddedSequence` each sample's
    states stop at its length, and the output is a :class:`PaddedSequence` again."""
    lengths = input.lengths if isinstance(input, PaddedSequence) else None
    if lengths is not None:
        input = input.padded if m.batch_first else input.padded.transpose(0, 1)
        fused = False
    _refuse(m, path, length, input)
    prefix = path.replace(".", "_") or type(m).__name__.lower()
    where = f"{type(m).__name__} '{path}'"
    x = input if m.batch_first else input.transpose(0, 1)   # [N, T, I]
    x = _named(x.tracer.create_proxy("call_function", check_sequence, (x, length, 1, where),
                                     {}), f"{prefix}_input")
    h0, c0 = _initial_states(m.mode, hx)
    finals_h, finals_c = [], []
    for layer in range(m.num_layers):
        outputs = []
        for reverse in range(2 if m.bidirectional else 1):
            index = layer * (2 if m.bidirectional else 1) + reverse
            name = f"{prefix}_l{layer}{'_reverse' if reverse else ''}"
            direction = _fused_direction if fused and m.mode == "LSTM" else _direction
            out, h, c = direction(m, name, layer, reverse, length, x,
                                  _pick(h0, index), _pick(c0, index), lengths)
            outputs.append(out)
            finals_h.append(h)
            finals_c.append(c)
        x = outputs[0] if len(outputs) == 1 else _named(torch.cat(outputs, 2),
                                                         f"{prefix}_l{layer}_output")
    output = x if m.batch_first else x.transpose(0, 1)
    if lengths is not None:
        output = PaddedSequence(x, lengths, length)
    h_n = _named(torch.stack(finals_h, 0), f"{prefix}_h_n")
    if m.mode != "LSTM":
        return output, h_n
    return output, (h_n, _named(torch.stack(finals_c, 0), f"{prefix}_c_n"))


def lower_cell(m: nn.RNNCellBase, path: str, input: Any, hx: Any = None) -> Any:
    """``m(input, hx)`` of a recurrent cell as ops: one step of :func:`_cell` on the
    projections ``x W_ihᵀ + b_ih`` and ``h W_hhᵀ + b_hh`` (zero states when ``hx`` is None);
    returns ``h'`` or, for ``nn.LSTMCell``, ``(h', c')``."""
    prefix = path.replace(".", "_") or type(m).__name__.lower()
    where = f"{type(m).__name__} '{path}'"
    x = _named(input.tracer.create_proxy("call_function", check_cell_input, (input, where), {}),
               f"{prefix}_input")
    mode = _cell_mode(m)
    projected = _named(F.linear(x, m.weight_ih, m.bias_ih), f"{prefix}_x_proj")
    h, c = _zeros_if_absent(mode, prefix, projected, m.hidden_size, *_initial_states(mode, hx))
    hidden = _named(F.linear(h, m.weight_hh, m.bias_hh), f"{prefix}_h_proj")
    h, c = _cell(mode, prefix, projected, hidden, h, c)
    return (h, c) if mode == "LSTM" else h


def _cell_mode(m: nn.RNNCellBase) -> str:
    """The :data:`GATES` key of a cell module."""
    if isinstance(m, nn.LSTMCell):
        return "LSTM"
    if isinstance(m, nn.GRUCell):
        return "GRU"
    return "RNN_TANH" if m.nonlinearity == "tanh" else "RNN_RELU"


def _refuse(m: nn.RNNBase, path: str, length: Optional[int], input: Any) -> None:
    """CompileError for what the unrolled ops cannot represent exactly."""
    problem = None
    if isinstance(input, PackedSequence):
        problem = ("its input is a PackedSequence (argument 'input') not made by "
                   "pack_padded_sequence while tracing", "Pack the padded batch with "
                   "torch.nn.utils.rnn.pack_padded_sequence inside the model's forward.")
    elif getattr(m, "proj_size", 0) > 0:
        problem = (f"proj_size={m.proj_size} (LSTM projections) is not supported",
                   "Use proj_size=0 (a separate nn.Linear on the output projects it).")
    elif m.dropout > 0 and m.training and m.num_layers > 1:
        problem = (f"dropout={m.dropout} between layers in train mode is not supported",
                   "Call model.eval() before compiling, or use dropout=0.")
    elif not isinstance(length, int) or length < 1:
        problem = ("the number of time steps is not known when tracing (argument "
                   "'sequence_length' of fxcurv.compile)",
                   "Pass sequence_length=T to fxcurv.compile; the step checks it when it runs.")
    if problem is not None:
        raise CompileError(f"{type(m).__name__} at '{path}'{_caller()}: {problem[0]}. "
                           f"{problem[1]}")


def _caller() -> str:
    """`` (File "model.py", line 12: out, _ = self.rnn(x))``: the user's call, if found (the
    innermost frame outside torch and fxcurv, decided by the files' real location)."""
    frame = user_frame(traceback.extract_stack())
    return f" ({frame})" if frame else ""


def _initial_states(mode: str, hx: Any) -> tuple[Any, Any]:
    """``(h0, c0)`` as given (a layer's ``[L·D, N, H]`` each, a cell's ``[N, H]``; ``None``
    when absent)."""
    if hx is None:
        return None, None
    if mode == "LSTM":
        return hx[0], hx[1]
    return hx, None


def _zeros_if_absent(mode: str, name: str, like: Any, hidden: int, h: Any,
                     c: Any) -> tuple[Any, Any]:
    """``(h, c)`` with zeros ``[N, H]`` (shaped from ``like`` ``[N, ≥H]``) for an absent
    state (``c`` of an LSTM only)."""
    if h is None:
        h = _named(torch.zeros_like(like[:, :hidden]), f"{name}_h0")
    if c is None and mode == "LSTM":
        c = _named(torch.zeros_like(like[:, :hidden]), f"{name}_c0")
    return h, c


def _pick(state: Any, index: int) -> Any:
    return None if state is None else state[index]


def _weights(m: nn.RNNBase, layer: int, reverse: int) -> tuple[Any, Any, Any, Any]:
    """``(W_ih, W_hh, b_ih, b_hh)`` of one layer and direction (biases None without bias)."""
    suffix = f"_l{layer}{'_reverse' if reverse else ''}"
    w_ih, w_hh = getattr(m, "weight_ih" + suffix), getattr(m, "weight_hh" + suffix)
    b_ih = getattr(m, "bias_ih" + suffix) if m.bias else None
    b_hh = getattr(m, "bias_hh" + suffix) if m.bias else None
    return w_ih, w_hh, b_ih, b_hh


def _fused_direction(m: nn.RNNBase, name: str, layer: int, reverse: int, length: int, x: Any,
                     h: Any, c: Any, lengths: Any = None) -> tuple[Any, Any, Any]:
    """One LSTM layer in one direction as one node: ``([N, T, H], h_T, c_T)``."""
    weights = _weights(m, layer, reverse)
    fused = _named(x.tracer.create_proxy("call_function", lstm_layer,
                                         (x, *weights, h, c, bool(reverse)), {}), name)
    return (_named(fused[0], f"{name}_output"), _named(fused[1], f"{name}_h_last"),
            _named(fused[2], f"{name}_c_last"))


def _direction(m: nn.RNNBase, name: str, layer: int, reverse: int, length: int, x: Any,
               h: Any, c: Any, lengths: Any = None) -> tuple[Any, Any, Any]:
    """One layer in one direction over ``x`` ``[N, T, I]``: ``([N, T, H], h_T, c_T)``. With
    ``lengths``, a sample's states are carried unchanged at steps ``t >= lengths[n]`` and its
    outputs there are zero."""
    w_ih, w_hh, b_ih, b_hh = _weights(m, layer, reverse)
    projected = _named(F.linear(x, w_ih, b_ih), f"{name}_x_proj")
    by_step = projected.unbind(1)   # one Jᵀ for all steps (no scatter into [N, T, G·H] each)
    hidden = m.hidden_size
    steps = range(length - 1, -1, -1) if reverse else range(length)
    outputs: list = [None] * length
    valid = None if lengths is None else _named(lengths.to(x.device).unsqueeze(1),
                                                f"{name}_lengths")
    for t in steps:
        x_t = _named(by_step[t], f"{name}_t{t}_x")
        h, c = _zeros_if_absent(m.mode, name, x_t, hidden, h, c)
        h_t = _named(F.linear(h, w_hh, b_hh), f"{name}_t{t}_h_proj")
        new_h, new_c = _cell(m.mode, f"{name}_t{t}", x_t, h_t, h, c)
        if valid is None:
            h, c = new_h, new_c
            outputs[t] = h
            continue
        running = _named(valid > t, f"{name}_t{t}_running")   # [N, 1]
        outputs[t] = _named(new_h * running.to(new_h.dtype), f"{name}_t{t}_output")
        h = _named(torch.where(running, new_h, h), f"{name}_t{t}_h_kept")
        c = None if c is None else _named(torch.where(running, new_c, c), f"{name}_t{t}_c_kept")
    return _named(torch.stack(outputs, 1), f"{name}_output"), h, c


def _cell(mode: str, name: str, x_t: Any, h_t: Any, h: Any, c: Any) -> tuple[Any, Any]:
    """The gates of one step: new ``(h, c)`` (``c`` is ``None`` except for LSTM)."""
    if mode in ("RNN_TANH", "RNN_RELU"):
        act = torch.tanh if mode == "RNN_TANH" else torch.relu
        return _named(act(_named(x_t + h_t, f"{name}_pre")), f"{name}_h"), None
    if mode == "LSTM":
        i, f, g, o = _pieces(_named(x_t + h_t, f"{name}_gates"), f"{name}_gate", "ifgo")
        c = _named(torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g), f"{name}_c")
        return _named(torch.sigmoid(o) * torch.tanh(c), f"{name}_h"), c
    xs, hs = _pieces(x_t, f"{name}_x", "rzn"), _pieces(h_t, f"{name}_h_proj", "rzn")
    r = _named(torch.sigmoid(xs[0] + hs[0]), f"{name}_r")
    z = _named(torch.sigmoid(xs[1] + hs[1]), f"{name}_z")
    n = _named(torch.tanh(xs[2] + r * hs[2]), f"{name}_n")
    return _named(n + z * (h - n), f"{name}_h"), None


def _pieces(gates: Any, name: str, letters: str) -> list:
    """The gate pre-activations ``[N, H]`` of ``gates`` ``[N, len(letters)·H]``, named."""
    parts = gates.chunk(len(letters), 1)
    return [_named(parts[k], f"{name}_{letter}") for k, letter in enumerate(letters)]


def _named(proxy: Any, name: str) -> Any:
    """Give the node behind ``proxy`` a readable name (fx keeps names unique); a constant
    (lengths given as a list) is returned as it is."""
    if isinstance(proxy, fx.Proxy):
        proxy.node._rename(name)
    return proxy
