"""KAT and kat-diag traces inside other trainers (TRL first), each an optional extra.

May import: anything of kat_diag below the study (`kat`, `opd`, `traces`, `analysis`, ...); nothing
of kat_diag imports it.
"""
