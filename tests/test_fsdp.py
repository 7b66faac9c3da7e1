"""FSDP2 vs DDP: 2 processes on CPU (gloo) end with the same student within fp32 tolerance."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kat_diag.models import load_model

WORKER = textwrap.dedent("""
    import sys, torch.distributed as dist
    from pathlib import Path
    from kat_diag.kat.config import KATConfig
    from kat_diag.opd.config import SamplingConfig
    from kat_diag.opd.config import TrainConfig
    from kat_diag.opd.trainer import train
    world, out, parallel = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    # Count FSDP all-gathers and model forwards inside each rollout (engine.run).
    import json, torch
    import torch.distributed.fsdp._fully_shard._fsdp_param_group as pg
    from kat_diag.opd.rollout import RolloutEngine
    calls, forwards, per_rollout = [0], [0], []
    real_ag, real_run = pg.foreach_all_gather, RolloutEngine.run
    def counting_ag(*a, **k):
        calls[0] += 1
        return real_ag(*a, **k)
    def counting_run(self, *a, **k):
        c0, f0 = calls[0], forwards[0]
        hooks = [m.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
                 for m in (self.student, self.teacher)]
        out = real_run(self, *a, **k)
        for h in hooks:
            h.remove()
        per_rollout.append({"all_gathers": calls[0] - c0, "forwards": forwards[0] - f0})
        return out
    pg.foreach_all_gather, RolloutEngine.run = counting_ag, counting_run
    cfg = TrainConfig(teacher=str(world / "teacher"), student=str(world / "student"), out=str(out), steps=2,
                      batch_size=3, micro_batch=1, lr=3e-3, warmup_steps=1, device="cpu", progress=False,
                      sampling=SamplingConfig(max_new_tokens=16, chunk_size=4), eval_n=2, eval_k=1,
                      kat=KATConfig(window=4, persistence=2, min_length=4, warmup_steps=1, buffer_size=64),
                      parallel=parallel, shard_teacher=parallel == "fsdp", trace_every=0)
    train(cfg)
    (out / f"rollout_counts_rank{dist.get_rank()}.json").write_text(json.dumps({"rollouts": per_rollout,
                                                                              "total": calls[0]}))
    dist.destroy_process_group()
""")


def _fsdp2_on_cpu() -> str | None:
    """None if FSDP2 with gloo on CPU is available, else the reason it is not."""
    try:
        import torch.distributed as dist
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as e:
        return f"torch {torch.__version__} has no FSDP2 (fully_shard): {e}"
    if not dist.is_available() or not dist.is_gloo_available():
        return f"torch {torch.__version__} has no gloo backend"
    return None


def _launch(script, world, out, parallel):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(world), str(out), parallel]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.skipif(_fsdp2_on_cpu() is not None, reason=str(_fsdp2_on_cpu()))
def test_fsdp_matches_ddp_after_two_steps(quick_world, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    for mode in ("ddp", "fsdp"):
        _launch(script, quick_world, tmp_path / mode, mode)
    ddp = load_model(tmp_path / "ddp" / "final", device="cpu").state_dict()
    fsdp = load_model(tmp_path / "fsdp" / "final", device="cpu").state_dict()
    before = load_model(quick_world / "student", device="cpu").state_dict()
    assert any(not torch.equal(before[k], ddp[k]) for k in ddp)  # training moved the student
    for k in ddp:
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=1e-4, atol=1e-5, msg=k)
    # Same metrics stream (losses within fp32 tolerance), and the checkpoint holds the full optimizer state.
    m = {mode: [json.loads(x) for x in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
         for mode in ("ddp", "fsdp")}
    losses = {mode: [x["loss"] for x in m[mode] if "loss" in x] for mode in m}
    assert len(losses["ddp"]) == 2 and losses["fsdp"] == pytest.approx(losses["ddp"], rel=1e-5)
    ck = sorted((tmp_path / "fsdp" / "checkpoints").glob("step-*"))[-1]
    state = torch.load(ck / "trainer_state.pt", weights_only=False)
    ref = torch.load(sorted((tmp_path / "ddp" / "checkpoints").glob("step-*"))[-1] / "trainer_state.pt",
                     weights_only=False)
    assert len(state["optimizer"]["state"]) == len(ref["optimizer"]["state"])
    # Parameters stay gathered during a rollout: they are all-gathered once before engine.run, and no
    # forward inside it (decode steps, teacher chunks) all-gathers again; the update does.
    for rank in (0, 1):
        counts = json.loads((tmp_path / "fsdp" / f"rollout_counts_rank{rank}.json").read_text())
        assert len(counts["rollouts"]) == 2 and counts["total"] > 0
        for c in counts["rollouts"]:
            assert c["all_gathers"] == 0 and c["forwards"] > 4, c
