"""Views of a trace store: a summary, the list of rollouts, one rollout in the terminal or as HTML.

Modules: `summary` (`inspect` tables from scalar columns), `rollout` (what a view shows of one
rollout: marks, phases, the run's KAT settings, the problem), `colors` (the KL colour scale),
`terminal`, `html` (renderers), `text` (tables, number formats, inert strings).

May import: `kat_diag.traces`, `kat_diag.kat`, `kat_diag.data`, `kat_diag.world.paths`,
`kat_diag.run`. The trainer's trackers and the analyses render with it.
"""
