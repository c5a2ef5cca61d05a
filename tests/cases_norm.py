"""Rule cases: norm family."""
CASES = []
