"""Score another trainer's completions: (prompt, completion) rows + teacher + student(s) -> a full trace store.

verl, tinker-cookbook, slime, prime-rl and TRL runs leave completions on disk (text, sometimes token
ids) and checkpoints, but no per-token KL. `score` runs the teacher and the student over every
(prompt, completion) once, teacher-forced, in batches (`kat_diag.opd.scoring.score_completions`, no
generation), and writes a trace store with the schema of a training run (`trace_rows.trace_batch`):
full-vocabulary reverse KL, both log-probs, student entropy, teacher top-n per token, and, given
answers or the embedded world's problems, correctness and ground truth.

Input: JSONL / Parquet rows (or a directory of them, e.g. verl's ``trainer.rollout_data_dir`` of
``{step}.jsonl`` files), one rollout per row. Fields (`SCORE_FIELDS`, names mappable): ``prompt`` and
``completion`` as text (a prompt may be a list of chat messages) or ``prompt_ids`` and
``completion_ids``; optional ``step``, ``prompt_id``, ``rollout_id``, ``stop_reason``, ``answer``,
``correct``. Several student checkpoints map to step ranges (``students`` = ``((0, early), (100,
late))``: rows of step 0-99 are scored by ``early``), so every rollout is scored by the student that
produced it; each checkpoint loads once.

Two passes over the file: the first tokenizes and checks every row (fields, token ids inside the
vocabulary, prompt + completion inside both models' context, tokenizers that match) before anything
is written; the second scores `batch_size` rows at a time (sorted by length into micro-batches) and
flushes them to ``OUT/traces_partial``, so a crash loses at most the batch in flight and
``resume=True`` continues where it stopped (rows whose rollout id is stored are skipped). The store
moves to ``OUT/traces`` only when every row is scored: nothing partial looks complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kat_diag.data.grading import check_answer
from kat_diag.data.problems import Problem, read_problems
from kat_diag.kat.config import KATConfig
from kat_diag.models import check_compatible, load_model, load_tokenizer
from kat_diag.opd.rollout import Rollout
from kat_diag.opd.scoring import score_completions
from kat_diag.opd.trace_rows import trace_batch
from kat_diag.run import config_io
from kat_diag.run.preflight import check_choice, check_device, check_range, model_vocab
from kat_diag.run.progress import bar
from kat_diag.traces.interchange import FieldMap, input_files, iter_records
from kat_diag.traces.schema import TRACES_DIRNAME, make_rollout_id
from kat_diag.traces.writer import TraceWriter, publish_staged, staging_dir

SCORE_FIELDS: tuple[str, ...] = ("prompt", "completion", "prompt_ids", "completion_ids", "step", "prompt_id",
                                 "rollout_id", "stop_reason", "answer", "correct")
CONFIG_NAME = "config.json"
# What a resumed score may change: how it runs, not what it computes.
RESUME_MUTABLE = frozenset({"batch_size", "micro_batch", "progress"})
_EOS_WORDS = {"eos": "eos", "stop": "eos", "stopped": "eos", "length": "max_len", "max_len": "max_len",
              "max_tokens": "max_len", "truncated": "max_len"}


@dataclass(frozen=True)
class ScoreConfig:
    completions: str  # JSONL / Parquet file, or a directory of them
    teacher: str
    students: tuple[tuple[int, str], ...]  # (first step scored by it, checkpoint), by step
    out: str
    fields: tuple[tuple[str, str], ...] = ()  # score field -> the file's key
    data: str | None = None  # 'world' or a world problems file: grading and ground truth by problem
    batch_size: int = 64  # rows scored and flushed together
    micro_batch: int = 16  # rows per forward
    device: str = "auto"
    dtype: str = "fp32"
    chat_template: str = "auto"  # auto (TRL: messages get the template, text is used as is) | on | off
    eos: str = "auto"  # append EOS: auto (when the row's stop_reason says eos/stop) | always | never
    top_n: int = 5
    kat: KATConfig = field(default_factory=KATConfig)  # the analyses' KAT settings for this store
    trust_remote_code: bool = False
    progress: bool = True

    @property
    def field_map(self) -> dict[str, str]:
        return dict(self.fields)


def parse_students(specs: Sequence[str]) -> tuple[tuple[int, str], ...]:
    """``PATH`` (one student for every step) or ``STEP=PATH`` entries (rows of step >= STEP, up to the
    next entry's STEP, are scored by PATH) -> sorted (step, path) pairs."""
    out = []
    for spec in specs:
        head, sep, tail = spec.partition("=")
        if sep and head.strip().isdigit():
            out.append((int(head), tail))
        else:
            out.append((0, spec))
    if not out:
        raise ValueError("--student: at least one checkpoint is needed")
    if len(out) > 1 and any(spec.partition("=")[0].strip().isdigit() is False for spec in specs):
        raise ValueError("--student: with several checkpoints, give each as STEP=PATH (the first step it scored)")
    steps = [s for s, _ in out]
    if len(set(steps)) != len(steps):
        raise ValueError(f"--student: two checkpoints for the same step ({sorted(steps)})")
    return tuple(sorted(out))


def preflight(cfg: ScoreConfig) -> None:
    """Every option that can be checked without loading a model or reading the rows (one-line errors)."""
    input_files(cfg.completions)  # exists, supported format
    unknown = sorted(set(cfg.field_map) - set(SCORE_FIELDS))
    if unknown:
        raise ValueError(f"--field: unknown field(s) {unknown}; known: {', '.join(SCORE_FIELDS)}")
    check_choice("--chat-template", cfg.chat_template, ("auto", "on", "off"))
    check_choice("--eos", cfg.eos, ("auto", "always", "never"))
    check_choice("--dtype", cfg.dtype, ("fp32", "bf16", "fp16"))
    check_range("--batch-size", cfg.batch_size, lo=1)
    check_range("--micro-batch", cfg.micro_batch, lo=1)
    check_range("--top-n", cfg.top_n, lo=1)
    check_device(cfg.device)
    vt = model_vocab(cfg.teacher, "--teacher")
    for _, path in cfg.students:
        vs = model_vocab(path, "--student")
        if vt is not None and vs is not None and vt != vs:
            raise ValueError(f"vocabulary mismatch: --teacher {cfg.teacher} has {vt} tokens, --student {path} has "
                             f"{vs}; scoring needs a shared vocabulary")
    if cfg.data not in (None, "world") and not Path(cfg.data).is_file():
        raise FileNotFoundError(f"--data {cfg.data}: no such problems file (use 'world' or a world JSONL file)")


def _context(path: str) -> int | None:
    try:
        data = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    data = data.get("text_config", data) if "max_position_embeddings" not in data else data
    v = data.get("max_position_embeddings")
    return int(v) if isinstance(v, int) else None


# --------------------------------------------------------------------------------------------------
# Rows


@dataclass
class ScoreRow:
    """One completion ready to score: token ids, where it came from, what it is graded against."""

    where: str
    step: int
    rollout_id: int
    prompt_id: str
    prompt_text: str
    prompt_ids: list[int]
    completion_ids: list[int]
    stop_reason: str
    correct: bool | None  # given by the row (correct field); None: grade here when possible
    problem: Problem | None  # the world problem, or one built from the row's answer


class _Problems:
    """World problems by id and by prompt text (`--data`), for grading and ground truth."""

    def __init__(self, data: str | None, student: str) -> None:
        self.by_id: dict[str, Problem] = {}
        self.by_prompt: dict[str, Problem] = {}
        self.source = data
        if data is None:
            return
        if data == "world":
            from kat_diag.world.paths import load_world_splits, world_dir_of

            problems = [p for split in load_world_splits(world_dir_of(student)).values() for p in split]
        else:
            problems = read_problems(data)
        for p in problems:
            self.by_id.setdefault(p.id, p)
            self.by_prompt.setdefault(p.prompt, p)

    def find(self, prompt_id: str | None, prompt_text: str, where: str, label: str) -> Problem | None:
        if self.source is None:
            return None
        if prompt_id is not None and prompt_id in self.by_id:
            return self.by_id[prompt_id]
        if prompt_text in self.by_prompt:
            return self.by_prompt[prompt_text]
        what = f"prompt_id {prompt_id!r} nor its prompt" if prompt_id is not None else "its prompt text"
        raise ValueError(f"{where}: neither {what} is a problem of --data {self.source} ({label})")


class RowReader:
    """Reads the rows of a completions file as `ScoreRow`s (the same ids and order on every pass)."""

    def __init__(self, cfg: ScoreConfig, tokenizer: Any, problems: _Problems, vocab_size: int,
                 contexts: dict[int, int | None]) -> None:
        self.cfg, self.tok, self.problems = cfg, tokenizer, problems
        self.fields = FieldMap(cfg.field_map, known=SCORE_FIELDS)
        self.vocab_size = vocab_size
        self.contexts = contexts  # student step -> min(teacher, student) context length
        self.eos = tokenizer.eos_token_id

    def _ids(self, rec: dict[str, Any], name: str, where: str) -> list[int]:
        value = self.fields.get(rec, name)
        if not isinstance(value, (list, tuple, np.ndarray)):
            raise ValueError(f"{where}: {self.fields.label(name)} must be a list of token ids, "
                             f"got {type(value).__name__}")
        ids = list(value)
        for j, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                raise ValueError(f"{where}: {self.fields.label(name)}[{j}] must be an integer token id, got {t!r}")
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"{where}: {self.fields.label(name)}[{j}] = {t} is outside the vocabulary "
                                 f"(size {self.vocab_size})")
        return [int(t) for t in ids]

    def _encode_prompt(self, value: Any, where: str) -> tuple[list[int], str]:
        label = self.fields.label("prompt")
        tok, mode = self.tok, self.cfg.chat_template
        if isinstance(value, list):  # chat messages, as TRL's conversational format
            if mode == "off":
                raise ValueError(f"{where}: {label} is a list of chat messages but --chat-template is off")
            if not all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
                raise ValueError(f"{where}: {label} must be text or a list of {{role, content}} messages")
            messages = value
        elif isinstance(value, str):
            if mode != "on":
                return tok(value, add_special_tokens=False)["input_ids"], value
            messages = [{"role": "user", "content": value}]
        else:
            raise ValueError(f"{where}: {label} must be text or a list of chat messages, got {type(value).__name__}")
        if not getattr(tok, "chat_template", None):
            raise ValueError(f"{where}: {label} needs a chat template, but the student tokenizer has none "
                             "(pass --chat-template off and plain-text prompts)")
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tok(text, add_special_tokens=False)["input_ids"], text

    def _correct(self, rec: dict[str, Any], where: str) -> bool | None:
        value = self.fields.get(rec, "correct")
        if value is None:
            return None
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        if isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(value):
            return bool(value > 0)  # a reward: verl's score is 1 / 0 (or 1 / -1) for right / wrong
        raise ValueError(f"{where}: {self.fields.label('correct')} must be true/false or a number (> 0 = correct), "
                         f"got {value!r}")

    def student_step(self, step: int, where: str) -> int:
        firsts = [s for s, _ in self.cfg.students]
        if step < firsts[0]:
            raise ValueError(f"{where}: {self.fields.label('step')} {step} is before the first --student step "
                             f"{firsts[0]}")
        return max(s for s in firsts if s <= step)

    def rows(self) -> Iterator[ScoreRow]:
        counts: dict[int, int] = {}
        for where, rec in iter_records(self.cfg.completions):
            yield self.row(rec, where, counts)

    def row(self, rec: dict[str, Any], where: str, counts: dict[int, int]) -> ScoreRow:
        get = self.fields.get
        step_v = get(rec, "step")
        if step_v is None:
            step = 0
        elif isinstance(step_v, (int, np.integer)) and not isinstance(step_v, bool) and step_v >= 0:
            step = int(step_v)
        else:
            raise ValueError(f"{where}: {self.fields.label('step')} must be an integer >= 0, got {step_v!r}")
        if get(rec, "prompt_ids") is not None:
            prompt_ids = self._ids(rec, "prompt_ids", where)
            prompt_text = self.tok.decode(prompt_ids, skip_special_tokens=False)
        elif get(rec, "prompt") is not None:
            prompt_ids, prompt_text = self._encode_prompt(get(rec, "prompt"), where)
        else:
            raise ValueError(f"{where}: missing {self.fields.label('prompt')} (or {self.fields.label('prompt_ids')})")
        if not prompt_ids:
            raise ValueError(f"{where}: the prompt is empty (the first completion token is predicted from it)")
        if get(rec, "completion_ids") is not None:
            comp = self._ids(rec, "completion_ids", where)
        elif get(rec, "completion") is not None:
            text = get(rec, "completion")
            if not isinstance(text, str):
                raise ValueError(f"{where}: {self.fields.label('completion')} must be text, got {type(text).__name__}")
            comp = self.tok(text, add_special_tokens=False)["input_ids"]
        else:
            raise ValueError(f"{where}: missing {self.fields.label('completion')} "
                             f"(or {self.fields.label('completion_ids')})")
        stop = get(rec, "stop_reason")
        if stop is not None and not isinstance(stop, str):
            raise ValueError(f"{where}: {self.fields.label('stop_reason')} must be a string, got {stop!r}")
        stop_norm = None if stop is None else _EOS_WORDS.get(stop.lower(), stop)
        ends = bool(comp) and comp[-1] == self.eos
        if self.eos is not None and not ends and (self.cfg.eos == "always" or
                                                  (self.cfg.eos == "auto" and stop_norm == "eos")):
            comp = comp + [self.eos]
            ends = True
        stop_reason = "eos" if ends else (stop_norm or "unknown")
        context = self.contexts.get(self.student_step(step, where))
        if context is not None and len(prompt_ids) + len(comp) > context:
            raise ValueError(f"{where}: prompt + completion = {len(prompt_ids)} + {len(comp)} tokens, longer than "
                             f"the models' context ({context} positions, max_position_embeddings)")
        pid_v = get(rec, "prompt_id")
        if pid_v is not None and (isinstance(pid_v, bool) or not isinstance(pid_v, (str, int))):
            raise ValueError(f"{where}: {self.fields.label('prompt_id')} must be a string or an integer, got {pid_v!r}")
        problem = self.problems.find(None if pid_v is None else str(pid_v), prompt_text, where,
                                     self.fields.label("prompt"))
        prompt_id = (str(pid_v) if pid_v is not None else problem.id if problem is not None
                     else "p" + hashlib.sha1(json.dumps(prompt_ids).encode()).hexdigest()[:12])
        answer = get(rec, "answer")
        if answer is not None and problem is None:
            problem = Problem(id=prompt_id, prompt=prompt_text, answer=str(answer), kind="math")
        rid_v = get(rec, "rollout_id")
        if rid_v is None:
            index = counts.get(step, 0)
            counts[step] = index + 1
            rollout_id = make_rollout_id(step, 0, index)
        elif isinstance(rid_v, (int, np.integer)) and not isinstance(rid_v, bool) and 0 <= rid_v < 2**63:
            rollout_id = int(rid_v)
        else:
            raise ValueError(f"{where}: {self.fields.label('rollout_id')} must be an integer >= 0, got {rid_v!r}")
        return ScoreRow(where=where, step=step, rollout_id=rollout_id, prompt_id=prompt_id, prompt_text=prompt_text,
                        prompt_ids=list(prompt_ids), completion_ids=comp, stop_reason=stop_reason,
                        correct=self._correct(rec, where), problem=problem)


# --------------------------------------------------------------------------------------------------
# Scoring


def _store_config(cfg: ScoreConfig) -> dict[str, Any]:
    """The run config written to OUT/config.json and the manifest: the options, plus `student` (the last
    checkpoint: views find the tokenizer there) and `kind`."""
    data = config_io.as_dict(cfg)
    data["student"] = cfg.students[-1][1]
    data["kind"] = "score"
    return data


def _check_resume(out: Path, data: dict[str, Any]) -> None:
    path = out / CONFIG_NAME
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--resume: {path} is unreadable ({e})") from e
    if old.get("kind") != "score":
        raise ValueError(f"--resume: {path} is not the config of a `kat-diag score` run")
    for key, was, now in config_io.diff(old, data):
        if key.split(".")[0] not in RESUME_MUTABLE:
            raise ValueError(f"--resume: {key} is {json.dumps(now)} but the run in {out} has {json.dumps(was)}; "
                             "a resumed score keeps its settings (only --batch-size and --micro-batch may change)")


def _stored_ids(stage: Path) -> set[int]:
    from kat_diag.traces.reader import TraceReader

    if not (stage / TRACES_DIRNAME).is_dir():
        return set()
    ids = [b["rollout_id"] for b in TraceReader(stage).iter_batches(["rollout_id"])]
    return set(np.concatenate(ids).tolist()) if ids else set()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _tokenizer(cfg: ScoreConfig) -> tuple[Any, Any]:
    """The student tokenizer (of the last checkpoint) and the teacher's, after checking that every
    checkpoint has the same token ids: they decide the ids of text rows, so before any row is read."""
    kw = {"trust_remote_code": cfg.trust_remote_code}
    tok = load_tokenizer(cfg.students[-1][1], what="student tokenizer", **kw)
    t_tok = load_tokenizer(cfg.teacher, what="teacher tokenizer", **kw)
    for _, path in cfg.students:
        s_tok = load_tokenizer(path, what="student tokenizer", **kw)
        for other, name in ((t_tok, f"--teacher {cfg.teacher}"), (tok, f"--student {cfg.students[-1][1]}")):
            if len(other) != len(s_tok) or other.get_vocab() != s_tok.get_vocab():
                raise ValueError(f"tokenizer mismatch: --student {path} has {len(s_tok)} tokens, {name} has "
                                 f"{len(other)} (or their token ids differ); scoring needs one tokenizer")
    return tok, t_tok


def _check_rows(cfg: ScoreConfig, reader: RowReader, done: set[int]) -> tuple[dict[int, int], int]:
    """Pass 1: every row read, tokenized and checked (raises on the first bad one). Returns the rows to
    score per student (by its first step) and their tokens."""
    todo: dict[int, int] = {}
    tokens = 0
    seen: set[int] = set()
    for row in bar(reader.rows(), desc="check", unit=" rows", disable=not cfg.progress):
        if row.rollout_id in seen:
            raise ValueError(f"{row.where}: rollout id {row.rollout_id} appears twice")
        seen.add(row.rollout_id)
        if row.rollout_id not in done:
            s = reader.student_step(row.step, row.where)
            todo[s] = todo.get(s, 0) + 1
            tokens += len(row.completion_ids)
    if not seen:
        raise ValueError(f"{cfg.completions}: no rows to score")
    if done - seen:
        raise ValueError(f"--resume: the stored rollouts of {staging_dir(cfg.out)} are not rows of {cfg.completions}")
    return todo, tokens


def score(cfg: ScoreConfig, *, resume: bool = False) -> dict[str, Any]:
    """Score every row of ``cfg.completions`` into ``OUT/traces`` (see the module docstring); returns a
    summary (rollouts, tokens, tokens/s, accuracy where graded)."""
    import time

    from kat_diag.traces.reader import TraceReader

    preflight(cfg)
    out = Path(cfg.out)
    data = _store_config(cfg)
    if (out / TRACES_DIRNAME).exists():
        if resume:
            raise ValueError(f"--resume: {out} already holds a complete store ({out / TRACES_DIRNAME}); "
                             "nothing to resume")
        raise ValueError(f"--out {out} already holds a trace store; pass --overwrite to replace it")
    if resume:
        _check_resume(out, data)
    tok, t_tok = _tokenizer(cfg)
    vocab = min(v for v in [model_vocab(cfg.teacher, "--teacher"), len(tok),
                            *[model_vocab(p, "--student") for _, p in cfg.students]] if v is not None)
    t_ctx = _context(cfg.teacher)
    contexts = {s: min((c for c in (t_ctx, _context(p)) if c is not None), default=None) for s, p in cfg.students}
    reader = RowReader(cfg, tok, _Problems(cfg.data, cfg.students[-1][1]), vocab, contexts)
    stage = staging_dir(out)
    if not resume and stage.exists():
        import shutil

        shutil.rmtree(stage)
    done = _stored_ids(stage)
    todo, tokens_todo = _check_rows(cfg, reader, done)
    out.mkdir(parents=True, exist_ok=True)  # only now: a row that fails the checks leaves nothing behind
    _write_atomic(out / CONFIG_NAME, json.dumps(data, indent=2))

    # pass 2: score, one student checkpoint at a time; each batch is flushed (a crash loses only it)
    teacher = load_model(cfg.teacher, what="teacher", dtype=cfg.dtype, device=cfg.device,
                         trust_remote_code=cfg.trust_remote_code).eval()
    n_tok = n_scored = 0
    t0 = time.perf_counter()
    writer = TraceWriter(stage, rank=0, run_name=out.resolve().name, config=data, top_n=cfg.top_n)
    progress = bar(total=tokens_todo, desc="score", unit=" tok", unit_scale=True, disable=not cfg.progress)
    try:
        for i, (first, path) in enumerate(cfg.students):
            if not todo.get(first):
                continue
            last = cfg.students[i + 1][0] - 1 if i + 1 < len(cfg.students) else None
            student = load_model(path, what="student", dtype=cfg.dtype, device=cfg.device,
                                 trust_remote_code=cfg.trust_remote_code).eval()
            check_compatible(teacher, student, t_tok, tok)
            rows = (r for r in reader.rows() if r.step >= first and (last is None or r.step <= last)
                    and r.rollout_id not in done)
            for batch in _batches(rows, cfg.batch_size):
                n = _score_batch(batch, student, teacher, tok, writer, cfg)
                n_tok, n_scored = n_tok + n, n_scored + len(batch)
                progress.update(n)
            del student
        writer.close()
    finally:
        progress.close()
    seconds = time.perf_counter() - t0
    store = publish_staged(out)
    b = TraceReader(store).read(["correct", "gen_len"])
    graded = b["correct"] >= 0
    return {"store": str(store), "rollouts": int(b.num_rows), "tokens": int(b["gen_len"].sum()),
            "scored_now": n_scored, "tokens_scored_now": n_tok, "seconds": seconds,
            "tokens_per_s": n_tok / seconds if seconds > 0 else None,
            "graded": int(graded.sum()),
            "accuracy": float((b["correct"][graded] == 1).mean()) if graded.any() else None}


def _batches(rows: Iterator[ScoreRow], size: int) -> Iterator[list[ScoreRow]]:
    batch: list[ScoreRow] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _score_batch(batch: list[ScoreRow], student: Any, teacher: Any, tok: Any, writer: TraceWriter,
                 cfg: ScoreConfig) -> int:
    """Score one batch (longest first, so micro-batches pad little) and flush it to the store."""
    order = sorted(range(len(batch)), key=lambda i: -(len(batch[i].prompt_ids) + len(batch[i].completion_ids)))
    stats = score_completions(student, teacher, [batch[i].prompt_ids for i in order],
                              [batch[i].completion_ids for i in order], pad_token_id=tok.pad_token_id,
                              top_n=cfg.top_n, micro_batch=cfg.micro_batch)
    by_row = [None] * len(batch)
    for k, i in enumerate(order):
        by_row[i] = stats[k]
    rollouts = []
    for i, (row, st) in enumerate(zip(batch, by_row, strict=True)):
        ids = torch.tensor(row.completion_ids, dtype=torch.long)
        rollouts.append(Rollout(index=i, prompt_ids=torch.tensor(row.prompt_ids, dtype=torch.long), token_ids=ids,
                                keep=len(row.completion_ids), stop_reason=row.stop_reason, **st))
    texts = tok.batch_decode([r.completion_ids for r in batch], skip_special_tokens=True)
    problems = [r.problem or Problem(id=r.prompt_id, prompt=r.prompt_text, answer="", kind="math") for r in batch]
    correct = [r.correct if r.correct is not None else
               (check_answer(r.problem, t) if r.problem is not None else None)
               for r, t in zip(batch, texts, strict=True)]
    cols = trace_batch(rollouts, problems, texts, tok, 0, 0, "none", float("nan"), correct)
    cols["step"] = [r.step for r in batch]
    cols["rollout_id"] = [r.rollout_id for r in batch]
    cols["prompt_id"] = [r.prompt_id for r in batch]
    writer.append(cols)
    writer.flush()
    return sum(len(r.completion_ids) for r in batch)
