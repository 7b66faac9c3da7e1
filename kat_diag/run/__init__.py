"""Run plumbing that knows nothing of OPD or KAT: progress bars, config files, run directories, checks.

Modules: `progress` (bars that suit a terminal and a log file), `config_io` (JSON/YAML files into
frozen dataclasses, merged with command-line options), `rundir` (a run directory belongs to one run,
written by one process at a time), `preflight` (option checks that run before any model loads).

May import: nothing else of kat_diag (it is the bottom layer, next to `data` and `traces`).
"""
