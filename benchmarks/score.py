"""`kat-diag score` against `kat-diag record` on the same world rollouts: speed and agreement.

1. `record` samples N rollouts of the world's train prompts (termination none) and scores them online
   (generation + chunked teacher scoring): its tokens/s = generated tokens / wall seconds of the call.
2. The rollouts are written as text only (prompt, completion, finish_reason: the `completions.jsonl`
   layout of examples/foreign_runs.py) and `score` rescores them teacher-forced (no generation):
   tokens/s = tokens / wall seconds of the whole call (model loads, the check pass and the writes
   included), and `scoring_tokens_per_s` of its scoring loop alone.
3. Agreement of the two stores, rollout by rollout: token ids, per-token KL (max |difference|, share
   of tokens over 1e-5, max relative difference), every other column, and `trap_report` (the
   numbers of `kat-diag trap --json`) at the world preset, key by key.
4. The noise floor: the first `--fp64-rollouts` rollouts rescored with both models in float64; how far
   each fp32 store's KL is from it (neither fp32 path is exact, so neither is the reference).

    .venv/bin/python benchmarks/score.py [--rollouts 400] [--out DIR]

Target: score >= 3x record's tokens/s. Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _foreign_runs():
    spec = importlib.util.spec_from_file_location("foreign_runs", REPO / "examples" / "foreign_runs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def compare_stores(a_dir: Path, b_dir: Path) -> dict[str, object]:
    """Rollout-by-rollout agreement of two stores of the same rollouts (matched by rollout id)."""
    from kat_diag.traces.reader import TraceReader

    a, b = TraceReader(a_dir).read(), TraceReader(b_dir).read()
    ia, ib = np.argsort(a["rollout_id"], kind="stable"), np.argsort(b["rollout_id"], kind="stable")
    out: dict[str, object] = {"rollouts": [a.num_rows, b.num_rows],
                              "same_ids": bool(np.array_equal(a["rollout_id"][ia], b["rollout_id"][ib]))}
    same = [bool(np.array_equal(a["token_ids"][x], b["token_ids"][y])) for x, y in zip(ia, ib, strict=True)]
    out["same_token_ids"] = int(sum(same))
    pairs = [(x, y) for (x, y), s in zip(zip(ia, ib, strict=True), same, strict=True) if s]
    for col in ("kl", "student_logprob", "teacher_logprob", "student_entropy", "teacher_top_probs"):
        xa = np.concatenate([np.asarray(a[col][x], np.float64).reshape(-1) for x, _ in pairs])
        xb = np.concatenate([np.asarray(b[col][y], np.float64).reshape(-1) for _, y in pairs])
        d = np.abs(xa - xb)
        out[f"{col}_max_abs_diff"] = float(d.max()) if d.size else 0.0
        if col == "kl":
            out["kl_tokens"] = int(d.size)
            out["kl_share_over_1e-5"] = float((d > 1e-5).mean()) if d.size else 0.0
            out["kl_max_rel_diff"] = float((d / np.maximum(np.abs(xa), 1e-6)).max()) if d.size else 0.0
            out["kl_at_max_abs_diff"] = float(xa[d.argmax()]) if d.size else None
    top_ids = sum(bool(np.array_equal(a["teacher_top_ids"][x], b["teacher_top_ids"][y])) for x, y in pairs)
    out["same_teacher_top_ids"] = int(top_ids)
    for col in ("step", "prompt_id", "correct", "first_error", "loop_start", "verdict", "stop_reason", "text"):
        out[f"same_{col}"] = bool(list(a[col][ia]) == list(b[col][ib]))
    return out


def compare_trap(a_dir: Path, b_dir: Path) -> dict[str, object]:
    """`trap_report` (what `kat-diag trap --json` prints) of both stores at the world preset, key by key."""
    from kat_diag.analysis.trap import trap_report
    from kat_diag.kat.config import kat_preset

    cfg = kat_preset("world")
    ra, rb = trap_report(a_dir, cfg), trap_report(b_dir, cfg)
    differ = {}
    for k in sorted(set(ra) | set(rb)):
        va, vb = ra.get(k), rb.get(k)
        if not (va == vb or (isinstance(va, float) and isinstance(vb, float) and math.isnan(va) and math.isnan(vb))):
            differ[k] = {"record": va, "score": vb}
    return {"identical": not differ, "keys": len(ra), "differing": differ,
            "json_identical": json.dumps(ra, sort_keys=True) == json.dumps(rb, sort_keys=True)}


def fp64_reference(record_dir: Path, score_dir: Path, world: Path, n: int) -> dict[str, object]:
    """How far each store's fp32 KL is from the same models run in float64 on the first ``n`` rollouts
    (the noise floor any fp32 comparison of the two paths sits on)."""
    import torch

    from kat_diag.models import load_model, load_tokenizer
    from kat_diag.opd.rollout import encode_prompts
    from kat_diag.opd.scoring import score_completions
    from kat_diag.traces.reader import TraceReader
    from kat_diag.world.paths import load_world_splits

    tok = load_tokenizer(world / "student")
    problems = {p.id: p for split in load_world_splits(world).values() for p in split}
    a, b = TraceReader(record_dir).read(), TraceReader(score_dir).read()
    ia, ib = np.argsort(a["rollout_id"])[:n], np.argsort(b["rollout_id"])[:n]
    prompts = [encode_prompts(tok, [problems[a["prompt_id"][i]].prompt])[0] for i in ia]
    comps = [a["token_ids"][i].tolist() for i in ia]
    student = load_model(world / "student", device="cpu").to(torch.float64).eval()
    teacher = load_model(world / "teacher", device="cpu").to(torch.float64).eval()
    ref = np.concatenate([o["kl"].numpy() for o in score_completions(student, teacher, prompts, comps,
                                                                     pad_token_id=tok.pad_token_id)])
    rec = np.concatenate([a["kl"][i] for i in ia]).astype(np.float64)
    sco = np.concatenate([b["kl"][i] for i in ib]).astype(np.float64)
    return {"rollouts": int(len(ia)), "tokens": int(ref.size),
            "record_vs_fp64_max_abs_diff": float(np.abs(rec - ref).max()),
            "score_vs_fp64_max_abs_diff": float(np.abs(sco - ref).max()),
            "record_share_over_1e-5": float((np.abs(rec - ref) > 1e-5).mean()),
            "score_share_over_1e-5": float((np.abs(sco - ref) > 1e-5).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rollouts", type=int, default=400, help="Rollouts recorded and rescored.")
    ap.add_argument("--batch-size", type=int, default=64, help="score --batch-size.")
    ap.add_argument("--micro-batch", type=int, default=16, help="score --micro-batch.")
    ap.add_argument("--fp64-rollouts", type=int, default=40, help="Rollouts rescored in float64 as the reference "
                    "both fp32 stores are compared with (0: skip).")
    ap.add_argument("--out", type=Path, default=None, help="Keep the stores here (default: a temporary directory).")
    args = ap.parse_args()

    from kat_diag.opd.record import RecordConfig, record
    from kat_diag.opd.score import ScoreConfig, score
    from kat_diag.world.paths import DEFAULT_WORLD_DIR

    world = DEFAULT_WORLD_DIR
    root = args.out or Path(tempfile.mkdtemp(prefix="kat-score-bench-"))
    shutil.rmtree(root / "record", ignore_errors=True)
    shutil.rmtree(root / "score", ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        rec = record(RecordConfig(teacher=str(world / "teacher"), student=str(world / "student"),
                                  out=str(root / "record"), n_prompts=args.rollouts, progress=False))
        rec_s = time.perf_counter() - t0
        fr = _foreign_runs()
        comp = fr.write_completions(fr.rows_of_store(root / "record", world), root / "completions.jsonl")
        t0 = time.perf_counter()
        sc = score(ScoreConfig(completions=str(comp), teacher=str(world / "teacher"),
                               students=((0, str(world / "student")),), out=str(root / "score"), data="world",
                               fields=(("stop_reason", "finish_reason"),), batch_size=args.batch_size,
                               micro_batch=args.micro_batch, progress=False))
        score_s = time.perf_counter() - t0
        result = {
            "rollouts": args.rollouts, "tokens": rec["tokens"],
            "record_seconds": rec_s, "record_tokens_per_s": rec["tokens"] / rec_s,
            "score_seconds": score_s, "score_tokens_per_s": sc["tokens"] / score_s,
            "scoring_tokens_per_s": sc["tokens_per_s"],
            "speedup": (sc["tokens"] / score_s) / (rec["tokens"] / rec_s),
            "batch_size": args.batch_size, "micro_batch": args.micro_batch,
            "agreement": compare_stores(root / "record", root / "score"),
            "trap": compare_trap(root / "record", root / "score"),
        }
        if args.fp64_rollouts > 0:
            result["fp64_reference"] = fp64_reference(root / "record", root / "score", world, args.fp64_rollouts)
    finally:
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
