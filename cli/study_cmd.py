"""CLI command `study`: the paper's comparison (OPD, KAT, IW-OPD, length-matched random, prefix, KAT + prefix)."""

from __future__ import annotations

from pathlib import Path

import typer

from kat_diag.world.paths import DEFAULT_WORLD_DIR


def register(app: typer.Typer) -> None:
    """Add `study` to the top-level app."""

    @app.command("study")
    def study(
        out: Path = typer.Option(Path("runs/study"), help="Study directory: one run directory per method, "
                                                      "results.md, results.json, figures/."),
        full: bool = typer.Option(False, help="3 seeds, longer runs, the teacher row and every ablation "
                                          "(hours on 2 CPU cores; resumes where it stopped)."),
        config: Path = typer.Option(None, help="JSON/YAML file: teacher, student, data, bench, kat preset and "
                                           "other study fields (real checkpoints and data)."),
        world: Path = typer.Option(DEFAULT_WORLD_DIR, help="World directory (teacher/, student/, data/) when no "
                                                       "--config is given."),
        steps: int = typer.Option(0, help="Training steps per run (0: the profile's)."),
        batch_size: int = typer.Option(0, help="Prompts per step (0: the profile's)."),
        eval_n: int = typer.Option(0, help="Problems per split in the evaluation (0: the profile's)."),
        seeds: str = typer.Option("", help="Comma-separated training seeds, e.g. 0,1,2,3,4 (empty: the profile's)."),
        device: str = typer.Option("auto", help="auto | cpu | cuda."),
        progress: bool = typer.Option(True, help="Show one progress bar for the whole study."),
    ) -> None:
        """Train every method from the same student and prompts, evaluate, write the results table."""
        from kat_diag.study import StudyConfig, load_study_file, run_study

        over: dict = {k: v for k, v in dict(steps=steps, batch_size=batch_size, eval_n=eval_n).items() if v}
        if seeds.strip():
            try:
                over["seeds"] = tuple(int(x) for x in seeds.split(","))
            except ValueError:
                raise ValueError(f"--seeds {seeds!r}: expected comma-separated integers") from None
        if config is not None:
            import dataclasses

            cfg = load_study_file(config, full=full)
            cfg = dataclasses.replace(cfg, device=device if device != "auto" else cfg.device, **over)
        else:
            make = StudyConfig.full if full else StudyConfig.quick
            cfg = make(str(world / "teacher"), str(world / "student"), device=device, **over)
        run_study(cfg, out, progress=progress, log=typer.echo)
