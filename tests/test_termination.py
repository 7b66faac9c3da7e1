"""Termination policies: one interface, the documented stop/keep/end semantics, metrics, resume."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch

from kat_diag.kat.config import KATConfig
from kat_diag.kat.policies import (
    POLICY_NAMES,
    KATPolicy,
    RandomPolicy,
    StopDecision,
    TerminationPolicy,
    make_policy,
    target_from_metrics,
)

SMALL = KATConfig(window=4, persistence=3, min_length=0, warmup_steps=1, buffer_size=256, min_fill=1,
                  tau_quantile=0.5, statistic="windows")
COMMON_KEYS = {"rollouts", "stopped_share", "gen_len_mean", "kept_len_mean", "tokens_generated", "tokens_kept"}


def trap_trace(n_rows: int, high: int = 20, low: int = 40) -> torch.Tensor:
    """High KL, then a long low stretch (the trap)."""
    return torch.cat([torch.full((n_rows, high), 1.0), torch.full((n_rows, low), 0.001)], 1)


def stored_kl(kl: torch.Tensor, dec: StopDecision) -> list[torch.Tensor]:
    """What the engine would store of each row: up to its end if the policy stopped it, else all."""
    ends = torch.where(dec.stop_B, dec.end_B, torch.full_like(dec.end_B, kl.shape[1]))
    return [kl[b, : int(e)] for b, e in enumerate(ends.tolist())]


def run_step(policy: TerminationPolicy, step: int, kl: torch.Tensor, chunk: int) -> tuple[StopDecision, dict]:
    policy.begin_step(step)
    policy.add_rows(kl.shape[0])
    dec = None
    for s in range(0, kl.shape[1], chunk):
        dec = policy.update(kl[:, s: s + chunk])
    assert dec is not None
    return dec, policy.end_step(stored_kl(kl, dec))


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_factory_builds_every_policy_behind_the_protocol(name):
    policy = make_policy(name, SMALL, prefix_len=16, random_target=8.0, seed=1)
    assert isinstance(policy, TerminationPolicy)
    assert policy.name == name
    _, metrics = run_step(policy, 0, trap_trace(3), chunk=7)
    assert COMMON_KEYS <= metrics.keys()
    assert metrics["rollouts"] == 3.0


def test_factory_errors_are_clear():
    with pytest.raises(ValueError, match="unknown termination policy 'kta'"):
        make_policy("kta")
    with pytest.raises(ValueError, match="prefix_len"):
        make_policy("prefix")
    with pytest.raises(ValueError, match="prefix_len"):
        make_policy("kat+prefix", SMALL)
    with pytest.raises(ValueError, match="random_target"):
        make_policy("random")
    with pytest.raises(ValueError, match="prefix_len=0"):
        make_policy("prefix", prefix_len=0)
    with pytest.raises(ValueError, match="target"):
        make_policy("random", random_target=0.5)
    assert make_policy(" KAT+Prefix ", prefix_len=4).name == "kat+prefix"


def test_none_never_stops():
    policy = make_policy("none")
    dec, metrics = run_step(policy, 0, trap_trace(4), chunk=5)
    assert not bool(dec.stop_B.any()) and dec.keep_B.tolist() == [-1] * 4
    assert metrics["kept_len_mean"] == metrics["gen_len_mean"] == 60.0
    assert metrics["stopped_share"] == 0.0
    assert policy.max_new_tokens(100) == 100


def test_prefix_stops_at_p_and_caps_the_budget():
    policy = make_policy("prefix", prefix_len=10)
    assert policy.max_new_tokens(100) == 10 and policy.max_new_tokens(5) == 5
    policy.begin_step(0)
    policy.add_rows(2)
    dec = policy.update(torch.zeros(2, 6))
    assert dec.stop_B.tolist() == [False, False]
    dec = policy.update(torch.zeros(2, 6), torch.tensor([[True] * 6, [True] * 3 + [False] * 3]))
    assert dec.stop_B.tolist() == [True, False]  # row 1 has only 9 tokens
    assert dec.keep_B.tolist() == [10, -1] and dec.end_B.tolist() == [10, -1]
    metrics = policy.end_step()
    assert metrics["kept_len_mean"] == (10 + 9) / 2 and metrics["prefix_len"] == 10.0


def test_kat_observes_during_warmup_then_fires_and_keeps_the_prefix_before_onset():
    policy = make_policy("kat", SMALL)
    dec, m0 = run_step(policy, 0, trap_trace(4), chunk=8)
    assert not bool(dec.stop_B.any()) and m0["kat_active"] == 0.0 and math.isnan(m0["tau"])
    assert m0["buffer_added"] == 4 * 15 and m0["buffer_size"] == 60
    # Buffer: 5 high and 10 low stride windows per row -> the median is the low value (0.001);
    # in step 1 the trap is a lower stretch.
    kl = torch.cat([torch.full((4, 20), 1.0), torch.full((4, 40), 0.0001)], 1)
    dec, m1 = run_step(policy, 1, kl, chunk=8)
    assert m1["kat_active"] == 1.0 and m1["tau"] == pytest.approx(0.001, rel=1e-3)
    assert m1["buffer_added"] == 4 * 6  # stored rollouts end at fire = 25: windows 3, 7, ..., 23
    # First low window ends at 20 + W - 1 = 23, T = 3 low windows -> fire at 25, onset 20.
    assert dec.stop_B.all()
    assert dec.end_B.tolist() == [26] * 4 and dec.keep_B.tolist() == [20] * 4
    assert m1["fired_share"] == 1.0 and m1["fire_mean"] == 25.0 and m1["onset_mean"] == 20.0
    assert m1["kept_len_mean"] == 20.0 and m1["gen_len_mean"] == 26.0
    assert policy.row_info()["tokens"].numel() == 0  # end_step dropped the rows


def test_kat_keep_fire_mode_trains_through_the_fire_token():
    cfg = KATConfig(window=4, persistence=3, min_length=0, warmup_steps=0, min_fill=1, keep="fire")
    policy = KATPolicy(cfg)
    policy.threshold.observe([0.5])
    dec, _ = run_step(policy, 0, trap_trace(2), chunk=60)
    # tau = 0.5: window i=22 (tokens 19..22, one high) is already low -> fire at 24.
    assert dec.end_B.tolist() == [25, 25] and dec.keep_B.tolist() == [25, 25]


def test_kat_plus_prefix_stops_at_the_budget_or_earlier_on_a_trap():
    cfg = KATConfig(window=4, persistence=3, min_length=0, warmup_steps=0, min_fill=1)
    policy = make_policy("kat+prefix", cfg, prefix_len=30)
    policy.threshold.observe([0.5])  # type: ignore[attr-defined]
    assert policy.max_new_tokens(100) == 30
    kl = torch.cat([trap_trace(1), torch.ones(1, 60)])  # row 0 trapped at 20, row 1 never low
    dec, metrics = run_step(policy, 0, kl, chunk=16)
    assert dec.stop_B.tolist() == [True, True]
    assert dec.end_B.tolist() == [25, 30] and dec.keep_B.tolist() == [19, 30]
    assert metrics["fired_share"] == 0.5 and metrics["stopped_share"] == 1.0
    # A trap after the budget is invisible to the detector.
    late = torch.cat([torch.ones(1, 28), torch.zeros(1, 40)], 1)
    dec, metrics = run_step(policy, 1, late, chunk=16)
    assert dec.end_B.tolist() == [30] and metrics["fired_share"] == 0.0


def test_random_matches_the_target_mean_kept_length_on_long_rollouts():
    target = 40.0
    policy = make_policy("random", random_target=target, seed=3)
    _, metrics = run_step(policy, 0, torch.zeros(4000, 1000), chunk=250)
    # Geometric with mean 40: sd 39.5, standard error over 4000 rollouts ~0.62.
    assert metrics["kept_len_mean"] == pytest.approx(target, abs=2.5)
    assert metrics["stopped_share"] == 1.0
    assert metrics["random_stop_prob"] == 1 / target


def test_random_cuts_do_not_depend_on_chunking_and_resume_from_state():
    a, b = RandomPolicy(12.0, seed=5), RandomPolicy(12.0, seed=5)
    kl = torch.zeros(64, 200)
    dec_a, _ = run_step(a, 0, kl, chunk=1)
    dec_b, _ = run_step(b, 0, kl, chunk=37)
    assert torch.equal(dec_a.keep_B, dec_b.keep_B) and torch.equal(dec_a.end_B, dec_b.end_B)
    assert dec_a.keep_B.min().item() >= 1
    # Resume: a fresh policy loaded from a's state draws what a draws next.
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    c = RandomPolicy(1.0, seed=0)
    c.load_state_dict(torch.load(buf, weights_only=True))
    dec_a, _ = run_step(a, 1, kl, chunk=10)
    dec_c, _ = run_step(c, 1, kl, chunk=10)
    assert torch.equal(dec_a.keep_B, dec_c.keep_B)


def test_random_target_from_a_kat_run_metrics_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "term/kept_len_mean": 100.0, "term/rollouts": 10},
            {"step": 1, "loss": 0.3},
            {"step": 2, "term/kept_len_mean": 40.0, "term/rollouts": 30}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert target_from_metrics(path) == pytest.approx((100 * 10 + 40 * 30) / 40)
    policy = make_policy("random", random_target=str(path))
    assert policy.target == pytest.approx(55.0)  # type: ignore[attr-defined]
    (tmp_path / "empty.jsonl").write_text('{"loss": 1}\n')
    with pytest.raises(ValueError, match="kept_len_mean"):
        target_from_metrics(tmp_path / "empty.jsonl")


def test_compaction_books_finished_rows_and_refills():
    cfg = KATConfig(window=4, persistence=3, min_length=0, warmup_steps=0, min_fill=1)
    policy = KATPolicy(cfg)
    policy.threshold.observe([0.5])
    policy.begin_step(0)
    policy.add_rows(2)
    # Windows (W=4) low from i=6 (tokens 3..6: one high, three low); T=3 -> fire at 8, onset 3.
    dec = policy.update(trap_trace(2, high=4, low=4))
    assert dec.stop_B.tolist() == [False, False]
    dec = policy.update(trap_trace(2, high=0, low=4))
    assert dec.stop_B.tolist() == [True, True]
    assert dec.end_B.tolist() == [9, 9] and dec.keep_B.tolist() == [3, 3]
    policy.keep_rows(torch.tensor([], dtype=torch.int64))  # both finished
    policy.add_rows(1)  # refill: a fresh rollout, independent of the dropped ones
    dec = policy.update(torch.ones(1, 8))
    assert dec.stop_B.tolist() == [False]
    with pytest.raises(ValueError, match="kl_by_rollout"):
        policy.end_step()
    metrics = policy.end_step([torch.ones(9), torch.ones(9), torch.ones(8)])
    assert metrics["rollouts"] == 3.0 and metrics["fired_share"] == pytest.approx(2 / 3)
    assert metrics["gen_len_mean"] == pytest.approx((9 + 9 + 8) / 3)
    assert metrics["kept_len_mean"] == pytest.approx((3 + 3 + 8) / 3)


def test_kat_rollout_min_statistic_is_the_paper_rule():
    """Each stored rollout pushes its minimum window mean; tau = the 0.7 quantile; active only from
    step K on with at least B_min values; the threshold in force is NaN while inactive."""
    cfg = KATConfig(window=4, persistence=3, min_length=0, warmup_steps=1, buffer_size=8, min_fill=3,
                    tau_quantile=0.7)
    policy = make_policy("kat", cfg)
    rows = torch.stack([torch.full((12,), v) for v in (0.5, 0.25, 0.125, 0.0625)])
    _, m0 = run_step(policy, 0, rows, chunk=5)
    assert m0["buffer_added"] == 4 and math.isnan(m0["tau"]) and m0["kat_active"] == 0.0
    assert policy.threshold.buffer.tolist() == [0.5, 0.25, 0.125, 0.0625]
    _, m1 = run_step(policy, 1, trap_trace(2, high=20, low=40), chunk=7)
    # 0.7 quantile of [0.0625, 0.125, 0.25, 0.5] (linear): 0.125 + 0.1 * 0.125 * ... = 0.2125
    assert m1["tau"] == pytest.approx(float(torch.quantile(torch.tensor([0.5, 0.25, 0.125, 0.0625],
                                                                        dtype=torch.float64), 0.7)))
    assert m1["fired_share"] == 1.0


def test_kat_stays_inactive_below_min_fill():
    cfg = KATConfig(window=4, persistence=3, min_length=0, warmup_steps=0, buffer_size=8, min_fill=5)
    policy = make_policy("kat", cfg)
    for step in range(3):  # two rollouts per step: 2, 4, 6 values -> active from step 3
        _, m = run_step(policy, step, trap_trace(2), chunk=8)
        assert m["kat_active"] == 0.0 and math.isnan(m["tau"]) and m["fired_share"] == 0.0
    kl = torch.cat([torch.full((2, 20), 1.0), torch.full((2, 40), 0.0001)], 1)  # below tau = 0.001
    _, m = run_step(policy, 3, kl, chunk=8)
    assert m["kat_active"] == 1.0 and m["tau"] == pytest.approx(0.001, rel=1e-4) and m["fired_share"] == 1.0


def test_kat_state_dict_resumes_the_threshold():
    policy = make_policy("kat", SMALL)
    run_step(policy, 0, trap_trace(4), chunk=8)
    buf = io.BytesIO()
    torch.save(policy.state_dict(), buf)
    buf.seek(0)
    fresh = make_policy("kat", SMALL)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    kl = torch.cat([torch.full((4, 20), 1.0), torch.full((4, 40), 0.0001)], 1)
    (dec_a, m_a), (dec_b, m_b) = run_step(policy, 1, kl, 8), run_step(fresh, 1, kl, 8)
    assert torch.equal(dec_a.end_B, dec_b.end_B) and m_a["tau"] == m_b["tau"]
    with pytest.raises(ValueError, match="state_dict of policy"):
        make_policy("none").load_state_dict(policy.state_dict())


def test_contract_errors():
    policy = make_policy("none")
    policy.begin_step(0)
    policy.add_rows(2)
    with pytest.raises(ValueError, match="2 rows"):
        policy.update(torch.zeros(3, 4))
    with pytest.raises(RuntimeError, match="in flight"):
        policy.begin_step(1)


def run_engine_like(policy: TerminationPolicy, step: int, natural: torch.Tensor, chunk: int) -> dict:
    """One step like the engine runs it: rows end on their own after `natural` tokens (EOS) unless
    the policy stops them first; finished rows leave the batch by compaction."""
    policy.begin_step(step)
    policy.add_rows(natural.numel())
    n = torch.zeros_like(natural)
    left = natural.clone()
    while policy.num_rows:  # type: ignore[attr-defined]
        valid = torch.arange(chunk)[None, :] < left[:, None]
        dec = policy.update(torch.zeros(left.numel(), chunk), valid)
        n = n + valid.sum(1)
        live = ((n < natural) & ~dec.stop_B).nonzero().squeeze(-1)
        policy.keep_rows(live)
        n, natural, left = n[live], natural[live], (natural - n)[live]
    return policy.end_step()


def test_survival_and_stop_probability_match_closed_forms():
    from kat_diag.kat.policies import stop_prob_for_mean_kept, survival

    # Lengths 2, 4 (ended) and 3 (cut): S(1)=S(2)=1, S(3)=2/3, S(4)=2/3 * (1 - 1/1)=... at t=4 one at risk, dies.
    s = survival([2, 3, 4], [True, False, True], horizon=5)
    assert s.tolist() == pytest.approx([1.0, 1.0, 2 / 3, 2 / 3, 0.0])
    # All rollouts of natural length 50: E[min(G, 50)] = (1 - (1-p)^50) / p.
    lengths, ended = np.full(100, 50), np.ones(100, bool)
    p = stop_prob_for_mean_kept(lengths, ended, 20.0)
    assert (1 - (1 - p) ** 50) / p == pytest.approx(20.0, rel=1e-6)
    assert stop_prob_for_mean_kept(lengths, ended, 60.0) == 0.0  # above the natural mean: never cut


def test_random_is_length_matched_when_rollouts_end_on_their_own():
    # Natural lengths 10..70 (mean 40): a geometric cut with mean 31 keeps only ~19 on average
    # (the failure of the plain geometric cut); the controller must realise 31 within 10 %.
    gen = torch.Generator().manual_seed(0)
    target, steps = 31.0, 12
    # A fresh policy's first step, without data, is the plain geometric cut with mean = target.
    naive = run_engine_like(RandomPolicy(target, seed=1), 0, torch.randint(10, 71, (2048,), generator=gen), 16)
    assert naive["random_stop_prob"] == 1 / target and naive["kept_len_mean"] < 0.75 * target
    policy = RandomPolicy(target, seed=1)
    rows = [run_engine_like(policy, s, torch.randint(10, 71, (256,), generator=gen), chunk=16) for s in range(steps)]
    realised = sum(r["tokens_kept"] for r in rows) / sum(r["rollouts"] for r in rows)
    assert realised == pytest.approx(target, rel=0.1)
    assert rows[-1]["random_kept_len_run_mean"] == pytest.approx(realised)
    assert rows[-1]["random_stop_prob"] < 1 / target  # cuts later than the naive geometric cut


def test_random_controller_state_resumes_exactly():
    gen = torch.Generator().manual_seed(4)
    nats = [torch.randint(5, 60, (64,), generator=gen) for _ in range(4)]
    a = RandomPolicy(25.0, seed=2, prior=(np.array([30, 40, 50]), np.array([True, True, False])))
    for s in range(2):
        run_engine_like(a, s, nats[s], chunk=8)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = RandomPolicy(3.0, seed=0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    for s in (2, 3):
        assert run_engine_like(a, s, nats[s], chunk=8) == run_engine_like(b, s, nats[s], chunk=8)
