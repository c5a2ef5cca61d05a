"""Read-only analyses shared by the passes: which nodes depend on the parameters."""
from __future__ import annotations

import operator

from typing import Any, Iterable, Optional

import torch.fx as fx

from fxcurv.rules import KEPT, REDUCED, rule_for


def differentiable_inputs(node: fx.Node) -> list[fx.Node]:
    """Input nodes through which ``node`` can have a derivative (all of them without a rule,
    or with a rule that only lowers the op and left this call as it is)."""
    rule = rule_for(node)
    if rule is None or (not rule.vjp and rule.lower is not None and not rule.constant):
        return list(node.all_input_nodes)
    if rule.is_constant(node):
        return []
    bound = rule.bind(node)
    inputs: list[fx.Node] = []
    for name, vjp in rule.vjp.items():
        if vjp is not None:
            fx.node.map_arg(bound.get(name), inputs.append)
    return inputs


def depends_on(graph: fx.Graph, sources: Iterable[fx.Node],
               nodes: Optional[Iterable[fx.Node]] = None) -> dict[fx.Node, None]:
    """Nodes whose value depends differentiably on ``sources`` (an ordered set, graph order),
    among ``nodes`` (graph order; default: the whole graph) when given."""
    active = dict.fromkeys(sources)
    for node in graph.nodes if nodes is None else nodes:
        if node in active or node.op not in ("call_function", "call_method"):
            continue
        if any(arg in active for arg in differentiable_inputs(node)):
            active[node] = None
    return active


def ancestors(node: fx.Node, *more: fx.Node) -> set[fx.Node]:
    """``node`` (and ``more``) and every node their values are computed from."""
    seen, stack = set(), [node, *more]
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(current.all_input_nodes)
    return seen


def descendants(graph: fx.Graph, source: fx.Node) -> set[fx.Node]:
    """``source`` and every node whose value depends on it (graph order scan)."""
    found = {source}
    for node in graph.nodes:
        if any(arg in found for arg in node.all_input_nodes):
            found.add(node)
    return found


_METADATA = ("device", "dtype", "ndim", "is_cuda", "layout", "requires_grad")


def _size_of_a_later_axis(node: fx.Node) -> bool:
    """``t.size(d)`` or ``t.size()[d]`` / ``t.shape[d]`` for a literal ``d > 0``, or metadata
    (``t.device``, ``t.dtype``, ``t.dim()``): a value that is not the number of samples and
    holds none (``pos = torch.arange(x.size(1), device=x.device)`` has no sample axis)."""
    if node.op == "call_function" and node.target is getattr and node.args[1] in _METADATA:
        return True
    if node.op == "call_method" and node.target in ("dim", "ndimension"):
        return True
    read = size_read(node)
    return read is not None and read[1] > 0


def size_read(node: Any) -> Optional[tuple]:
    """``(t, a)`` where ``node`` reads the size of axis ``a`` of tensor ``t``: ``t.size(d)``,
    ``t.shape[d]``, ``t.size()[d]``, ``t.shape[2:][i]`` (``rules.shape.shape_read``); ``a``
    counted from the front, a negative ``d`` by the rank the example batch gave ``t`` while
    tracing (``node.meta["example_rank"]``), -1 where unknown. None where ``node`` reads no
    single size."""
    from fxcurv.rules.shape import shape_read  # noqa: PLC0415 (imported by rules users)

    if node.op == "call_method" and node.target == "size":
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return (node.args[0], _from_front(dim, node.args[0])) if isinstance(dim, int) else None
    if node.op != "call_function" or node.target is not operator.getitem or \
            not isinstance(node.args[1], int) or isinstance(node.args[1], bool):
        return None
    whole, index = shape_read(node.args[0]), node.args[1]
    if whole is None:
        return None
    tensor, first = whole
    if index < 0:  # ``t.shape[-2]``: where the traced example's rank puts it
        return tensor, _from_front(index, tensor) if first == 0 else -1
    return tensor, first + index if first >= 0 else -1


def _from_front(axis: int, tensor: Any) -> int:
    """``axis`` of ``tensor`` counted from the front; a negative one by the rank the example
    batch gave it while tracing (``node.meta["example_rank"]``), else -1 (unknown)."""
    if axis >= 0:
        return axis
    rank = tensor.meta.get("example_rank") if isinstance(tensor, fx.Node) else None
    return axis + rank if isinstance(rank, int) and axis + rank >= 0 else -1


def sample_data(graph: fx.Graph, data: fx.Node) -> set[fx.Node]:
    """``data`` and the values computed from it, except through the size of a later axis
    (:func:`_size_of_a_later_axis`): what the later axis's size builds (positions, masks)
    holds no samples."""
    found = {data}
    for node in graph.nodes:
        if not _size_of_a_later_axis(node) and \
                any(arg in found for arg in node.all_input_nodes):
            found.add(node)
    return found


def holds_samples(node: fx.Node) -> bool:
    """Whether ``node`` is in :func:`sample_data` of the graph's first input (the data
    ``x``), found by walking back from ``node``: MViT's relative positions
    ``torch.arange(q_h)`` with ``q_h`` a later axis's size hold no samples."""
    data = next(n for n in node.graph.nodes if n.op == "placeholder")
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current is data:
            return True
        if current not in seen and not _size_of_a_later_axis(current):
            seen.add(current)
            stack.extend(current.all_input_nodes)
    return False


def sample_carriers(graph: fx.Graph, data: fx.Node, through_mixing: bool = False
                    ) -> set[fx.Node]:
    """Nodes whose value still has the sample axis of ``data``: its descendants, up to (not
    through) ops that reduce over samples — a reduced loss, a sum over axis 0, ... An op that
    couples the rows but keeps one per sample (``COUPLES_ROWS``: BatchNorm in train mode)
    carries them: which quantities such a model has is ``compile``'s check.
    ``through_mixing``: also through ops that mix samples (the values computed from the
    samples at all, as opposed to from sizes of later axes or metadata)."""
    from fxcurv.rules import COUPLES_ROWS, rule_for  # noqa: PLC0415 (imported by rules users)

    carriers = {data}
    for node in graph.nodes:
        if _size_of_a_later_axis(node) or not any(arg in carriers
                                                   for arg in node.all_input_nodes):
            continue
        rule = rule_for(node)
        if rule is not None:
            bound = rule.bind(node)
            reduced_loss = rule.has_sqrt_hessian and bound.get("reduction") != "none"
            mixes = mixes_samples(node, rule, bound, carriers)
            if reduced_loss or (mixes and not rule.has(COUPLES_ROWS) and not through_mixing):
                continue
        carriers.add(node)
    return carriers


def mixes_samples(node: fx.Node, rule, bound: dict, carriers: set) -> Optional[str]:
    """Why ``node`` mixes the samples of ``carriers`` (its rule's ``mixes_samples``), or None;
    only where an argument carries them that is not the number of samples: SigLIP's
    ``probe.repeat(x.shape[0], 1, 1)`` copies a parameter once per sample. (A size that may
    be the sample axis's, ``h.shape[-2]`` without an example, still counts.)"""
    if not rule.mixes_samples or not any(arg in carriers and not _number_of_samples(arg)
                                         for arg in node.all_input_nodes):
        return None
    return rule.mixes_samples(bound)


def _number_of_samples(node: fx.Node) -> bool:
    """Whether ``node`` reads the size of axis 0 (``x.shape[0]``, ``x.size(0)``)."""
    read = size_read(node)
    return read is not None and read[1] == 0


def loss_rank(graph: fx.Graph, data: fx.Node, output: fx.Node, loss: fx.Node) -> str:
    """What the traced graph says about the loss's shape, from the rules' shape traits:
    ``"scalar"`` (provably 0-dim), ``"batched"`` (provably keeps the sample axis of ``data``:
    the model output, through elementwise ops or an unreduced loss) or ``"unknown"``."""
    batched = {data} | ({output} & sample_carriers(graph, data))
    scalar: set[fx.Node] = set()
    for node in graph.nodes:
        rule = rule_for(node)
        if rule is None or node in batched:
            continue
        inputs = node.all_input_nodes
        samples = rule.output_samples(node)
        if samples == REDUCED:
            scalar.add(node)
        elif samples == KEPT:
            if any(arg in batched for arg in inputs):
                batched.add(node)
            elif all(arg in scalar for arg in inputs):
                scalar.add(node)
    return "scalar" if loss in scalar else "batched" if loss in batched else "unknown"
