"""`KATDistillationTrainer`: TRL's on-policy distillation with KAT and kat-diag's trace store.

Why it exists: people run on-policy distillation with `trl.DistillationTrainer`, not with `kat-diag
train`. This subclass adds every kat-diag termination policy (none, kat, random, prefix, kat+prefix,
`--supervise` phases) and writes the same trace store, so KAT runs inside TRL and every kat-diag
analysis works on a TRL run's OUTPUT_DIR. TRL's own loss (the chunked full-vocabulary divergence),
optimizer, schedule, logging, checkpoints and launchers are untouched.

How it hooks into TRL (read against trl/trainer/distillation_trainer.py of TRL 1.10-1.16):

* online mode (transformers generation): `_generate_single_turn` is replaced by kat-diag's rollout
  engine (`kat_diag.opd.rollout.RolloutEngine`: the student samples with its KV cache, the teacher
  scores every chunk of C tokens over its own KV cache, the policy stops rows as it goes), so nothing
  after a fire is generated beyond the rest of its chunk (none with `chunk_size=1`); the completion
  handed to TRL is the kept prefix;
* post-hoc mode (vLLM, or `mode="posthoc"`): TRL generates as usual; `_generate_and_score_completions`
  then scores the finished completions teacher-forced (`kat_diag.opd.scoring.score_completions`, one
  no-grad pass, `score_micro_batch` rows at a time) and runs the same policy over them
  (`batch.posthoc_rollouts`): the same tokens are trained on as online, no generation is saved;
* both modes: the policy's `begin_step` / `end_step` wrap TRL's batch assembly once per generation
  batch (KAT's buffer values gathered over ranks, so every rank holds one threshold), and each row's
  training span is written into TRL's masks (`batch.apply_spans`, `num_items_in_batch` recomputed);
* `kat/*` metrics go into TRL's `_metrics`, hence its logs and every reporter; rank 0 mirrors each
  log line to OUTPUT_DIR/metrics.jsonl so `kat-diag figures` draws the curves;
* `record_traces=True`: each rank writes OUTPUT_DIR/traces/ with `kat_diag.opd.trace_rows.trace_batch`
  (the run config in the manifest: KAT parameters, teacher and student paths, termination);
* checkpoints: the policy state goes to checkpoint-N/kat_state-rankR.pt (plain tensors, loaded
  weights-only) and `train(resume_from_checkpoint=...)` restores it before TRL resumes; trace files
  of steps after the checkpoint are moved aside (they are redone).

Evaluation (`trainer.evaluate()`) runs TRL's plain path: no policy, no traces.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from trl import DistillationConfig, DistillationTrainer
from trl.models.utils import unwrap_model_for_generation

from kat_diag.data.grading import check_answer
from kat_diag.integrations.trl import batch as B
from kat_diag.kat.config import KATConfig
from kat_diag.kat.policies import make_policy
from kat_diag.opd import distributed as D
from kat_diag.opd.checkpoint import _discard_traces_after, load_state, save_state
from kat_diag.opd.config import METRICS_NAME, SamplingConfig
from kat_diag.opd.rollout import Rollout, RolloutEngine
from kat_diag.opd.scoring import score_completions
from kat_diag.opd.supervise import PhaseSupervision, parse_phases, with_supervision
from kat_diag.opd.trace_rows import trace_batch
from kat_diag.opd.trainer import MetricsSink, step_generator

MODES = ("auto", "online", "posthoc")
STATE_FILE = "kat_state-rank{rank:05d}.pt"
# TRL's log keys -> kat-diag's metrics.jsonl keys (what `kat-diag figures` draws).
_CURVE_KEYS = {"loss": "loss", "kat/kl_mean": "kl_mean", "kat/tau": "tau", "kat/gen_len_mean": "gen_len_mean",
               "kat/kept_len_mean": "kept_len_mean", "kat/fired_share": "fired_share", "step_time": "step_time",
               "learning_rate": "lr", "grad_norm": "grad_norm"}


def _name_or_path(model: Any) -> str | None:
    if isinstance(model, str):
        return model
    return getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)


class KATDistillationTrainer(DistillationTrainer):
    """`trl.DistillationTrainer` with a kat-diag termination policy and trace store (module docstring).

    Arguments beyond `DistillationTrainer`'s (keyword only):
        termination: none | kat | random | prefix | kat+prefix (`kat_diag.kat.policies`).
        kat: KAT's parameters (`kat_diag.kat_preset("world" | "paper")`; default `KATConfig()`).
        prefix_len: P for prefix and kat+prefix. random_target: mean kept length for random, or a KAT
            run's metrics.jsonl to length-match.
        supervise: train only on these phases of untruncated rollouts ("pre", "agreement+post", ...;
            needs termination "none"), as `kat-diag train --supervise`.
        mode: "online" (kat-diag's engine generates, nothing after a fire is generated), "posthoc"
            (TRL generates, one scoring pass decides), "auto" (posthoc under use_vllm, else online).
        record_traces: write OUTPUT_DIR/traces/ every `trace_every` steps.
        chunk_size: online: tokens the student samples before the teacher scores them (1 = lockstep:
            not one token past a fire; larger chunks score faster and discard the rest of the chunk).
        top_n: teacher top-n tokens kept per position in traces.
        score_micro_batch: post-hoc: rows per scoring forward (memory: rows x sequence x vocabulary).
        data: the data source kat-diag's analyses re-read prompts from ("world" or a JSONL/Parquet
            file; `kat-diag gradproj` needs it), recorded in the run config.
    """

    def __init__(self, model: Any, teacher_model: Any = None, args: DistillationConfig | None = None,
                 train_dataset: Any = None, eval_dataset: Any = None, processing_class: Any = None,
                 callbacks: Any = None, optimizers: Any = (None, None), quantization_config: Any = None,
                 peft_config: Any = None, tools: Any = None, *, termination: str = "kat",
                 kat: KATConfig | None = None, prefix_len: int | None = None,
                 random_target: float | str | None = None, supervise: str | None = None, mode: str = "auto",
                 record_traces: bool = False, trace_every: int = 1, chunk_size: int = 16, top_n: int = 5,
                 score_micro_batch: int = 8, data: str | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: must be one of {', '.join(MODES)}")
        if tools:
            raise ValueError("KATDistillationTrainer does not support tools (multi-turn tool calls): a rollout "
                             "is one generated completion")
        if trace_every < 1 or score_micro_batch < 1 or chunk_size < 1 or top_n < 1:
            raise ValueError("trace_every, score_micro_batch, chunk_size and top_n must be >= 1")
        use_vllm = bool(getattr(args, "use_vllm", False))
        resolved = ("posthoc" if use_vllm else "online") if mode == "auto" else mode
        if resolved == "online" and use_vllm:
            raise ValueError("mode='online' needs transformers generation; with use_vllm=True use mode='posthoc'")
        if resolved == "online" and args is not None:
            _check_online_sampling(args)
        self.kat_mode = resolved
        self.termination = termination
        self.kat_config = kat if kat is not None else KATConfig()
        self._kat_options = dict(prefix_len=prefix_len, random_target=random_target, supervise=supervise)
        self.record_traces = record_traces
        self.trace_every = trace_every
        self.score_micro_batch = score_micro_batch
        self.data_source = data
        self._teacher_name = _name_or_path(teacher_model)
        self._student_name = _name_or_path(model)
        super().__init__(model=model, teacher_model=teacher_model, args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks,
                         optimizers=optimizers, quantization_config=quantization_config, peft_config=peft_config)
        if self._is_vlm:
            raise ValueError("KATDistillationTrainer supports text-only models (a vision processor was given)")
        if self.teacher_model is None:
            raise ValueError("KATDistillationTrainer needs a teacher_model: KAT reads the teacher's per-token KL")
        if supervise and parse_phases(supervise)[0] > 0 and not _loss_reads_tool_mask():
            # tokens before the span stay as context, out of the loss: that is TRL's tool_mask
            raise ValueError(f"supervise={supervise!r} needs a TRL whose DistillationTrainer loss reads tool_mask "
                             f"(TRL {_trl_version()} does not): upgrade TRL, or supervise phases from 'pre'")
        # Every id that ends a completion (TRL >= 1.11 keeps the model's list; 1.10 the tokenizer's EOS).
        self.kat_eos_ids = list(getattr(self, "eos_token_ids", None) or [self._tokenizer.eos_token_id])
        self._rank = self.accelerator.process_index
        device = self.accelerator.device
        gather: Callable[[Any], Any] = lambda v: D.all_gather_values(v, device)  # noqa: E731
        policy = make_policy(termination, kat=self.kat_config, prefix_len=prefix_len, random_target=random_target,
                             seed=self.args.seed * 131 + self._rank, device=device, gather=gather)
        self.kat_policy = with_supervision(policy, supervise, self.kat_config, device, gather=gather)
        self.sampling = SamplingConfig(temperature=self.args.temperature, top_p=self.args.top_p,
                                       max_new_tokens=self.max_completion_length, chunk_size=chunk_size, top_n=top_n)
        self._online: tuple[list[Rollout], int] | None = None
        self._writer = None
        self._sink = MetricsSink(Path(self.args.output_dir) / METRICS_NAME, enabled=self.accelerator.is_main_process)

    # -- the run config and the trace store --------------------------------------------------------------

    def kat_run_config(self) -> dict[str, Any]:
        """What the trace manifest records: the keys of `kat-diag train`'s config.json that analyses read
        (teacher, student, kat, termination, loss, sampling, ...) plus the TRL settings."""
        import trl

        a = self.args
        cfg: dict[str, Any] = {
            "trainer": "trl.DistillationTrainer", "teacher": self._teacher_name, "student": self._student_name,
            "out": str(a.output_dir), "termination": self.termination, **self._kat_options,
            "kat": self.kat_config.to_dict(), "sampling": dataclasses.asdict(self.sampling),
            # TRL's loss is the full-vocabulary generalised JSD; beta 1 is the reverse KL (kat-diag's "full").
            "loss": "full" if a.beta == 1.0 else f"jsd(beta={a.beta})", "topk": None,
            "steps": a.max_steps, "batch_size": a.per_device_train_batch_size * a.gradient_accumulation_steps,
            "lr": a.learning_rate, "seed": a.seed, "world_size": self.accelerator.num_processes,
            "trl": {"version": trl.__version__, "mode": self.kat_mode, "beta": a.beta,
                    "temperature": a.temperature, "max_completion_length": a.max_completion_length},
        }
        if self.data_source is not None:
            cfg["data"] = self.data_source
        return cfg

    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None,
              ignore_keys_for_eval: list[str] | None = None, **kwargs: Any) -> Any:
        """TRL's `train`, with the policy state restored from the checkpoint first and the trace writer
        open for the run (closed, and everything flushed, however the run ends)."""
        ckpt = resume_from_checkpoint
        if ckpt is True:
            from transformers.trainer_utils import get_last_checkpoint

            ckpt = get_last_checkpoint(self.args.output_dir)
            if ckpt is None:
                raise ValueError(f"resume_from_checkpoint=True but {self.args.output_dir} holds no checkpoint-*")
        if ckpt:
            self.load_kat_state(ckpt)
        if self.record_traces:
            from kat_diag.traces.writer import TraceWriter

            self._writer = TraceWriter(self.args.output_dir, rank=self._rank, config=self.kat_run_config(),
                                       top_n=self.sampling.top_n)
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                                 ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
        finally:
            if self._writer is not None:
                self._writer.close()
                self._writer = None

    def load_kat_state(self, checkpoint: str | os.PathLike[str]) -> int:
        """Restore this rank's policy state (KAT's buffer and threshold, random's generator, ...) from a
        TRL checkpoint directory; returns the checkpoint's step. Trace files of later steps move aside."""
        path = Path(checkpoint) / STATE_FILE.format(rank=self._rank)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: {checkpoint} was not written by KATDistillationTrainer "
                                    f"(or by fewer ranks than this run has)")
        state = load_state(path)
        if state.get("termination") != self.termination:
            raise ValueError(f"{path} holds the state of termination {state.get('termination')!r}, this run uses "
                             f"{self.termination!r}")
        self.kat_policy.load_state_dict(state["policy"])
        step = int(state["step"])
        _discard_traces_after(Path(self.args.output_dir), step - 1, self._rank)  # steps >= step are redone
        return step

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        if self._writer is not None:
            self._writer.flush()  # the traces of the checkpointed steps are durable with it
        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        save_state(folder / STATE_FILE.format(rank=self._rank),
                   {"step": self.state.global_step, "termination": self.termination,
                    "policy": self.kat_policy.state_dict()})

    # -- generation ------------------------------------------------------------------------------------

    @contextmanager
    def _models_for_rollout(self):
        """The unwrapped student (parameters gathered under ZeRO-3 / FSDP) and teacher, both in eval
        mode (no dropout in the KL the policy reads), the student's mode restored afterwards."""
        kwargs = {"gather_deepspeed3_params": self.args.ds3_gather_for_generation,
                  "generation_kwargs": self.generation_kwargs,
                  "gradient_checkpointing_kwargs": self.args.gradient_checkpointing_kwargs}
        accepted = inspect.signature(unwrap_model_for_generation).parameters  # TRL 1.10 lacks the last one
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        with (unwrap_model_for_generation(self.model_wrapped, self.accelerator, **kwargs) as student,
              torch.no_grad(), self._dist.summon_full_params(self.model_wrapped, recurse=False)):
            teacher = self.accelerator.unwrap_model(self.teacher_model)
            was_training = student.training
            student.eval()
            teacher.eval()
            try:
                yield student, teacher
            finally:
                student.train(was_training)

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, *args: Any, **kwargs: Any):
        if self.kat_mode != "online" or not self.model.training:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, *args, **kwargs)
        device = self.accelerator.device
        gen = step_generator(self.args.seed, self.state.global_step, self._rank, device)
        with self._models_for_rollout() as (student, teacher):
            engine = RolloutEngine(student, teacher, self.kat_eos_ids, self._tokenizer.pad_token_id, self.sampling)
            rollouts, stats = engine.run(prompt_ids, self.kat_policy, gen)
        self._online = (rollouts, stats.generated_tokens)
        # The kept prefix (at least one token, so TRL's bookkeeping sees a completion; a row that keeps
        # nothing is masked out entirely by `apply_spans`).
        return [r.token_ids[: max(r.keep, 1)].tolist() for r in rollouts]

    def _score_posthoc(self, batch: dict[str, Any]) -> tuple[list[Rollout], int]:
        prompts, completions = B.unpadded_rows(batch)
        with self._models_for_rollout() as (student, teacher):
            scored = score_completions(student, teacher, prompts, completions,
                                       pad_token_id=self._tokenizer.pad_token_id, top_n=self.sampling.top_n,
                                       micro_batch=self.score_micro_batch)
        rollouts = B.posthoc_rollouts(self.kat_policy, prompts, completions, scored, self.kat_eos_ids,
                                      self.max_completion_length)
        return rollouts, sum(len(c) for c in completions)

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        if not self.model.training:
            return super()._generate_and_score_completions(inputs)
        step = self.state.global_step
        t0 = time.perf_counter()
        self.kat_policy.begin_step(step)
        self._online = None
        batch = super()._generate_and_score_completions(inputs)
        if self.kat_mode == "online":
            if self._online is None:
                raise RuntimeError("online mode: TRL did not call _generate_single_turn (TRL version not supported?)")
            rollouts, sampled = self._online
            self._online = None
        else:
            rollouts, sampled = self._score_posthoc(batch)
        policy_metrics = self.kat_policy.end_step([r.kl for r in rollouts])  # KAT: buffer gathered over ranks
        lo_B, hi_B = B.training_spans(self.kat_policy, rollouts, policy_metrics)
        B.apply_spans(batch, lo_B, hi_B, lambda x: self.accelerator.gather(x).sum(), self.pad_to_multiple_of)
        self._log_kat(policy_metrics, rollouts, sampled, int((hi_B - lo_B).sum()), time.perf_counter() - t0)
        if self._writer is not None and step % self.trace_every == 0:
            self._write_traces(inputs, rollouts, step, policy_metrics)
        return batch

    # -- metrics and traces ----------------------------------------------------------------------------

    def _log_kat(self, pm: dict[str, float], rollouts: list[Rollout], sampled: int, trained: int,
                 seconds: float) -> None:
        device = self.accelerator.device
        local = {"rollouts": float(len(rollouts)), "stopped": float(sum(r.stop_reason == "policy" for r in rollouts)),
                 "fired": float(sum(r.fire >= 0 for r in rollouts)), "gen": float(sum(r.gen_len for r in rollouts)),
                 "kept": float(sum(r.keep for r in rollouts)), "sampled": float(sampled), "trained": float(trained),
                 "kl": float(sum(float(r.kl.double().sum()) for r in rollouts)), "seconds": seconds}
        tot = D.sum_scalars(local, device)
        n = max(tot["rollouts"], 1.0)
        out = {"kat/stopped_share": tot["stopped"] / n, "kat/fired_share": tot["fired"] / n,
               "kat/gen_len_mean": tot["gen"] / n, "kat/kept_len_mean": tot["kept"] / n,
               "kat/kept_share": tot["trained"] / max(tot["sampled"], 1.0),
               "kat/sampled_tokens": tot["sampled"], "kat/trained_tokens": tot["trained"],
               "kat/kl_mean": tot["kl"] / max(tot["gen"], 1.0),
               "kat/rollout_time": tot["seconds"] / self.accelerator.num_processes,
               "kat/tau": float(pm.get("tau", math.nan))}
        threshold = getattr(self.kat_policy, "threshold", None)
        if threshold is not None:  # KAT, kat+prefix, supervise: the FIFO buffer of rollout statistics
            size = float(threshold.buffer.numel())
            out.update({"kat/buffer_size": size, "kat/buffer_fill": size / self.kat_config.buffer_size,
                        "kat/active": float(threshold.active)})
        if isinstance(self.kat_policy, PhaseSupervision):
            out.update({f"kat/{k}": v for k, v in pm.items() if k.startswith("supervise_")})
        for k, v in out.items():
            self._metrics["train"][k].append(v)

    def _write_traces(self, inputs: list[dict[str, Any]], rollouts: list[Rollout], step: int,
                      pm: dict[str, float]) -> None:
        problems, graded = B.problems_of(inputs)
        texts = self._tokenizer.batch_decode([r.token_ids.tolist() for r in rollouts], skip_special_tokens=True)
        correct = [check_answer(p, t) if g else None for p, t, g in zip(problems, texts, graded, strict=True)]
        assert self._writer is not None
        self._writer.append(trace_batch(rollouts, problems, texts, self._tokenizer, step, self._rank, self.termination,
                                        float(pm.get("tau", math.nan)), correct))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        training = self.model.training
        super().log(logs, start_time)  # TRL folds its metrics (kat/* included) into `logs`
        if training and "loss" in logs:
            line = {"step": self.state.global_step - 1}
            line.update({new: logs[old] for old, new in _CURVE_KEYS.items() if old in logs})
            line.update({k: v for k, v in logs.items() if k.startswith("kat/")})
            self._sink.write(line)


def _trl_version() -> str:
    import trl

    return trl.__version__


def _loss_reads_tool_mask() -> bool:
    """Whether this TRL's distillation loss honours `tool_mask` (the loss-only mask `--supervise` spans
    that start after the first token need); TRL 1.10's does not."""
    try:
        return "tool_mask" in inspect.getsource(DistillationTrainer._compute_loss)
    except (OSError, TypeError):  # no source available: assume a current TRL
        return True


def _check_online_sampling(args: DistillationConfig) -> None:
    """Online generation samples with temperature and top-p only; anything else is refused, not ignored."""
    unsupported = []
    if args.top_k:
        unsupported.append(f"top_k={args.top_k}")
    if args.min_p is not None:
        unsupported.append(f"min_p={args.min_p}")
    if args.repetition_penalty != 1.0:
        unsupported.append(f"repetition_penalty={args.repetition_penalty}")
    if args.generation_kwargs:
        unsupported.append(f"generation_kwargs={args.generation_kwargs}")
    if unsupported:
        raise ValueError("online KAT samples with temperature and top_p only; unsupported: " + ", ".join(unsupported)
                         + " (use mode='posthoc' to keep TRL's generation)")
