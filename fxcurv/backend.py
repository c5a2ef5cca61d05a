"""``fxcurv.compile(..., backend=...)``: run the generated step through ``torch.compile``.

The step stays the readable ``torch.fx.GraphModule`` (``step.code``, ``step.graph``); only its
``forward`` is routed through ``torch.compile(<the generated forward>, backend=backend)``, so the
first call compiles (and a call with a new batch size may recompile once, with the batch axis
dynamic from then on). ``torch.jit.script(step)`` scripts the generated code itself: the
compiled kernels are not TorchScript, and the scripted step computes the same values.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Union

import torch
import torch.fx as fx

from .errors import CompileError

Backend = Union[str, Callable, None]


def with_backend(step: fx.GraphModule, backend: Backend) -> fx.GraphModule:
    """``step`` with its ``forward`` compiled by ``torch.compile(backend=backend)``; ``None``:
    ``step`` unchanged."""
    if backend is None:
        return step
    _check_backend(backend)
    plain_forward = step.forward  # the generated code, bound to ``step``
    step.forward = torch.compile(plain_forward, backend=backend)
    type(step).__prepare_scriptable__ = plain_copy  # the step's own class (fx makes one each)
    step.meta["fxcurv"]["backend"] = backend if isinstance(backend, str) else repr(backend)
    return step


def plain_copy(step: fx.GraphModule) -> fx.GraphModule:
    """What ``torch.jit.script`` compiles: the generated code on the same parameters."""
    plain = fx.GraphModule(step, copy.deepcopy(step.graph), class_name="FxcurvStep")
    plain.meta = dict(step.meta)
    return plain


def _check_backend(backend: Any) -> None:
    """A registered ``torch.compile`` backend name or a callable backend."""
    if callable(backend):
        return
    names = torch._dynamo.list_backends(exclude_tags=())
    if not isinstance(backend, str) or backend not in names:
        raise CompileError(f"backend={backend!r} is not a torch.compile backend. Use None (the "
                           "plain GraphModule), a backend name such as 'inductor', "
                           "'aot_eager' or 'eager' (all: torch._dynamo.list_backends("
                           "exclude_tags=())), or a callable torch.compile backend.")
