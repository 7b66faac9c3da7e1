"""Teacher vocabulary per phase: known-answer JS, log-odds, bootstrap, planted phases, a store end to end."""

import json
import math

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.spatial.distance import jensenshannon

from kat_diag.analysis.vocab import (
    bootstrap_js,
    compute_vocab,
    js_divergence,
    log_odds_z,
    reasoning_mask,
    teacher_entropy_lower_bound,
    visible_token,
)


def test_js_identical_is_zero_disjoint_is_ln2_and_matches_scipy_squared():
    p = np.array([3.0, 1.0, 0.0, 6.0])
    assert js_divergence(p, 2 * p) == 0.0
    assert js_divergence(np.array([1.0, 2.0, 0, 0]), np.array([0, 0, 5.0, 1.0])) == math.log(2)
    rng = np.random.default_rng(0)
    P, Q = rng.random((5, 30)), rng.random((5, 30))
    ours = js_divergence(P, Q)
    ref = [jensenshannon(a, b) ** 2 for a, b in zip(P, Q, strict=True)]  # natural log: scipy's default base
    np.testing.assert_allclose(ours, ref, rtol=1e-12)
    assert np.isnan(js_divergence(np.zeros(3), np.ones(3)))


def test_log_odds_ranks_planted_tokens_and_is_zero_for_equal_rates():
    # Group i over-uses token 2 and under-uses token 0; tokens 1 and 3 have equal rates.
    yi = np.array([10.0, 100, 300, 100])
    yj = np.array([200.0, 200, 50, 200])
    z = log_odds_z(yi, yj, prior=yi + yj)
    assert np.argmax(z) == 2 and np.argmin(z) == 0
    assert z[2] > 5 and z[0] < -5
    same = log_odds_z(np.array([5.0, 10, 20]), np.array([10.0, 20, 40]), prior=np.array([15.0, 30, 60]))
    np.testing.assert_allclose(same, 0.0, atol=1e-12)
    # A token with a zero prior (never seen anywhere) gets 0, not NaN.
    assert log_odds_z(np.array([1.0, 0]), np.array([1.0, 0]), np.array([2.0, 0]))[1] == 0.0


def test_bootstrap_ci_contains_the_point_estimate_and_degenerate_cases():
    rng = np.random.default_rng(1)
    R, V = 200, 12
    a = sp.csr_matrix(rng.poisson(np.linspace(1, 5, V), size=(R, V)).astype(float))
    b = sp.csr_matrix(rng.poisson(np.linspace(5, 1, V), size=(R, V)).astype(float))
    res = bootstrap_js(a, b, n_boot=300, seed=0)
    assert res["ci_low"] <= res["js"] <= res["ci_high"] and res["n_boot"] == 300
    assert 0 < res["ci_high"] - res["ci_low"] < 0.05
    same = bootstrap_js(a, a, n_boot=50)
    assert same["js"] == 0.0 and same["ci_high"] == 0.0
    disjoint = bootstrap_js(sp.csr_matrix(np.array([[1.0, 0], [2, 0]])), sp.csr_matrix(np.array([[0, 3.0], [0, 1]])),
                            n_boot=50)
    assert disjoint["js"] == disjoint["ci_low"] == disjoint["ci_high"] == math.log(2)


def test_entropy_lower_bound_and_visible_names():
    h = teacher_entropy_lower_bound(np.array([[1.0, 0, 0], [0.5, 0.5, 0], [0.25, 0.25, 0.25]]))
    np.testing.assert_allclose(h, [0.0, math.log(2), math.log(4)])  # last: 0.25 tail is one bucket
    assert visible_token("\n") == "\\n" and visible_token(" ") == "<sp>" and visible_token(" the") == "·the"
    assert reasoning_mask(["7", "+", " 12", "=", "a", "\\n", "x7"]).tolist() == [1, 1, 1, 1, 0, 0, 0]
    assert reasoning_mask(["therefore", "so"], lexicon=["therefore"]).tolist() == [True, False]


def test_compute_vocab_on_planted_phases():
    # 40 rollouts; pre proposes digits (ids 0-2), agreement newline-ish id 3, post id 4 and some digits.
    R = 40
    pre = sp.csr_matrix(np.tile([5.0, 5, 5, 0, 0], (R, 1)))
    agree = sp.csr_matrix(np.tile([0.0, 0, 0, 10, 0], (R, 1)))
    post = sp.csr_matrix(np.tile([1.0, 0, 0, 0, 9], (R, 1)))
    names = ["1", "2", "3", "\\n", "x"]
    res = compute_vocab({"pre": pre, "agreement": agree, "post": post}, names, np.arange(5),
                        entropy_sum={"pre": 30.0, "agreement": 8.0, "post": 0.0},
                        positions={"pre": 60, "agreement": 80, "post": 40}, n_boot=50)
    assert res.phases == ("pre", "agreement", "post")
    assert res.reasoning_share == {"pre": 1.0, "agreement": 0.0, "post": 0.1}
    assert res.entropy_lb == {"pre": 0.5, "agreement": 0.1, "post": 0.0}
    js = {(j["a"], j["b"]): j for j in res.js}
    assert js[("pre", "agreement")]["js"] == pytest.approx(math.log(2))
    assert 0 < js[("pre", "post")]["js"] < math.log(2)
    assert res.top_tokens("agreement", 1)[0]["token"] == "\\n"
    assert res.top_tokens("post", 1)[0]["token"] == "x"
    assert {t["token"] for t in res.top_tokens("pre", 3)} == {"1", "2", "3"}
    assert res.rollouts == {"pre": R, "agreement": R, "post": R}


def test_vocab_end_to_end_with_planted_phases(tmp_path):
    """A synthetic store with planted KL: low stretch in the middle of every rollout, teacher top ids
    that differ by phase; the command finds the phases exactly and writes its files."""
    from typer.testing import CliRunner

    from cli.main import app
    from kat_diag.traces.writer import TraceWriter

    rng = np.random.default_rng(0)
    n, L, W, T = 30, 40, 4, 3
    kl, top_ids, top_probs = [], [], []
    for _ in range(n):
        k = rng.uniform(3.0, 4.0, L)  # one such token makes a window's mean >= 0.75 > tau.astype(np.float32)
        k[12:28] = 0.01  # planted agreement stretch
        kl.append(k)
        ids = np.empty((L, 5), dtype=np.int32)
        ids[:12] = [10, 11, 12, 13, 14]  # no tokenizer in the config: names are <id>
        ids[12:28] = [20, 21, 22, 23, 24]
        ids[28:] = [30, 31, 32, 10, 11]
        top_ids.append(ids)
        top_probs.append(np.tile(np.array([0.5, 0.2, 0.1, 0.1, 0.05], dtype=np.float32), (L, 1)))
    run = tmp_path / "run"
    cfg = {"kat": {"window": W, "persistence": T, "min_length": 0}}
    with TraceWriter(run, config=cfg) as w:
        w.append({"step": 0, "prompt_id": [f"p{i}" for i in range(n)], "policy": "none", "tau": 0.5,
                  "token_ids": [20 + np.arange(L) % 5 for _ in range(n)], "kl": kl, "teacher_top_ids": top_ids,
                  "teacher_top_probs": top_probs,
                  "token_text": [[["\n", "b", "c", "d", "e"][i % 5] for i in range(L)] for _ in range(n)]})
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["vocab", str(run), "--out", str(out), "--boot", "100", "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    # First low window ends at 15, fire at 17, onset = 17 - T - W + 2 = 12; the window ending at 28
    # holds a high token, so agreement = [12, 28) and post = [28, 40): exactly the planted spans.
    assert s["phases"] == ["pre", "agreement", "post"]
    assert s["positions"] == {"pre": 12 * n, "agreement": 16 * n, "post": 12 * n}
    # No tokenizer in the config: names of sampled ids come from the stored token_text, others are <id>.
    assert {t["token"] for t in s["top_log_odds"]["agreement"][:5]} == {"\\n", "b", "c", "d", "e"}
    assert {t["token"] for t in s["top_log_odds"]["pre"][:3]} <= {f"<{i}>" for i in range(10, 15)}
    js = {(j["a"], j["b"]): j for j in s["js"]}
    assert js[("pre", "agreement")]["js"] == pytest.approx(math.log(2))
    assert s["teacher_entropy_lower_bound"]["pre"] == pytest.approx(
        float(teacher_entropy_lower_bound(np.array([[0.5, 0.2, 0.1, 0.1, 0.05]]))[0]), rel=1e-6)
    assert (out / "vocab.png").stat().st_size > 10_000
    lines = (out / "vocab.csv").read_text().splitlines()
    assert lines[0] == "phase,token_id,token,weight,share,z_log_odds" and len(lines) == 1 + 5 + 5 + 5


def test_vocab_needs_a_tau_when_none_is_recorded(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app
    from kat_diag.traces.writer import TraceWriter

    run = tmp_path / "run"
    with TraceWriter(run) as w:
        w.append({"step": 0, "prompt_id": ["a"], "policy": "none", "token_ids": [np.arange(8)],
                  "kl": [np.ones(8, dtype=np.float32)]})
    res = CliRunner().invoke(app, ["vocab", str(run), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "--tau" in res.output + str(res.exception)


def test_tau_options(tmp_path):
    from kat_diag.analysis.phase_sample import parse_tau, resolve_tau
    from kat_diag.traces.reader import TraceReader
    from kat_diag.traces.writer import TraceWriter

    assert parse_tau("recorded") is None and parse_tau("0.25") == 0.25 and parse_tau("q0.7") == "q0.7"
    for bad in ("q1.5", "qx", "nan", "abc"):
        with pytest.raises(ValueError, match="--tau"):
            parse_tau(bad)
    run = tmp_path / "run"
    with TraceWriter(run) as w:
        w.append({"step": 0, "prompt_id": ["a", "b", "c"], "policy": "none",
                  "token_ids": [np.arange(4)] * 3,
                  "kl": [np.array(v, dtype=np.float32) for v in ([1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3])]})
    reader = TraceReader(run)
    assert resolve_tau("q0.5", reader, window=2) == pytest.approx(2.0)  # minima 1, 2, 3 -> median 2
    assert resolve_tau(0.3, reader, window=2) == 0.3
    with pytest.raises(ValueError, match="at least one window"):
        resolve_tau("q0.5", reader, window=8)
