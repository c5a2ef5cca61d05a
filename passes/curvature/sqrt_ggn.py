"""Square-root GGN propagation: ``G = Σ_n J_nᵀ H_n J_n = Σ_n (J_nᵀ S_n)(J_nᵀ S_n)ᵀ``.

The loss factors its Hessian w.r.t. the model output (``loss_hessian.loss_factor``), ``H_n = S_n S_nᵀ`` with ``S``
``[C, N, *output]`` (exact) or ``[M, N, *output]`` (Monte-Carlo, ``E[S Sᵀ] = H``); the same
Jacobian-transpose rules as the gradient then carry ``S`` back with one leading vector axis
(``backward(..., lead=1)``). One propagation serves every quantity that needs it.
"""
from __future__ import annotations

from typing import Any


from fxcurv.emit import Emitter

from ..backward import backward
from .loss_hessian import loss_seeds

def propagate_sqrt_ggn(emit: Emitter, traced, gradient: dict, kind: str, mc_samples: int,
                       low_rank: bool = False) -> tuple[dict, Any]:
    """Emit the loss factor ``S`` and its backward propagation to the parameters; return the
    cotangents and the size of the leading axis (C or M) as a graph value. ``low_rank``: no
    quantity reads the columns one by one, so an exact factor may have fewer of them (the
    same ``S Sᵀ``: cross-entropy's ``C - 1``)."""
    seeds = loss_seeds(emit, traced, gradient, kind, mc_samples, low_rank)
    factor = next(iter(seeds.values()))
    if kind == "exact":  # one column per class: may run in chunks (passes/chunking.py)
        factor.node.meta["fxcurv"] = {**factor.node.meta.get("fxcurv", {}), "columns": True}
    with emit.naming(f"sqrt_ggn_{kind}"):
        lead_size = factor.size(0)
    emit.rename(lead_size, f"sqrt_ggn_{kind}_columns")
    cotangents = backward(emit, seeds, traced.params.values(), lead=1,
                          tag=f"sqrt_ggn_{kind}")
    return cotangents, lead_size
