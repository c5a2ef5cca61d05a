"""Compile-time errors that say where (node, module, source line), what, and what to do."""
from __future__ import annotations

import os
from typing import Optional

import torch.fx as fx


class CompileError(ValueError):
    """Raised by :func:`fxcurv.compile` when a model, op or quantity cannot be compiled.

    The message names the graph node, the op and the module or function it came from, the
    user's source line when fx recorded it, the quantity that needed it, and a hint.
    """


def op_name(node: fx.Node) -> str:
    """A short readable name of the op a node calls (``conv2d``, ``Tensor.view``)."""
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {node.target}"


def module_path(node: fx.Node) -> Optional[str]:
    """The model's module the node was traced in: ``features.3 (ReLU)``."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    cls_name = cls_name.rsplit(".", 1)[-1]
    for prefix in ("model.", "loss_fn."):
        if path.startswith(prefix):
            return f"{path[len(prefix):]} ({cls_name})"
    if path in ("model", "loss_fn"):
        return f"{cls_name} (the {path} itself)"
    return f"{path} ({cls_name})"


_LIBRARY_PATHS = (f"{os.sep}torch{os.sep}", f"{os.sep}fxcurv{os.sep}", f"{os.sep}passes{os.sep}")


def source_line(node: fx.Node) -> Optional[str]:
    """The user's source line that created the node (the last frame outside torch/fxcurv)."""
    trace = node.stack_trace or node.meta.get("stack_trace")
    if not trace:
        return None
    lines = trace.strip().splitlines()
    user = None
    for i, line in enumerate(lines):
        text = line.strip()
        if text.startswith("File ") and not any(p in text for p in _LIBRARY_PATHS):
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            user = f"{text.split(', in ')[0]}: {code}"
    return user


def describe(node: fx.Node) -> str:
    """``node 'relu_1' (op relu, module features.3 (ReLU), File "m.py", line 9: ...)``."""
    parts = [f"op {op_name(node)}"]
    module = module_path(node)
    if module:
        parts.append(f"module {module}")
    line = source_line(node)
    if line:
        parts.append(line)
    return f"node '{node.name}' ({', '.join(parts)})"


def node_error(node: fx.Node, problem: str, hint: str, quantity: str | None = None) -> CompileError:
    """Build a :class:`CompileError` for ``node``: what is wrong, for which quantity, what to do."""
    needed = f" for quantity '{quantity}'" if quantity else ""
    return CompileError(f"{describe(node)}{needed}: {problem}. {hint}")
