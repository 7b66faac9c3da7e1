"""The paper's comparison, end to end: `kat-diag study --out DIR` (what `make demo` runs).

Why it exists: KAT's claim is comparative. From the same initial student and the same prompt
stream (prompts and sampling are functions of the seed) the study trains plain OPD (`none`),
`kat`, IW-OPD (`iwopd`: the other published fix for late tokens, re-weighting instead of cutting,
`kat_diag.opd.loss.ImportanceWeightedOPD`), `random` length-matched to this study's KAT run,
`prefix` and `kat+prefix` (and, with `--full`, `kat+iwopd`: KAT's cut with IW-OPD's weights),
evaluates avg@k and pass@k per split on the same problems with the same sampling seed, and writes
DIR/results.md (Table-1 style), DIR/results.json and DIR/figures/. Every method is a
(termination policy, loss) pair (`METHODS`); the others use the study's `loss` (the paper's top-k).
Each run's tokens generated, tokens trained and training time sit beside its accuracy.

Choices the paper leaves open, made here:
- `random` is length-matched to the KAT run's realised mean kept length (`RandomPolicy`, with
  the KAT run's first step as its prior); both target and realised are reported.
- P for `prefix` is length-matched too: the smallest P with E[min(P, N)] >= the KAT run's mean
  kept length, N the natural rollout length, estimated by Kaplan-Meier from the KAT run's traces
  (a rollout KAT stopped is censored at its length). `kat+prefix` uses the same P.
- Evaluation: k samples per problem at temperature 1 with the rollout budget, the first
  `eval_n` problems of every split, one seeded batch (paired across methods).
- `--full` adds seeds (mean, spread, paired bootstrap CIs of KAT minus OPD and KAT minus IW-OPD
  per split and over all problems, resampling problems; plus each seed's own difference) and
  ablations: several KAT quantiles, stage-wise supervision of untruncated rollouts (`--supervise`,
  `kat_diag.opd.supervise`; `pre` is KAT as a loss mask: generate everything, train only on what
  KAT would keep), `prefix` / `kat+prefix` at several budgets, and OPD with the unweighted
  sampled-token estimator (`opd-sampled`: IW-OPD at gamma 0, so IW-OPD's weighting is separated
  from its estimator).

Every method is its own run directory (DIR/seed<S>/<method>, DIR/ablations/<name>); a rerun skips
finished runs (final/ and eval.json present) and resumes unfinished ones from their checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kat_diag.kat.config import KATConfig, upgrade_kat_dict
from kat_diag.kat.policies import survival


@dataclass(frozen=True)
class Method:
    """A row of the main table: a termination policy and a loss (None: the study's `loss`)."""

    termination: str
    loss: str | None
    label: str


METHODS: dict[str, Method] = {
    "none": Method("none", None, "OPD"),
    "kat": Method("kat", None, "KAT"),
    "iwopd": Method("none", "iwopd", "IW-OPD"),
    "kat+iwopd": Method("kat", "iwopd", "KAT + IW-OPD"),
    "random": Method("random", None, "random (length-matched)"),
    "prefix": Method("prefix", None, "prefix"),
    "kat+prefix": Method("kat+prefix", None, "KAT + prefix"),
}
QUICK_METHODS = ("none", "kat", "iwopd", "random", "prefix", "kat+prefix")
FULL_METHODS = ("none", "kat", "iwopd", "kat+iwopd", "random", "prefix", "kat+prefix")
MAIN_METHODS = QUICK_METHODS  # the quick profile's rows (kept for callers of the old name)
LABELS = {m: v.label for m, v in METHODS.items()}
# Paired differences the summary bootstraps (when both methods ran): KAT against each baseline.
CONTRASTS = (("kat", "none"), ("kat", "iwopd"), ("iwopd", "none"), ("kat+iwopd", "iwopd"), ("kat+iwopd", "kat"),
             ("kat", "random"), ("kat", "prefix"))
# Seed-0 contrasts with the opd-sampled ablation: IW-OPD's weighting alone (same estimator), and the
# sampled-token estimator against the study's loss (both unweighted, untruncated).
ABLATION_CONTRASTS = (("iwopd", "ablations/opd-sampled"), ("ablations/opd-sampled", "none"))
ABLATION_LABELS = {"ablations/opd-sampled": "OPD with the sampled-token estimator (IW-OPD at gamma 0)"}


@dataclass(frozen=True)
class StudyConfig:
    """What the study trains and evaluates. `quick()`, `full()` and `tiny()` are the profiles."""

    teacher: str
    student: str
    data: str = "world"
    bench: tuple[str, ...] = ()
    question_field: str = "question"
    answer_field: str = "answer"
    answer_format: str = "auto"
    methods: tuple[str, ...] = QUICK_METHODS  # rows of the main table, keys of METHODS
    loss: str = "topk"  # the OPD estimator of every method that does not name its own (METHODS)
    iw_gamma: float = 0.5  # IW-OPD's gamma (methods with loss "iwopd")
    steps: int = 10
    batch_size: int = 24
    lr: float = 1e-4
    warmup_steps: int = 2  # LR warm-up
    max_new_tokens: int = 160
    chunk_size: int = 16
    kat: dict[str, Any] = field(default_factory=dict)  # KATConfig overrides (the KAT preset)
    eval_n: int = 20  # problems per split
    eval_k: int = 8
    eval_teacher: bool = False
    seeds: tuple[int, ...] = (0,)
    ablations: bool = False
    tau_quantiles: tuple[float, ...] = ()  # KAT tau_quantile sweep (default 0.5, 0.6, 0.8, 0.9)
    supervise: tuple[str, ...] = ("pre", "agreement", "post", "pre+agreement")
    prefix_scales: tuple[float, ...] = (0.5, 1.0, 2.0)  # prefix budgets as multiples of P
    n_boot: int = 2000
    trace_every: int = 1
    ckpt_every: int = 10
    dtype: str = "fp32"
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_new_tokens", "chunk_size", "eval_n", "eval_k"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"study: {name}={getattr(self, name)!r} must be >= 1")
        if not self.seeds:
            raise ValueError("study: seeds must not be empty")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"study: methods {list(self.methods)!r}: unknown {unknown}; known: {list(METHODS)}")
        for need, by in (("none", "the reference"), ("kat", "random, prefix and kat+prefix")):
            if need not in self.methods:
                raise ValueError(f"study: methods must include {need!r} ({by})")
        from kat_diag.opd.loss import LOSSES

        if self.loss not in LOSSES:
            raise ValueError(f"study: loss {self.loss!r}; choose one of {sorted(LOSSES)}")
        if not self.iw_gamma >= 0:
            raise ValueError(f"study: iw_gamma={self.iw_gamma!r} must be >= 0")
        kat_config(self)  # a bad KAT preset fails here, naming the field

    @classmethod
    def quick(cls, teacher: str, student: str, **kw: Any) -> StudyConfig:
        """`make demo`: one seed, 10 steps of 24 prompts, 20 problems per split, k = 8 (minutes on 2 cores)."""
        return cls(teacher=teacher, student=student, **{"kat": {"warmup_steps": 3}, **kw})

    @classmethod
    def full(cls, teacher: str, student: str, **kw: Any) -> StudyConfig:
        """`--full`: 3 seeds, 100 steps, 100 problems per split, the teacher row, KAT + IW-OPD, all ablations."""
        base: dict[str, Any] = dict(steps=100, batch_size=32, warmup_steps=5, eval_n=100, eval_teacher=True,
                                    seeds=(0, 1, 2), ablations=True, ckpt_every=25, kat={"warmup_steps": 5},
                                    methods=FULL_METHODS)
        return cls(teacher=teacher, student=student, **{**base, **kw})

    @classmethod
    def tiny(cls, teacher: str, student: str, **kw: Any) -> StudyConfig:
        """Tests: a few steps of a few prompts."""
        base: dict[str, Any] = dict(steps=4, batch_size=8, warmup_steps=1, max_new_tokens=40, chunk_size=8,
                                    eval_n=3, trace_every=1, ckpt_every=2,
                                    kat={"window": 4, "persistence": 2, "min_length": 4, "warmup_steps": 1})
        return cls(teacher=teacher, student=student, **{**base, **kw})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Config pieces
# ---------------------------------------------------------------------------------------------


def kat_config(cfg: StudyConfig, **extra: Any) -> KATConfig:
    """The study's KAT parameters: the preset named by `kat["preset"]` (`detector.KAT_PRESETS`:
    world | paper; default: KATConfig's defaults, the world preset), the config's other `kat`
    fields, then `extra`.

    A few steps of a few dozen prompts give a few hundred rollouts: where the detector has a
    minimum buffer fill (B_min), it is capped at the rollouts of the warm-up steps so KAT can act.
    """
    names = {f.name for f in dataclasses.fields(KATConfig)}
    over = {**cfg.kat, **extra}
    preset = over.pop("preset", None)
    over = upgrade_kat_dict(over)  # old `quantile` key
    unknown = sorted(set(over) - names)
    if unknown:
        raise ValueError(f"study: unknown KAT parameter(s) {unknown}; known: {sorted(names)}")
    if preset is not None:
        from kat_diag.kat.config import kat_preset

        base = kat_preset(str(preset))
    else:
        base = KATConfig()
    if "min_fill" in names and "min_fill" not in over:
        warm = int(over.get("warmup_steps", base.warmup_steps))
        over["min_fill"] = max(1, min(int(base.min_fill), warm * cfg.batch_size))  # type: ignore[attr-defined]
    return dataclasses.replace(base, **over)


@dataclass(frozen=True)
class RunSpec:
    """One training run of the study."""

    name: str  # run directory name
    group: str  # "seed<S>" or "ablations"
    termination: str
    seed: int
    loss: str | None = None  # None: the study's loss
    prefix_scale: float | None = None  # P = scale * the P derived from the KAT run
    supervise: str | None = None
    kat: dict[str, Any] = field(default_factory=dict)

    def path(self, out: Path) -> Path:
        return out / self.group / self.name


def plan(cfg: StudyConfig) -> list[RunSpec]:
    """Every run, in an order that has each seed's KAT run before what is matched to it."""
    runs = [RunSpec(m, f"seed{s}", METHODS[m].termination, s, loss=METHODS[m].loss,
                    prefix_scale=1.0 if "prefix" in m else None)
            for s in cfg.seeds for m in _ordered(cfg.methods)]
    if not cfg.ablations:
        return runs
    s0 = cfg.seeds[0]
    qs = cfg.tau_quantiles or (0.5, 0.6, 0.8, 0.9)  # around the default 0.7
    abl = [RunSpec(f"kat-q{v:g}", "ablations", "kat", s0, kat={"tau_quantile": v}) for v in qs]
    abl += [RunSpec(f"supervise-{p.replace('+', '-')}", "ablations", "none", s0, supervise=p) for p in cfg.supervise]
    for scale in cfg.prefix_scales:
        if scale != 1.0:
            abl += [RunSpec(f"prefix-x{scale:g}", "ablations", "prefix", s0, prefix_scale=scale),
                    RunSpec(f"kat+prefix-x{scale:g}", "ablations", "kat+prefix", s0, prefix_scale=scale)]
    if "iwopd" in cfg.methods and cfg.loss != "sampled":
        abl.append(RunSpec("opd-sampled", "ablations", "none", s0, loss="sampled"))
    return runs + abl


def _ordered(methods: Sequence[str]) -> list[str]:
    """The methods with `kat` before everything matched to it (random, prefix, kat+prefix)."""
    return sorted(methods, key=lambda m: (m not in ("none", "kat"), list(METHODS).index(m)))


def _kat_run(out: Path, seed: int) -> Path:
    return out / f"seed{seed}" / "kat"


def prefix_from_kat_run(run: Path, max_new_tokens: int) -> dict[str, Any]:
    """P with E[min(P, N)] >= the KAT run's mean kept length (see module doc), and how it was found."""
    from kat_diag.kat.policies import target_from_metrics
    from kat_diag.opd.config import METRICS_NAME

    target = target_from_metrics(run / METRICS_NAME)
    lengths, ended = _all_lengths(run)
    s = survival(lengths, ended, max_new_tokens)
    reach = np.cumsum(s)  # reach[P-1] = E[min(P, N)]
    p = int(np.searchsorted(reach, target - 1e-9) + 1) if reach[-1] >= target else max_new_tokens
    return {"P": min(p, max_new_tokens), "kat_kept_len_mean": target,
            "expected_kept_len": float(reach[min(p, max_new_tokens) - 1]), "rollouts": int(len(lengths)),
            "how": "smallest P with E[min(P, N)] >= KAT's mean kept length (Kaplan-Meier over the KAT run's "
                   "rollouts; KAT-stopped ones censored)"}


def _all_lengths(run: Path) -> tuple[np.ndarray, np.ndarray]:
    from kat_diag.traces.reader import TraceReader

    rows = TraceReader(run / "traces").read(["gen_len", "stop_reason"])
    ended = np.asarray(rows["stop_reason"]).astype(str) != "policy"
    return np.asarray(rows["gen_len"], dtype=np.int64), ended


def train_config(cfg: StudyConfig, spec: RunSpec, out: Path, prefix_len: int | None):
    """The TrainConfig of one run (no in-trainer evaluation: the study evaluates final/ itself)."""
    from kat_diag.opd.config import SamplingConfig, TrainConfig

    return TrainConfig(
        teacher=cfg.teacher, student=cfg.student, out=str(spec.path(out)), data=cfg.data,
        question_field=cfg.question_field, answer_field=cfg.answer_field, answer_format=cfg.answer_format,
        bench=tuple(cfg.bench), steps=cfg.steps, batch_size=cfg.batch_size, micro_batch=cfg.batch_size,
        loss=spec.loss or cfg.loss, iw_gamma=cfg.iw_gamma,
        lr=cfg.lr, warmup_steps=cfg.warmup_steps, dtype=cfg.dtype, device=cfg.device, seed=spec.seed,
        termination=spec.termination, prefix_len=prefix_len,
        random_from=str(_kat_run(out, spec.seed)) if spec.termination == "random" else None,
        supervise=spec.supervise,
        sampling=SamplingConfig(max_new_tokens=cfg.max_new_tokens, chunk_size=cfg.chunk_size),
        kat=kat_config(cfg, **spec.kat), eval_n=0, ckpt_every=cfg.ckpt_every, trace_every=cfg.trace_every,
        progress=False,
    )


# ---------------------------------------------------------------------------------------------
# Evaluation and summaries (pure functions where they can be)
# ---------------------------------------------------------------------------------------------


def evaluate_model(model_dir: str | Path, tokenizer_dir: str | Path, splits: dict[str, Sequence[Any]],
                   k: int, max_new_tokens: int, seed: int, device: str = "auto") -> dict[str, Any]:
    """k samples per problem of every split in one seeded batch: per split the per-problem correct
    counts, avg@k and pass@k (`kat_diag.evaluation`), plus their mean over splits."""
    from kat_diag.data.grading import check_answer
    from kat_diag.evaluation import avg_at_k, generate, pass_at_k
    from kat_diag.models import load_model, load_tokenizer, resolve_device

    tok = load_tokenizer(str(tokenizer_dir), what="tokenizer")
    model = load_model(str(model_dir), what="model", device=str(resolve_device(device)))
    problems = [(name, p) for name, probs in splits.items() for p in probs]
    prompts = [p.prompt for _, p in problems for _ in range(k)]
    outs = generate(model, tok, prompts, max_new_tokens=max_new_tokens, do_sample=True, seed=seed,
                    batch_size=min(max(len(prompts), 1), 1024))
    ok = np.array([check_answer(problems[i // k][1], o) for i, o in enumerate(outs)], dtype=float)
    ok_PK = ok.reshape(len(problems), k)
    res: dict[str, Any] = {}
    start = 0
    for name, probs in splits.items():
        block = ok_PK[start: start + len(probs)]
        start += len(probs)
        counts = block.sum(1).astype(int)
        res[name] = {"n": len(probs), f"avg@{k}": avg_at_k(block),
                     f"pass@{k}": float(np.mean([pass_at_k(k, int(c), k) for c in counts])) if len(probs) else math.nan,
                     "correct": counts.tolist()}
    keys = (f"avg@{k}", f"pass@{k}")
    res["mean"] = {m: float(np.mean([res[s][m] for s in splits])) for m in keys}
    return res


def run_summary(run: Path) -> dict[str, Any]:
    """Training numbers of a finished run from its metrics.jsonl: mean generated / kept length,
    tokens generated and trained, training wall-clock (sum of step times: excludes model loading
    and evaluation, and is the same after a resume)."""
    from kat_diag.opd.config import METRICS_NAME

    rows = [json.loads(ln) for ln in (run / METRICS_NAME).read_text().splitlines() if ln.strip()]
    steps = [r for r in rows if "loss" in r]
    if not steps:
        raise ValueError(f"{run}: no training steps in {METRICS_NAME}")
    n = np.array([r.get("policy/rollouts", 0.0) for r in steps], dtype=float)
    gen = np.array([r["gen_len_mean"] for r in steps], dtype=float)
    kept = np.array([r["kept_len_mean"] for r in steps], dtype=float)
    out = {
        "steps": len(steps), "rollouts": float(n.sum()),
        "gen_len_mean": float((gen * n).sum() / n.sum()), "kept_len_mean": float((kept * n).sum() / n.sum()),
        "tokens_generated": float((gen * n).sum()), "tokens_trained": float((kept * n).sum()),
        "train_seconds": float(sum(r["step_time"] for r in steps)),
        "rollout_seconds": float(sum(r["rollout_time"] for r in steps)),
    }
    last = steps[-1]
    for key in ("random_target", "random_kept_len_run_mean", "prefix_len"):
        if f"policy/{key}" in last and last[f"policy/{key}"] is not None:
            out[key] = float(last[f"policy/{key}"])
    fired = [r.get("policy/fired_share") for r in steps if r.get("policy/fired_share") is not None]
    if fired:
        out["fired_share_mean"] = float(np.mean(fired))
    return out


def paired_bootstrap(a_P: np.ndarray, b_P: np.ndarray, n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict[str, float]:
    """Mean of a - b over problems and its percentile CI, resampling problems (pairs kept)."""
    d = np.asarray(a_P, dtype=float) - np.asarray(b_P, dtype=float)
    if d.size == 0:
        return {"diff": math.nan, "lo": math.nan, "hi": math.nan}
    idx = np.random.default_rng(seed).integers(0, d.size, size=(n_boot, d.size))
    boots = d[idx].mean(1)
    a = (1 - level) / 2
    return {"diff": float(d.mean()), "lo": float(np.quantile(boots, a)), "hi": float(np.quantile(boots, 1 - a))}


def per_problem(ev: dict[str, Any], split: str, k: int, metric: str) -> np.ndarray:
    """Per-problem avg@k (correct / k) or pass@k (unbiased; with n = k samples: any correct)."""
    from kat_diag.evaluation import pass_at_k

    c = np.asarray(ev[split]["correct"], dtype=int)
    if metric == "avg":
        return c / k
    return np.array([pass_at_k(k, int(x), k) for x in c], dtype=float)


# ---------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------


def _finished(run: Path) -> bool:
    return (run / "final").is_dir() and (run / "eval.json").exists()


def _remaining_steps(run: Path, steps: int) -> int:
    from kat_diag.opd.checkpoint import latest_checkpoint

    if _finished(run):
        return 0
    ck = latest_checkpoint(run) if run.exists() else None
    return steps if ck is None else max(0, steps - 1 - int(ck.name.split("-")[-1]))


def run_study(cfg: StudyConfig, out: str | Path, progress: bool = True,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train, evaluate and summarise every run of `plan(cfg)` into `out` (see module doc)."""
    from kat_diag.opd.checkpoint import latest_checkpoint
    from kat_diag.opd.trainer import load_prompts
    from kat_diag.opd.trainer import train as run_train
    from kat_diag.run.progress import bar as tqdm
    from kat_diag.run.progress import interactive

    notes = study_warnings(cfg)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    check_study(cfg)  # every model and data file before any work (and before DIR is created)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_same_study(out, cfg)
    _quiet_transformers()  # one progress display: no per-load / per-save bars of transformers
    specs = plan(cfg)
    total = sum(_remaining_steps(s.path(out), cfg.steps) for s in specs)
    t_start = time.perf_counter()
    bar = tqdm(total=total, desc="study", unit="step", disable=not progress)

    def status(text: str) -> None:
        # In a log file (not a terminal) the description shows on the bar's next line, not a line of its own.
        bar.set_description_str(f"study [{text}]", refresh=interactive())

    first_cfg = train_config(cfg, specs[0], out, None)
    train_problems, splits = load_prompts(first_cfg)
    splits = {name: probs[: cfg.eval_n] for name, probs in splits.items()}
    if not splits:
        raise ValueError("study: no benchmark splits to evaluate (give --bench files with real data)")
    tok_dir = cfg.student
    _check_prompt_lengths(cfg, train_problems, splits)

    baseline: dict[str, Any] = {}
    models = [("student", cfg.student)] + ([("teacher", cfg.teacher)] if cfg.eval_teacher else [])
    for who, path in models:
        f = out / "baseline" / f"{who}.json"
        if not f.exists():
            status(f"eval {who}")
            ev = evaluate_model(path, tok_dir, splits, cfg.eval_k, cfg.max_new_tokens, cfg.seeds[0], cfg.device)
            _write_json(f, ev)
        baseline[who] = json.loads(f.read_text())

    prefix_info: dict[int, dict[str, Any]] = {}
    results: dict[str, Any] = {}
    for spec in specs:
        run = spec.path(out)
        key = f"{spec.group}/{spec.name}"
        prefix_len = None
        if spec.prefix_scale is not None:
            if spec.seed not in prefix_info:
                prefix_info[spec.seed] = prefix_from_kat_run(_kat_run(out, spec.seed), cfg.max_new_tokens)
            prefix_len = max(1, round(prefix_info[spec.seed]["P"] * spec.prefix_scale))
        if not _finished(run):
            tcfg = train_config(cfg, spec, out, prefix_len)
            resume = latest_checkpoint(run) is not None if run.exists() else False
            if run.exists() and not resume:
                shutil.rmtree(run)  # a run that never reached a checkpoint starts over cleanly
            if not (run / "final").is_dir():  # final/: trained, only its evaluation is missing
                status(f"train {key}")
                with warnings.catch_warnings():  # a step with nothing to train skips opt.step (supervise)
                    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                    run_train(tcfg, resume=resume, on_step=lambda step, m: bar.update(1),
                              resume_hint="run the same `kat-diag study` command again to continue")
            status(f"eval {key}")
            ev = evaluate_model(run / "final", tok_dir, splits, cfg.eval_k, cfg.max_new_tokens, spec.seed, cfg.device)
            _write_json(run / "eval.json", ev)
        method = spec.name if spec.group != "ablations" else spec.termination
        if spec.supervise:
            method = f"supervise {spec.supervise}"
        results[key] = {"method": method, "termination": spec.termination, "loss": spec.loss or cfg.loss,
                        "seed": spec.seed, "run": str(run), "prefix_len": prefix_len, "kat": spec.kat,
                        "train": run_summary(run), "eval": json.loads((run / "eval.json").read_text())}
    bar.close()

    summary = summarise(cfg, results, baseline, prefix_info)
    summary["warnings"] = notes
    summary["study_seconds_this_invocation"] = time.perf_counter() - t_start
    figure_runs = [Path(results[f"seed{cfg.seeds[0]}/{m}"]["run"]) for m in _ordered(cfg.methods)]
    status("figures")
    summary["figures"] = _figures(figure_runs, out / "figures")
    _write_json(out / "results.json", summary)
    summary["figures"]["headline"] = _headline(out / "results.json", out / "figures" / "study.png")
    md = results_markdown(summary)
    (out / "results.md").write_text(md)
    log(md)
    return summary


def check_study(cfg: StudyConfig) -> None:
    """What can be checked without loading a model: both checkpoints (and a shared vocabulary), the
    data and benchmark files, the device. A missing teacher used to surface after the student's
    whole baseline evaluation."""
    from kat_diag.opd.preflight import check_sources
    from kat_diag.run.preflight import check_device

    check_sources(cfg, names=("study teacher", "study student", "study data", "study bench"))
    check_device(cfg.device)


def _check_prompt_lengths(cfg: StudyConfig, train: Sequence[Any], splits: dict[str, Sequence[Any]]) -> None:
    """Every training and evaluation prompt fits the models' context with the rollout budget, before
    any evaluation or training (`kat_diag.run.preflight.fit_prompts`; the study never truncates)."""
    from kat_diag.models import load_tokenizer
    from kat_diag.opd.rollout import encode_prompts
    from kat_diag.run.preflight import context_limit, fit_prompts

    limit = context_limit(cfg.teacher, cfg.student)
    if limit is None:
        return
    tok = load_tokenizer(cfg.student, what="study student tokenizer")
    fit_prompts(encode_prompts(tok, [p.prompt for p in train]), [p.id for p in train], cfg.max_new_tokens, limit,
                source=f"study data {cfg.data}", option=None)
    for name, probs in splits.items():
        ids = [tok(p.prompt, add_special_tokens=False)["input_ids"] for p in probs]
        fit_prompts(ids, [p.id for p in probs], cfg.max_new_tokens, limit, source=f"study benchmark {name}",
                    option=None)


def study_warnings(cfg: StudyConfig) -> list[str]:
    """Set-ups that run but cannot show what the study is for (written into results.md too)."""
    kat = kat_config(cfg)
    if cfg.steps <= kat.warmup_steps:
        return [f"study: steps={cfg.steps} is not more than KAT's warm-up K={kat.warmup_steps}: KAT never "
                "becomes active, so every KAT-based method (and random and prefix, length-matched to KAT) "
                "trains like plain OPD; raise steps or lower kat.warmup_steps"]
    return []


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _figures(runs: Sequence[Path], out: Path) -> dict[str, Any]:
    """`kat_diag.analysis.figures.make_figures(run_dirs, out_dir)` on the main runs, when that module
    is installed; otherwise the study says plainly that figures were skipped."""
    try:
        from kat_diag.analysis.figures import make_figures  # type: ignore[import-not-found]
    except ImportError as e:
        return {"skipped": f"kat_diag.analysis.figures is not available in this install ({e})"}
    return make_figures(list(runs), out)


def _headline(results_json: Path, png: Path) -> str:
    """The study's headline figure (every method against OPD, paired CIs), drawn from results.json
    alone by `kat_diag.analysis.study_figure`; its path, or why it was skipped."""
    try:
        from kat_diag.analysis.study_figure import run_study_figure
    except ImportError as e:
        return f"skipped: kat_diag.analysis.study_figure is not available ({e})"
    return run_study_figure(results_json, png)["files"][0]


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float, allow_nan=True))
    tmp.replace(path)


def _check_same_study(out: Path, cfg: StudyConfig) -> None:
    """A rerun must be the same study: refuse to mix runs of another config into DIR."""
    f = out / "study.json"
    mine = json.loads(json.dumps(cfg.to_dict()))
    if f.exists():
        theirs = json.loads(f.read_text())
        if theirs != mine:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise ValueError(f"{out} holds a study with another config (differs in {diff}); use another --out")
    else:
        _write_json(f, mine)


def _mean_sd(xs: Sequence[float]) -> dict[str, float]:
    a = np.asarray(xs, dtype=float)
    return {"mean": float(a.mean()), "sd": float(a.std(ddof=1)) if a.size > 1 else 0.0, "n": int(a.size)}


TRAIN_COLS = ("gen_len_mean", "kept_len_mean", "tokens_generated", "tokens_trained", "train_seconds",
              "rollout_seconds")


def _metric_cols(ev: dict[str, Any], cols: Sequence[str], k: int) -> dict[str, float]:
    return {f"{c}/{met}@{k}": ev[c][f"{met}@{k}"] for c in cols for met in ("avg", "pass")}


def paired_contrast(results: dict[str, Any], a: str | Sequence[str], b: str | Sequence[str], seeds: Sequence[int],
                    splits: Sequence[str], k: int, n_boot: int) -> dict[str, Any]:
    """Method a minus method b: per split and over all problems ("all"), the paired bootstrap CI of the
    per-problem difference averaged over seeds (resampling problems), its half-width, and each
    seed's own difference (mean over problems) so the spread between seeds shows beside the CI.
    a and b name methods (run `seed<S>/<method>` for each seed) or lists of result keys, one per seed."""
    a_keys = [f"seed{s}/{a}" for s in seeds] if isinstance(a, str) else list(a)
    b_keys = [f"seed{s}/{b}" for s in seeds] if isinstance(b, str) else list(b)
    out: dict[str, Any] = {}
    for met in ("avg", "pass"):
        per_split = {}
        for c in splits:
            per_split[c] = np.array([per_problem(results[ka]["eval"], c, k, met)
                                     - per_problem(results[kb]["eval"], c, k, met)
                                     for ka, kb in zip(a_keys, b_keys, strict=True)])
        per_split["all"] = np.concatenate([per_split[c] for c in splits], axis=1)
        for c, d_SP in per_split.items():
            ci = paired_bootstrap(d_SP.mean(0), np.zeros(d_SP.shape[1]), n_boot, seed=0)
            out[f"{c}/{met}@{k}"] = {**ci, "half_width": (ci["hi"] - ci["lo"]) / 2, "n_problems": int(d_SP.shape[1]),
                                     "per_seed": [float(x) for x in d_SP.mean(1)]}
    return out


def summarise(cfg: StudyConfig, results: dict[str, Any], baseline: dict[str, Any],
              prefix_info: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """results.json: per run, the main table (mean and spread over seeds, with each method's cost:
    tokens generated, tokens trained, training time, also as ratios to OPD), length matching,
    paired bootstrap CIs of the `CONTRASTS` per split, ablations."""
    k = cfg.eval_k
    methods = _ordered(cfg.methods)
    splits = [s for s in next(iter(results.values()))["eval"] if s != "mean"]
    cols = [*splits, "mean"]
    table: dict[str, Any] = {}
    for m in methods:
        rows = [results[f"seed{s}/{m}"] for s in cfg.seeds]
        table[m] = {
            **{f"{c}/{met}@{k}": _mean_sd([r["eval"][c][f"{met}@{k}"] for r in rows])
               for c in cols for met in ("avg", "pass")},
            **{t: _mean_sd([r["train"][t] for r in rows]) for t in TRAIN_COLS},
        }
    for m in methods:
        table[m]["cost_vs_opd"] = {t: table[m][t]["mean"] / table["none"][t]["mean"]
                                   for t in ("tokens_generated", "tokens_trained", "train_seconds")}
    match = []
    for s in cfg.seeds if "random" in methods else ():
        r, kat = results[f"seed{s}/random"]["train"], results[f"seed{s}/kat"]["train"]
        match.append({"seed": s, "target": r.get("random_target", kat["kept_len_mean"]),
                      "kat_kept_len_mean": kat["kept_len_mean"], "random_kept_len_mean": r["kept_len_mean"],
                      "rel_error": r["kept_len_mean"] / kat["kept_len_mean"] - 1.0})
    paired = {f"{a} - {b}": paired_contrast(results, a, b, cfg.seeds, splits, k, cfg.n_boot)
              for a, b in CONTRASTS if a in methods and b in methods}
    s0 = cfg.seeds[0]

    def key(m: str) -> str:
        return m if m.startswith("ablations/") else f"seed{s0}/{m}"

    for a, b in ABLATION_CONTRASTS:
        if key(a) in results and key(b) in results:
            paired[f"{a} - {b} (seed {s0})"] = paired_contrast(results, [key(a)], [key(b)], [s0], splits, k,
                                                               cfg.n_boot)
    boot = {key: {x: v[x] for x in ("diff", "lo", "hi")} for key, v in paired["kat - none"].items()
            if not key.startswith("all/")}
    savings = {f"{t}_ratio": table["kat"]["cost_vs_opd"][t]
               for t in ("tokens_generated", "tokens_trained", "train_seconds")}
    ablations = {key: {"method": r["method"], "loss": r.get("loss", cfg.loss), "prefix_len": r["prefix_len"],
                       "kat": r["kat"], **_metric_cols(r["eval"], cols, k),
                       **{t: r["train"][t] for t in ("gen_len_mean", "kept_len_mean", "tokens_trained",
                                                      "train_seconds")}}
                 for key, r in results.items() if key.startswith("ablations/")}
    if ablations:  # the reference rows of the ablation tables: this seed's OPD, KAT (and IW-OPD)
        for m in ("none", "kat", "iwopd"):
            if m not in methods:
                continue
            r = results[f"seed{cfg.seeds[0]}/{m}"]
            ablations[f"seed{cfg.seeds[0]}/{m}"] = {
                "method": m, "loss": r.get("loss", cfg.loss), "prefix_len": None, "kat": {},
                **_metric_cols(r["eval"], cols, k),
                **{t: r["train"][t] for t in ("gen_len_mean", "kept_len_mean", "tokens_trained", "train_seconds")}}
    return {"config": {**cfg.to_dict(), "kat_min_length": kat_config(cfg).min_length}, "k": k, "splits": splits,
            "seeds": list(cfg.seeds), "methods": methods, "labels": {m: LABELS[m] for m in methods},
            "table": table,
            "baseline": {w: _metric_cols(ev, cols, k) for w, ev in baseline.items()},
            "length_match": match, "prefix": {str(s): v for s, v in prefix_info.items()},
            "paired": paired, "bootstrap_kat_minus_opd": boot, "kat_vs_opd": savings, "ablations": ablations,
            "runs": results}


def results_markdown(summary: dict[str, Any]) -> str:
    """results.md: the Table-1-style table with each method's cost, per-split table, length matching,
    paired CIs, ablations."""
    k, splits, seeds = summary["k"], summary["splits"], summary["seeds"]
    labels = summary.get("labels", LABELS)
    cols = [*splits, "mean"]
    sd = len(seeds) > 1

    def cell(x: dict[str, float], scale: float = 100.0, fmt: str = "{:.1f}") -> str:
        s = fmt.format(x["mean"] * scale)
        return s + (" ± " + fmt.format(x["sd"] * scale) if sd else "")

    seed_note = f"{len(seeds)} seeds ({', '.join(map(str, seeds))}), mean ± sd" if sd else f"seed {seeds[0]}"
    cfg = summary["config"]
    lines = [f"# Study: {seed_note}", "", *[f"**Warning:** {w}\n" for w in summary.get("warnings", [])],
             f"avg@{k} / pass@{k} in %, first {cfg['eval_n']} problems of each split, "
             f"{cfg['steps']} steps of {cfg['batch_size']} prompts per run; loss {cfg.get('loss', 'topk')} "
             f"except IW-OPD rows (gamma {cfg.get('iw_gamma', 0.5)}). "
             "gen len: mean generated tokens per rollout in training; kept len: tokens per rollout the loss saw; "
             "tokens gen / trained: totals over the run; train s: sum of step times "
             "(rollouts + updates; excludes loading and evaluation); cost: tokens generated / tokens trained / "
             "train s as a share of OPD's.", "",
             f"| method | avg@{k} | pass@{k} | gen len | kept len | tokens gen | tokens trained | train s "
             "| cost vs OPD |",
             "|---|---|---|---|---|---|---|---|---|"]
    for who, row in summary["baseline"].items():
        lines.append(f"| {who} (no training) | {row[f'mean/avg@{k}'] * 100:.1f} | {row[f'mean/pass@{k}'] * 100:.1f} "
                     "| | | | | | |")
    for m, row in summary["table"].items():
        cost = row.get("cost_vs_opd")
        cost_s = (f"{cost['tokens_generated']:.2f} / {cost['tokens_trained']:.2f} / {cost['train_seconds']:.2f}"
                  if cost else "")
        lines.append(f"| {labels[m]} | {cell(row[f'mean/avg@{k}'])} | {cell(row[f'mean/pass@{k}'])} | "
                     f"{cell(row['gen_len_mean'], 1)} | {cell(row['kept_len_mean'], 1)} | "
                     f"{cell(row['tokens_generated'], 1, '{:.0f}')} | "
                     f"{cell(row['tokens_trained'], 1, '{:.0f}')} | {cell(row['train_seconds'], 1)} | {cost_s} |")
    lines += ["", f"Per split (avg@{k} / pass@{k}, %):", "",
              "| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for who, row in summary["baseline"].items():
        lines.append(f"| {who} | " + " | ".join(f"{row[f'{c}/avg@{k}'] * 100:.1f} / {row[f'{c}/pass@{k}'] * 100:.1f}"
                                                for c in cols) + " |")
    for m, row in summary["table"].items():
        lines.append(f"| {labels[m]} | " + " | ".join(
            f"{row[f'{c}/avg@{k}']['mean'] * 100:.1f} / {row[f'{c}/pass@{k}']['mean'] * 100:.1f}" for c in cols) + " |")
    sv = summary["kat_vs_opd"]
    lines += ["", f"KAT / OPD: tokens generated {sv['tokens_generated_ratio']:.3f}, tokens trained "
                  f"{sv['tokens_trained_ratio']:.3f}, training time {sv['train_seconds_ratio']:.3f}.", ""]
    if summary["length_match"]:
        lines += ["Random length matching (mean kept tokens per rollout): " + "; ".join(
            f"seed {m['seed']}: KAT {m['kat_kept_len_mean']:.1f}, random {m['random_kept_len_mean']:.1f} "
            f"({m['rel_error'] * 100:+.1f} %)" for m in summary["length_match"]) + "."]
    if summary["prefix"]:
        lines += ["Prefix budget P (from the KAT run): " + "; ".join(
            f"seed {s}: P = {v['P']} (KAT kept {v['kat_kept_len_mean']:.1f}, "
            f"E[min(P, N)] = {v['expected_kept_len']:.1f})" for s, v in summary["prefix"].items()) + "."]
    l0 = cfg.get("kat_min_length")
    if l0 is not None and any(v["P"] < l0 for v in summary["prefix"].values()):
        lines.append(f"Note: P < KAT's minimum length L0 = {l0}, so KAT cannot fire inside the budget and "
                     "`kat+prefix` trains exactly like `prefix` here (the ablations' larger budgets give it room).")
    lines.append("")
    paired = summary.get("paired") or {"kat - none": summary["bootstrap_kat_minus_opd"]}
    names = {**labels, **ABLATION_LABELS}
    for name, ci in paired.items():
        a, b = name.split(" (seed")[0].split(" - ")
        multi = len(ci[f"{splits[0]}/avg@{k}"].get("per_seed", [])) > 1
        where = f", seed {name.split('(seed ')[1].rstrip(')')} only" if "(seed" in name else ""
        lines += [f"Paired bootstrap, {names.get(a, a)} minus {names.get(b, b)}{where} (points, 95 % CI, resampling "
                  f"problems, per-problem values averaged over seeds; {cfg['n_boot']} resamples"
                  + ("; per seed: each seed's own difference" if multi else "") + "):", "",
                  "| split | avg diff [CI] | ± | pass diff [CI] |" + (" avg per seed |" if multi else ""),
                  "|---|---|---|---|" + ("---|" if multi else "")]
        for c in [*splits, "all"]:
            if f"{c}/avg@{k}" not in ci:
                continue
            av, pa = ci[f"{c}/avg@{k}"], ci[f"{c}/pass@{k}"]
            hw = av.get("half_width", (av["hi"] - av["lo"]) / 2)
            per_seed = ""
            if multi and "per_seed" in av:
                per_seed = " " + ", ".join(f"{x * 100:+.1f}" for x in av["per_seed"]) + " |"
            lines.append(f"| {c} | {av['diff'] * 100:+.1f} [{av['lo'] * 100:+.1f}, {av['hi'] * 100:+.1f}] | "
                         f"{hw * 100:.1f} | {pa['diff'] * 100:+.1f} [{pa['lo'] * 100:+.1f}, {pa['hi'] * 100:+.1f}] |"
                         + per_seed)
        lines.append("")
    if summary["ablations"]:
        lines += [f"## Ablations (seed {seeds[0]})", "",
                  f"| run | loss | P | KAT | avg@{k} | pass@{k} | gen len | kept len | tokens trained | train s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for key, r in summary["ablations"].items():
            kat = ", ".join(f"{a}={b}" for a, b in r["kat"].items())
            name = (key.split('/', 1)[1] + f" ({r['method']})" if key.startswith("ablations/")
                    else f"{labels.get(r['method'], r['method'])} (reference)")
            lines.append(f"| {name} | {r.get('loss', '')} | {r['prefix_len'] or ''} | {kat} | "
                         f"{r[f'mean/avg@{k}'] * 100:.1f} | {r[f'mean/pass@{k}'] * 100:.1f} | "
                         f"{r['gen_len_mean']:.1f} | {r['kept_len_mean']:.1f} | {r['tokens_trained']:.0f} | "
                         f"{r['train_seconds']:.1f} |")
        lines.append("")
    fig = summary.get("figures", {})
    where = f"skipped: {fig['skipped']}" if "skipped" in fig else f"`{fig.get('summary', 'figures/')}`"
    lines += ["", "Figures: " + where]
    if fig.get("headline"):
        lines += [f"Headline figure (every method against OPD, paired 95 % CIs; redrawn from results.json by "
                  f"`kat-diag figures --study results.json`): `{fig['headline']}`"]
    lines.append("")
    return "\n".join(lines)


def load_study_file(path: str | Path, full: bool = False) -> StudyConfig:
    """A study on real checkpoints from one JSON or YAML file: teacher, student, data, bench,
    field names, `kat` (the KAT preset) and any other `StudyConfig` field; `profile: quick | full`
    (or --full) picks the defaults the file overrides. Read and type-checked by the loader of
    `train --config` (`kat_diag.run.config_io`): every error is one line naming the file and the key."""
    from kat_diag.run import config_io

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--config {p}: no such file")
    raw = config_io.read_config_file(p)
    profile = raw.pop("profile", "full" if full else "quick")
    if profile not in ("quick", "full"):
        raise config_io.ConfigError(f"--config {p}: profile {profile!r} must be quick or full")
    for need in ("teacher", "student"):
        if need not in raw:
            raise config_io.ConfigError(f"--config {p}: missing {need!r}")
    make = StudyConfig.full if (full or profile == "full") else StudyConfig.quick
    try:
        return config_io.build(StudyConfig, raw, base=make("", ""))
    except ValueError as e:  # ConfigError (key, type) or StudyConfig's own checks (range)
        raise config_io.ConfigError(f"--config {p}: {e}") from None
