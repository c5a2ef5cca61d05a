"""``fxcurv.compile(..., backend=...)``: run the generated step through ``torch.compile``.

``backend="auto"`` (the default) decides from the device of the model's parameters when
``compile`` runs (:func:`auto_backend`): on CPU the plain step (eager torch; compiling gains
little there and costs seconds per new shape); on CUDA ``torch.compile`` with inductor, in
``mode="reduce-overhead"`` (CUDA graphs: one launch for the step's many small kernels) unless
the step draws random numbers (Monte-Carlo quantities, dropout) or runs collectives
(``process_group``), where plain inductor is used. Batch sizes that change make inductor
compile a dynamic graph, which it runs without CUDA graphs. Without triton, the plain step.
The CUDA choice is not yet measured on a GPU.

The step stays the readable ``torch.fx.GraphModule`` (``step.code``, ``step.graph``); only its
``forward`` is routed through ``torch.compile(<the generated forward>, backend=backend)``, so the
first call compiles (and a call with a new batch size may recompile once, with the batch axis
dynamic from then on). ``torch.jit.script(step)`` scripts the generated code itself: the
compiled kernels are not TorchScript, and the scripted step computes the same values.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Optional, Tuple, Union

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .errors import CompileError

Backend = Union[str, Callable, None]
CUDA_GRAPHS = "reduce-overhead"


def auto_backend(device: torch.device, random: bool, distributed: bool,
                 has_triton: bool) -> Tuple[Optional[str], Optional[str]]:
    """``(backend, mode)`` that ``backend="auto"`` picks: ``(None, None)`` (the plain step)
    off CUDA or without triton; ``("inductor", "reduce-overhead")`` (CUDA graphs) on CUDA;
    ``("inductor", None)`` there when the step draws random numbers or runs collectives."""
    if device.type != "cuda" or not has_triton:
        return None, None
    if random or distributed:
        return "inductor", None
    return "inductor", CUDA_GRAPHS


def resolve_backend(backend: Backend, device: torch.device, random: bool,
                    distributed: bool) -> Tuple[Backend, Optional[str]]:
    """``backend`` as ``(backend, mode)``; ``"auto"`` through :func:`auto_backend`."""
    if isinstance(backend, str) and backend == "auto":
        return auto_backend(device, random, distributed, _has_triton())
    return backend, None


def _has_triton() -> bool:
    try:
        from torch.utils._triton import has_triton  # noqa: PLC0415
    except ImportError:  # pragma: no cover
        return False
    return bool(has_triton())


def with_backend(step: fx.GraphModule, backend: Backend,
                 mode: Optional[str] = None) -> fx.GraphModule:
    """``step`` with its ``forward`` compiled by ``torch.compile(backend=backend,
    mode=mode)``; ``None``: ``step`` unchanged. Under CUDA graphs the results are copied out
    of the graph's memory pool, which the next call overwrites."""
    if backend is None:
        return step
    _check_backend(backend)
    plain_forward = step.forward  # the generated code, bound to ``step``
    options = {"mode": mode} if mode is not None else {}
    compiled = torch.compile(plain_forward, backend=backend, **options)
    step.forward = _copying(compiled) if mode == CUDA_GRAPHS else compiled
    type(step).__prepare_scriptable__ = plain_copy  # the step's own class (fx makes one each)
    step.meta["fxcurv"]["backend"] = backend if isinstance(backend, str) else repr(backend)
    if mode is not None:
        step.meta["fxcurv"]["mode"] = mode
    return step


def _copying(forward: Callable) -> Callable:
    """``forward`` whose tensor results are fresh copies (results kept across calls, as an
    optimizer's running averages, stay valid)."""
    def run(*args: Any) -> Any:
        return pytree.tree_map_only(torch.Tensor, torch.clone, forward(*args))
    return run


def plain_copy(step: fx.GraphModule) -> fx.GraphModule:
    """What ``torch.jit.script`` compiles: the generated code on the same parameters (not for
    a tuple/list/dict input or target, which the code reads by key: TorchScript types ``x``
    and ``y`` as tensors)."""
    if step.meta["fxcurv"].get("structured"):
        raise RuntimeError("fxcurv: torch.jit.script cannot script a step whose input x or "
                           "target y is a tuple, list or dict of tensors (TorchScript types "
                           "them as tensors); torch.export.export(step, (x, y)) exports it")
    plain = fx.GraphModule(step, copy.deepcopy(step.graph), class_name="FxcurvStep")
    plain.meta = dict(step.meta)
    return plain


def _check_backend(backend: Any) -> None:
    """A registered ``torch.compile`` backend name or a callable backend."""
    if callable(backend):
        return
    names = torch._dynamo.list_backends(exclude_tags=())
    if not isinstance(backend, str) or backend not in names:
        raise CompileError(f"backend={backend!r} is not a torch.compile backend. Use 'auto' "
                           "(default), None (the plain GraphModule), a backend name such as 'inductor', "
                           "'aot_eager' or 'eager' (all: torch._dynamo.list_backends("
                           "exclude_tags=())), or a callable torch.compile backend.")
