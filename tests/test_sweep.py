"""The trap sweep and its reference detectors: n-gram repeats against brute force, the signal rule
against KAT's replay, scores against hand counts, the frontier, a sweep of a recorded store."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kat_diag.analysis.reference_detectors import (
    DetectorResult,
    length_cut,
    ngram_repeat,
    signal_rule,
    teacher_entropy_topn,
)
from kat_diag.analysis.sweep import SweepGrid, frontier, matched, score
from kat_diag.kat.config import KATConfig
from kat_diag.world.paths import DEFAULT_WORLD_DIR


def _brute_ngram(seq: list[int], n: int, count: int, min_length: int = 0) -> tuple[int, int]:
    for t in range(n - 1, len(seq)):
        gram = seq[t - n + 1: t + 1]
        seen = sum(seq[s - n + 1: s + 1] == gram for s in range(n - 1, t))
        if seen >= count and t + 1 >= min_length:
            return t - n + 1, t
    return -1, -1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=0, max_size=30), min_size=1, max_size=6),
       st.integers(1, 5), st.integers(1, 3), st.integers(0, 10))
def test_ngram_repeat_equals_brute_force(seqs, n, count, min_length):
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64)
    flat = np.array([t for s in seqs for t in s], dtype=np.int64)
    det = ngram_repeat(flat, offsets, n, count, min_length)
    for i, s in enumerate(seqs):
        onset, fire = _brute_ngram(s, n, count, min_length)
        assert (int(det.onset[i]), int(det.fire[i])) == (onset, fire), (s, n, count)
        assert det.keep[i] == (onset if fire >= 0 else len(s))


def test_ngram_repeat_sees_a_loop_and_not_a_clean_chain():
    line = [1, 2, 3, 4, 5, 9]
    loop = [7, 8] + line * 3
    clean = [1, 2, 3, 4, 5, 9, 6, 7, 8, 0]
    offsets = np.array([0, len(loop), len(loop) + len(clean)])
    det = ngram_repeat(np.array(loop + clean), offsets, n=6, count=1)
    assert det.onset[0] == 8 and det.fire[0] == 13  # the second copy of the line starts at 8
    assert det.fire[1] == -1
    with pytest.raises(ValueError, match="n=0"):
        ngram_repeat(np.array(loop), np.array([0, len(loop)]), n=0)


def test_length_cut_is_the_prefix_budget():
    det = length_cut(np.array([0, 10, 40, 41]), 30)  # lengths 10, 30, 1
    assert det.fire.tolist() == [-1, -1, -1] and det.keep.tolist() == [10, 30, 1]
    det = length_cut(np.array([0, 10, 40, 41]), 5)
    assert det.fire.tolist() == [5, 5, -1] and det.onset.tolist() == [5, 5, -1] and det.keep.tolist() == [5, 5, 1]


def test_signal_rule_on_the_kl_is_kats_replay():
    from kat_diag.analysis.trap import step_taus
    from kat_diag.kat.replay import replay

    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 80, size=40)
    offs = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    kl = rng.exponential(0.3, size=offs[-1])
    kl[offs[3] + 10: offs[3] + 60] = 1e-3  # a long low stretch
    cfg = KATConfig(window=4, persistence=3, min_length=8, tau_quantile=0.5, warmup_steps=0, min_fill=1)
    det, tau = signal_rule(kl, offs, cfg)
    ref = replay(kl, offs, cfg, step_taus(kl, offs, np.zeros(40, dtype=np.int64), cfg))
    np.testing.assert_array_equal(det.fire, ref.fire)
    np.testing.assert_array_equal(det.onset, ref.onset)
    np.testing.assert_array_equal(det.keep, ref.keep)
    assert det.fire[3] >= 0 and np.all(tau == tau[0])


def test_teacher_entropy_topn_is_exact_when_top_n_hold_the_mass():
    p = np.array([[0.5, 0.25, 0.25, 0.0], [0.4, 0.3, 0.1, 0.1]])  # row 2: tail 0.1
    h = teacher_entropy_topn(p)
    assert h[0] == pytest.approx(-(0.5 * np.log(0.5) + 2 * 0.25 * np.log(0.25)))
    ref = -(0.4 * np.log(0.4) + 0.3 * np.log(0.3) + 0.1 * np.log(0.1) * 2 + 0.1 * np.log(0.1))
    assert h[1] == pytest.approx(ref)


def test_score_against_hand_counts():
    # 4 rollouts: right fired late, right not fired, wrong fired at the error, wrong looping not fired.
    det = DetectorResult(onset=np.array([8, -1, 5, -1]), fire=np.array([12, -1, 9, -1]),
                         length=np.array([10, 20, 30, 40]), keep=np.array([8, 20, 5, 40]))
    correct = np.array([True, True, False, False])
    s = score(det, correct, first_error=np.array([-1, -1, 4, 10]), loop_start=np.array([-1, -1, -1, 12]))
    assert s["fire_right"] == 0.5 and s["fire_wrong"] == 0.5
    assert s["tokens_cut"] == pytest.approx((2 + 25) / 100)
    assert s["right_tokens_cut"] == pytest.approx(2 / 30)
    assert s["onset_after_error"] == 1.0 and s["onset_lag_median"] == 1.0
    assert s["fire_loop"] == 0.0 and s["fire_wrong_no_loop"] == 1.0
    no_truth = score(det, correct)
    assert np.isnan(no_truth["onset_after_error"]) and np.isnan(no_truth["fire_loop"])


def test_frontier_and_matched():
    rows = [{"detector": "a", "fire_right": fr, "fire_wrong": fw, "right_tokens_cut": 0.0}
            for fr, fw in [(0.0, 0.1), (0.1, 0.05), (0.1, 0.4), (0.2, 0.4), (0.3, 0.9), (0.05, 0.3)]]
    fr = frontier(rows, "a")
    assert [(r["fire_right"], r["fire_wrong"]) for r in fr] == [(0.0, 0.1), (0.05, 0.3), (0.1, 0.4), (0.3, 0.9)]
    assert matched(rows, "a", 0.12)["fire_wrong"] == 0.4
    assert matched(rows, "a", -0.1) is None


def test_grid_checks():
    assert len(SweepGrid(windows=(4,), persistences=(1, 2), min_lengths=(0,), quantiles=(0.5,),
                         statistics=("rollout_min",)).kat_configs()) == 2
    with pytest.raises(ValueError, match="unknown signal"):
        SweepGrid(signals=("kl", "perplexity"))
    with pytest.raises(ValueError, match="quantiles"):
        SweepGrid(quantiles=(1.0,))


@pytest.mark.skipif(not (DEFAULT_WORLD_DIR / "world.json").exists(), reason="no committed world")
def test_sweep_of_a_recorded_store_matches_trap(tmp_path):
    """A real store (kat-diag record on the committed world, which has right and wrong rollouts): the
    sweep's KAT rows equal `trap_stats` at the same configuration, the CLI prints the table, writes
    JSON and the figure."""
    from typer.testing import CliRunner

    from cli.main import app
    from kat_diag.analysis.sweep import load_sweep_data, run_sweep, sweep_report
    from kat_diag.analysis.trap import trap_report

    runner = CliRunner()
    store = tmp_path / "rec"
    r = runner.invoke(app, ["record", "--split", "ops2", "--n-prompts", "12", "--samples", "2",
                            "--batch-size", "24", "--max-new-tokens", "96", "--out", str(store)])
    assert r.exit_code == 0, r.output
    grid = SweepGrid(windows=(4, 8), persistences=(2, 4), min_lengths=(0, 8), quantiles=(0.5, 0.9),
                     ngram_ns=(3, 6), ngram_counts=(1,))
    data = load_sweep_data(store)
    rows = run_sweep(data, grid)
    assert len(rows) == 3 * 2 * 2 * 2 * 2 * 2 + 2 + len(grid.length_budgets)
    cfg = KATConfig(window=8, persistence=2, min_length=8, tau_quantile=0.9, warmup_steps=0, min_fill=1)
    trap = trap_report(store, cfg)
    row = next(x for x in rows if x["detector"] == "kl" and x["params"] == {
        "W": 8, "T": 2, "L0": 8, "q": 0.9, "statistic": "rollout_min"})
    assert row["fire_right"] == pytest.approx(trap["fire_rate_right"], nan_ok=True)
    assert row["fire_wrong"] == pytest.approx(trap["fire_rate_wrong"], nan_ok=True)
    assert row["tokens_cut"] == pytest.approx(trap["cut_share"])
    assert row["onset_after_error"] == pytest.approx(trap["onset_after_error_share"], nan_ok=True)
    rep = sweep_report(store, grid)
    assert set(rep["presets"]) == {"world", "paper"} and set(rep["frontier"]) == {*grid.signals, "ngram", "length"}
    assert 0 < rep["accuracy"] < 1 and all(rep["frontier"].values())

    fig = tmp_path / "sweep.png"
    args = ["trap", str(store), "--sweep", "--windows", "4,8", "--persistences", "2,4", "--min-lengths", "0,8",
            "--quantiles", "0.5,0.9", "--figure", str(fig)]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "KAT world preset" in r.output and "n-gram" in r.output and fig.exists()
    r = runner.invoke(app, [*args[:-2], "--json"])
    assert r.exit_code == 0, r.output
    js = json.loads(r.output)
    n_ngram = len(SweepGrid().ngram_ns) * len(SweepGrid().ngram_counts) + len(SweepGrid().length_budgets)
    assert js["rollouts"] == 24 and js["n_configurations"] == 3 * 32 + n_ngram and "rows" not in js
    assert js["presets"]["world"]["params"] == {"W": 16, "T": 8, "L0": 32, "q": 0.7, "statistic": "rollout_min"}
    r = runner.invoke(app, [*args[:-2], "--json", "--all-rows"])
    assert len(json.loads(r.output)["rows"]) == 3 * 32 + n_ngram
    r = runner.invoke(app, ["trap", str(store), "--sweep", "--windows", "4,x"])
    assert r.exit_code == 2 and "--windows" in r.output
