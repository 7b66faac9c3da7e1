"""Use KAT in TRL: `KATDistillationTrainer` on the embedded world (docs/trl.md runs it).

The student and teacher are the world's Qwen3 checkpoints (data/world/); any pair of causal LMs with
one vocabulary works the same way. The run directory is a TRL output_dir (checkpoint-N/, the saved
model) that is also a kat-diag run: traces/ (with the run config in its manifest) and metrics.jsonl,
so `kat-diag inspect / replay / trap / heatmap / phases / vocab / gradproj / figures OUT` work on it.

    python examples/trl_kat.py --out runs/trl_kat              # online KAT (kat-diag's engine generates)
    python examples/trl_kat.py --out runs/trl_posthoc --mode posthoc   # TRL generates, one scoring pass
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "trl_kat", help="TRL output_dir (a kat-diag run).")
    ap.add_argument("--steps", type=int, default=20, help="Optimizer steps.")
    ap.add_argument("--batch", type=int, default=16, help="Prompts per step.")
    ap.add_argument("--mode", choices=["online", "posthoc"], default="online", help="Where KAT decides.")
    a = ap.parse_args()

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DistillationConfig

    from kat_diag import kat_preset
    from kat_diag.integrations.trl import KATDistillationTrainer
    from kat_diag.world.paths import DEFAULT_WORLD_DIR, load_world_splits

    world = DEFAULT_WORLD_DIR
    # The world's records (id, prompt, answer, solution, kind): traces get correctness and ground truth.
    ds = Dataset.from_list([p.to_json() for p in load_world_splits(world)["train"]])
    trainer = KATDistillationTrainer(
        model=AutoModelForCausalLM.from_pretrained(world / "student"),
        teacher_model=AutoModelForCausalLM.from_pretrained(world / "teacher"),
        args=DistillationConfig(
            output_dir=str(a.out), max_steps=a.steps, per_device_train_batch_size=a.batch,
            max_completion_length=192, learning_rate=1e-4, logging_steps=1, save_steps=10, report_to="none",
            bf16=False, gradient_checkpointing=False),  # fp32 for the world's tiny models on CPU
        train_dataset=ds,
        processing_class=AutoTokenizer.from_pretrained(world / "student"),
        termination="kat", kat=kat_preset("world"), mode=a.mode,
        record_traces=True, data="world")
    trainer.train()
    trainer.save_model()  # the trained student in OUT (kat-diag gradproj finds it there)
    trainer.end()  # under torchrun: destroy the process group (a gloo group left to exit can abort the process)
    last = [h for h in trainer.state.log_history if "kat/kept_share" in h][-1]
    print(f"{a.out}: step {trainer.state.global_step}, kat/tau {last['kat/tau']}, "
          f"kat/fired_share {last['kat/fired_share']:.2f}, kat/kept_share {last['kat/kept_share']:.2f}")


if __name__ == "__main__":
    main()
