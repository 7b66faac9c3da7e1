"""Write recorded world rollouts the way other trainers leave them on disk (docs/other-trainers.md).

Reads a `kat-diag record` store of the embedded world and writes the same rollouts in three layouts,
each built from its trainer's public code or documentation (nothing is downloaded):

* ``OUT/verl_rollouts/{step}.jsonl``: verl's rollout dump (``trainer.rollout_data_dir``), as
  ``RayPPOTrainer._dump_generations`` writes it: one file per global step, one JSON line per sample
  with ``input`` (the prompt, decoded with ``skip_special_tokens=True``), ``output`` (the response,
  decoded the same way, so the EOS token is gone), ``gts`` (the ground truth), ``score`` (the
  sequence reward: 1.0 right, 0.0 wrong) and ``step``. Input of `kat-diag score`.
* ``OUT/completions.jsonl``: text completions with a vLLM-style ``finish_reason`` ("stop" when the
  completion ended with EOS, "length" when the budget cut it), ``prompt``, ``completion``,
  ``prompt_id`` and ``step``; the finish reason lets `score` restore the EOS the text lost.
* ``OUT/tinker_k1.jsonl``: a per-token k1 log in the layout of a tinker-cookbook ``Datum`` of its
  on-policy distillation (``tinker_cookbook.distillation``): ``target_tokens`` = (prompt +
  completion)[1:], ``logprobs`` = the sampler's log-probs of the targets (0 on prompt positions),
  ``mask`` = 1 on completion tokens, plus ``teacher_logprobs`` = what ``compute_logprobs`` of the
  teacher returned for the same positions (its reverse KL per token is ``logprobs -
  teacher_logprobs`` under the mask: k1, the quantity tinker-cookbook and slime put in the
  advantages). Prompt positions are masked, so their teacher log-probs are written as 0.0 here.
  Per row also ``step``, ``group`` (the prompt) and ``correct``. Input of `kat-diag traces import`.

    .venv/bin/python examples/foreign_runs.py RECORD_DIR --out OUT

Prints one JSON object (the files written) on its last line.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

VERL_DIR = "verl_rollouts"
COMPLETIONS = "completions.jsonl"
TINKER_K1 = "tinker_k1.jsonl"


def write_verl_dump(rows: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """rows: {step, prompt, completion, answer, correct}. One ``{step}.jsonl`` per step (verl's layout)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    by_step: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        by_step.setdefault(int(r["step"]), []).append(
            {"input": r["prompt"], "output": r["completion"], "gts": r["answer"],
             "score": 1.0 if r["correct"] else 0.0, "step": int(r["step"])})
    files = []
    for step, entries in sorted(by_step.items()):
        path = out_dir / f"{step}.jsonl"
        path.write_text("\n".join(json.dumps(e, ensure_ascii=False) for e in entries) + "\n")
        files.append(path)
    return files


def write_completions(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """rows: {step, prompt_id, prompt, completion, eos}. Text completions with a vLLM-style finish_reason."""
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps({"prompt_id": r["prompt_id"], "step": int(r["step"]), "prompt": r["prompt"],
                                "completion": r["completion"],
                                "finish_reason": "stop" if r["eos"] else "length"}) + "\n")
    return path


def write_tinker_k1(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """rows: {step, prompt_id, prompt_ids, token_ids, student_logprob, teacher_logprob, correct}. One
    tinker-cookbook Datum per line (see the module docstring)."""
    with path.open("w") as f:
        for r in rows:
            p = [int(t) for t in r["prompt_ids"]]
            c = [int(t) for t in r["token_ids"]]
            pad = [0.0] * (len(p) - 1)
            f.write(json.dumps({
                "step": int(r["step"]), "group": r["prompt_id"], "target_tokens": (p + c)[1:],
                "logprobs": pad + [float(x) for x in r["student_logprob"]],
                "teacher_logprobs": pad + [float(x) for x in r["teacher_logprob"]],
                "mask": [0] * (len(p) - 1) + [1] * len(c), "correct": r["correct"]}) + "\n")
    return path


def rows_of_store(record_dir: Path, world_dir: Path) -> list[dict[str, Any]]:
    """The rollouts of a `kat-diag record` store of the world with their prompts (text and ids)."""
    from kat_diag.models import load_tokenizer
    from kat_diag.opd.rollout import encode_prompts
    from kat_diag.traces.reader import TraceReader
    from kat_diag.world.paths import load_world_splits

    problems = {p.id: p for split in load_world_splits(world_dir).values() for p in split}
    tok = load_tokenizer(world_dir / "student")
    b = TraceReader(record_dir).read(["step", "rollout_id", "prompt_id", "text", "correct", "stop_reason", "token_ids",
                                      "student_logprob", "teacher_logprob"])
    rows = []
    for i in range(b.num_rows):
        r = b.row(i)
        prob = problems[r["prompt_id"]]
        rows.append({"step": r["step"], "prompt_id": r["prompt_id"], "prompt": prob.prompt, "answer": prob.answer,
                     "prompt_ids": encode_prompts(tok, [prob.prompt])[0], "completion": r["text"],
                     "eos": r["stop_reason"] == "eos", "correct": r["correct"], "token_ids": r["token_ids"],
                     "student_logprob": r["student_logprob"], "teacher_logprob": r["teacher_logprob"]})
    return rows


def main() -> None:
    from kat_diag.world.paths import DEFAULT_WORLD_DIR

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("record", type=Path, help="A `kat-diag record` run directory of the world.")
    ap.add_argument("--out", type=Path, required=True, help="Directory for the three layouts.")
    ap.add_argument("--world", type=Path, default=DEFAULT_WORLD_DIR, help="The world the rollouts come from.")
    args = ap.parse_args()
    rows = rows_of_store(args.record, args.world)
    args.out.mkdir(parents=True, exist_ok=True)
    verl = write_verl_dump(rows, args.out / VERL_DIR)
    comp = write_completions(rows, args.out / COMPLETIONS)
    k1 = write_tinker_k1(rows, args.out / TINKER_K1)
    print(json.dumps({"rollouts": len(rows), "verl": [str(p) for p in verl], "completions": str(comp),
                      "tinker_k1": str(k1)}))


if __name__ == "__main__":
    main()
