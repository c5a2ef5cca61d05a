"""The op rule table. Importing this package registers every op family's rules in ``RULES``."""
from . import (affine, arith, conv, elementwise, indexing, linalg, losses,  # noqa: F401
               norm, pooling, recurrent, reductions, select, shape,
               windows)  # (registration)
from .registry import RULES, Ctx, OpRule, register, rule_for

__all__ = ["RULES", "Ctx", "OpRule", "register", "rule_for"]
