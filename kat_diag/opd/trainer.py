"""The OPD + KAT trainer: one readable loop, from tiny CPU models to Qwen3 checkpoints on GPUs.

Setup (models, data, policy, optimizer, sinks, resume), then `for step`: the student rolls out
its share of the step's prompts with online teacher scoring under the termination policy, the OPD
loss is taken on the kept tokens, and periodic blocks write metrics, traces, evaluations and
checkpoints. Variants (termination policies, loss estimators) live behind their own interfaces in
`termination` and `loss`; the loop never branches on them.

A run directory holds: config.json (the resolved config), metrics.jsonl (one line per step, plus
eval lines), traces/ (the trace store), checkpoints/step-NNNNNN/ (student weights via
save_pretrained, tokenizer, trainer_state.pt with optimizer, scheduler, policy state and step).
Resuming from the last checkpoint reproduces the uninterrupted run exactly: prompts and sampling
are pure functions of (seed, step, rank), everything else is restored.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kat_diag.data.grading import check_answer
from kat_diag.data.problems import Problem
from kat_diag.data.sources import load_math_dataset
from kat_diag.kat.policies import make_policy
from kat_diag.models import check_compatible, load_model, load_tokenizer, resolve_device
from kat_diag.opd import checkpoint as ckpt_io
from kat_diag.opd import distributed as D
from kat_diag.opd import fsdp as FS
from kat_diag.opd.checkpoint import _discard_traces_after, latest_checkpoint, save_checkpoint
from kat_diag.opd.config import CONFIG_NAME, METRICS_NAME, RESUME_MUTABLE, STATE_NAME, TrainConfig
from kat_diag.opd.loss import LossInputs, make_loss
from kat_diag.opd.rollout import Rollout, RolloutEngine, encode_prompts
from kat_diag.opd.supervise import select_training_tokens, with_supervision
from kat_diag.opd.trace_rows import trace_batch
from kat_diag.opd.tracking import check_report_to, make_tracker, rollout_rows
from kat_diag.run import rundir
from kat_diag.run.config_io import check_resumed
from kat_diag.run.preflight import context_limit, fit_prompts
from kat_diag.run.progress import bar as progress_bar

# ---------------------------------------------------------------------------------------------
# Small pieces the loop uses
# ---------------------------------------------------------------------------------------------


class MetricsSink:
    """Appends one JSON object per call to metrics.jsonl (flushed, so a crash loses nothing)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def write(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        # NaN (e.g. tau before KAT's warm-up ends) is written as null: strict JSON for jq & co.
        clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean, default=float) + "\n")
            f.flush()

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines of steps the checkpoint does not cover (they will be redone)."""
        if not self.enabled or not self.path.exists():
            return
        lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
        kept = [ln for ln in lines if json.loads(ln).get("step", -1) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(ln + "\n" for ln in kept))
        os.replace(tmp, self.path)


def prompt_indices(step: int, batch: int, rank: int, world: int, n: int, seed: int) -> list[int]:
    """The prompts of (step, rank): epochs of seeded permutations, so resume needs no state."""
    out, perms = [], {}
    start = (step * world + rank) * batch
    for g in range(start, start + batch):
        epoch, pos = divmod(g, n)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out.append(int(perms[epoch][pos]))
    return out


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * 4099 + rank)


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / max(1, cfg.warmup_steps)
        if cfg.schedule == "constant":
            return 1.0
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    return f


def load_prompts(cfg: TrainConfig) -> tuple[list[Problem], dict[str, list[Problem]]]:
    """Training prompts and benchmark splits, from the embedded world or local files."""
    if cfg.data == "world":
        from kat_diag.world.paths import load_world_splits, world_dir_of

        splits = load_world_splits(world_dir_of(cfg.student))
        train = splits.pop("train")
        return train, splits
    kw = dict(question_field=cfg.question_field, answer_field=cfg.answer_field, answer_format=cfg.answer_format)
    train = load_math_dataset(cfg.data, **kw)
    bench = {Path(b).stem: load_math_dataset(b, **kw) for b in cfg.bench}
    return train, bench


def opd_update(student, rollouts: list[Rollout], loss_fn, opt, cfg: TrainConfig, device) -> dict[str, float]:
    """One optimizer step of OPD on the kept tokens, normalised by the step's global kept count."""
    kept = [r for r in rollouts if r.keep > 0]
    n_local = sum(r.keep for r in kept)
    n_global = D.sum_scalars({"n": float(n_local)}, device)["n"]
    loss_sum = 0.0
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bf16")
    student.train()
    n_micro = FS.pad_micro_batches(-(-len(kept) // cfg.micro_batch), device, student)  # same on all FSDP ranks
    for i in range(0, n_micro * cfg.micro_batch, cfg.micro_batch):
        micro = kept[i : i + cfg.micro_batch]
        if not micro:  # FSDP: fewer kept rollouts here than on another rank; join its collectives
            FS.dummy_backward(student, device)
            continue
        seqs = [torch.cat([r.prompt_ids, r.token_ids[: r.keep]]) for r in micro]
        T = max(len(s) for s in seqs)
        ids_BT = torch.zeros(len(seqs), T, dtype=torch.long)
        mask_BT = torch.zeros(len(seqs), T, dtype=torch.long)
        rows, cols = [], []
        for b, (r, s) in enumerate(zip(micro, seqs, strict=True)):
            ids_BT[b, : len(s)] = s
            mask_BT[b, : len(s)] = 1
            lp = len(r.prompt_ids)
            rows.append(torch.full((r.keep,), b))
            cols.append(torch.arange(lp - 1, lp - 1 + r.keep))  # logits here predict the kept tokens
        rows_N, cols_N = torch.cat(rows).to(device), torch.cat(cols).to(device)
        with autocast:
            logits_BTV = student(input_ids=ids_BT.to(device), attention_mask=mask_BT.to(device)).logits
        x = LossInputs(
            student_logits_NV=logits_BTV[rows_N, cols_N],
            token_ids_N=torch.cat([r.token_ids[: r.keep] for r in micro]).to(device),
            old_logprob_N=torch.cat([r.student_logprob[: r.keep] for r in micro]).to(device),
            teacher_logprob_N=torch.cat([r.teacher_logprob[: r.keep] for r in micro]).to(device),
            lengths_B=torch.tensor([r.keep for r in micro], device=device),
            **_teacher_inputs(micro, loss_fn.teacher_state, device),
        )
        loss = loss_fn(x)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite OPD loss ({float(loss)}) on a micro-batch of {len(micro)} rollouts: check the "
                "teacher/student logits (dtype overflow?) — the last checkpoint is intact"
            )
        (loss / max(n_global, 1.0)).backward()
        loss_sum += float(loss.detach())
    D.all_reduce_grads(student)
    grad_norm = FS.clip_grad_norm(student, cfg.grad_clip) if n_global else 0.0
    if n_global > 0:
        opt.step()
    opt.zero_grad(set_to_none=True)
    student.eval()
    return {"loss_sum": loss_sum, "kept_tokens": float(n_local), "grad_norm": grad_norm}


def _teacher_inputs(micro: list[Rollout], state: str, device) -> dict[str, torch.Tensor]:
    """The teacher state the loss needs (`OPDLoss.teacher_state`), concatenated over the micro-batch."""
    fields = {"full": {"teacher_logprobs_NV": "teacher_logprobs_full"},
              "topk": {"topk_ids_NK": "topk_ids", "teacher_topk_logprobs_NK": "teacher_topk_logprobs",
                       "teacher_tail_logprob_N": "teacher_tail_logprob"}}.get(state, {})
    return {arg: torch.cat([getattr(r, attr) for r in micro]).to(device) for arg, attr in fields.items()}


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


class GracefulInterrupt:
    """First SIGINT: ask the loop to stop at the end of the current step (checkpoint, then exit).
    Second SIGINT: raise KeyboardInterrupt at once. Only installed in the main thread."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: finishing this step, then checkpointing (Ctrl-C again to abort)", file=sys.stderr)

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def evaluate_student(student, tokenizer, bench: dict[str, list[Problem]], cfg: TrainConfig) -> dict[str, float]:
    from kat_diag.evaluation import evaluate_benchmarks

    subset = {k: v[: cfg.eval_n] for k, v in bench.items()}
    res = evaluate_benchmarks(student, tokenizer, subset, k=cfg.eval_k, greedy=True,
                              max_new_tokens=cfg.sampling.max_new_tokens, seed=cfg.seed,
                              truncate_prompts=cfg.truncate_prompts)
    return {f"eval/{split}/{m}": v for split, r in res.items() for m, v in r.items()}  # n: problems (for CIs)


@dataclass
class TrainResult:
    metrics: dict[str, Any]  # the last step's metrics
    student: Any  # the trained student (this rank's replica)
    run_dir: Path


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False,
          on_step: Callable[[int, dict[str, Any]], None] | None = None, *,
          resume_hint: str = "continue with --resume") -> TrainResult:
    """Run OPD with the configured termination policy. Rank 0 owns (locks) the run directory while it
    runs; an existing run is refused unless `resume` (its config.json must match, see RESUME_MUTABLE)
    or `overwrite` (see `kat_diag.run.rundir`). `on_step(step, metrics)` is called on rank 0 after each
    step's metrics are written (e.g. an outer progress display). `resume_hint` ends the message a
    Ctrl-C prints (how the caller's user continues)."""
    check_report_to(cfg.report_to)  # every tracker backend before anything starts or is written
    if resume:
        check_resumed(cfg, Path(cfg.out) / CONFIG_NAME, RESUME_MUTABLE)
        check_resume_steps(Path(cfg.out), cfg.steps)
    with rundir.owned(cfg.out, resume=resume, overwrite=overwrite, enabled=int(os.environ.get("RANK", "0")) == 0):
        return _train(cfg, resume, on_step, resume_hint)


def check_resume_steps(run: Path, steps: int) -> None:
    """A resumed run must have steps left: never shrink a run below what it has done, never redo a
    finished one (both used to exit 0 and rewrite config.json to a step count final/ does not hold)."""
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        return
    done = int(ckpt.name.split("-")[-1]) + 1
    if steps <= done and (run / "final").is_dir():
        shrink = f"; --steps {steps} cannot make it shorter" if steps < done else ""
        raise ValueError(f"--resume: {run} is complete ({done} steps trained, final/ written), nothing to "
                         f"resume{shrink}; --steps N with N > {done} trains it further")
    if steps < done:
        raise ValueError(f"--steps {steps}: {run} has already trained {done} steps (checkpoint {ckpt.name}); "
                         "a resumed run cannot have fewer steps than it has done")


def _train(cfg: TrainConfig, resume: bool,
           on_step: Callable[[int, dict[str, Any]], None] | None = None,
           resume_hint: str = "continue with --resume") -> TrainResult:
    device = D.local_device(resolve_device(cfg.device))
    rank, world = D.init(device)
    run = Path(cfg.out)

    ckpt = latest_checkpoint(run) if resume else None
    state = ckpt_io.load_state(ckpt / STATE_NAME) if ckpt is not None else None  # before any model loads
    if rank == 0 and ckpt is not None:
        print(f"resuming from {ckpt} (step {state['step']})", file=sys.stderr)
    if resume and ckpt is None and rank == 0:
        print(f"no checkpoint in {run}: starting from scratch", file=sys.stderr)
    remote = cfg.trust_remote_code
    tokenizer = load_tokenizer(cfg.student, what="student tokenizer", trust_remote_code=remote)
    teacher = load_model(cfg.teacher, what="teacher", dtype="bf16" if cfg.dtype == "bf16" else "fp32",
                         device=str(device), trust_remote_code=remote)
    student = load_model(ckpt or cfg.student, what="student", device=str(device), trust_remote_code=remote)
    check_compatible(teacher, student, load_tokenizer(cfg.teacher, what="teacher tokenizer",
                                                      trust_remote_code=remote), tokenizer)
    teacher.eval().requires_grad_(False)
    student.eval()
    if cfg.parallel == "fsdp":
        student = FS.shard(student, device)
        teacher = FS.shard(teacher, device, trainable=False) if cfg.shard_teacher else teacher

    problems, bench = load_prompts(cfg)
    encoded = encode_prompts(tokenizer, [p.prompt for p in problems])
    limit = context_limit(teacher, student)
    encoded, n_cut = fit_prompts(encoded, [p.id for p in problems], cfg.sampling.max_new_tokens, limit,
                                 truncate=cfg.truncate_prompts, source=f"--data {cfg.data}")
    for name, probs in bench.items():  # evaluation prompts too, before any training
        ids = [tokenizer(p.prompt, add_special_tokens=False)["input_ids"] for p in probs[: cfg.eval_n]]
        n_cut += fit_prompts(ids, [p.id for p in probs], cfg.sampling.max_new_tokens, limit,
                             truncate=cfg.truncate_prompts, source=f"benchmark {name}")[1]
    if n_cut and rank == 0:
        print(f"warning: --truncate-prompts: {n_cut} prompts cut to their last "
              f"{limit - cfg.sampling.max_new_tokens} tokens to fit the models' context of {limit}", file=sys.stderr)
    policy = make_policy(cfg.termination, kat=cfg.kat, prefix_len=cfg.prefix_len,
                         random_target=_random_target(cfg), seed=cfg.seed * 131 + rank, device=device,
                         gather=lambda v: D.all_gather_values(v, device))
    policy = with_supervision(policy, cfg.supervise, cfg.kat, device, gather=lambda v: D.all_gather_values(v, device))
    loss_fn = make_loss(cfg.loss, cfg.topk, cfg.iw_gamma)
    decay = [p for p in student.parameters() if p.ndim >= 2]
    no_decay = [p for p in student.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    engine = RolloutEngine(student, teacher, tokenizer.eos_token_id, tokenizer.pad_token_id, cfg.sampling)

    sink = MetricsSink(run / METRICS_NAME, enabled=rank == 0)
    start = 0
    if state is not None:
        FS.load_optimizer_state(student, opt, state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        policy.load_state_dict(state["policy"])
        torch.set_rng_state(state["torch_rng"])
        start = state["step"] + 1
        sink.truncate_after(state["step"])
        _discard_traces_after(run, state["step"], rank)
    elif resume:  # nothing was checkpointed: what the earlier attempt wrote is redone from step 0
        sink.truncate_after(-1)
        _discard_traces_after(run, -1, rank)
    if rank == 0:
        (run / CONFIG_NAME).write_text(json.dumps({**cfg.to_dict(), "world_size": world}, indent=2))
    D.barrier()
    tracker = make_tracker(cfg.report_to if rank == 0 else (), run, cfg.to_dict(), resumed=ckpt is not None,
                           start_step=start, project=cfg.tracker_project)
    writer = None
    if cfg.trace_every:
        from kat_diag.traces.writer import TraceWriter

        writer = TraceWriter(run, rank=rank, config=cfg.to_dict(), top_n=max(1, cfg.sampling.top_n))

    end = cfg.steps if cfg.max_steps_this_run is None else min(cfg.steps, start + cfg.max_steps_this_run)
    bar = progress_bar(range(start, end), desc=f"train[{cfg.termination}]", disable=not cfg.progress or rank != 0,
               initial=start, total=cfg.steps)
    metrics: dict[str, Any] = {}
    last_done, updating, saved = start - 1, False, start - 1
    if bench and cfg.eval_n and cfg.eval_at_start and start == 0:
        # The baseline of the eval curves: the student before any update. Evaluation reseeds the
        # global RNG; restoring it keeps the run identical to one without the baseline.
        rng_state = torch.get_rng_state()
        cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        with FS.gathered(student):
            if rank == 0:
                ev = evaluate_student(student, tokenizer, bench, cfg)
                sink.write({"step": -1, **ev})
                tracker.log(ev, 0)
            D.barrier()
        torch.set_rng_state(rng_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)
    interrupt = GracefulInterrupt()
    try:
        for step in bar:
            t0 = time.perf_counter()
            policy.begin_step(step)
            idx = prompt_indices(step, cfg.batch_size, rank, world, len(problems), cfg.seed)
            with FS.gathered(student), FS.gathered(teacher):  # FSDP: one all-gather per rollout, not per token
                rollouts, rstats = engine.run([encoded[i] for i in idx], policy,
                                              step_generator(cfg.seed, step, rank, device),
                                              teacher_state=loss_fn.teacher_state, topk=loss_fn.k)
            policy_metrics = policy.end_step([r.kl for r in rollouts])  # in prompt order, as traced
            t_roll = time.perf_counter() - t0
            updating = True
            upd = opd_update(student, select_training_tokens(policy, rollouts, policy_metrics), loss_fn, opt,
                             cfg, device)
            sched.step()
            step_time = time.perf_counter() - t0

            gen_tokens = sum(r.gen_len for r in rollouts)
            local = {
                "loss_sum": upd["loss_sum"], "kept_tokens": upd["kept_tokens"], "rollouts": float(len(rollouts)),
                "gen_tokens": float(gen_tokens), "sampled_tokens": float(rstats.generated_tokens),
                "kl_sum": float(sum(float(r.kl.sum()) for r in rollouts)),
                "kl_kept_sum": float(sum(float(r.kl[: r.keep].sum()) for r in rollouts)),
                "stopped": float(sum(r.stop_reason == "policy" for r in rollouts)),
                "eos": float(sum(r.stop_reason == "eos" for r in rollouts)),
                "rollout_time": t_roll, "step_time": step_time,
            }
            tot = D.sum_scalars(local, device)
            metrics = {
                "step": step,
                "loss": tot["loss_sum"] / max(tot["kept_tokens"], 1.0),
                "kl_mean": tot["kl_sum"] / max(tot["gen_tokens"], 1.0),
                "kl_kept_mean": tot["kl_kept_sum"] / max(tot["kept_tokens"], 1.0),
                "gen_len_mean": tot["gen_tokens"] / tot["rollouts"],
                "kept_len_mean": tot["kept_tokens"] / tot["rollouts"],
                "fired_share": tot["stopped"] / tot["rollouts"],
                "eos_share": tot["eos"] / tot["rollouts"],
                "tokens_per_s": tot["sampled_tokens"] / max(tot["rollout_time"] / world, 1e-9),
                "step_time": tot["step_time"] / world,
                "rollout_time": tot["rollout_time"] / world,
                "grad_norm": upd["grad_norm"],
                "lr": sched.get_last_lr()[0],
                **{f"policy/{k}": v for k, v in policy_metrics.items()},
            }
            metrics["tau"] = float(policy_metrics.get("tau", float("nan")))
            sink.write(metrics)
            tracker.log(metrics, step)
            if on_step is not None and rank == 0:
                on_step(step, metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", kl=f"{metrics['kl_mean']:.3f}",
                            gen=f"{metrics['gen_len_mean']:.0f}", kept=f"{metrics['kept_len_mean']:.0f}",
                            refresh=False)  # the bar's own interval decides (a few lines in a log)

            if writer is not None and step % cfg.trace_every == 0:
                probs = [problems[i] for i in idx]
                texts = tokenizer.batch_decode([r.token_ids.tolist() for r in rollouts], skip_special_tokens=True)
                correct = [check_answer(p, t) for p, t in zip(probs, texts, strict=True)]
                writer.append(trace_batch(rollouts, probs, texts, tokenizer, step, rank, cfg.termination,
                                          metrics["tau"], correct))
            # From the update to here the run is between two consistent states (see KeyboardInterrupt).
            last_done, updating = step, False

            last = step == cfg.steps - 1
            if bench and cfg.eval_n and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last):
                with FS.gathered(student):
                    if rank == 0:
                        ev = evaluate_student(student, tokenizer, bench, cfg)
                        sink.write({"step": step, **ev})
                        tracker.log(ev, step)
                        tracker.log_rollouts(rollout_rows(rollouts, tokenizer, step, metrics["tau"], cfg.termination,
                                                         problems=[problems[i] for i in idx], kat=cfg.kat),
                                             step)
                    D.barrier()
            # A Ctrl-C (on any rank) ends the run here, at a step boundary, with a checkpoint.
            stop_now = D.sum_scalars({"stop": float(interrupt.requested)}, device)["stop"] > 0
            if (cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0) or last or step == end - 1 or stop_now:
                if writer is not None:
                    writer.flush()  # traces up to this step are durable with the checkpoint
                full = FS.full_state(student, opt)  # FSDP: gathered on all ranks
                if rank == 0:
                    save_checkpoint(run, step, student, tokenizer, opt, sched, policy, cfg.keep_checkpoints, full)
                    saved = step
                D.barrier()
            if stop_now:
                print(f"interrupted: step {step} checkpointed in {run}; {resume_hint}", file=sys.stderr)
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        # A second Ctrl-C aborts mid-step: keep the flushed traces, and checkpoint the last finished
        # step unless the abort hit an optimizer update (then the last checkpoint stands).
        if writer is not None:
            writer.flush()
        if rank == 0 and not updating and last_done >= start and saved != last_done and not FS.is_sharded(student):
            save_checkpoint(run, last_done, student, tokenizer, opt, sched, policy, cfg.keep_checkpoints)
            print(f"aborted: step {last_done} checkpointed in {run}; {resume_hint}", file=sys.stderr)
        raise
    finally:
        interrupt.restore()
        tracker.close()

    if writer is not None:
        writer.close()
    full_sd = FS.full_state(student, opt)[0] if end == cfg.steps else None
    if rank == 0 and end == cfg.steps:
        student.save_pretrained(run / "final", state_dict=full_sd)
        tokenizer.save_pretrained(run / "final")
    D.barrier()
    return TrainResult(metrics=metrics, student=student, run_dir=run)


def _random_target(cfg: TrainConfig) -> float | Path | None:
    """For `random`: the mean kept length given, or a KAT run's metrics.jsonl to length-match."""
    if cfg.termination != "random":
        return None
    if cfg.random_target is not None:
        return cfg.random_target
    if cfg.random_from is None:
        raise ValueError("termination 'random' needs --random-target or --random-from KAT_RUN")
    path = Path(cfg.random_from) / METRICS_NAME
    if not path.exists():
        raise FileNotFoundError(f"cannot length-match: no {METRICS_NAME} in {cfg.random_from}")
    return path
