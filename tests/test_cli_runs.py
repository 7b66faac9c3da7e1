"""Run directories, resume, config files and fail-fast options (issue 12 items 1-4, issue 13 item 2).

In-process through typer's CliRunner wherever the behaviour does not need a real process; a
subprocess only for the lock held by a live `train`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from kat_diag.kat.config import KATConfig
from kat_diag.opd.config import SamplingConfig, TrainConfig
from kat_diag.opd.trainer import train
from kat_diag.run import rundir

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def _models(world: Path) -> list[str]:
    return ["--teacher", str(world / "teacher"), "--student", str(world / "student")]


SMALL = ["--steps", "2", "--batch-size", "2", "--max-new-tokens", "8", "--chunk-size", "4", "--eval-n", "1",
         "--eval-k", "1", "--device", "cpu", "--window", "4", "--persistence", "2", "--min-length", "4",
         "--kat-warmup", "1", "--buffer-size", "64", "--min-fill", "1"]


@pytest.fixture(scope="module")
def small_run(quick_world, tmp_path_factory) -> Path:
    """A finished 2-step KAT run of the quick world, made through the CLI."""
    run = tmp_path_factory.mktemp("runs") / "kat"
    res = invoke("train", *_models(quick_world), "--out", run, *SMALL)
    assert res.exit_code == 0, res.output
    return run


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if a command gets as far as loading a model."""
    import kat_diag.models as models
    import kat_diag.opd.trainer as trainer

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the options were checked")

    for mod in (models, trainer):
        monkeypatch.setattr(mod, "load_model", boom)
        monkeypatch.setattr(mod, "load_tokenizer", boom)


def _snapshot(run: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*")}


def _one_error_line(res) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


# --- item 1: a run directory belongs to one run ------------------------------------------------


def test_rerun_into_an_existing_run_fails_without_touching_it(small_run, quick_world, no_model_loads):
    before = _snapshot(small_run)
    res = invoke("train", *_models(quick_world), "--out", small_run, *SMALL)
    line = _one_error_line(res)
    assert f"--out {small_run} already holds a run" in line and "--resume" in line and "--overwrite" in line
    assert _snapshot(small_run) == before


def test_overwrite_starts_over(quick_world, tmp_path):
    run = tmp_path / "run"
    assert invoke("train", *_models(quick_world), "--out", run, *SMALL, "--steps", "1").exit_code == 0
    (run / "notes.txt").write_text("mine")  # not a run file: --overwrite leaves it alone
    res = invoke("train", *_models(quick_world), "--out", run, *SMALL, "--overwrite")
    assert res.exit_code == 0, res.output
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps == [0, 1]  # the old run's line is gone, not appended to
    assert (run / "notes.txt").read_text() == "mine"
    assert not (run / rundir.LOCK_NAME).exists()  # released at the end


def test_a_second_train_fails_at_start_and_a_stale_lock_is_taken_over(quick_world, tmp_path):
    run = tmp_path / "run"
    args = ["train", *_models(quick_world), "--out", str(run), *SMALL, "--steps", "100000", "--ckpt-every", "1000"]
    first = subprocess.Popen([sys.executable, "-c", "from cli.main import main; main()", *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (run / "metrics.jsonl").exists():
            assert first.poll() is None, first.communicate()[1][-2000:]
            time.sleep(0.2)
        assert json.loads((run / rundir.LOCK_NAME).read_text())["pid"] == first.pid
        before = (run / "metrics.jsonl").stat().st_size
        second = invoke("train", *_models(quick_world), "--out", run, *SMALL, "--resume")
        line = _one_error_line(second)
        assert f"in use by process {first.pid}" in line
    finally:
        first.send_signal(signal.SIGKILL)  # kill -9: the lock stays behind, stale
        first.communicate(timeout=60)
    assert (run / "metrics.jsonl").stat().st_size >= before
    assert rundir.read_lock(run)["pid"] == first.pid
    claim = rundir.claim(run, resume=True)  # the dead owner's lock is taken over
    assert rundir.read_lock(run)["pid"] == os.getpid()
    claim.release()
    assert rundir.read_lock(run) is None


# --- item 2: resume restores config.json -------------------------------------------------------


def test_resume_with_a_changed_batch_size_fails_naming_both_values(small_run, quick_world, no_model_loads):
    res = invoke("train", *_models(quick_world), "--out", small_run, "--resume", "--batch-size", "8")
    line = _one_error_line(res)
    assert "--batch-size 8" in line and "batch_size = 2" in line and "--steps" in line


def test_resume_restores_the_runs_config_and_says_which_checkpoint(small_run, quick_world):
    # Only --steps given: batch size, KAT settings etc. come from config.json, not today's defaults.
    res = invoke("train", "--out", small_run, "--resume", "--steps", "3", "--print-config")
    cfg = json.loads(res.stdout)
    assert cfg["batch_size"] == 2 and cfg["kat"]["window"] == 4 and cfg["steps"] == 3
    assert cfg["teacher"] == str(quick_world / "teacher")
    res = invoke("train", "--out", small_run, "--resume", "--steps", "3")
    assert res.exit_code == 0, res.output
    assert f"resuming from {small_run / 'checkpoints' / 'step-000001'} (step 1)" in res.stderr
    steps = [json.loads(x)["step"] for x in (small_run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps == [0, 1, 2]
    assert json.loads((small_run / "config.json").read_text())["batch_size"] == 2


def test_library_resume_refuses_a_changed_setting(small_run):
    cfg = json.loads((small_run / "config.json").read_text())
    from kat_diag.run.config_io import build

    changed = build(TrainConfig, {**cfg, "lr": 0.5})
    with pytest.raises(ValueError, match=r"lr 0.5 differs from the run's lr = 0.0001"):
        train(changed, resume=True)


# --- config files (issue 13 item 2) ------------------------------------------------------------


def test_config_round_trips_a_runs_config_json(small_run):
    res = invoke("train", "--config", small_run / "config.json", "--print-config")
    assert res.exit_code == 0, res.output
    recorded = json.loads((small_run / "config.json").read_text())
    recorded.pop("world_size")
    assert json.loads(res.stdout) == recorded


def test_yaml_config_under_command_line_options(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("steps: 7\nbatch_size: 4\nkat:\n  window: 8\nsampling:\n  max_new_tokens: 64\nbench: [a.jsonl]\n")
    res = invoke("train", "--config", f, "--batch-size", "32", "--print-config")
    cfg = json.loads(res.stdout)
    # file over defaults; a given option over the file, even when it equals the default (32)
    assert cfg["steps"] == 7 and cfg["batch_size"] == 32 and cfg["kat"]["window"] == 8
    assert cfg["kat"]["persistence"] == KATConfig().persistence and cfg["sampling"]["max_new_tokens"] == 64
    assert cfg["bench"] == ["a.jsonl"]


def test_config_errors_name_the_key(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"kat": {"windw": 8}}))
    line = _one_error_line(invoke("train", "--config", f, "--print-config"))
    assert "unknown key 'kat.windw'" in line and str(f) in line
    f.write_text(json.dumps({"steps": "ten"}))
    assert "steps: expected int, got 'ten'" in _one_error_line(invoke("train", "--config", f, "--print-config"))
    f.write_text("!!python/object/apply:os.system ['echo hi']")
    f = f.rename(tmp_path / "c.yaml")
    assert "not valid" in _one_error_line(invoke("record", "--config", f, "--print-config"))


def test_record_config_file(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("split: ops3\nn_prompts: 5\nsampling:\n  temperature: 0.5\n")
    cfg = json.loads(invoke("record", "--config", f, "--samples", "2", "--print-config").stdout)
    assert cfg["split"] == "ops3" and cfg["n_prompts"] == 5 and cfg["samples_per_prompt"] == 2
    assert cfg["sampling"]["temperature"] == 0.5


def test_every_train_option_maps_to_a_config_field():
    from typer.main import get_command

    from cli.train_cmd import TRAIN_ALIASES, TRAIN_NOT_CONFIG
    from kat_diag.run.config_io import option_paths

    cmd = get_command(app).commands["train"]
    paths = option_paths([p.name for p in cmd.params], TrainConfig, aliases=TRAIN_ALIASES,
                         not_config=TRAIN_NOT_CONFIG)
    assert paths["tau_quantile"] == "kat.tau_quantile" and paths["max_new_tokens"] == "sampling.max_new_tokens"
    assert paths["kat_preset"] == "kat" and paths["min_fill"] == "kat.min_fill"
    assert paths["warmup_steps"] == "warmup_steps" and paths["kat_warmup"] == "kat.warmup_steps"


# --- item 4: options checked before anything loads; nothing created on failure -----------------


@pytest.mark.parametrize(("extra", "expected"), [
    (["--termination", "sometimes"], "--termination 'sometimes' is not one of"),
    (["--loss", "l2"], "--loss 'l2' is not one of"),
    (["--data", "nope.jsonl"], "--data nope.jsonl: no such file"),
    (["--termination", "prefix"], "--termination prefix needs --prefix-len"),
    (["--eval-n", "0"], "--eval-n must be >= 1, got 0"),
    (["--lr", "-1"], "--lr must be > 0, got -1"),
])
def test_bad_train_options_fail_before_models_load(quick_world, tmp_path, no_model_loads, extra, expected):
    out = tmp_path / "new" / "run"
    line = _one_error_line(invoke("train", *_models(quick_world), "--out", out, *extra))
    assert expected in line
    assert not (tmp_path / "new").exists()  # nothing created


def test_bad_record_options_fail_before_models_load(quick_world, tmp_path, no_model_loads):
    out = tmp_path / "rec"
    assert "--split 'ops9' is not a split" in _one_error_line(
        invoke("record", *_models(quick_world), "--out", out, "--split", "ops9"))
    assert "'--n-prompts'" in _one_error_line(invoke("record", "--n-prompts", "0", "--out", out))
    assert not out.exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line(quick_world, tmp_path, no_model_loads):
    assert "--device cuda: CUDA is not available" in _one_error_line(
        invoke("train", *_models(quick_world), "--out", tmp_path / "r", "--device", "cuda"))


def test_out_that_is_a_file_or_read_only(quick_world, tmp_path, no_model_loads, monkeypatch):
    f = tmp_path / "file"
    f.write_text("x")
    assert f"--out {f} is a file" in _one_error_line(invoke("train", *_models(quick_world), "--out", f))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):  # root ignores permission bits: simulate a read-only file system
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, m, **k: False if Path(p) == ro and m & os.W_OK else real(p, m))
    line = _one_error_line(invoke("train", *_models(quick_world), "--out", ro / "run"))
    assert f"{ro} is not writable" in line
    line = _one_error_line(invoke("replay", tmp_path, "--out", ro / "rows.parquet"))
    assert "--out" in line and "not writable" in line


def test_a_failed_start_removes_the_run_directory_it_created(quick_world, tmp_path, monkeypatch):
    import kat_diag.opd.trainer as trainer

    def broken(*a, **k):
        raise OSError(28, "No space left on device", "weights")

    monkeypatch.setattr(trainer, "load_model", broken)
    cfg = TrainConfig(teacher=str(quick_world / "teacher"), student=str(quick_world / "student"),
                      out=str(tmp_path / "a" / "run"), steps=1, progress=False, device="cpu",
                      sampling=SamplingConfig(max_new_tokens=8, chunk_size=4))
    with pytest.raises(OSError):
        train(cfg)
    assert not (tmp_path / "a").exists()


def test_os_errors_are_one_line(tmp_path):
    (tmp_path / "traces").write_text("not a directory")
    line = _one_error_line(invoke("inspect", tmp_path / "traces"))
    assert str(tmp_path / "traces") in line


def test_config_written_before_the_paper_rule_still_loads(tmp_path):
    f = tmp_path / "old.json"
    f.write_text(json.dumps({"kat": {"window": 8, "quantile": 0.2}}))
    kat = json.loads(invoke("train", "--config", f, "--print-config").stdout)["kat"]
    assert kat["tau_quantile"] == 0.2 and kat["statistic"] == "windows" and kat["window"] == 8


def test_resume_before_the_first_checkpoint_redoes_the_run_without_duplicates(quick_world, tmp_path):
    import shutil

    from kat_diag.traces.reader import TraceReader

    run = tmp_path / "run"
    assert invoke("train", *_models(quick_world), "--out", run, *SMALL, "--stop-after", "1").exit_code == 0
    shutil.rmtree(run / "checkpoints")  # as if killed before its first checkpoint
    res = invoke("train", "--out", run, "--resume")
    assert res.exit_code == 0, res.output
    assert "starting from scratch" in res.stderr
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps == [0, 1]
    assert sorted(TraceReader(run).read(columns=["step"])["step"].tolist()) == [0, 0, 1, 1]


def test_record_refuses_an_existing_store_unless_overwrite(quick_world, tmp_path, no_model_loads):
    out = tmp_path / "rec"
    (out / "traces").mkdir(parents=True)
    line = _one_error_line(invoke("record", "--teacher", quick_world / "teacher", "--student",
                                  quick_world / "student", "--out", out))
    assert f"--out {out} already holds output (traces)" in line and "--overwrite" in line
