"""Trace store: exact round trip, crash safety under SIGKILL, corrupt/foreign files, filters."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kat_diag.traces.ragged import Ragged
from kat_diag.traces.reader import TraceReader
from kat_diag.traces.schema import SCHEMA_VERSION, TraceStoreError, make_rollout_id, split_rollout_id
from kat_diag.traces.writer import TraceWriter

REPO = Path(__file__).resolve().parents[1]
TOP_N = 3


def make_batch(step: int, n: int, seed: int, policy: str = "kat", stop: str = "eos",
               max_len: int = 40) -> dict:
    """A deterministic batch of n rollouts with every column filled."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_len, n)
    lengths[0] = max(lengths[0], 1)
    return {
        "step": step,
        "rollout_id": [make_rollout_id(step, 0, seed % 1000 * 100 + i) for i in range(n)],
        "prompt_id": [f"prob-{seed}-{i}" for i in range(n)],
        "policy": policy,
        "tau": [math.nan if i % 3 == 0 else 0.01 * (i + 1) for i in range(n)],
        "onset": [-1 if i % 2 else int(min(3, L)) for i, L in enumerate(lengths)],
        "fire": [-1 if i % 2 else int(L) - 1 for i, L in enumerate(lengths)],
        "stop_reason": stop,
        "kept_len": [int(L) // 2 for L in lengths],
        "text": [f"ünïcødé ✓ 数学 {seed}-{i}\n#42 \x00<b>&" for i in range(n)],
        "correct": [None if i % 3 == 0 else bool(i % 3 == 1) for i in range(n)],
        "token_ids": [rng.integers(0, 50_000, L).astype(np.int32) for L in lengths],
        "student_logprob": [-rng.exponential(1.0, L).astype(np.float32) for L in lengths],
        "teacher_logprob": [-rng.exponential(1.0, L).astype(np.float32) for L in lengths],
        "kl": [rng.lognormal(-3, 2, L).astype(np.float32) for L in lengths],
        "kl_sampled": [rng.normal(0, 1, L).astype(np.float32) for L in lengths],
        "student_entropy": [rng.exponential(1.0, L).astype(np.float32) for L in lengths],
        "teacher_top_ids": [rng.integers(0, 50_000, (L, TOP_N)).astype(np.int32) for L in lengths],
        "teacher_top_probs": [rng.random((L, TOP_N)).astype(np.float32) for L in lengths],
        "token_text": [[f"t{j}✓" if j % 5 else "\n" for j in range(L)] for L in lengths],
    }


def assert_rows_equal(batch: dict, got: dict, i: int) -> None:
    """Row i of the input batch equals the dict `got` read back."""
    for name in ("rollout_id", "prompt_id", "onset", "fire", "kept_len", "text"):
        assert got[name] == batch[name][i], name
    assert got["step"] == batch["step"]
    assert got["policy"] == batch["policy"]
    assert got["stop_reason"] == batch["stop_reason"]
    tau = batch["tau"][i]
    assert (math.isnan(got["tau"]) and math.isnan(tau)) or got["tau"] == tau
    assert got["correct"] is batch["correct"][i] or got["correct"] == batch["correct"][i]
    assert got["gen_len"] == len(batch["token_ids"][i])
    for name in ("token_ids", "student_logprob", "teacher_logprob", "kl", "kl_sampled", "student_entropy",
                 "teacher_top_ids", "teacher_top_probs"):
        assert got[name].dtype == batch[name][i].dtype, name
        np.testing.assert_array_equal(got[name], batch[name][i], err_msg=name)
    assert list(got["token_text"]) == batch["token_text"][i]


def write_store(run: Path, batches: list[dict], rank: int = 0, **kw) -> None:
    with TraceWriter(run, rank=rank, run_name="test-run", config={"lr": 1e-4}, top_n=TOP_N, **kw) as w:
        for b in batches:
            w.append(b)
            w.flush()


# ------------------------------------------------------------------------------------------------
# Round trip and defaults


def test_round_trip_every_field(tmp_path: Path) -> None:
    batches = [make_batch(step, 7, seed=step) for step in range(3)]
    write_store(tmp_path, batches)
    reader = TraceReader(tmp_path)
    assert reader.num_rows == 21
    assert reader.top_n == TOP_N
    assert reader.manifest["schema_version"] == SCHEMA_VERSION
    assert reader.config == {"lr": 1e-4}
    assert [p.name for p in reader.files] == [f"part-r00000-{i:08d}.parquet" for i in range(3)]
    data = reader.read()
    assert data.num_rows == 21
    for j in range(data.num_rows):
        row = data.row(j)
        assert row["run"] == "test-run" and row["rank"] == 0
        assert_rows_equal(batches[j // 7], row, j % 7)
    # the rollout accessor and the reader's own dtypes
    b = batches[1]
    assert_rows_equal(b, reader.rollout(b["rollout_id"][4]), 4)
    assert data["correct"].dtype == np.int8 and set(data["correct"].tolist()) == {-1, 0, 1}
    assert data["kl"].offsets.dtype == np.int64 and data["teacher_top_ids"].values.shape[1] == TOP_N


def test_standard_parquet_readable_by_pandas(tmp_path: Path) -> None:
    batch = make_batch(5, 4, seed=1)
    write_store(tmp_path, [batch])
    df = pq.read_table(tmp_path / "traces").to_pandas()
    assert list(df["prompt_id"]) == batch["prompt_id"]
    assert df["correct"].tolist()[0] is None
    np.testing.assert_array_equal(df["kl"][1], batch["kl"][1])
    np.testing.assert_array_equal(np.stack(df["teacher_top_ids"][0]), batch["teacher_top_ids"][0])
    assert df["text"][2] == batch["text"][2]


def test_defaults_and_generated_ids(tmp_path: Path) -> None:
    lp_s = [np.array([-0.5, -1.0], np.float32), np.array([-2.0], np.float32)]
    lp_t = [np.array([-0.25, -3.0], np.float32), np.array([-1.0], np.float32)]
    with TraceWriter(tmp_path, rank=3, top_n=2) as w:
        for _ in range(2):  # two appends of the same step: indices continue
            w.append({"step": 7, "prompt_id": [1, 2], "policy": "none",
                      "token_ids": [[1, 2], [3]], "kl": [[0.1, 0.2], [0.3]],
                      "student_logprob": lp_s, "teacher_logprob": lp_t})
    data = TraceReader(tmp_path / "traces").read()
    assert [split_rollout_id(r) for r in data["rollout_id"]] == [(7, 3, i) for i in range(4)]
    assert data["prompt_id"].tolist() == ["1", "2", "1", "2"]
    assert data["run"][0] == tmp_path.name
    np.testing.assert_array_equal(data["kl_sampled"][0], lp_s[0] - lp_t[0])
    assert np.isnan(data["student_entropy"].values).all()
    assert (data["teacher_top_ids"].values == -1).all() and data["teacher_top_ids"].values.shape == (6, 2)
    assert np.isnan(data["tau"]).all()
    assert (data["onset"] == -1).all() and (data["fire"] == -1).all() and (data["correct"] == -1).all()
    assert data["gen_len"].tolist() == [2, 1, 2, 1] and data["kept_len"].tolist() == [2, 1, 2, 1]
    assert data["stop_reason"].tolist() == ["eos"] * 4
    assert len(data["token_text"]) == 4 and len(data["token_text"].values) == 0  # null: not given


def test_append_accepts_ragged_and_validates(tmp_path: Path) -> None:
    w = TraceWriter(tmp_path, top_n=2)
    r = Ragged(np.array([0, 2, 3]), np.array([5, 6, 7]))
    w.append({"step": 0, "prompt_id": "p", "policy": "none", "token_ids": r,
              "kl": Ragged(r.offsets, np.array([0.1, 0.2, 0.3])),
              "teacher_top_ids": Ragged(r.offsets, np.zeros((3, 2), np.int32))})
    base = {"step": 0, "prompt_id": "p", "policy": "none", "token_ids": [[1, 2]], "kl": [[0.1, 0.2]]}
    with pytest.raises(ValueError, match="missing required column 'kl'"):
        w.append({k: v for k, v in base.items() if k != "kl"})
    with pytest.raises(ValueError, match="does not match token_ids"):
        w.append({**base, "kl": [[0.1]]})
    with pytest.raises(ValueError, match="gen_len must equal"):
        w.append({**base, "gen_len": [5]})
    with pytest.raises(ValueError, match=r"\[len, 2\]"):
        w.append({**base, "teacher_top_ids": [np.zeros((2, 3))]})
    with pytest.raises(ValueError, match="unknown trace columns"):
        w.append({**base, "klx": [[0.0]]})
    with pytest.raises(ValueError, match="shape"):
        w.append({**base, "onset": [1, 2]})
    w.close()
    assert TraceReader(tmp_path).read(["token_ids"])["token_ids"].values.tolist() == [5, 6, 7]
    with pytest.raises(TraceStoreError, match="top_n=2"):
        TraceWriter(tmp_path, top_n=5)


def test_sequence_continues_and_ranks_do_not_collide(tmp_path: Path) -> None:
    write_store(tmp_path, [make_batch(0, 2, 0)], rank=0)
    write_store(tmp_path, [make_batch(1, 2, 1)], rank=1)
    write_store(tmp_path, [make_batch(2, 2, 2)], rank=0)  # a restarted rank 0
    names = sorted(p.name for p in (tmp_path / "traces").glob("part-*"))
    assert names == ["part-r00000-00000000.parquet", "part-r00000-00000001.parquet",
                     "part-r00001-00000000.parquet"]
    assert TraceReader(tmp_path).num_rows == 6


def test_auto_flush_and_row_groups(tmp_path: Path) -> None:
    with TraceWriter(tmp_path, top_n=TOP_N, flush_every=10, row_group_tokens=50) as w:
        for step in range(5):
            w.append(make_batch(step, 4, seed=step))
        assert len(w.files_written) == 1  # 12 rollouts buffered >= 10 -> one automatic flush
    assert len(w.files_written) == 2 and w.rows_written == 20
    md = pq.read_metadata(w.files_written[0])
    assert md.num_row_groups > 1
    assert all(md.row_group(i).num_rows >= 1 for i in range(md.num_row_groups))


def test_empty_store_and_empty_selection(tmp_path: Path) -> None:
    TraceWriter(tmp_path).close()
    reader = TraceReader(tmp_path)
    assert reader.num_rows == 0
    data = reader.read(["kl", "step", "correct"])
    assert data.num_rows == 0 and len(data["kl"]) == 0 and data["correct"].dtype == np.int8


# ------------------------------------------------------------------------------------------------
# Crash safety

_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    sys.path.insert(0, {tests!r})
    from test_traces import make_batch, TOP_N
    from kat_diag.traces import writer as traces
    run, mode = sys.argv[1], sys.argv[2]
    flushes = 0
    if mode != "loop":
        # deterministic kills inside the 3rd flush: after one row group / before the rename
        target = traces._start_writeback if mode == "mid_write" else os.rename
        def killer(*a, **k):
            if flushes == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return target(*a, **k)
        if mode == "mid_write":
            traces._start_writeback = killer
        else:
            traces.os.rename = killer
    w = traces.TraceWriter(run, top_n=TOP_N, row_group_tokens=64)
    for step in range(10_000):
        w.append(make_batch(step, 6, seed=step, max_len=120))
        w.flush()
        flushes += 1
        print(step, flush=True)
    """
)


def _check_after_kill(run: Path, flushed: list[int]) -> None:
    reader = TraceReader(run)  # raises if any visible file is partial
    data = reader.read()
    steps = sorted(set(data["step"].tolist()))
    # every reported flush is there; at most one more (completed, not yet reported)
    assert steps[: len(flushed)] == flushed and len(steps) <= len(flushed) + 1
    for s in steps:  # each present step holds exactly its rollouts, bit for bit
        sel = np.flatnonzero(data["step"] == s)
        batch = make_batch(s, 6, seed=s, max_len=120)
        assert len(sel) == 6
        for i, j in enumerate(sel):
            assert_rows_equal(batch, data.row(int(j)), i)
    # a new writer removes the dead writer's temporary file and continues the sequence
    w = TraceWriter(run, top_n=TOP_N)
    assert not list((run / "traces").glob(".tmp-*"))
    w.append(make_batch(99_999, 6, seed=1))
    path = w.flush()
    assert path is not None and path.name == f"part-r00000-{len(steps):08d}.parquet"
    assert TraceReader(run).num_rows == 6 * (len(steps) + 1)


@pytest.mark.parametrize("mode", ["mid_write", "before_rename"])
def test_sigkill_inside_flush_leaves_only_complete_files(tmp_path: Path, mode: str) -> None:
    child = tmp_path / "child.py"
    child.write_text(_CHILD.format(repo=str(REPO), tests=str(REPO / "tests")))
    proc = subprocess.run([sys.executable, str(child), str(tmp_path), mode], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    flushed = [int(x) for x in proc.stdout.split()]
    assert flushed == [0, 1]
    assert len(list((tmp_path / "traces").glob(".tmp-*"))) == 1  # the half-written flush
    _check_after_kill(tmp_path, flushed)


def test_sigkill_at_a_random_moment(tmp_path: Path) -> None:
    child = tmp_path / "child.py"
    child.write_text(_CHILD.format(repo=str(REPO), tests=str(REPO / "tests")))
    proc = subprocess.Popen([sys.executable, str(child), str(tmp_path), "loop"], stdout=subprocess.PIPE,
                            text=True)
    flushed = []
    assert proc.stdout is not None
    for line in proc.stdout:
        flushed.append(int(line))
        if len(flushed) == 5:
            break
    time.sleep(0.013)  # land somewhere in the next appends/flushes
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    flushed += [int(x) for x in out.split()]
    assert proc.returncode == -signal.SIGKILL
    _check_after_kill(tmp_path, flushed)


# ------------------------------------------------------------------------------------------------
# Damaged, foreign and future stores


@pytest.fixture
def store3(tmp_path: Path) -> Path:
    write_store(tmp_path, [make_batch(step, 5, seed=step) for step in range(3)])
    return tmp_path


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(os.urandom(len(data)))
    elif how == "foreign":
        pq.write_table(pa.table({"step": [1, 2], "kl": [0.1, 0.2]}), path)
    elif how == "wrong_type":
        table = pq.read_table(path).set_column(1, "step", pa.array(["a"] * 5))
        pq.write_table(table.replace_schema_metadata(pq.read_schema(path).metadata), path)
    elif how == "page":
        # flip bytes inside the first data pages, footer intact: caught by the page checksums
        mid = bytearray(data)
        for k in range(200, 1200):
            mid[k] ^= 0x5A
        path.write_bytes(bytes(mid))


@pytest.mark.parametrize("how", ["truncate", "garbage", "foreign", "wrong_type", "page"])
def test_damaged_file_named_in_error_and_skippable(store3: Path, how: str) -> None:
    bad = store3 / "traces" / "part-r00000-00000001.parquet"
    _damage(bad, how)
    with pytest.raises(TraceStoreError, match="part-r00000-00000001.parquet"):
        TraceReader(store3).read()
    with pytest.warns(UserWarning, match="part-r00000-00000001.parquet"):
        reader = TraceReader(store3, on_error="skip")
        data = reader.read()
    assert sorted(set(data["step"].tolist())) == [0, 2]
    assert data.num_rows == 10
    assert [p.name for p, _ in reader.skipped] == [bad.name]


def test_temporary_and_unrelated_files_are_ignored(store3: Path) -> None:
    (store3 / "traces" / ".tmp-part-r00000-00000003.parquet.123").write_bytes(b"half a file")
    (store3 / "traces" / "notes.txt").write_text("hello")
    assert TraceReader(store3).num_rows == 15


def test_newer_schema_version_is_refused(store3: Path) -> None:
    manifest = store3 / "traces" / "_manifest.json"
    m = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**m, "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(TraceStoreError, match=f"schema version {SCHEMA_VERSION + 1}.*upgrade"):
        TraceReader(store3)
    manifest.write_text(json.dumps(m))
    path = store3 / "traces" / "part-r00000-00000002.parquet"
    table = pq.read_table(path)
    meta = dict(table.schema.metadata)
    meta[b"kat_diag.schema_version"] = str(SCHEMA_VERSION + 1).encode()
    pq.write_table(table.replace_schema_metadata(meta), path)
    with pytest.raises(TraceStoreError, match=rf"{path.name}.*version {SCHEMA_VERSION + 1}"):
        TraceReader(store3)


def test_missing_or_empty_path(tmp_path: Path) -> None:
    with pytest.raises(TraceStoreError, match="nowhere"):
        TraceReader(tmp_path / "nowhere")
    with pytest.raises(TraceStoreError, match="no trace store"):
        TraceReader(tmp_path)
    (tmp_path / "traces").mkdir()
    (tmp_path / "traces" / "_manifest.json").write_text("{not json")
    with pytest.raises(TraceStoreError, match="manifest"):
        TraceReader(tmp_path)


# ------------------------------------------------------------------------------------------------
# Filters


@pytest.fixture(scope="module")
def multi_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("multi")
    for rank in range(2):
        with TraceWriter(run, rank=rank, top_n=TOP_N, row_group_tokens=80) as w:
            for step in range(8):
                policy = ["none", "kat", "random"][(step + rank) % 3]
                b = make_batch(step, 5, seed=100 * rank + step, policy=policy,
                               stop=["eos", "max_len"][step % 2])
                b["rollout_id"] = [make_rollout_id(step, rank, i) for i in range(5)]
                w.append(b)
                if step % 3 == 2:
                    w.flush()
    return run


@pytest.mark.parametrize(
    "filters",
    [
        {},
        {"steps": (2, 5)},
        {"steps": (None, 0)},
        {"steps": (6, None)},
        {"steps": (100, 200)},
        {"policy": "kat"},
        {"policy": ["none", "random"], "rank": 1},
        {"stop_reason": "max_len", "steps": (1, 6)},
        {"rank": [0]},
        {"rollout_ids": [make_rollout_id(3, 1, 2), make_rollout_id(7, 0, 4), 12345]},
        {"rollout_ids": make_rollout_id(0, 0, 0), "policy": "kat"},
    ],
)
def test_filters_select_exactly_the_matching_rollouts(multi_store: Path, filters: dict) -> None:
    reader = TraceReader(multi_store)
    everything = reader.read(["rollout_id", "step", "policy", "stop_reason", "rank"])
    expected = np.ones(everything.num_rows, dtype=bool)
    if "steps" in filters:
        lo, hi = filters["steps"]
        expected &= (everything["step"] >= (lo if lo is not None else -1)) & (
            everything["step"] <= (hi if hi is not None else 10**9))
    for key, col in (("policy", "policy"), ("stop_reason", "stop_reason"), ("rank", "rank"),
                     ("rollout_ids", "rollout_id")):
        if key in filters:
            wanted = filters[key] if isinstance(filters[key], list) else [filters[key]]
            expected &= np.isin(everything[col], wanted)
    got = reader.read(["rollout_id", "kl", "teacher_top_probs"], **filters)
    assert sorted(got["rollout_id"].tolist()) == sorted(everything["rollout_id"][expected].tolist())
    # per-token columns stay aligned with their rollouts after filtering
    full = reader.read(["rollout_id", "kl"])
    by_id = {rid: full["kl"][i] for i, rid in enumerate(full["rollout_id"].tolist())}
    for i, rid in enumerate(got["rollout_id"].tolist()):
        np.testing.assert_array_equal(got["kl"][i], by_id[rid])
        assert got["teacher_top_probs"][i].shape == (len(by_id[rid]), TOP_N)
    batches = list(reader.iter_batches(["rollout_id"], **filters))
    assert sum(b.num_rows for b in batches) == int(expected.sum())
    assert all(b.num_rows > 0 for b in batches)


def test_iter_steps_in_order_across_ranks_and_files(multi_store: Path) -> None:
    reader = TraceReader(multi_store)
    seen = []
    for step, batch in reader.iter_steps(["kl"], policy=["kat", "none"]):
        assert (batch["step"] == step).all()
        assert set(batch["policy"] if "policy" in batch else ["kat"]) <= {"kat", "none"}
        seen.append((step, batch.num_rows))
    expected = reader.read(["step"], policy=["kat", "none"])["step"]
    assert [s for s, _ in seen] == sorted(set(expected.tolist()))
    assert sum(n for _, n in seen) == len(expected)


def test_unknown_column_and_bad_on_error(multi_store: Path) -> None:
    with pytest.raises(ValueError, match="unknown trace columns"):
        TraceReader(multi_store).read(["nope"])
    with pytest.raises(ValueError, match="on_error"):
        TraceReader(multi_store, on_error="ignore")


def test_ragged_take_and_concat() -> None:
    r = Ragged.from_list([np.arange(3), np.arange(0), np.arange(10, 12)], np.int64)
    assert r.lengths.tolist() == [3, 0, 2]
    t = r.take(np.array([2, 0, 1]))
    assert t.values.tolist() == [10, 11, 0, 1, 2] and t.offsets.tolist() == [0, 2, 5, 5]
    c = Ragged.concat([r, t])
    assert len(c) == 6 and c[3].tolist() == [10, 11] and c[5].tolist() == []
