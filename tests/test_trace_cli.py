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
from kat_diag.traces import TraceWriter, make_rollout_id

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
    assert "policy" in out and "fired" in out and "mean onset" in out
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
    tokens = re.sub(r"⟦[^⟧]*⟧", "", plain.split("\n\n", 1)[1]).replace("↵\n", "\n").split("|")[:-1]
    assert tokens == b["token_text"][2]


def test_inspect_rollout_json(store) -> None:
    run, batches = store
    b = batches[1]
    res = invoke("inspect", run, "--rollout", b["rollout_id"][0], "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
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
    spans = re.findall(r'<span class="tok" style="background:(#[0-9a-f]{6});color:#[0-9a-f]{3}" '
                       r'title="([^"]*)">([^<]*)</span>', page)
    assert len(spans) == len(b["token_ids"][1])
    assert [html_lib.unescape(t).replace("↵\n", "\n") for _, _, t in spans] == b["token_text"][1]
    first_kl = float(re.search(r"KL=([0-9.e+-]+)", html_lib.unescape(spans[0][1])).group(1))
    assert first_kl == pytest.approx(float(b["kl"][1][0]), rel=1e-3)
    # higher KL never gets a colour from lower on the ramp
    from kat_diag.trace_view import ANSI_RAMP, ansi_rgb

    ramp = ["#{:02x}{:02x}{:02x}".format(*ansi_rgb(i)) for i in ANSI_RAMP]
    pos = [ramp.index(c) for c, _, _ in spans]
    order = np.argsort(b["kl"][1], kind="stable")
    assert all(pos[order[i]] <= pos[order[i + 1]] for i in range(len(order) - 1))


def test_inspect_errors(store, tmp_path: Path) -> None:
    run, _ = store
    res = invoke("inspect", tmp_path / "missing")
    assert res.exit_code == 1 and "missing" in res.output
    res = invoke("inspect", run, "--rollout", 123456789)
    assert res.exit_code == 1 and "123456789" in res.output
    res = invoke("inspect", run, "--html", tmp_path / "x.html")
    assert res.exit_code != 0
    res = invoke("inspect", run, "--steps", "a:b")
    assert res.exit_code != 0


def test_inspect_skip_corrupt(tmp_path: Path) -> None:
    write_store(tmp_path, [make_batch(s, 3, seed=s) for s in range(2)])
    (tmp_path / "traces" / "part-r00000-00000001.parquet").write_bytes(b"garbage")
    res = invoke("inspect", tmp_path, "--json")
    assert res.exit_code == 1 and "part-r00000-00000001.parquet" in res.output
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
