"""Gradient geometry: known-answer energy ratios, equal phase samples, and a run end to end."""

import json

import numpy as np
import pytest
import torch

from kat_diag.analysis.gradproj import (
    PhaseGradient,
    compute_gradproj,
    energy_profile,
    matrix_kind,
    principal_subspace,
    random_orthonormal,
    sample_phase_tokens,
)


def _delta(m: int, n: int, rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A rank-`rank` delta with known singular vectors (orthonormal U m x r, V n x r, distinct S)."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64))[0]
    S = torch.arange(rank, 0, -1, dtype=torch.float64) + 1.0
    return (U * S) @ V.T, U, V


def test_gradient_inside_the_subspace_has_ratio_one_and_orthogonal_zero():
    delta, U, V = _delta(24, 16, 8)
    Uk, Vk, rank = principal_subspace(delta, 4, svd="exact")
    assert rank == 8
    g = torch.Generator().manual_seed(1)
    # Inside the top-4 left subspace: U_4 C for any C; inside both: U_4 C V_4^T.
    inside_left = U[:, :4] @ torch.randn(4, 16, generator=g, dtype=torch.float64)
    inside_both = U[:, :4] @ torch.randn(4, 4, generator=g, dtype=torch.float64) @ V[:, :4].T
    proj = torch.eye(24, dtype=torch.float64) - U[:, :4] @ U[:, :4].T
    orth = proj @ torch.randn(24, 16, generator=g, dtype=torch.float64)
    one, two = energy_profile(Uk, inside_left.float(), Vk)
    assert one[3] == pytest.approx(1.0, abs=1e-5)
    one, two = energy_profile(Uk, inside_both.float(), Vk)
    assert one[3] == pytest.approx(1.0, abs=1e-5) and two[3] == pytest.approx(1.0, abs=1e-5)
    one, two = energy_profile(Uk, orth.float(), Vk)
    assert one[3] == pytest.approx(0.0, abs=1e-6) and two[3] == pytest.approx(0.0, abs=1e-6)
    assert np.isnan(energy_profile(Uk, torch.zeros(24, 16), Vk)[0]).all()  # no gradient: no direction
    # The profile grows with k: ratio at k=1 of a gradient along u_1 v_1^T only is already 1.
    one, two = energy_profile(Uk, (U[:, :1] @ V[:, :1].T).float(), Vk)
    np.testing.assert_allclose(one, [1, 1, 1, 1], atol=1e-5)
    np.testing.assert_allclose(two, [1, 1, 1, 1], atol=1e-5)


def test_random_gradients_match_the_isotropic_expectation():
    m, n, K = 64, 48, 8
    delta, _, _ = _delta(m, n, 16, seed=3)
    Uk, Vk, _ = principal_subspace(delta, K, svd="exact")
    g = torch.Generator().manual_seed(7)
    one_DK, two_DK = energy_profile(Uk, torch.randn(1000, m, n, generator=g), Vk)  # 1000 gradients at once
    assert one_DK.shape == (1000, K)
    one, two = one_DK.mean(0), two_DK.mean(0)
    ks = np.arange(1, K + 1)
    np.testing.assert_allclose(one, ks / m, rtol=0.05)
    np.testing.assert_allclose(two, ks**2 / (m * n), rtol=0.15)  # k=1: chi2_1, sd 4.5 % at 1000 draws


def test_random_orthonormal_is_orthonormal_and_baseline_matches_expectation():
    Q = random_orthonormal(30, 5, 3, torch.Generator().manual_seed(0))
    assert Q.shape == (3, 30, 5)
    for q in Q:
        torch.testing.assert_close(q.T @ q, torch.eye(5), atol=1e-5, rtol=0)
    # A structured gradient (inside the update subspace) has ratio 1 there and ~k/m in random subspaces.
    delta, U, V = _delta(40, 40, 10, seed=5)
    g = (U[:, :2] @ V[:, :2].T).float()
    pg = PhaseGradient("pre", tokens=1, rollouts=1, loss_per_token=0.0, grads={"model.layers.0.mlp.up_proj.weight": g})
    res = compute_gradproj({"model.layers.0.mlp.up_proj.weight": delta.float()}, [pg], ks=(2, 4), n_random=64, seed=1)
    rows = {r["k"]: r for r in res.rows}
    assert rows[2]["one_sided"] == pytest.approx(1.0, abs=1e-5)
    assert rows[4]["two_sided"] == pytest.approx(1.0, abs=1e-5)
    assert rows[4]["one_sided_random"] == pytest.approx(4 / 40, rel=0.3)
    assert rows[4]["one_sided_iso"] == 4 / 40 and rows[4]["two_sided_iso"] == 16 / 1600
    assert rows[2]["kind"] == "up" and rows[2]["layer"] == 0


def test_k_beyond_rank_is_nan_and_beyond_the_shape_dropped():
    delta, U, V = _delta(6, 5, 2)
    pg = PhaseGradient("pre", 1, 1, 0.0, {"w": torch.randn(6, 5)})
    res = compute_gradproj({"w": delta.float()}, [pg], ks=(1, 2, 4, 8), n_random=2)
    by_k = {r["k"]: r for r in res.rows}
    assert sorted(by_k) == [1, 2, 4]  # 8 > min(m, n) = 5
    assert np.isfinite(by_k[2]["one_sided"]) and np.isnan(by_k[4]["one_sided"])
    assert np.isfinite(by_k[4]["one_sided_random"])


def test_lowrank_svd_finds_the_same_subspace():
    delta, U, _ = _delta(300, 200, 6, seed=2)
    Ue, _, _ = principal_subspace(delta.float(), 4, svd="exact")
    Ul, _, _ = principal_subspace(delta.float(), 4, svd="lowrank")
    # Same subspace: the projector difference vanishes.
    torch.testing.assert_close(Ue @ Ue.T, Ul @ Ul.T, atol=1e-4, rtol=0)


def test_matrix_kind_names():
    assert matrix_kind("model.layers.3.self_attn.q_proj.weight") == ("q", 3)
    assert matrix_kind("model.layers.11.mlp.down_proj.weight") == ("down", 11)
    assert matrix_kind("model.embed_tokens.weight") == ("embed", -1)
    assert matrix_kind("lm_head.weight") == ("lm_head", -1)
    assert matrix_kind("model.norm.weight") == ("other", -1)


def test_equal_token_samples_per_phase():
    # Two rollouts: [pre x5, agree x3, post x2] and [pre x4]: pools 9 / 3 / 2 -> N = 2 each.
    labels = np.array([0] * 5 + [1] * 3 + [2] * 2 + [0] * 4, dtype=np.int8)
    offsets = np.array([0, 10, 14])
    samples, n = sample_phase_tokens(labels, offsets, max_tokens=100, seed=0)
    assert n == 2 and [s.phase for s in samples] == ["pre", "agreement", "post"]
    post = samples[2]
    assert post.rollout_N.tolist() == [0, 0] and post.pos_N.tolist() == [8, 9]
    for s, ph in zip(samples, (0, 1, 2), strict=True):
        flat = offsets[s.rollout_N] + s.pos_N
        assert (labels[flat] == ph).all() and len(set(flat.tolist())) == 2
    samples, n = sample_phase_tokens(labels, offsets, max_tokens=1, seed=0)
    assert n == 1 and all(len(s.pos_N) == 1 for s in samples)


def test_phase_gradient_is_the_mean_of_per_token_gradients(quick_world):
    """One backward over a phase sample equals the mean of per-token gradients (vectorisation is exact)."""
    from kat_diag.analysis.gradproj import TokenSample, phase_gradients
    from kat_diag.models import load_model

    student = load_model(quick_world / "student", device="cpu")
    teacher = load_model(quick_world / "teacher", device="cpu").requires_grad_(False)
    seqs = [([3, 4, 5], [6, 7, 8, 9]), ([5, 6], [7, 8, 9, 10, 11])]
    both = TokenSample("pre", np.array([0, 1, 1]), np.array([2, 0, 3]))
    singles = [TokenSample("pre", np.array([r]), np.array([p])) for r, p in ((0, 2), (1, 0), (1, 3))]
    (g_all,) = list(phase_gradients(student, teacher, seqs, [both], micro_batch=1))
    parts = list(phase_gradients(student, teacher, seqs, singles, micro_batch=8))
    assert g_all.tokens == 3 and g_all.rollouts == 2
    for name, g in g_all.grads.items():
        torch.testing.assert_close(g, sum(p.grads[name] for p in parts) / 3, atol=1e-6, rtol=1e-4)
    assert g_all.loss_per_token == pytest.approx(np.mean([p.loss_per_token for p in parts]), rel=1e-5)
    assert g_all.grad_norm > 0


def test_gradproj_and_vocab_end_to_end_on_a_two_step_run(quick_world, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app
    from kat_diag.opd.config import SamplingConfig, TrainConfig
    from kat_diag.opd.trainer import train
    from kat_diag.traces.reader import TraceReader

    run = tmp_path / "run"
    train(TrainConfig(teacher=str(quick_world / "teacher"), student=str(quick_world / "student"), out=str(run),
                      steps=2, batch_size=6, micro_batch=6, lr=3e-3, warmup_steps=1, termination="none",
                      sampling=SamplingConfig(max_new_tokens=24, chunk_size=8), eval_n=2, eval_k=1,
                      ckpt_every=1, progress=False, device="cpu"))
    kl = TraceReader(run).read(columns=["kl"])["kl"].values
    tau = float(np.quantile(kl, 0.6))  # OPD run: tau NaN, so fix one that leaves low stretches
    out = tmp_path / "figs"
    res = CliRunner().invoke(app, ["gradproj", str(run), "--out", str(out), "--tau", f"{tau:.6g}",
                                   "--window", "2", "--persistence", "2", "--min-length", "0",
                                   "--tokens", "16", "--k", "1", "--k", "2", "--k", "4", "--random", "2", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert (out / "gradproj.png").stat().st_size > 10_000
    lines = (out / "gradproj.csv").read_text().splitlines()
    assert lines[0].startswith("phase,matrix,kind") and len(lines) > 10
    phases = {p["phase"]: p for p in summary["phases"]}
    assert "pre" in phases and len(phases) >= 2
    assert len({p["tokens"] for p in summary["phases"]}) == 1  # equal token counts per phase
    assert all(p["grad_norm_per_token"] > 0 for p in summary["phases"])
    agg = [a for a in summary["aggregate"] if a["k"] == 1]
    assert agg and all(0 <= a["one_sided"] <= 1 for a in agg)
    assert summary["init"].endswith("student") and "final" in summary["final"]
    # vocab on the same run: token names decoded with the run's tokenizer (config.json student).
    res = CliRunner().invoke(app, ["vocab", str(run), "--out", str(out), "--tau", f"{tau:.6g}", "--window", "2",
                                   "--persistence", "2", "--min-length", "0", "--boot", "50", "--json"])
    assert res.exit_code == 0, res.output
    voc = json.loads(res.stdout)
    assert (out / "vocab.png").stat().st_size > 10_000 and (out / "vocab.csv").stat().st_size > 0
    names = [t["token"] for p in voc["phases"] for t in voc["top_counts"][p]]
    assert names and not any(n.startswith("<") and n[1:-1].isdigit() for n in names)
    assert sum(voc["positions"].values()) == len(kl)  # a fixed tau: every stored token has a phase
