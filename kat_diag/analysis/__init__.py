"""Offline analyses of recorded runs: one module per analysis (DESIGN §4)."""
