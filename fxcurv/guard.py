"""Call-time guards of a compiled step on its plain Python path.

* **Replaced parameters.** The step holds the model's ``Parameter`` objects. Before every call
  it checks (a few dict look-ups per parameter) that the model still has them at the same
  place: ``model.head.weight = nn.Parameter(...)``, ``model.head = nn.Linear(...)`` or
  ``load_state_dict(..., assign=True)`` after ``compile`` raise :class:`StepError` ("compile
  again") instead of silently using the old tensors. In-place changes (``optimizer.step()``,
  ``load_state_dict``, ``.to(device)``) keep the objects and are seen live.
* **First-call check** (``compile(..., verify=True)``, the default). The first call also runs
  ``loss_fn(model(x), y)`` eagerly with autograd on the same inputs (on copies of the
  buffers, with the train/eval modes of compile time, without the hooks of
  ``backpack.extend``, so an active ``with backpack(...)`` block runs nothing) and compares
  loss and gradient within the dtype's tolerance (of the least precise dtype the step computes
  in: a conversion in the model, or an active ``torch.autocast`` region around the call, where
  eager autograd runs too): a blind spot of the symbolic trace becomes a loud
  :class:`StepError` instead of a silently wrong number. Skipped, with a warning, when the
  forward draws random numbers (train-mode dropout: the eager draws would differ), for a
  data-parallel step (it returns global results), and in a process forked after its parent
  ran autograd (autograd cannot run there).

* **Autocast.** A call inside ``torch.autocast`` (mixed precision) runs the step's matrix
  products in the autocast dtype, as eager autograd's backward does; each parameter's results
  come back in the parameter's dtype, as ``p.grad`` does (a TorchScript or exported step,
  which runs without these hooks, returns them as computed).

The guards are forward hooks of the step. They do nothing while ``torch.compile`` or
``torch.export`` traces the step, and ``torch.jit.script(step)`` scripts a plain copy without
them (TorchScript and exported programs run the generated code alone).
"""
from __future__ import annotations

import contextlib
import math
import sys
import warnings
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
import torch.nn as nn
from torch import Tensor

from .backend import plain_copy
from .errors import StepError, is_library_file
from .trace import module_state_kept, without_backpack_hooks


def install(step: fx.GraphModule, model: nn.Module, loss_fn: Callable, names: list[str],
            verify: bool, skip_reason: Optional[str]) -> None:
    """Attach the guards to ``step`` (``names``: its trainable parameters)."""
    guard = Guard(model, loss_fn, names, verify, skip_reason, lowest_precision(step.graph))
    step.register_forward_pre_hook(guard.before, with_kwargs=True)
    step.register_forward_hook(guard.after, with_kwargs=True)
    type(step).__prepare_scriptable__ = plain_copy  # the step's own class (fx makes one each)
    step.meta["fxcurv"]["verify"] = ("off" if not verify else f"skipped: {skip_reason}"
                                     if skip_reason else "first call")


class Guard:
    """The state behind the hooks: where each parameter lives, and whether the first-call
    check is still to run."""

    def __init__(self, model: nn.Module, loss_fn: Callable, names: list[str], verify: bool,
                 skip_reason: Optional[str], precision: Optional[torch.dtype] = None):
        """``precision``: the float dtype of least precision the step computes in besides
        its inputs' (:func:`lowest_precision`), which sets the check's tolerance."""
        self.model, self.loss_fn, self.names = model, loss_fn, names
        self.precision = precision
        self.edges, self.leaves = _locations(model, names)
        self.pending = verify
        self.skip_reason = skip_reason
        self.modes = [(m, m.training) for m in model.modules()]

    def __reduce__(self):
        """A pickled step (``torch.save``) carries an inert guard, not the model."""
        return Guard, (nn.Module(), None, [], False, None, self.precision)

    def before(self, step: nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.compiler.is_compiling():
            return
        for parent, key, child, name in self.edges:
            if parent._modules.get(key) is not child:
                raise _replaced(name)
        for owner, key, param, name in self.leaves:
            if owner._parameters.get(key) is not param:
                raise _replaced(name)

    def after(self, step: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if torch.compiler.is_compiling():
            return None
        autocast = _autocast_dtype(args[0] if args else kwargs.get("x"))
        if autocast is not None:
            output = self.in_parameter_dtypes(output)
        if self.pending:
            self.first_call_check(args, kwargs, output, autocast)
        return output if autocast is not None else None

    def in_parameter_dtypes(self, output: tuple) -> tuple:
        """``output`` with each parameter's results in that parameter's dtype, as autograd
        gives ``p.grad`` under autocast (the step's matrix products ran in the autocast
        dtype)."""
        dtypes = {name: param.dtype for _, _, param, name in self.leaves}

        def cast(value: Any, dtype: torch.dtype) -> Any:
            return torch.utils._pytree.tree_map(
                lambda t: t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point()
                else t, value)

        loss, *per_parameter = output
        return (loss, *({name: cast(value, dtypes[name]) if name in dtypes else value
                         for name, value in results.items()} if isinstance(results, dict)
                        else results for results in per_parameter))

    def first_call_check(self, args: tuple, kwargs: dict, output: Any,
                         autocast: Optional[torch.dtype]) -> None:
        """Compare the first call's loss and gradient with eager autograd's."""
        if self.skip_reason:
            _note_skipped(self.skip_reason)
        else:
            x, y = _inputs(args, kwargs)
            try:
                with _modes(self.modes), without_backpack_hooks(self.model, self.loss_fn):
                    loss, grads = eager_loss_and_grad(self.model, self.loss_fn, self.names, x, y)
            except RuntimeError as err:
                if "fork" not in str(err):
                    raise
                _note_skipped("autograd cannot run in a process forked after its parent used "
                              "autograd")
            else:
                compare(output[0], output[1], loss, grads,
                        _least_precise(self.precision, autocast))
        self.pending = False


def _note_skipped(reason: str) -> None:
    warnings.warn(f"fxcurv: the first-call check against eager autograd was skipped: {reason}. "
                  "Pass verify=False to fxcurv.compile to silence this note.",
                  stacklevel=_user_stacklevel())


def _user_stacklevel() -> int:
    """``warnings.warn``'s stacklevel (from the caller of this) of the user's frame."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and is_library_file(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    return level


def _locations(model: nn.Module, names: list[str]) -> tuple[list, list]:
    """Every (parent, key, child module) edge on the way to a parameter, and every
    (owner module, key, parameter): what :meth:`Guard.before` checks by identity."""
    edges: dict[tuple, tuple] = {}
    leaves = []
    for name in names:
        *path, key = name.split(".")
        module = model
        for atom in path:
            child = module._modules[atom]
            edges.setdefault((id(module), atom), (module, atom, child, name))
            module = child
        leaves.append((module, key, module._parameters[key], name))
    return list(edges.values()), leaves


def _replaced(name: str) -> StepError:
    return StepError(f"fxcurv: parameter `{name}` was replaced after compile; compile again "
                     "(the step holds the old tensor; in-place updates such as "
                     "optimizer.step(), load_state_dict or model.to(device) are seen live).")


def _inputs(args: tuple, kwargs: dict) -> tuple[Any, Any]:
    """``x`` and ``y`` of a call, given positionally or by name."""
    values = list(args) + [kwargs[name] for name in ("x", "y")[len(args):]]
    return values[0], values[1]


@contextlib.contextmanager
def _modes(modes: list):
    """The train/eval modes of compile time (the step froze them), restored afterwards."""
    now = [(m, m.training) for m, _ in modes]
    try:
        for module, training in modes:
            module.training = training
        yield
    finally:
        for module, training in now:
            module.training = training


def eager_loss_and_grad(model: nn.Module, loss_fn: Callable, names: list[str], x: Any,
                        y: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """``loss_fn(model(x), y)`` and its gradient by eager autograd; the model's buffers are
    replaced by copies for the call (BatchNorm's running statistics stay untouched), and what
    the forward stores on modules is undone (``trace.module_state_kept``: caches)."""
    params = [model.get_parameter(name) for name in names]
    with torch.inference_mode(False), torch.enable_grad(), module_state_kept(model, warn=False):
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        x, y = (t.clone() if isinstance(t, Tensor) and t.is_inference() else t for t in (x, y))
        output = torch.func.functional_call(model, buffers, (x,), strict=False)
        loss = loss_fn(output, y)
        grads = _gradients(loss, params)
    grads = {name: torch.zeros_like(p) if g is None else g
             for name, p, g in zip(names, params, grads)}
    return loss.detach(), grads


def _gradients(loss: Tensor, params: list) -> tuple:
    """``∂loss/∂params`` by ``torch.autograd.grad``, or where the model checkpoints with
    ``use_reentrant=True`` (which refuses ``grad``) by ``backward``, the parameters' ``.grad``
    set aside and restored."""
    try:
        return torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    except RuntimeError as err:
        if "use_reentrant" not in str(err):
            raise
    kept = [p.grad for p in params]
    try:
        for p in params:
            p.grad = None
        loss.backward()
        return tuple(p.grad for p in params)
    finally:
        for p, grad in zip(params, kept):
            p.grad = grad


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of the check: ``8·√eps`` (float32: 2.8e-3, float64: 1.2e-7)."""
    return 8 * math.sqrt(torch.finfo(dtype).eps)


# conversions by method name to a float dtype
_CONVERSIONS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16}


def lowest_precision(graph: fx.Graph) -> Optional[torch.dtype]:
    """The float dtype of least precision named in ``graph``: by a conversion
    (``v.float()``, ``h.to(torch.float32)``: EfficientViT's attention and LLaMA's RMSNorm
    compute in float32 whatever the model's dtype) or as a dtype argument; None if none is.
    Eager autograd rounds in another order there, so the check allows that dtype's
    tolerance."""
    found: list = []
    for node in graph.nodes:
        if node.op == "call_method" and node.target in _CONVERSIONS:
            found.append(_CONVERSIONS[node.target])
        fx.node.map_aggregate((node.args, node.kwargs), lambda a: found.append(a) if
                              isinstance(a, torch.dtype) and a.is_floating_point else None)
    return _least_precise(*found)


def _autocast_dtype(x: Any) -> Optional[torch.dtype]:
    """The dtype of an autocast region the call runs in (``torch.autocast("cuda",
    torch.bfloat16)`` around ``step(x, y)``) on ``x``'s device, else None: the step and eager
    autograd then both compute matrix products in it, rounding in a different order."""
    first = next((t for t in torch.utils._pytree.tree_leaves(x) if isinstance(t, Tensor)), None)
    device = first.device.type if first is not None else "cpu"
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def _least_precise(*dtypes: Optional[torch.dtype]) -> Optional[torch.dtype]:
    return max((d for d in dtypes if d is not None), key=lambda d: torch.finfo(d).eps,
               default=None)


def compare(loss: Tensor, grad: dict[str, Tensor], eager_loss: Tensor,
            eager_grad: dict[str, Tensor], precision: Optional[torch.dtype] = None) -> None:
    """Raise :class:`StepError` where the step's loss or gradient differs from eager autograd
    by more than :func:`tolerance` (of the loss's dtype, or of ``precision`` where the step
    computes in a less precise one): relative to each gradient's largest entry, with a floor
    of 1% of the largest entry of the whole gradient (a gradient that is zero up to rounding,
    e.g. a bias before BatchNorm, is noise in both), plus ``10 eps |loss|`` (a whole gradient
    at rounding level, e.g. of a loss flat in the parameters)."""
    tol = max(tolerance(eager_loss.dtype), tolerance(precision) if precision else 0.0)
    error, scale = _error(loss, eager_loss), eager_loss.abs().item()
    if not error <= tol * max(scale, loss.abs().item()) + torch.finfo(eager_loss.dtype).eps:
        raise _mismatch("loss", loss.item(), eager_loss.item(), tol)
    floor = 0.01 * max((g.abs().max().item() for g in eager_grad.values() if g.numel()),
                       default=0.0)
    rounding = 10 * torch.finfo(eager_loss.dtype).eps * scale
    for name, expected in eager_grad.items():
        if expected.numel() == 0:
            continue
        error, scale = _error(grad[name], expected), expected.abs().max().item()
        if not error <= tol * (scale + floor) + rounding:
            raise _mismatch(f"gradient of `{name}`", error, scale, tol)


def _error(value: Tensor, expected: Tensor) -> float:
    """Largest absolute difference; NaN where both are NaN counts as equal."""
    diff = (value.detach().to(expected.dtype) - expected).abs()
    both_nan = value.isnan() & expected.isnan()
    return diff.masked_fill(both_nan, 0.0).nan_to_num(nan=math.inf).max().item()


def _mismatch(what: str, first: float, second: float, tol: float) -> StepError:
    numbers = (f"step {first:.6g}, eager autograd {second:.6g}" if what == "loss" else
               f"largest difference {first:.3g}, largest entry {second:.3g}")
    return StepError(
        f"fxcurv: the first-call check failed: the step's {what} differs from eager autograd's "
        f"({numbers}, relative tolerance {tol:.2g}). The compiled graph does not compute what "
        "the model computes in eager PyTorch, which is a blind spot of the symbolic trace "
        "(e.g. in-place ops on views, grad-mode regions, custom autograd Functions, module "
        "hooks). Please report it with the model; compile(..., verify=False) skips the check.")
