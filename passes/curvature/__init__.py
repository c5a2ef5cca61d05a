"""Second-order propagations: square-root GGN factors (exact and Monte-Carlo)."""
