"""CLI commands for the embedded world: `world build`, `world eval`, and the end-to-end `demo`."""

from __future__ import annotations

from pathlib import Path

import typer

from cli.common import WORLD_DIR, fail, strict_json

world_app = typer.Typer(help="Build and evaluate the embedded arithmetic world.", no_args_is_help=True)


@world_app.command("build")
def build(
    out: Path | None = typer.Option(None, help="Directory to write the world into (required unless --force: "
                                    "the committed world data/world is only rebuilt on request)."),
    force: bool = typer.Option(False, help="Write even where a world already exists (without --out: rebuild "
                               "the committed data/world in place)."),
    quick: bool = typer.Option(False, help="Build a small world in seconds (for tests)."),
    seed: int = typer.Option(0, help="Seed: the build is reproducible from it."),
) -> None:
    """Build data, tokenizer, teacher and student (SFT from random init); print a JSON summary."""
    target = _build_target(out, force)
    summary = _build(target, quick, seed)
    typer.echo(strict_json(summary))


def _build_target(out: Path | None, force: bool) -> Path:
    from kat_diag.run import rundir

    if out is None and not force:
        fail(f"world build needs --out DIR (or --force to rebuild the committed world {WORLD_DIR} in place)")
    target = WORLD_DIR if out is None else out
    if (target / "world.json").exists() and not force:
        fail(f"--out {target} already holds a world (world.json): pass --force to rebuild it there")
    rundir.check_out(target, overwrite=True, owns_runs=False)  # a file or read-only path fails now
    return target


def _build(out: Path, quick: bool, seed: int) -> dict:
    from dataclasses import replace

    from kat_diag.world.build import WorldConfig, build_world

    cfg = WorldConfig.quick() if quick else WorldConfig()
    cfg = replace(cfg, seed=seed)
    summary = build_world(out, cfg)
    for role, info in summary["models"].items():
        typer.echo(f"{role}: {info['parameters']:,} parameters, SFT loss {info['sft_final_loss']:.4f}, "
                   f"{info['sft_seconds']:.0f} s", err=True)
    typer.echo(f"world written to {out} in {summary['build_seconds']:.0f} s", err=True)
    return {"world": str(out), **summary}


def _eval_table(res: dict[str, dict[str, dict[str, float]]]) -> str:
    roles = list(res)
    splits = list(res[roles[0]])
    metrics = [m for m in res[roles[0]][splits[0]] if m != "n"]
    head = f"{'model':8s} {'metric':8s} " + " ".join(f"{s:>7s}" for s in splits)
    lines = [head, "-" * len(head)]
    for role in roles:
        for m in metrics:
            lines.append(f"{role:8s} {m:8s} " + " ".join(f"{res[role][s][m]:7.3f}" for s in splits))
    return "\n".join(lines)


def _check_world(world: Path) -> None:
    for part in ("teacher", "student", "tokenizer", "data"):
        if not (world / part).exists():
            fail(f"--world {world}: no {part}/ (not a world directory; build one with "
                 "`kat-diag world build --out DIR`)")


def run_world_eval(world: Path, k: int, n: int | None, seed: int, max_new_tokens: int) -> dict:
    """Teacher and student on every benchmark split, with a progress bar over (model, split)."""
    from kat_diag.evaluation import evaluate_benchmarks
    from kat_diag.models import load_model, load_tokenizer
    from kat_diag.run.progress import bar
    from kat_diag.world.loop_probe import loop_start_rate
    from kat_diag.world.paths import load_world_splits, world_paths

    paths = world_paths(world)
    splits = load_world_splits(world)
    bench = {name: probs[:n] if n else probs for name, probs in splits.items() if name != "train"}
    tok = load_tokenizer(paths["tokenizer"])
    res = {}
    with bar(total=2 * len(bench), desc="world eval", unit="split") as pbar:
        for role in ("teacher", "student"):
            model = load_model(paths[role], what=role, device="cpu")

            def done(split: str, role: str = role) -> None:
                pbar.set_postfix_str(f"{role} {split}")
                pbar.update(1)

            res[role] = evaluate_benchmarks(model, tok, bench, k=k, seed=seed, max_new_tokens=max_new_tokens,
                                            on_split=done)
            rates = {name: loop_start_rate(model, tok, probs) for name, probs in bench.items()}
            for name, rate in rates.items():  # how readily it starts a loop (what OPD can remove)
                res[role][name]["loop/ln"] = rate
            res[role]["mean"]["loop/ln"] = sum(rates.values()) / len(rates)
    return res


@world_app.command("eval")
def eval_(
    world: Path = typer.Option(WORLD_DIR, help="World directory (from `world build`)."),
    k: int = typer.Option(8, min=0, help="Samples per problem for avg@k / pass@k (0: greedy only)."),
    n: int = typer.Option(0, min=0, help="Problems per split (0: all)."),
    seed: int = typer.Option(0, help="Sampling seed."),
    max_new_tokens: int = typer.Option(96, min=1, help="Generation budget per completion."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object instead of the table."),
) -> None:
    """Greedy accuracy, avg@k / pass@k and loop-start rate (loop/ln: probability of repeating the step line
    just written, mean over the correct path's lines) of teacher and student on each benchmark split."""
    _check_world(world)
    res = run_world_eval(world, k, n or None, seed, max_new_tokens)
    typer.echo(strict_json(res) if as_json else _eval_table(res))


def register(app: typer.Typer) -> None:
    """Add the `world` group and `demo` to the top-level app."""
    app.add_typer(world_app, name="world")

    @app.command("demo")
    def demo(
        world: Path = typer.Option(WORLD_DIR, help="World directory; built if missing."),
        out: Path = typer.Option(Path("runs/demo"), help="Directory for the demo's training runs."),
        k: int = typer.Option(8, min=0, help="Samples per problem for avg@k / pass@k."),
        n: int = typer.Option(0, min=0, help="Problems per split in the world evaluation (0: all)."),
        steps: int = typer.Option(20, min=1, help="OPD steps of the demo's KAT run."),
        overwrite: bool = typer.Option(True, "--overwrite/--no-overwrite", help="Replace an earlier demo run in "
                                       "OUT/kat (with --no-overwrite an existing one is an error)."),
    ) -> None:
        """The embedded pipeline end to end: world, evaluation, OPD with KAT, trace summary."""
        from kat_diag.run import rundir

        run = out / "kat"
        rundir.check_out(run, overwrite=overwrite)
        if not (world / "student" / "config.json").exists():
            typer.echo(f"no world at {world}: building it (about 15 minutes on 2 cores)", err=True)
            _build(world, quick=False, seed=0)
        from kat_diag.kat.config import KATConfig
        from kat_diag.opd.config import SamplingConfig, TrainConfig
        from kat_diag.opd.trainer import train
        from kat_diag.traces.reader import TraceReader
        from kat_diag.views.summary import format_summary, summarize

        typer.echo("== 1. world evaluation (greedy, avg@k, pass@k) ==")
        typer.echo(_eval_table(run_world_eval(world, k, n or None, 0, 96)))
        typer.echo(f"== 2. OPD with KAT, {steps} steps -> {run} ==")
        cfg = TrainConfig(teacher=str(world / "teacher"), student=str(world / "student"), out=str(run),
                          steps=steps, kat=KATConfig(), sampling=SamplingConfig(max_new_tokens=192, slots=16),
                          eval_n=50, eval_k=4, ckpt_every=10)
        metrics = train(cfg, overwrite=overwrite).metrics
        typer.echo(strict_json({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()
                                if not k.startswith("policy/")}))
        typer.echo("== 3. trace store summary (kat-diag inspect) ==")
        typer.echo(format_summary(summarize(TraceReader(run))))
