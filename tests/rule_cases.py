"""Every rule case, by op family; ``test_rules.py`` runs them all."""
from cases_core import CASES as CORE

CASES = [*CORE]
