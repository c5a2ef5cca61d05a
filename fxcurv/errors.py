"""Compile-time errors that say where (node, module, source line), what, and what to do."""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import re
from typing import Any, Iterator, Optional

import torch.fx as fx


class CompileError(ValueError):
    """Raised by :func:`fxcurv.compile` when a model, op or quantity cannot be compiled.

    The message names the graph node, the op and the module or function it came from, the
    user's source line when fx recorded it, the quantity that needed it, and a hint.
    """


class StepError(RuntimeError):
    """Raised by a compiled step's call-time guards (``fxcurv/guard.py``): a parameter of the
    model was replaced after ``compile``, or the first call's check against eager autograd
    found a different loss or gradient."""


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
    return format_module(path, cls)


def format_module(path: str, cls: Any) -> str:
    """A traced module path (``model.features.3``) and class as the user knows them:
    ``features.3 (ReLU)``; the model or loss itself: ``Net (the model itself)``."""
    cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    cls_name = cls_name.rsplit(".", 1)[-1]
    for prefix in ("model.", "loss_fn."):
        if path.startswith(prefix):
            return f"{path[len(prefix):]} ({cls_name})"
    if path in ("model", "loss_fn"):
        return f"{cls_name} (the {path} itself)"
    return f"{path} ({cls_name})"


@functools.lru_cache(maxsize=None)
def _library_dirs() -> tuple[str, ...]:
    """The real directories of the installed torch, fxcurv and fxcurv.passes packages."""
    import torch  # noqa: PLC0415

    import fxcurv  # noqa: PLC0415
    from fxcurv import passes  # noqa: PLC0415
    return tuple(sorted({os.path.realpath(os.path.dirname(module.__file__)) + os.sep
                         for module in (torch, fxcurv, passes)}))


def is_library_file(filename: str) -> bool:
    """True for a file of torch or fxcurv itself, decided by where the file really is (not
    by names in its path: a user's project may well sit in a folder called ``fxcurv``)."""
    return os.path.realpath(filename).startswith(_library_dirs())


_FRAME = re.compile(r'File "(?P<file>.+)", line (?P<line>\d+)')


def source_line(node: fx.Node) -> Optional[str]:
    """The user's source line that created the node (the innermost frame outside torch and
    fxcurv) as ``File "m.py", line 9: <code>``."""
    trace = node.stack_trace or node.meta.get("stack_trace")
    if not trace:
        return None
    lines = trace.strip().splitlines()
    user = None
    for i, line in enumerate(lines):
        match = _FRAME.match(line.strip())
        if match and not is_library_file(match["file"]):
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            user = f'File "{match["file"]}", line {match["line"]}: {code}'
    return user


def user_frame(frames: list) -> Optional[str]:
    """The innermost of ``traceback.FrameSummary`` ``frames`` outside torch and fxcurv, as
    ``File "m.py", line 9: <code>``."""
    for frame in reversed(frames):
        if not is_library_file(frame.filename):
            return f'File "{frame.filename}", line {frame.lineno}: {frame.line}'
    return None


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


# the quantity being compiled, named by every error raised meanwhile (set by
# ``Emitter.requesting`` and by ``compile`` around the passes before any quantity)
_REQUESTED: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "fxcurv_requested", default=None)


@contextlib.contextmanager
def requesting(quantity: str) -> Iterator[None]:
    """Errors raised inside name ``quantity`` (the one the code being compiled is for)."""
    token = _REQUESTED.set(quantity)
    try:
        yield
    finally:
        _REQUESTED.reset(token)


def requested() -> str:
    """The quantity being compiled (``"grad"`` outside any :func:`requesting`)."""
    return _REQUESTED.get() or "grad"


def node_error(node: fx.Node, problem: str, hint: str) -> CompileError:
    """Build a :class:`CompileError` for ``node``: what is wrong, for which quantity (the one
    being compiled, :func:`requesting`), what to do."""
    quantity = _REQUESTED.get()
    needed = f" for quantity '{quantity}'" if quantity else ""
    return CompileError(f"{describe(node)}{needed}: {problem}. {hint}")
