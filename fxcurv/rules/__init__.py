"""The op rule table. Importing this package registers every op family's rules in ``RULES``."""
from . import affine, arith, conv, elementwise, losses, norm, pooling, shape  # noqa: F401  (registration)
from .registry import RULES, Ctx, OpRule, register, rule_for

__all__ = ["RULES", "Ctx", "OpRule", "register", "rule_for"]
