"""Analyses of recorded traces (trap statistics, ...): pure functions over arrays."""
