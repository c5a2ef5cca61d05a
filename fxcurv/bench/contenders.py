"""The contenders: ways to compute one quantity on one workload, each a callable that
computes it from scratch (fxcurv's step, BackPACK, plain autograd, vmap, Opacus)."""
from __future__ import annotations

import copy
import importlib
import inspect
import time
import warnings
from typing import Callable, Optional

import torch.nn as nn

from .workloads import CORE_QUANTITIES, Setup, for_backpack

PRODUCTS = {"hmp", "ggnmp", "pchmp_abs", "pchmp_clip"}
NOTES = {"pchmp_abs": "BackPACK's PCHMP squares the gradient in its residual "
                      "(docs/conventions.md)",
         "pchmp_clip": "BackPACK's PCHMP squares the gradient in its residual "
                       "(docs/conventions.md)",
         "grad": "BackPACK: the extended model without an extension"}


def all_quantities() -> list[str]:
    """``grad`` and every quantity fxcurv implements, the core ones first."""
    from ..quantities import QUANTITIES
    rest = [q for q in QUANTITIES if q not in CORE_QUANTITIES]
    return list(CORE_QUANTITIES) + rest


def backpack_extension(quantity: str):
    """``(extension instance or None, savefield)`` of BackPACK 1.7.1 for a quantity;
    ``KeyError`` when BackPACK has none."""
    from backpack import extensions as ext
    table = {
        "grad": (None, None), "batch_grad": (ext.BatchGrad(), "grad_batch"),
        "batch_l2": (ext.BatchL2Grad(), "batch_l2"),
        "sum_grad_squared": (ext.SumGradSquared(), "sum_grad_squared"),
        "variance": (ext.Variance(), "variance"),
        "diag_ggn_exact": (ext.DiagGGNExact(), "diag_ggn_exact"),
        "diag_ggn_mc": (ext.DiagGGNMC(mc_samples=1), "diag_ggn_mc"),
        "diag_ggn_exact_batch": (ext.BatchDiagGGNExact(), "diag_ggn_exact_batch"),
        "diag_ggn_mc_batch": (ext.BatchDiagGGNMC(mc_samples=1), "diag_ggn_mc_batch"),
        "sqrt_ggn_exact": (ext.SqrtGGNExact(), "sqrt_ggn_exact"),
        "sqrt_ggn_mc": (ext.SqrtGGNMC(mc_samples=1), "sqrt_ggn_mc"),
        "kfac": (ext.KFAC(mc_samples=1), "kfac"), "kflr": (ext.KFLR(), "kflr"),
        "kfra": (ext.KFRA(), "kfra"), "diag_h": (ext.DiagHessian(), "diag_h"),
        "diag_h_batch": (ext.BatchDiagHessian(), "diag_h_batch"),
        "hmp": (ext.HMP(), "hmp"), "ggnmp": (ext.GGNMP(), "ggnmp"),
        "pchmp_abs": (ext.PCHMP(modify="abs"), "pchmp"),
        "pchmp_clip": (ext.PCHMP(modify="clip"), "pchmp"),
    }
    return table[quantity]


def _trainable(model: nn.Module) -> list:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


class Contender:
    """One way to compute a quantity: ``call()`` computes it from scratch and returns it;
    ``clear()`` first frees what the previous call left on the model (grads, BackPACK's or
    Opacus' per-parameter fields), as a training loop's ``zero_grad`` does. ``compile_s``:
    seconds its construction took (fxcurv: ``fxcurv.compile``)."""

    def __init__(self, call: Callable[[], object], params: list = (), fields: tuple = (),
                 clear_to: object = "delete"):
        self._call, self._params, self._fields = call, list(params), fields
        self._clear_to = clear_to
        self.compile_s: Optional[float] = None

    def clear(self) -> None:
        for _, p in self._params:
            p.grad = None
            for field in self._fields:
                if self._clear_to != "delete":
                    setattr(p, field, self._clear_to)
                elif hasattr(p, field):
                    delattr(p, field)

    def __call__(self):
        self.clear()
        return self._call()


def make_fxcurv(setup: Setup, quantity: str, backend: Optional[str] = None) -> Contender:
    """The step of ``fxcurv.compile`` with the defaults a user gets (its first call, which
    may also check itself against autograd, is a warm-up call: reported, never timed) and
    the workload's ``compile_options`` that this version of ``fxcurv.compile`` accepts."""
    import fxcurv
    known = inspect.signature(fxcurv.compile).parameters
    options = {k: v for k, v in setup.compile_options.items() if k in known}
    started = time.perf_counter()
    step = fxcurv.compile(setup.model, setup.loss_fn, [] if quantity == "grad" else [quantity],
                          mc_samples=1, backend=backend, **options)
    if quantity in PRODUCTS:
        contender = Contender(lambda: step(setup.x, setup.y, setup.vectors))
    else:
        contender = Contender(lambda: step(setup.x, setup.y))
    contender.compile_s = time.perf_counter() - started
    return contender


def make_fxcurv_inductor(setup: Setup, quantity: str) -> Contender:
    """The fxcurv step with ``backend="inductor"`` (``torch.compile`` on its first call)."""
    return make_fxcurv(setup, quantity, backend="inductor")


def make_backpack(setup: Setup, quantity: str) -> Contender:
    """``extend``-ed copies of model and loss; forward and backward inside
    ``with backpack(extension)``; products are then applied to the vectors."""
    import backpack
    try:
        extension, field = backpack_extension(quantity)
    except KeyError:
        raise NotImplementedError(f"BackPACK has no extension for {quantity}") from None
    model = backpack.extend(for_backpack(copy.deepcopy(setup.model)))
    loss_fn = backpack.extend(copy.deepcopy(setup.loss_fn))
    params, extensions = _trainable(model), [extension] if extension is not None else []

    def call():
        with backpack.backpack(*extensions):
            loss = loss_fn(model(setup.x), setup.y)
            loss.backward()
        if field is None:
            return loss, [p.grad for _, p in params]
        missing = [name for name, p in params if not hasattr(p, field)]
        if missing:
            raise NotImplementedError(f"BackPACK sets no {field} on {', '.join(missing)} "
                                      "(a layer it does not support)")
        values = [getattr(p, field) for _, p in params]
        if quantity in PRODUCTS:
            values = [value(setup.vectors[name]) for (name, _), value in zip(params, values)]
        return loss, values

    return Contender(call, params, (field,) if field else ())


def make_autograd(setup: Setup, quantity: str = "grad") -> Contender:
    """Plain forward and ``loss.backward()``: the gradient only, the baseline."""
    model, params = setup.model, _trainable(setup.model)

    def call():
        loss = setup.loss_fn(model(setup.x), setup.y)
        loss.backward()
        return loss, [p.grad for _, p in params]

    return Contender(call, params)


def make_vmap(setup: Setup, quantity: str = "batch_grad") -> Contender:
    """Per-sample gradients by ``torch.func.vmap(grad)``."""
    from torch.func import functional_call, grad_and_value, vmap
    model, loss_fn, n = setup.model, setup.loss_fn, setup.x.size(0)
    params = {name: p.detach() for name, p in _trainable(model)}
    buffers = dict(model.named_buffers())

    def sample_loss(p, x, y):  # the sample's share of the mean loss, as BackPACK's grad_batch
        out = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0)) / n

    per_sample = vmap(grad_and_value(sample_loss), in_dims=(None, 0, 0))
    return Contender(lambda: per_sample(params, setup.x, setup.y))


def make_opacus(setup: Setup, quantity: str = "batch_grad") -> Contender:
    """Per-sample gradients by Opacus' ``GradSampleModule``."""
    from opacus import GradSampleModule
    model = GradSampleModule(copy.deepcopy(setup.model), loss_reduction="mean")
    loss_fn, params = setup.loss_fn, _trainable(model)

    def call():
        loss = loss_fn(model(setup.x), setup.y)
        loss.backward()
        return loss, [p.grad_sample for _, p in params]

    return Contender(call, params, ("grad_sample",), clear_to=None)


MAKERS = {"fxcurv": make_fxcurv, "fxcurv+inductor": make_fxcurv_inductor,
          "BackPACK": make_backpack, "autograd": make_autograd,
          "vmap(grad)": make_vmap, "Opacus": make_opacus}


def opacus_available() -> bool:
    try:
        importlib.import_module("opacus")
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True


def contenders_for(quantity: str, opacus: bool, inductor: bool = False) -> list[str]:
    names = ["fxcurv"] + (["fxcurv+inductor"] if inductor else []) + ["BackPACK", "autograd"]
    if quantity == "batch_grad":
        names += ["vmap(grad)"] + (["Opacus"] if opacus else [])
    return names


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def quiet_warnings() -> None:
    """BackPACK and Opacus warn on every call in these settings (hooks on inputs without
    grad, Kronecker factor conventions, secure RNG): expected, not news."""
    for pattern in ["Full backward hook is firing", "The Kronecker factors stored",
                    "Secure RNG turned off", "Using a non-full backward hook"]:
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", module=r"(backpack|opacus)(\.|$)")
