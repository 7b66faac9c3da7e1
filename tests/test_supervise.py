"""Stage-wise supervision: the loss mask equals planted phases; the trainer runs with it and resumes."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from kat_diag.kat.config import KATConfig
from kat_diag.kat.detector import buffer_values_of
from kat_diag.kat.policies import make_policy
from kat_diag.opd.config import SamplingConfig, TrainConfig
from kat_diag.opd.rollout import Rollout
from kat_diag.opd.supervise import PhaseSupervision, parse_phases, with_supervision
from kat_diag.opd.trainer import train


def small_kat(**kw) -> KATConfig:
    """W 4, T 3, L0 0, no warm-up (and B_min 1 where the detector has it)."""
    names = {f.name for f in dataclasses.fields(KATConfig)}
    base = dict(window=4, persistence=3, min_length=0, warmup_steps=0, buffer_size=4096)
    if "min_fill" in names:
        base["min_fill"] = 1
    base.update({k: v for k, v in kw.items() if k in names})
    return KATConfig(**base)


def planted(pre: int, agree: int, post: int, index: int) -> Rollout:
    """KL 5 nats on pre and post tokens, 0.001 on the agreement stretch."""
    kl = torch.cat([torch.full((pre,), 5.0), torch.full((agree,), 1e-3), torch.full((post,), 5.0)])
    n = kl.numel()
    return Rollout(index=index, prompt_ids=torch.tensor([1, 2, 3]), token_ids=torch.arange(10, 10 + n),
                   student_logprob=-kl, teacher_logprob=-2 * kl, kl=kl, kl_sampled=kl, student_entropy=kl,
                   teacher_top_ids=torch.zeros(n, 2, dtype=torch.long), teacher_top_probs=torch.zeros(n, 2),
                   keep=n, stop_reason="eos", teacher_logprobs_full=kl[:, None].repeat(1, 7))


SHAPES = [(10, 12, 9), (5, 20, 0), (7, 0, 14), (30, 8, 3)]  # (pre, agreement, post); 0 agreement: no fire


@pytest.mark.parametrize("spec,span", [
    ("pre", lambda a, b, c: (0, a if b else a + c)),
    ("agreement", lambda a, b, c: (a, a + b) if b else (a + c, a + c)),
    ("post", lambda a, b, c: (a + b, a + b + c) if b else (a + c, a + c)),
    ("pre+agreement", lambda a, b, c: (0, a + b) if b else (0, a + c)),
    ("agreement+post", lambda a, b, c: (a, a + b + c) if b else (a + c, a + c)),
])
def test_mask_equals_the_planted_phases(spec, span):
    sup = PhaseSupervision(spec, small_kat())
    sup.threshold.observe(np.full(600, 0.5))  # tau = 0.5: agreement windows are low, the rest high
    sup.begin_step(0)
    assert sup.tau == pytest.approx(0.5)
    rollouts = [planted(*s, index=i) for i, s in enumerate(SHAPES)]
    out, metrics = sup.select(rollouts)
    for r, o, (a, b, c) in zip(rollouts, out, SHAPES, strict=True):
        lo, hi = span(a, b, c)
        assert (o.keep, len(o.prompt_ids) - 3) == (hi - lo, lo), (spec, a, b, c)
        # The kept tokens are tokens[lo:hi], after the prompt plus tokens[:lo] as context.
        assert torch.equal(o.token_ids, r.token_ids[lo:hi])
        assert torch.equal(o.prompt_ids, torch.cat([r.prompt_ids, r.token_ids[:lo]]))
        assert torch.equal(o.teacher_logprobs_full, r.teacher_logprobs_full[lo:hi])
    n = sum(map(sum, SHAPES))
    assert metrics["supervise_agreement_share"] == pytest.approx(sum(s[1] for s in SHAPES) / n)


def test_warmup_trains_everything_as_pre_and_threshold_fills_from_full_rollouts():
    cfg = small_kat(warmup_steps=1)
    sup = PhaseSupervision("agreement", cfg)
    sup.begin_step(0)
    assert np.isnan(sup.tau)
    rollouts = [planted(10, 12, 9, 0), planted(4, 30, 2, 1)]
    out, metrics = sup.select(rollouts)
    assert out[0].keep == 0 and metrics["supervise_pre_share"] == 1.0
    sup.end_step([r.kl for r in rollouts])
    # The step's full rollouts entered the buffer exactly as KAT's buffer takes them.
    expected = buffer_values_of([r.kl for r in rollouts], cfg)
    assert expected.size > 0 and np.array_equal(sup.threshold.buffer.numpy(), expected)
    with pytest.raises(ValueError, match="kl_by_rollout"):
        sup.end_step()


def test_phase_spec_errors_and_policy_check():
    assert parse_phases("pre+agreement") == (0, 1) and parse_phases("post") == (2, 2)
    with pytest.raises(ValueError, match="adjacent"):
        parse_phases("pre+post")
    with pytest.raises(ValueError, match="phases are"):
        parse_phases("middle")
    with pytest.raises(ValueError, match="--termination none"):
        with_supervision(make_policy("kat"), "pre", KATConfig())


def test_trainer_supervises_phases_and_resumes(quick_world, tmp_path):
    def cfg(out, **kw):
        return TrainConfig(teacher=str(quick_world / "teacher"), student=str(quick_world / "student"), out=str(out),
                           steps=3, batch_size=4, lr=3e-3, warmup_steps=1, termination="none", supervise="pre",
                           sampling=SamplingConfig(max_new_tokens=20, chunk_size=4),
                           kat=small_kat(window=4, persistence=2, min_length=4, warmup_steps=1), eval_n=0,
                           ckpt_every=1, progress=False, device="cpu", **kw)

    seen = []
    full = train(cfg(tmp_path / "a"), on_step=lambda s, m: seen.append(s)).student.state_dict()
    assert seen == [0, 1, 2]
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all("policy/supervise_trained_share" in m for m in lines)
    assert not any(k.startswith("eval/") for m in lines for k in m)  # eval_n 0: no evaluation
    assert lines[-1]["kept_len_mean"] == pytest.approx(lines[-1]["gen_len_mean"] *
                                                       lines[-1]["policy/supervise_trained_share"])
    train(cfg(tmp_path / "b", max_steps_this_run=2))
    resumed = train(cfg(tmp_path / "b"), resume=True).student.state_dict()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
