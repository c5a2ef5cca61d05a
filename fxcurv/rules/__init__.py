"""The op rule table. Importing this package registers every op family's rules in ``RULES``."""
from . import (affine, arith, conv, distances, elementwise, indexing, linalg,  # noqa: F401
               losses, more_losses, norm, pooling, recurrent, reductions, select, shape,
               windows)  # (registration)
from .registry import (AFFINE, BOOLEAN, BY_PRODUCTS, CONCATENATION, COUPLES_ROWS, ELEMENTWISE,
                       FIRST_ORDER, FRESH, INTO_FIRST, KEPT, MONOTONE, PERMUTATION, PIECES, RANDOM,
                       REDUCED, REDUCTION, RESHAPES, RULES, VIEW, WINDOW_MAX, Ctx, OpRule,
                       has_trait, register, rule_for)

__all__ = ["AFFINE", "BOOLEAN", "BY_PRODUCTS", "CONCATENATION", "COUPLES_ROWS", "ELEMENTWISE",
           "FIRST_ORDER", "FRESH", "INTO_FIRST", "KEPT", "MONOTONE", "PERMUTATION", "PIECES",
           "RANDOM", "REDUCED", "REDUCTION", "RESHAPES", "RULES", "VIEW", "WINDOW_MAX", "Ctx",
           "OpRule", "has_trait", "register", "rule_for"]
