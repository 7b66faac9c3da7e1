"""The figures' visual language and uncertainty: one palette, CIs equal to direct bootstraps, the study
figure from results.json, and a summary.md whose every link resolves."""

from __future__ import annotations

import ast
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from kat_diag.analysis import stats
from kat_diag.views import palette

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

# --------------------------------------------------------------------------------------------------
# One source of colours

_HEX = re.compile(r"#(?:[0-9a-fA-F]{6}|[0-9a-fA-F]{3})\b")
_COLOR_KW = {"color", "c", "colors", "facecolor", "edgecolor", "markerfacecolor", "markeredgecolor", "foreground",
             "background_color", "labelcolor", "bad", "fill", "stroke", "cmap"}
_NAMED = {"white", "black", "red", "green", "blue", "grey", "gray", "orange", "purple", "yellow", "cyan", "magenta",
          "pink", "brown", "navy", "teal", *(f"C{i}" for i in range(10)), "magma", "viridis", "inferno", "plasma",
          "tab10", "rainbow", "jet"}
_PALETTE_HOME = {"kat_diag/views/palette.py"}


def colour_literals(path: Path) -> list[str]:
    """Colour literals outside docstrings: hex codes in any string, and strings naming a colour or a
    colour map (as a keyword like color= / cmap=, or anywhere as a known name)."""
    tree = ast.parse(path.read_text())
    docs = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            docs.add(id(body[0].value))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            if _HEX.search(node.value) or node.value in _NAMED:
                found.append(f"{path}:{node.lineno}: {node.value[:40]!r}")
        if isinstance(node, ast.keyword) and node.arg in _COLOR_KW and isinstance(node.value, ast.Constant) \
                and isinstance(node.value.value, str) and node.value.value != "none":
            found.append(f"{path}:{node.value.lineno}: {node.arg}={node.value.value!r}")
    return found


def test_the_palette_is_the_one_source_of_colours():
    files = sorted([*(REPO / "kat_diag").rglob("*.py"), *(REPO / "cli").rglob("*.py")])
    bad = [hit for f in files if f.relative_to(REPO).as_posix() not in _PALETTE_HOME for hit in colour_literals(f)]
    assert not bad, "colour literals outside kat_diag/views/palette.py:\n" + "\n".join(bad)


def test_the_scan_catches_a_colour_literal(tmp_path):
    f = tmp_path / "m.py"
    f.write_text('"""doc #fff"""\nax.plot(x, color="#ff0000")\nax.bar(x, facecolor="red")\nc = "C3"\n'
                 'ok = ax.fill(x, facecolor="none")\n')
    hits = colour_literals(f)
    assert len(hits) == 5 and not any("doc" in h for h in hits)  # hex and red (each as string and keyword), C3


def test_kl_stops_are_matplotlibs_viridis_r_and_the_figures_use_them():
    import matplotlib

    from kat_diag.analysis import style
    from kat_diag.views.colors import level_rgb

    ref = matplotlib.colormaps[palette.KL_CMAP_SOURCE]
    xs = np.linspace(0, 1, len(palette.KL_STOPS))
    want = np.array([ref(x)[:3] for x in xs]) * 255
    np.testing.assert_allclose(np.array(palette.KL_STOPS), want, atol=0.51)  # rounded to integers
    # between the stops: the figures' colour map and the views' interpolation agree with matplotlib
    cmap = style.kl_cmap()
    for x in np.linspace(0, 1, 41):
        np.testing.assert_allclose(np.array(cmap(x)[:3]) * 255, np.array(ref(x)[:3]) * 255, atol=3.5)
        np.testing.assert_allclose(level_rgb(x), np.array(ref(x)[:3]) * 255, atol=3.5)
    # low KL is the light end (the signal stands out on a dark terminal): lightness falls monotonically
    luma = [0.2126 * r + 0.7152 * g + 0.0722 * b for r, g, b in palette.KL_STOPS]
    assert all(a >= b for a, b in zip(luma, luma[1:], strict=False)) and luma[0] > 190


def test_terminal_scale_256_and_truecolor_and_tau_marks():
    from kat_diag.views import colors as C

    assert all(16 <= i <= 255 for i in C.ANSI_RAMP)  # never the theme-dependent basic colours
    assert C.ansi_params(0.0, "truecolor") == "48;2;253;231;37"
    assert C.ansi_params(0.0, "256") == f"48;5;{C.ANSI_RAMP[0]}"
    assert C.color_depth({"COLORTERM": "truecolor"}) == "truecolor" and C.color_depth({}) == "256"
    assert C.tau_level(1e-3) == 0.0 and C.tau_level(10.0) == 1.0 and C.tau_level(float("nan")) is None
    assert C.tau_cell(0.1, 24) == round((math.log(0.1) - math.log(1e-3)) / math.log(1e4) * 23)
    assert C.glyph(0.0) == "▁" and C.glyph(1.0) == "█" and C.glyph(float("nan")) == "?"


def test_method_and_phase_and_verdict_colours_do_not_collide():
    assert set(palette.PHASE_COLORS.values()).isdisjoint(palette.VERDICT_COLORS.values())
    assert palette.method_color("fig_kat") == palette.METHOD_COLORS["kat"]
    assert palette.method_color("seed0/kat+prefix") == palette.METHOD_COLORS["kat+prefix"]
    assert palette.method_color("fig_opd") == palette.METHOD_COLORS["none"]


# --------------------------------------------------------------------------------------------------
# Intervals equal a direct computation


def test_wilson_matches_the_formula_and_its_edges():
    k, n, z = 7, 20, stats.Z95
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo, hi = stats.wilson(k, n)
    assert lo == pytest.approx(centre - half) and hi == pytest.approx(centre + half)
    lo0, hi0 = stats.wilson(0, 13)
    assert lo0 == 0.0 and 0.2 < hi0 < 0.25  # n = 13, nothing correct: still a real interval
    assert np.isnan(stats.wilson(0, 0)[0])


def test_cluster_bootstrap_equals_a_direct_loop():
    rng = np.random.default_rng(3)
    num, den = rng.random(17), rng.integers(1, 9, 17).astype(float)
    reps = stats.cluster_bootstrap(num, den, n_boot=50, seed=11)
    W = stats.multinomial_weights(17, 50, np.random.default_rng(11))
    direct = [float((w * num).sum() / (w * den).sum()) for w in W]
    np.testing.assert_allclose(reps, direct, rtol=1e-12)


def test_basic_interval_holds_its_bias_corrected_estimate_where_percentiles_fail():
    # a plug-in estimate far below its bootstrap distribution (the JS case of the issue: 0.0427 with
    # a percentile interval of [0.0616, 0.1736])
    reps = np.random.default_rng(0).uniform(0.0616, 0.1736, 1000)
    b = stats.basic_interval(0.0427, reps, bounds=(0.0, math.log(2)))
    assert not (b["pct_lo"] <= 0.0427 <= b["pct_hi"])
    assert b["lo"] <= b["estimate"] <= b["hi"] and b["bias"] == pytest.approx(reps.mean() - 0.0427)
    assert b["lo"] == 0.0  # clipped at the bound


def test_js_interval_is_bias_corrected_and_holds_the_estimate():
    from kat_diag.analysis.vocab import bootstrap_js

    # one distribution, sampled sparsely twice: the true JS is 0, the plug-in is biased upward
    rng = np.random.default_rng(5)
    p = rng.dirichlet(np.ones(40))
    a = sp.csr_matrix(rng.multinomial(3, p, size=60).astype(float))
    b = sp.csr_matrix(rng.multinomial(3, p, size=60).astype(float))
    res = bootstrap_js(a, b, n_boot=400, seed=1)
    assert res["pct_low"] > res["js"]  # the percentile interval excludes its own point estimate
    assert res["ci_low"] <= res["js_bc"] <= res["ci_high"] and res["js_bc"] < res["js"]
    assert res["bias"] > 0


def _subspace(m: int, n: int, k: int, seed: int):
    from kat_diag.analysis.gradproj import update_subspaces

    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(m, 3, generator=g) @ torch.randn(3, n, generator=g) + 0.01 * torch.randn(m, n, generator=g)
    return update_subspaces([("model.layers.0.mlp.up_proj.weight", delta)], k, n_random=2, seed=seed)


def test_gradproj_bootstrap_equals_a_direct_bootstrap():
    from kat_diag.analysis.gradproj import bootstrap_matrix

    (s,) = _subspace(12, 9, 4, seed=2).values()
    G = torch.randn(6, 12, 9, generator=torch.Generator().manual_seed(4))
    counts = np.array([3, 5, 2, 7, 1, 4])
    W = stats.multinomial_weights(6, 30, np.random.default_rng(9))
    one, two, energy = bootstrap_matrix(s, G, counts, W, chunk=7)
    U, V = s.U.double().numpy(), s.V.double().numpy()
    for b, w in enumerate(W):
        g = np.tensordot(w, G.double().numpy(), axes=1) / (w @ counts)
        tot = (g * g).sum()
        for k in range(1, 5):
            proj = U[:, :k] @ U[:, :k].T @ g
            both = U[:, :k].T @ g @ V[:, :k]
            assert one[b, k - 1] == pytest.approx((proj * proj).sum() / tot, rel=1e-4)
            assert two[b, k - 1] == pytest.approx((both * both).sum() / tot, rel=1e-4)
        assert energy[b] == pytest.approx(tot, rel=1e-4)


def test_gradproj_result_intervals_are_the_basic_intervals_of_its_replicates():
    from kat_diag.analysis.gradproj import GroupGradients, compute_gradproj, group_weights

    gen = torch.Generator().manual_seed(0)
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"]
    deltas = {n: torch.randn(10, 8, generator=gen) for n in names}
    phases = [GroupGradients(ph, np.array([4, 2, 3, 5, 1]), 5, 1.0,
                             {n: torch.randn(5, 10, 8, generator=gen) + 0.5 * deltas[n] for n in names})
              for ph in ("pre", "agreement")]
    res = compute_gradproj(deltas, phases, ks=(1, 2), n_random=2, seed=3, n_boot=40)
    agg = {(a["phase"], a["k"]): a for a in res.aggregate()}
    for i, ph in enumerate(("pre", "agreement")):
        W = group_weights(5, 40, 3 * 7919 + i)  # the seeds compute_gradproj uses
        boot = res.boot[ph]
        for k in (1, 2):
            direct = np.nanmean(boot.one[:, :, k - 1], axis=1)
            want = stats.basic_interval(agg[(ph, k)]["one_sided"], direct, bounds=(0.0, 1.0))
            assert (agg[(ph, k)]["one_sided_lo"], agg[(ph, k)]["one_sided_hi"]) == pytest.approx(
                (want["lo"], want["hi"]))
        # the replicates are those of the seeded weights
        from kat_diag.analysis.gradproj import bootstrap_matrix, update_subspaces

        sub = update_subspaces(deltas.items(), 2, n_random=2, seed=3)
        one, _, _ = bootstrap_matrix(sub[names[0]], phases[i].grads[names[0]], phases[i].counts, W)
        np.testing.assert_allclose(boot.one[:, 0, :2], one[:, :2], rtol=1e-6)
    diff = next(d for d in res.to_dict()["differences"] if d["k"] == 1)
    assert diff["one_sided_lo"] <= diff["one_sided_bc"] <= diff["one_sided_hi"]


def test_heatmap_profile_band_is_a_bootstrap_over_rollouts():
    from kat_diag.analysis.heatmap import profile_band, profile_by_rollout, relative_profile

    rng = np.random.default_rng(2)
    arrays = [rng.lognormal(-3, 1, int(rng.integers(5, 30))) for _ in range(25)]
    offs = np.concatenate([[0], np.cumsum([len(a) for a in arrays])])
    vals = np.concatenate(arrays)
    sums, counts = profile_by_rollout(vals, offs, 4)
    np.testing.assert_allclose(sums.sum(0) / counts.sum(0), relative_profile(vals, offs, np.ones(25, bool), 4))
    lo, hi = profile_band(sums, counts, n_boot=60, seed=5)
    for j in range(4):
        reps = stats.cluster_bootstrap(sums[:, j], counts[:, j], 60, 5)
        assert (lo[j], hi[j]) == pytest.approx(tuple(stats.percentile_interval(reps)))


# --------------------------------------------------------------------------------------------------
# The study's headline figure


def _study(seeds=(0, 1), k=4, n=6) -> dict:
    rng = np.random.default_rng(0)
    runs, table = {}, {}
    for m in ("none", "kat"):
        table[m] = {}
        for s in seeds:
            ev = {sp_: {"n": n, "correct": rng.integers(0, k + 1, n).tolist()} for sp_ in ("a", "b")}
            for sp_ in ("a", "b"):
                c = np.array(ev[sp_]["correct"])
                ev[sp_][f"avg@{k}"], ev[sp_][f"pass@{k}"] = float((c / k).mean()), float((c > 0).mean())
            ev["mean"] = {f"{x}@{k}": float(np.mean([ev[q][f"{x}@{k}"] for q in ("a", "b")])) for x in ("avg", "pass")}
            runs[f"seed{s}/{m}"] = {"method": m, "seed": s, "eval": ev}
    return {"k": k, "splits": ["a", "b"], "seeds": list(seeds), "table": table, "runs": runs,
            "baseline": {"student": {f"mean/avg@{k}": 0.3, f"mean/pass@{k}": 0.6}}}


def test_study_paired_differences_equal_a_direct_computation(tmp_path):
    from kat_diag.analysis.study_figure import paired_differences, run_study_figure, study_numbers

    res = _study()
    per = {m: np.mean([np.concatenate([np.array(res["runs"][f"seed{s}/{m}"]["eval"][q]["correct"]) / 4
                                       for q in ("a", "b")]) for s in (0, 1)], axis=0) for m in ("none", "kat")}
    d = per["kat"] - per["none"]
    idx = np.random.default_rng(0).integers(0, d.size, size=(500, d.size))
    boots = d[idx].mean(1)
    got = paired_differences(res, "kat", "avg", n_boot=500, seed=0)
    assert got["diff"] == pytest.approx(d.mean()) and got["problems"] == 12 and got["seeds"] == 2
    assert (got["lo"], got["hi"]) == pytest.approx((np.quantile(boots, 0.025), np.quantile(boots, 0.975)))
    nums = study_numbers(res)
    assert nums["methods"]["kat"]["avg@4"]["seeds"] == [res["runs"][f"seed{s}/kat"]["eval"]["mean"]["avg@4"]
                                                        for s in (0, 1)]
    f = tmp_path / "results.json"
    f.write_text(json.dumps(res))
    out = run_study_figure(f)
    assert (tmp_path / "study.png").stat().st_size > 10_000 and Path(out["files"][1]).is_file()
    with pytest.raises(ValueError, match="not a study results.json"):
        (tmp_path / "x.json").write_text("{}")
        run_study_figure(tmp_path / "x.json")


def test_committed_study_results_draw():
    from kat_diag.analysis.study_figure import study_numbers

    path = REPO / "figures" / "study" / "results.json"
    nums = study_numbers(json.loads(path.read_text()))
    assert set(nums["methods"]) >= {"none", "kat", "iwopd"} and nums["methods"]["kat"]["avg@8 - OPD"]["problems"] == 400


# --------------------------------------------------------------------------------------------------
# summary.md


def test_summary_embeds_every_figure_and_every_link_resolves(tmp_path):
    from test_analysis import write_planted_store

    from kat_diag.analysis.figures import make_figures

    run = tmp_path / "planted"
    write_planted_store(run)
    metrics = [{"step": s, "loss": 1.0, "kl_mean": 0.5, "gen_len_mean": 40.0, "kept_len_mean": 40.0,
                "fired_share": 0.0, "tau": None, "step_time": 1.0} for s in range(10)]
    metrics += [{"step": -1, "eval/mean/avg@4": 0.3, "eval/a/n": 20}, {"step": 9, "eval/mean/avg@4": 0.4,
                                                                        "eval/a/n": 20}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in metrics) + "\n")
    results = tmp_path / "results.json"
    results.write_text(json.dumps(_study()))
    out = tmp_path / "figs"
    done = make_figures([run], out, analyses=["heatmap", "phases"], study=results)
    md = (out / "summary.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", md)
    assert links and all((out / link).is_file() for link in links), [x for x in links if not (out / x).is_file()]
    pngs = {p.name for p in out.rglob("*.png")}
    assert {Path(x).name for x in links if x.endswith(".png")} == pngs == {"study.png", "curves.png", "heatmap.png",
                                                                            "phases.png"}
    assert "rollouts hold an extended low-KL segment" in md and "0 = the untrained student" in md
    assert done["study"]["methods"]["kat"]["label"] == "KAT"
