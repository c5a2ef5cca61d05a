"""Structured inputs, targets and model outputs: tuples, lists and dicts of tensors.

``step(x, y)`` takes ``x`` and ``y`` as the model and the loss take them. Where the traced
graph reads the input placeholder only by constant keys (``x["ids"]``, ``x[0]``, or
``ids, mask = x``, which fx traces as ``x[0]``, ``x[1]``), ``x`` is a *structure* of tensors,
each with the samples along axis 0: those reads become :func:`input_part` nodes, whose rule
keeps the sample axis, so every part is model data like a plain ``x``. The same holds for the
target ``y`` (``loss_fn(out, (labels, boxes))``). A plain tensor ``x`` read by ``x[0]`` is not
sample 0 but an error when the step runs (:func:`input_part` refuses a tensor), never a
silently different model.

A model that returns several tensors (a tuple, a dict, torchvision's ``GoogLeNetOutputs``)
gets them joined at the boundary between model and loss: each output that carries the
samples and that the loss reads is flattened to ``[N, K_i]``, the pieces concatenated to one
``[N, ΣK_i]`` model output (the value the curvature passes factor the loss at) and split back
to the original shapes for the loss (:func:`join_outputs`). Outputs without the sample axis
stay as they are.

Checks when the step runs (:func:`check_structured_inputs`): every leaf of ``x`` and ``y`` is
a tensor, every floating leaf of ``x`` has the parameters' dtype, every leaf of ``x`` and
every non-scalar leaf of ``y`` has the same number of samples along axis 0. TorchScript
cannot script a step with structured inputs (its code takes ``x: Tensor``); ``torch.export``
handles them.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor
from torch.utils import _pytree as pytree

from .errors import CompileError
from .passes.analysis import ancestors
from .rules import rule_for
from .rules.indexing import input_part


def structured(graph: fx.Graph, placeholder: fx.Node) -> bool:
    """Rewrite constant-key reads of ``placeholder`` (and, recursively, of its parts) into
    :func:`input_part` nodes where they are its only uses; True if any was rewritten."""
    if not _read_by_keys(placeholder):
        return False
    pending = [placeholder]
    while pending:
        whole = pending.pop()
        for user in list(whole.users):
            with graph.inserting_before(user):
                part = graph.call_function(input_part, (whole, user.args[1]))
            user.replace_all_uses_with(part)
            key = str(user.args[1])
            part._rename(f"{whole.name}_{key}" if key.isidentifier() or key.isdigit()
                         else user.name)
            graph.erase_node(user)
            if _read_by_keys(part):
                pending.append(part)
    return True


def _read_by_keys(node: fx.Node) -> bool:
    """Every use of ``node`` is ``node[k]`` for a constant int or str ``k``."""
    return bool(node.users) and all(
        user.op == "call_function" and user.target is operator.getitem
        and len(user.args) == 2 and isinstance(user.args[1], (int, str))
        and not isinstance(user.args[1], bool) and user.args[0] is node
        for user in node.users)


def _tensor_leaves(value: Any, what: str) -> list[Tensor]:
    """The leaves of ``value`` (a tensor or a tuple/list/dict of them), all tensors."""
    leaves = pytree.tree_leaves(value)
    for leaf in leaves:
        if not isinstance(leaf, Tensor):
            raise ValueError(f"fxcurv: every part of {what} must be a tensor, got "
                             f"{type(leaf).__name__} in {type(value).__name__}")
    if not leaves:
        raise ValueError(f"fxcurv: {what} holds no tensor")
    return leaves


def check_structured_inputs(x: Any, y: Any, dtype: torch.dtype) -> Any:
    """Call-time check of a structured ``x`` or ``y``: tensors throughout, floating parts of
    ``x`` in the parameters' dtype, one row per sample along axis 0 in each part (targets:
    each non-scalar part)."""
    inputs, targets = _tensor_leaves(x, "the input x"), _tensor_leaves(y, "the target y")
    samples = None
    for leaf in inputs:
        if leaf.is_floating_point() and leaf.dtype != dtype:
            raise ValueError(f"fxcurv: a part of the input x has dtype {leaf.dtype} but the "
                             f"model's parameters are {dtype}; convert it with .to({dtype})")
        if leaf.dim() == 0:
            raise ValueError("fxcurv: every part of the input x needs the batch axis 0, got "
                             "a scalar")
        samples = leaf.size(0) if samples is None else samples
        if leaf.size(0) != samples:
            raise ValueError(f"fxcurv: the parts of the input x disagree on the number of "
                             f"samples along axis 0 ({samples} and {leaf.size(0)})")
    for leaf in targets:
        if leaf.dim() > 0 and leaf.size(0) != samples:
            raise ValueError(f"fxcurv: a part of the target y has {leaf.size(0)} samples "
                             f"along axis 0 but the input x has {samples}")
    return x


def samples_of(x: Any) -> int:
    """The number of samples of a structured input: axis 0 of its first tensor."""
    return pytree.tree_leaves(x)[0].size(0)


def join_outputs(graph: fx.Graph, output: Any, carriers: set, data: set) -> fx.Node:
    """The one node the loss is applied to (see the module docstring): ``output`` itself when
    it is a node, else the concatenation of its sample-carrying leaves (``carriers``) the loss
    reads, except values without a derivative (``out.argmax(1)``: integers, read as they
    are); where none carries the samples (BatchNorm in train mode mixes them), of those that
    depend on the input (``data``: per-sample quantities are refused there anyway)."""
    output = _fields(output)
    if isinstance(output, fx.Node):
        return output
    leaves = [leaf for leaf in pytree.tree_leaves(output) if isinstance(leaf, fx.Node)]
    model = ancestors(*leaves)
    read = {leaf: [u for u in leaf.users if u not in model and u.op != "output"]
            for leaf in leaves}
    differentiable = [leaf for leaf in dict.fromkeys(leaves) if read[leaf] and
                      not (rule_for(leaf) is not None and rule_for(leaf).is_constant(leaf))]
    joined = [leaf for leaf in differentiable if leaf in carriers] or \
        [leaf for leaf in differentiable if leaf in data]
    if not joined:
        raise CompileError(f"the loss reads no output of the model's forward that depends on "
                           f"the input; the forward returned {output!r}.")
    if len(joined) == 1:
        return joined[0]
    last = max(model, key={node: i for i, node in enumerate(graph.nodes)}.__getitem__)
    with graph.inserting_before(last.next):
        whole = _concatenate(graph, joined)
        widths = [graph.call_method("size", (flat, 1)) for flat in whole.args[0]]
        pieces = graph.call_function(torch.split, (whole, widths, 1))
        for i, leaf in enumerate(joined):
            shape = graph.call_function(getattr, (leaf, "shape"))
            piece = graph.call_function(operator.getitem, (pieces, i))
            part = graph.call_method("reshape", (piece, shape))
            users = set(read[leaf])
            leaf.replace_all_uses_with(part, delete_user_cb=users.__contains__)
    return whole


def _concatenate(graph: fx.Graph, leaves: list) -> fx.Node:
    """``torch.cat([leaf.reshape(leaf.size(0), -1) for leaf in leaves], 1)``."""
    flats = []
    for leaf in leaves:
        rows = graph.call_method("size", (leaf, 0))
        flats.append(graph.call_method("reshape", (leaf, rows, -1)))
    whole = graph.call_function(torch.cat, (flats, 1))
    whole._rename("model_outputs")
    return whole



def _fields(output: Any) -> Any:
    """A named tuple the forward built (torchvision's ``GoogLeNetOutputs``; fx records its
    construction as a call) as a plain tuple of its fields: the reads ``out.logits`` and
    ``out[0]`` become the field's node. The same for a dataclass (a call where it is
    registered with pytree, else a Python object around the traced values: Hugging Face's
    ``ModelOutput``); fields left out hold their default (None here: not an output)."""
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return tuple(getattr(output, f.name) for f in dataclasses.fields(output))
    if not (isinstance(output, fx.Node) and output.op == "call_function"
            and isinstance(output.target, type)):
        return output
    if issubclass(output.target, tuple) and hasattr(output.target, "_fields"):
        fields = output.target._fields
    elif dataclasses.is_dataclass(output.target):
        fields = tuple(f.name for f in dataclasses.fields(output.target))
    else:
        return output
    values = {f: None for f in fields}
    values.update(zip(fields, output.args), **output.kwargs)
    for user in list(output.users):
        key = user.args[1] if len(user.args) == 2 else None
        if user.op == "call_function" and user.target is getattr and key in values:
            user.replace_all_uses_with(values[key])
        elif user.op == "call_function" and user.target is operator.getitem and \
                isinstance(key, int) and -len(fields) <= key < len(fields):
            user.replace_all_uses_with(values[fields[key]])
        else:
            raise CompileError(f"the loss reads the model's {output.target.__name__} output "
                               f"by {user.format_node()}; read its fields by name or index.")
        user.graph.erase_node(user)
    output.graph.erase_node(output)
    return tuple(values[name] for name in fields)
