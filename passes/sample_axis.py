"""Call-time checks that the rows of axis 0 stay the samples where only the running step
knows the shapes.

Every quantity but the gradient relies on each row of axis 0 inside the model belonging to
one sample (per-sample terms, the square-root factor's columns). A reshape-like op (trait
``RESHAPES``) takes its shape from the call's arguments: ``x.view(-1, F)`` after a convolution
keeps one row per sample, ``x.flatten(0, 1)`` of frames ``[N, T, C, H, W]`` (a CNN applied to
every frame) or a window partition ``[N·W, w, w, C]`` (Swin) gives each sample ``k`` rows, in
sample order, and ``x.view(2, -1)`` puts samples together in one row. So the pass puts an
identity check after each such reshape inside the model, which raises naming the node:

* first-order, GGN and Kronecker quantities allow ``k`` rows per sample
  (:func:`rows_hold_samples`): every column they read starts at the loss, so a sample's
  per-row parameter terms add up to its own (:func:`merged_rows` marks the values whose rows
  may be merged; ``passes/per_sample.py`` regroups their terms by sample). Kronecker factors
  count such rows as samples of the layer, as hook-based K-FAC sees them;
* the Hessian family (its residual columns start at each op's rows), KFRA and a coupled batch
  (BatchNorm in train mode) need one row per sample (:func:`keeps_sample_axis`).

A built-in loss's exact factor has one column per class and input row (``logits.view(-1, C)``
gives a sample several rows), so the quantities that read it check each built-in loss's input
(:func:`loss_rows_are_samples`).

An op that mixes samples along some axes is refused at compile time where its axis arguments
name axis 0 (``sum(0)``, ``transpose(0, 1)``); a *negative* axis is axis 0 at one rank only
(``transpose(-3, -2)`` of a 3-D value, ``x[..., 0, :]`` of a 2-D one), which only the running
step knows. For such a call the pass evaluates the rule's ``mixes_samples`` with the negative
axes (and ``...``) resolved at every rank where they could reach axis 0, and reads the op's
data input through :func:`axes_keep_samples`, which raises at those ranks.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from fxcurv.quantities import Quantity
from fxcurv.errors import describe, node_error
from fxcurv.rules import REDUCED, REDUCTION, RESHAPES, rule_for
from fxcurv.rules.losses import classes_last, targets_of_rows
from fxcurv.rules.shape import (axes_keep_samples, keeps_sample_axis, loss_rows_are_samples,
                                rows_hold_samples, varargs)

from .analysis import ancestors, descendants, sample_carriers, size_read
from .curvature.second_order import linear_in


def guard_sample_axis(traced, samples: fx.Node, quantities: list) -> None:
    """Insert the checks into ``traced.graph``; ``samples`` is the node holding the number of
    samples (axis 0 of the checked model input). Records in ``traced.memo["merged_rows"]`` the
    values whose rows may be merged (empty where the step needs one row per sample). The loss
    check is not for a step that also computes KFRA, whose chain analysis does not pass it
    (the reshape checks stay)."""
    carriers = sample_carriers(traced.graph, traced.inputs[0])
    model = ancestors(traced.model_output) & descendants(traced.graph, traced.inputs[0])
    rows = row_values(traced, carriers)
    merges = all(map(allows_merged_rows, quantities)) and not traced.memo.get("coupled")
    check = rows_hold_samples if merges else keeps_sample_axis
    for node in list(traced.graph.nodes):
        rule = rule_for(node)
        if node in model and rule is not None and rule.has(RESHAPES) and \
                rule.bind(node)["input"] in carriers:
            if _rows_from(rule.name, rule.bind(node), samples) is rule.bind(node)["input"]:
                continue  # leaves axis 0 alone (flatten(1), unsqueeze(1)): nothing to check
            carriers.add(_check_after(traced, node, samples, check))
        if rule is not None and rule.mixes_samples and (node in model or node in rows):
            _check_negative_axes(traced.graph, node, rule, carriers)
    traced.memo["merged_rows"] = merged_rows(traced.graph, carriers, samples) if merges \
        else set()
    if any(q.source.kfra for q in quantities) or not any(map(_reads_exact_rows, quantities)):
        return
    for node in list(traced.graph.nodes):
        rule = rule_for(node)
        if rule is not None and rule.has_sqrt_hessian and rule.bind(node)["input"] in rows:
            _classes_back_on_their_axis(traced, node, rule)
            _check_before(traced, node, rule.bind(node)["input"], samples)


def row_values(traced, carriers: set) -> set:
    """The values between the model output and the loss whose rows (axis 0) each belong to
    one sample: the carriers, and what reshapes (``logits.view(-1, C)``, ``flatten(0, 1)``)
    and ops that keep the rows make of them. Raises :class:`CompileError` for an op there
    that couples the samples (``z @ z.T``, ``z - z.mean(0)``, a softmax over the batch): the
    loss is then not a sum of per-sample terms, and only its gradient is defined."""
    region = descendants(traced.graph, traced.model_output) & ancestors(traced.loss)
    rows = set(carriers)
    for node in traced.graph.nodes:
        rule = rule_for(node)
        if node not in region or node in rows or rule is None or \
                not any(arg in rows for arg in node.all_input_nodes):
            continue
        if rule.has(RESHAPES) or rule.output_samples(node) == REDUCED or \
                (rule.loss is not None and rule.bind(node).get("reduction") != "none"):
            rows.add(node) if rule.has(RESHAPES) else None
            continue
        reason = rule.mixes_samples and rule.mixes_samples(rule.bind(node))
        if reason and rule.has(REDUCTION) and _linear_up_to_loss(traced, node, region):
            continue  # a sum or mean over the samples that only linear ops follow
        if reason:
            raise node_error(node, f"{reason}, so the loss couples the samples: it is not a "
                             "sum of per-sample terms, and per-sample and curvature quantities "
                             "are undefined", "Write the loss as a reduction over per-sample "
                             "terms (a built-in loss, or (...).mean() of values computed per "
                             "sample), or request only 'grad'.")
        rows.add(node)
    return rows


def allows_merged_rows(quantity: Quantity) -> bool:
    """Whether the quantity is defined where a sample has several rows of axis 0 inside the
    model: every column it reads starts at the loss (the gradient, the exact and Monte-Carlo
    factors), so per-row terms add up to the sample's. Not the Hessian family (residual columns
    start at each op's rows) nor KFRA (its per-sample matrices propagate through the rows)."""
    return quantity.source.signs is None and not quantity.source.kfra


def merged_rows(graph: fx.Graph, carriers: set, samples: fx.Node) -> set:
    """The values among ``carriers`` whose axis 0 may hold several rows per sample: what a
    reshape that may merge rows makes, and what ops compute from it, up to a reshape whose
    first size is read from a value with one row per sample (``h.view(B, T, -1)``, ``B =
    x.shape[0]``), or the number of samples itself. A reshape keeps its input's rows where it
    leaves axis 0 alone (``flatten(1)``, ``unsqueeze(1)``) or takes its first size from a
    value's axis 0 (``qkv.reshape(B_, T, 3, H, D)``, ``B_ = x.shape[0]``)."""
    merged: set = set()
    for node in graph.nodes:
        rule = rule_for(node)
        if rule is None or not rule.has(RESHAPES):
            if any(arg in merged for arg in node.all_input_nodes):
                merged.add(node)
            continue
        if rule.bind(node)["input"] not in carriers | merged:
            continue  # (a reshape of a parameter-side value)
        rows_of = _rows_from(rule.name, rule.bind(node), samples)
        if rows_of is not samples and (rows_of not in carriers or rows_of in merged):
            merged.add(node)
    return merged


def _rows_from(name: str, bound: dict, samples: fx.Node):
    """The value whose rows a reshape's output has (its input where it leaves axis 0 alone,
    the value whose axis-0 size it reads as its first size, ``samples``), None if unknown."""
    if name in ("flatten", "squeeze", "unsqueeze", "repeat_interleave"):
        axes = _ints(bound.get("start_dim", bound.get("dim")))
        keeps = axes and all(a >= 1 for a in axes) or \
            (name == "flatten" and bound.get("start_dim") == 0 and bound.get("end_dim") == 0)
        return bound["input"] if keeps else None
    shape = varargs(bound["shape"]) if isinstance(bound.get("shape"), (list, tuple)) else []
    first = shape[0] if shape else None
    if first is samples:
        return samples
    return _axis0_size_of(first) if isinstance(first, fx.Node) else None


def _axis0_size_of(node: fx.Node):
    """``v`` where ``node`` reads the size of ``v``'s axis 0 (``v.size(0)``, ``v.shape[0]``,
    ``v.shape[:2][0]``, :func:`~.analysis.size_read`), else None."""
    read = size_read(node)
    return read[0] if read is not None and read[1] == 0 else None


def _reads_exact_rows(quantity: Quantity) -> bool:
    """Whether the quantity reads the exact loss factor's columns per sample (the GGN, the
    Hessian family, the block products); first-order and Monte-Carlo ones do not (summed
    Monte-Carlo columns of one sample's rows keep their expectation)."""
    source = quantity.source
    return source.factor == "exact" or source.signs is not None or \
        quantity.family == "product"


def _check_after(traced, node: fx.Node, samples: fx.Node, check) -> fx.Node:
    """Every reader of the reshape ``node`` reads it through ``check``
    (:func:`rows_hold_samples` or :func:`keeps_sample_axis`; the node returned)."""
    with traced.graph.inserting_after(node):
        checked = traced.graph.call_function(check, (node, samples, f"node '{node.name}'"))
    node.replace_all_uses_with(checked, delete_user_cb=lambda user: user is not checked)
    checked._rename(f"{node.name}_checked")
    if traced.model_output is node:
        traced.model_output = checked
    return checked


def _classes_back_on_their_axis(traced, loss: fx.Node, rule) -> None:
    """``loss(x.reshape(-1, C), t)`` of a loss with a class axis (nanoGPT's
    ``cross_entropy(logits.view(-1, C), y.view(-1))``; also ``x.flatten(0, -2)``, or
    ``x.flatten(0, 1)`` of a 3-D ``x``) -> ``loss(x.movedim(-1, 1),
    targets_of_rows(t, x))``, the same function where ``x``'s last axis holds the ``C``
    classes (:func:`classes_last` checks that when the step runs): each sample's rows are then
    its positions, and the exact factor has one column per class and position. The targets
    must not depend on the parameters."""
    bound = rule.bind(loss)
    rows, target = bound["input"], bound["target"]
    shape_rule = rule_for(rows) if isinstance(rows, fx.Node) else None
    if not rule.loss.class_axis or shape_rule is None or not shape_rule.has(RESHAPES) or \
            not isinstance(target, fx.Node) or \
            ancestors(target) & set(traced.params.values()):
        return
    reshaped = shape_rule.bind(rows)
    classes_and_rank = _rows_of_classes(reshaped)
    if classes_and_rank is None:
        return
    graph = traced.graph
    with graph.inserting_before(loss):
        checked = graph.call_function(classes_last, (reshaped["input"], *classes_and_rank,
                                                     f"node '{loss.name}'"))
        moved = graph.call_function(torch.movedim, (checked, -1, 1))
        targets = graph.call_function(targets_of_rows, (target, checked))
    loss.replace_input_with(rows, moved)
    loss.replace_input_with(target, targets)


def _rows_of_classes(reshaped: dict):
    """``(classes, rank)`` for :func:`classes_last` where a reshape makes rows of the classes
    on the last axis: ``x.view(-1, C)`` (``(C, -1)``), ``x.flatten(0, -2)`` (``(-1, -1)``),
    ``x.flatten(0, e)`` (``(-1, e + 2)``); None for any other reshape."""
    if "shape" in reshaped:
        shape = varargs(reshaped["shape"])
        return (shape[1], -1) if len(shape) == 2 and shape[0] == -1 else None
    start, end = reshaped.get("start_dim"), reshaped.get("end_dim")
    if start != 0 or not isinstance(end, int):
        return None
    return (-1, -1) if end == -2 else (-1, end + 2) if end >= 1 else None


def _check_before(traced, loss: fx.Node, source: fx.Node, samples: fx.Node) -> None:
    """The built-in ``loss`` reads its input ``source`` through
    :func:`loss_rows_are_samples`."""
    with traced.graph.inserting_before(loss):
        checked = traced.graph.call_function(loss_rows_are_samples,
                                             (source, samples, f"node '{loss.name}'"))
    loss.replace_input_with(source, checked)


AXIS_ARGUMENTS = ("dim", "dim0", "dim1", "dims", "start_dim", "end_dim", "source",
                  "destination", "dimension")


def _check_negative_axes(graph: fx.Graph, node: fx.Node, rule, carriers: set) -> None:
    """Read ``node``'s data input through :func:`axes_keep_samples` where a negative axis (or
    an ``...`` index) makes the rule's ``mixes_samples`` hold at some rank."""
    bound = rule.bind(node)
    data = bound[next(iter(rule.signature.parameters))]
    data = data[0] if isinstance(data, (list, tuple)) and data else data
    if not isinstance(data, fx.Node) or data not in carriers:
        return
    reach = _reach(bound)
    if not reach:
        return
    ranks, reasons = [], []
    for rank in range(1, reach + 1):
        resolved = _resolved(bound, rank + rule.axis_rank_offset, rank)
        reason = resolved is not None and rule.mixes_samples(resolved)
        if reason:
            ranks.append(rank)
            reasons.append(reason)
    if ranks:
        with graph.inserting_before(node):
            checked = graph.call_function(axes_keep_samples, (data, ranks, reasons,
                                                              describe(node)))
        node.replace_input_with(data, checked)


def _reach(bound: dict) -> int:
    """The largest rank at which a negative axis argument or an ``...`` index can name axis 0
    (0: none can)."""
    reach = 0
    for name in AXIS_ARGUMENTS:
        for axis in _ints(bound.get(name)):
            if axis < 0:
                reach = max(reach, -axis)
    index = bound.get("idx")
    if isinstance(index, tuple) and Ellipsis in index:
        reach = max(reach, len(index) + 1)
    for axis in _spec_axes(bound):  # an item assignment's index (``rules.shape.index_spec``)
        reach = max(reach, -axis)
    return reach


def _spec_axes(bound: dict) -> list:
    spec = bound.get("spec")
    return list(spec[0::5]) if isinstance(spec, list) else []


def _ints(value) -> list:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _resolved(bound: dict, axes_rank: int, rank: int):
    """``bound`` with negative axes counted from ``axes_rank`` and ``...`` expanded for an
    input of ``rank`` axes; None where the call would be invalid at that rank."""
    resolved = dict(bound)
    for name in AXIS_ARGUMENTS:
        value = bound.get(name)
        if isinstance(value, (list, tuple)):
            value = type(value)(v + axes_rank if isinstance(v, int) and v < 0 else v
                                for v in value)
        elif isinstance(value, int) and not isinstance(value, bool) and value < 0:
            value = value + axes_rank
        if any(v < 0 for v in _ints(value)):
            return None
        resolved[name] = value
    if _spec_axes(bound):
        spec = list(bound["spec"])
        spec[0::5] = [axis + rank if axis < 0 else axis for axis in spec[0::5]]
        if any(axis < 0 for axis in spec[0::5]):
            return None
        resolved["spec"] = spec
    index = bound.get("idx")
    if isinstance(index, tuple) and Ellipsis in index:
        consumed = sum(1 for item in index if item is not None and item is not Ellipsis)
        if consumed > rank:
            return None
        at = index.index(Ellipsis)
        resolved["idx"] = index[:at] + (slice(None),) * (rank - consumed) + index[at + 1:]
    return resolved


def _linear_up_to_loss(traced, reduced: fx.Node, region: set) -> bool:
    """Every op between ``reduced`` and the loss is linear in the values that depend on it
    (``0.5 * x.sum(0) / 2``, ``x.mean(0).sum()``): a sum over the samples stays a sum of
    per-sample terms."""
    after = descendants(traced.graph, reduced) & region
    for node in after - {reduced}:
        rule = rule_for(node)
        if rule is None:
            return False
        if rule.is_constant(node):
            continue
        if rule.loss is not None or not linear_in(node, rule, after):
            return False
    return True
