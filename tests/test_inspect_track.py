"""`inspect` explains a cut: a planted rollout's window track, marks and teacher departures in the
terminal (colour, truecolor, --no-color) and HTML; `--list` sorting and filtering; --step/--index."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from kat_diag.kat.config import KATConfig
from kat_diag.kat.detector import rollout_minima
from kat_diag.traces.schema import make_rollout_id
from kat_diag.traces.writer import TraceWriter

runner = CliRunner()
KAT = {"window": 4, "persistence": 3, "min_length": 8}
TAU = 0.1
TEXT = "12+34=46\n46*2=92\n46*"  # 20 characters: one token each
ONSET, FIRE, FIRST_ERROR, LOOP = 14, 19, 10, 12  # low KL from 14: windows low from 17, 3 in a row at 19
DEPART = 10  # the one token that is not the teacher's top-1 (its rank 2)


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def planted_rollout(n: int = 20) -> dict:
    ids = np.array([ord(c) for c in TEXT[:n]], dtype=np.int32)
    kl = np.where(np.arange(n) < ONSET, 2.0, 0.001).astype(np.float32)
    top = np.stack([ids, ids + 1, ids + 2], 1).astype(np.int32)
    probs = np.tile(np.array([0.9, 0.06, 0.02], np.float32), (n, 1))
    top[DEPART] = [ord("9"), ids[DEPART], ord("5")]  # the teacher wanted '9' (it occurs later in the text)
    probs[DEPART] = [0.8, 0.15, 0.03]
    t_lp = np.log(np.where(np.arange(n) == DEPART, 0.15, 0.9)).astype(np.float32)
    return {"token_ids": ids, "kl": kl, "teacher_top_ids": top, "teacher_top_probs": probs, "teacher_logprob": t_lp,
            "token_text": list(TEXT[:n]), "text": TEXT[:n]}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, int]:
    run = tmp_path_factory.mktemp("inspect")
    r = planted_rollout()
    rng = np.random.default_rng(0)
    with TraceWriter(run, top_n=3, config={"kat": KAT}) as w:
        # step 3, index 5: the planted, cut rollout
        w.append({"step": 3, "rollout_id": [make_rollout_id(3, 0, 5)], "prompt_id": ["p5"], "policy": "kat",
                  "tau": TAU, "onset": [ONSET], "fire": [FIRE], "stop_reason": ["policy"], "kept_len": [ONSET],
                  "correct": [False], "first_error": [FIRST_ERROR], "loop_start": [LOOP], "verdict": ["loop"],
                  **{k: [v] for k, v in r.items()}})
        # other rollouts of step 4: (onset, verdict) pairs to list, sort and filter
        for i, (onset, verdict, correct) in enumerate([(-1, "right", True), (9, "wrong", False), (4, "unfinished",
                                                                                                  False),
                                                       (-1, "wrong", False)]):
            n = 30
            kl = rng.lognormal(-2, 1, n).astype(np.float32)
            if onset >= 0:
                kl[onset:] = 0.0005
            w.append({"step": 4, "rollout_id": [make_rollout_id(4, 0, i)], "prompt_id": [f"q{i}"], "policy": "kat",
                      "tau": TAU, "onset": [onset], "fire": [onset + 5 if onset >= 0 else -1],
                      "stop_reason": ["policy" if onset >= 0 else "eos"], "kept_len": [onset if onset >= 0 else n],
                      "correct": [correct], "first_error": [-1 if verdict == "right" else 3], "loop_start": [-1],
                      "verdict": [verdict], "token_ids": [np.arange(n, dtype=np.int32)], "kl": [kl],
                      "token_text": [[str(j % 10) for j in range(n)]]})
    return run, make_rollout_id(3, 0, 5)


def _row(out: str, label: str) -> str:
    """The body of a track row (its cells start after the 8-character label)."""
    line = next(ln for ln in out.splitlines() if ln[:8].strip() == label and len(ln) > 8)
    return line[8:]


def test_window_track_of_the_planted_rollout():
    from kat_diag.views.track import window_track

    row = {**planted_rollout(), "tau": TAU, "onset": ONSET, "fire": FIRE, "kept_len": ONSET,
           "first_error": FIRST_ERROR, "loop_start": LOOP}
    t = window_track(row, KATConfig(**KAT))
    assert (t.onset, t.fire) == (ONSET, FIRE)  # replayed at the recorded tau: the online decision
    assert np.flatnonzero(t.low).tolist() == [17, 18, 19] and t.count[17:20].tolist() == [1, 2, 3]
    assert t.z[3] == pytest.approx(2.0) and t.z[17] == pytest.approx(0.001, rel=1e-5)
    assert np.isnan(t.z[:3]).all()
    assert t.marks == {"L0": 8, "first_error": FIRST_ERROR, "loop_start": LOOP, "onset": ONSET, "fire": FIRE,
                       "kept_end": ONSET}
    assert t.min_window == pytest.approx(0.001, rel=1e-5) and t.min_window_at == 17


def test_terminal_no_color_shows_track_marks_and_departures(store):
    run, rid = store
    res = invoke("inspect", run, "--step", 3, "--index", 5, "--no-color", "--width", 64)
    assert res.exit_code == 0, res.output
    out = res.output
    assert "\x1b[" not in out
    assert f"rollout={rid}" in out and "verdict=loop" in out and f"first_error={FIRST_ERROR}" in out
    assert f"loop_start={LOOP}" in out and "answer=(none)" in out and "tau 0.1 nats (recorded)" in out
    assert _row(out, "token") == TEXT.replace("\n", "↵")
    # KL readable without colour: one glyph per token (2 nats: ▇, 0.001 nat: ▁)
    assert _row(out, "KL") == "▇" * ONSET + "▁" * (20 - ONSET)
    low = _row(out, "< tau")
    assert [i for i, c in enumerate(low) if c == "■"] == [17, 18, 19] and low[:3] == "   "
    assert _row(out, "count/3").rstrip() == "·" * 17 + "123"
    kat, truth = _row(out, "KAT"), _row(out, "truth")
    assert kat.index("L") == 8 and kat.index("O") == ONSET and kat.index("F") == FIRE
    assert truth.index("E") == FIRST_ERROR and truth.index("R") == LOOP
    assert _row(out, "T rank").index("2") == DEPART and set(_row(out, "T rank")) == {"·", "2"}
    assert "left the teacher's top-1 at 1 of 20 tokens" in out
    dep = next(ln for ln in out.splitlines() if ln.strip().startswith(f"{DEPART} "))
    assert "0.150" in dep and " 2 " in dep  # p_T of its token, its rank
    assert f"O onset {ONSET}" in out and f"F fire {FIRE}" in out and f"E first error {FIRST_ERROR}" in out
    # the token stream keeps its marks and separators
    body = out.split("\ntokens:\n", 1)[1]
    assert "⟦first error⟧6" in body and "⟦loop⟧2" in body and "⟦fire⟧" in body
    assert re.search(r"⟦[^⟧]*onset[^⟧]*⟧9", body)  # before the token at position 14


def test_terminal_colour_256_and_truecolor(store):
    run, rid = store
    out = invoke("inspect", run, "--rollout", rid, "--color", "--color-depth", "256").output
    assert "\x1b[48;5;" in out and "48;2;" not in out and "▲ tau 0.1 nats" in out
    tc = invoke("inspect", run, "--rollout", rid, "--color", "--color-depth", "truecolor").output
    assert "\x1b[48;2;253;231;37" in tc or "48;2;" in tc  # the palette's RGB, not the nearest xterm colour
    plain = re.sub(r"\x1b\[[0-9;]*m", "", tc)
    assert _row(plain, "KAT").index("O") == ONSET and _row(plain, "truth").index("E") == FIRST_ERROR


def test_html_track_marks_and_alternatives_without_hover(store, tmp_path):
    run, rid = store
    page_path = tmp_path / "r.html"
    res = invoke("inspect", run, "--rollout", rid, "--html", page_path)
    assert res.exit_code == 0, res.output
    page = page_path.read_text()
    assert "<svg" in page and "tau 0.1" in page
    for text in (f"onset {ONSET}", f"fire {FIRE}", f"first error {FIRST_ERROR}", f"loop start {LOOP}", "L0 8",
                 f"kept end {ONSET}"):
        assert text in page, text
    # the teacher's top-1 above the departing token (ruby text: no hover needed), and the table
    assert re.search(r"<ruby><span[^>]*>6</span><rt>9 0\.80</rt></ruby>", page)
    assert "Left the teacher&#x27;s top-1 at 1 of 20 tokens" in page or "Left the teacher's top-1 at 1 of 20" in page
    # positions: the SVG's onset line sits at token ONSET on the same x scale as the first token
    xs = {m.group(2): float(m.group(1)) for m in re.finditer(r'<line x1="([0-9.]+)"[^>]*><title>([a-z ]+\d+)</title>',
                                                             page)}
    assert xs[f"onset {ONSET}"] < xs[f"fire {FIRE}"] and xs[f"first error {FIRST_ERROR}"] < xs[f"onset {ONSET}"]


def test_list_sorts_filters_and_addresses(store):
    run, rid = store
    rows = json.loads(invoke("inspect", run, "--list", "--json").stdout)
    assert len(rows) == 5 and {r["verdict"] for r in rows} == {"loop", "right", "wrong", "unfinished"}
    planted = next(r for r in rows if r["rollout_id"] == rid)
    assert (planted["step"], planted["index"], planted["onset"], planted["tau"]) == (3, 5, ONSET, TAU)
    kl = planted_rollout()["kl"]
    assert planted["min_window"] == pytest.approx(float(rollout_minima(kl, np.array([0, 20]), 4)[0]))
    by_onset = json.loads(invoke("inspect", run, "--list", "--json", "--sort", "onset").stdout)
    assert [r["onset"] for r in by_onset] == [4, 9, ONSET, -1, -1]  # not fired last
    desc = json.loads(invoke("inspect", run, "--list", "--json", "--sort", "min_window", "--desc").stdout)
    mins = [r["min_window"] for r in desc]
    assert mins == sorted(mins, reverse=True)
    wrong = json.loads(invoke("inspect", run, "--list", "--json", "--verdict", "wrong").stdout)
    assert len(wrong) == 2 and {r["verdict"] for r in wrong} == {"wrong"}
    fired_wrong = json.loads(invoke("inspect", run, "--list", "--json", "--verdict", "wrong", "--fired").stdout)
    assert [r["onset"] for r in fired_wrong] == [9]
    not_fired = json.loads(invoke("inspect", run, "--list", "--json", "--not-fired").stdout)
    assert {r["fire"] for r in not_fired} == {-1}
    table = invoke("inspect", run, "--list", "--sort", "verdict").output
    assert "3/5" in table and "step/index" in table and "min z" in table
    assert table.index(" wrong ") < table.index(" loop ") < table.index(" right ")
    res = invoke("inspect", run, "--list", "--sort", "bogus")
    assert res.exit_code == 2 and "--sort" in res.output
    res = invoke("inspect", run, "--list", "--verdict", "maybe")
    assert res.exit_code == 2 and "--verdict" in res.output
    res = invoke("inspect", run, "--step", 3)
    assert res.exit_code == 2 and "--index" in res.output
    res = invoke("inspect", run, "--step", 9, "--index", 9)
    assert res.exit_code == 2 and str(make_rollout_id(9, 0, 9)) in res.output


def test_tau_override_for_a_run_without_kat(store):
    run, rid = store
    out = invoke("inspect", run, "--rollout", rid, "--no-color", "--tau", "0.0001").output
    assert "tau 0.0001 nats (given)" in out and "■" not in _row(out, "< tau")
    assert "never below tau" in out and not math.isnan(0.0)
