"""`kat-diag score`: another trainer's completions rescored teacher-forced into a full trace store.

Tiers: the store reproduces the rollout engine's online numbers (`kat-diag record`) for the same
rollouts given as text; verl's rollout dump goes through `score` with a field mapping; every rollout
is scored by the student of its step; a crash loses at most the batch in flight and `--resume`
finishes the store; bad input is a one-line error naming row and field and leaves nothing behind.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import kat_diag.opd.score as score_mod
from cli.main import app
from kat_diag.analysis.trap import trap_report
from kat_diag.kat.config import KATConfig
from kat_diag.opd.score import ScoreConfig, parse_students, score
from kat_diag.traces import TraceReader

REPO = Path(__file__).resolve().parent.parent
DISCRETE = ("rollouts", "accuracy", "mean_length", "fire_rate", "fire_rate_right", "fire_rate_wrong", "cut_share",
            "not_generated_share", "low_span_right", "low_span_wrong", "loop_share", "loop_share_of_wrong")


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def _foreign_runs():
    spec = importlib.util.spec_from_file_location("foreign_runs", REPO / "examples" / "foreign_runs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def recorded(quick_world, tmp_path_factory) -> Path:
    from kat_diag.opd.config import SamplingConfig
    from kat_diag.opd.record import RecordConfig, record

    out = tmp_path_factory.mktemp("rec") / "rec"
    record(RecordConfig(teacher=str(quick_world / "teacher"), student=str(quick_world / "student"), out=str(out),
                        n_prompts=16, batch_size=16, sampling=SamplingConfig(max_new_tokens=48, chunk_size=8),
                        progress=False))
    return out


@pytest.fixture(scope="module")
def rows(recorded, quick_world) -> list[dict]:
    return _foreign_runs().rows_of_store(recorded, quick_world)


def _cfg(world: Path, completions: Path, out: Path, **kw) -> ScoreConfig:
    return ScoreConfig(completions=str(completions), teacher=str(world / "teacher"),
                       students=((0, str(world / "student")),), out=str(out), progress=False, **kw)


def _by_id(run: Path):
    b = TraceReader(run).read()
    return b, np.argsort(b["rollout_id"], kind="stable")


def test_parse_students():
    assert parse_students(["ckpt"]) == ((0, "ckpt"),)
    assert parse_students(["100=late", "0=early"]) == ((0, "early"), (100, "late"))
    with pytest.raises(ValueError, match="STEP=PATH"):
        parse_students(["a", "100=b"])
    with pytest.raises(ValueError, match="same step"):
        parse_students(["5=a", "5=b"])


def _lossless_text(ids: np.ndarray) -> bool:
    """Decoded text gives these ids back: no <pad> (0) or <unk> (2), EOS (1) only at the end. The quick
    world's student is nearly random and samples special tokens, which decoding drops."""
    return not np.isin(ids, [0, 2]).any() and not (ids[:-1] == 1).any()


def _ids_rows(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps({"prompt_ids": [int(t) for t in r["prompt_ids"]], "step": r["step"],
                                        "completion_ids": [int(t) for t in r["token_ids"]],
                                        "prompt_id": r["prompt_id"],
                                        "stop_reason": "stop" if r["eos"] else "length"}) + "\n" for r in rows))
    return path


def test_completions_reproduce_the_recorded_store(recorded, rows, quick_world, tmp_path):
    # Token ids: lossless, so every rollout must come back with the engine's online numbers.
    res = score(_cfg(quick_world, _ids_rows(rows, tmp_path / "ids.jsonl"), tmp_path / "ids", data="world",
                     batch_size=5, micro_batch=2))
    assert res["rollouts"] == 16 and res["scored_now"] == 16
    a, ia = _by_id(recorded)
    b, ib = _by_id(tmp_path / "ids")
    assert np.array_equal(a["rollout_id"][ia], b["rollout_id"][ib])
    for x, y in zip(ia, ib, strict=True):
        assert np.array_equal(a["token_ids"][x], b["token_ids"][y])
        np.testing.assert_allclose(b["kl"][y], a["kl"][x], atol=1e-4, rtol=1e-5)
        np.testing.assert_allclose(b["student_logprob"][y], a["student_logprob"][x], atol=1e-4)
        np.testing.assert_allclose(b["teacher_top_probs"][y], a["teacher_top_probs"][x], atol=1e-5)
    for col in ("step", "prompt_id", "correct", "first_error", "loop_start", "verdict", "stop_reason", "text"):
        assert list(a[col][ia]) == list(b[col][ib]), col
    # Text only (prompt, completion) plus vLLM's finish_reason, which restores the EOS the text lost:
    # the same, for every rollout whose text is lossless
    comp = _foreign_runs().write_completions(rows, tmp_path / "completions.jsonl")
    score(_cfg(quick_world, comp, tmp_path / "text", data="world", fields=(("stop_reason", "finish_reason"),),
               batch_size=5, micro_batch=2))
    t, it = _by_id(tmp_path / "text")
    lossless = 0
    for x, y in zip(ia, it, strict=True):
        if _lossless_text(a["token_ids"][x]):
            lossless += 1
            assert np.array_equal(a["token_ids"][x], t["token_ids"][y])
            np.testing.assert_allclose(t["kl"][y], a["kl"][x], atol=1e-4, rtol=1e-5)
            assert (a["correct"][x], a["verdict"][x]) == (t["correct"][y], t["verdict"][y])
        else:
            assert not np.array_equal(a["token_ids"][x], t["token_ids"][y])
    assert lossless >= 3
    cfg = KATConfig(window=4, persistence=2, min_length=8, warmup_steps=0, min_fill=4)
    ra, rb = trap_report(recorded, cfg), trap_report(tmp_path / "ids", cfg)
    assert json.dumps({k: ra[k] for k in DISCRETE}) == json.dumps({k: rb[k] for k in DISCRETE})  # NaN == NaN
    for k in ("tau", "min_mean_right", "min_mean_wrong"):  # continuous: equal to fp32 noise
        assert rb[k] == pytest.approx(ra[k], rel=1e-4, nan_ok=True)
    manifest = TraceReader(tmp_path / "ids").manifest
    assert manifest["kl_source"] == "full" and manifest["config"]["kind"] == "score"
    assert not (tmp_path / "ids" / "traces_partial").exists()


def test_a_verl_rollout_dump_through_the_cli(recorded, rows, quick_world, tmp_path):
    # Layout: verl's RayPPOTrainer._dump_generations into trainer.rollout_data_dir: one {global_step}.jsonl per
    # step, one line per sample: input / output (decoded with skip_special_tokens, so no EOS), gts, score, step.
    fr = _foreign_runs()
    files = fr.write_verl_dump([{**r, "step": i % 2} for i, r in enumerate(rows)], tmp_path / "verl")
    assert [f.name for f in files] == ["0.jsonl", "1.jsonl"]
    line = json.loads(files[0].read_text().splitlines()[0])
    assert set(line) == {"input", "output", "gts", "score", "step"}
    res = invoke("score", tmp_path / "verl", "--teacher", quick_world / "teacher", "--student",
                 quick_world / "student", "--out", tmp_path / "v", "--field", "prompt=input", "--field",
                 "completion=output", "--field", "correct=score", "--field", "answer=gts", "--no-progress")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["rollouts"] == 16
    a, _ = _by_id(recorded)
    b = TraceReader(tmp_path / "v").read()
    by_text = {}
    for i in range(a.num_rows):
        by_text.setdefault(a["text"][i], i)
    eos, lossless = 1, 0
    for j in range(b.num_rows):  # matched by text: verl's dump has no rollout ids
        i = by_text[b["text"][j]]
        assert b["correct"][j] == a["correct"][i]
        ta = a["token_ids"][i]
        if not _lossless_text(ta):
            continue
        lossless += 1
        ta = ta[:-1] if len(ta) and ta[-1] == eos else ta  # the dump's text lost the EOS
        assert np.array_equal(b["token_ids"][j], ta)
        np.testing.assert_allclose(b["kl"][j], a["kl"][i][: len(ta)], atol=1e-4, rtol=1e-5)
    assert lossless >= 3
    assert sorted(set(b["step"].tolist())) == [0, 1]
    assert set(b["verdict"].tolist()) == {None}  # no --data: no world ground truth
    same_prompt = {}
    for pid, text in zip(b["prompt_id"], b["text"], strict=True):
        same_prompt.setdefault(pid, []).append(text)
    assert len(same_prompt) == len({r["prompt"] for r in rows})  # one id per distinct prompt


def test_every_step_is_scored_by_its_own_student(rows, quick_world, tmp_path):
    fr = _foreign_runs()
    both = [{**r, "step": 0} for r in rows[:4]] + [{**r, "step": 7} for r in rows[:4]]
    comp = fr.write_completions(both, tmp_path / "c.jsonl")
    # the teacher as the student of step >= 5: its rows must have KL exactly 0 (the same model twice)
    cfg = _cfg(quick_world, comp, tmp_path / "s", fields=(("stop_reason", "finish_reason"),))
    cfg = ScoreConfig(**{**cfg.__dict__, "students": ((0, str(quick_world / "student")),
                                                      (5, str(quick_world / "teacher")))})
    score(cfg)
    b = TraceReader(tmp_path / "s").read()
    late = b["step"] == 7
    assert late.sum() == 4
    for i in range(b.num_rows):
        if late[i]:
            assert np.all(b["kl"][i] == 0) and len(b["kl"][i]) > 0
        else:
            assert np.nanmax(b["kl"][i]) > 0
    bad = _cfg(quick_world, comp, tmp_path / "t", fields=(("stop_reason", "finish_reason"),))
    bad = ScoreConfig(**{**bad.__dict__, "students": ((3, str(quick_world / "student")),)})
    with pytest.raises(ValueError, match=r"c\.jsonl:1: field 'step' 0 is before the first --student step 3"):
        score(bad)
    assert not (tmp_path / "t").exists()


def test_a_crash_loses_at_most_one_batch_and_resume_finishes(rows, quick_world, tmp_path, monkeypatch):
    comp = _foreign_runs().write_completions(rows, tmp_path / "c.jsonl")
    cfg = _cfg(quick_world, comp, tmp_path / "s", fields=(("stop_reason", "finish_reason"),), batch_size=4)
    score(_cfg(quick_world, comp, tmp_path / "ref", fields=(("stop_reason", "finish_reason"),), batch_size=4))
    real, calls = score_mod._score_batch, []

    def crash_on_second(*args, **kw):
        if calls:
            raise KeyboardInterrupt  # killed while the second batch is in flight
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(score_mod, "_score_batch", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        score(cfg)
    assert not (tmp_path / "s" / "traces").exists()  # nothing partial looks complete
    assert TraceReader(tmp_path / "s" / "traces_partial").num_rows == 4
    monkeypatch.setattr(score_mod, "_score_batch", real)
    rerun = invoke("score", comp, "--teacher", quick_world / "teacher", "--student", quick_world / "student",
                   "--out", tmp_path / "s", "--field", "stop_reason=finish_reason", "--batch-size", "4",
                   "--no-progress")
    assert rerun.exit_code == 2 and "--overwrite" in rerun.output
    other = invoke("score", comp, "--teacher", quick_world / "teacher", "--student", quick_world / "student",
                   "--out", tmp_path / "s", "--field", "stop_reason=finish_reason", "--top-n", "3", "--resume",
                   "--no-progress")
    assert other.exit_code == 2 and "--resume: top_n is 3 but the run" in other.output
    res = invoke("score", comp, "--teacher", quick_world / "teacher", "--student", quick_world / "student",
                 "--out", tmp_path / "s", "--field", "stop_reason=finish_reason", "--batch-size", "4", "--resume",
                 "--no-progress")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["scored_now"] == 12
    a, ia = _by_id(tmp_path / "ref")
    b, ib = _by_id(tmp_path / "s")
    assert np.array_equal(a["rollout_id"][ia], b["rollout_id"][ib])
    for x, y in zip(ia, ib, strict=True):
        assert np.array_equal(a["kl"][x], b["kl"][y])
    again = invoke("score", comp, "--teacher", quick_world / "teacher", "--student", quick_world / "student",
                   "--out", tmp_path / "s", "--field", "stop_reason=finish_reason", "--resume", "--no-progress")
    assert again.exit_code == 2 and "nothing to resume" in again.output


def _one_error(res) -> str:
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


def test_bad_input_is_one_line_naming_row_and_field_and_leaves_nothing(quick_world, tmp_path):
    def run(rows: list[dict], *extra: object, student: Path | None = None):
        f = tmp_path / "in.jsonl"
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
        shutil.rmtree(tmp_path / "o", ignore_errors=True)
        res = invoke("score", f, "--teacher", quick_world / "teacher", "--student", student or quick_world / "student",
                     "--out", tmp_path / "o", "--no-progress", *extra)
        line = _one_error(res)
        assert not (tmp_path / "o").exists()  # no store, no partial store, no config
        return line

    ok = {"prompt": "12 +03\n", "completion": "12+03=15\n#15"}
    assert f"{tmp_path / 'in.jsonl'}:2: missing field 'completion'" in run([ok, {"prompt": "1 +1\n"}])
    assert "(file field 'output')" in run([ok], "--field", "completion=output")
    line = run([ok, {"prompt": "12 +03\n", "completion_ids": [4, 5, 5000]}])
    assert ":2: field 'completion_ids'[2] = 5000 is outside the vocabulary" in line
    line = run([{"prompt": "12 +03\n", "completion": "1" * 600}])
    assert ":1: prompt + completion = 7 + 600 tokens, longer than the models' context (512" in line
    line = run([{"prompt": [{"role": "user", "content": "12 +03\n"}], "completion": "x"}])
    assert ":1: field 'prompt' needs a chat template, but the student tokenizer has none" in line
    assert "is a list of chat messages but --chat-template is off" in run(
        [{"prompt": [{"role": "user", "content": "1"}], "completion": "x"}], "--chat-template", "off")
    assert ":1: field 'step' must be an integer >= 0" in run([{**ok, "step": "five"}])
    assert "neither its prompt text is a problem of --data world" in run([{**ok, "prompt": "nope\n"}], "--data",
                                                                         "world")
    assert "--field: unknown field(s) ['bogus']" in run([ok], "--field", "bogus=x")
    # a student whose tokenizer maps two tokens the other way round
    other = tmp_path / "other_student"
    shutil.copytree(quick_world / "student", other)
    tj = json.loads((other / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    vocab["0"], vocab["1"] = vocab["1"], vocab["0"]
    (other / "tokenizer.json").write_text(json.dumps(tj))
    assert "tokenizer mismatch" in run([ok], student=other)


def test_chat_messages_get_the_student_tokenizers_template(quick_world, tmp_path):
    student = tmp_path / "chat_student"
    shutil.copytree(quick_world / "student", student)
    tc = json.loads((student / "tokenizer_config.json").read_text())
    tc["chat_template"] = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                           "{% if add_generation_prompt %}={% endif %}")
    (student / "tokenizer_config.json").write_text(json.dumps(tc))
    rows = [{"prompt": [{"role": "user", "content": "12 +03\n"}], "completion": "12+03=15\n#15", "step": 0},
            {"prompt": "12 +03\n=", "completion": "12+03=15\n#15", "step": 1},
            {"prompt": "12 +03\n", "completion": "12+03=15\n#15", "step": 2}]
    f = tmp_path / "c.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = ScoreConfig(completions=str(f), teacher=str(quick_world / "teacher"), students=((0, str(student)),),
                      out=str(tmp_path / "s"), progress=False)
    score(cfg)
    b = TraceReader(tmp_path / "s").read()
    kl = {int(s): b["kl"][i] for i, s in enumerate(b["step"])}
    np.testing.assert_allclose(kl[0], kl[1], atol=1e-6)  # messages -> the template's text
    assert not np.allclose(kl[0], kl[2], atol=1e-4)  # a text prompt is used as is (TRL's rule)
    on = ScoreConfig(**{**cfg.__dict__, "out": str(tmp_path / "on"), "chat_template": "on"})
    score(on)
    b2 = TraceReader(tmp_path / "on").read()
    kl2 = {int(s): b2["kl"][i] for i, s in enumerate(b2["step"])}
    np.testing.assert_allclose(kl2[2], kl[0], atol=1e-6)  # --chat-template on: a text prompt is one user message
