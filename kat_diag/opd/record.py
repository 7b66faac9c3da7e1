"""Record traces without training: sample and score rollouts from a checkpoint into a trace store.

Analyses (heatmaps, phases, gradient geometry, vocabulary shift) want full, untruncated traces of
a given student — e.g. an early and a late checkpoint of a run — without touching its parameters.
This is the trainer's rollout path with no update: same engine, same trace format.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kat_diag.data.grading import check_answer
from kat_diag.kat.config import KATConfig
from kat_diag.kat.policies import make_policy
from kat_diag.models import check_compatible, load_model, load_tokenizer
from kat_diag.opd.config import SamplingConfig, TrainConfig
from kat_diag.opd.rollout import RolloutEngine, encode_prompts
from kat_diag.opd.trace_rows import trace_batch
from kat_diag.opd.trainer import load_prompts, step_generator
from kat_diag.run.preflight import context_limit, fit_prompts
from kat_diag.run.progress import bar as tqdm  # few lines in a log, live on a terminal
from kat_diag.traces.writer import TraceWriter


@dataclass(frozen=True)
class RecordConfig:
    teacher: str
    student: str
    out: str
    data: str = "world"
    split: str = "train"  # "train" or a benchmark split name
    n_prompts: int = 64
    batch_size: int = 32
    samples_per_prompt: int = 1
    termination: str = "none"
    seed: int = 0
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=192, chunk_size=16))
    kat: KATConfig = field(default_factory=KATConfig)
    step_label: int = 0  # written as the traces' `step` (e.g. the checkpoint's training step)
    progress: bool = True
    truncate_prompts: bool = False  # see TrainConfig.truncate_prompts


def record(cfg: RecordConfig) -> dict[str, float]:
    """Roll out `n_prompts` x `samples_per_prompt` and write them to OUT/traces; return a summary."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "record_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    tok = load_tokenizer(cfg.student, what="student tokenizer")
    teacher = load_model(cfg.teacher, what="teacher", device="auto")
    student = load_model(cfg.student, what="student", device="auto")
    check_compatible(teacher, student, load_tokenizer(cfg.teacher, what="teacher tokenizer"), tok)
    teacher.eval()
    student.eval()
    tcfg = TrainConfig(teacher=cfg.teacher, student=cfg.student, out=cfg.out, data=cfg.data)
    train, bench = load_prompts(tcfg)
    pool = train if cfg.split == "train" else bench.get(cfg.split)
    if pool is None:
        raise ValueError(f"unknown split {cfg.split!r}; available: train, {', '.join(bench)}")
    problems = [p for p in pool[: cfg.n_prompts] for _ in range(cfg.samples_per_prompt)]
    encoded = encode_prompts(tok, [p.prompt for p in problems])
    encoded, n_cut = fit_prompts(encoded, [p.id for p in problems], cfg.sampling.max_new_tokens,
                                 context_limit(teacher, student), truncate=cfg.truncate_prompts,
                                 source=f"--data {cfg.data}")
    if n_cut:
        print(f"warning: --truncate-prompts: {n_cut} of {len(encoded)} prompts cut to fit the context", file=sys.stderr)
    policy = make_policy(cfg.termination, kat=cfg.kat, prefix_len=None, random_target=None, seed=cfg.seed)
    engine = RolloutEngine(student, teacher, tok.eos_token_id, tok.pad_token_id, cfg.sampling)
    device = next(student.parameters()).device
    n_tok = n_correct = 0
    with TraceWriter(out, rank=0, config=asdict(cfg), top_n=max(1, cfg.sampling.top_n)) as writer:
        starts = range(0, len(problems), cfg.batch_size)
        for j, s in enumerate(tqdm(starts, desc="record", disable=not cfg.progress)):
            probs = problems[s : s + cfg.batch_size]
            policy.begin_step(cfg.step_label)
            rollouts, _ = engine.run(encoded[s : s + cfg.batch_size], policy,
                                     step_generator(cfg.seed, cfg.step_label * 10_000 + j, 0, device))
            pm = policy.end_step([r.kl for r in rollouts])
            texts = tok.batch_decode([r.token_ids.tolist() for r in rollouts], skip_special_tokens=True)
            correct = [check_answer(p, t) for p, t in zip(probs, texts, strict=True)]
            for r in rollouts:
                r.index += s  # unique rollout ids across batches
            writer.append(trace_batch(rollouts, probs, texts, tok, cfg.step_label, 0, cfg.termination,
                                      float(pm.get("tau", float("nan"))), correct))
            n_tok += sum(r.gen_len for r in rollouts)
            n_correct += sum(correct)
    return {"rollouts": len(problems), "tokens": n_tok, "accuracy": n_correct / max(1, len(problems))}
