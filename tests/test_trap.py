"""Ground truth of world rollouts, the trap statistics on planted traces, and `kat-diag trap`."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cli.main import app
from kat_diag.analysis.trap import step_taus, trap_report, trap_stats
from kat_diag.data.problems import Problem
from kat_diag.kat.config import KATConfig
from kat_diag.kat.detector import rollout_minima
from kat_diag.traces.reader import TraceReader
from kat_diag.traces.schema import UNKNOWN_POSITION
from kat_diag.traces.writer import TraceWriter
from kat_diag.world.tasks import error_loop_variant, make_problem
from kat_diag.world.truth import (
    first_departure,
    first_wrong_line,
    loop_start,
    rollout_truth,
    token_starts_of,
    truth_columns,
)

P = Problem(id="p", prompt="23 +7 -5 *2\n", answer="50", solution="23+7=30\n30-5=25\n25*2=50\n#50")


def test_rollout_truth_kinds() -> None:
    t = rollout_truth(P, P.solution)
    assert (t.first_error, t.loop_start, t.verdict) == (-1, -1, "right")
    # a wrong result, continued consistently: the first wrong line is "30-5=26" (its '6' departs)
    t = rollout_truth(P, "23+7=30\n30-5=26\n26*2=52\n#52")
    assert (t.first_error, t.loop_start, t.verdict) == (8, -1, "wrong")
    # the wrong line repeated until the budget cuts it: loop starts at the first repeat (index 16)
    t = rollout_truth(P, "23+7=30\n30-5=26\n30-5=26\n30-5=26\n30-")
    assert (t.first_error, t.loop_start, t.verdict) == (8, 16, "loop")
    # a correct line repeated: the repeat is the first error and the loop start
    t = rollout_truth(P, "23+7=30\n23+7=30\n23+7=30\n")
    assert (t.first_error, t.loop_start, t.verdict) == (8, 8, "loop")
    t = rollout_truth(P, "23+7=30\n30-5=25\n25*")  # right so far, cut by the budget
    assert (t.first_error, t.loop_start, t.verdict) == (-1, -1, "unfinished")
    assert rollout_truth(Problem("m", "q", "1", "", kind="math"), "x") is None
    assert first_departure("abcX", "abc") == 3 and loop_start("a\nb\nb") == -1  # the last piece is cut
    assert first_wrong_line("ab\ncdX", "ab\ncde") == 3 and first_wrong_line("ab\nc", "ab\ncd") == -1
    # a repeated line whose first characters match the next correct line: wrong from its start
    assert rollout_truth(P, "23+7=30\n30-5=25\n30-5=25\n").first_error == 16


def test_truth_columns_map_characters_to_tokens() -> None:
    # two tokens of two characters each: the wrong line starting at character 8 is token 4
    text = "23+7=30\n30-5=26\n26*2=52\n#52"
    tokens = [text[i : i + 2] for i in range(0, len(text), 2)]
    assert token_starts_of(["ab", "c", "de"]) == [0, 2, 3]
    cols = truth_columns([P, Problem("m", "q", "1", "", kind="math")], [text, "x"], [tokens, ["x"]])
    assert cols == {"first_error": [4, None], "loop_start": [-1, None], "verdict": ["wrong", None]}


def test_error_loop_documents_keep_the_error_out_of_the_loss() -> None:
    rng = random.Random(3)
    for i in range(50):
        p = make_problem(rng, 1 + i % 5, f"x{i}")
        for ctx in (0, 1):
            d = error_loop_variant(p, rng, 96, ctx)
            completion = d.prompt[len(p.prompt):] + d.solution
            assert len(completion) == 96 and d.kind == "loop" and "#" not in completion
            t = rollout_truth(p, completion)
            assert t.verdict == "loop" and 0 <= t.first_error < t.loop_start
            bad = completion.split("\n")[completion[: t.first_error].count("\n")]
            # the wrong line and `ctx` repeats are in the prompt; the loss starts at a repeat
            assert d.prompt.endswith(bad + "\n") and d.prompt.count(bad + "\n") == 1 + ctx
            assert (bad + "\n" + bad).startswith(d.solution[: 2 * len(bad) + 1])


def _planted(n_right: int = 4, n_wrong: int = 6):
    """Right rollouts: 40 tokens at KL 0.5. Wrong: 50 tokens at 0.5, then 150 at 0.0625 (a loop
    the teacher follows), first error at token 40, loop from token 50."""
    rows = [np.full(40, 0.5) for _ in range(n_right)] + \
           [np.concatenate([np.full(50, 0.5), np.full(150, 0.0625)]) for _ in range(n_wrong)]
    off = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    correct = np.array([True] * n_right + [False] * n_wrong)
    err = np.array([-1] * n_right + [40] * n_wrong)
    loop = np.array([-1] * n_right + [50] * n_wrong)
    return np.concatenate(rows), off, correct, err, loop


def test_trap_stats_on_planted_traces() -> None:
    kl, off, correct, err, loop = _planted()
    cfg = _cfg(8, 4, 32)
    np.testing.assert_allclose(rollout_minima(kl, off, 8), [0.5] * 4 + [0.0625] * 6)
    s = trap_stats(kl, off, correct, cfg, first_error=err, loop_start=loop)
    # tau = 0.7-quantile of {0.0625 x6, 0.5 x4} = 0.5; a window is low when its mean is < 0.5, so
    # the first low window ends at token 50 (one loop token), fire = 50 + T - 1 = 53,
    # onset = 53 - T - W + 2 = 43 (the start of that window) >= the first error at 40; right
    # rollouts never dip below tau.
    assert s["tau"] == 0.5 and s["accuracy"] == 0.4
    assert s["fire_rate_right"] == 0.0 and s["fire_rate_wrong"] == 1.0
    assert s["onset_after_error_share"] == 1.0 and s["right_cut_share"] == 0.0
    assert s["cut_share"] == pytest.approx(6 * (200 - 43) / (6 * 200 + 4 * 40))
    assert s["not_generated_share"] == pytest.approx(6 * (200 - 54) / (6 * 200 + 4 * 40))
    assert s["low_span_right"] == 0.0 and s["low_span_wrong"] == 150 + 8 - 1  # windows ending 50..199
    assert s["loop_share_of_wrong"] == 1.0 and s["fire_rate_loop"] == 1.0
    # an error after the onset (inside the first low window): the share drops
    s2 = trap_stats(kl, off, correct, cfg, first_error=np.where(err >= 0, 44, -1))
    assert s2["onset_after_error_share"] == 0.0
    # L0 beyond every right rollout and the loop onset: fire moves to L0 - 1 = 99, onset 99 - 10 = 89
    s3 = trap_stats(kl, off, correct, _cfg(8, 4, 100), first_error=err)
    assert s3["cut_share"] == pytest.approx(6 * (200 - 89) / 1360)
    # without ground truth the truth statistics are absent
    assert "onset_after_error_share" not in trap_stats(kl, off, correct, cfg)


def _cfg(w: int, t: int, l0: int, **kw) -> KATConfig:
    return KATConfig(window=w, persistence=t, min_length=l0, warmup_steps=0, min_fill=1, tau_quantile=0.7, **kw)


def test_step_taus_use_only_earlier_steps() -> None:
    # one-token rollouts, W = 1: each rollout's minimum is its KL value
    kl = np.array([1.0, 2.0, 3.0, np.nan, 5.0])
    off = np.arange(6)
    steps = np.array([0, 0, 1, 1, 2])
    cfg = KATConfig(window=1, persistence=1, min_length=0, warmup_steps=0, tau_quantile=0.5, min_fill=2,
                    buffer_size=2)
    tau = step_taus(kl, off, steps, cfg)
    # step 0: empty buffer; step 1: {1, 2} -> 1.5; step 2: FIFO of 2 -> {2, 3} -> 2.5 (NaN is no value)
    np.testing.assert_allclose(tau, [np.nan, np.nan, 1.5, 1.5, 2.5])
    np.testing.assert_allclose(step_taus(kl[:2], off[:3], steps[:2], cfg), [1.5, 1.5])  # one step: its own
    late = KATConfig(window=1, persistence=1, min_length=0, warmup_steps=2, tau_quantile=0.5, min_fill=2)
    np.testing.assert_allclose(step_taus(kl, off, steps, late), [np.nan] * 4 + [2.0])  # K = 2


def _write_planted(run: Path, truth: bool) -> None:
    kl, off, correct, err, loop = _planted()
    rows = [kl[off[i] : off[i + 1]].astype(np.float32) for i in range(len(off) - 1)]
    batch = {"step": 0, "prompt_id": [f"p{i}" for i in range(len(rows))], "policy": "none",
             "token_ids": [np.zeros(len(r), np.int32) for r in rows], "kl": rows, "correct": list(correct)}
    if truth:
        batch |= {"first_error": list(err), "loop_start": list(loop),
                  "verdict": ["right" if c else "loop" for c in correct]}
    with TraceWriter(run, top_n=2) as w:
        w.append(batch)


def test_trap_report_and_cli_on_a_store(tmp_path: Path) -> None:
    _write_planted(tmp_path / "w", truth=True)
    rep = trap_report(tmp_path / "w", _cfg(8, 4, 32))
    assert rep["fire_rate_wrong"] == 1.0 and rep["onset_after_error_share"] == 1.0
    b = TraceReader(tmp_path / "w").read(columns=["first_error", "verdict"])
    assert list(b["first_error"]) == [-1] * 4 + [40] * 6 and b["verdict"][-1] == "loop"
    res = CliRunner().invoke(app, ["trap", str(tmp_path / "w"), "--window", "8", "--persistence", "4",
                                   "--min-length", "32", "--tau-quantile", "0.7", "--min-fill", "1", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["fire_rate_right"] == 0.0 and out["cut_share"] == pytest.approx(6 * 157 / 1360)
    table = CliRunner().invoke(app, ["trap", str(tmp_path / "w"), "--window", "8"])
    assert table.exit_code == 0 and "KAT fires on wrong rollouts" in table.output
    bad = CliRunner().invoke(app, ["trap", str(tmp_path / "w"), "--tau-quantile", "1.5"])
    assert bad.exit_code != 0


def test_stores_without_ground_truth_and_schema_1_stores(tmp_path: Path) -> None:
    _write_planted(tmp_path / "real", truth=False)  # real data: truth columns null
    rep = trap_report(tmp_path / "real", _cfg(8, 4, 32))
    assert rep["fire_rate_wrong"] == 1.0 and "onset_after_error_share" not in rep
    # a schema-1 file: no truth columns, version 1 in its metadata -> still readable, truth unknown
    _write_planted(tmp_path / "old", truth=True)
    (part,) = (tmp_path / "old" / "traces").glob("part-*.parquet")
    table = pq.read_table(part)
    table = table.drop_columns(["first_error", "loop_start", "verdict"])
    meta = dict(table.schema.metadata)
    meta[b"kat_diag.schema_version"] = b"1"
    pq.write_table(table.replace_schema_metadata(meta), part)
    b = TraceReader(tmp_path / "old").read(columns=["kl", "first_error", "verdict"])
    assert (b["first_error"] == UNKNOWN_POSITION).all() and list(b["verdict"]) == [None] * 10
    assert "onset_after_error_share" not in trap_report(tmp_path / "old", _cfg(8, 4, 32))


def test_trap_and_replay_feed_the_buffer_the_same_way_on_a_store_of_several_steps(tmp_path: Path) -> None:
    """M2 (issue 23): the buffer gets what a rollout kept up to its fire, in `trap` as in `replay`.
    Step 1's rollout fires at 3 on its window mean 0.1875; fed whole it would push its later 0.0
    and step 2's threshold would be 0.125 (no fire) instead of 0.21875 (fires on 0.15625)."""
    steps = [[[0.5, 0.5, 0.25, 0.25]],  # warm-up: pushes its minimum 0.25
             [[0.5, 0.5, 0.1875, 0.1875, 0.0, 0.0]],  # tau 0.25: fires at 3, pushes min over [0, 3]
             [[0.5, 0.5, 0.15625, 0.15625, 0.5, 0.5]]]  # tau = median(0.25, 0.1875) = 0.21875
    run = tmp_path / "opd"
    with TraceWriter(run, top_n=2) as w:
        for i, (trace,) in enumerate(steps):
            w.append({"step": i, "prompt_id": f"p{i}", "policy": "none", "correct": False,
                      "token_ids": [np.zeros(len(trace), np.int32)], "kl": [np.array(trace, np.float32)]})
    opts = ["--window", "2", "--persistence", "1", "--min-length", "0", "--warmup-steps", "1",
            "--min-fill", "1", "--buffer-size", "64", "--tau-quantile", "0.5", "--json"]
    cfg = KATConfig(window=2, persistence=1, min_length=0, warmup_steps=1, min_fill=1, buffer_size=64,
                    tau_quantile=0.5)
    b = TraceReader(run).read(["kl", "step", "rollout_id"])
    tau = step_taus(b["kl"].values, b["kl"].offsets, b["step"], cfg, b["rollout_id"])
    np.testing.assert_array_equal(tau, [np.nan, 0.25, 0.21875])
    trap = CliRunner().invoke(app, ["trap", str(run), *opts])
    replay = CliRunner().invoke(app, ["replay", str(run), *opts, "--statistic", "rollout_min", "--keep", "onset"])
    assert trap.exit_code == 0 and replay.exit_code == 0, trap.output + replay.output
    t, r = (json.loads(res.output[res.output.index("{"):].splitlines()[0]) for res in (trap, replay))
    assert t["fire_rate"] == r["fired_share"] == pytest.approx(2 / 3)
    assert r["tau"]["min"] == 0.21875 and r["tau"]["max"] == 0.25
