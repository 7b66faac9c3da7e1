"""KATDistillationTrainer under a 2-process gloo launch (torchrun on CPU, TRL's DDP): every rank uses
the same KAT threshold each step (the buffer values are gathered over ranks), and the two ranks' traces
form one store that replays with fire_match 1.0."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

REPO = Path(__file__).resolve().parent.parent

WORKER = '''
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DistillationConfig
from kat_diag.integrations.trl import KATDistillationTrainer
from kat_diag.kat.config import kat_preset

world, out = Path(sys.argv[1]), Path(sys.argv[2])
tok = AutoTokenizer.from_pretrained(world / "student")
rows = [json.loads(line) for line in (world / "data" / "train.jsonl").open()][:64]
seen = []

class Snap(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        th = tr.kat_policy.threshold
        seen.append({"step": state.global_step, "tau": th.effective_tau, "buffer": th.buffer.tolist()})

args = DistillationConfig(output_dir=str(out), bf16=False, use_cpu=True, per_device_train_batch_size=4, max_steps=3,
                          max_completion_length=96, learning_rate=1e-4, report_to="none", logging_steps=1,
                          save_strategy="no", gradient_checkpointing=False, disable_tqdm=True)
tr = KATDistillationTrainer(model=AutoModelForCausalLM.from_pretrained(world / "student"),
                            teacher_model=AutoModelForCausalLM.from_pretrained(world / "teacher"), args=args,
                            train_dataset=Dataset.from_list(rows), processing_class=tok, termination="kat",
                            kat=kat_preset("world", warmup_steps=1, min_fill=8), record_traces=True,
                            callbacks=[Snap()])
tr.train()
rank = tr.accelerator.process_index
(out / f"rank{rank}.json").write_text(json.dumps({"world": tr.accelerator.num_processes,
                                                  "type": str(tr.accelerator.distributed_type), "seen": seen}))
tr.end()  # destroy the gloo group: left to interpreter exit, it aborts a rank now and then (SIGABRT)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_share_one_threshold(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(script), str(REPO / "data" / "world"), str(out)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and r["type"] == "DistributedType.MULTI_CPU" for r in ranks)
    a, b = (r["seen"] for r in ranks)
    assert [s["step"] for s in a] == [s["step"] for s in b] == [1, 2, 3]
    for x, y in zip(a, b, strict=True):
        assert x["buffer"] == y["buffer"]  # the same values in the same (rank) order
        assert x["tau"] == y["tau"] or (math.isnan(x["tau"]) and math.isnan(y["tau"]))
    assert [len(s["buffer"]) for s in a] == [8, 16, 24]  # 4 rollouts per rank per step, from both ranks
    assert math.isnan(a[0]["tau"]) and a[1]["tau"] > 0  # active from step 1 (K = 1, B_min = 8)
    from typer.testing import CliRunner

    from cli.main import app

    assert sorted(p.name[:11] for p in (out / "traces").glob("part-*.parquet")) == ["part-r00000", "part-r00001"]
    rep = CliRunner().invoke(app, ["replay", str(out), "--tau", "recorded", "--json"])
    assert rep.exit_code == 0, rep.output
    rec = json.loads(rep.stdout)["recorded"]
    assert rec["compared"] == 24 and rec["fire_match"] == 1.0
