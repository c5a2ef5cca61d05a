"""Compile-time errors that say where (node, module, source line), what, and what to do."""
from __future__ import annotations

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
    """The qualified path and class of the innermost module the node was traced in."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return f"{path or '<root>'} ({cls_name.rsplit('.', 1)[-1]})"


def source_line(node: fx.Node) -> Optional[str]:
    """The last user-code frame of the node's recorded stack trace, one line."""
    trace = node.stack_trace or node.meta.get("stack_trace")
    if not trace:
        return None
    lines = [line.strip() for line in trace.strip().splitlines()]
    frames = [i for i, line in enumerate(lines) if line.startswith("File ")]
    if not frames:
        return None
    last = frames[-1]
    code = lines[last + 1] if last + 1 < len(lines) else ""
    return f"{lines[last]}: {code}".strip()


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
