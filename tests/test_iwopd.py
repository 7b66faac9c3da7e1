"""IW-OPD (`kat_diag.opd.loss.ImportanceWeightedOPD`): weights and loss against a direct per-rollout
formula, against TRL's implementation on the same tensors, and a few real steps of the trainer."""

from __future__ import annotations

import math
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from kat_diag.opd.loss import ImportanceWeightedOPD, LossInputs, SampledTokenKL, iw_opd_weights, make_loss

LENGTHS = [5, 1, 9, 3, 7]  # rollouts of different kept lengths, one of a single token


def _inputs(lengths=LENGTHS, v: int = 13, seed: int = 0, old_is_current: bool = False) -> LossInputs:
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    logits = torch.randn(n, v, generator=g)
    tokens = torch.randint(0, v, (n,), generator=g)
    cur = torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    old = cur.clone() if old_is_current else cur + 0.1 * torch.randn(n, generator=g)
    teacher = torch.log_softmax(torch.randn(n, v, generator=g), -1).gather(-1, tokens[:, None]).squeeze(-1)
    return LossInputs(logits.requires_grad_(True), tokens, old, teacher, lengths_B=torch.tensor(lengths))


def _direct_weights(adv: list[float], gamma: float, eps: float = 1e-8) -> list[float]:
    """The paper's w_t for one rollout, term by term."""
    total = max(sum(abs(a) for a in adv), eps)
    return [1 + gamma * (1 - sum(abs(a) for a in adv[:t]) / total) for t in range(len(adv))]


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_weights_and_loss_equal_the_direct_formula(gamma):
    x = _inputs(seed=1)
    adv = (x.teacher_logprob_N - x.old_logprob_N).tolist()
    w_ref, start = [], 0
    for n in LENGTHS:
        w_ref += _direct_weights(adv[start: start + n], gamma)
        start += n
    w = iw_opd_weights(x.teacher_logprob_N - x.old_logprob_N, x.lengths_B, gamma)
    torch.testing.assert_close(w, torch.tensor(w_ref), atol=1e-6, rtol=0)
    assert w[0] == pytest.approx(1 + gamma) and w[5] == pytest.approx(1 + gamma)  # each rollout starts at 1 + gamma

    loss = ImportanceWeightedOPD(gamma)(x)
    cur = torch.log_softmax(x.student_logits_NV.detach(), -1).gather(-1, x.token_ids_N[:, None]).squeeze(-1)
    ref = -sum(float(c) * wi * a for c, wi, a in zip(cur, w_ref, adv, strict=True))
    assert float(loss.detach()) == pytest.approx(ref, rel=1e-5)
    loss.backward()
    p = torch.softmax(x.student_logits_NV.detach(), -1)
    onehot = torch.nn.functional.one_hot(x.token_ids_N, p.shape[-1]).float()
    wa = torch.tensor(w_ref) * torch.tensor(adv)
    torch.testing.assert_close(x.student_logits_NV.grad, -wa[:, None] * (onehot - p), atol=1e-5, rtol=1e-4)


def test_weights_fall_along_a_rollout_and_split_at_rollout_boundaries():
    adv = torch.tensor([1.0, -1.0, 2.0, 0.0, 3.0, -3.0])
    w = iw_opd_weights(adv, torch.tensor([4, 2]), gamma=0.5)
    # rollout 1: |a| = 1, 1, 2, 0 (total 4); rollout 2: 3, 3 (total 6)
    torch.testing.assert_close(w, torch.tensor([1.5, 1.375, 1.25, 1.0, 1.5, 1.25]))
    assert bool((w[:4].diff() <= 0).all())  # non-increasing inside a rollout
    zero = iw_opd_weights(torch.zeros(3), torch.tensor([3]), gamma=0.5)  # total 0: eps keeps it finite
    torch.testing.assert_close(zero, torch.full((3,), 1.5))
    with pytest.raises(ValueError, match="sum to 5"):
        iw_opd_weights(adv, torch.tensor([3, 2]))


def test_gamma_zero_has_the_sampled_estimators_gradient_on_policy():
    """At pi_theta = pi_old the REINFORCE surrogate (TRL's) and the ratio surrogate (`sampled`) have one gradient."""
    a, b = _inputs(seed=2, old_is_current=True), _inputs(seed=2, old_is_current=True)
    ImportanceWeightedOPD(0.0)(a).backward()
    SampledTokenKL()(b).backward()
    torch.testing.assert_close(a.student_logits_NV.grad, b.student_logits_NV.grad, atol=1e-6, rtol=1e-5)


def test_make_loss_and_bad_input():
    loss = make_loss("iwopd", iw_gamma=0.25)
    assert isinstance(loss, ImportanceWeightedOPD) and loss.gamma == 0.25 and loss.teacher_state == "none"
    with pytest.raises(ValueError, match="iw_gamma=-1"):
        make_loss("iwopd", iw_gamma=-1)
    x = _inputs()
    with pytest.raises(ValueError, match="lengths_B"):
        ImportanceWeightedOPD()(LossInputs(x.student_logits_NV, x.token_ids_N, x.old_logprob_N, x.teacher_logprob_N))
    bad = x.teacher_logprob_N.clone()
    bad[3] = -math.inf
    with pytest.raises(ValueError, match="non-finite"):
        ImportanceWeightedOPD()(LossInputs(x.student_logits_NV, x.token_ids_N, x.old_logprob_N, bad,
                                           lengths_B=x.lengths_B))


# ---------------------------------------------------------------------------------------------
# Against TRL


def _trl_loss(x: LossInputs, gamma: float, rollout_logprobs: bool, n_items: int | None):
    """TRL 1.16's `IWOPDTrainer._compute_iw_opd_loss` on x laid out as padded (B, T) rows, called unbound
    with the few attributes it reads (no trainer, model or data set is built)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.iw_opd.iw_opd_trainer import IWOPDTrainer

    lengths = x.lengths_B.tolist()
    B, T, V = len(lengths), max(lengths), x.student_logits_NV.shape[-1]
    logits = torch.zeros(B, T, V)
    tokens = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    teacher = torch.zeros(B, T)  # padding: finite (TRL checks only the valid positions)
    old = torch.zeros(B, T)
    start = 0
    for b, n in enumerate(lengths):
        logits[b, :n] = x.student_logits_NV.detach()[start: start + n]
        tokens[b, :n] = x.token_ids_N[start: start + n]
        labels[b, :n] = tokens[b, :n]
        teacher[b, :n] = x.teacher_logprob_N[start: start + n]
        old[b, :n] = x.old_logprob_N[start: start + n]
        start += n
    logits.requires_grad_(True)
    fake = SimpleNamespace(temperature=1.0, iw_opd_gamma=gamma, iw_opd_epsilon=1e-8,
                           model=SimpleNamespace(training=True), _metrics={"train": defaultdict(list)})
    loss = IWOPDTrainer._compute_iw_opd_loss(fake, logits, tokens, labels, teacher,
                                             rollout_logprobs=old if rollout_logprobs else None,
                                             num_items_in_batch=n_items)
    loss.backward()
    valid = labels != -100
    return loss, logits.grad[valid], fake._metrics["train"]


@pytest.mark.parametrize(("gamma", "old_is_current"), [(0.5, False), (0.5, True), (1.5, False), (0.0, False)])
def test_equals_trl_iw_opd_on_the_same_tensors(gamma, old_is_current):
    """Where ours matches TRL 1.16 (`trl/experimental/iw_opd/iw_opd_trainer.py`, `_compute_iw_opd_loss`):
    - the advantage: a_t = teacher logprob - rollout logprob of the sampled token, detached (TRL's
      `a_opd` with `rollout_logprobs` given; without them TRL uses the current student's logprob,
      which is our old logprob when the update is on-policy: `old_is_current`);
    - the weights: per completion row, exclusive cumulative |a| over the valid tokens divided by the
      row's total |a| clamped at eps = 1e-8, w = 1 + gamma (1 - prefix / total), detached;
    - the loss: -log pi_theta(y_t) * w_t * a_t summed over valid tokens, divided by
      `num_items_in_batch` (TRL) — ours returns the sum and the trainer divides by the step's kept
      tokens, the same normalisation (checked here with num_items_in_batch = N, and against TRL's
      fallback mean over valid tokens without it).
    Rows are our rollouts: TRL's row = one completion, its valid mask = our kept tokens.
    """
    pytest.importorskip("trl", reason="trl not installed (pip install 'kat-diag[trl]' or trl>=1.16)")
    pytest.importorskip("trl.experimental.iw_opd", reason="this trl has no experimental.iw_opd (needs trl>=1.16)")
    x = _inputs(seed=5, old_is_current=old_is_current)
    n = int(x.lengths_B.sum())
    ours = ImportanceWeightedOPD(gamma)(x)
    (ours / n).backward()
    for n_items in (n, None):
        theirs, grad, metrics = _trl_loss(x, gamma, rollout_logprobs=not old_is_current, n_items=n_items)
        assert float(theirs.detach()) == pytest.approx(float(ours.detach()) / n, rel=1e-5, abs=1e-7)
        torch.testing.assert_close(grad, x.student_logits_NV.grad, atol=1e-6, rtol=1e-5)
    w = iw_opd_weights(x.teacher_logprob_N - x.old_logprob_N, x.lengths_B, gamma)
    assert metrics["iw_opd/mean_weight"][-1] == pytest.approx(float(w.mean()), rel=1e-5)
    assert metrics["iw_opd/min_weight"][-1] == pytest.approx(float(w.min()), rel=1e-5)
    assert metrics["iw_opd/max_weight"][-1] == pytest.approx(float(w.max()), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# In the trainer


def test_kat_plus_iwopd_trains_and_weights_per_rollout_whatever_the_micro_batch(quick_world, tmp_path):
    """`--termination kat --loss iwopd` is one run; the weights belong to rollouts, so splitting a step
    into micro-batches of 1 or 4 rollouts gives the same update (and a different gamma does not)."""
    import json

    from kat_diag.kat.config import KATConfig
    from kat_diag.opd.config import SamplingConfig, TrainConfig
    from kat_diag.opd.trainer import train

    def run(name: str, micro: int, gamma: float = 0.5):
        cfg = TrainConfig(
            teacher=str(quick_world / "teacher"), student=str(quick_world / "student"), out=str(tmp_path / name),
            steps=3, batch_size=4, micro_batch=micro, lr=3e-3, warmup_steps=1, loss="iwopd", iw_gamma=gamma,
            sampling=SamplingConfig(max_new_tokens=24, chunk_size=4), termination="kat",
            kat=KATConfig(window=4, persistence=2, min_length=4, warmup_steps=1, buffer_size=64, min_fill=2,
                          tau_quantile=0.9),
            eval_n=0, ckpt_every=0, trace_every=0, progress=False, device="cpu")
        return train(cfg)

    a, b, c = run("a", 4), run("b", 1), run("c", 4, gamma=2.0)
    for (name, pa), pb in zip(a.student.named_parameters(), b.student.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5, msg=name)
    assert any(not torch.allclose(pa, pc) for pa, pc in zip(a.student.parameters(), c.student.parameters(),
                                                             strict=True))
    rows = [json.loads(ln) for ln in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert json.loads((tmp_path / "a" / "config.json").read_text())["loss"] == "iwopd"
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert any(r["fired_share"] > 0 for r in rows if "loss" in r)  # KAT cut while IW-OPD weighted


def test_the_store_manifest_names_gamma_only_for_iwopd(tmp_path):
    from kat_diag.traces.reader import TraceReader
    from kat_diag.traces.writer import TraceWriter

    for loss, want in (("iwopd", {"estimator": "iwopd", "topk": 64, "iw_gamma": 0.5}),
                       ("topk", {"estimator": "topk", "topk": 64})):
        with TraceWriter(tmp_path / loss, config={"loss": loss, "topk": 64, "iw_gamma": 0.5}) as w:
            w.append({"step": 0, "prompt_id": "p", "policy": "none", "token_ids": [[1, 2]], "kl": [[0.1, 0.2]]})
        assert TraceReader(tmp_path / loss).manifest["loss"] == want
