"""Emitting nodes by running ordinary torch code on fx Proxies.

A rule or pass writes math (``g * (y > 0)``, ``torch.matmul(g, w)``) on :class:`fx.Proxy`
objects; every op becomes a node appended to the graph before the output node. Nodes get
readable names from the current ``scope`` (``relu_1_vjp_mul``), and ``node.meta`` records the
pass and forward node they come from. Runtime shape logic that plain Proxies cannot express
lives in small TorchScript-compatible helpers, emitted as calls with :meth:`Emitter.call`.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import torch.fx as fx

from . import errors


class Emitter(fx.Tracer):
    """Appends nodes to an existing graph; proxies created here emit into it."""

    def __init__(self, graph: fx.Graph, before: Optional[fx.Node] = None):
        """Emit into ``graph`` before node ``before`` (default: before the output node)."""
        super().__init__()
        self.graph = graph
        self._prefix: Optional[str] = None
        self._tags: dict[str, Any] = {}
        self._output = before or next((n for n in graph.nodes if n.op == "output"), None)

    # -- naming and provenance -------------------------------------------------------------
    @contextlib.contextmanager
    def naming(self, prefix: str, **meta: Any):
        """Name nodes emitted inside ``prefix_<op>`` and tag them with ``meta``."""
        saved = self._prefix, self._tags
        self._prefix, self._tags = prefix, {**self._tags, **meta}
        try:
            yield self
        finally:
            self._prefix, self._tags = saved

    @contextlib.contextmanager
    def requesting(self, quantity: str):
        """Emit for ``quantity``: errors raised inside name it (:func:`errors.node_error`)."""
        with errors.requesting(quantity):
            yield self

    @property
    def quantity(self) -> str:
        """The quantity being emitted for (named in runtime error messages)."""
        return errors.requested()

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        if name is None and self._prefix is not None:
            name = f"{self._prefix}_{_target_name(kind, target)}"
        if self._output is not None:
            with self.graph.inserting_before(self._output):
                node = self.graph.create_node(kind, target, args, kwargs, name, type_expr)
        else:
            node = self.graph.create_node(kind, target, args, kwargs, name, type_expr)
        node.meta.update({"fxcurv": dict(self._tags)})
        return node

    # -- building blocks -------------------------------------------------------------------
    def proxy(self, node: fx.Node) -> fx.Proxy:
        return fx.Proxy(node, self)

    def call(self, fn: Callable, *args: Any, **kwargs: Any) -> fx.Proxy:
        """Emit a call to a scriptable helper function (not traced into)."""
        return self.create_proxy("call_function", fn, args, kwargs)

    def as_node(self, value: Any) -> Any:
        """Proxy -> Node (recursively in containers); constants pass through."""
        return self.create_arg(value)

    def rename(self, value: Any, name: str) -> None:
        """Give the node behind ``value`` a readable name (if it is a fresh emitted node)."""
        node = value.node if isinstance(value, fx.Proxy) else value
        if isinstance(node, fx.Node) and "fxcurv" in node.meta and not node.meta.get("named"):
            node._rename(name)
            node.meta["named"] = True


def rename_freeing(node: fx.Node, old_owner: fx.Node, name: str) -> None:
    """Give ``node`` the name ``old_owner`` has now; ``old_owner`` becomes ``<name>_param``."""
    namespace = node.graph._graph_namespace
    old_owner._rename(f"{name}_param")
    namespace._used_names.discard(name)  # fx keeps retired names reserved; free this one
    node._rename(name)


def _target_name(kind: str, target: Any) -> str:
    if kind in ("call_method", "get_attr"):
        return str(target).replace(".", "_")
    name = getattr(target, "__name__", str(target))
    return name.strip("_")
