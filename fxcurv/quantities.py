"""Quantity names (BackPACK's savefields), aliases, and what each one needs."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import CompileError


@dataclass(frozen=True)
class Quantity:
    name: str
    family: str          # "first_order", "ggn", "hessian", "product"
    per_sample: bool     # needs the sample axis kept apart (undefined for BatchNorm train)
    implemented: bool
    doc: str
    source: str = ""     # the propagation it reads: "grad", "ggn_exact", "ggn_mc"
    extract: str = ""    # the passes.per_sample.PerSample method that computes it


_ALL = [
    Quantity("batch_grad", "first_order", True, True, "per-sample gradients [N, *p.shape]",
             "grad", "batch"),
    Quantity("batch_l2", "first_order", True, True, "squared norms of per-sample gradients [N]",
             "grad", "batch_l2"),
    Quantity("sum_grad_squared", "first_order", True, True, "Σ_n g_n² (p.shape)",
             "grad", "sum_squares"),
    Quantity("variance", "first_order", True, True, "Σ_n g_n²/N - (Σ_n g_n/N)² (p.shape)",
             "grad", "variance"),
    Quantity("diag_ggn_exact", "ggn", True, True, "diagonal of the GGN (p.shape)",
             "ggn_exact", "sum_squares"),
    Quantity("diag_ggn_mc", "ggn", True, True, "Monte-Carlo diagonal of the GGN (p.shape)",
             "ggn_mc", "sum_squares"),
    Quantity("diag_ggn_exact_batch", "ggn", True, True, "per-sample GGN diagonals [N, *p.shape]",
             "ggn_exact", "batch_sum_squares"),
    Quantity("diag_ggn_mc_batch", "ggn", True, True, "per-sample MC GGN diagonals [N, *p.shape]",
             "ggn_mc", "batch_sum_squares"),
    Quantity("sqrt_ggn_exact", "ggn", True, True, "square-root GGN factor [C, N, *p.shape]",
             "ggn_exact", "batch"),
    Quantity("sqrt_ggn_mc", "ggn", True, True, "MC square-root GGN factor [M, N, *p.shape]",
             "ggn_mc", "batch"),
    Quantity("kfac", "ggn", True, True,
             "Kronecker factors [G, A] (weights) / [G] (biases; others: GGN block), MC",
             "ggn_mc", "kron"),
    Quantity("kflr", "ggn", True, True,
             "Kronecker factors [G, A] (weights) / [G] (biases; others: GGN block), exact",
             "ggn_exact", "kron"),
    Quantity("kfra", "ggn", True, True,
             "Kronecker factors [G, A] / [G] from the batch-averaged GGN (chains only)",
             "kfra", "kron"),
    Quantity("diag_h", "hessian", True, True, "diagonal of the Hessian (p.shape)",
             "hessian", "sum_squares"),
    Quantity("diag_h_batch", "hessian", True, True, "per-sample Hessian diagonals [N, *p.shape]",
             "hessian", "batch_sum_squares"),
    Quantity("hmp", "product", True, True, "Hessian block times vectors [V, *p.shape]",
             "hessian", "product"),
    Quantity("ggnmp", "product", True, True, "GGN block times vectors [V, *p.shape]",
             "ggn_exact", "product"),
    Quantity("pchmp_abs", "product", True, True,
             "positive-curvature Hessian (|residual|) block times vectors [V, *p.shape]",
             "pch_abs", "product"),
    Quantity("pchmp_clip", "product", True, True,
             "positive-curvature Hessian (residual clipped at 0) block times vectors",
             "pch_clip", "product"),
]
QUANTITIES: dict[str, Quantity] = {q.name: q for q in _ALL}
ALIASES = {"grad_batch": "batch_grad"}


def resolve(names) -> list[tuple[str, Quantity]]:
    """Validate requested names; return ``(name as requested, Quantity)`` in request order."""
    if isinstance(names, str):
        raise CompileError(f"quantities must be a list of names, got the string {names!r}; "
                           f"write [{names!r}].")
    resolved, seen = [], set()
    for name in names:
        canonical = ALIASES.get(name, name)
        if canonical not in QUANTITIES:
            valid = ", ".join(sorted(list(QUANTITIES) + list(ALIASES)))
            raise CompileError(f"unknown quantity {name!r}. Valid quantities: {valid}.")
        if name in seen:
            raise CompileError(f"quantity {name!r} is requested twice.")
        seen.add(name)
        quantity = QUANTITIES[canonical]
        if not quantity.implemented:
            done = ", ".join(q.name for q in _ALL if q.implemented)
            raise CompileError(f"quantity {name!r} is not implemented in this version of "
                               f"fxcurv yet (see the README's support table). "
                               f"Implemented: {done}.")
        resolved.append((name, quantity))
    return resolved
