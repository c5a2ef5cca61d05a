"""Python control flow on sizes, decided on an example batch (``compile(..., example=(x, y))``).

fx traces symbolically: ``x.shape[-1] < k``, ``if pad_r > 0`` or ``v.device.type != "meta"``
in a forward (timm's VGG head, Twins, MobileViT, ConViT, CrossViT, EfficientViT) has no value
to branch on, and tracing stops. Given an example batch, the tracer also evaluates every node
on fake tensors (``torch._subclasses.FakeTensorMode``: shapes, dtypes and devices, no data)
and a Python ``bool`` of a traced value takes the branch that value has for the example
(``int()`` of one: its value, ConViT's ``int(num_patches ** .5)``).

The branch must not depend on the number of samples (the step serves every batch size): every
node is evaluated twice, on the example and on the example with one more sample, and a
branch that differs between the two is a :class:`CompileError`. Sizes themselves stay
symbolic in the graph (``x.view(B, H // ws, ...)`` reads them when the step runs); only the
branches are fixed, so a step whose trace took one raises a ``ValueError`` when called with
inputs whose shapes, past the sample axis, differ from the example's
(:func:`check_example_shapes`). A branch on data (``if x.sum() > 0``) has no fake value and
stays a trace error.
"""
from __future__ import annotations

import contextlib
import logging
import operator
from unittest import mock
from typing import Any, List, Optional

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import Tensor

from .errors import CompileError, describe

_MISSING = object()
# tensor attributes read as the example's values while tracing with an example (the same for
# any number of samples)
METADATA = ("dtype", "device", "is_cuda", "layout",
            "is_floating_point", "is_complex")  # (methods: the example's bound method)
# read as the example's values too, and then checked: the step checks the example's shapes
RANKS = ("ndim",)


def check_example_shapes(x: Tensor, y: Tensor, encoded: List[int]) -> Tensor:
    """Call-time check that ``x`` and ``y`` have the example's shapes past axis 0 (the
    traced branches assumed them), ``encoded`` as :func:`encode_shapes`; returns ``x``."""
    expected = decode_shapes(encoded)
    _check_shape("x", x, expected[0])
    _check_shape("y", y, expected[1])
    return x


def check_example_leaves(x: Any, y: Any, encoded: List[int]) -> Any:
    """:func:`check_example_shapes` for structured ``x``/``y`` (every tensor leaf)."""
    leaves = [t for t in pytree.tree_leaves((x, y)) if isinstance(t, Tensor)]
    for i, (leaf, shape) in enumerate(zip(leaves, decode_shapes(encoded))):
        _check_shape(f"input leaf {i}", leaf, shape)
    return x


def _check_shape(what: str, value: Tensor, shape: List[int]) -> None:
    if list(value.shape[1:]) != shape:
        raise ValueError("fxcurv: {} has shape {} past the sample axis, but the step was "
                         "traced on an example with {} and its forward branches on sizes; "
                         "compile another step with an example of these shapes"
                         .format(what, list(value.shape[1:]), shape))


def encode_shapes(shapes: List[List[int]]) -> List[int]:
    """``[[3, 4], []]`` -> ``[2, 3, 4, 0]``: each shape's length, then its sizes (one flat,
    never empty list: TorchScript types ``[]`` as a list of tensors)."""
    return [item for shape in shapes for item in [len(shape), *shape]]


def decode_shapes(encoded: List[int]) -> List[List[int]]:
    shapes: List[List[int]] = []
    i = 0
    while i < len(encoded):
        shapes.append(encoded[i + 1:i + 1 + encoded[i]])
        i += 1 + encoded[i]
    return shapes


def example_shapes(example: tuple) -> List[int]:
    """The shapes past axis 0 of the example's tensors (``x``, ``y``, or every leaf), encoded
    (:func:`encode_shapes`)."""
    return encode_shapes([list(t.shape[1:]) for t in pytree.tree_leaves(example)
                          if isinstance(t, Tensor)])


class ExampleValues:
    """Fake values of every traced node for the example and for the example with one more
    sample; :meth:`decide` is the tracer's ``to_bool``."""

    def __init__(self, example: tuple, root: torch.nn.Module):
        from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: PLC0415 (private)
        if not (isinstance(example, (tuple, list)) and len(example) == 2):
            raise CompileError("example must be a pair (x, y) of one batch, as the step takes "
                               f"it, got {type(example).__name__}.")
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.root = root
        # id -> (the tensor, its fake): the tensor is kept so that its id is not reused by
        # another one (a temporary attribute, the one-more-sample batch) while it is a key
        self.fakes: dict[int, tuple[Tensor, Tensor]] = {}
        # (before tracing: while it runs, parameters dispatch to Proxies)
        self.states = {name: self._fake(t) for name, t in
                       [*root.named_parameters(remove_duplicate=False),
                        *root.named_buffers(remove_duplicate=False)]}
        batches = (example, pytree.tree_map(_one_more_sample, example))
        self.inputs = [[self._fake(part) for part in batch] for batch in batches]
        self.values: List[dict] = [{}, {}]
        self.decisions = 0
        # branches that read the number of samples, the same way for both fake batches
        # (``N != 1``, ``N > 2``): checked when the step runs (:func:`guard_sample_branches`)
        self.sample_branches: dict[fx.Node, tuple[bool, bool]] = {}

    def _fake(self, value: Any) -> Any:
        def convert(t):
            if not isinstance(t, Tensor):
                return t
            known = self.fakes.get(id(t))
            if known is None or known[0] is not t:
                with torch._C.DisableTorchFunction():  # (no tracer dispatch)
                    known = self.fakes[id(t)] = (t, self.mode.from_tensor(t))
            return known[1]
        return pytree.tree_map(convert, value)

    def record(self, node: fx.Node) -> None:
        """Evaluate ``node`` on both fake batches (no value where that fails)."""
        for which in (0, 1):
            value = self._evaluate(node, which)
            if value is not _MISSING:
                self.values[which][node] = value
        value = self.values[0].get(node)
        if isinstance(value, Tensor):  # (where an axis counted from the end lands)
            node.meta["example_rank"] = value.dim()

    def _evaluate(self, node: fx.Node, which: int) -> Any:
        if node.op == "placeholder":
            count = sum(1 for n in self.values[which] if n.op == "placeholder")
            return self.inputs[which][count] if count < 2 else _MISSING
        if node.op == "get_attr":
            if node.target in self.states:
                return self.states[node.target]
            return self._fake(_attribute(self.root, node.target))
        missing = []

        def read(arg):
            if arg not in self.values[which]:
                missing.append(arg)
                return None
            return self.values[which][arg]
        args = fx.node.map_arg(node.args, read)
        kwargs = fx.node.map_arg(node.kwargs, read)
        if missing:
            return _MISSING
        try:
            with self.mode, torch.no_grad(), _quiet_fake_tensors():
                if node.op == "call_function":
                    return node.target(*args, **kwargs)
                if node.op == "call_method":
                    return getattr(args[0], node.target)(*args[1:], **kwargs)
        except Exception:  # noqa: BLE001 - no fake value: a branch on it stays an error
            return _MISSING
        return _MISSING

    def decide(self, node: fx.Node, convert: Any = bool) -> Any:
        """The branch ``bool(node)`` takes on the example (``convert=int``: the Python int it
        is, ``int(n ** .5)``; ``convert=len``: how many items iterating it gives, Hugging
        Face's ``(*x.shape[:-1], -1, d)``); None if it has no fake value. Raises
        :class:`CompileError` where it depends on the number of samples (for ``len``: where
        the two fake batches give different lengths, as iterating over the samples does)."""
        try:
            taken = [convert(values[node]) for values in self.values]
        except Exception:  # noqa: BLE001 - missing, or a branch on data
            return None
        reads = convert is not len and _reads_sample_count(node, self.values[0])
        if taken[0] != taken[1] or (reads and convert is not bool):
            what = {bool: "branches", len: "iterates"}.get(convert,
                                                           "converts to a Python number")
            raise CompileError(f"the forward {what} on the number of samples at node "
                               f"'{node.name}' ({node.format_node()}): one compiled step serves "
                               "every batch size, so it must not depend on it.")
        if reads:  # (with whether the value is a bool already, not a size to test)
            self.sample_branches[node] = (taken[0],
                                          isinstance(self.values[0][node], bool))
        self.decisions += 1
        return taken[0]

    @contextlib.contextmanager
    def python_numbers(self):
        """While tracing: ``int(proxy)`` / ``operator.index(proxy)`` of a size (ConViT's
        ``int(num_patches ** .5)``) and ``len(proxy)`` of a shape are the example's values,
        like a branch; so are a tensor's dtype and device (:data:`METADATA`), which the step
        then assumes (an example in the dtype and on the device it will run with)."""
        def as_int(proxy):
            value = self.decide(proxy.node, int)
            if value is None:
                raise fx.proxy.TraceError(f"int() of the traced value '{proxy.node.name}', "
                                          "which has no value on the example")
            return value
        def as_length(proxy):  # (``*proxy`` asks for its length first)
            value = self.decide(proxy.node, len)
            if value is None:
                raise RuntimeError(f"len() of the traced value '{proxy.node.name}', which has "
                                   "no value on the example")
            return value
        attribute = fx.Proxy.__getattr__

        # ``torch.finfo(x.dtype)``, ``autocast(x.device.type)``, Hugging Face's parameter
        # dtype ``next(p.dtype for p in self.parameters() if p.is_floating_point())``
        def metadata(proxy, name):
            value = self.values[0].get(proxy.node) if name in METADATA + RANKS else None
            if not isinstance(value, Tensor):
                return attribute(proxy, name)
            if name in RANKS:  # (Funnel's ``axis %= x.ndim``: a rank the step then checks)
                self.decisions += 1
            return getattr(value, name)
        with mock.patch.multiple(fx.Proxy, create=True, __int__=as_int, __index__=as_int,
                                 __len__=as_length, __getattr__=metadata):
            yield


def branch_taken(value: bool, taken: bool, where: str) -> None:
    """Call-time check that a branch on the number of samples goes the way it went for the
    example (``if batch_size != position_ids.shape[0]`` is taken for every batch of two or
    more samples, not for one)."""
    if value != taken:
        raise ValueError("fxcurv: the forward branches on the number of samples at {}, and "
                         "this batch takes the other way than the example the step was "
                         "traced on; compile another step with an example of this batch "
                         "size".format(where))


fx.node.has_side_effect(branch_taken)  # (kept by dead-code elimination: it has no readers)


def guard_sample_branches(graph: fx.Graph, branches: dict) -> None:
    """A :func:`branch_taken` check after each branch in ``branches`` (node -> the way it
    went, whether its value is a bool): the step raises for a batch size whose branch would
    go the other way."""
    for node, (taken, is_bool) in branches.items():
        value = node
        if not is_bool:  # ``if x.shape[0]:``
            with graph.inserting_after(node):
                value = graph.call_function(operator.ne, (node, 0))
        with graph.inserting_after(value):
            graph.call_function(branch_taken, (value, taken, describe(node)))


@contextlib.contextmanager
def _quiet_fake_tensors():
    """Fake tensors log each op that fails on them (here: no fake value, not an error)."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _reads_sample_count(node: fx.Node, values: dict) -> bool:
    """Whether ``node`` is computed from axis 0's size of an input-derived tensor
    (``x.shape[0]``, ``x.size(0)``, ``len(x)``, a whole ``x.shape`` compared), following size
    arithmetic only (a tensor reshaped with ``B`` does not make its later sizes depend on
    it; a later size that does, ``x.view(2, -1).shape[1]``, differs between the two fake
    batches); ``values``: the fake values (negative indices resolved with the rank)."""
    ancestors, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current not in ancestors:
            ancestors.add(current)
            if not isinstance(values.get(current), Tensor):  # (sizes read of a tensor: its
                stack.extend(current.all_input_nodes)        # own shape, checked above)
    return any(_sample_count_read(n, ancestors, values) for n in ancestors)


def _sample_count_read(node: fx.Node, ancestors: set, values: dict) -> bool:
    if node.op == "call_function" and node.target is len:
        return _from_inputs(node.args[0])
    if node.op == "call_method" and node.target == "size" and len(node.args) > 1:
        rank = len(values.get(node.args[0]).shape) if node.args[0] in values else None
        axis = node.args[1] % rank if isinstance(node.args[1], int) and rank else node.args[1]
        return axis == 0 and _from_inputs(node.args[0])
    whole = (node.op == "call_function" and node.target is getattr and node.args[1] == "shape") \
        or (node.op == "call_method" and node.target == "size" and len(node.args) == 1)
    if not whole or not _from_inputs(node.args[0]):
        return False
    rank = len(values[node]) if node in values else None
    for user in node.users:
        if user not in ancestors:
            continue
        index = user.args[1] if user.op == "call_function" and \
            user.target is operator.getitem else None
        if isinstance(index, slice) and isinstance(index.start, int) and rank and \
                index.start % rank != 0 and (index.step or 1) > 0:
            continue  # x.shape[2:]
        if not isinstance(index, int) or rank is None or index % rank == 0:
            return True  # axis 0, or the whole shape, read on the way to the branch
    return False


def _from_inputs(value: Any) -> bool:
    """Whether a node is computed from the step's inputs (a placeholder is an ancestor)."""
    if not isinstance(value, fx.Node):
        return False
    seen, stack = set(), [value]
    while stack:
        current = stack.pop()
        if current.op == "placeholder":
            return True
        if current not in seen:
            seen.add(current)
            stack.extend(current.all_input_nodes)
    return False


def _attribute(root: torch.nn.Module, target: str) -> Any:
    """``root.<target>`` read from the modules' own tables (fx patches ``Module.__getattr__``
    while tracing, to return Proxies)."""
    value: Any = root
    for part in target.split("."):
        tables = [value._parameters, value._buffers, value._modules, value.__dict__] \
            if isinstance(value, torch.nn.Module) else [value.__dict__]
        value = next(table[part] for table in tables if part in table)
    return value


def _one_more_sample(t: Any) -> Any:
    """``t`` with its first sample repeated at the end (a batch of one more sample)."""
    if isinstance(t, Tensor) and t.dim() > 0:
        return torch.cat([t, t[:1]])
    return t
