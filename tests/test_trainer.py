"""Trainer on tiny Qwen3 models: real steps on CPU, run directory contents, exact resume, DDP."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kat_diag.kat.config import KATConfig
from kat_diag.models import load_model
from kat_diag.opd.checkpoint import latest_checkpoint
from kat_diag.opd.config import SamplingConfig, TrainConfig
from kat_diag.opd.trainer import prompt_indices, train
from kat_diag.traces.reader import TraceReader

REPO = Path(__file__).resolve().parent.parent


def _cfg(world, out, **kw) -> TrainConfig:
    base = dict(
        teacher=str(world / "teacher"), student=str(world / "student"), out=str(out), steps=4, batch_size=4,
        micro_batch=3, lr=3e-3, warmup_steps=1, sampling=SamplingConfig(max_new_tokens=20, chunk_size=4),
        kat=KATConfig(window=4, persistence=2, min_length=4, warmup_steps=1, buffer_size=64, min_fill=2,
                      tau_quantile=0.5),
        eval_n=3, eval_k=2, ckpt_every=2, progress=False, termination="kat", device="cpu",
    )
    base.update(kw)
    return TrainConfig(**base)


def test_training_changes_parameters_and_writes_the_run(quick_world, tmp_path):
    before = load_model(quick_world / "student", device="cpu").state_dict()
    res = train(_cfg(quick_world, tmp_path / "run", steps=3))
    after = res.student.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    run = tmp_path / "run"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["termination"] == "kat" and cfg["kat"]["window"] == 4
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "loss" in m]
    assert [m["step"] for m in steps] == [0, 1, 2]
    for key in ("loss", "kl_mean", "tau", "gen_len_mean", "kept_len_mean", "fired_share", "tokens_per_s",
                "step_time"):
        assert key in steps[0]
    assert any("eval/ops2/greedy" in m for m in lines)
    assert latest_checkpoint(run).name == "step-000002"
    assert (run / "final" / "config.json").exists()
    reader = TraceReader(run)
    cols = reader.read(columns=["step", "kl", "gen_len", "kept_len", "stop_reason", "fire"])
    assert sorted(set(cols["step"].tolist())) == [0, 1, 2]
    assert len(cols["step"]) == 12
    # Offline replay reproduces every online decision, from the recorded thresholds in force and
    # from the thresholds it derives itself step by step.
    from kat_diag.analysis.replay import replay_store
    from kat_diag.views.rollout import kat_config

    assert (cols["fire"] >= 0).any()  # not vacuous
    kat = kat_config(reader.config)
    assert kat == _cfg(quick_world, run).kat
    for tau in ("recorded", None):
        rec = replay_store(reader, kat, tau)["recorded"]
        assert rec["compared"] == 12 and rec["fire_match"] == 1.0 and rec["onset_match"] == 1.0, tau
    manifest = json.loads((run / "traces" / "_manifest.json").read_text())
    assert manifest["loss"] == {"estimator": "topk", "topk": 64}


def test_resume_reproduces_the_uninterrupted_run(quick_world, tmp_path):
    full = train(_cfg(quick_world, tmp_path / "full")).student.state_dict()
    part = _cfg(quick_world, tmp_path / "part", max_steps_this_run=2)
    train(part)
    assert latest_checkpoint(tmp_path / "part").name == "step-000001"
    resumed = train(_cfg(quick_world, tmp_path / "part"), resume=True).student.state_dict()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    m_full = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    m_part = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [m.get("loss") for m in m_full] == [m.get("loss") for m in m_part]


def test_vocabulary_mismatch_is_a_clear_error(quick_world, tmp_path):
    student = load_model(quick_world / "student", device="cpu")
    student.resize_token_embeddings(128)
    student.save_pretrained(tmp_path / "bad")
    with pytest.raises(ValueError, match=r"vocabulary mismatch: teacher has 99 .* student has 128"):
        train(_cfg(quick_world, tmp_path / "run", student=str(tmp_path / "bad")))


def test_prompt_schedule_is_a_partition_per_epoch():
    seen = []
    for step in range(3):
        for rank in range(2):
            seen += prompt_indices(step, 4, rank, 2, 24, seed=3)
    assert sorted(seen) == list(range(24))
    assert prompt_indices(5, 4, 1, 2, 24, 3) == prompt_indices(5, 4, 1, 2, 24, 3)


WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from pathlib import Path
    from kat_diag.kat.config import KATConfig
    from kat_diag.opd.config import SamplingConfig
    from kat_diag.opd.config import TrainConfig
    from kat_diag.opd.trainer import train
    world, out = Path(sys.argv[1]), Path(sys.argv[2])
    cfg = TrainConfig(teacher=str(world / "teacher"), student=str(world / "student"), out=str(out), steps=3,
                      batch_size=3, micro_batch=2, lr=3e-3, warmup_steps=1, device="cpu", progress=False,
                      sampling=SamplingConfig(max_new_tokens=16, chunk_size=4), eval_n=2, eval_k=1,
                      kat=KATConfig(window=4, persistence=2, min_length=4, warmup_steps=1, buffer_size=64,
                                    min_fill=2))
    res = train(cfg)
    rank = dist.get_rank()
    torch.save(res.student.state_dict(), out / f"rank{rank}.pt")
    dist.destroy_process_group()
""")


def test_two_process_gloo_ddp_keeps_replicas_identical(quick_world, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(quick_world), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    before = load_model(quick_world / "student", device="cpu").state_dict()
    assert any(not torch.equal(before[k], a[k]) for k in a)
    cols = TraceReader(out).read(columns=["rank", "step", "prompt_id", "tau"])
    for rank in (0, 1):
        assert sorted(set(cols["step"][cols["rank"] == rank].tolist())) == [0, 1, 2]
    # One threshold per step on every rank: the buffer is gathered over ranks (each rank rolls out
    # other prompts, so per-rank buffers would differ).
    for step in (1, 2):
        taus = {rank: set(cols["tau"][(cols["step"] == step) & (cols["rank"] == rank)].tolist()) for rank in (0, 1)}
        assert len(taus[0]) == 1 and taus[0] == taus[1] and all(math.isfinite(t) for t in taus[0]), taus
    assert all(math.isnan(t) for t in cols["tau"][cols["step"] == 0])  # warm-up: no threshold in force
    assert len(set(zip(cols["step"].tolist(), cols["prompt_id"].tolist(), strict=True))) == 18
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [0, 1, 2]


def test_cli_train_under_torchrun_destroys_its_process_group(quick_world, tmp_path):
    """`kat-diag train` owns the gloo group it opens: it destroys it before exit (a group left to
    interpreter exit aborted a rank with SIGABRT now and then). An atexit hook on each rank records
    whether the group is still up when the interpreter starts to finish."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import atexit, os\n"
        "def _say():\n"
        "    import torch.distributed as dist\n"
        "    up = dist.is_available() and dist.is_initialized()\n"
        f"    open(os.path.join({str(tmp_path)!r}, 'rank' + os.environ['RANK'] + '.txt'), 'w').write(str(up))\n"
        "atexit.register(_say)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{hook}{os.pathsep}{REPO}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cli.main",
           "train", "--teacher", str(quick_world / "teacher"), "--student", str(quick_world / "student"),
           "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "2", "--max-new-tokens", "8",
           "--chunk-size", "4", "--eval-n", "1", "--eval-k", "1", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["False", "False"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from cli.main import main; main()", *args]


def test_ctrl_c_checkpoints_the_last_finished_step_and_resume_finishes(quick_world, tmp_path):
    import signal
    import time

    run = tmp_path / "run"
    args = ["train", "--teacher", str(quick_world / "teacher"), "--student", str(quick_world / "student"),
            "--out", str(run), "--steps", "400", "--batch-size", "2", "--max-new-tokens", "8", "--chunk-size", "4",
            "--ckpt-every", "1000", "--device", "cpu", "--eval-n", "1", "--eval-k", "1"]
    proc = subprocess.Popen(_cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    ckpt = latest_checkpoint(run)
    assert ckpt is not None, err[-2000:]
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert int(ckpt.name.split("-")[1]) == steps[-1]
    rows = TraceReader(run).read(columns=["step"])
    assert sorted(set(rows["step"].tolist())) == list(range(steps[-1] + 1))
    done = subprocess.run(_cli(*[a if a != "400" else str(steps[-1] + 3) for a in args], "--resume"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    final = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if "loss" in x]
    assert final == list(range(steps[-1] + 3))


def test_cli_reports_user_errors_in_one_line(quick_world, tmp_path):
    bad = subprocess.run(_cli("train", "--teacher", str(tmp_path / "missing"), "--student",
                              str(quick_world / "student"), "--out", str(tmp_path / "r")),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    last = bad.stderr.strip().splitlines()[-1]
    assert last == f"error: --teacher {tmp_path / 'missing'}: no such checkpoint directory"
    bad = subprocess.run(_cli("train", "--termination", "sometimes", "--out", str(tmp_path / "r"),
                              "--teacher", str(quick_world / "teacher"), "--student", str(quick_world / "student")),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--termination 'sometimes' is not one of" in bad.stderr


def test_record_writes_full_traces_without_training(quick_world, tmp_path):
    from kat_diag.opd.record import RecordConfig, record

    before = load_model(quick_world / "student", device="cpu").state_dict()
    out = record(RecordConfig(teacher=str(quick_world / "teacher"), student=str(quick_world / "student"),
                              out=str(tmp_path / "rec"), split="ops3", n_prompts=5, samples_per_prompt=2,
                              batch_size=4, sampling=SamplingConfig(max_new_tokens=12, chunk_size=4),
                              step_label=7, progress=False))
    assert out["rollouts"] == 10
    cols = TraceReader(tmp_path / "rec").read(columns=["step", "rollout_id", "policy", "gen_len", "kept_len",
                                                       "prompt_id"])
    assert len(cols["step"]) == 10 and set(cols["step"].tolist()) == {7}
    assert len(set(cols["rollout_id"].tolist())) == 10
    assert (cols["gen_len"] == cols["kept_len"]).all() and set(cols["policy"].tolist()) == {"none"}
    assert sorted(set(cols["prompt_id"].tolist())) == [f"ops3-{i}" for i in range(5)]
    after = load_model(quick_world / "student", device="cpu").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # ground truth of every world rollout, recomputed from its text and problem
    from kat_diag.world.paths import load_world_splits
    from kat_diag.world.truth import rollout_truth

    t = TraceReader(tmp_path / "rec").read(columns=["text", "prompt_id", "first_error", "loop_start", "verdict"])
    probs = {p.id: p for p in load_world_splits(quick_world)["ops3"]}
    for i in range(10):
        want = rollout_truth(probs[t["prompt_id"][i]], t["text"][i])
        assert (t["first_error"][i], t["loop_start"][i], t["verdict"][i]) == \
            (want.first_error, want.loop_start, want.verdict)
