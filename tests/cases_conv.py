"""Rule cases: conv family."""
CASES = []
