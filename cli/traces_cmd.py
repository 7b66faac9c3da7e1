"""CLI group `kat-diag traces`: `import` another trainer's per-token log into a store, `export` a store.

Thin layer over `kat_diag.traces.interchange` (the format: docs/trace-format.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from cli.common import fail, strict_json
from cli.score_cmd import parse_fields

traces_app = typer.Typer(help="Move traces between kat-diag and other trainers (the interchange format: "
                         "docs/trace-format.md).", no_args_is_help=True)

IMPORT_FIELD_HELP = ("Map a format field to the file's name for it, KEY=NAME (repeatable), e.g. --field "
                     "token_ids=target_tokens --field student_logprob=logprobs. Keys: step, prompt_id, token_ids, kl, "
                     "student_logprob, teacher_logprob, loss_mask, and the optional fields of docs/trace-format.md.")


@traces_app.command("import")
def import_(
    file: Path = typer.Argument(..., help="Interchange file (.jsonl or .parquet), or a directory of them."),
    out: Path = typer.Option(..., "--out", help="Run directory to write the store into (OUT/traces)."),
    kl_source: str | None = typer.Option(None, "--kl-source", help="What the KL is: full (a 'kl' field with the "
                                         "full-vocabulary reverse KL) | k1 | k3 (sampled-token estimates; computed "
                                         "from student_logprob and teacher_logprob when there is no 'kl' field). "
                                         "Default: the file header's, else full. Recorded in the store's manifest."),
    field: list[str] | None = typer.Option(None, "--field", help=IMPORT_FIELD_HELP),
    top_n: int | None = typer.Option(None, "--top-n", help="Teacher top-n width of the store (default: the header's, "
                                     "else the first row's, else 5)."),
    kat_preset: str | None = typer.Option(None, "--kat-preset", help="KAT settings the analyses use on this store: "
                                          "world | paper (default: the header config's, else world)."),
    tokenizer: Path | None = typer.Option(None, "--tokenizer", help="Tokenizer directory: check token ids against "
                                          "its vocabulary and decode token_text / text where rows lack them."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace what --out holds."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar on stderr."),
) -> None:
    """Import per-token arrays another trainer logged into a trace store (no model needed)."""
    from kat_diag.kat.config import kat_preset as preset
    from kat_diag.run import rundir
    from kat_diag.run.progress import bar
    from kat_diag.traces.interchange import import_file, input_files, read_header

    if top_n is not None and top_n < 1:
        fail(f"--top-n must be >= 1, got {top_n}")
    input_files(file)
    header = read_header(file)
    config: dict[str, Any] = dict((header or {}).get("config") or {})
    if kat_preset is not None or not isinstance(config.get("kat"), dict):
        config["kat"] = preset(kat_preset or "world").to_dict()
    kw: dict[str, Any] = {}
    if tokenizer is not None:
        from kat_diag.models import load_tokenizer

        tok = load_tokenizer(tokenizer, what="--tokenizer")
        kw = {"vocab_size": len(tok), "decode_tokens": lambda ids: tok.batch_decode([[i] for i in ids]),
              "decode_text": lambda ids: tok.decode(ids, skip_special_tokens=True)}
        config.setdefault("student", str(tokenizer))
    with rundir.owned(out, overwrite=overwrite, owns_runs=False):
        result = import_file(file, out, kl_source=kl_source, fields=dict(parse_fields(field)), top_n=top_n,
                             config=config, wrap=lambda it: bar(it, desc="import", unit=" rows", disable=not progress),
                             **kw)
    typer.echo(strict_json(result))


@traces_app.command("export")
def export(
    run: Path = typer.Argument(..., help="Run directory (or its traces/ directory)."),
    out: Path = typer.Option(..., "--out", help="File to write: .jsonl or .parquet (the interchange format)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar on stderr."),
) -> None:
    """Export a trace store in the interchange format (import it again with `kat-diag traces import`)."""
    from kat_diag.run.progress import bar
    from kat_diag.traces.interchange import export_store
    from kat_diag.traces.reader import TraceReader

    if out.suffix.lower() not in (".jsonl", ".parquet"):
        fail(f"--out {out}: export writes .jsonl or .parquet")
    if out.exists() and not overwrite:
        fail(f"--out {out} already exists: pass --overwrite to replace it")
    if not out.parent.is_dir():
        fail(f"--out {out}: directory {out.parent} does not exist")
    reader = TraceReader(run)
    result = export_store(reader, out, wrap=lambda it: bar(it, desc="export", unit=" row groups",
                                                           disable=not progress))
    typer.echo(strict_json(result))


def register(app: typer.Typer) -> None:
    """Add the `traces` group to the top-level app."""
    app.add_typer(traces_app, name="traces")
