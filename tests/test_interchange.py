"""The trace interchange format (`kat_diag.traces.interchange`, `kat-diag traces import|export`).

Tiers: the k1 / k3 estimators against their formulas and against the exact KL by Monte Carlo; a
store exported and imported again is the same store (every column, the manifest, trap and phase
numbers); malformed rows are one-line errors naming the line and field and leave no store; a per-token
k1 log in tinker-cookbook's Datum layout goes through import, heatmap, phases, trap and inspect.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_score import _foreign_runs  # examples/foreign_runs.py as a module
from typer.testing import CliRunner

from cli.main import app
from kat_diag.analysis.phase_stats import run_phases
from kat_diag.analysis.trap import trap_report
from kat_diag.kat.config import KATConfig
from kat_diag.traces import TraceReader, TraceStoreError, TraceWriter
from kat_diag.traces.interchange import FORMAT_NAME, export_store, import_file, k1, k3, read_header

CFG = KATConfig(window=4, persistence=2, min_length=4, warmup_steps=0, min_fill=1)


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])




# ------------------------------------------------------------------------------------------- estimators


def test_k1_and_k3_are_the_formulas_and_k3_matches_verl():
    s = np.array([-0.1, -2.0, -30.0, -1e-3, -5.0])
    t = np.array([-0.3, -0.5, -0.2, -40.0, -5.0])
    assert np.allclose(k1(s, t), s - t)
    # verl core_algos.kl_penalty("low_var_kl"): kl = ref - logprob, clamp(-20, 20), exp(kl) - kl - 1, clamp(-10, 10)
    d = np.clip(t - s, -20, 20)
    assert np.allclose(k3(s, t), np.clip(np.exp(d) - d - 1, -10, 10))
    assert k3(s, t)[2] == 10.0  # exp(20) - 21: clamped at 10 as verl does
    assert (k3(s, t) >= 0).all() and k3(s, t)[-1] == 0.0


def test_k1_and_k3_are_unbiased_for_the_reverse_kl_by_monte_carlo():
    rng = np.random.default_rng(0)
    p_s = np.array([0.5, 0.3, 0.15, 0.05])
    p_t = np.array([0.4, 0.4, 0.1, 0.1])
    exact = float((p_s * np.log(p_s / p_t)).sum())
    y = rng.choice(4, size=400_000, p=p_s)  # y ~ p_s: the student's own samples, as in OPD
    s, t = np.log(p_s[y]), np.log(p_t[y])
    assert k1(s, t).mean() == pytest.approx(exact, rel=0.05)
    assert k3(s, t).mean() == pytest.approx(exact, rel=0.05)
    assert k3(s, t).std() < k1(s, t).std()  # the low-variance one


# ------------------------------------------------------------------------------------------- round trip


def _synthetic_store(run: Path, top_n: int = 3, nulls: bool = True) -> None:
    """Two ranks, three steps, every column filled, with NaN taus and NaN KL; with ``nulls`` also ungraded
    rows and rows without ground truth (which `trap` refuses)."""
    rng = np.random.default_rng(1)
    for rank in (0, 1):
        with TraceWriter(run, rank=rank, config={"kat": CFG.to_dict(), "note": "synthetic"}, top_n=top_n) as w:
            for step in range(3):
                n = 4
                lengths = rng.integers(0, 40, size=n)
                lengths[0] = 0  # an empty rollout
                ids = [rng.integers(0, 50, size=k).astype(np.int32) for k in lengths]
                f = [rng.standard_normal(k).astype(np.float32) for k in lengths]
                kl = [np.abs(x) * 0.1 for x in f]
                kl[1 % n][:3] = np.nan  # NaN KL survives the round trip (JSON null)
                w.append({
                    "step": step, "prompt_id": [f"p{i}" for i in range(n)], "policy": "kat",
                    "tau": [np.nan, 0.05, 0.1, 0.2], "onset": [-1, 3, -1, 5], "fire": [-1, 9, -1, 12],
                    "stop_reason": ["eos", "policy", "max_len", "eos"], "kept_len": list(lengths),
                    "text": [f"text {i} é" for i in range(n)],
                    "correct": [None if nulls else False, True, False, True],
                    "first_error": [-1, -1, 4, 2] if step or not nulls else [None] * n,
                    "loop_start": [-1, -1, -1, 7] if step or not nulls else [None] * n,
                    "verdict": ["wrong", "right", "wrong", "loop"] if step or not nulls else [None] * n,
                    "token_ids": ids, "kl": kl, "student_logprob": [-np.abs(x) for x in f],
                    "teacher_logprob": [-np.abs(x) * 2 for x in f], "student_entropy": [np.abs(x) + 1 for x in f],
                    "teacher_top_ids": [rng.integers(0, 50, size=(k, top_n)).astype(np.int32) for k in lengths],
                    "teacher_top_probs": [rng.random((k, top_n)).astype(np.float32) for k in lengths],
                    "token_text": [None if i == 2 else [f"t{j}" for j in range(k)] for i, k in enumerate(lengths)],
                })


def _columns(run: Path) -> dict[str, list]:
    b = TraceReader(run).read()
    order = np.argsort(b["rollout_id"])
    out = {}
    for c in b:
        col = b[c]
        out[c] = [np.asarray(col[i]) for i in order] if hasattr(col, "offsets") else list(np.asarray(col)[order])
    return out


def _same(a: dict[str, list], b: dict[str, list], skip: tuple[str, ...] = ()) -> None:
    for c in a:
        if c in skip:
            continue
        for x, y in zip(a[c], b[c], strict=True):
            if isinstance(x, np.ndarray) and x.dtype.kind == "f":
                assert np.array_equal(x, y, equal_nan=True), c
            elif isinstance(x, float) and np.isnan(x):
                assert np.isnan(y), c
            else:
                assert np.array_equal(np.asarray(x, dtype=object), np.asarray(y, dtype=object)), c


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_export_then_import_is_the_same_store(tmp_path, suffix):
    _synthetic_store(tmp_path / "a")
    res = export_store(TraceReader(tmp_path / "a"), tmp_path / f"x{suffix}")
    assert res["rollouts"] == 24 and read_header(tmp_path / f"x{suffix}")["format"] == FORMAT_NAME
    out = import_file(tmp_path / f"x{suffix}", tmp_path / "b")
    assert out["rollouts"] == 24 and out["kl_source"] == "full" and out["top_n"] == 3
    a, b = TraceReader(tmp_path / "a"), TraceReader(tmp_path / "b")
    assert b.config == a.config and b.kl_source == "full" and b.top_n == 3 and b.manifest["run"] == "a"
    _same(_columns(tmp_path / "a"), _columns(tmp_path / "b"))
    assert not (tmp_path / "b" / "traces_partial").exists()
    pa_ = run_phases(tmp_path / "a", tmp_path / "ph", cfg=CFG)
    pb_ = run_phases(tmp_path / "b", tmp_path / "ph", cfg=CFG)
    assert json.dumps(pa_) == json.dumps(pb_)
    # trap needs every rollout graded and ground truth on all or none: a store without nulls
    _synthetic_store(tmp_path / "g", nulls=False)
    export_store(TraceReader(tmp_path / "g"), tmp_path / f"g{suffix}")
    import_file(tmp_path / f"g{suffix}", tmp_path / "h")
    rep = trap_report(tmp_path / "g", CFG)
    assert rep["fire_rate"] > 0 and json.dumps(rep) == json.dumps(trap_report(tmp_path / "h", CFG))


def test_cli_round_trip_keeps_phases_and_trap_json(tmp_path):
    _synthetic_store(tmp_path / "a", nulls=False)
    assert invoke("traces", "export", tmp_path / "a", "--out", tmp_path / "x.jsonl", "--no-progress").exit_code == 0
    res = invoke("traces", "import", tmp_path / "x.jsonl", "--out", tmp_path / "b", "--no-progress")
    assert res.exit_code == 0, res.output
    outs = {}
    for run in ("a", "b"):
        trap = invoke("trap", tmp_path / run, "--window", "4", "--persistence", "2", "--min-length", "4",
                      "--min-fill", "1", "--warmup-steps", "0", "--json")
        phases = invoke("phases", tmp_path / run, "--out", tmp_path / "ph", "--json")
        assert trap.exit_code == 0 and phases.exit_code == 0, trap.output + phases.output
        outs[run] = (trap.stdout, phases.stdout)
    assert outs["a"] == outs["b"]
    assert json.loads(outs["a"][0])["kl_source"] == "full"
    again = invoke("traces", "export", tmp_path / "a", "--out", tmp_path / "x.jsonl")
    assert again.exit_code == 2 and "--overwrite" in again.output


# ------------------------------------------------------------------------------------------- kl_source


def test_kl_source_in_the_manifest_and_old_stores_read_as_full(tmp_path):
    _synthetic_store(tmp_path / "a")
    manifest = tmp_path / "a" / "traces" / "_manifest.json"
    assert json.loads(manifest.read_text())["kl_source"] == "full"
    data = json.loads(manifest.read_text())
    del data["kl_source"]  # a store written before the field existed
    manifest.write_text(json.dumps(data))
    assert TraceReader(tmp_path / "a").kl_source == "full"
    with pytest.raises(TraceStoreError, match="kl_source=full, writer was given k1"):
        TraceWriter(tmp_path / "a", kl_source="k1", top_n=3)
    with pytest.raises(ValueError, match="kl_source must be one of"):
        TraceWriter(tmp_path / "c", kl_source="k2")


def _log(path: Path, rows: list[dict], header: dict | None = None) -> Path:
    lines = ([json.dumps(header)] if header else []) + [json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_import_k1_k3_from_log_probs_with_a_loss_mask_and_field_names(tmp_path):
    s = [-0.5, -0.1, -2.0, -0.3]
    t = [-0.7, -0.1, -0.4, -0.3]
    row = {"iter": 3, "group": 7, "tokens": [9, 4, 5, 6], "lp": s, "tlp": t, "m": [0, 1, 1, 1], "correct": 1}
    fields = {"step": "iter", "prompt_id": "group", "token_ids": "tokens", "student_logprob": "lp",
              "teacher_logprob": "tlp", "loss_mask": "m"}
    for source, fn in (("k1", k1), ("k3", k3)):
        res = import_file(_log(tmp_path / "log.jsonl", [row]), tmp_path / source, kl_source=source, fields=fields)
        r = TraceReader(tmp_path / source)
        b = r.read()
        assert r.kl_source == source and res["tokens"] == 3
        assert b["token_ids"][0].tolist() == [4, 5, 6] and b["step"][0] == 3 and b["prompt_id"][0] == "7"
        assert np.allclose(b["kl"][0], fn(np.array(s[1:]), np.array(t[1:])).astype(np.float32))
        assert np.allclose(b["kl_sampled"][0], np.array(s[1:]) - np.array(t[1:]))
        assert b["policy"][0] == "none" and b["correct"][0] == 1
        assert {"student_entropy", "teacher_top_ids", "teacher_top_probs"} <= set(r.absent_columns)


def _bad(tmp_path: Path, rows: list[dict], match: str, **kw) -> None:
    out = tmp_path / "bad"
    with pytest.raises(ValueError, match=match):
        import_file(_log(tmp_path / "bad.jsonl", rows), out, **kw)
    assert not (out / "traces").exists() and not (out / "traces_partial").exists()  # nothing left behind


def test_bad_rows_are_one_line_errors_naming_line_and_field(tmp_path):
    ok = {"step": 0, "prompt_id": "a", "token_ids": [1, 2], "kl": [0.1, 0.2]}
    _bad(tmp_path, [ok, {"step": 0, "token_ids": [1], "kl": [0.1]}],
         r"bad\.jsonl:2: missing required field 'prompt_id'")
    _bad(tmp_path, [{**ok, "token_ids": [1, -2]}], r":1: field 'token_ids'\[1\] = -2 is negative")
    _bad(tmp_path, [{**ok, "token_ids": [1, 99]}], r"token_ids'\[1\] = 99 is outside the vocabulary \(size 50\)",
         vocab_size=50)
    _bad(tmp_path, [{**ok, "token_ids": [1, "x"]}], r"token_ids'\[1\] must be an integer")
    _bad(tmp_path, [{**ok, "kl": [0.1]}], r"field 'kl' has 1 entries but field 'token_ids' has 2")
    _bad(tmp_path, [{"step": 0, "prompt_id": "a", "token_ids": [1], "student_logprob": [-1], "teacher_logprob": [-1]}],
         r"missing field 'kl'.*pass --kl-source k1 or k3")
    _bad(tmp_path, [{"step": 0, "prompt_id": "a", "token_ids": [1], "student_logprob": [-1]}],
         r"missing field 'teacher_logprob'", kl_source="k1")
    _bad(tmp_path, [{**ok, "teacher_top_ids": [[1, 2], [3, 4]]}], r"has 2 entries per token; the store's top_n is 3",
         top_n=3)
    _bad(tmp_path, [{**ok, "rollout_id": 5}, {**ok, "rollout_id": 5}], r":2: field 'rollout_id' 5 appears twice")
    _bad(tmp_path, [{**ok, "step": -1}], r"field 'step' must be >= 0")
    _bad(tmp_path, [{**ok, "kept_len": 5}], r"kept_len' = 5 is outside \[0, 2\]")
    _bad(tmp_path, [ok], r"missing required field 'token_ids' \(file field 'tokens'\)",
         fields={"token_ids": "tokens"})
    (tmp_path / "broken.jsonl").write_text(json.dumps(ok) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: invalid JSON"):
        import_file(tmp_path / "broken.jsonl", tmp_path / "c")
    assert not (tmp_path / "c" / "traces").exists()
    with pytest.raises(ValueError, match="contradicts the file's header"):
        import_file(_log(tmp_path / "h.jsonl", [ok], {"format": FORMAT_NAME, "version": 1, "kl_source": "k3"}),
                    tmp_path / "d", kl_source="k1")
    with pytest.raises(ValueError, match="version 2; this kat-diag reads up to 1"):
        import_file(_log(tmp_path / "v.jsonl", [ok], {"format": FORMAT_NAME, "version": 2}), tmp_path / "e")


def test_cli_import_errors_are_one_line_and_exit_2(tmp_path):
    _log(tmp_path / "bad.jsonl", [{"step": 0, "prompt_id": "a", "token_ids": [1, 2]}])
    res = invoke("traces", "import", tmp_path / "bad.jsonl", "--out", tmp_path / "o", "--no-progress")
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [f"error: {tmp_path / 'bad.jsonl'}:1: missing field 'kl', the "
                                               "full-vocabulary KL of kl_source full"]
    assert not (tmp_path / "o" / "traces").exists()
    res = invoke("traces", "import", tmp_path / "bad.jsonl", "--out", tmp_path / "o", "--kl-source", "k2")
    assert res.exit_code == 2 and "--kl-source must be one of full, k1, k3" in res.output


# ------------------------------------------------------------------------------------------- a k1 log end to end


def _record(world: Path, out: Path, n: int = 12) -> None:
    from kat_diag.opd.config import SamplingConfig
    from kat_diag.opd.record import RecordConfig, record

    record(RecordConfig(teacher=str(world / "teacher"), student=str(world / "student"), out=str(out), n_prompts=n,
                        batch_size=n, sampling=SamplingConfig(max_new_tokens=48, chunk_size=8), progress=False))


@pytest.fixture(scope="module")
def recorded(quick_world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rec") / "rec"
    _record(quick_world, out)
    return out


def test_a_tinker_style_k1_log_through_import_heatmap_phases_trap_and_inspect(recorded, quick_world, tmp_path):
    # Layout: a tinker-cookbook Datum of its on-policy distillation (tinker_cookbook.distillation):
    # target_tokens = (prompt + completion)[1:], logprobs = the sampler's log-probs (0 on prompt positions),
    # mask = 1 on completion tokens, teacher_logprobs = the teacher's compute_logprobs at the same positions;
    # the per-token reverse KL it puts in the advantages is k1 = logprobs - teacher_logprobs under the mask.
    # It is the shape tinker-cookbook and slime compute; examples/foreign_runs.py writes it (and says so).
    fr = _foreign_runs()
    rows = fr.rows_of_store(recorded, quick_world)
    log = fr.write_tinker_k1(rows, tmp_path / "tinker_k1.jsonl")
    first = json.loads(log.read_text().splitlines()[0])
    assert len(first["target_tokens"]) == len(first["logprobs"]) == len(first["mask"]) == len(first["teacher_logprobs"])
    run = tmp_path / "k1"
    res = invoke("traces", "import", log, "--out", run, "--kl-source", "k1", "--field", "token_ids=target_tokens",
                 "--field", "student_logprob=logprobs", "--field", "teacher_logprob=teacher_logprobs",
                 "--field", "loss_mask=mask", "--field", "prompt_id=group", "--tokenizer", quick_world / "student",
                 "--no-progress")
    assert res.exit_code == 0, res.output
    rec, imp = TraceReader(recorded).read(), TraceReader(run).read()
    ia, ib = np.argsort(rec["rollout_id"]), np.argsort(imp["rollout_id"])
    for x, y in zip(ia, ib, strict=True):  # the imported k1 is the recorded sampled-token estimate, token ids too
        assert np.array_equal(rec["token_ids"][x], imp["token_ids"][y])
        assert np.array_equal(rec["kl_sampled"][x], imp["kl"][y])
        assert list(rec["token_text"][x]) == list(imp["token_text"][y])
    assert list(rec["text"][ia]) == list(imp["text"][ib]) and list(rec["correct"][ia]) == list(imp["correct"][ib])

    heat = invoke("heatmap", run, "--out", tmp_path / "an")
    assert heat.exit_code == 0, heat.output
    assert "note: KL here is k1" in heat.output and (tmp_path / "an" / "heatmap.png").stat().st_size > 0
    hj = json.loads(invoke("heatmap", run, "--out", tmp_path / "an", "--json").stdout)
    assert hj["kl_source"] == "k1" and hj["stages"][0]["rollouts"] == 12
    ph = invoke("phases", run, "--out", tmp_path / "an", "--json")
    assert ph.exit_code == 0 and json.loads(ph.stdout)["kl_source"] == "k1"
    assert "note: KL here is k1" in invoke("phases", run, "--out", tmp_path / "an").output
    trap = invoke("trap", run)
    assert trap.exit_code == 0 and trap.output.startswith("note: KL here is k1")
    tj = json.loads(invoke("trap", run, "--json").stdout)
    assert tj["kl_source"] == "k1" and "k1" in tj["kl_note"]
    rep = invoke("replay", run, "--json")
    assert rep.exit_code == 0 and json.loads(rep.stdout)["kl_source"] == "k1"
    assert "note: KL here is k1" in invoke("replay", run).output
    assert "note: KL here is k1" in invoke("inspect", run).output
    assert json.loads(invoke("inspect", run, "--json").stdout)["kl_source"] == "k1"
    vocab = invoke("vocab", run, "--out", tmp_path / "an")
    assert vocab.exit_code == 2 and vocab.output.strip().splitlines()[-1].startswith(
        "error: vocab needs the teacher_top_ids")
    from kat_diag.analysis.figures import make_figures

    figs = make_figures([run], tmp_path / "figs", analyses=["heatmap", "vocab"], curves=False)
    assert "teacher_top_ids" in figs["analyses"]["k1"]["vocab"]["skipped"]
    assert "files" in figs["analyses"]["k1"]["heatmap"]


def test_phases_and_heatmap_figures_of_a_k1_store_show_negative_estimates(tmp_path):
    # k1 = log p_s - log p_T of the sampled token goes below 0 (so can its tau): a log axis would drop
    # those means and break the layout; the KL panels go symlog instead, and the entropy panel says
    # why it is empty when the log had no entropies.
    from kat_diag.analysis.phase_stats import phase_report, plot

    rng = np.random.default_rng(0)
    with TraceWriter(tmp_path / "k1", top_n=1, kl_source="k1") as w:
        for step in range(3):
            kl = [np.concatenate([rng.normal(0.3, 0.1, 12), rng.normal(-0.02, 0.005, 24)]).astype(np.float32)
                  for _ in range(8)]
            w.append({"step": step, "prompt_id": "p", "policy": "none", "correct": False,
                      "token_ids": [np.zeros(36, np.int32)] * 8, "kl": kl})
    report = phase_report(TraceReader(tmp_path / "k1"), CFG)
    assert min(v for s in report.stages for v in s.phase_kl if np.isfinite(v)) < 0
    fig = plot(report)
    (_, a_kl, a_ent), (_, _, a_seg) = np.array(fig.axes[:6]).reshape(2, 3)
    assert a_kl.get_xscale() == "symlog" and a_seg.get_xscale() == "symlog"
    shown = [x for line in a_kl.get_lines() for x in line.get_xdata() if len(line.get_xdata()) == 1]
    assert min(shown) < 0  # the negative mean is drawn, not dropped
    assert not a_ent.axison and "no entropies" in a_ent.texts[0].get_text()
    from kat_diag.analysis.heatmap import heatmap
    from kat_diag.analysis.heatmap import plot as plot_heatmap

    fig = plot_heatmap(heatmap(TraceReader(tmp_path / "k1"), CFG, "auto"))
    profile = [ax for ax in fig.axes if ax.get_title() == "mean KL by relative position"]
    assert len(profile) == 1 and profile[0].get_yscale() == "symlog"
