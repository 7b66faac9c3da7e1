"""Memory plan of an OPD run from the two config.json files alone (no weights are loaded).

Why it exists: OPD keeps a trainable student (weights, gradients, AdamW state), a frozen teacher,
both KV caches for the rollouts in flight, and per-token teacher state until the update. Whether a
set-up fits a device — and whether it needs FSDP rather than DDP — follows from a handful of config
numbers, so `kat-diag plan` answers it before anything is downloaded or allocated.

The model (bytes per device; P = parameters, N = devices, B = bytes per element):

* student weights: P x 4 (fp32) or P x 2 (bf16, plus fp32 master weights P x 4);
* gradients: P x B (same dtype as the weights); AdamW m + v: P x 8 (always fp32);
* teacher weights: P_T x 2 (bf16) or x 4 (fp32);
* FSDP shards weights, gradients, master weights and optimizer state N ways (the teacher too with
  --shard-teacher). During a rollout the student (and a sharded teacher) is gathered once (full
  weights in memory: no all-gather per decoded token, as `kat_diag.opd.fsdp.gathered` does); during the
  update one layer at a time is gathered (x2 for prefetch), and a sharded teacher is back to 1/N;
* KV caches: slots x (prompt_len + budget) x layers x 2 x kv_heads x head_dim x B, for the student
  and the teacher;
* rollout activations: the student's decode logits (slots x V) and the teacher's chunk logits
  (slots x C x V), fp32, x3 (logits, log-softmax, softmax/KL temporaries);
* teacher state kept until the update, for all tokens of the step (batch x budget): the full loss
  keeps tokens x V fp32 log-probabilities, the top-k loss tokens x (k+1) fp32 (k log-probs + the
  tail mass) plus tokens x k int64 ids (as `rollout.Rollout` holds them), the sampled loss one fp32
  per token;
* update activations (one micro-batch of micro_batch x (prompt_len + budget) tokens): per layer
  (4 H + 2 q_dim + 2 kv_dim + 3 I) saved values in the compute dtype (SDPA: no T^2 term), and the
  logits x3 in fp32.

Peak = persistent (weights, optimizer, teacher weights, teacher state) + max(rollout phase, update
phase). These are estimates of the dominant terms: allocator slack, CUDA context (~0.5-1 GB) and
framework buffers are not counted, so keep a margin (the `fits` verdict leaves 10%).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

GB = 1e9
HEADROOM = 0.9  # share of the device memory a plan may use


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only config.json that memory depends on."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    qk_norm: bool = False
    attention_bias: bool = False

    @staticmethod
    def from_config(cfg: dict[str, Any]) -> ModelShape:
        """Read a Llama/Qwen-style config dict (text_config of a multimodal config is used if present)."""
        cfg = cfg.get("text_config", cfg)
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                               "vocab_size") if k not in cfg]
        if missing:
            raise KeyError(f"config has no {', '.join(missing)}: plan needs a decoder-only LM config")
        heads = int(cfg["num_attention_heads"])
        return ModelShape(
            hidden=int(cfg["hidden_size"]), layers=int(cfg["num_hidden_layers"]), heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
            intermediate=int(cfg["intermediate_size"]), vocab=int(cfg["vocab_size"]),
            tied=bool(cfg.get("tie_word_embeddings", False)),
            qk_norm=str(cfg.get("model_type", "")).startswith("qwen3"),
            attention_bias=bool(cfg.get("attention_bias", False)),
        )

    @staticmethod
    def from_path(path: str | Path) -> ModelShape:
        """A checkpoint directory or a config.json file."""
        p = Path(path)
        f = p / "config.json" if p.is_dir() else p
        if not f.exists():
            raise FileNotFoundError(f"no config.json at {path}")
        return ModelShape.from_config(json.loads(f.read_text()))

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_params(self) -> int:
        attn = self.hidden * (self.q_dim + 2 * self.kv_dim) + self.q_dim * self.hidden
        if self.attention_bias:
            attn += self.q_dim + 2 * self.kv_dim
        mlp = 3 * self.hidden * self.intermediate
        norms = 2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        return attn + mlp + norms

    def params(self) -> int:
        embed = self.vocab * self.hidden
        return embed * (1 if self.tied else 2) + self.layers * self.layer_params() + self.hidden

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return self.layers * 2 * self.kv_dim * dtype_bytes


@dataclass(frozen=True)
class PlanConfig:
    devices: int = 1
    batch_size: int = 32  # prompts per step per device
    slots: int = 0  # rollouts in flight (0: the whole batch)
    budget: int = 1024  # max new tokens per rollout
    prompt_len: int = 256
    chunk_size: int = 16
    micro_batch: int = 8
    loss: str = "topk"  # topk (the train default) | full | sampled | iwopd
    top_k: int = 64
    dtype: str = "bf16"  # teacher weights and compute dtype: fp32 | bf16
    student_dtype: str = "fp32"  # student weights: fp32 | bf16 (then fp32 master weights)
    shard_teacher: bool = False  # FSDP: shard the teacher too
    device_gb: float = 80.0

    def __post_init__(self) -> None:
        if self.loss not in ("full", "topk", "sampled", "iwopd"):
            raise ValueError(f"loss must be full|topk|sampled|iwopd, got {self.loss!r}")
        for name in ("dtype", "student_dtype"):
            if getattr(self, name) not in ("fp32", "bf16"):
                raise ValueError(f"{name} must be fp32|bf16, got {getattr(self, name)!r}")
        for name, lo in (("devices", 1), ("batch_size", 1), ("budget", 1), ("chunk_size", 1), ("micro_batch", 1),
                         ("top_k", 1), ("prompt_len", 0), ("slots", 0)):
            value = getattr(self, name)
            if value < lo:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {lo}, got {value}")
        if not (self.device_gb > 0 and math.isfinite(self.device_gb)):
            raise ValueError(f"--device-gb must be a finite number > 0, got {self.device_gb}")


def _bytes(dtype: str) -> int:
    return 2 if dtype == "bf16" else 4


def memory_plan(teacher: ModelShape, student: ModelShape, cfg: PlanConfig, mode: str) -> dict[str, float]:
    """Bytes per device of each term, the two phase peaks and the overall peak, for mode ddp | fsdp."""
    if mode not in ("ddp", "fsdp"):
        raise ValueError(f"mode must be ddp|fsdp, got {mode!r}")
    n = cfg.devices if mode == "fsdp" else 1
    ps, pt = student.params(), teacher.params()
    sb, cb = _bytes(cfg.student_dtype), _bytes(cfg.dtype)
    slots = cfg.slots or cfg.batch_size
    seq = cfg.prompt_len + cfg.budget
    step_tokens = cfg.batch_size * cfg.budget
    teacher_n = n if (mode == "fsdp" and cfg.shard_teacher) else 1

    t: dict[str, float] = {}
    t["student_weights"] = ps * sb / n
    t["master_weights"] = ps * 4 / n if cfg.student_dtype == "bf16" else 0.0
    t["optimizer"] = ps * 8 / n
    t["teacher_weights"] = pt * cb / teacher_n
    if cfg.loss == "full":
        t["teacher_state"] = step_tokens * teacher.vocab * 4
    elif cfg.loss == "topk":
        t["teacher_state"] = step_tokens * ((cfg.top_k + 1) * 4 + cfg.top_k * 8)
    else:
        t["teacher_state"] = step_tokens * 4
    # Rollout phase.
    t["gathered_student"] = ps * sb * (1 - 1 / n)  # FSDP: the rest of the student, gathered once
    t["gathered_teacher"] = pt * cb * (1 - 1 / teacher_n)
    t["kv_cache"] = slots * seq * (student.kv_bytes_per_token(cb) + teacher.kv_bytes_per_token(cb))
    t["rollout_activations"] = 3 * 4 * slots * (student.vocab + cfg.chunk_size * teacher.vocab)
    # Update phase.
    t["gradients"] = ps * sb / n
    t["gathered_layer"] = 2 * student.layer_params() * sb if n > 1 else 0.0
    per_tok_layer = 4 * student.hidden + 2 * student.q_dim + 2 * student.kv_dim + 3 * student.intermediate
    tokens = cfg.micro_batch * seq
    t["update_activations"] = tokens * (student.layers * per_tok_layer * cb + 3 * 4 * student.vocab)

    persistent = t["student_weights"] + t["master_weights"] + t["optimizer"] + t["teacher_weights"] + t["teacher_state"]
    rollout = t["gathered_student"] + t["gathered_teacher"] + t["kv_cache"] + t["rollout_activations"]
    update = t["gradients"] + t["gathered_layer"] + t["update_activations"]
    t["persistent"] = persistent
    t["rollout_peak"] = persistent + rollout
    t["update_peak"] = persistent + update
    t["peak"] = max(t["rollout_peak"], t["update_peak"])
    t["fits"] = float(t["peak"] <= HEADROOM * cfg.device_gb * GB)
    return t


def plan(teacher: ModelShape, student: ModelShape, cfg: PlanConfig) -> dict[str, Any]:
    """Both modes, with the parameter counts and the verdict."""
    modes = {m: memory_plan(teacher, student, cfg, m) for m in ("ddp", "fsdp")}
    fitting = [m for m in ("ddp", "fsdp") if modes[m]["fits"]]
    return {
        "teacher_params": teacher.params(), "student_params": student.params(), "config": asdict(cfg),
        "ddp": modes["ddp"], "fsdp": modes["fsdp"],
        "verdict": (f"{fitting[0]} fits" if fitting else "neither fits")
        + f" in {cfg.device_gb:g} GB x {cfg.devices} (90% usable)",
    }


ROWS = ("student_weights", "master_weights", "gradients", "optimizer", "teacher_weights", "teacher_state",
        "kv_cache", "rollout_activations", "gathered_student", "gathered_teacher", "gathered_layer",
        "update_activations", "rollout_peak", "update_peak", "peak")


def format_plan(p: dict[str, Any]) -> str:
    """A fixed-width table in GB per device."""
    c = p["config"]
    lines = [
        f"teacher {p['teacher_params'] / 1e9:.3f} B params, student {p['student_params'] / 1e9:.3f} B params; "
        f"{c['devices']} device(s), batch {c['batch_size']}/device, slots {c['slots'] or c['batch_size']}, "
        f"budget {c['budget']}, prompt {c['prompt_len']}, loss {c['loss']}",
        f"{'GB per device':<24}{'DDP':>10}{'FSDP':>10}",
    ]
    for r in ROWS:
        lines.append(f"{r:<24}{p['ddp'][r] / GB:>10.3f}{p['fsdp'][r] / GB:>10.3f}")
    lines.append(f"{'fits ' + format(c['device_gb'], 'g') + ' GB':<24}{'yes' if p['ddp']['fits'] else 'no':>10}"
                 f"{'yes' if p['fsdp']['fits'] else 'no':>10}")
    lines.append(p["verdict"])
    return "\n".join(lines)
