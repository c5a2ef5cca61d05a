"""pooling rules (filled in by the conv/pooling work)."""
