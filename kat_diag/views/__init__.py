"""Views of a trace store: a summary, the list of rollouts, one rollout in the terminal or as HTML,
and the one palette every picture of kat-diag uses.

Modules: `palette` (every colour: phases, verdicts, methods, marks, the KL colour map as RGB stops;
no matplotlib), `colors` (the KL scale in RGB, xterm-256, truecolor and glyphs, tau on it),
`summary` (`inspect` tables from scalar columns; `--list` with sorting and filters), `rollout` (what
a view shows of one rollout: header, marks, phases, the run's KAT settings, the problem), `track`
(why a rollout was cut: window means against tau, the persistence count, the marks, departures
from the teacher's top-1), `terminal`, `html` (renderers), `text` (tables, number formats, inert
strings).

May import: `kat_diag.traces`, `kat_diag.kat`, `kat_diag.data`, `kat_diag.world.paths`,
`kat_diag.run`. The trainer's trackers and the analyses render with it (`kat_diag.analysis.style`
builds its matplotlib objects from `palette`).
"""
