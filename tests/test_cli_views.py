"""Safe loading (issue 14), trace store settings, inspect views, progress and the CLI surface (issue 12)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from kat_diag.traces.writer import TraceWriter

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def _one_error_line(res) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


SMALL = ["--steps", "2", "--batch-size", "3", "--max-new-tokens", "12", "--chunk-size", "4", "--eval-n", "1",
         "--eval-k", "1", "--device", "cpu", "--window", "4", "--persistence", "2", "--min-length", "4",
         "--kat-warmup", "1", "--buffer-size", "64", "--tau-quantile", "0.6", "--min-fill", "1"]


@pytest.fixture(scope="module")
def run(quick_world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("views") / "kat"
    res = invoke("train", "--teacher", quick_world / "teacher", "--student", quick_world / "student",
                 "--out", out, *SMALL)
    assert res.exit_code == 0, res.output
    json.loads(res.stdout)  # the result on stdout is strict JSON
    return out


# --- issue 14: no code runs from a checkpoint --------------------------------------------------


class _Payload:
    """Unpickling this runs `Path(target).touch()`."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_malicious_trainer_state_is_refused_and_never_runs(run, tmp_path):
    import shutil

    import torch

    victim = tmp_path / "run"
    shutil.copytree(run, victim)
    cfg = json.loads((victim / "config.json").read_text())
    (victim / "config.json").write_text(json.dumps({**cfg, "out": str(victim)}))
    marker = tmp_path / "pwned"
    state = sorted((victim / "checkpoints").glob("step-*"))[-1] / "trainer_state.pt"
    torch.save({"step": 1, "optimizer": _Payload(marker)}, state)
    res = invoke("train", "--out", victim, "--resume", "--steps", "3")
    line = _one_error_line(res)
    assert f"refusing to load {state}" in line and "python -m kat_diag.opd.checkpoint convert" in line
    assert not marker.exists()
    # the explicit, trusted conversion is the only way such a file is unpickled
    from kat_diag.opd.checkpoint import load_state, main

    assert main(["convert", str(state)]) == 2 and not marker.exists()  # needs --trust
    torch.save({"step": 1, "extra": np.arange(3)}, state)  # an old-style state with a numpy array
    with pytest.raises(ValueError, match="refusing to load"):
        load_state(state)
    assert main(["convert", str(state), "--trust"]) == 0
    assert load_state(state)["extra"].tolist() == [0, 1, 2]


def test_current_checkpoints_load_weights_only(run):
    import torch

    state = sorted((run / "checkpoints").glob("step-*"))[-1] / "trainer_state.pt"
    s = torch.load(state, weights_only=True)
    assert s["step"] == 1 and "optimizer" in s and "policy" in s and isinstance(s["torch_rng"], torch.Tensor)


def test_remote_code_is_off_unless_asked(quick_world, monkeypatch):
    import transformers

    seen = []

    class Fake:
        @staticmethod
        def from_pretrained(path, **kw):
            seen.append(kw.get("trust_remote_code"))
            raise RuntimeError("stop here")

    monkeypatch.setattr(transformers, "AutoModelForCausalLM", Fake)
    from kat_diag.models import load_model

    for flag in (False, True):
        with pytest.raises(RuntimeError):
            load_model(quick_world / "student", trust_remote_code=flag)
    assert seen == [False, True]
    cfg = json.loads(invoke("train", "--print-config").stdout)
    assert cfg["trust_remote_code"] is False
    assert json.loads(invoke("train", "--trust-remote-code", "--print-config").stdout)["trust_remote_code"] is True


HOSTILE = "<script>alert(1)</script>\x1b[2J\x1b]0;owned\x07\x1b[31m\u202e"


def _hostile_store(path: Path) -> int:
    with TraceWriter(path, top_n=2, config={"kat": {"window": 2, "persistence": 1, "min_length": 1}}) as w:
        w.append({"step": 0, "prompt_id": HOSTILE, "policy": HOSTILE, "stop_reason": HOSTILE, "text": HOSTILE,
                  "token_ids": [np.arange(4)], "kl": [np.array([0.1, 0.01, 0.02, 3.0], np.float32)],
                  "token_text": [[HOSTILE, "a", "<b>", "\x1b[0m"]], "tau": 0.05, "kept_len": 2})
    from kat_diag.traces.reader import TraceReader

    return int(TraceReader(path).read(columns=["rollout_id"])["rollout_id"][0])


def test_html_and_terminal_views_render_hostile_text_inertly(tmp_path):
    rid = _hostile_store(tmp_path)
    page = tmp_path / "r.html"
    assert invoke("inspect", tmp_path, "--rollout", rid, "--html", page).exit_code == 0
    html = page.read_text()
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<b>" not in html and "\x1b" not in html
    for args in (["--color"], ["--no-color"], ["--list"], []):
        res = invoke("inspect", tmp_path, *(["--rollout", rid] if args[:1] != ["--list"] and args else []), *args)
        assert res.exit_code == 0, res.output
        # the only escape sequences are our own SGR colour codes; none from the store
        assert re.sub(r"\x1b\[[0-9;]*m", "", res.stdout).count("\x1b") == 0
        assert "\x1b[2J" not in res.stdout and "\x1b]0;" not in res.stdout and "\u202e" not in res.stdout
        assert "\x07" not in res.stdout
    colored = invoke("inspect", tmp_path, "--rollout", rid, "--color").stdout
    assert "\\x1b[2J" in colored  # shown, escaped


# --- item 3: KAT settings of a store -----------------------------------------------------------


def test_deleted_manifest_falls_back_to_config_json_else_refuses(run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "traces" / "_manifest.json").unlink()
    res = invoke("replay", copy, "--json")
    assert res.exit_code == 0, res.output
    kat = json.loads(res.stdout)["kat"]
    assert kat["window"] == 4 and kat["persistence"] == 2 and kat["tau_quantile"] == 0.6  # the run's, not defaults
    (copy / "config.json").unlink()
    line = _one_error_line(invoke("replay", copy, "--json"))
    assert "no KAT settings for this store" in line and "config.json" in line and "--window" in line
    assert invoke("replay", copy, "--tau", "0.1", "--window", 4, "--persistence", 2, "--min-length", 4,
                  "--keep", "onset", "--json").exit_code == 0


# --- item 7: inspect ---------------------------------------------------------------------------


def test_inspect_list_and_rollout_view(run, quick_world):
    res = invoke("inspect", run, "--list", "--json")
    rows = json.loads(res.stdout)
    assert len(rows) == 6 and {r["step"] for r in rows} == {0, 1}
    assert set(rows[0]) >= {"rollout_id", "step", "prompt_id", "correct", "gen_len", "kept_len", "fire"}
    text = invoke("inspect", run, "--list").stdout
    from kat_diag.world.paths import load_world_splits

    problems = {p.id: p for ps in load_world_splits(quick_world).values() for p in ps}
    first = problems[rows[0]["prompt_id"]]
    assert f"{first.id}: {' '.join(first.prompt.split())}" in text
    view = invoke("inspect", run, "--rollout", rows[0]["rollout_id"], "--no-color").stdout
    assert f"prompt text={first.prompt.strip()}" in view
    assert f"expected={first.answer}" in view
    d = json.loads(invoke("inspect", run, "--rollout", rows[0]["rollout_id"], "--json").stdout)
    alts = d["teacher_top_text"]
    assert len(alts) == len(d["token_ids"]) and all(isinstance(t, str) for t in alts[0])
    from kat_diag.models import load_tokenizer

    tok = load_tokenizer(quick_world / "student")
    assert alts[0][0] == tok.decode([d["teacher_top_ids"][0][0]])


def test_summary_stop_column_counts_every_policy_stop(tmp_path):
    with TraceWriter(tmp_path, config={"kat": {}}) as w:
        w.append({"step": 0, "prompt_id": "p", "policy": "prefix", "stop_reason": ["policy", "eos"],
                  "fire": [-1, -1], "token_ids": [np.zeros(4), np.zeros(3)],
                  "kl": [np.ones(4, np.float32), np.ones(3, np.float32)]})
    s = json.loads(invoke("inspect", tmp_path, "--json").stdout)
    assert s["stopped_share"] == 0.5 and s["fired_share"] == 0.0
    table = invoke("inspect", tmp_path).stdout
    assert re.search(r"prefix\s+2\s+7\s+0\.\.0 \(1\)\s+50\.0%", table), table


# --- items 5 and 6: CLI surface, progress ------------------------------------------------------


def test_version_and_usage_errors():
    import kat_diag

    res = invoke("--version")
    assert res.exit_code == 0 and res.stdout.strip() == f"kat-diag {kat_diag.__version__}"
    assert "--k" in _one_error_line(invoke("world", "eval", "--k", "-1"))
    assert "-1" in _one_error_line(invoke("world", "eval", "--k", "-1"))
    assert "--n" in _one_error_line(invoke("demo", "--n", "-1"))
    assert "No such option" in _one_error_line(invoke("train", "--bogus"))


def test_world_build_never_overwrites_the_committed_world(tmp_path):
    from cli.common import WORLD_DIR

    before = (WORLD_DIR / "world.json").stat().st_mtime_ns
    line = _one_error_line(invoke("world", "build", "--quick"))
    assert "needs --out DIR" in line and "--force" in line
    w = tmp_path / "w"
    w.mkdir()
    (w / "world.json").write_text("{}")
    assert "already holds a world" in _one_error_line(invoke("world", "build", "--quick", "--out", w))
    assert (WORLD_DIR / "world.json").stat().st_mtime_ns == before


def test_world_eval_json_is_strict_json_on_stdout(quick_world):
    res = invoke("world", "eval", "--world", quick_world, "--n", "2", "--k", "1", "--max-new-tokens", "8", "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert set(d) == {"teacher", "student"} and "ops2" in d["teacher"]
    assert "world eval" in res.stderr  # the progress bar goes to stderr
    for role in d:
        rates = [d[role][s]["loop/ln"] for s in ("ops2", "ops3", "ops4", "ops5")]
        assert all(0 < r < 1 for r in rates) and d[role]["mean"]["loop/ln"] == pytest.approx(sum(rates) / 4)


def test_world_eval_table_has_every_metric_row(quick_world):
    res = invoke("world", "eval", "--world", quick_world, "--n", "2", "--k", "1", "--max-new-tokens", "8")
    assert res.exit_code == 0, res.output
    rows = [line.split()[:2] for line in res.stdout.splitlines()[2:]]
    assert rows == [[r, m] for r in ("teacher", "student") for m in ("greedy", "avg@1", "pass@1", "loop/ln")]


def test_progress_in_a_log_is_a_few_lines():
    from kat_diag.run.progress import bar

    log = io.StringIO()  # not a terminal
    for _ in bar(range(20000), desc="x", file=log):
        pass
    refreshes = [s for s in re.split(r"[\r\n]", log.getvalue()) if s.strip()]
    assert 1 <= len(refreshes) <= 3 and "20000/20000" in refreshes[-1]
