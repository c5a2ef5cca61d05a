"""Square-root GGN propagation: ``G = Σ_n J_nᵀ H_n J_n = Σ_n (J_nᵀ S_n)(J_nᵀ S_n)ᵀ``.

The loss rule factors its Hessian w.r.t. the model output, ``H_n = S_n S_nᵀ`` with ``S``
``[C, N, *output]`` (exact) or ``[M, N, *output]`` (Monte-Carlo, ``E[S Sᵀ] = H``); the same
Jacobian-transpose rules as the gradient then carry ``S`` back with one leading vector axis
(``backward(..., lead=1)``). One propagation serves every quantity that needs it.
"""
from __future__ import annotations

from typing import Any

import torch.fx as fx

from fxcurv.emit import Emitter
from fxcurv.errors import CompileError, node_error
from fxcurv.rules import Ctx, rule_for

from ..backward import backward

SUPPORTED_LOSSES = ("cross_entropy", "mse_loss", "binary_cross_entropy_with_logits")


def propagate_sqrt_ggn(emit: Emitter, loss: fx.Node, params, kind: str, mc_samples: int,
                       quantity: str) -> tuple[dict, Any]:
    """Emit ``S`` at the loss input and its backward propagation; return the cotangents and
    the size of the leading axis (C or M) as a graph value."""
    rule = rule_for(loss)
    if rule is None or rule.sqrt_hessian is None:
        raise _loss_error(loss, quantity)
    ctx = Ctx.of(loss, rule, emit)
    with emit.naming(f"{loss.name}_sqrt_hessian_{kind}", pass_="sqrt_ggn"):
        factor = rule.sqrt_hessian(ctx) if kind == "exact" else \
            rule.sqrt_hessian_mc(ctx, mc_samples)
    emit.rename(factor, f"loss_sqrt_hessian_{kind}")
    with emit.naming(f"sqrt_ggn_{kind}"):
        lead_size = factor.size(0)
    emit.rename(lead_size, f"sqrt_ggn_{kind}_columns")
    seeds = {ctx.bound["input"]: factor}
    cotangents = backward(emit, seeds, params, lead=1, tag=f"sqrt_ggn_{kind}", quantity=quantity)
    return cotangents, lead_size


def _loss_error(loss: fx.Node, quantity: str) -> CompileError:
    supported = ", ".join(SUPPORTED_LOSSES)
    return node_error(loss, "the GGN family needs the loss's Hessian square root, and this "
                      "final op has none", f"Use one of {supported} as the last op of the loss "
                      "(NLL after log_softmax: use cross_entropy on the logits).", quantity)
