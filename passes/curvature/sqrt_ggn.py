"""Square-root GGN propagation: ``G = Σ_n J_nᵀ H_n J_n = Σ_n (J_nᵀ S_n)(J_nᵀ S_n)ᵀ``.

The loss factors its Hessian w.r.t. the model output (``loss_hessian.loss_factor``), ``H_n = S_n S_nᵀ`` with ``S``
``[C, N, *output]`` (exact) or ``[M, N, *output]`` (Monte-Carlo, ``E[S Sᵀ] = H``); the same
Jacobian-transpose rules as the gradient then carry ``S`` back with one leading vector axis
(``backward(..., lead=1)``). One propagation serves every quantity that needs it.

Where an op couples the rows of the batch (BatchNorm in train mode), the batch counts as one
sample with ``H = diag(H_n)``: the exact factor's ``K`` columns per sample become ``K·N``
sample-local ones (:func:`~.factors.rows_apart`), so that the propagation keeps every
``J_nᵀ S_n`` apart; a Monte-Carlo factor keeps its ``M`` columns, each a draw of all labels
(``E[S Sᵀ] = diag(H_n)`` still).
"""
from __future__ import annotations

from typing import Any


from fxcurv.emit import Emitter

from ..backward import backward
from .factors import rows_apart
from .loss_hessian import loss_seeds

def propagate_sqrt_ggn(emit: Emitter, traced, gradient: dict, kind: str, mc_samples: int,
                       low_rank: bool = False) -> tuple[dict, Any]:
    """Emit the loss factor ``S`` and its backward propagation to the parameters; return the
    cotangents and the size of the leading axis (C or M) as a graph value. ``low_rank``: no
    quantity reads the columns one by one, so an exact factor may have fewer of them (the
    same ``S Sᵀ``: cross-entropy's ``C - 1``)."""
    seeds = loss_seeds(emit, traced, gradient, kind, mc_samples, low_rank)
    if kind == "exact" and traced.memo.get("coupled"):
        with emit.naming(f"sqrt_ggn_{kind}_rows_apart"):
            seeds = {node: emit.call(rows_apart, factor) for node, factor in seeds.items()}
    factor = next(iter(seeds.values()))
    if kind == "exact":  # one column per class: may run in chunks (passes/chunking.py)
        factor.node.meta["fxcurv"] = {**factor.node.meta.get("fxcurv", {}), "columns": True}
    with emit.naming(f"sqrt_ggn_{kind}"):
        lead_size = factor.size(0)
    emit.rename(lead_size, f"sqrt_ggn_{kind}_columns")
    cotangents = backward(emit, seeds, traced.params.values(), lead=1,
                          tag=f"sqrt_ggn_{kind}")
    return cotangents, lead_size
