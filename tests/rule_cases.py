"""Every rule case, by op family; ``test_rules.py`` runs them all."""
from cases_conv import CASES as CONV
from cases_core import CASES as CORE
from cases_linalg import CASES as LINALG
from cases_norm import CASES as NORM

CASES = [*CORE, *CONV, *NORM, *LINALG]
