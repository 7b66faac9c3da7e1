"""Entry point of the `kat-diag` console script.

Each command group lives in its own module and registers itself here, so that the CLI stays a
thin layer: parse the options, call the library, print.
"""

from __future__ import annotations

import os

import typer

# Quiet the per-load progress bars and advisory warnings of transformers: our own bars say more.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cli import study_cmd, trace_cmd, train_cmd, world_cmd  # noqa: E402

app = typer.Typer(
    name="kat-diag",
    help="On-policy distillation with KAT, and diagnostics of the KL agreement trap.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

for module in (world_cmd, train_cmd, trace_cmd, study_cmd):
    module.register(app)


def main() -> None:
    """Console-script entry: user errors (bad path, mismatched models, corrupt store, bad option
    value) print one line naming the problem instead of a traceback."""
    from kat_diag.traces import TraceStoreError

    try:
        app()
    except (FileNotFoundError, NotADirectoryError, ValueError, KeyError, TraceStoreError) as e:
        typer.echo(f"error: {e}", err=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None  # the trainer already said what it saved


if __name__ == "__main__":
    main()
