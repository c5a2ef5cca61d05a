"""Every rule case, by op family; ``test_rules.py`` runs them all."""
from cases_conv import CASES as CONV
from cases_core import CASES as CORE
from cases_linalg import CASES as LINALG
from cases_norm import CASES as NORM
from cases_ops import CASES as OPS

CASES = [*CORE, *CONV, *NORM, *LINALG, *OPS]
