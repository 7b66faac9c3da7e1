"""CLI command `kat-diag score`: another trainer's completions + the two checkpoints -> a full trace store.

Thin layer over `kat_diag.opd.score`: parse the options, check them before any model loads, take the
output directory, score, print a JSON summary.
"""

from __future__ import annotations

from pathlib import Path

import typer

from cli.common import WORLD_DIR, strict_json

FIELD_HELP = ("Map a field to the file's name for it, KEY=NAME (repeatable). Keys: prompt, completion (text; "
              "a prompt may be a list of chat messages), prompt_ids, completion_ids (token ids), step, prompt_id, "
              "rollout_id, stop_reason, answer, correct. E.g. verl's rollout dump: --field prompt=input "
              "--field completion=output --field correct=score.")


def parse_fields(specs: list[str] | None, option: str = "--field") -> tuple[tuple[str, str], ...]:
    """KEY=NAME entries -> ((KEY, NAME), ...); a malformed entry is a one-line error naming it."""
    out = []
    for spec in specs or []:
        key, sep, name = spec.partition("=")
        if not sep or not key.strip() or not name.strip():
            raise typer.BadParameter(f"{option} expects KEY=NAME, got {spec!r}")
        out.append((key.strip(), name.strip()))
    return tuple(out)


def score(
    completions: Path = typer.Argument(..., help="JSONL or Parquet file of completions, one rollout per row, or "
                                       "a directory of such files (e.g. verl's trainer.rollout_data_dir)."),
    teacher: Path = typer.Option(WORLD_DIR / "teacher", "--teacher", help="Teacher checkpoint directory."),
    student: list[str] = typer.Option([str(WORLD_DIR / "student")], "--student", help="Student checkpoint "
                                      "directory, or STEP=DIR (repeatable): rows of step >= STEP, up to the next "
                                      "--student's STEP, are scored by DIR (the student that produced them)."),
    out: Path = typer.Option(Path("runs/score"), "--out", help="Output directory (its traces/ store)."),
    field: list[str] | None = typer.Option(None, "--field", help=FIELD_HELP),
    data: str | None = typer.Option(None, "--data", help="'world' or a world problems JSONL: match rows to "
                                    "problems (by prompt_id, else prompt text) for correctness and the world's "
                                    "ground truth. Without it rows are graded by their answer or correct field."),
    batch_size: int = typer.Option(64, "--batch-size", help="Rows scored and written together (a crash loses at "
                                   "most this many)."),
    micro_batch: int = typer.Option(16, "--micro-batch", help="Rows per forward pass (memory: micro-batch x "
                                    "length x vocabulary logits)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    dtype: str = typer.Option("fp32", "--dtype", help="Model dtype: fp32 | bf16 | fp16."),
    chat_template: str = typer.Option("auto", "--chat-template", help="auto (as TRL: prompts given as chat "
                                      "messages get the tokenizer's template, text prompts are used as is) | on "
                                      "(text prompts become one user message) | off."),
    eos: str = typer.Option("auto", "--eos", help="Append the EOS token to completions (decoded text loses it): "
                            "auto (when the row's stop_reason is eos or stop) | always | never."),
    top_n: int = typer.Option(5, "--top-n", help="Teacher top-n tokens stored per position."),
    kat_preset: str = typer.Option("world", "--kat-preset", help="KAT settings the analyses use on this store: "
                                   "world | paper."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted score in --out (rows already "
                                "stored are skipped)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace what --out holds."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Let from_pretrained run Python code "
                                           "shipped with the checkpoints."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars on stderr."),
) -> None:
    """Score finished completions with the teacher and the student (no generation) into a trace store: the
    same per-token traces as a training run, for every analysis."""
    from kat_diag.kat.config import kat_preset as preset
    from kat_diag.opd.score import ScoreConfig, parse_students, preflight
    from kat_diag.opd.score import score as run_score
    from kat_diag.run import rundir

    cfg = ScoreConfig(completions=str(completions), teacher=str(teacher), students=parse_students(student),
                      out=str(out), fields=parse_fields(field), data=data, batch_size=batch_size,
                      micro_batch=micro_batch, device=device, dtype=dtype, chat_template=chat_template, eos=eos,
                      top_n=top_n, kat=preset(kat_preset), trust_remote_code=trust_remote_code, progress=progress)
    preflight(cfg)
    with rundir.owned(out, resume=resume, overwrite=overwrite, owns_runs=False):
        try:
            result = run_score(cfg, resume=resume)
        except KeyboardInterrupt:
            if (out / "traces_partial").is_dir():
                typer.echo(f"interrupted: the batches scored so far are in {out / 'traces_partial'}; run the same "
                           "command with --resume to finish", err=True)
            raise
    typer.echo(strict_json(result))


def register(app: typer.Typer) -> None:
    """Add `score` to the top-level app."""
    app.command("score")(score)
