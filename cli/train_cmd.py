"""CLI commands `train` (OPD with a termination policy) and `record` (traces without training)."""

from __future__ import annotations

from pathlib import Path

import typer

from cli.common import WORLD_DIR, strict_json

_T = WORLD_DIR / "teacher"
_S = WORLD_DIR / "student"

# Options whose config field has another name (see kat_diag.run.config_io.option_paths), and options
# that are not settings of the run.
# --kat-preset sets the whole kat section (the preset with the KAT options given applied on top).
TRAIN_ALIASES = {"kat_preset": "kat", "kat_statistic": "kat.statistic", "kat_warmup": "kat.warmup_steps",
                 "stop_after": "max_steps_this_run"}
TRAIN_NOT_CONFIG = {"resume", "overwrite", "config", "print_config"}
RECORD_ALIASES = {"samples": "samples_per_prompt"}
RECORD_NOT_CONFIG = {"overwrite", "config", "print_config"}
CONFIG_HELP = ("YAML or JSON file with the keys of a run's config.json (partial is fine; a run's own "
               "config.json works). Options given on the command line override it.")
PRINT_CONFIG_HELP = "Print the resolved config as JSON and exit (nothing runs)."
TRUNCATE_HELP = ("Cut prompts longer than the models' context minus --max-new-tokens to their last tokens "
                 "(default: refuse them, naming the longest).")


def _kat(preset: str, **overrides):
    """The KAT preset with every option given on the command line applied on top of it."""
    from kat_diag.kat.config import kat_preset

    return kat_preset(preset, **overrides)


def register(app: typer.Typer) -> None:
    """Add `train` and `record` to the top-level app."""

    @app.command("train")
    def train(
        ctx: typer.Context,
        teacher: Path = typer.Option(_T, help="Teacher checkpoint directory (AutoModelForCausalLM)."),
        student: Path = typer.Option(_S, help="Student checkpoint directory (AutoModelForCausalLM)."),
        data: str = typer.Option("world", help="'world' (train split of the student's world, else data/world), "
                                          "a JSONL/Parquet file, a datasets save_to_disk directory "
                                          "or hf:NAME[:CONFIG]:SPLIT."),
        question_field: str = typer.Option("question", help="Prompt field of a real data set."),
        answer_field: str = typer.Option("answer", help="Answer field of a real data set."),
        answer_format: str = typer.Option("auto", help="auto | gsm8k | boxed | plain."),
        bench: list[Path] = typer.Option([], help="Benchmark files for real data (repeatable)."),
        termination: str = typer.Option("kat", help="none | kat | random | prefix | kat+prefix."),
        out: Path = typer.Option(Path("runs/kat"), help="Run directory."),
        steps: int = typer.Option(50, help="Training steps."),
        batch_size: int = typer.Option(32, help="Prompts per step per rank."),
        micro_batch: int = typer.Option(32, help="Rollouts per backward pass (gradient accumulation)."),
        lr: float = typer.Option(1e-4, help="Peak learning rate (AdamW)."),
        warmup_steps: int = typer.Option(5, help="Linear LR warm-up steps."),
        schedule: str = typer.Option("cosine", help="LR schedule: cosine | constant."),
        grad_clip: float = typer.Option(1.0, help="Gradient-norm clipping."),
        loss: str = typer.Option("topk", help="OPD estimator: topk (reverse KL over the student's top-k tokens "
                                 "plus one tail bucket, the paper's) | full (full-vocabulary reverse KL) | "
                                 "sampled (sampled-token policy gradient) | iwopd (IW-OPD: the sampled-token "
                                 "signal re-weighted by the prefix's accumulated discrepancy, TRL's "
                                 "iw_opd; composes with any --termination)."),
        topk: int = typer.Option(64, help="k of --loss topk (capped at the vocabulary size, where it equals full)."),
        iw_gamma: float = typer.Option(0.5, help="gamma of --loss iwopd: w_t = 1 + gamma (1 - prefix |a| / "
                                       "total |a|) (0: unweighted sampled-token OPD)."),
        max_new_tokens: int = typer.Option(192, help="Rollout budget in tokens (the world's loops run to 192)."),
        chunk_size: int = typer.Option(16, help="Tokens generated between teacher scoring calls (C)."),
        slots: int = typer.Option(0, help="Rollouts in flight at once (0: the whole batch)."),
        temperature: float = typer.Option(1.0, help="Student sampling temperature."),
        top_p: float = typer.Option(1.0, help="Student nucleus sampling."),
        kat_preset: str = typer.Option("world", help="KAT parameter preset: world (chosen for the embedded "
                                       "world) | paper (W 64, T 4, K 50, B 4096, B_min 512, eta 0.3). "
                                       "Every KAT option below overrides it."),
        kat_statistic: str = typer.Option(None, help="What a finished rollout pushes into KAT's threshold "
                                          "buffer: rollout_min (its minimum window mean; the paper's) | "
                                          "windows (its stride-W window means). Default: the preset's."),
        window: int = typer.Option(None, help="KAT window W (tokens per window mean). Default: the preset's."),
        persistence: int = typer.Option(None, help="KAT persistence T (consecutive low windows to fire). "
                                        "Default: the preset's."),
        min_length: int = typer.Option(None, help="KAT exempt initial span L0 (no fire before L0 tokens). "
                                       "Default: the preset's."),
        kat_warmup: int = typer.Option(None, help="KAT warm-up steps K (observe only). Default: the preset's."),
        buffer_size: int = typer.Option(None, help="KAT buffer capacity B (FIFO). Default: the preset's."),
        min_fill: int = typer.Option(None, help="KAT B_min: inactive until the buffer holds this many values. "
                                     "Default: the preset's."),
        tau_quantile: float = typer.Option(None, help="tau = this quantile of KAT's buffer, in (0, 1); the "
                                           "paper's eta 0.3 is 0.7. Default: the preset's."),
        keep: str = typer.Option(None, help="Tokens kept after a KAT stop: onset | fire. Default: onset."),
        prefix_len: int = typer.Option(0, help="Prefix budget P for prefix / kat+prefix."),
        random_target: float = typer.Option(0.0, help="Mean kept length for random termination."),
        random_from: Path = typer.Option(None, help="KAT run directory whose kept length random matches."),
        supervise: str = typer.Option("", help="Train only on these phases of untruncated rollouts (needs "
                                           "--termination none): pre | agreement | post | pre+agreement ... "
                                           "('pre' = KAT as a loss mask)."),
        eval_every: int = typer.Option(0, help="Evaluate every N steps (0: after the last step)."),
        eval_at_start: bool = typer.Option(False, help="Also evaluate the initial student before the first "
                                           "update (metrics.jsonl step -1: the baseline of the eval curves)."),
        eval_k: int = typer.Option(4, help="Samples per problem for avg@k / pass@k."),
        eval_n: int = typer.Option(50, help="Problems per benchmark split in evaluations."),
        ckpt_every: int = typer.Option(25, help="Checkpoint every N steps."),
        trace_every: int = typer.Option(1, help="Record traces every N steps (0: never)."),
        dtype: str = typer.Option("fp32", help="fp32 | bf16."),
        device: str = typer.Option("auto", help="auto | cpu | cuda."),
        seed: int = typer.Option(0, help="Seed: prompts and sampling are functions of it."),
        resume: bool = typer.Option(False, help="Resume from the run directory's last checkpoint."),
        stop_after: int = typer.Option(0, help="Stop after N steps of this invocation (0: run to the end)."),
        report_to: list[str] = typer.Option(["none"], help="Trackers: tensorboard | trackio | wandb | all | none "
                                                           "(repeatable or comma-separated)."),
        tracker_project: str = typer.Option("kat-diag", help="Project name in trackio / wandb."),
        parallel: str = typer.Option("ddp", help="Multi-process mode under torchrun / accelerate launch: ddp "
                                                 "(replicas) | fsdp (FSDP2: student sharded)."),
        shard_teacher: bool = typer.Option(False, help="With --parallel fsdp: shard the teacher too."),
        overwrite: bool = typer.Option(False, help="Replace the run already in --out (its run files are deleted)."),
        trust_remote_code: bool = typer.Option(False, help="Let from_pretrained run Python code shipped "
                                               "with the checkpoints (off: such checkpoints are refused)."),
        truncate_prompts: bool = typer.Option(False, help=TRUNCATE_HELP),
        config: Path = typer.Option(None, help=CONFIG_HELP),
        print_config: bool = typer.Option(False, help=PRINT_CONFIG_HELP),
    ) -> None:
        """On-policy distillation with a termination policy (KAT by default).

        --resume continues the run in --out with its config.json; only --steps, --stop-after,
        --eval-every, --eval-k, --eval-n, --ckpt-every, --trace-every, --report-to, --tracker-project,
        --parallel and --shard-teacher may differ from it."""
        from kat_diag.opd import distributed as D
        from kat_diag.opd import preflight
        from kat_diag.opd.config import CONFIG_NAME, RESUME_MUTABLE, SamplingConfig, TrainConfig
        from kat_diag.opd.tracking import parse_report_to
        from kat_diag.opd.trainer import train as run_train
        from kat_diag.run import config_io

        cfg = TrainConfig(
            teacher=str(teacher), student=str(student), out=str(out), data=data,
            question_field=question_field, answer_field=answer_field, answer_format=answer_format,
            bench=tuple(str(b) for b in bench), steps=steps, batch_size=batch_size, micro_batch=micro_batch,
            lr=lr, warmup_steps=warmup_steps, schedule=schedule, grad_clip=grad_clip, dtype=dtype,
            device=device, seed=seed, loss=loss, topk=topk, iw_gamma=iw_gamma, termination=termination,
            prefix_len=prefix_len or None, random_target=random_target or None,
            random_from=str(random_from) if random_from else None, supervise=supervise or None,
            sampling=SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                    chunk_size=chunk_size, slots=slots),
            kat=_kat(kat_preset, window=window, persistence=persistence, min_length=min_length,
                     warmup_steps=kat_warmup, buffer_size=buffer_size, min_fill=min_fill,
                     tau_quantile=tau_quantile, statistic=kat_statistic, keep=keep),
            eval_every=eval_every, eval_at_start=eval_at_start, eval_k=eval_k, eval_n=eval_n, ckpt_every=ckpt_every,
            trace_every=trace_every, max_steps_this_run=stop_after or None, trust_remote_code=trust_remote_code,
            report_to=parse_report_to(report_to), tracker_project=tracker_project, parallel=parallel,
            shard_teacher=shard_teacher, truncate_prompts=truncate_prompts,
        )
        cfg = config_io.resolve_options(ctx, TrainConfig, cfg, config_file=config, aliases=TRAIN_ALIASES,
                                        not_config=TRAIN_NOT_CONFIG, resume_from=out / CONFIG_NAME if resume else None,
                                        resume_mutable=RESUME_MUTABLE, per_invocation=("out", "max_steps_this_run"))
        if print_config:
            typer.echo(config_io.dump(cfg))
            return
        preflight.check_train(cfg, resume=resume, overwrite=overwrite)
        last = run_train(cfg, resume=resume, overwrite=overwrite).metrics
        # This process owns the group train() opened under torchrun: a gloo group left to interpreter
        # exit can abort the process (SIGABRT, 'terminate called without an active exception').
        D.shutdown()
        typer.echo(strict_json({k: v for k, v in last.items() if not k.startswith("policy/")}))

    @app.command("record")
    def record(
        ctx: typer.Context,
        teacher: Path = typer.Option(_T, help="Teacher checkpoint directory."),
        student: Path = typer.Option(_S, help="Student checkpoint directory (e.g. RUN/checkpoints/step-N)."),
        out: Path = typer.Option(Path("runs/record"), help="Output directory (its traces/ store)."),
        data: str = typer.Option("world", help="'world', a JSONL/Parquet file, a datasets directory or "
                                                 "hf:NAME[:CONFIG]:SPLIT."),
        split: str = typer.Option("train", help="Split to draw prompts from (train, ops2, ...)."),
        n_prompts: int = typer.Option(64, min=1, help="Number of prompts."),
        samples: int = typer.Option(1, min=1, help="Samples per prompt."),
        batch_size: int = typer.Option(32, min=1, help="Rollouts per engine call."),
        termination: str = typer.Option("none", help="Policy while recording (none: full traces)."),
        max_new_tokens: int = typer.Option(192, help="Rollout budget in tokens (the world's loops run to 192)."),
        chunk_size: int = typer.Option(16, help="Teacher scoring chunk size."),
        temperature: float = typer.Option(1.0, help="Sampling temperature."),
        step_label: int = typer.Option(0, help="Value written as the traces' step."),
        seed: int = typer.Option(0, help="Sampling seed."),
        overwrite: bool = typer.Option(False, help="Replace the traces already in --out."),
        truncate_prompts: bool = typer.Option(False, help=TRUNCATE_HELP),
        config: Path = typer.Option(None, help="YAML or JSON file with the keys of a recording's "
                                     "record_config.json (partial is fine). Options given on the command line "
                                     "override it."),
        print_config: bool = typer.Option(False, help=PRINT_CONFIG_HELP),
    ) -> None:
        """Sample and score rollouts from a checkpoint into a trace store, without training."""
        from kat_diag.opd import preflight
        from kat_diag.opd.config import SamplingConfig
        from kat_diag.opd.record import RecordConfig
        from kat_diag.opd.record import record as run_record
        from kat_diag.run import config_io, rundir

        cfg = RecordConfig(
            teacher=str(teacher), student=str(student), out=str(out), data=data, split=split,
            n_prompts=n_prompts, batch_size=batch_size, samples_per_prompt=samples, termination=termination,
            seed=seed, step_label=step_label, truncate_prompts=truncate_prompts,
            sampling=SamplingConfig(max_new_tokens=max_new_tokens, chunk_size=chunk_size,
                                    temperature=temperature),
        )
        cfg = config_io.resolve_options(ctx, RecordConfig, cfg, config_file=config, aliases=RECORD_ALIASES,
                                        not_config=RECORD_NOT_CONFIG)
        if print_config:
            typer.echo(config_io.dump(cfg))
            return
        preflight.check_record(cfg, overwrite=overwrite)
        with rundir.owned(cfg.out, overwrite=overwrite, owns_runs=False):
            result = run_record(cfg)
        typer.echo(strict_json(result))
