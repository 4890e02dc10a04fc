"""Local `evaluate` metric modules (one folder each), loaded by path so they work offline."""
