"""Quantity names (BackPACK's savefields), aliases, and what each one is made of.

One declarative table: each quantity names

* the :class:`Propagation` it reads: the gradient, a square-root factor of the GGN (exact or
  Monte-Carlo), KFRA's batch-averaged matrices, or the exact GGN plus the positive and
  negative residual parts of the Hessian with their ``signs`` (``+1, -1``: the Hessian;
  ``|·|`` and clipping: the positive-curvature Hessians);
* the :class:`Extraction` that turns it into one value per parameter (the ``PerSample``
  method that implements it, the extra per-parameter inputs it reads, whether its result is
  as big as the propagation, ``[*lead, N, *p.shape]``);
* its data-parallel :class:`Reduction` (``passes/distributed.py``);
* how a regulariser's exact Hessian enters it (``regulariser``: ``"exact"``, ``"abs"``,
  ``"clip"``, or None: the quantity is refused with a regulariser).

``compile`` walks the table: it builds each propagation once and calls each extraction.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .errors import CompileError


@dataclass(frozen=True)
class Propagation:
    """What extractions read. ``factor``: a propagated square root of the loss Hessian
    (``"exact"``, ``"mc"``); ``signs``: the weights of the positive and negative residual
    parts added to the exact GGN (the Hessian family); ``kfra``: KFRA's matrices."""

    name: str
    factor: Optional[str] = None
    signs: Optional[tuple[float, float]] = None
    kfra: bool = False


GRADIENT = Propagation("grad")
GGN_EXACT = Propagation("ggn_exact", factor="exact")
GGN_MC = Propagation("ggn_mc", factor="mc")
KFRA = Propagation("kfra", kfra=True)
HESSIAN = Propagation("hessian", signs=(1.0, -1.0))
PCH_ABS = Propagation("pch_abs", signs=(1.0, 1.0))
PCH_CLIP = Propagation("pch_clip", signs=(1.0, 0.0))
# the square-root factors of every op's residual parts, with their signs (no quantity reads
# them directly: the Hessian family adds them to the exact GGN)
RESIDUALS = Propagation("residuals")


@dataclass(frozen=True)
class Extraction:
    """One value per parameter from a propagation: the ``PerSample`` method ``method``
    implements it (``passes/per_sample.py``, ``@extracts``); ``reads``: extra per-parameter
    inputs (``"grad"``, ``"vectors"``); ``propagation_sized``: the result is
    ``[*lead, N, *p.shape]`` (computed last, ``passes/schedule.py``)."""

    method: str
    reads: tuple = ()
    propagation_sized: bool = False


BATCH = Extraction("batch", propagation_sized=True)
BATCH_L2 = Extraction("batch_l2")
SUM_SQUARES = Extraction("sum_squares")
BATCH_SUM_SQUARES = Extraction("batch_sum_squares", propagation_sized=True)
VARIANCE = Extraction("variance", reads=("grad",))
KRON = Extraction("kron")
PRODUCT = Extraction("product", reads=("vectors",))


@dataclass(frozen=True)
class Reduction:
    """How one quantity becomes global under data parallelism: ``kind`` of collective
    ("sum", "gather", "variance", "kron", "kfra"), the divisor ``part`` its scaling comes
    from ("gradient", "hessian", or "both": a sum of terms of each) and the ``power`` of
    ``1/divisor`` it carries, its sample ``axis``."""

    kind: str
    part: str
    power: float = 1.0
    axis: int = 0


@dataclass(frozen=True)
class Quantity:
    name: str
    family: str          # "first_order", "ggn", "hessian", "product"
    doc: str
    source: Propagation
    extract: Extraction
    reduction: Reduction
    regulariser: Optional[str] = None  # "exact", "abs", "clip"; None: refused with one
    per_sample: bool = True  # needs the sample axis kept apart (undefined for BatchNorm train)
    # defined too where an op couples the rows of the batch (``COUPLES_ROWS``: BatchNorm in
    # train mode), the batch counting as one sample whose positions are its rows
    # (conventions.md, "BatchNorm in train mode")
    coupled: bool = False


_ALL = [
    Quantity("batch_grad", "first_order", "per-sample gradients [N, *p.shape]", GRADIENT,
             BATCH, Reduction("gather", "gradient")),
    Quantity("batch_l2", "first_order", "squared norms of per-sample gradients [N]", GRADIENT,
             BATCH_L2, Reduction("gather", "gradient", 2.0)),
    Quantity("sum_grad_squared", "first_order", "Σ_n g_n² (p.shape)", GRADIENT, SUM_SQUARES,
             Reduction("sum", "gradient", 2.0)),
    Quantity("variance", "first_order", "Σ_n g_n²/N - (Σ_n g_n/N)² (p.shape)", GRADIENT,
             VARIANCE, Reduction("variance", "gradient", 2.0)),
    Quantity("diag_ggn_exact", "ggn", "diagonal of the GGN (p.shape)", GGN_EXACT, SUM_SQUARES,
             Reduction("sum", "hessian"), "exact", coupled=True),
    Quantity("diag_ggn_mc", "ggn", "Monte-Carlo diagonal of the GGN (p.shape)", GGN_MC,
             SUM_SQUARES, Reduction("sum", "hessian"), "exact", coupled=True),
    Quantity("diag_ggn_exact_batch", "ggn", "per-sample GGN diagonals [N, *p.shape]",
             GGN_EXACT, BATCH_SUM_SQUARES, Reduction("gather", "hessian")),
    Quantity("diag_ggn_mc_batch", "ggn", "per-sample MC GGN diagonals [N, *p.shape]", GGN_MC,
             BATCH_SUM_SQUARES, Reduction("gather", "hessian")),
    Quantity("sqrt_ggn_exact", "ggn", "square-root GGN factor [C, N, *p.shape]", GGN_EXACT,
             BATCH, Reduction("gather", "hessian", 0.5, axis=1), coupled=True),
    Quantity("sqrt_ggn_mc", "ggn", "MC square-root GGN factor [M, N, *p.shape]", GGN_MC,
             BATCH, Reduction("gather", "hessian", 0.5, axis=1)),
    Quantity("kfac", "ggn",
             "Kronecker factors [G, A] (weights) / [G] (biases; others: GGN block), MC",
             GGN_MC, KRON, Reduction("kron", "hessian"), coupled=True),
    Quantity("kflr", "ggn",
             "Kronecker factors [G, A] (weights) / [G] (biases; others: GGN block), exact",
             GGN_EXACT, KRON, Reduction("kron", "hessian"), coupled=True),
    Quantity("kfra", "ggn",
             "Kronecker factors [G, A] / [G] from the batch-averaged GGN (chains only)",
             KFRA, KRON, Reduction("kfra", "hessian")),
    Quantity("diag_h", "hessian", "diagonal of the Hessian (p.shape)", HESSIAN, SUM_SQUARES,
             Reduction("sum", "both"), "exact"),
    Quantity("diag_h_batch", "hessian", "per-sample Hessian diagonals [N, *p.shape]", HESSIAN,
             BATCH_SUM_SQUARES, Reduction("gather", "both")),
    Quantity("hmp", "product", "Hessian block times vectors [V, *p.shape]", HESSIAN, PRODUCT,
             Reduction("sum", "both"), "exact"),
    Quantity("ggnmp", "product", "GGN block times vectors [V, *p.shape]", GGN_EXACT, PRODUCT,
             Reduction("sum", "hessian"), "exact", coupled=True),
    Quantity("pchmp_abs", "product",
             "positive-curvature Hessian (|residual|) block times vectors [V, *p.shape]",
             PCH_ABS, PRODUCT, Reduction("sum", "both"), "abs"),
    Quantity("pchmp_clip", "product",
             "positive-curvature Hessian (residual clipped at 0) block times vectors",
             PCH_CLIP, PRODUCT, Reduction("sum", "both"), "clip"),
]
QUANTITIES: dict[str, Quantity] = {q.name: q for q in _ALL}
ALIASES = {"grad_batch": "batch_grad"}


def coupled_names() -> list[str]:
    """The quantities defined where BatchNorm in train mode couples the batch."""
    return [name for name, quantity in QUANTITIES.items() if quantity.coupled]


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
        resolved.append((name, QUANTITIES[canonical]))
    return resolved
