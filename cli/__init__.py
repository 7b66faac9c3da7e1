"""The `kat-diag` command line: a thin Typer layer over `kat_diag` (parse, call, print)."""
