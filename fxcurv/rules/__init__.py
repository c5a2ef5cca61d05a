"""The op rule table. Importing this package registers every op family's rules in ``RULES``."""
from . import (affine, arith, conv, elementwise, linalg, losses, norm, pooling,  # noqa: F401
               shape)  # (registration)
from .registry import RULES, Ctx, OpRule, register, rule_for

__all__ = ["RULES", "Ctx", "OpRule", "register", "rule_for"]
