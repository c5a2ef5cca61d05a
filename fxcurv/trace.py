"""Tracing: model + loss -> one ``torch.fx.Graph`` of functional ops.

The tracer goes through every module (none is a leaf), so ``nn.Linear`` becomes ``F.linear``
with its parameters as ``get_attr`` nodes, exactly as a model written with ``F.*`` would.
Modules whose ``forward`` cannot be traced as it is (BatchNorm: Python control flow on the
input and a buffer update; MultiheadAttention and the Transformer layers: fast-path checks on
tensor values) are lowered to functional ops by ``MODULE_LOWERINGS``.
A parameter used as a plain tensor (``model.parameters()`` in a regulariser, a parameter the
loss function captured) is traced as its ``get_attr`` node, not folded into a constant.

What fx does not record by itself is made visible here (``docs/tracing.md``): each node
notes whether grad mode was on when it was traced, and the values a ``no_grad`` region hands
out are read through ``detach``; a custom ``torch.autograd.Function`` and a module with a
backward hook become opaque calls, which the invariant check (``passes/invariant.py``) refuses
where they lie on a derivative path. The hooks of ``backpack.extend``, which change no value,
are taken off for the trace (:func:`without_backpack_hooks`).
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import operator
import os
import sys
import traceback
import warnings
from unittest import mock
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode, is_tensor_method_or_property
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import CheckpointFunction

from .example import ExampleValues, example_shapes, guard_sample_branches
from .errors import CompileError, format_module, user_frame
from .inputs import join_outputs, structured
from .library import replaced_helpers
from .passes.analysis import ancestors, sample_carriers, sample_data
from .recurrent import CELLS, RECURRENT, lower_cell, lower_recurrent, pack_padded, pad_packed
from .rules import RULES, rule_for
from .rules.linalg import attention
from .rules.losses import l1_loss_keeping_weight
from .rules.shape import is_scalar_node

MODEL, LOSS = "model", "loss_fn"


def _batch_norm(m: nn.modules.batchnorm._BatchNorm, x):
    """BatchNorm without the running-stat update: batch statistics in train mode (or without
    running stats), running statistics in eval mode. The step never mutates the model."""
    if m.training or not m.track_running_stats:
        return F.batch_norm(x, None, None, m.weight, m.bias, True, 0.0, m.eps)
    return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A mask of ``nn.MultiheadAttention`` as added to the scores: boolean True (not allowed)
    -> -inf, False -> 0; a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf"))
    return mask.to(dtype)


def mha_mask(attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], batch: int,
             heads: int, extra: int, dtype: torch.dtype) -> Tensor:
    """The additive mask ``[N or 1, H or 1, L, S]`` of ``nn.MultiheadAttention`` from
    ``attn_mask`` ``[L, S]`` or ``[N·H, L, S]`` and ``key_padding_mask`` ``[N, S]``; the
    ``extra`` key columns appended by bias_k / add_zero_attn are allowed everywhere."""
    total = torch.zeros([1, 1, 1, 1], dtype=dtype)
    if attn_mask is not None:
        mask = additive_mask(attn_mask, dtype)
        if mask.dim() == 3:
            mask = mask.reshape(batch, heads, mask.size(1), mask.size(2))
        total = total.to(mask.device) + mask
    if key_padding_mask is not None:
        mask = additive_mask(key_padding_mask, dtype)
        total = total.to(mask.device) + mask.reshape(batch, 1, 1, mask.size(1))
    return F.pad(total, [0, extra])


def _in_projection(m: nn.MultiheadAttention, query, key, value):
    """``q, k, v`` ``[N, L|S, E]``: one linear layer with the packed ``in_proj_weight`` for
    self-attention (``query is key is value``), else one per input on the weight's thirds."""
    if m._qkv_same_embed_dim and query is key and key is value:
        q, k, v = F.linear(query, m.in_proj_weight, m.in_proj_bias).chunk(3, dim=-1)
        return q, k, v
    if m._qkv_same_embed_dim:
        w_q, w_k, w_v = m.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
    b_q = b_k = b_v = None
    if m.in_proj_bias is not None:
        b_q, b_k, b_v = m.in_proj_bias.chunk(3)
    return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)


def _multihead_attention(m: nn.MultiheadAttention, query, key, value, key_padding_mask=None,
                         need_weights=True, attn_mask=None, average_attn_weights=True,
                         is_causal=False):
    """in-projection -> heads ``[N, H, L, d]`` -> ``softmax(q kᵀ/√d + mask) v`` -> merged heads
    -> out-projection, with the module's parameters under their own names. Returns
    ``(output, weights)`` as the module does (weights averaged over heads unless
    ``average_attn_weights=False``; ``None`` for ``need_weights=False``). Train-mode dropout
    draws one mask per call, as ``nn.Dropout``; ``is_causal`` without ``attn_mask`` masks the
    future (torch requires the mask)."""
    self_attention = query is key and key is value
    if not m.batch_first:  # [L, N, E] -> [N, L, E]
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if self_attention:
            key = value = query
    q, k, v = _in_projection(m, query, key, value)
    batch, heads, embed, extra = q.size(0), m.num_heads, m.embed_dim, 0
    if m.bias_k is not None:
        k = torch.cat([k, m.bias_k.expand(batch, 1, embed)], 1)
        v = torch.cat([v, m.bias_v.expand(batch, 1, embed)], 1)
        extra += 1
    q, k, v = (t.reshape(batch, -1, heads, m.head_dim).transpose(1, 2) for t in (q, k, v))
    if m.add_zero_attn:
        k = torch.cat([k, torch.zeros_like(k[:, :, :1])], 2)
        v = torch.cat([v, torch.zeros_like(v[:, :, :1])], 2)
        extra += 1
    mask = None
    if attn_mask is not None or key_padding_mask is not None:
        mask = q.tracer.create_proxy("call_function", mha_mask, (
            attn_mask, key_padding_mask, batch, heads, extra, q.dtype), {})
    out, weights = attention(q, k, v, mask, m.dropout if m.training else 0.0,
                             is_causal and attn_mask is None)
    out = F.linear(out.transpose(1, 2).reshape(batch, -1, embed), m.out_proj.weight,
                   m.out_proj.bias)
    if not m.batch_first:
        out = out.transpose(0, 1)
    if not need_weights:
        return out, None
    return out, weights.mean(1) if average_attn_weights else weights


def _transformer_encoder_layer(m: nn.TransformerEncoderLayer, src, src_mask=None,
                               src_key_padding_mask=None, is_causal=False):
    """The layer's own math without its fused fast path (post- or pre-norm)."""
    x = src
    if m.norm_first:
        x = x + m._sa_block(m.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
        return x + m._ff_block(m.norm2(x))
    x = m.norm1(x + m._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
    return m.norm2(x + m._ff_block(x))


def _transformer_encoder(m: nn.TransformerEncoder, src, mask=None, src_key_padding_mask=None,
                         is_causal=None):
    """The layers in turn, then the final norm, without the nested-tensor fast path."""
    for layer in m.layers:
        src = layer(src, src_mask=mask, src_key_padding_mask=src_key_padding_mask,
                    is_causal=bool(is_causal))
    return m.norm(src) if m.norm is not None else src


def _transformer_decoder(m: nn.TransformerDecoder, tgt, memory, tgt_mask=None,
                         memory_mask=None, tgt_key_padding_mask=None,
                         memory_key_padding_mask=None, tgt_is_causal=None,
                         memory_is_causal=False):
    """The layers in turn, then the final norm. torch's own forward guesses ``tgt_is_causal``
    by comparing ``tgt_mask`` with a causal mask (a branch on tensor values); the hint only
    picks a kernel, and the attention here always applies the mask it is given."""
    for layer in m.layers:
        tgt = layer(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                    tgt_key_padding_mask=tgt_key_padding_mask,
                    memory_key_padding_mask=memory_key_padding_mask,
                    tgt_is_causal=bool(tgt_is_causal), memory_is_causal=memory_is_causal)
    return m.norm(tgt) if m.norm is not None else tgt


def _transformer(m: nn.Transformer, src, tgt, src_mask=None, tgt_mask=None, memory_mask=None,
                 src_key_padding_mask=None, tgt_key_padding_mask=None,
                 memory_key_padding_mask=None, src_is_causal=None, tgt_is_causal=None,
                 memory_is_causal=False):
    """Encoder then decoder, as ``nn.Transformer.forward`` without its shape checks (Python
    branches on ``src.dim()`` and sizes, unknown while tracing)."""
    memory = m.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask,
                       is_causal=src_is_causal)
    return m.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                     tgt_key_padding_mask=tgt_key_padding_mask,
                     memory_key_padding_mask=memory_key_padding_mask,
                     tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)


SPECTRAL_NORM = (nn.utils.parametrizations._SpectralNorm,)


def spectral_normalized(m: nn.Module, weight, rank: int):
    """Eval-mode ``spectral_norm`` parametrization: ``W / (uᵀ W_mat v)`` with the stored
    vectors ``u``, ``v`` (buffers, read live) and ``W_mat`` the weight with axis ``dim``
    first, flattened to a matrix, as torch computes it; a 1-d weight: ``W / max(‖W‖, eps)``."""
    if rank == 1:
        return F.normalize(weight, dim=0, eps=m.eps)
    if m.dim != 0:
        weight_axes = [m.dim] + [d for d in range(rank) if d != m.dim]
        matrix = weight.permute(*weight_axes).flatten(1)
    else:
        matrix = weight.flatten(1)
    sigma = (m._u * torch.matmul(matrix, m._v)).sum()
    return weight / sigma


MODULE_LOWERINGS: dict[type, Callable] = {
    nn.BatchNorm1d: _batch_norm, nn.BatchNorm2d: _batch_norm, nn.BatchNorm3d: _batch_norm,
    nn.MultiheadAttention: _multihead_attention,
    nn.TransformerEncoderLayer: _transformer_encoder_layer,
    nn.TransformerEncoder: _transformer_encoder,
    nn.TransformerDecoder: _transformer_decoder,
    nn.Transformer: _transformer,
}


def _sum_module(m: nn.Module, *inputs):
    """BackPACK's ``SumModule``: the sum of its inputs (its forward asserts on tensor types,
    which Proxies are not)."""
    total = inputs[0]
    for other in inputs[1:]:
        total = total + other
    return total


def _permute_module(m: nn.Module, input):
    """BackPACK's ``Permute``: ``transpose`` of two axes (``init_transpose``) or ``permute``
    (its forward builds the permutation from ``input.dim()``, unknown while tracing)."""
    if m.init_transpose:
        return input.transpose(*m.dims)
    return input.permute(*m.dims)


def _instance_norm(m: nn.modules.instancenorm._InstanceNorm, x):
    """InstanceNorm without its rank checks (Python branches on ``x.dim()``) and without the
    running-stat update: statistics of ``x`` unless eval mode with running statistics."""
    use_input_stats = m.training or not m.track_running_stats
    return F.instance_norm(x, m.running_mean, m.running_var, m.weight, m.bias,
                           use_input_stats, 0.0, m.eps)


def _circular_pad(m: nn.Module, x):
    """``nn.CircularPad1d/2d/3d`` without its rank check: ``F.pad(x, padding, "circular")``."""
    return F.pad(x, m.padding, "circular")


MODULE_LOWERINGS.update({cls: _circular_pad for cls in (
    nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d)})
MODULE_LOWERINGS.update({cls: _instance_norm for cls in (
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)})


def backpack_lowerings(load: bool = False) -> dict[type, Callable]:
    """Lowerings of BackPACK's converter modules. Tracing never imports BackPACK: a model that
    holds these modules has imported them already, so they are looked up in ``sys.modules``
    (``load=True`` imports them when BackPACK is installed, for the support page)."""
    if load:
        try:
            import backpack.custom_module.branching  # noqa: F401, PLC0415
            import backpack.custom_module.permute  # noqa: F401, PLC0415
        except ImportError:
            return {}
    branching = sys.modules.get("backpack.custom_module.branching")
    permute = sys.modules.get("backpack.custom_module.permute")
    found = {}
    if branching is not None:
        found[branching.SumModule] = _sum_module
    if permute is not None:
        found[permute.Permute] = _permute_module
    return found


def _backpack_hooks() -> list[tuple[str, Callable]]:
    """The hooks ``backpack.extend`` registers, as (module hook table, function), if BackPACK is
    imported (a model extended by it must have imported it; fxcurv imports nothing here).
    Neither changes a value or a gradient: ``hook_store_io`` (forward hook) stores the module's
    inputs and output as attributes and returns None; ``hook_run_extensions`` (full backward
    hook) runs the extensions of an active ``with backpack(...)`` block, which write attributes
    of the parameters, and returns None (the gradients pass unchanged)."""
    backpack = sys.modules.get("backpack")
    found = [(table, getattr(backpack, name, None)) for table, name in (
        ("_forward_hooks", "hook_store_io"), ("_backward_hooks", "hook_run_extensions"))]
    return [(table, hook) for table, hook in found if callable(hook)]


@contextmanager
def without_backpack_hooks(*roots: Any):
    """BackPACK's own hooks (``extend(model)``, found by identity) taken off every module of
    ``roots`` for the block, then put back in their places: the model is traced (and checked
    eagerly) as the un-extended one. Any other hook stays. The hook tables are edited in place,
    so the handles BackPACK holds keep working."""
    saved = []
    hooks = _backpack_hooks()
    modules = [m for root in roots if isinstance(root, nn.Module) for m in root.modules()]
    for module in modules if hooks else ():
        for table_name, hook in hooks:
            table = getattr(module, table_name)
            keys = [key for key, value in table.items() if value is hook]
            if keys:
                saved.append((table, list(table.items())))
                for key in keys:
                    del table[key]
    try:
        yield
    finally:
        for table, items in reversed(saved):
            table.clear()
            table.update(items)


class CurvatureTracer(fx.Tracer):
    """Traces through every module, lowering the ones in ``MODULE_LOWERINGS`` and unrolling
    recurrent layers over ``sequence_length`` steps (``fxcurv/recurrent.py``); records grad
    mode per node, custom autograd Functions and backward hooks (module docstring). With an
    ``example`` batch, Python branches on sizes take the example's (``fxcurv/example.py``)."""

    def __init__(self, sequence_length: Optional[int] = None, fuse_recurrent: bool = False,
                 example: Optional[tuple] = None, custom_functions: str = "refuse"):
        super().__init__()
        self.example, self.examples = example, None
        self.custom_functions = custom_functions
        self.record_stack_traces = True
        # buffers read in forward become get_attr Proxies, so slicing one by a traced size
        # (nanoGPT's causal mask ``self.bias[:, :, :T, :T]``) is recorded, not evaluated
        self.proxy_buffer_attributes = True
        self.sequence_length = sequence_length
        self.fuse_recurrent = fuse_recurrent
        self.lowerings = {**MODULE_LOWERINGS, **backpack_lowerings()}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return False

    def call_module(self, m, forward, args, kwargs):
        if not self._in_model(m):
            return forward(*args, **kwargs)
        lowering = self.lowerings.get(type(m))
        wrapped = _wrapped_attribute(m)
        if wrapped is not None:  # a submodule compiled by torch.compile, or DataParallel
            forward = getattr(m, wrapped)
        elif isinstance(m, SPECTRAL_NORM):
            forward = _lowered_call(m, self._spectral_norm_lowering(m))
        elif isinstance(m, RECURRENT + CELLS):
            forward = _lowered_call(m, self._recurrent_lowering(m))
        elif lowering is not None:
            forward = _lowered_call(m, lowering)
        if _has_backward_hooks(m):
            forward = self._hook_markers(forward)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as err:
            if not hasattr(err, "fxcurv_module"):  # the innermost module the error came from
                err.fxcurv_module = (self.path_of_module(m), type(m))
            raise

    def _in_model(self, m: nn.Module) -> bool:
        """Whether ``m`` is a submodule of the traced model. A module object the forward calls
        from outside it (Hugging Face's kernel-hub wrappers of plain functions, such as
        ``apply_rotary_pos_emb``) is traced through as a function: its own tensors, if any,
        are constants, as they are not the model's parameters."""
        try:
            self.path_of_module(m)
        except NameError:
            return False
        return True

    def _spectral_norm_lowering(self, m: nn.Module) -> Callable:
        """``W / σ`` with ``σ = uᵀ W_mat v`` from the stored power-iteration vectors (eval
        mode); the rank of ``W``, which the lowering needs, is read off the parametrized
        tensor (``...parametrizations.<name>.original``)."""
        path = self.path_of_module(m)
        if m.training:
            raise CompileError(
                f"module {path[len(MODEL) + 1:]} (spectral_norm) is in train mode: its forward updates the "
                "power-iteration vectors u, v in place, and the compiled step never mutates "
                "the model. Put the parametrization in eval mode (model.<layer>."
                "parametrizations.weight.eval()) so the step uses the stored u, v, and update "
                "them outside the step (a train-mode forward under torch.no_grad()).")
        stored = self.root.get_submodule(path.rsplit(".", 1)[0])._parameters["original"]
        with torch._C.DisableTorchFunction():  # the tensor itself, not its Proxy
            rank = stored.dim()
        return lambda mod, weight: spectral_normalized(mod, weight, rank)

    def _recurrent_lowering(self, m: nn.Module) -> Callable:
        """The lowering of a recurrent layer or cell, which names it by its path in the model."""
        path = self.path_of_module(m)
        path = path[len(MODEL) + 1:] if path.startswith(MODEL + ".") else path
        if isinstance(m, CELLS):
            return lambda mod, *a, **k: lower_cell(mod, path, *a, **k)
        return lambda mod, *a, **k: lower_recurrent(mod, path, self.sequence_length,
                                                    self.fuse_recurrent, *a, **k)

    def _hook_markers(self, forward: Callable) -> Callable:
        """``forward`` with every Proxy going in or out passed through an opaque
        ``BackwardHooked`` node (the module has a backward hook)."""
        def mark(value: Any) -> Any:
            if not isinstance(value, fx.Proxy):
                return value
            return self.create_proxy("call_function", autograd_function_call(BackwardHooked),
                                     (value,), {}, name="backward_hook")

        def call(*args, **kwargs):
            args, kwargs = pytree.tree_map(mark, (args, kwargs))
            return pytree.tree_map(mark, forward(*args, **kwargs))
        return call

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        _axis_as_dim(node)
        node.meta["grad_enabled"] = torch.is_grad_enabled()
        if self.examples is not None:
            self.examples.record(node)
        return node

    def to_bool(self, obj: fx.Proxy) -> bool:
        decided = None if self.examples is None else self.examples.decide(obj.node)
        return super().to_bool(obj) if decided is None else decided

    def iter(self, obj: fx.Proxy):
        """``*x.shape[:-1]`` or ``for size in x.shape``: one item per entry of the example's
        value (its length fixed by the example, as a branch is)."""
        count = None if self.examples is None else self.examples.decide(obj.node, len)
        return super().iter(obj) if count is None else iter([obj[i] for i in range(count)])

    def trace(self, root, concrete_args=None) -> fx.Graph:
        if self.example is not None:
            self.examples = ExampleValues(self.example, root)
        numbers = self.examples.python_numbers() if self.examples else nullcontext()
        helpers = _helpers_traced_through() if self.examples else nullcontext()
        with torch.enable_grad(), without_backpack_hooks(root), _ParameterProxies(self, root), \
                _opaque_functions(self), _factories_of_traced_sizes(self), _item_assignment(self), \
                _weighted_l1_loss(), _packed_sequences(root), replaced_helpers(), \
                module_state_kept(root), \
                _attributes_keep_grad_mode(), numbers, helpers:
            graph = super().trace(root, concrete_args)
        _merge_attributes(graph)
        _detach_no_grad_regions(graph)
        return graph


@contextmanager
def _attributes_keep_grad_mode():
    """fx adds an attribute's node (``h.T``) when the attribute is first *used*, not when it
    is read: ``h = x.T`` read with grad mode on and first used inside ``torch.no_grad()``
    would be taken for a value of the no-grad region (and detached where read outside it).
    While tracing, the node gets the grad mode of the read."""
    attribute = fx.proxy.Attribute
    init, node = attribute.__init__, attribute.node

    def read(self, root, attr):
        init(self, root, attr)
        self.fxcurv_grad_enabled = torch.is_grad_enabled()

    def materialize(self):
        with torch.set_grad_enabled(getattr(self, "fxcurv_grad_enabled", True)):
            return node.fget(self)

    attribute.__init__, attribute.node = read, property(materialize)
    try:
        yield
    finally:
        attribute.__init__, attribute.node = init, node


_MODULE_TABLES = ("_parameters", "_buffers", "_modules")  # (restored by name, below)


@contextmanager
def module_state_kept(root: Any, warn: bool = True):
    """Tracing runs the forward once, on Proxies: whatever it assigns to modules (a counter,
    a cached activation, a reassigned buffer such as an EMA ``self.ema = 0.9 * self.ema + ...``)
    is undone afterwards, so compiling leaves the model as it was; so is what it puts into a
    dict or list attribute (timm's EfficientFormer caches its attention biases in a dict in
    eval mode: a Proxy left there would be read by the next trace). A reassigned buffer gets a
    warning (``warn``): the step computes with the new value within a call but never stores
    it. The first-call check's eager run is wrapped too (no warning)."""
    modules = list(root.modules()) if isinstance(root, nn.Module) else []
    saved = {m: (dict(m.__dict__), dict(m._parameters), dict(m._buffers), dict(m._modules))
             for m in modules}
    contents = [(value, copy.copy(value)) for m in modules for name, value in m.__dict__.items()
                if type(value) in (dict, list) and name not in _MODULE_TABLES]
    try:
        yield
    finally:
        replaced = []
        for module, (attributes, params, buffers, children) in saved.items():
            replaced += [(module, name) for name, value in module._buffers.items()
                         if buffers.get(name) is not value]
            for now, before in ((module._parameters, params), (module._buffers, buffers),
                                (module._modules, children)):
                now.clear()
                now.update(before)
            added = {name: value for name, value in module.__dict__.items()
                     if name not in attributes and isinstance(value, Tensor)}
            module.__dict__.clear()
            module.__dict__.update(attributes, **added)  # fx's own constants (_tensor_constant0)
        for container, before in contents:
            container.clear()
            container.update(before) if isinstance(container, dict) else \
                container.extend(before)
        if replaced and warn:
            _warn_buffer_updates(root, replaced)


def _warn_buffer_updates(root: nn.Module, replaced: list) -> None:
    """One warning naming the model's reassigned buffers (``block.ema``)."""
    model = root.model if isinstance(root, _ModelAndLoss) else root
    names = {m: f"{n}." if n else "" for n, m in model.named_modules()}
    listed = ", ".join(f"`{names[m]}{name}`" for m, name in replaced if m in names)
    if listed:
        warnings.warn(f"fxcurv: the forward reassigns the buffer(s) {listed}"
                      "; the compiled step uses the new value within each call but does not "
                      "store it (the step never mutates the model, as for BatchNorm's running "
                      "statistics). Update them outside the step if you need them.", stacklevel=7)


@contextmanager
def _weighted_l1_loss():
    """While tracing, ``F.l1_loss`` is :func:`~fxcurv.rules.losses.l1_loss_keeping_weight`:
    PyTorch's dispatch for traced values drops the ``weight`` argument of ``l1_loss`` (torch
    2.14), which would leave an unweighted loss in the graph."""
    original = F.l1_loss
    F.l1_loss = l1_loss_keeping_weight
    try:
        yield
    finally:
        F.l1_loss = original


class BackwardHooked(torch.autograd.Function):
    """Marks a value passed into or out of a module with a backward hook (identity forward;
    eager autograd would run the hook in backward, which the explicit step cannot)."""

    backward_hook = True  # read by passes/invariant.py

    @staticmethod
    def forward(ctx, x):  # noqa: D102
        return x

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        return g


def _has_backward_hooks(m: nn.Module) -> bool:
    """True if a backward hook (module or global) would change gradients through ``m``."""
    hooks = nn.modules.module
    return bool(m._backward_hooks or m._backward_pre_hooks or hooks._global_backward_hooks
                or hooks._global_backward_pre_hooks)


def _lowered_call(m: nn.Module, lowering: Callable) -> Callable:
    """Call ``m`` with ``lowering`` as its forward, through ``nn.Module.__call__`` so the
    module's forward hooks and pre-hooks run as they do in eager PyTorch."""
    def call(*args, **kwargs):
        m.__dict__["forward"] = lambda *a, **k: lowering(m, *a, **k)
        try:
            return fx._symbolic_trace._orig_module_call(m, *args, **kwargs)
        finally:
            del m.__dict__["forward"]
    return call


# torch factories whose argument parser rejects a Proxy among plain sizes or data
# (``torch.ones(x.shape[0], T)``, ``torch.tensor(q.size(-1), dtype=torch.float)``)
FACTORIES = ("ones", "zeros", "empty", "full", "rand", "randn", "tensor", "as_tensor",
             "scalar_tensor")


@contextmanager
def _factories_of_traced_sizes(tracer: fx.Tracer):
    """While tracing, a torch factory called with traced values among its arguments (OPT's
    ``torch.ones(inputs_embeds.shape[0], seq_length)``, DeBERTa's ``torch.tensor(size,
    dtype=...)``) records one call of the factory; torch's own argument parser would reject
    the Proxies. Their rules say what they are (new memory, a draw, or no derivative)."""
    def recorded(factory: Callable) -> Callable:
        def call(*args, **kwargs):
            if _has_proxy((args, kwargs)):
                return tracer.create_proxy("call_function", factory, args, kwargs)
            return factory(*args, **kwargs)
        return call
    with mock.patch.multiple(torch, **{name: recorded(getattr(torch, name))
                                       for name in FACTORIES}):
        yield


@contextmanager
def _helpers_traced_through():
    """While tracing with an example: the plain Python helpers a library registered with
    ``torch.fx.wrap`` (torchvision's ``shifted_window_attention_3d``, MViT's ``_unsqueeze``,
    which iterate over sizes and branch on ranks) are traced through, their branches decided
    on the example like the model's own; a wrapped function with a rule
    (``stochastic_depth``, Swin's ``shifted_window_attention``) or from torch stays one
    node. Without an example such a helper stays one node and ``passes/expand.py`` tries to
    inline it."""
    from torch.fx import _symbolic_trace  # noqa: PLC0415 (fx's private table of wraps)

    def kept(key: tuple, table: dict) -> bool:
        fn = table.get(key[1])
        module = (getattr(fn, "__module__", "") or "").split(".")[0]
        return not inspect.isfunction(fn) or module == "torch" or fn in RULES
    wrapped = {key: table for key, table in _symbolic_trace._wrapped_fns_to_patch.items()
               if kept(key, table)}
    with mock.patch.object(_symbolic_trace, "_wrapped_fns_to_patch", wrapped):
        yield


@contextmanager
def _item_assignment(tracer: fx.Tracer):
    """While tracing, ``x[index] = value`` on a traced ``x`` (ConViT's relative indices, a
    table or mask filled in forward) records an in-place ``operator.setitem`` call, which
    ``passes/normalize.py`` makes out of place (``rules.shape.assigned``) after the aliasing
    checks of any in-place op."""
    def setitem(proxy: fx.Proxy, index: Any, value: Any) -> None:
        tracer.create_proxy("call_function", operator.setitem, (proxy, index, value), {})
    with mock.patch.object(fx.Proxy, "__setitem__", setitem, create=True):
        yield


@contextmanager
def _opaque_functions(tracer: fx.Tracer):
    """While tracing, ``SomeFunction.apply(proxy)`` records one opaque call instead of tracing
    through ``forward`` (which would ignore the custom ``backward``). ``apply`` is torch's C
    function (often bound early: ``op = SomeFunction.apply``); it looks up ``forward`` on the
    class, so that lookup is where the call is caught."""
    meta = type(torch.autograd.Function)

    def getattribute(cls, name):
        value = type.__getattribute__(cls, name)
        if name == "forward" and cls.__module__ != "torch.autograd.function":
            return _opaque_forward(tracer, cls, value)
        return value

    meta.__getattribute__ = getattribute
    try:
        yield
    finally:
        del meta.__getattribute__


def _has_proxy(values: Any) -> bool:
    return any(isinstance(v, fx.Proxy) for v in pytree.tree_leaves(values))


def _opaque_forward(tracer: fx.Tracer, cls: type, forward: Callable) -> Callable:
    """``cls.forward`` that, given Proxies, returns one opaque node calling ``cls.apply``."""
    takes_ctx = not torch.autograd.function._is_setup_context_defined(
        type.__getattribute__(cls, "setup_context"))

    def opaque(*args, **kwargs):
        if not _has_proxy((args, kwargs)):
            return forward(*args, **kwargs)
        inputs = args[1:] if takes_ctx else args
        if cls is CheckpointFunction and _from_parameters(tracer, inputs[2:]):
            with torch.enable_grad():  # (apply runs forward under no_grad)
                return inputs[0](*inputs[2:])
        if tracer.custom_functions == "forward":  # its backward taken to be the derivative
            with torch.enable_grad():
                return forward(_TracedContext(len(inputs)), *inputs, **kwargs) if takes_ctx \
                    else forward(*inputs, **kwargs)
        proxy = tracer.create_proxy("call_function", autograd_function_call(cls), inputs,
                                    kwargs, name=f"{cls.__name__}_apply")
        proxy.node.meta["grad_enabled"] = True  # apply runs forward under no_grad
        return proxy
    return opaque


@contextmanager
def _packed_sequences(root: Any):
    """While tracing, ``pack_padded_sequence`` and ``pad_packed_sequence`` are
    ``fxcurv.recurrent``'s :func:`~fxcurv.recurrent.pack_padded` and
    :func:`~fxcurv.recurrent.pad_packed` (a padded batch and its lengths): in
    ``torch.nn.utils.rnn`` and wherever a module of the model imported them by name."""
    rnn = torch.nn.utils.rnn
    lowered = {rnn.pack_padded_sequence: pack_padded, rnn.pad_packed_sequence: pad_packed}
    functions = [type(m).forward for m in root.modules()] if isinstance(root, nn.Module) \
        else [root]
    namespaces = [rnn.__dict__] + [getattr(f, "__globals__", {}) for f in functions]
    with contextlib.ExitStack() as stack:
        for namespace in {id(n): n for n in namespaces}.values():
            patches = {name: lowered[value] for name, value in list(namespace.items())
                       if inspect.isfunction(value) and value in lowered}
            if patches:
                stack.enter_context(mock.patch.dict(namespace, patches))
        yield


def _axis_as_dim(node: fx.Node) -> None:
    """``torch.cat(xs, axis=1)``, ``x.sum(axis=-1)``: NumPy's keyword, which torch accepts
    for ``dim`` (Funnel Transformer), recorded as ``dim`` where the op's rule names it so."""
    rule = rule_for(node)
    if rule is not None and "axis" in node.kwargs and "dim" not in node.kwargs and \
            "dim" in rule.signature.parameters and "axis" not in rule.signature.parameters:
        node.kwargs = {("dim" if key == "axis" else key): value
                       for key, value in node.kwargs.items()}


class _TracedContext:
    """The ``ctx`` of a custom Function's forward traced as plain ops
    (``compile(..., custom_functions="forward")``): what it saves or marks for its own backward
    is dropped, as fxcurv derives the backward from the forward."""

    def __init__(self, inputs: int):
        self.needs_input_grad = (True,) * inputs

    def _dropped(self, *args: Any) -> None:
        pass

    save_for_backward = save_for_forward = mark_dirty = mark_non_differentiable = \
        set_materialize_grads = _dropped


def _from_parameters(tracer: fx.Tracer, values: Any) -> bool:
    """Whether a Proxy in ``values`` is computed from a trainable parameter of the traced
    root: a reentrant ``torch.utils.checkpoint`` call on such a value has the derivative of
    the function it checkpoints (its backward recomputes the forward), and is traced through.
    On data alone eager gives the checkpointed parameters no gradient (PyTorch warns), and
    the call stays opaque, which does the same."""
    nodes = [v.node for v in pytree.tree_leaves(values) if isinstance(v, fx.Proxy)]
    trainable = {name for name, p in tracer.root.named_parameters() if p.requires_grad}
    return bool(nodes) and any(n.op == "get_attr" and n.target in trainable
                               for n in ancestors(*nodes))


def autograd_function_call(cls: type) -> Callable:
    """A plain function calling ``cls.apply`` (fx's generated code can name it), tagged with
    the class in ``autograd_function`` for the invariant check's message."""
    def call(*args, **kwargs):
        return cls.apply(*args, **kwargs)
    call.__name__ = call.__qualname__ = f"{cls.__name__}_apply"
    call.autograd_function = cls
    return call


def _detach_no_grad_regions(graph: fx.Graph) -> None:
    """A value computed with grad mode off (``torch.no_grad()``, ``set_grad_enabled(False)``,
    ``inference_mode``) has no derivative: its readers traced with grad mode on read it
    through ``torch.detach``. A piece picked from a tuple such a region computed counts as
    part of the region."""
    for node in list(graph.nodes):
        if node.meta.get("grad_enabled", True) or node.op not in ("call_function",
                                                                   "call_method"):
            continue
        for user in list(node.users):
            if user.target is operator.getitem:
                user.meta["grad_enabled"] = False
        outside = [u for u in node.users if u.meta.get("grad_enabled", True)]
        rule = rule_for(node)
        if not outside or is_scalar_node(node) or (rule is not None and rule.is_constant(node)):
            continue
        with graph.inserting_after(node):
            detached = graph.call_function(torch.detach, (node,))
        detached.meta = {**node.meta, "grad_enabled": True}
        detached._rename(f"{node.name}_no_grad")
        for user in outside:
            user.replace_input_with(node, detached)


class _ParameterProxies(TorchFunctionMode):
    """While tracing: an op on a plain ``nn.Parameter`` of the root (fx only proxies those
    read as module attributes) gets the parameter's ``get_attr`` node instead."""

    def __init__(self, tracer: fx.Tracer, root: nn.Module):
        super().__init__()
        self.tracer, self.proxies = tracer, {}
        named = root.named_parameters() if isinstance(root, nn.Module) else ()
        self.names = {id(p): name for name, p in named}

    def _proxy(self, value: Any) -> Any:
        if not isinstance(value, nn.Parameter) or id(value) not in self.names:
            return value
        name = self.names[id(value)]
        if name not in self.proxies:
            self.proxies[name] = self.tracer.create_proxy("get_attr", name, (), {})
        return self.proxies[name]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        new_args, new_kwargs = pytree.tree_map(self._proxy, (args, kwargs))
        if getattr(func, "__name__", "") == "__get__" or all(
                a is b for a, b in zip(pytree.tree_leaves((args, kwargs)),
                                       pytree.tree_leaves((new_args, new_kwargs)))):
            return func(*args, **kwargs)        # no parameter, or a property (p.shape)
        if is_tensor_method_or_property(func):  # p ** 2, p.sum(): the Proxy's method
            return getattr(new_args[0], func.__name__)(*new_args[1:], **new_kwargs)
        return func(*new_args, **new_kwargs)


def _merge_attributes(graph: fx.Graph) -> None:
    """One ``get_attr`` node per target (a parameter may be fetched twice)."""
    first: dict[str, fx.Node] = {}
    for node in list(graph.nodes):
        if node.op != "get_attr":
            continue
        if node.target in first:
            node.replace_all_uses_with(first[node.target])
            graph.erase_node(node)
        else:
            first[node.target] = node


def _wrapped_attribute(m: nn.Module) -> Optional[str]:
    """The attribute under which a wrapper module holds the module it runs: ``_orig_mod`` of
    ``torch.compile``'s ``OptimizedModule``, ``module`` of ``nn.DataParallel``; None for any
    other module. ``DistributedDataParallel`` raises: its gradients are all-reduced by hooks
    of autograd, which a step does not run."""
    if isinstance(m, nn.parallel.DistributedDataParallel):
        raise CompileError(
            "the model is wrapped in DistributedDataParallel, whose gradient all-reduce runs in "
            "autograd hooks that a compiled step does not call. Compile the module it wraps "
            "(ddp_model.module) with process_group=... (docs/data_parallel.md): the step then "
            "all-reduces gradients and curvature itself.")
    if isinstance(m, nn.DataParallel):
        return "module"
    if type(m).__name__ == "OptimizedModule" and isinstance(
            getattr(m, "_orig_mod", None), nn.Module):
        return "_orig_mod"
    return None


class Unwrapped(nn.Module):
    """The module a wrapper runs (:func:`_wrapped_attribute`), held under the wrapper's
    attribute, so that parameter names are the wrapper's (``_orig_mod.fc.weight``,
    ``module.fc.weight``): the step traces it in plain eager PyTorch (``torch.compile``'s
    dynamo cannot be traced by fx; ``nn.DataParallel`` only splits the batch over GPUs, which
    the one-device step does not). The first-call check runs it eagerly too."""

    def __init__(self, attribute: str, inner: nn.Module, training: bool):
        super().__init__()
        self.attribute = attribute
        self.add_module(attribute, inner)
        self.training = training

    def forward(self, *args, **kwargs):
        return getattr(self, self.attribute)(*args, **kwargs)


def unwrapped(model: nn.Module) -> nn.Module:
    """``model``, or :class:`Unwrapped` of it where it is a wrapper (inner wrappers too:
    ``torch.compile(nn.DataParallel(m))`` names ``_orig_mod.module.fc.weight``)."""
    attribute = _wrapped_attribute(model)
    if attribute is None:
        return model
    return Unwrapped(attribute, unwrapped(getattr(model, attribute)), model.training)


class _ModelAndLoss(nn.Module):
    """``(x, y) -> (loss_fn(model(x), y), model(x))``: the function that gets traced."""

    def __init__(self, model: nn.Module, loss_fn: Callable):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, x, y):
        output = self.model(x)
        return self.loss_fn(output, y), output


@dataclass
class Traced:
    """The traced forward graph and what the passes need to know about it."""

    graph: fx.Graph
    attrs: dict[str, Any]          # get_attr target -> tensor (shared with the model)
    params: dict[str, fx.Node]     # trainable parameter name -> its get_attr node
    inputs: tuple[fx.Node, fx.Node]
    model_output: fx.Node
    loss: fx.Node
    memo: dict = field(default_factory=dict)  # values passes share (e.g. the loss Hessian)
    structured: bool = False  # x or y is a tuple/list/dict of tensors (fxcurv/inputs.py)
    # shapes past axis 0 of the example's tensors, where the trace took a branch on sizes
    example_shapes: Optional[list] = None

    def refresh(self) -> None:
        """Re-read the loss and model-output nodes after a pass replaced them (the loss is what
        the graph returns; a fused ``log_softmax`` output is replaced by its logits)."""
        self.loss = next(n for n in self.graph.nodes if n.op == "output").args[0]
        if self.model_output.graph is not self.graph or self.model_output not in set(
                self.graph.nodes):
            self.model_output = self.loss.args[0]


def trace(model: nn.Module, loss_fn: Callable, sequence_length: Optional[int] = None,
          fuse_recurrent: bool = False, example: Optional[tuple] = None,
          custom_functions: str = "refuse") -> Traced:
    """Trace ``loss_fn(model(x), y)`` into one graph; parameter nodes named like the model's;
    recurrent layers unrolled over ``sequence_length`` steps (with ``fuse_recurrent``, for a
    gradient-only step, an LSTM layer is one node per direction); Python branches on sizes
    decided on ``example`` (``fxcurv/example.py``; ``Traced.example_shapes`` then holds the
    shapes past axis 0 the step must be called with)."""
    if not isinstance(model, nn.Module):
        raise CompileError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if not callable(loss_fn):
        raise CompileError("loss_fn must be a torch loss module or a callable "
                           f"(output, target) -> scalar, got {type(loss_fn).__name__}.")
    root = _ModelAndLoss(model, loss_fn)
    tracer = CurvatureTracer(sequence_length, fuse_recurrent, example, custom_functions)
    try:
        graph = tracer.trace(root)
    except CompileError:
        raise
    except Exception as err:  # noqa: BLE001 - re-raised with context
        raise _trace_error(err) from err
    if tracer.examples is not None:
        guard_sample_branches(graph, tracer.examples.sample_branches)
    x, y = [n for n in graph.nodes if n.op == "placeholder"]
    parts = [structured(graph, x), structured(graph, y)]
    loss, output = _split_output(graph, x)
    attrs = _rename_attributes(graph, root)
    params = _parameter_nodes(graph, model, attrs)
    decided = tracer.examples is not None and tracer.examples.decisions > 0
    return Traced(graph, attrs, params, (x, y), output, loss, structured=any(parts),
                  example_shapes=example_shapes(example) if decided else None)


def _parameter_nodes(graph: fx.Graph, model: nn.Module, attrs: dict) -> dict[str, fx.Node]:
    """Trainable parameter name -> get_attr node, in ``named_parameters()`` order; parameters
    the forward never reads get a node too (their gradient is zero)."""
    found = {n.target: n for n in graph.nodes if n.op == "get_attr"}
    params = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        target = step_target(name)
        if target not in found:
            with graph.inserting_before(next(n for n in graph.nodes if n.op != "placeholder")):
                found[target] = graph.get_attr(target)
            found[target]._rename(_readable(model, name))
            attrs[target] = param
        params[name] = found[target]
    return params


def step_target(name: str) -> str:
    """Where the step holds the model's attribute ``name``: at the same path, unless its first
    component is an attribute of every GraphModule (a submodule ``meta``, ``graph`` or
    ``code`` would replace the step's own): then under ``model.``."""
    if hasattr(fx.GraphModule, name.split(".")[0]) or name.split(".")[0] == "meta":
        return f"{MODEL}.{name}"
    return name


def _split_output(graph: fx.Graph, x: fx.Node) -> tuple[fx.Node, fx.Node]:
    """Make the graph return the loss alone; give back the loss and the model-output node
    (several outputs joined into one, :func:`fxcurv.inputs.join_outputs`)."""
    out_node = next(n for n in graph.nodes if n.op == "output")
    loss, output = out_node.args[0]
    if not isinstance(loss, fx.Node):
        raise CompileError(f"loss_fn must return a single tensor, got {loss!r}.")
    out_node.args = (loss,)
    output = join_outputs(graph, output, sample_carriers(graph, x), sample_data(graph, x))
    loss._rename("loss")
    return loss, output


def _rename_attributes(graph: fx.Graph, root: nn.Module) -> dict[str, Any]:
    """``model.fc1.weight`` -> ``fc1.weight`` (the model's own parameter name; see
    :func:`step_target`)."""
    attrs: dict[str, Any] = {}
    prefix = MODEL + "."
    for node in graph.nodes:
        if node.op != "get_attr":
            continue
        value = _fetch(root, node.target)
        if node.target.startswith(prefix):
            name = node.target[len(prefix):]
            node.target = step_target(name)
            node._rename(_readable(root.model, name))
        attrs[node.target] = value
    return attrs


def _readable(model: nn.Module, target: str) -> str:
    """``fc1.weight`` -> ``fc1_weight``; in a Sequential ``0.weight`` -> ``linear0_weight``."""
    name = target.replace(".", "_")
    if name[0].isdigit():
        first = getattr(model, target.split(".")[0])
        name = type(first).__name__.lower() + name
    return name


def _fetch(module: nn.Module, target: str) -> Any:
    for atom in target.split("."):
        module = getattr(module, atom)
    return module


def _trace_error(err: Exception) -> CompileError:
    """Explain an fx tracing failure: where in the user's code (module and source line), why,
    and what to change."""
    where = user_frame(traceback.extract_tb(err.__traceback__))
    module = getattr(err, "fxcurv_module", None)
    place = ", ".join(([f"module {format_module(*module)}"] if module else [])
                      + ([where] if where else []))
    hint = ("fx traces the forward symbolically, so Python control flow on tensor values "
            "(if/while on a tensor, data-dependent shapes, int() of a size, unpacking a shape) "
            "cannot be traced. If it branches on sizes (x.shape[-1] < k, a padding amount, "
            "int(n ** .5)) or unpacks them ((*x.shape[:-1], -1, d), Hugging Face's "
            "attention), pass an example batch: "
            "fxcurv.compile(..., example=(x, y)). Otherwise make the branch depend on "
            "constructor arguments, use torch.where, or move it out of forward.")
    if not isinstance(err, fx.proxy.TraceError) and "not 'Proxy'" not in str(err) and \
            "'len' is not supported" not in str(err):
        hint = "Check that model(x) and loss_fn(output, y) run on ordinary tensors."
    if any(f.filename.endswith(os.path.join("nn", "utils", "rnn.py"))
           for f in traceback.extract_tb(err.__traceback__)):
        hint = ("Packed sequences (torch.nn.utils.rnn.pack_*, a PackedSequence input of a "
                "recurrent layer) are not supported: pad the sequences to one length instead.")
    place = f" ({place})" if place else ""
    return CompileError(f"torch.fx could not trace the model and loss{place}: "
                        f"{type(err).__name__}: {err}. {hint}")
