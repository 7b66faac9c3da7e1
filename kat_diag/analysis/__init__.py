"""Offline analyses of recorded runs, one module per analysis: heatmaps, phase statistics, gradient
geometry, teacher vocabulary, trap statistics, replay of a store, training curves, figures.

Analyses are pure functions from stored arrays to arrays; plotting reads only saved traces, so every
figure regenerates from a run directory. `store` and `threshold` hold the access patterns and the
offline tau they share; `output` and `style` how they write.

May import: `kat_diag.kat`, `kat_diag.traces`, `kat_diag.views`, `kat_diag.opd` (gradient geometry
recomputes the trainer's loss), `kat_diag.models`, `kat_diag.data`, `kat_diag.world`,
`kat_diag.evaluation`, `kat_diag.run`. Only the study, the integrations and the CLI import it.
"""
