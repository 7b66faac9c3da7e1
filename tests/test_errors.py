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
