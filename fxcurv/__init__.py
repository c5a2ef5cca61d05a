"""fxcurv: a torch.fx graph-rewriting compiler for curvature.

``step = fxcurv.compile(model, loss_fn, ["batch_grad", ...])`` traces model and loss into one
graph, writes the backward pass and every requested quantity out as graph nodes, and returns a
``torch.fx.GraphModule``: ``loss, grad, *quantities = step(x, y)``.
"""
from .compile import compile  # noqa: A004 - the public name is fxcurv.compile
from .errors import CompileError, StepError
from .quantities import ALIASES, QUANTITIES
from . import optim

__all__ = ["compile", "CompileError", "StepError", "QUANTITIES", "ALIASES"]
__version__ = "0.1.0"
