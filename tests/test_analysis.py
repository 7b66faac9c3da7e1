"""kat_diag.analysis: low-KL runs, planted phases, heatmap binning and sampling, the CLI commands."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from kat_diag.analysis import heatmap as H
from kat_diag.analysis import phase_stats as P
from kat_diag.analysis.curves import read_metrics, rolling_mean
from kat_diag.analysis.store import read_rollouts, sample_rows, stage_ranges
from kat_diag.analysis.threshold import derive_tau, parse_tau, resolve_tau
from kat_diag.kat.config import KATConfig
from kat_diag.traces.reader import TraceReader
from kat_diag.traces.writer import TraceWriter

runner = CliRunner()
CFG = KATConfig(window=4, persistence=3, min_length=0)
HIGH, LOW, TAU = 1.0, 0.001, 0.1


def planted(n: int, start: int, end: int) -> np.ndarray:
    """KL 1.0 everywhere except LOW on [start, end)."""
    kl = np.full(n, HIGH, dtype=np.float32)
    kl[start:end] = LOW
    return kl


def ragged(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    offs = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum([len(a) for a in arrays], out=offs[1:])
    return np.concatenate(arrays), offs


# Rollouts with planted agreement [start, end) (None: no low block), chosen so that the
# segment is >= T windows long (end - start - W + 1 >= T), except the short one (2 windows).
PLANTS = [(40, 10, 25), (30, None, None), (50, 5, 50), (20, 3, 8), (60, 20, 30)]


def plants_kl() -> list[np.ndarray]:
    return [planted(n, s, e) if s is not None else np.full(n, HIGH, np.float32) for n, s, e in PLANTS]


# --------------------------------------------------------------------------------------------------
# Pure functions


def test_low_runs_and_first_extended_exact() -> None:
    low = np.array([0, 1, 1, 0, 1, 1, 0, 1, 0, 1], dtype=bool)  # rollout 0: 6 tokens, rollout 1: 4 tokens
    offs = np.array([0, 6, 10])
    runs = P.low_runs(low, offs, window=2)
    # runs of window ends: r0 [1,2], r0 [4,5] (ends with the rollout), r1 [1], r1 [3]
    assert runs.rollout.tolist() == [0, 0, 1, 1]
    assert runs.windows.tolist() == [2, 2, 1, 1]
    assert runs.start.tolist() == [0, 3, 0, 2]  # first window end - W + 1
    assert runs.end.tolist() == [3, 6, 2, 4]
    # A low flag at a rollout's first token and the previous rollout's last token: two runs.
    two = P.low_runs(np.array([0, 1, 1, 1], dtype=bool), np.array([0, 2, 4]), window=1)
    assert two.rollout.tolist() == [0, 1] and two.windows.tolist() == [1, 2]
    start, end = P.first_extended(runs, 2, persistence=2)
    assert start.tolist() == [0, -1] and end.tolist() == [3, -1]
    start, end = P.first_extended(runs, 2, persistence=3)
    assert start.tolist() == [-1, -1]


def test_planted_phases_found_exactly() -> None:
    values, offs = ragged(plants_kl())
    bp = P.batch_phases(values, offs, CFG, np.full(len(PLANTS), TAU))
    for i, (n, s, e) in enumerate(PLANTS):
        extended = s is not None and (e - s) - CFG.window + 1 >= CFG.persistence
        assert bp.length[i] == n
        if extended:
            assert (bp.pre_end[i], bp.agree_end[i]) == (s, e), i
            assert (bp.seg_start[i], bp.seg_end[i]) == (s, e), i
            assert bp.onset[i] == s and bp.fire[i] == s + CFG.window + CFG.persistence - 2
        else:
            assert (bp.pre_end[i], bp.agree_end[i]) == (n, n), i
            assert bp.seg_start[i] == -1 and bp.fire[i] == -1
    # Per token: phase labels and the extended-segment mask match the plants.
    expect_phase = np.concatenate([
        np.where(np.arange(n) < s, 0, np.where(np.arange(n) < e, 1, 2))
        if s is not None and (e - s) - 3 >= 3 else np.zeros(n) for n, s, e in PLANTS])
    np.testing.assert_array_equal(bp.phase_tok, expect_phase)
    np.testing.assert_array_equal(bp.in_ext_tok, expect_phase == 1)
    # Every maximal low run: one per planted block, covering exactly the block.
    assert sorted(bp.run_tokens.tolist()) == sorted(e - s for n, s, e in PLANTS if s is not None)


def test_teacher_entropy_topn_exact() -> None:
    p = np.array([[0.5, 0.25, 0.0], [1.0, 0.0, 0.0], [np.nan, 0.1, 0.1]])
    h = P.teacher_entropy_topn(p)
    assert h[0] == pytest.approx(-(0.5 * math.log(0.5) + 0.25 * math.log(0.25)) - 0.25 * math.log(0.25))
    assert h[1] == pytest.approx(0.0)
    assert math.isnan(h[2])


def test_derived_tau_and_tau_rules() -> None:
    values, offs = ragged([np.array([1, 2, 3, 4, 5, 6, 7, 8, 9], np.float32), np.array([4, np.nan, 4, 4], np.float32),
                           np.array([2, 2], np.float32), np.ones(5, np.float32)])
    # Rollout minima of the W=4 window means: 2.5 and 1.0 (the NaN rollout has no usable window, the
    # third is shorter than W); tau = their 0.7 quantile, with no B_min guard offline.
    assert derive_tau(values, offs, CFG) == pytest.approx(1.0 + 0.7 * 1.5)
    windows = KATConfig(window=4, persistence=3, min_length=0, statistic="windows")
    # stride windows: [1..4] 2.5, [5..8] 6.5, [1,1,1,1] 1.0 -> 0.7 quantile of (1, 2.5, 6.5)
    assert derive_tau(values, offs, windows) == pytest.approx(float(np.quantile([1.0, 2.5, 6.5], 0.7)))
    assert math.isnan(derive_tau(values[:0], np.zeros(1, np.int64), CFG))
    assert parse_tau("auto") == "auto" and parse_tau("0.25") == 0.25
    with pytest.raises(ValueError, match="--tau"):
        parse_tau("-1")
    rec = np.array([0.2, np.nan])
    np.testing.assert_allclose(resolve_tau(rec, "auto", 0.5), [0.2, 0.5])
    np.testing.assert_allclose(resolve_tau(rec, "derived", 0.5), [0.5, 0.5])
    np.testing.assert_allclose(resolve_tau(rec, 0.3, 0.5), [0.3, 0.3])


def test_binning_exact() -> None:
    values, offs = ragged([np.array([1, 2, 3, 4, 5], np.float64), np.array([10], np.float64),
                           np.array([np.nan, 6, 8], np.float64)])
    assert H.column_width(5, 3) == 2 and H.column_width(5, 8) == 1
    m = H.binned_mean(values, offs, width=2, n_cols=3)
    np.testing.assert_allclose(m, [[1.5, 3.5, 5], [10, np.nan, np.nan], [6, 8, np.nan]])
    mask = np.array([1, 1, 0, 0, 1, 0, 1, 1, 0], dtype=bool)
    share, n = H.position_share(mask, offs, np.array([True, True, True]), width=1, n_cols=5)
    np.testing.assert_allclose(share, [2 / 3, 1, 0, 0, 1])
    assert n.tolist() == [3, 2, 2, 1, 1]
    share, n = H.position_share(mask, offs, np.array([True, False, False]), width=2, n_cols=3)
    np.testing.assert_allclose(share, [1.0, 0.0, 1.0])
    prof = H.relative_profile(values, offs, np.array([True, False, True]), n_bins=2)
    # rollout 0 rel (.1 .3 .5 .7 .9): bins 0 0 1 1 1; rollout 2 rel (1/6, .5, 5/6) without the NaN: 6 -> 1, 8 -> 1
    np.testing.assert_allclose(prof, [1.5, (3 + 4 + 5 + 6 + 8) / 5])
    length, onset, correct = np.array([5, 9, 7]), np.array([-1, 4, 2]), np.array([1, 0, -1])
    assert H.sort_order("onset", length, onset, correct).tolist() == [2, 1, 0]
    assert H.sort_order("correct", length, onset, correct).tolist() == [1, 2, 0]
    assert H.sort_order("length", np.array([5, 9, 7]), np.zeros(3), np.zeros(3)).tolist() == [1, 2, 0]


def test_stage_ranges_and_sampling() -> None:
    assert stage_ranges(np.arange(0, 200)) == {"early": (0, 19), "late": (180, 199)}
    assert stage_ranges(np.array([3, 3])) == {"all": (3, 3)}
    assert stage_ranges(np.arange(5), early=(0, 1)) == {"early": (0, 1), "late": (4, 4)}
    a = sample_rows(100, 10, seed=1)
    assert a.tolist() == sorted(set(a.tolist())) and len(a) == 10
    np.testing.assert_array_equal(a, sample_rows(100, 10, seed=1))
    assert sample_rows(5, 10, seed=1).tolist() == [0, 1, 2, 3, 4]


def test_rolling_mean() -> None:
    # trailing: only past values; NaN stays NaN (nothing drawn before a value exists, e.g. tau in warm-up)
    np.testing.assert_allclose(rolling_mean(np.array([1.0, 2, 3, np.nan, 5]), 3), [1, 1.5, 2, np.nan, 4])
    np.testing.assert_allclose(rolling_mean(np.array([np.nan, np.nan, 4.0, 6.0]), 9), [np.nan, np.nan, 4, 5])
    assert rolling_mean(np.array([1.0]), 9).tolist() == [1.0]


# --------------------------------------------------------------------------------------------------
# Stores


def write_planted_store(run: Path, steps: int = 10, per_step: int = 10) -> None:
    """Each step: the PLANTS pattern twice; rollouts with an extended plant are wrong, others right."""
    kls = plants_kl()
    with TraceWriter(run, config={"kat": {"window": 4, "persistence": 3, "min_length": 0}}) as w:
        for step in range(steps):
            arrays = [kls[i % len(kls)] for i in range(per_step)]
            ext = [PLANTS[i % len(PLANTS)][1] is not None and PLANTS[i % len(PLANTS)] != (20, 3, 8)
                   for i in range(per_step)]
            w.append({"step": step, "prompt_id": [f"p{i}" for i in range(per_step)], "policy": "none",
                      "kl": arrays, "token_ids": [np.zeros(len(a), np.int32) for a in arrays],
                      "student_entropy": [np.full(len(a), 0.5, np.float32) for a in arrays],
                      "teacher_top_probs": [np.tile(np.array([0.5, 0.25, 0, 0, 0], np.float32), (len(a), 1))
                                            for a in arrays],
                      "correct": [not e for e in ext]})


@pytest.fixture(scope="module")
def planted_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("planted")
    write_planted_store(run)
    metrics = [{"step": s, "loss": 1.0 / (s + 1), "kl_mean": 0.5 - 0.01 * s, "gen_len_mean": 40.0,
                "kept_len_mean": 40.0, "fired_share": 0.0, "tau": None, "step_time": 1.0} for s in range(10)]
    metrics.append({"step": 9, "eval/mean/greedy": 0.5, "eval/mean/avg@4": 0.4, "eval/mean/pass@4": 0.7})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in metrics) + "\n")
    return run


def test_phase_report_counts_exact(planted_store: Path) -> None:
    rep = P.phase_report(TraceReader(planted_store), CFG, tau=TAU)
    assert [s.stage for s in rep.stages] == ["all", "early", "late"]
    a = rep.stage("all")
    per_step = [(n, s, e) for n, s, e in (PLANTS * 2)]
    agree = sum(e - s for n, s, e in per_step if s is not None and (n, s, e) != (20, 3, 8))
    total = sum(n for n, s, e in per_step)
    post = sum(n - e for n, s, e in per_step if s is not None and (n, s, e) != (20, 3, 8))
    assert a.phase_tokens == (10 * (total - agree - post), 10 * agree, 10 * post)
    # pre: 80 high tokens and the 5 low tokens of the short (non-extended) block per pattern
    assert a.phase_kl[1] == pytest.approx(LOW, rel=1e-6) and a.phase_kl[2] == pytest.approx(HIGH)
    assert a.phase_kl[0] == pytest.approx((80 * HIGH + 5 * LOW) / 85, rel=1e-6)
    assert a.segment_share == pytest.approx(0.6) and a.trap_rollouts == 60
    assert a.accuracy_trap == 0.0 and a.accuracy_no_trap == 1.0 and a.graded_trap == 60
    assert a.segment_median_start == 10.0  # starts 10, 5, 20 per pattern
    assert a.segment_kl[1] == pytest.approx(LOW, rel=1e-6) and a.segment_kl[0] == pytest.approx(HIGH)
    assert a.phase_student_entropy[0] == pytest.approx(0.5)
    assert rep.stage("early").steps == (0, 0) and rep.stage("early").rollouts == 10
    # derived tau: the fallback or the detector's rule, always finite here
    rep2 = P.phase_report(TraceReader(planted_store), CFG)
    assert rep2.tau["derived"] is not None and rep2.tau["mode"] == "auto"


def test_heatmap_sampling_and_matrix_exact(planted_store: Path) -> None:
    reader = TraceReader(planted_store)
    res = H.heatmap(reader, CFG, tau=TAU, sort="none", rows=4, sample=6, max_cols=30, seed=3,
                    early=(0, 4), late=(5, 9))
    assert res.width == 2 and res.n_cols == 30  # longest 60 tokens in <= 30 columns
    for st in res.stages:
        assert st.rollouts == 50 and st.sampled == 6 and st.rollout_id.shape[0] == 4
        assert np.all((st.step >= st.steps[0]) & (st.step <= st.steps[1]))
        batch = read_rollouts(reader, st.rollout_id, ["kl"])
        np.testing.assert_allclose(st.kl_RC, H.binned_mean(batch["kl"].values, batch["kl"].offsets, 2, 30),
                                   rtol=1e-6)
    again = H.heatmap(reader, CFG, tau=TAU, sort="none", rows=4, sample=6, max_cols=30, seed=3,
                      early=(0, 4), late=(5, 9))
    assert [s.rollout_id.tolist() for s in again.stages] == [s.rollout_id.tolist() for s in res.stages]
    full = H.heatmap(reader, CFG, tau=TAU, sample=1000, rows=1000)
    st = full.stages[0]
    assert st.findings["extended_low_kl_share"] == pytest.approx(0.6)
    # position 12 (1 token per column): of the wrong rollouts (extended plants (40,10,25), (50,5,50),
    # (60,20,30)) the first two are inside their segment; no right rollout (none, short plant) is.
    assert full.width == 1
    assert st.share_low["not right"][12] == pytest.approx(2 / 3) and st.share_low["right"][12] == 0.0
    assert st.share_low["not right"][22] == 1.0 and st.share_n["right"][25] == 2  # only the 30-token one runs


# --------------------------------------------------------------------------------------------------
# CLI


def _nonempty(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0, path


def test_cli_heatmap_and_phases_write_png_and_data(planted_store: Path, tmp_path: Path) -> None:
    res = runner.invoke(app, ["heatmap", str(planted_store), "--out", str(tmp_path), "--tau", "0.1", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["stages"][0]["extended_low_kl_share"] == pytest.approx(0.6)
    for f in ("heatmap.png", "heatmap.csv", "heatmap_rows.parquet"):
        _nonempty(tmp_path / f)
    res = runner.invoke(app, ["phases", str(planted_store), "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "agreement" in res.output and "wrote" in res.output
    for f in ("phases.png", "phases.csv", "phases_rollouts.parquet"):
        _nonempty(tmp_path / f)
    res = runner.invoke(app, ["heatmap", str(planted_store), "--sort", "bogus"])
    assert res.exit_code != 0 and "--sort" in res.output
    res = runner.invoke(app, ["phases", str(planted_store), "--tau", "nope"])
    assert res.exit_code != 0 and "--tau" in res.output


def test_cli_figures_writes_all_and_summary(planted_store: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text((planted_store / "metrics.jsonl").read_text())
    out = tmp_path / "figs"
    res = runner.invoke(app, ["figures", str(planted_store), str(other), "--out", str(out)])
    assert res.exit_code == 0, res.output
    _nonempty(out / "curves.png")
    _nonempty(out / "curves.csv")
    name = planted_store.name
    for f in ("heatmap.png", "heatmap.csv", "phases.png", "phases.csv"):
        _nonempty(out / name / f)
    summary = (out / "summary.md").read_text()
    assert "![training curves](curves.png)" in summary and f"]({name}/heatmap.png)" in summary
    assert "Skipped: no readable trace store" in summary  # the run without traces
    curves = read_metrics(planted_store)
    assert curves.eval["eval/mean/avg@4"].tolist() == [0.4] and curves.train_step.size == 10
