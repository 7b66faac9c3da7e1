"""kat-diag: on-policy distillation with KAT and diagnostics of the KL agreement trap."""

__version__ = "0.1.0"
