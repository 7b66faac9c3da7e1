"""The trainer's settings: `TrainConfig` and `SamplingConfig`, frozen, validated when built.

They sit in a module of their own, below the trainer, the rollout engine, `record`, the study and the
CLI's config files, so that each of those can read or check a run's settings without importing the
others. A run writes the resolved config to RUN/config.json (`CONFIG_NAME`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from kat_diag.kat.config import KATConfig
from kat_diag.models import resolve_dtype

CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"
CKPT_DIRNAME = "checkpoints"
STATE_NAME = "trainer_state.pt"
PARALLEL_MODES = ("ddp", "fsdp")

@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    chunk_size: int = 16  # C: tokens the student generates before the teacher scores them
    slots: int = 0  # rollouts in flight at once (0: all prompts of the step at once)
    top_n: int = 5  # teacher top-n tokens kept per position for traces
    # End a chunk early once this share of the live rows has hit EOS/budget while prompts are
    # waiting, so freed slots are refilled sooner (the teacher then scores a shorter chunk).
    refill_share: float = 0.25

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"--temperature (sampling.temperature) must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p (sampling.top_p) must be in (0, 1], got {self.top_p}")
        for name, lo in (("max_new_tokens", 1), ("chunk_size", 1), ("slots", 0), ("top_n", 0)):
            value = getattr(self, name)
            if value < lo:
                raise ValueError(f"--{name.replace('_', '-')} (sampling.{name}) must be >= {lo}, got {value}")


# Settings a resumed run may change (everything else must match its config.json): they decide how
# long it runs and what it evaluates / saves / records, never the trajectory of the updates.
RESUME_MUTABLE = frozenset({"out", "steps", "max_steps_this_run", "eval_every", "eval_at_start", "eval_k", "eval_n",
                            "ckpt_every",
                            "keep_checkpoints", "trace_every", "progress",
                            # how the run is watched and sharded, not what it computes (FSDP == DDP to fp32 rounding)
                            "report_to", "tracker_project", "parallel", "shard_teacher"})


@dataclass(frozen=True)
class TrainConfig:
    teacher: str
    student: str
    out: str
    data: str = "world"  # "world": the embedded world's train split; else a local JSONL/Parquet file
    question_field: str = "question"
    answer_field: str = "answer"
    answer_format: str = "auto"
    bench: tuple[str, ...] = ()  # benchmark files for real data (the world uses its own splits)
    steps: int = 50
    batch_size: int = 32  # prompts per step per rank
    micro_batch: int = 32  # rollouts per backward pass (gradient accumulation)
    lr: float = 1e-4
    warmup_steps: int = 5
    schedule: str = "cosine"  # cosine | constant
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    dtype: str = "fp32"  # fp32 | bf16 (teacher in bf16, student under autocast)
    device: str = "auto"
    seed: int = 0
    loss: str = "topk"  # topk (the paper's: top-k + tail bucket) | full | sampled | iwopd
    topk: int = 64  # k of the topk loss (capped at the vocabulary size)
    iw_gamma: float = 0.5  # gamma of the iwopd loss (IW-OPD's position weights)
    termination: str = "kat"  # none | kat | random | prefix | kat+prefix
    prefix_len: int | None = None
    random_target: float | None = None  # mean kept length for `random` ...
    random_from: str | None = None  # ... or a KAT run directory to length-match
    supervise: str | None = None  # train only on these phases of untruncated rollouts (kat_diag.opd.supervise)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=192, chunk_size=16))
    kat: KATConfig = field(default_factory=KATConfig)
    eval_every: int = 0  # 0: evaluate only after the last step
    eval_at_start: bool = False  # also evaluate the initial student (logged as step -1: before any update)
    eval_k: int = 4
    eval_n: int = 50  # problems per benchmark split (0: no evaluation)
    ckpt_every: int = 25
    keep_checkpoints: int = 2
    trace_every: int = 1  # record traces every N steps (0: never)
    max_steps_this_run: int | None = None  # stop early (simulates an interruption; for tests)
    progress: bool = True
    trust_remote_code: bool = False  # let from_pretrained run a checkpoint's own Python code
    truncate_prompts: bool = False  # prompts longer than the context minus the budget: keep their end (else refuse)
    report_to: tuple[str, ...] = ()  # tensorboard | trackio | wandb (kat_diag.opd.tracking)
    tracker_project: str = "kat-diag"
    parallel: str = "ddp"  # ddp | fsdp (kat_diag.opd.fsdp) under several processes
    shard_teacher: bool = False  # fsdp: shard the teacher too

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "micro_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} ({name}) must be >= 1, got {getattr(self, name)}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be cosine|constant, got {self.schedule!r}")
        resolve_dtype(self.dtype)
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel must be ddp|fsdp, got {self.parallel!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
