"""`kat-diag study`: the whole comparison end to end on the quick world, resume, and its pieces."""

import dataclasses
import json

import numpy as np
import pytest

from kat_diag.kat.config import KATConfig
from kat_diag.study import (
    MAIN_METHODS,
    StudyConfig,
    kat_config,
    load_study_file,
    paired_bootstrap,
    plan,
    run_study,
)


def test_study_end_to_end_and_rerun_skips_finished_runs(quick_world, tmp_path):
    cfg = StudyConfig.tiny(str(quick_world / "teacher"), str(quick_world / "student"), steps=3)
    out = tmp_path / "study"
    printed = []
    res = run_study(cfg, out, progress=False, log=printed.append)
    for m in MAIN_METHODS:
        run = out / "seed0" / m
        assert (run / "final").is_dir() and (run / "eval.json").exists(), m
        assert res["runs"][f"seed0/{m}"]["train"]["steps"] == 3
    # random is length-matched to this study's KAT run: realised mean kept length within 10 %.
    match = res["length_match"][0]
    assert abs(match["rel_error"]) <= 0.10, match
    assert match["target"] == pytest.approx(match["kat_kept_len_mean"])
    # prefix and kat+prefix use the P derived from the KAT run.
    p = res["prefix"]["0"]["P"]
    assert res["runs"]["seed0/prefix"]["prefix_len"] == p == res["runs"]["seed0/kat+prefix"]["prefix_len"]
    assert res["runs"]["seed0/prefix"]["train"]["gen_len_mean"] <= p
    # results.json is complete: every method, split and column of the table.
    saved = json.loads((out / "results.json").read_text())
    k = cfg.eval_k
    assert set(saved["table"]) == set(MAIN_METHODS)
    assert saved["splits"] == ["ops2", "ops3", "ops4", "ops5"]
    for row in saved["table"].values():
        for c in [*saved["splits"], "mean"]:
            for met in ("avg", "pass"):
                assert 0.0 <= row[f"{c}/{met}@{k}"]["mean"] <= 1.0
        for col in ("gen_len_mean", "kept_len_mean", "tokens_generated", "tokens_trained", "train_seconds"):
            assert row[col]["mean"] > 0
    assert set(saved["bootstrap_kat_minus_opd"]) == {f"{c}/{m}@{k}" for c in saved["splits"] for m in ("avg", "pass")}
    assert "student" in saved["baseline"] and "figures" in saved
    md = (out / "results.md").read_text()
    assert printed == [md] and "| KAT |" in md and "random (length-matched)" in md
    # The KAT run trained on fewer tokens than plain OPD.
    assert saved["table"]["kat"]["tokens_trained"]["mean"] < saved["table"]["none"]["tokens_trained"]["mean"]
    # IW-OPD is a row: its run trained with the iwopd loss, untruncated (as many tokens as it generated).
    assert "iwopd" in MAIN_METHODS and "| IW-OPD |" in md
    iw_cfg = json.loads((out / "seed0" / "iwopd" / "config.json").read_text())
    assert iw_cfg["loss"] == "iwopd" and iw_cfg["termination"] == "none" and iw_cfg["iw_gamma"] == 0.5
    assert json.loads((out / "seed0" / "kat" / "config.json").read_text())["loss"] == cfg.loss
    iw = saved["table"]["iwopd"]
    assert iw["tokens_trained"]["mean"] == pytest.approx(iw["tokens_generated"]["mean"])
    assert saved["table"]["none"]["cost_vs_opd"] == {"tokens_generated": 1.0, "tokens_trained": 1.0,
                                                      "train_seconds": 1.0}
    # Paired CIs: KAT minus OPD and KAT minus IW-OPD, per split and over all problems, with half-widths.
    assert {"kat - none", "kat - iwopd", "iwopd - none", "kat - random", "kat - prefix"} <= set(saved["paired"])
    ci = saved["paired"]["kat - iwopd"]["all/avg@8"]
    assert ci["lo"] <= ci["diff"] <= ci["hi"] and ci["half_width"] == pytest.approx((ci["hi"] - ci["lo"]) / 2)
    assert ci["n_problems"] == 4 * cfg.eval_n and len(ci["per_seed"]) == 1
    kat_ev, iw_ev = saved["runs"]["seed0/kat"]["eval"], saved["runs"]["seed0/iwopd"]["eval"]
    direct = np.mean([np.mean(kat_ev[c]["correct"]) - np.mean(iw_ev[c]["correct"]) for c in saved["splits"]]) / k
    assert ci["diff"] == pytest.approx(direct)  # equal split sizes: the pooled mean is the mean over splits

    # A rerun trains nothing and gives the same table; an unfinished run is resumed, not restarted.
    (out / "seed0" / "kat+prefix" / "eval.json").unlink()
    again = run_study(cfg, out, progress=False, log=lambda s: None)
    assert again["table"] == res["table"]
    with pytest.raises(ValueError, match="another config"):
        run_study(dataclasses.replace(cfg, steps=4), out, progress=False, log=lambda s: None)


def test_plan_orders_kat_before_its_matches_and_lists_ablations():
    cfg = StudyConfig.full("t", "s")
    runs = plan(cfg)
    names = [f"{r.group}/{r.name}" for r in runs]
    for s in cfg.seeds:
        assert names.index(f"seed{s}/kat") < names.index(f"seed{s}/random") < names.index(f"seed{s}/prefix")
    abl = [r for r in runs if r.group == "ablations"]
    assert {r.supervise for r in abl if r.supervise} == {"pre", "agreement", "post", "pre+agreement"}
    assert any(r.termination == "kat+prefix" and r.prefix_scale == 2.0 for r in abl)
    assert len([r for r in abl if r.kat]) >= 3  # the quantile sweep
    assert all(r.termination == "none" for r in abl if r.supervise)
    main = [r for r in runs if r.group == "seed0"]
    assert {r.name: (r.termination, r.loss) for r in main if "iwopd" in r.name} == {
        "iwopd": ("none", "iwopd"), "kat+iwopd": ("kat", "iwopd")}
    assert [(r.termination, r.loss) for r in abl if r.name == "opd-sampled"] == [("none", "sampled")]
    quick = [r.name for r in plan(StudyConfig.quick("t", "s"))]
    assert "iwopd" in quick and "kat+iwopd" not in quick
    with pytest.raises(ValueError, match="unknown"):
        StudyConfig.quick("t", "s", methods=("none", "kat", "iw"))
    with pytest.raises(ValueError, match="must include 'kat'"):
        StudyConfig.quick("t", "s", methods=("none", "iwopd"))


def test_kat_preset_and_errors():
    cfg = StudyConfig.quick("t", "s", kat={"window": 8, "warmup_steps": 2})
    kat = kat_config(cfg)
    assert kat.window == 8 and kat.warmup_steps == 2 and kat.persistence == KATConfig().persistence
    paper = kat_config(StudyConfig.quick("t", "s", kat={"preset": "paper", "warmup_steps": 7}))
    assert paper.window == 64 and paper.warmup_steps == 7
    with pytest.raises(ValueError, match="unknown KAT parameter"):
        StudyConfig.quick("t", "s", kat={"windw": 8})
    with pytest.raises(ValueError, match="steps"):
        StudyConfig.quick("t", "s", steps=0)


def test_paired_bootstrap_exact_cases():
    a = np.array([1.0, 0.0, 1.0, 1.0])
    assert paired_bootstrap(a, a) == {"diff": 0.0, "lo": 0.0, "hi": 0.0}
    shifted = paired_bootstrap(a, a - 0.25)
    assert shifted["diff"] == pytest.approx(0.25) and shifted["lo"] == pytest.approx(0.25)
    b = np.array([0.0, 0.0, 1.0, 0.0])
    r = paired_bootstrap(a, b, n_boot=4000)
    assert r["diff"] == 0.5 and 0.0 <= r["lo"] < 0.5 < r["hi"] <= 1.0


def test_study_file_json_and_yaml(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps({"teacher": "/ckpt/T", "student": "/ckpt/S", "data": "train.jsonl",
                                                 "bench": ["a.jsonl", "b.jsonl"], "kat": {"window": 64},
                                                 "max_new_tokens": 4096}))
    cfg = load_study_file(tmp_path / "s.json")
    assert cfg.bench == ("a.jsonl", "b.jsonl") and cfg.max_new_tokens == 4096 and cfg.seeds == (0,)
    assert kat_config(cfg).window == 64
    (tmp_path / "s.yaml").write_text("teacher: /ckpt/T\nstudent: /ckpt/S\nprofile: full\nsteps: 500\n")
    full = load_study_file(tmp_path / "s.yaml")
    assert full.seeds == (0, 1, 2) and full.ablations and full.steps == 500
    (tmp_path / "bad.json").write_text(json.dumps({"teacher": "T", "student": "S", "stepz": 3}))
    with pytest.raises(ValueError, match="unknown key .stepz."):
        load_study_file(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="missing 'student'"):
        (tmp_path / "x.json").write_text('{"teacher": "T"}')
        load_study_file(tmp_path / "x.json")
