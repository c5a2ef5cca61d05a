"""Call-time checks that the rows of axis 0 stay the samples where only the running step
knows the shapes.

Every quantity but the gradient relies on axis 0 holding one row per sample inside the model
(per-sample terms, the square-root factor's columns). A reshape-like op (trait ``RESHAPES``)
takes its shape from the call's arguments (``x.view(-1, D)`` of ``[N, T, D]`` merges samples
and positions into rows; ``x.view(-1, F)`` after a convolution does not), and a built-in
loss's exact factor has one column per class and input row (``logits.view(-1, C)`` gives a
sample several rows). So the pass puts an identity check after each such reshape inside the
model (:func:`keeps_sample_axis`) and, for the quantities that read the exact factor, before
each built-in loss (:func:`loss_rows_are_samples`); both raise naming the node.
"""
from __future__ import annotations

import torch.fx as fx

from fxcurv.quantities import Quantity
from fxcurv.rules import RESHAPES, rule_for
from fxcurv.rules.shape import keeps_sample_axis, loss_rows_are_samples

from .analysis import ancestors, descendants, sample_carriers


def guard_sample_axis(traced, samples: fx.Node, quantities: list) -> None:
    """Insert the checks into ``traced.graph``; ``samples`` is the node holding the number of
    samples (axis 0 of the checked model input). Not for a step that also computes KFRA, whose
    chain analysis does not pass the loss check (the reshape checks stay)."""
    carriers = sample_carriers(traced.graph, traced.inputs[0])
    model = ancestors(traced.model_output) & descendants(traced.graph, traced.inputs[0])
    for node in list(traced.graph.nodes):
        rule = rule_for(node)
        if node in model and rule is not None and rule.has(RESHAPES) and \
                rule.bind(node)["input"] in carriers:
            _check_after(traced, node, samples)
    if any(q.source.kfra for q in quantities) or not any(map(_reads_exact_rows, quantities)):
        return
    for node in list(traced.graph.nodes):
        rule = rule_for(node)
        if rule is not None and rule.has_sqrt_hessian and rule.bind(node)["input"] in carriers:
            _check_before(traced, node, rule.bind(node)["input"], samples)


def _reads_exact_rows(quantity: Quantity) -> bool:
    """Whether the quantity reads the exact loss factor's columns per sample (the GGN, the
    Hessian family, the block products); first-order and Monte-Carlo ones do not (summed
    Monte-Carlo columns of one sample's rows keep their expectation)."""
    source = quantity.source
    return source.factor == "exact" or source.signs is not None or \
        quantity.family == "product"


def _check_after(traced, node: fx.Node, samples: fx.Node) -> None:
    """Every reader of the reshape ``node`` reads it through :func:`keeps_sample_axis`."""
    with traced.graph.inserting_after(node):
        checked = traced.graph.call_function(keeps_sample_axis,
                                             (node, samples, f"node '{node.name}'"))
    node.replace_all_uses_with(checked, delete_user_cb=lambda user: user is not checked)
    checked._rename(f"{node.name}_checked")
    if traced.model_output is node:
        traced.model_output = checked


def _check_before(traced, loss: fx.Node, source: fx.Node, samples: fx.Node) -> None:
    """The built-in ``loss`` reads its input ``source`` through
    :func:`loss_rows_are_samples`."""
    with traced.graph.inserting_before(loss):
        checked = traced.graph.call_function(loss_rows_are_samples,
                                             (source, samples, f"node '{loss.name}'"))
    loss.replace_input_with(source, checked)
