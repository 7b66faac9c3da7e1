"""Entry point of the `kat-diag` console script.

Each command group lives in its own module and registers itself here, so that the CLI stays a
thin layer: parse the options, call the library, print. Command modules import nothing heavy at
the top (torch, transformers, pyarrow load inside the commands), so `--help` answers at once.
User errors end in one `error: ...` line on stderr with exit status 2 (`cli.common.KatGroup`).
"""

from __future__ import annotations

import os

import typer

# Quiet the per-load progress bars and advisory warnings of transformers: our own bars say more.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cli import (  # noqa: E402
    analysis_cmd,
    geometry_cmd,
    plan_cmd,
    score_cmd,
    study_cmd,
    trace_cmd,
    traces_cmd,
    train_cmd,
    trap_cmd,
    world_cmd,
)
from cli.common import KatGroup, version_callback  # noqa: E402

app = typer.Typer(
    name="kat-diag",
    help="On-policy distillation with KAT, and diagnostics of the KL agreement trap.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=KatGroup,
    rich_markup_mode=None,  # plain click help: rich rendering doubled the time of --help
)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                 help="Print the kat-diag version and exit."),
) -> None:
    """On-policy distillation with KAT, and diagnostics of the KL agreement trap."""


for module in (world_cmd, train_cmd, score_cmd, trace_cmd, traces_cmd, trap_cmd, analysis_cmd, geometry_cmd, plan_cmd,
               study_cmd):
    module.register(app)


def main() -> None:
    """Console-script entry (errors and exit codes: see cli.common.KatGroup)."""
    app()


if __name__ == "__main__":
    main()
