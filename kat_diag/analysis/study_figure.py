"""The study's headline figure, drawn from its results.json alone: does any method beat OPD?

`kat-diag study` writes results.json (per run: the method, the seed and every problem's number of
correct samples out of k, per split). This module reads only that file, so the figure regenerates
without the runs (``kat-diag figures --study results.json``), and shows:

* left: avg@k and pass@k (mean over splits) per method: one dot per seed, the mean over seeds as a
  bar-free marker with the seed standard deviation, the untrained student as a reference line;
* right: each method minus OPD, paired over problems (the same problems and sampling seed for every
  method; per problem the seeds are averaged first), with a 95 % bootstrap interval resampling
  problems (`paired_differences`). A difference is only a finding when its interval excludes 0.

Everything here is a pure function of the parsed JSON.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

LABELS = {"none": "OPD", "kat": "KAT", "random": "random (len.-matched)", "prefix": "prefix",
          "kat+prefix": "KAT + prefix", "iw-opd": "IW-OPD", "iw_opd": "IW-OPD", "iwopd": "IW-OPD",
          "kat+iwopd": "KAT + IW-OPD"}
N_BOOT = 2000


def _splits(results: dict[str, Any]) -> list[str]:
    return [s for s in results.get("splits", []) if s != "mean"]


def methods(results: dict[str, Any]) -> list[str]:
    """The main methods of the study in table order (ablation runs are left out)."""
    return list(results.get("table", {}))


def per_problem(ev: dict[str, Any], splits: list[str], k: int, metric: str) -> np.ndarray:
    """Every problem of every split, in order: avg@k (correct / k) or pass@k (some sample correct;
    with n = k samples the unbiased estimator is exactly that)."""
    c = np.concatenate([np.asarray(ev[s]["correct"], dtype=np.float64) for s in splits]) if splits else np.zeros(0)
    return c / k if metric == "avg" else (c > 0).astype(np.float64)


def seed_runs(results: dict[str, Any], method: str) -> list[dict[str, Any]]:
    runs = results.get("runs", {})
    return [r for key, r in runs.items() if key.startswith("seed") and key.split("/", 1)[1] == method]


def seed_scores(results: dict[str, Any], method: str, metric: str) -> np.ndarray:
    """Per seed, the mean over splits of avg@k or pass@k (as results.md reports it)."""
    k = int(results["k"])
    return np.array([float(r["eval"]["mean"][f"{metric}@{k}"]) for r in seed_runs(results, method)], dtype=np.float64)


def paired_differences(results: dict[str, Any], method: str, metric: str, reference: str = "none",
                       n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """method minus reference, mean over all problems (seeds averaged per problem first), with the
    percentile interval of a bootstrap resampling problems (pairs kept)."""
    k = int(results["k"])
    splits = _splits(results)
    a = [per_problem(r["eval"], splits, k, metric) for r in seed_runs(results, method)]
    b = [per_problem(r["eval"], splits, k, metric) for r in seed_runs(results, reference)]
    if not a or not b:
        return {"diff": math.nan, "lo": math.nan, "hi": math.nan, "problems": 0, "seeds": 0}
    d = np.mean(a, axis=0) - np.mean(b, axis=0)
    idx = np.random.default_rng(seed).integers(0, d.size, size=(n_boot, d.size))
    boots = d[idx].mean(1)
    q = (1 - level) / 2
    return {"diff": float(d.mean()), "lo": float(np.quantile(boots, q)), "hi": float(np.quantile(boots, 1 - q)),
            "problems": int(d.size), "seeds": min(len(a), len(b))}


def study_numbers(results: dict[str, Any]) -> dict[str, Any]:
    """What the figure shows, as numbers: per method the seed scores and their mean and sd, and the
    paired differences to OPD."""
    k = int(results["k"])
    out: dict[str, Any] = {"k": k, "seeds": results.get("seeds"), "splits": _splits(results), "methods": {}}
    for m in methods(results):
        row: dict[str, Any] = {"label": LABELS.get(m, m)}
        for metric in ("avg", "pass"):
            s = seed_scores(results, m, metric)
            row[f"{metric}@{k}"] = {"seeds": s.tolist(), "mean": float(s.mean()) if s.size else math.nan,
                                    "sd": float(s.std(ddof=1)) if s.size > 1 else 0.0}
            if m != "none":
                row[f"{metric}@{k} - OPD"] = paired_differences(results, m, metric)
        out["methods"][m] = row
    base = results.get("baseline", {}).get("student")
    if base:
        out["student"] = {f"{metric}@{k}": float(base[f"mean/{metric}@{k}"]) for metric in ("avg", "pass")}
    return out


def plot_study(results: dict[str, Any], fig: Any = None) -> Any:
    """The headline figure (see the module docstring) of a parsed results.json."""
    from kat_diag.analysis import style

    nums = study_numbers(results)
    k = nums["k"]
    ms = list(nums["methods"])
    if fig is None:
        fig, axes = style.figure(1, 4, size=(style.TEXT_WIDTH, 3.0))
    else:
        axes = np.array(fig.subplots(1, 4))
    y = np.arange(len(ms))
    labels = [nums["methods"][m]["label"] for m in ms]
    rng = np.random.default_rng(0)
    for ax, metric in ((axes[0], "avg"), (axes[1], "pass")):
        key = f"{metric}@{k}"
        for i, m in enumerate(ms):
            c = style.method_color(m, i)
            row = nums["methods"][m][key]
            s = np.asarray(row["seeds"]) * 100
            ax.plot(s, i + rng.uniform(-0.12, 0.12, s.size), "o", color=c, markersize=3, alpha=0.6,
                    markerfacecolor=style.PAPER)
            if len(s) > 1:
                ax.plot([row["mean"] * 100 - row["sd"] * 100, row["mean"] * 100 + row["sd"] * 100], [i, i], color=c,
                        linewidth=1.6)
            ax.plot([row["mean"] * 100], [i], "D", color=c, markersize=4.5)
        if "student" in nums:
            ax.axvline(nums["student"][key] * 100, color=style.MARK_COLORS["reference"], linestyle="--", linewidth=0.9)
        ax.set_yticks(y, labels if metric == "avg" else [""] * len(ms))
        ax.invert_yaxis()
        ax.set_xlabel("% (mean over splits)")
        ax.set_title(f"{key}", fontsize=8)
    for ax, metric in ((axes[2], "avg"), (axes[3], "pass")):
        key = f"{metric}@{k} - OPD"
        for i, m in enumerate(ms):
            d = nums["methods"][m].get(key)
            if d is None or not np.isfinite(d["diff"]):
                continue
            c = style.method_color(m, i)
            ax.plot([d["lo"] * 100, d["hi"] * 100], [i, i], color=c, linewidth=1.6)
            ax.plot([d["diff"] * 100], [i], "o", color=c, markersize=4.5)
        ax.axvline(0, color=style.INK, linewidth=0.8)
        ax.set_yticks(y, [""] * len(ms))
        ax.invert_yaxis()
        ax.set_xlabel("points (95 % CI)")
        ax.set_title(f"{metric}@{k} minus OPD", fontsize=8)
    seeds = nums.get("seeds") or []
    problems = next((d.get("problems") for m in ms for kk, d in nums["methods"][m].items()
                     if kk.endswith("- OPD")), None)
    fig.suptitle(f"Study: {len(seeds)} seed{'s' if len(seeds) != 1 else ''}, {problems or '?'} problems "
                 f"({', '.join(nums['splits'])})\n◆ mean, ○ seeds, bar ± sd, dashed: untrained student; "
                 "right: paired differences, problems resampled", fontsize=7.5)
    fig.tight_layout()
    return fig


def run_study_figure(results_json: str | Path, out_png: str | Path | None = None) -> dict[str, Any]:
    """Read results.json, write the headline figure (default: study.png next to it) and
    study_figure.json (its numbers); returns the numbers with the written paths."""
    from kat_diag.analysis import style
    from kat_diag.analysis.output import clean

    src = Path(results_json)
    if not src.is_file():
        raise FileNotFoundError(f"study results {src} do not exist")
    try:
        results = json.loads(src.read_text())
    except ValueError as e:
        raise ValueError(f"{src}: not JSON ({e})") from None
    for key in ("k", "table", "runs", "splits"):
        if key not in results:
            raise ValueError(f"{src}: not a study results.json (no {key!r})")
    png = Path(out_png) if out_png is not None else src.with_name("study.png")
    style.save(plot_study(results), png)
    nums = clean(study_numbers(results))
    data = png.with_name(png.stem + "_figure.json")
    data.write_text(json.dumps(nums, indent=2) + "\n")
    return {**nums, "files": [str(png), str(data)]}


if __name__ == "__main__":  # python -m kat_diag.analysis.study_figure figures/study/results.json
    import sys

    print(json.dumps(run_study_figure(*sys.argv[1:3]), indent=2))
