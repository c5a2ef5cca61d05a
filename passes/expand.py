"""Expansion of ops without a rule into ops with one, before anything is differentiated.

Run first by :func:`fxcurv.passes.normalize.normalize`. For every ``call_function`` /
``call_method`` node the rule table does not know:

* **opaque helpers**: a plain Python function that fx kept as one node (``torch.fx.wrap``,
  as torchvision does for ``stochastic_depth`` and Swin's ``_patch_merging_pad``) is called
  again on the node's arguments as Proxies, so its body is inlined op by op;
* **PyTorch's decompositions**: an op with an entry in ``torch._decomp``'s decomposition table
  for the ATen op of the same name (``F.mish`` -> ``aten.mish`` -> ``x * tanh(softplus(x))``) is
  replaced by that decomposition, traced on Proxies, when every op it emits has a rule (or
  expands in turn). Emitted nodes are named after the node they replace (``mish_tanh``);

and ``x[index]`` with an integer tensor ``index`` becomes ``index_select`` (``x[mask]`` with a
boolean mask, which selects a data-dependent number of entries, is refused);
``x[torch.arange(n), index]`` (one entry per sample: last-token pooling) becomes
``per_sample_take``, which keeps the samples apart. What cannot be
expanded stays as it is, with the reason in ``node.meta["fxcurv_unexpanded"]``: the backward
pass names it when the node turns out to need a derivative (an expansion is only ever tried,
never required: a mask built by an opaque helper needs none).
"""
from __future__ import annotations

import inspect
import operator
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from fxcurv.emit import Emitter
from fxcurv.errors import CompileError, node_error, requesting
from fxcurv.rules import BOOLEAN, PIECES, rule_for
from fxcurv.rules.indexing import lower_tensor_index, per_sample_take
from fxcurv.rules.shape import is_scalar_node

UNEXPANDED = "fxcurv_unexpanded"
_EXAMPLE_HINT = ("; compile with example=(x, y), one batch, to trace through it with its "
                 "loops and branches on sizes decided on that batch (docs/tracing.md)")
_ROUNDS = 8  # an inlined helper may call helpers in turn
# node.meta entries the expansion inherits (not "is_wrapped": fx would emit torch.fx.wrap
# calls for the new node's target into the generated code)
_PROVENANCE = ("stack_trace", "nn_module_stack", "source_fn_stack")


def expand(graph: fx.Graph) -> fx.Graph:
    """Expand every node without a rule that can be expanded (see the module docstring)."""
    for _ in range(_ROUNDS):
        if not any([_expand_node(graph, node) for node in list(graph.nodes)]):
            break
    graph.lint()
    return graph


def _expand_node(graph: fx.Graph, node: fx.Node) -> bool:
    """Replace ``node`` by its expansion; True if it was replaced."""
    if node.op not in ("call_function", "call_method") or UNEXPANDED in node.meta:
        return False
    axis = _tensor_index_axis(node)
    if axis is not None:
        def lowered(x, index):
            return lower_tensor_index(x, index[-1] if isinstance(index, tuple) else index, axis)
        return _replace(graph, node, lowered, "indexing with a tensor") is None
    if _is_per_sample_index(node):
        node.target, node.args = per_sample_take, (node.args[0], *node.args[1])
        return True
    if rule_for(node) is not None:
        return False
    for how, fn in (("inlining", _opaque_helper(node)), ("decomposition", _decomposition(node))):
        if fn is None:
            continue
        reason = _replace(graph, node, fn, how, strict=how == "decomposition")
        if reason is None:
            return True
        node.meta[UNEXPANDED] = reason
        return False
    node.meta[UNEXPANDED] = "it is neither a plain Python helper nor an op with a decomposition"
    return False


# -- advanced indexing -----------------------------------------------------------------------
def _tensor_index_axis(node: fx.Node) -> Optional[int]:
    """``k`` for ``x[:, .., :, t]``: a single tensor ``t`` (not a size) after ``k`` full
    slices (``x[t]``: 0; EfficientFormer's ``biases[:, idxs]``: 1); None for anything else."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return None
    obj, idx = node.args
    items = idx if isinstance(idx, tuple) else (idx,)
    index, axis = items[-1], len(items) - 1
    if not isinstance(index, fx.Node) or is_scalar_node(index) or \
            not isinstance(obj, fx.Node) or \
            any(item != slice(None) for item in items[:-1]):
        return None
    source = rule_for(obj)
    if source is not None and source.has(PIECES):
        return None  # picking a piece of a tuple
    if _is_boolean(index):
        with requesting("grad"):  # every derivative, the gradient first
            raise node_error(node, "x[mask] with a boolean mask selects a data-dependent "
                             "number of entries, so the shapes of every derivative depend on "
                             "the data", "Use torch.where(mask, x, 0) (or masked_fill) to keep "
                             "shapes fixed, or index with integer tensors.")
    return axis


def _is_boolean(node: fx.Node) -> bool:
    """A node known to be a boolean tensor: a comparison or boolean logic."""
    rule = rule_for(node)
    return rule is not None and rule.has(BOOLEAN)


def _is_per_sample_index(node: fx.Node) -> bool:
    """``x[torch.arange(n), index]``: a tensor ``index`` with an ``arange`` of one argument
    over the rows (the step checks that ``n`` is the number of samples)."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return False
    idx = node.args[1]
    if not (isinstance(idx, tuple) and len(idx) == 2 and
            all(isinstance(i, fx.Node) and not is_scalar_node(i) for i in idx)):
        return False
    rows = idx[0]
    return rows.op == "call_function" and rows.target is torch.arange and \
        len(rows.args) == 1 and set(rows.kwargs) <= {"device", "dtype"}


# -- opaque helpers and decompositions -------------------------------------------------------
def _opaque_helper(node: fx.Node) -> Optional[Callable]:
    """The node's target if it is a plain Python function outside torch and fxcurv."""
    target = node.target
    if node.op != "call_function" or not inspect.isfunction(target):
        return None
    module = getattr(target, "__module__", "") or ""
    if module.split(".")[0] in ("torch", "fxcurv", "passes"):
        return None
    return target


def _aten_op(node: fx.Node) -> Any:
    """The ATen overload packet of the same name as the node's op (``F.mish`` -> ``aten.mish``)."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return getattr(torch.ops.aten, str(name), None) if name else None


def _decomposition(node: fx.Node) -> Optional[Callable]:
    """PyTorch's decomposition of the node's ATen op, unwrapped from its dtype/out wrappers
    (which cannot read a Proxy), taking the node's arguments; None if there is none."""
    from torch._decomp import decomposition_table  # noqa: PLC0415 (a slow import)

    packet = _aten_op(node)
    if packet is None:
        return None
    for overload in packet.overloads():
        op = getattr(packet, overload)
        if op not in decomposition_table or "out" in overload or not _fits(node, op._schema):
            continue
        inner = inspect.unwrap(decomposition_table[op])
        return lambda *args, **kwargs: inner(*args, **_aten_kwargs(kwargs))
    return None


def _aten_kwargs(kwargs: dict) -> dict:
    """Keywords in ATen's terms: ``input`` is ``self``; ``inplace=False`` is dropped."""
    return {("self" if k == "input" else k): v for k, v in kwargs.items() if k != "inplace"}


def _fits(node: fx.Node, schema) -> bool:
    """The node's arguments fit the ATen schema: no more positional ones than it has, and
    every keyword (in ATen's terms) named by it; ``inplace`` must be False."""
    names = [a.name for a in schema.arguments]
    if len(node.args) > len(names) or node.kwargs.get("inplace"):
        return False
    return all(key in names[len(node.args):] for key in _aten_kwargs(dict(node.kwargs)))


def _replace(graph: fx.Graph, node: fx.Node, fn: Callable, how: str,
             strict: bool = True) -> Optional[str]:
    """Call ``fn`` on the node's arguments as Proxies emitted before ``node`` and use its
    result instead; roll back if that fails or (``strict``: a decomposition must be complete)
    a new node has neither a rule nor an expansion. None on success, else why not. An inlined
    helper keeps its unruled nodes (a mask needs no derivative; the backward pass names any
    that does)."""
    before = list(graph.nodes)
    known = set(before)
    emit = Emitter(graph, before=node)
    try:
        with emit.naming(node.name, pass_="expand", node=node.name):
            args = fx.node.map_arg(node.args, emit.proxy)
            kwargs = fx.node.map_arg(node.kwargs, emit.proxy)
            result = fn(*args, **kwargs)
            value = emit.as_node(result)
    except CompileError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure means "not expandable"
        _erase_new(graph, known)
        hint = _EXAMPLE_HINT if how == "inlining" and isinstance(err, fx.proxy.TraceError) \
            else ""
        return f"{how} of {_name(node)} failed: {type(err).__name__}: {err}{hint}"
    missing = _first_unruled(graph, known) if strict else None
    if missing is not None:
        _erase_new(graph, known)
        return f"its {how} needs {missing}, which has no rule"
    if isinstance(value, fx.Node) and value not in known:  # where it came from; not fx's
        value.meta.update({k: v for k, v in node.meta.items() if k in _PROVENANCE})
    for new in graph.nodes:
        if new not in known and "stack_trace" not in new.meta and node.stack_trace:
            new.stack_trace = node.stack_trace
            new.meta["nn_module_stack"] = node.meta.get("nn_module_stack")
    if isinstance(value, fx.Node):
        node.replace_all_uses_with(value)
    else:
        _replace_constant(node, value)
    graph.erase_node(node)
    return None


def _replace_constant(node: fx.Node, value: Any) -> None:
    """A helper that returned a non-node (a tuple of nodes, a constant): readers get it."""
    for user in list(node.users):
        user.args = fx.node.map_arg(user.args, lambda n: value if n is node else n)
        user.kwargs = fx.node.map_arg(user.kwargs, lambda n: value if n is node else n)


def _first_unruled(graph: fx.Graph, known: set) -> Optional[str]:
    """The first new op node with neither a rule nor an expansion, named; None if none."""
    for new in graph.nodes:
        if new in known or new.op not in ("call_function", "call_method"):
            continue
        if rule_for(new) is None and _opaque_helper(new) is None and _decomposition(new) is None:
            return _name(new)
    return None


def _erase_new(graph: fx.Graph, known: set) -> None:
    for new in reversed(list(graph.nodes)):
        if new not in known:
            graph.erase_node(new)


def _name(node: fx.Node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    target = node.target
    return str(target) if isinstance(target, torch._ops.OpOverload) else getattr(
        target, "__qualname__", str(target))


def unexpanded_reason(node: fx.Node) -> str:
    """Why ``node`` (an op without a rule) was not expanded, for error messages."""
    reason = node.meta.get(UNEXPANDED)
    return f" ({reason})" if reason else ""

