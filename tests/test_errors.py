"""Issue 23: every bad input ends in one `error: ...` line naming it (exit 2, no traceback), or is
handled correctly. One test per case of the issue; the numeric corner cases M1, M2, M4, M5 are in
test_kat_rule.py, test_trap.py and test_rollout_loss.py."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from kat_diag.traces.reader import TraceReader
from kat_diag.traces.schema import TraceStoreError
from kat_diag.traces.writer import TraceWriter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_traces import TOP_N, make_batch, write_store  # noqa: E402


def run_cli(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error(res, *needles: str) -> str:
    """The command failed with exit 2 and exactly one `error:` line (no traceback) holding the needles."""
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip() and not ln.startswith(("\r", "warning:"))]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in res.output, res.output
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


# ------------------------------------------------------------------------------------------------
# 3. foreign part files and duplicate rollout ids


def _two_runs(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a", tmp_path / "b"
    write_store(a, [make_batch(0, 6, seed=0), make_batch(1, 6, seed=1)])
    write_store(b, [make_batch(5, 4, seed=5)])  # same run name "test-run", other run id, other steps
    return a, b


def test_a_part_file_copied_from_another_run_is_refused(tmp_path: Path) -> None:
    a, b = _two_runs(tmp_path)
    (part,) = (b / "traces").glob("part-*.parquet")
    shutil.copy(part, a / "traces" / "part-r00000-00000007.parquet")
    with pytest.raises(TraceStoreError, match="written by another run"):
        TraceReader(a)
    for cmd in (["inspect", a], ["inspect", a, "--list"], ["replay", a, "--tau", "0.1", "--window", 2,
                                                           "--persistence", 1, "--min-length", 0, "--keep", "onset"],
                ["trap", a]):
        one_error(run_cli(*cmd), "part-r00000-00000007.parquet", "written by another run", "--allow-foreign")
    # The escape hatch reads it (rollout ids stay unique: the other run's steps differ).
    res = run_cli("inspect", a, "--json", "--allow-foreign")
    assert res.exit_code == 0 and json.loads(res.stdout)["rollouts"] == 16
    # --skip-corrupt leaves the foreign file out with a warning: the store's own 12 rollouts.
    res = run_cli("inspect", a, "--json", "--skip-corrupt")
    assert res.exit_code == 0 and json.loads(res.stdout)["rollouts"] == 12 and "another run" in res.stderr


def test_a_part_file_copied_twice_is_refused_as_duplicate_rollout_ids(tmp_path: Path) -> None:
    a, _ = _two_runs(tmp_path)
    (part,) = sorted((a / "traces").glob("part-*.parquet"))[:1]
    shutil.copy(part, a / "traces" / "part-r00000-00000009.parquet")
    with pytest.raises(TraceStoreError, match="stored twice"):
        TraceReader(a)
    for extra in ([], ["--skip-corrupt"], ["--allow-foreign"]):  # never silently double-counted
        one_error(run_cli("inspect", a, "--list", *extra), "stored twice", part.name, "part-r00000-00000009.parquet")


def test_the_writer_refuses_a_repeated_rollout_id(tmp_path: Path) -> None:
    batch = make_batch(0, 4, seed=0)
    with TraceWriter(tmp_path, top_n=TOP_N) as w:
        w.append(batch)
        w.flush()
        with pytest.raises(ValueError, match="appended twice"):
            w.append(batch)
        with pytest.raises(ValueError, match="appended twice"):
            w.append({**make_batch(1, 2, seed=1), "rollout_id": [7, 7]})
    assert TraceReader(tmp_path).num_rows == 4


def test_ranks_starting_their_writers_at_once_agree_on_one_run_id(tmp_path: Path) -> None:
    """Every rank of a run creates its TraceWriter at the same moment: one manifest must win."""
    import threading

    for attempt in range(10):
        run = tmp_path / f"r{attempt}"
        barrier = threading.Barrier(4)
        ids: list[str] = []

        def start(rank: int, run: Path = run, barrier: threading.Barrier = barrier, ids: list[str] = ids) -> None:
            barrier.wait()
            ids.append(TraceWriter(run, rank=rank, top_n=TOP_N).run_id)

        threads = [threading.Thread(target=start, args=(r,)) for r in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        manifest = json.loads((run / "traces" / "_manifest.json").read_text())
        assert set(ids) == {manifest["run_id"]}, attempt


def test_stores_of_several_ranks_and_old_stores_still_read(tmp_path: Path) -> None:
    """Ranks' id ranges overlap (the id check then reads the ids): still one store, no error. A store
    written before run ids (manifest and parts without them) reads by its run name."""
    for rank in (0, 1):
        batches = [{k: v for k, v in make_batch(s, 3, seed=s).items() if k != "rollout_id"} for s in range(3)]
        write_store(tmp_path / "ranks", batches, rank=rank)
    assert TraceReader(tmp_path / "ranks").num_rows == 18
    old = tmp_path / "old"
    write_store(old, [make_batch(0, 3, seed=0)])
    import pyarrow.parquet as pq

    manifest = json.loads((old / "traces" / "_manifest.json").read_text())
    del manifest["run_id"]
    (old / "traces" / "_manifest.json").write_text(json.dumps(manifest))
    (part,) = (old / "traces").glob("part-*.parquet")
    table = pq.read_table(part)
    meta = {k: v for k, v in table.schema.metadata.items() if k != b"kat_diag.run_id"}
    pq.write_table(table.replace_schema_metadata(meta), part)
    assert TraceReader(old).num_rows == 3 and TraceReader(old).run_identity == "test-run"
    # A new writer on the old store (a resume) carries the old identity.
    with TraceWriter(old, top_n=TOP_N) as w:
        w.append(make_batch(1, 2, seed=1))
    assert TraceReader(old).num_rows == 5


# ------------------------------------------------------------------------------------------------
# 4. replay --tau


@pytest.mark.parametrize("tau", ["-1", "nan", "0", "inf", "-inf"])
def test_replay_refuses_a_threshold_that_is_not_a_positive_number(tmp_path: Path, tau: str) -> None:
    write_store(tmp_path, [make_batch(0, 3, seed=0)])
    one_error(run_cli("replay", tmp_path, "--tau", tau, "--window", 2, "--persistence", 1, "--min-length", 0,
                      "--keep", "onset"), "--tau", "> 0", tau)


def test_resume_keeps_the_steps_of_a_trace_file_that_straddles_the_checkpoint(tmp_path: Path) -> None:
    """A file flushed mid-interval holds steps on both sides of the checkpoint; on resume its later
    steps are redone, so it keeps only the earlier ones (else: duplicate rollout ids)."""
    from kat_diag.opd.checkpoint import _discard_traces_after

    with TraceWriter(tmp_path, top_n=TOP_N) as w:  # one file, steps 0..3
        for s in range(4):
            w.append(make_batch(s, 2, seed=s))
    assert _discard_traces_after(tmp_path, 1, 0) == 1
    r = TraceReader(tmp_path)
    assert sorted(set(r.read(["step"])["step"].tolist())) == [0, 1] and r.num_rows == 4
    with TraceWriter(tmp_path, top_n=TOP_N) as w:  # the resumed run writes steps 2, 3 again
        for s in (2, 3):
            w.append(make_batch(s, 2, seed=s))
    assert TraceReader(tmp_path).num_rows == 8
    assert len(list((tmp_path / "traces_discarded").glob("part-*.parquet"))) == 1


# ------------------------------------------------------------------------------------------------
# runs on the quick world

SMALL = ["--steps", "2", "--batch-size", "2", "--max-new-tokens", "8", "--chunk-size", "4", "--eval-n", "1",
         "--eval-k", "1", "--device", "cpu", "--window", "4", "--persistence", "2", "--min-length", "4",
         "--kat-warmup", "1", "--buffer-size", "64", "--min-fill", "1"]


def _models(world: Path) -> list[str]:
    return ["--teacher", str(world / "teacher"), "--student", str(world / "student")]


@pytest.fixture(scope="module")
def done_run(quick_world, tmp_path_factory) -> Path:
    """A finished 2-step KAT run of the quick world."""
    run = tmp_path_factory.mktemp("runs") / "kat"
    res = run_cli("train", *_models(quick_world), "--out", run, *SMALL)
    assert res.exit_code == 0, res.output
    return run


def _snapshot(run: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*")}


# 1. prompts longer than the models' context


def test_a_prompt_that_does_not_fit_the_context_is_refused_or_truncated_on_request(quick_world, tmp_path):
    """The world's models have 512 positions: a 600-character prompt plus a budget of 8 does not fit."""
    data = tmp_path / "long.jsonl"
    rows = [{"question": "1 +1\n", "answer": "2"}, {"question": "7 " * 300 + "\n", "answer": "7"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["train", *_models(quick_world), *SMALL, "--data", data, "--answer-format", "plain"]
    res = run_cli(*base, "--out", tmp_path / "a")
    one_error(res, f"--data {data}", "'long-1'", "max_position_embeddings", "512", "--truncate-prompts")
    assert not (tmp_path / "a").exists()  # nothing trained, nothing left behind
    # Budget alone over the context: said as such.
    one_error(run_cli(*base, "--out", tmp_path / "b", "--max-new-tokens", "600"), "--max-new-tokens 600",
              "no room for a prompt", "512")
    # --truncate-prompts keeps each long prompt's last 504 tokens and trains.
    res = run_cli(*base, "--out", tmp_path / "c", "--truncate-prompts", "--steps", "1")
    assert res.exit_code == 0, res.output
    assert "--truncate-prompts: 1 prompts cut to their last 504 tokens" in res.stderr
    assert json.loads((tmp_path / "c" / "config.json").read_text())["truncate_prompts"] is True


def test_fit_prompts_against_a_plain_reference():
    from kat_diag.run.preflight import context_length, fit_prompts

    prompts = [[1] * 3, [2] * 10, [3] * 6]
    assert fit_prompts(prompts, ["a", "b", "c"], 4, None) == (prompts, 0)  # no stated context: unchecked
    assert fit_prompts(prompts, ["a", "b", "c"], 4, 14) == (prompts, 0)  # 10 + 4 = 14 fits exactly
    with pytest.raises(ValueError, match=r"prompt 'b' has 10 tokens.*needs 14 positions.*2 of 3 prompts"):
        fit_prompts(prompts, ["a", "b", "c"], 4, 9, source="x")
    cut, n = fit_prompts(prompts, ["a", "b", "c"], 4, 9, truncate=True)
    assert n == 2 and cut == [[1] * 3, [2] * 5, [3] * 5]  # the last 5 = 9 - 4 tokens
    assert context_length({"max_position_embeddings": 512}) == 512
    assert context_length({"text_config": {"max_position_embeddings": 64}}) == 64
    assert context_length({"n_positions": 1024}) == 1024 and context_length({}) is None


# 2. resume of a finished run


def test_resume_of_a_complete_run_says_so_and_rewrites_nothing(done_run, quick_world):
    before = _snapshot(done_run)
    config = (done_run / "config.json").read_text()
    for steps in ("1", "2"):
        res = run_cli("train", *_models(quick_world), "--out", done_run, *SMALL, "--resume", "--steps", steps)
        one_error(res, "--resume", str(done_run), "is complete", "2 steps trained", "--steps N with N > 2")
    assert (done_run / "config.json").read_text() == config and _snapshot(done_run) == before


def test_resume_cannot_shrink_an_unfinished_run(tmp_path):
    from kat_diag.opd.trainer import check_resume_steps

    (tmp_path / "checkpoints" / "step-000004").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-000004" / "trainer_state.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"--steps 3: .* has already trained 5 steps"):
        check_resume_steps(tmp_path, 3)
    check_resume_steps(tmp_path, 5)  # killed after its last checkpoint, before final/: finishing is fine
    check_resume_steps(tmp_path, 9)


# 5 and the weak messages: config files


@pytest.mark.parametrize("name, text, needles", [
    ("dup.json", '{"steps": 3, "lr": 0.1, "steps": 4}', ["key 'steps' is given twice"]),
    ("dup.yaml", "steps: 3\nkat:\n  window: 4\n  window: 8\n", ["key 'window' is given twice", "line 4"]),
    ("bad.yaml", "steps: [3\n", ["not valid JSON or YAML"]),
    ("latin1.yaml", "steps: 3\n# caf\xe9\n", ["line 2 is not UTF-8", "0xe9"]),
])
def test_config_files_with_repeated_keys_or_bad_bytes_are_refused(tmp_path, name, text, needles):
    f = tmp_path / name
    f.write_bytes(text.encode("latin-1"))
    one_error(run_cli("train", "--config", f, "--print-config"), f"--config {f}", *needles)


def test_yaml_floats_without_a_dot_are_numbers(tmp_path):
    f = tmp_path / "hf.yaml"
    f.write_text("lr: 1e-4\nkat:\n  tau_quantile: 7e-1\n")
    res = run_cli("train", "--config", f, "--print-config")
    assert res.exit_code == 0, res.output
    cfg = json.loads(res.stdout)
    assert cfg["lr"] == 1e-4 and cfg["kat"]["tau_quantile"] == 0.7
    f.write_text('lr: "1e-4"\n')  # quoted: a string, still refused
    one_error(run_cli("train", "--config", f, "--print-config"), "lr: expected float, got '1e-4'")


def test_config_that_is_a_directory(tmp_path):
    one_error(run_cli("train", "--config", tmp_path, "--print-config"), f"--config {tmp_path}", "is a directory")


def test_data_files_that_are_not_utf8_or_are_a_directory(quick_world, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"question": "1 +1", "answer": "2"}\n{"question": "caf\xe9", "answer": "3"}\n')
    one_error(run_cli("train", *_models(quick_world), "--out", tmp_path / "r", "--data", bad),
              str(bad), "line 2", "not UTF-8")  # found when the data loads (the preflight reads line 1)
    first = tmp_path / "first.jsonl"
    first.write_bytes(b'{"question": "caf\xe9", "answer": "3"}\n')
    one_error(run_cli("train", *_models(quick_world), "--out", tmp_path / "r", "--data", first),
              f"--data {first}", "line 1", "not UTF-8")
    one_error(run_cli("train", *_models(quick_world), "--out", tmp_path / "r", "--data", tmp_path),
              f"--data {tmp_path}", "is a directory")
    one_error(run_cli("train", "--teacher", bad, "--out", tmp_path / "r"), f"--teacher {bad}",
              "a file, not a checkpoint directory")


# 6. figures of an empty directory


def test_figures_of_an_empty_directory_is_refused(tmp_path):
    out = tmp_path / "figs"
    one_error(run_cli("figures", tmp_path, "--out", out), str(tmp_path), "not a run directory")
    assert not out.exists()


# 7. plan


@pytest.mark.parametrize("option, value, rule", [
    ("--device-gb", "-1", "> 0"), ("--top-k", "0", ">= 1"), ("--prompt-len", "-1", ">= 0"),
    ("--budget", "0", ">= 1"), ("--slots", "-2", ">= 0"), ("--devices", "0", ">= 1"),
])
def test_plan_refuses_values_out_of_range(option, value, rule):
    one_error(run_cli("plan", option, value), option, rule, f"got {float(value) if option == '--device-gb' else value}")


# 8 and 9. trackers


def test_report_to_all_without_wandb_starts_and_writes_nothing(quick_world, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    res = run_cli("train", *_models(quick_world), "--out", tmp_path / "run", *SMALL, "--report-to", "all")
    one_error(res, "--report-to wandb needs the wandb package", "nothing was started or written")
    assert not (tmp_path / "run").exists() and not (tmp_path / "trackio").exists()


def test_report_to_trackio_keeps_stdout_strict_json(quick_world, tmp_path):
    """trackio prints a banner on init and a line on finish (once more at exit if its run is left
    current): stdout must stay the one JSON object `train` prints. A real process, for the exit hook."""
    pytest.importorskip("trackio")
    import os
    import subprocess

    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", "from cli.main import main; main()", "train", *_models(quick_world),
                           "--out", str(tmp_path / "run"), *SMALL, "--steps", "1", "--report-to", "trackio",
                           "--tracker-project", "katdiag-errors-test"],
                          cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(proc.stdout.strip().splitlines()) == 1 and "loss" in json.loads(proc.stdout), proc.stdout
    assert "Trackio" in proc.stderr and (tmp_path / "trackio").exists()  # the banner went to stderr


# 10, tracebacks and weak messages of the study


def test_study_config_errors_are_one_line(tmp_path):
    cases = {"bad.yaml": "teacher: T\nstudent: S\nseeds: [0\n", "seeds.json": '{"teacher": "T", "student": "S", '
             '"seeds": "0"}', "dup.json": '{"teacher": "T", "student": "S", "steps": 2, "steps": 3}',
             "kat.json": '{"teacher": "T", "student": "S", "kat": [1]}'}
    needles = {"bad.yaml": "not valid JSON or YAML", "seeds.json": "seeds: expected a list, got '0'",
               "dup.json": "key 'steps' is given twice", "kat.json": "kat: expected a mapping"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        one_error(run_cli("study", "--config", tmp_path / name, "--out", tmp_path / "s"), f"--config {tmp_path / name}",
                  needles[name])
    (tmp_path / "hf.yaml").write_text("teacher: T\nstudent: S\nlr: 1e-4\n")
    from kat_diag.study import load_study_file

    assert load_study_file(tmp_path / "hf.yaml").lr == 1e-4


def test_study_checks_every_model_before_any_work_and_warns_when_kat_cannot_act(quick_world, tmp_path):
    from kat_diag.study import StudyConfig, run_study, study_warnings

    ok = StudyConfig.tiny(str(quick_world / "teacher"), str(quick_world / "student"))
    assert study_warnings(ok) == []
    short = StudyConfig.tiny(str(tmp_path / "no-teacher"), str(quick_world / "student"), steps=1,
                             kat={"warmup_steps": 2})
    (warning,) = study_warnings(short)
    assert "steps=1 is not more than KAT's warm-up K=2" in warning and "plain OPD" in warning
    with pytest.warns(UserWarning, match="KAT's warm-up"), pytest.raises(FileNotFoundError, match="study teacher"):
        run_study(short, tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()  # refused before the study directory or any evaluation
    res = run_cli("study", "--world", tmp_path, "--out", tmp_path / "s2")
    one_error(res, f"study teacher {tmp_path / 'teacher'}", "no such checkpoint directory")


def test_an_interrupted_study_run_says_how_to_continue(quick_world, tmp_path, monkeypatch, capsys):
    """The trainer's Ctrl-C line ends with the caller's way to continue: `--resume` for train, the
    same command again for the study (which has no --resume)."""
    import kat_diag.opd.trainer as trainer
    from kat_diag.kat.config import KATConfig
    from kat_diag.opd.config import SamplingConfig, TrainConfig

    class Requested(trainer.GracefulInterrupt):
        def __init__(self) -> None:
            super().__init__()
            self.requested = True  # as if Ctrl-C came during the first step

    monkeypatch.setattr(trainer, "GracefulInterrupt", Requested)
    cfg = TrainConfig(teacher=str(quick_world / "teacher"), student=str(quick_world / "student"),
                      out=str(tmp_path / "run"), steps=3, batch_size=2, micro_batch=2, eval_n=0, progress=False,
                      device="cpu", sampling=SamplingConfig(max_new_tokens=8, chunk_size=4), trace_every=0,
                      kat=KATConfig(window=4, persistence=2, min_length=4, warmup_steps=1, min_fill=1))
    with pytest.raises(KeyboardInterrupt):
        trainer.train(cfg, resume_hint="run the same `kat-diag study` command again to continue")
    err = capsys.readouterr().err
    assert "interrupted: step 0 checkpointed" in err and "`kat-diag study` command again" in err
    assert "--resume" not in err
    import kat_diag.study as study

    seen = {}

    def fake_train(tcfg, **kw):
        seen.update(kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train", fake_train)
    monkeypatch.setattr(study, "evaluate_model", lambda *a, **k: {"mean": {}})
    with pytest.raises(KeyboardInterrupt):
        study.run_study(study.StudyConfig.tiny(str(quick_world / "teacher"), str(quick_world / "student")),
                        tmp_path / "study", progress=False)
    assert "kat-diag study" in seen["resume_hint"] and "--resume" not in seen["resume_hint"]


# 11. torchrun


def test_a_bad_option_under_torchrun_is_said_once_and_is_the_launchers_root_cause(tmp_path):
    import os
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    # Local rank 0 starts 3 s late (a sitecustomize on its path): rank 1 fails first, and the launcher
    # must not kill rank 0 before it says the line (it did, now and then, on a loaded machine).
    slow = tmp_path / "slow_rank0"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text("import os, time\nif os.environ.get('LOCAL_RANK') == '0':\n"
                                           "    time.sleep(3)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{slow}{os.pathsep}{repo}"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "cli.main",
                           "train", "--steps", "0"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    mine = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert mine == ["error: --steps (steps) must be >= 1, got 0"], proc.stderr[-3000:]
    # torchrun's own failure report names that line as the root cause (not "To enable traceback see ...").
    assert "traceback : error: --steps (steps) must be >= 1, got 0" in proc.stderr
