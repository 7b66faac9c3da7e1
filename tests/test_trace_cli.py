"""`kat-diag inspect` and `kat-diag replay` on small synthetic stores, through the real Typer app."""

from __future__ import annotations

import html as html_lib
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from kat_diag.traces.schema import make_rollout_id
from kat_diag.traces.writer import TraceWriter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_traces import TOP_N, make_batch, write_store  # noqa: E402

runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    return result


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    run = tmp_path_factory.mktemp("run")
    batches = [make_batch(step, 6, seed=step, policy=["kat", "none"][step % 2],
                          stop=["policy", "eos"][step % 2]) for step in range(4)]
    write_store(run, batches)
    return run, batches


def test_inspect_summary_table(store) -> None:
    run, batches = store
    res = invoke("inspect", run)
    assert res.exit_code == 0, res.output
    out = res.output
    assert "policy" in out and "stopped" in out and "mean onset" in out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.split() and ln.split()[0] in ("kat", "none", "all")}
    assert set(lines) == {"kat", "none", "all"}
    tokens = sum(len(t) for b in batches for t in b["token_ids"])
    assert lines["all"].split()[1:3] == ["24", str(tokens)]
    assert "0..3 (4)" in lines["all"]


def test_inspect_json_values(store) -> None:
    run, batches = store
    res = invoke("inspect", run, "--json")
    assert res.exit_code == 0, res.output
    s = json.loads(res.output)
    fires = np.array([f for b in batches for f in b["fire"]])
    onsets = np.array([o for b in batches for o in b["onset"]])
    kept = np.array([k for b in batches for k in b["kept_len"]])
    gen = np.array([len(t) for b in batches for t in b["token_ids"]])
    correct = [c for b in batches for c in b["correct"]]
    assert s["rollouts"] == 24 and s["tokens"] == int(gen.sum())
    assert s["steps"] == 4 and s["first_step"] == 0 and s["last_step"] == 3
    assert s["fired_share"] == pytest.approx((fires >= 0).mean())
    assert s["mean_onset"] == pytest.approx(onsets[fires >= 0].mean())
    assert s["mean_kept_len"] == pytest.approx(kept.mean())
    assert s["kept_ratio"] == pytest.approx(kept.sum() / gen.sum())
    graded = [c for c in correct if c is not None]
    assert s["graded"] == len(graded) and s["accuracy"] == pytest.approx(np.mean(graded))
    assert set(s["policies"]) == {"kat", "none"} and s["policies"]["kat"]["rollouts"] == 12
    assert s["stop_reasons"] == {"eos": 12, "policy": 12}
    # filters reach the summary
    res = invoke("inspect", run, "--json", "--steps", "1:2", "--policy", "none")
    s = json.loads(res.output)
    assert s["rollouts"] == 6 and s["first_step"] == 1 and s["last_step"] == 1


def test_inspect_rollout_terminal(store) -> None:
    run, batches = store
    b = batches[0]
    rid = b["rollout_id"][2]
    res = invoke("inspect", run, "--rollout", rid, "--color")
    assert res.exit_code == 0, res.output
    out = res.output
    assert f"rollout={rid}" in out and f"onset={b['onset'][2]}" in out and f"fire={b['fire'][2]}" in out
    assert "\x1b[48;5;" in out  # tokens carry 256-colour backgrounds
    assert "⟦onset" in out and "⟦fire⟧" in out
    plain = invoke("inspect", run, "--rollout", rid, "--no-color").output
    assert "\x1b[" not in plain
    # every token text appears, in order, between the separators
    body = re.sub(r"⟦[^⟧]*⟧", "", plain.split("\ntokens:\n", 1)[1]).replace("↵\n", "\n")
    tokens = re.split(r"[|¦]", body)[:-1]
    assert tokens == b["token_text"][2]
    # kept tokens end in "|", cut ones (generated, not trained on) in "¦"
    assert body.count("¦") == len(b["token_ids"][2]) - b["kept_len"][2]


def test_inspect_rollout_json(store) -> None:
    run, batches = store
    b = batches[1]
    res = invoke("inspect", run, "--rollout", b["rollout_id"][0], "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["tau"] is None and d["correct"] is None  # NaN tau, ungraded: null in strict JSON
    assert d["token_ids"] == b["token_ids"][0].tolist()
    np.testing.assert_allclose(d["kl"], b["kl"][0])


def test_inspect_html_escapes_and_colours(store, tmp_path: Path) -> None:
    run, batches = store
    b = batches[0]
    out = tmp_path / "r.html"
    res = invoke("inspect", run, "--rollout", b["rollout_id"][1], "--html", out)
    assert res.exit_code == 0, res.output
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<b>" not in page and "&lt;b&gt;&amp;" in page  # the rollout text is escaped
    spans = re.findall(r'<span class="tok(?: cut)?" style="background:(#[0-9a-f]{6});color:#[0-9A-Fa-f]{6}" '
                       r'title="([^"]*)">([^<]*)</span>', page)
    assert len(spans) == len(b["token_ids"][1])
    assert [html_lib.unescape(t).replace("↵\n", "\n") for _, _, t in spans] == b["token_text"][1]
    first_kl = float(re.search(r"KL=([0-9.e+-]+)", html_lib.unescape(spans[0][1])).group(1))
    assert first_kl == pytest.approx(float(b["kl"][1][0]), rel=1e-3)
    # the palette's KL map: higher KL is never lighter (low KL, agreement, is the bright end)
    from kat_diag.views.palette import hex_rgb

    def luma(c: str) -> float:
        r, g, b_ = hex_rgb(c)
        return 0.2126 * r + 0.7152 * g + 0.0722 * b_

    lum = [luma(c) for c, _, _ in spans]
    order = np.argsort(b["kl"][1], kind="stable")
    assert all(lum[order[i]] >= lum[order[i + 1]] - 1e-9 for i in range(len(order) - 1))


def test_inspect_errors(store, tmp_path: Path) -> None:
    run, _ = store
    res = invoke("inspect", tmp_path / "missing")
    assert res.exit_code == 2 and "missing" in res.output
    res = invoke("inspect", run, "--rollout", 123456789)
    assert res.exit_code == 2 and "123456789" in res.output
    res = invoke("inspect", run, "--html", tmp_path / "x.html")
    assert res.exit_code != 0
    res = invoke("inspect", run, "--steps", "a:b")
    assert res.exit_code != 0


def test_inspect_skip_corrupt(tmp_path: Path) -> None:
    write_store(tmp_path, [make_batch(s, 3, seed=s) for s in range(2)])
    (tmp_path / "traces" / "part-r00000-00000001.parquet").write_bytes(b"garbage")
    res = invoke("inspect", tmp_path, "--json")
    assert res.exit_code == 2 and "part-r00000-00000001.parquet" in res.output
    res = invoke("inspect", tmp_path, "--json", "--skip-corrupt")
    assert res.exit_code == 0
    s = json.loads(res.stdout)
    assert "warning: skipping trace file" in res.stderr
    assert s["rollouts"] == 3 and s["skipped_files"][0].endswith("part-r00000-00000001.parquet")


def test_inspect_without_token_text_shows_ids(tmp_path: Path) -> None:
    with TraceWriter(tmp_path, top_n=TOP_N) as w:
        w.append({"step": 0, "prompt_id": "p", "policy": "none", "token_ids": [[7, 8, 9]],
                  "kl": [[0.1, math.nan, 5.0]], "text": "abc"})
    rid = make_rollout_id(0, 0, 0)
    out = invoke("inspect", tmp_path, "--rollout", rid, "--no-color").output
    assert "⟨7⟩|⟨8⟩|⟨9⟩|" in out and "text:\nabc" in out


# ------------------------------------------------------------------------------------------------
# replay


def _synthetic_kl(rng: np.random.Generator) -> np.ndarray:
    """High, noisy KL; in about half the rollouts a long low-KL stretch (a trap) from some point on."""
    n = int(rng.integers(30, 110))
    kl = rng.lognormal(-1.0, 1.0, n)
    if rng.random() < 0.5:
        start = int(rng.integers(5, n - 10))
        kl[start:] = rng.lognormal(-6.0, 0.7, n - start)
    if rng.random() < 0.1:
        kl[int(rng.integers(0, n))] = math.nan  # an unusable value now and then
    return kl.astype(np.float32)


def simulate_online_kat(run: Path, cfg, chunk: int, n_steps: int = 9, per_step: int = 10, seed: int = 0):
    """A KAT run as the online engine does it: per step the KAT policy's threshold in force,
    rollouts generated in lockstep chunk by chunk, a rollout stored up to its fire token (tokens the
    chunk generated after it are discarded), the buffer fed with the stored rollouts' KL."""
    import torch

    from kat_diag.kat.policies import KATPolicy

    rng = np.random.default_rng(seed)
    policy = KATPolicy(cfg)
    taus = {}
    config = {"kat": cfg.to_dict(), "sampling": {"chunk_size": chunk}}
    with TraceWriter(run, top_n=TOP_N, config=config) as w:
        for step in range(n_steps):
            policy.begin_step(step)
            kls = [_synthetic_kl(rng) for _ in range(per_step)]
            lengths = np.array([len(k) for k in kls])
            padded = np.zeros((per_step, lengths.max()), np.float32)
            for i, k in enumerate(kls):
                padded[i, : len(k)] = k
            policy.add_rows(per_step)
            alive = np.ones(per_step, bool)
            for c0 in range(0, int(lengths.max()), chunk):
                pos = np.arange(c0, min(c0 + chunk, int(lengths.max())))
                valid = (pos < lengths[:, None]) & alive[:, None]
                dec = policy.update(torch.from_numpy(np.where(valid, padded[:, pos], 0.0)), torch.from_numpy(valid))
                alive &= ~dec.stop_B.numpy()
            info = policy.row_info()
            end = np.where(info["stopped"].numpy(), info["end"].numpy(), lengths)
            stored = [k[:n] for k, n in zip(kls, end, strict=True)]
            fire, onset, keep = info["fire"].numpy(), info["onset"].numpy(), info["kept"].numpy()
            metrics = policy.end_step(stored)
            taus[step] = metrics["tau"]
            w.append({
                "step": step, "prompt_id": [f"q{i}" for i in range(per_step)], "policy": "kat",
                "tau": metrics["tau"], "onset": onset, "fire": fire, "kept_len": keep,
                "stop_reason": ["policy" if f >= 0 else "eos" for f in fire],
                "token_ids": [np.arange(len(k)) for k in stored], "kl": stored,
            })
            w.flush()
    return taus


def _kat_args(cfg) -> list[str]:
    return ["--window", cfg.window, "--persistence", cfg.persistence, "--min-length", cfg.min_length,
            "--tau-quantile", cfg.tau_quantile, "--warmup-steps", cfg.warmup_steps,
            "--buffer-size", cfg.buffer_size, "--min-fill", cfg.min_fill, "--statistic", cfg.statistic]


@pytest.fixture(scope="module", params=["rollout_min", "windows"])
def kat_run(tmp_path_factory: pytest.TempPathFactory, request):
    from kat_diag.kat.config import KATConfig

    if request.param == "windows":
        cfg = KATConfig(window=4, persistence=3, min_length=8, warmup_steps=2, buffer_size=60, min_fill=1,
                        tau_quantile=0.3, statistic="windows")
    else:
        cfg = KATConfig(window=4, persistence=3, min_length=8, warmup_steps=1, buffer_size=25, min_fill=12,
                        tau_quantile=0.7, statistic="rollout_min")
    run = tmp_path_factory.mktemp("katrun")
    taus = simulate_online_kat(run, cfg, chunk=4)
    return run, cfg, taus


@pytest.mark.parametrize("tau_mode", ["adaptive", "recorded"])
def test_replay_reproduces_online_decisions(kat_run, tau_mode: str, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from kat_diag.traces.reader import TraceReader

    run, cfg, taus = kat_run
    out = tmp_path / "rows.parquet"
    extra = [] if tau_mode == "adaptive" else ["--tau", "recorded"]
    res = invoke("replay", run, *_kat_args(cfg), "--json", "--out", out, *extra)
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    rec = TraceReader(run).read(["fire", "onset", "kept_len", "step", "rollout_id", "gen_len"])
    fired = rec["fire"] >= 0
    assert 0.2 < fired.mean() < 0.9  # the check is not vacuous
    assert r["tau_mode"] == tau_mode and r["rollouts"] == rec.num_rows
    assert r["recorded"] == {"compared": rec.num_rows, "fire_match": 1.0, "onset_match": 1.0}
    assert r["fired_share"] == pytest.approx(fired.mean())
    assert r["mean_onset"] == pytest.approx(rec["onset"][fired].mean())
    assert r["kept_ratio"] == pytest.approx(rec["kept_len"].sum() / rec["gen_len"].sum())
    rows = pq.read_table(out).to_pandas()
    assert rows["rollout_id"].tolist() == rec["rollout_id"].tolist()
    np.testing.assert_array_equal(rows["fire"], rec["fire"])
    np.testing.assert_array_equal(rows["keep"], rec["kept_len"])
    expected_tau = np.array([taus[s] for s in rec["step"]])
    np.testing.assert_array_equal(rows["tau"], expected_tau)  # NaN while inactive, bit-exact after
    first_active = min(s for s, t in taus.items() if not math.isnan(t))
    assert first_active >= cfg.warmup_steps
    assert r["tau"]["steps"] == 9 and r["tau"]["active_steps"] == 9 - first_active


def test_replay_defaults_come_from_the_run_config(kat_run) -> None:
    run, cfg, _ = kat_run
    r = json.loads(invoke("replay", run, "--json").stdout)  # W, T, ... from the manifest
    assert r["kat"] == cfg.to_dict()
    assert r["recorded"]["fire_match"] == 1.0
    # a different detector disagrees with the recording: the match is a real check
    r = json.loads(invoke("replay", run, "--json", "--window", 6, "--tau", "recorded").stdout)
    assert r["recorded"]["fire_match"] < 1.0


def test_replay_under_the_other_statistic_differs(kat_run) -> None:
    run, cfg, _ = kat_run
    other = "windows" if cfg.statistic == "rollout_min" else "rollout_min"
    r = json.loads(invoke("replay", run, "--json", "--statistic", other, "--min-fill", 1).stdout)
    assert r["kat"]["statistic"] == other and r["tau_mode"] == "adaptive"
    assert r["recorded"]["fire_match"] < 1.0


def test_replay_fixed_tau_on_an_opd_store(tmp_path: Path) -> None:
    from kat_diag.kat.config import KATConfig
    from kat_diag.kat.detector import kept_tokens
    from kat_diag.kat.phases import phase_labels, segment
    from kat_diag.kat.replay import replay
    from kat_diag.traces.ragged import Ragged

    rng = np.random.default_rng(3)
    kls = [[_synthetic_kl(rng) for _ in range(8)] for _ in range(4)]
    with TraceWriter(tmp_path, top_n=TOP_N) as w:
        for step, ks in enumerate(kls):
            w.append({"step": step, "prompt_id": "p", "policy": "none",
                      "token_ids": [np.zeros(len(k)) for k in ks], "kl": ks})
    cfg = KATConfig(window=5, persistence=4, min_length=10)
    tau = 0.02
    res = invoke("replay", tmp_path, "--window", 5, "--persistence", 4, "--min-length", 10, "--keep", "onset",
                 "--tau", tau, "--json")
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    flat = Ragged.from_list([k for ks in kls for k in ks], np.float32)
    direct = replay(flat.values, flat.offsets, cfg, tau)
    assert 0 < direct.fired.mean() < 1
    assert r["tau_mode"] == "fixed" and r["tau_value"] == tau
    assert r["fired_share"] == pytest.approx(direct.fired.mean())
    assert r["mean_onset"] == pytest.approx(direct.onset[direct.fired].mean())
    keep = kept_tokens(direct.fire, direct.length, cfg)
    assert r["kept_ratio"] == pytest.approx(keep.sum() / direct.length.sum())
    gen = np.where(direct.fired, direct.fire + 1, direct.length)
    assert r["generated_ratio"] == pytest.approx(gen.sum() / direct.length.sum())
    ph = segment(flat.values, flat.offsets, cfg, tau)
    labels = phase_labels(flat.offsets, ph.pre_end, ph.agree_end)
    ok = np.isfinite(flat.values)
    for i, name in enumerate(["pre", "agreement", "post"]):
        sel = ok & (labels == i)
        assert r["phase_tokens"][name] == int(sel.sum())
        if sel.any():
            assert r["phase_mean_kl"][name] == pytest.approx(flat.values[sel].astype(np.float64).mean())
    assert r["recorded"]["compared"] == 0
    table = invoke("replay", tmp_path, "--window", 5, "--persistence", 4, "--min-length", 10, "--keep", "onset",
                   "--tau", tau)
    assert table.exit_code == 0 and "fired" in table.output and "mean KL agreement" in table.output


def test_replay_bad_options(kat_run) -> None:
    run, _, _ = kat_run
    assert invoke("replay", run, "--tau", "abc").exit_code != 0
    assert invoke("replay", run, "--window", 0).exit_code != 0
    assert invoke("replay", run, "--keep", "middle").exit_code != 0


def test_inspect_marks_phases_of_a_fired_rollout(kat_run) -> None:
    from kat_diag.traces.reader import TraceReader

    run, _, _ = kat_run
    rec = TraceReader(run).read(["rollout_id", "fire", "onset"])
    i = int(np.flatnonzero(rec["fire"] >= 0)[0])
    res = invoke("inspect", run, "--rollout", rec["rollout_id"][i], "--json")
    d = json.loads(res.stdout)
    assert d["phases"]["pre_end"] == rec["onset"][i] and d["phases"]["agree_end"] > rec["fire"][i]
    out = invoke("inspect", run, "--rollout", rec["rollout_id"][i], "--no-color").output
    assert "⟦agreement·onset⟧" in out and "⟦fire⟧" in out
