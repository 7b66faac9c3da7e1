"""CLI commands `gradproj` (gradient geometry per phase) and `vocab` (teacher vocabulary per phase).

Thin layer: parse the options, call kat_diag.analysis.gradproj / vocab, print a summary or JSON.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import typer

from cli.trace_cmd import _parse_steps

STEPS_HELP = "Only rollouts of these training steps: A:B (inclusive), A:, :B or A."
TAU_HELP = ("Phase threshold: 'recorded' (each rollout's recorded tau; rollouts where KAT was inactive are "
            "left out), a number in nats for every rollout, or qX: the X-quantile of the rollouts' minimum "
            "window means (the paper's rule with eta = 1 - X, e.g. q0.7; for plain OPD runs).")
TRACES_HELP = ("Trace store to take rollouts from (default: RUN's own). Use a `kat-diag record` store with "
               "termination none for full, untruncated traces with a post-agreement phase.")


def _kat(window: int | None, persistence: int | None, min_length: int | None) -> dict[str, Any]:
    return {k: v for k, v in (("window", window), ("persistence", persistence), ("min_length", min_length))
            if v is not None}


def _clean(obj: Any) -> Any:
    """NaN/inf -> null so the output is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _echo_json(summary: dict[str, Any]) -> None:
    typer.echo(json.dumps(_clean(summary), allow_nan=False, default=str))


WINDOW_HELP = "KAT window W for the phase segmentation (default: the run config's)."
PERSIST_HELP = "KAT persistence T for the phase segmentation (default: the run config's)."
MINLEN_HELP = "KAT exempt length L0 for the phase segmentation (default: the run config's)."


def gradproj(
    run: Path = typer.Argument(..., help="Run directory (config.json, traces/, checkpoints)."),
    init: Path | None = typer.Option(None, "--init", help="Checkpoint before training (default: the run "
                                     "config's student)."),
    final: Path | None = typer.Option(None, "--final", help="Checkpoint after training (default: RUN/final, "
                                      "else a model saved into RUN, else the newest RUN/checkpoints/step-* or "
                                      "RUN/checkpoint-N)."),
    out: Path | None = typer.Option(None, "--out", help="Output directory (default: RUN/analysis)."),
    model: str = typer.Option("init", "--model", help="Weights the gradients are taken at: init, final or a "
                              "checkpoint path."),
    teacher: Path | None = typer.Option(None, "--teacher", help="Teacher checkpoint (default: the run "
                                        "config's)."),
    traces: Path | None = typer.Option(None, "--traces", help=TRACES_HELP),
    tau: str = typer.Option("recorded", "--tau", help=TAU_HELP),
    k: list[int] | None = typer.Option(None, "--k", help="Subspace sizes to sweep (repeatable; default "
                                       "1 2 4 8 16 32, capped at min(m, n) per matrix)."),
    rollouts: int = typer.Option(64, "--rollouts", help="Rollouts sampled per phase, each phase from the rollouts "
                                 "that hold it (uniformly over the store)."),
    tokens: int = typer.Option(512, "--tokens", help="Tokens per phase, drawn from that phase's own rollouts "
                               "(equal for every phase: the smallest phase pool caps it)."),
    loss: str = typer.Option("run", "--loss", help="Loss differentiated: run (the loss the run trained with, from "
                             "its config), full, topk or topk:K, sampled."),
    groups: int = typer.Option(0, "--groups", help="Rollout groups per phase for the bootstrap (0: one per "
                               "rollout). Memory: groups x 2-D parameters x 4 bytes."),
    boot: int = typer.Option(200, "--boot", help="Bootstrap replicates (resampling rollout groups) for the 95 % "
                             "intervals."),
    n_random: int = typer.Option(4, "--random", help="Random orthonormal subspaces averaged for the baseline."),
    svd: str = typer.Option("auto", "--svd", help="auto (exact up to 2^24 entries, else randomized), exact, "
                            "or lowrank (torch.svd_lowrank)."),
    micro_batch: int = typer.Option(8, "--micro-batch", help="Rollouts per forward/backward pass."),
    steps: str | None = typer.Option(None, "--steps", help=STEPS_HELP),
    window: int | None = typer.Option(None, "--window", help=WINDOW_HELP),
    persistence: int | None = typer.Option(None, "--persistence", help=PERSIST_HELP),
    min_length: int | None = typer.Option(None, "--min-length", help=MINLEN_HELP),
    device: str = typer.Option("cpu", "--device", help="Device for the models: cpu, cuda, cuda:1, ..."),
    seed: int = typer.Option(0, "--seed", help="Seed of the rollout/token samples and random baselines."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
) -> None:
    """Gradient geometry per phase: energy of the OPD gradient in the top-k SVD subspace of W_final - W_init."""
    from kat_diag.analysis.gradproj import DEFAULT_KS, run_gradproj

    summary = run_gradproj(run, out or run / "analysis", init, final, teacher=None if teacher is None else str(teacher),
                           model=model, traces=traces, tau=tau, ks=tuple(k) if k else DEFAULT_KS, rollouts=rollouts,
                           tokens=tokens, n_random=n_random, svd=svd, micro_batch=micro_batch,
                           steps=_parse_steps(steps),
                           kat=_kat(window, persistence, min_length), device=device, seed=seed, loss=loss,
                           groups=groups, n_boot=boot)
    if as_json:
        _echo_json(summary)
        return

    def ci(lo: float | None, hi: float | None, fmt: str = ".4f") -> str:
        return "" if lo is None or hi is None or lo != lo else f" [{lo:{fmt}}, {hi:{fmt}}]"

    typer.echo(f"gradient geometry of {summary['run']} ({summary['tokens_per_phase']} tokens per phase, each from "
               f"its own rollouts; gradients of the {summary['loss_label']} at {summary['model']}; "
               f"{summary['aggregation']}; {summary['interval']})")
    for p in summary["phases"]:
        typer.echo(f"  {p['phase']:<10} tokens {p['tokens']:>6}  rollouts {p['rollouts']:>5}  "
                   f"loss/token {p['loss_per_token']:.4g}  |g|/token {p['grad_norm_per_token']:.4g}"
                   + ci(p.get("grad_norm_lo"), p.get("grad_norm_hi"), ".4g"))
    typer.echo("  k    phase       one-sided: plug-in, bias-corrected [95% CI] (random, k/m)   two-sided: plug-in, "
               "bias-corrected [95% CI] (random)")
    for a in summary["aggregate"]:
        typer.echo(f"  {a['k']:<4} {a['phase']:<10} {a['one_sided']:.4f}, {a['one_sided_bc']:.4f}"
                   f"{ci(a['one_sided_lo'], a['one_sided_hi'])} ({a['one_sided_random']:.4f}, {a['one_sided_iso']:.4f})"
                   f"   {a['two_sided']:.5f}, {a['two_sided_bc']:.5f}{ci(a['two_sided_lo'], a['two_sided_hi'], '.5f')}"
                   f" ({a['two_sided_random']:.5f})")
    typer.echo("  differences (one-sided, a - b: plug-in, bias-corrected [95% CI]):")
    for d in summary["differences"]:
        band = ci(d["one_sided_lo"], d["one_sided_hi"], "+.4f")
        typer.echo(f"  k={d['k']:<3} {d['a']} - {d['b']}: {d['one_sided']:+.4f}, {d['one_sided_bc']:+.4f}{band}")
    typer.echo(f"wrote {summary['files']['png']}, {summary['files']['csv']}, {summary['files']['json']}")


def vocab(
    run: Path = typer.Argument(..., help="Run directory (or a store with a config in its manifest)."),
    out: Path | None = typer.Option(None, "--out", help="Output directory (default: RUN/analysis)."),
    traces: Path | None = typer.Option(None, "--traces", help=TRACES_HELP),
    tau: str = typer.Option("recorded", "--tau", help=TAU_HELP),
    tokenizer: Path | None = typer.Option(None, "--tokenizer", help="Tokenizer to decode token ids (default: "
                                          "the run config's student)."),
    lexicon: Path | None = typer.Option(None, "--lexicon", help="Reasoning-token word list, one per line "
                                        "(default: digits and + - * =)."),
    top: int = typer.Option(5, "--top", help="Teacher top ids counted per position (at most the store's top_n)."),
    weight: str = typer.Option("prob", "--weight", help="prob (each top id weighted by the teacher's probability, "
                               "so junk tail ids barely count) or count (each top id counts 1)."),
    boot: int = typer.Option(1000, "--boot", help="Bootstrap replicates (resampling whole rollouts)."),
    prior_scale: float = typer.Option(1.0, "--prior-scale", help="Dirichlet prior of the log-odds: this "
                                      "times the pooled count of each token."),
    steps: str | None = typer.Option(None, "--steps", help=STEPS_HELP),
    window: int | None = typer.Option(None, "--window", help=WINDOW_HELP),
    persistence: int | None = typer.Option(None, "--persistence", help=PERSIST_HELP),
    min_length: int | None = typer.Option(None, "--min-length", help=MINLEN_HELP),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
) -> None:
    """Teacher vocabulary per phase: word clouds, JS divergence with bootstrap CIs, log-odds, reasoning share."""
    from kat_diag.analysis.vocab import run_vocab

    summary = run_vocab(run, out or run / "analysis", traces=traces, tau=tau, tokenizer=tokenizer, lexicon=lexicon,
                        top=top, weight=weight, n_boot=boot, prior_scale=prior_scale, steps=_parse_steps(steps),
                        kat=_kat(window, persistence, min_length), seed=seed)
    if as_json:
        _echo_json(summary)
        return
    typer.echo(f"teacher vocabulary of {summary['traces']} (top-{summary['top']} ids per position)")
    for p in summary["phases"]:
        toks = " ".join(t["token"] for t in summary["top_log_odds"][p][:8])
        typer.echo(f"  {p:<10} positions {summary['positions'][p]:>7}  reasoning share "
                   f"{summary['reasoning_share'][p]:.3f}  entropy >= {summary['teacher_entropy_lower_bound'][p]:.3f}"
                   f"  over-represented: {toks}")
    for j in summary["js"]:
        typer.echo(f"  JS({j['a']}, {j['b']}) = {j['js']:.4f} nats plug-in, {j['js_bc']:.4f} bias-corrected, "
                   f"95% CI [{j['ci_low']:.4f}, {j['ci_high']:.4f}] (basic bootstrap over rollouts)")
    for p, cats in summary["top1_categories"].items():
        typer.echo(f"  teacher top-1 in {p}: " + ", ".join(f"{c} {v['share']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]"
                                                          for c, v in cats.items() if v["share"]))
    typer.echo(f"wrote {summary['files']['png']}, {summary['files']['csv']}, {summary['files']['json']}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the top-level app."""
    app.command("gradproj")(gradproj)
    app.command("vocab")(vocab)
