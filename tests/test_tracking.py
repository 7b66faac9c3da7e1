"""--report-to: a short run's metrics read back with each backend's own reader; resume continues the run."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from kat_diag.kat.config import KATConfig
from kat_diag.opd.config import SamplingConfig, TrainConfig
from kat_diag.opd.tracking import parse_report_to
from kat_diag.opd.trainer import train


def _cfg(world, out, **kw) -> TrainConfig:
    base = dict(
        teacher=str(world / "teacher"), student=str(world / "student"), out=str(out), steps=2, batch_size=3,
        micro_batch=3, lr=3e-3, warmup_steps=1, sampling=SamplingConfig(max_new_tokens=12, chunk_size=4),
        kat=KATConfig(window=4, persistence=2, min_length=4, warmup_steps=1, buffer_size=64),
        eval_n=2, eval_k=1, eval_every=1, ckpt_every=1, progress=False, device="cpu", trace_every=0,
    )
    base.update(kw)
    return TrainConfig(**base)


def _jsonl(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_parse_report_to_follows_transformers_convention():
    assert parse_report_to(["none"]) == ()
    assert parse_report_to(["tensorboard,trackio", "tensorboard"]) == ("tensorboard", "trackio")
    assert parse_report_to("all") == ("tensorboard", "trackio", "wandb")
    with pytest.raises(ValueError, match=r"--report-to 'mlflow': expected one or more of"):
        parse_report_to(["mlflow"])


def test_tensorboard_event_file_holds_the_metrics_and_resume_continues_it(quick_world, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard not installed (pip install 'kat-diag[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train(_cfg(quick_world, run, report_to=("tensorboard",), max_steps_this_run=1))
    state = json.loads((run / "tracking.json").read_text())
    assert state["tensorboard"]["logdir"] == "tensorboard"  # RUN/tensorboard
    train(_cfg(quick_world, run, report_to=("tensorboard",)), resume=True)

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    steps = [m for m in _jsonl(run) if "loss" in m]
    for key in ("loss", "kl_mean", "gen_len_mean", "kept_len_mean", "grad_norm"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [0, 1], key
        assert [e.value for e in events] == pytest.approx([m[key] for m in steps], rel=1e-6), key
    evals = [m for m in _jsonl(run) if "eval/ops2/greedy" in m]
    assert [e.step for e in acc.Scalars("eval/ops2/greedy")] == [m["step"] for m in evals] == [0, 1]
    # A few rollouts with per-token KL as text at each evaluation.
    tags = acc.Tags()["tensors"]
    assert "rollouts/0/text_summary" in tags
    texts = acc.Tensors("rollouts/0/text_summary")
    assert [t.step for t in texts] == [0, 1]
    shown = texts[-1].tensor_proto.string_val[0].decode()
    assert "mean KL=" in shown and "gen_len=" in shown and "window track" not in shown
    assert "marks: " in shown and "count/2" in shown  # the window track under the run's KAT settings
    # ...and a table of every rollout of the step: id, verdict, fired, onset, kept, tau, first error
    table = acc.Tensors("rollouts/table/text_summary")[-1].tensor_proto.string_val[0].decode()
    lines = table.splitlines()
    assert lines[0].startswith("| rollout | step | verdict | fired | onset |") and len(lines) == 2 + 3  # batch 3
    assert all(ln.split("|")[3].strip() in ("right", "wrong", "loop", "unfinished") for ln in lines[2:])


TRACKIO_WORKER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    from test_tracking import _cfg
    from kat_diag.opd.trainer import train
    world, run = Path(sys.argv[1]), Path(sys.argv[2])
    train(_cfg(world, run, report_to=("trackio",), tracker_project="katdiag-test", max_steps_this_run=1))
    train(_cfg(world, run, report_to=("trackio",), tracker_project="katdiag-test"), resume=True)
    import trackio
    state = json.loads((run / "tracking.json").read_text())["trackio"]
    logs = trackio.SQLiteStorage.get_logs(state["project"], state["name"])
    runs = trackio.SQLiteStorage.get_runs(state["project"])
    db = str(trackio.SQLiteStorage.get_project_db_path(state["project"]))
    print("RESULT" + json.dumps({"logs": logs, "runs": runs, "db": db, "state": state}, default=str))
""")


def test_trackio_local_store_holds_the_metrics_and_resume_continues_the_run(quick_world, tmp_path):
    pytest.importorskip("trackio", reason="trackio not installed (pip install 'kat-diag[trackio]')")
    script = tmp_path / "worker.py"
    script.write_text(TRACKIO_WORKER)
    run, store = tmp_path / "run", tmp_path / "trackio"
    env = {**os.environ, "TRACKIO_DIR": str(store), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(quick_world), str(run), os.path.dirname(__file__)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.split("RESULT", 1)[1].splitlines()[0])
    assert res["db"] == str(store / "katdiag-test.db")  # the local store: one SQLite file per project
    assert res["runs"] == [res["state"]["name"]]  # resume logged into the same run
    steps = [m for m in _jsonl(run) if "loss" in m]
    by_step = {}
    for row in res["logs"]:
        by_step.setdefault(row["step"], {}).update(row)
    assert sorted(by_step) == [0, 1]
    for m in steps:
        for key in ("loss", "kl_mean", "kept_len_mean", "eval/ops2/greedy"):
            if key in m:
                assert by_step[m["step"]][key] == pytest.approx(m[key], rel=1e-9), key
    evals = [m for m in _jsonl(run) if "eval/ops2/greedy" in m]
    for m in evals:
        assert by_step[m["step"]]["eval/ops2/greedy"] == pytest.approx(m["eval/ops2/greedy"])
    assert all("rollouts/0" in by_step[s] for s in (0, 1))  # the inspect HTML, as trackio media


def test_wandb_offline_run_is_written_and_resume_keeps_its_id(quick_world, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb not installed (pip install 'kat-diag[wandb]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    train(_cfg(quick_world, run, report_to=("wandb",), max_steps_this_run=1))
    run_id = json.loads((run / "tracking.json").read_text())["wandb"]["id"]
    train(_cfg(quick_world, run, report_to=("wandb",)), resume=True)
    assert json.loads((run / "tracking.json").read_text())["wandb"]["id"] == run_id
    files = sorted((run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2 and all(f.stat().st_size > 0 for f in files)


def test_missing_backend_is_a_one_line_error(quick_world, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import fails as if not installed
    with pytest.raises(ValueError, match=r"--report-to tensorboard needs the tensorboard package: pip install"):
        train(_cfg(quick_world, tmp_path / "run", report_to=("tensorboard",)))


def test_rollout_table_lists_every_rollout_with_its_verdict_and_marks():
    from kat_diag.opd.tracking import TABLE_COLUMNS, rollout_table, table_markdown

    rows = [{"rollout_id": "step3-0", "step": 3, "verdict": "loop", "fire": 19, "onset": 14, "kept_len": 14,
             "gen_len": 20, "tau": 0.1, "first_error": 10, "loop_start": 12, "text": "1+1=2\n#2"},
            {"rollout_id": "step3-1", "step": 3, "correct": True, "fire": -1, "onset": -1, "kept_len": 5, "gen_len": 5,
             "tau": float("nan"), "text": "#7"}]
    cols, data = rollout_table(rows)
    assert cols == list(TABLE_COLUMNS)
    assert data[0] == ["step3-0", 3, "loop", True, 14, 19, 14, 20, 0.1, 10, 12, "2"]
    assert data[1] == ["step3-1", 3, "right", False, None, None, 5, 5, None, None, None, "7"]
    md = table_markdown(cols, data)
    assert md.count("\n") == 3 and "| - |" in md and md.startswith("| rollout | step | verdict |")
