"""Rollout engine and OPD losses: online chunked scoring vs one post-hoc forward, losses vs references."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from kat_diag.kat.config import KATConfig
from kat_diag.kat.policies import make_policy
from kat_diag.models import tiny_qwen3_config
from kat_diag.opd.config import SamplingConfig
from kat_diag.opd.loss import FullReverseKL, LossInputs, SampledTokenKL, TopKReverseKL, make_loss, topk_teacher_state
from kat_diag.opd.rollout import RolloutEngine, encode_prompts, sample_next
from kat_diag.world.tokenizer import build_char_tokenizer

PROMPTS = ["12 +3 -4\n", "5 *2\n", "99 -9 -9 -9\n", "1\n", "7 +7\n", "30 -3 +8 *2 -1\n", "4 *4\n"]


@pytest.fixture(scope="module")
def models():
    tok = build_char_tokenizer()

    def make(seed: int, hidden: int, layers: int):
        torch.manual_seed(seed)
        cfg = tiny_qwen3_config(len(tok), hidden, layers, 2, 2 * hidden, tok.pad_token_id, tok.eos_token_id)
        return AutoModelForCausalLM.from_config(cfg).eval()

    return tok, make(0, 32, 2), make(1, 48, 2)


def _posthoc(model, prompt_ids, token_ids):
    full = torch.cat([prompt_ids, token_ids])[None]
    with torch.no_grad():
        logits = model(full).logits.float()
    return torch.log_softmax(logits, -1)[0, len(prompt_ids) - 1 : -1]


@pytest.mark.parametrize(("chunk", "slots"), [(1, 0), (4, 0), (5, 3), (16, 2)])
def test_online_chunked_scoring_equals_posthoc_forward(models, chunk, slots):
    tok, student, teacher = models
    eng = RolloutEngine(student, teacher, tok.eos_token_id, tok.pad_token_id,
                        SamplingConfig(max_new_tokens=37, chunk_size=chunk, slots=slots))
    policy = make_policy("none", kat=KATConfig(), prefix_len=None, random_target=None, seed=0)
    policy.begin_step(0)
    rollouts, stats = eng.run(encode_prompts(tok, PROMPTS), policy, torch.Generator().manual_seed(0),
                              teacher_state="full")
    assert [r.index for r in rollouts] == list(range(len(PROMPTS)))
    for r in rollouts:
        assert r.gen_len == 37 or r.stop_reason == "eos"
        lt = _posthoc(teacher, r.prompt_ids, r.token_ids)
        ls = _posthoc(student, r.prompt_ids, r.token_ids)
        kl = (ls.exp() * (ls - lt)).sum(-1)
        idx = r.token_ids[:, None]
        torch.testing.assert_close(r.kl, kl, atol=1e-5, rtol=0)
        torch.testing.assert_close(r.teacher_logprob, lt.gather(-1, idx).squeeze(-1), atol=1e-5, rtol=0)
        torch.testing.assert_close(r.student_logprob, ls.gather(-1, idx).squeeze(-1), atol=1e-5, rtol=0)
        torch.testing.assert_close(r.kl_sampled, r.student_logprob - r.teacher_logprob)
        torch.testing.assert_close(r.teacher_logprobs_full, lt[: r.keep], atol=1e-5, rtol=0)
        torch.testing.assert_close(r.student_entropy, -(ls.exp() * ls).sum(-1), atol=1e-5, rtol=0)
        assert r.teacher_top_ids.shape == (r.gen_len, 5)
        torch.testing.assert_close(r.teacher_top_probs[:, 0], lt.exp().max(-1).values, atol=1e-5, rtol=0)
    # Scoring is chunked: one teacher forward per chunk (+ prefills), not one per token.
    if chunk > 1:
        assert stats.teacher_forwards < stats.student_forwards


@pytest.mark.parametrize("micro_batch", [1, 3, 16])
def test_teacher_forced_scoring_reproduces_the_engine(models, micro_batch):
    """`score_completions` (one padded forward per micro-batch, no generation) gives every per-token
    number the engine computed online for the same tokens, rows of different lengths batched."""
    from kat_diag.opd.scoring import score_completions

    tok, student, teacher = models
    eng = RolloutEngine(student, teacher, tok.eos_token_id, tok.pad_token_id,
                        SamplingConfig(max_new_tokens=29, chunk_size=4, slots=3))
    policy = make_policy("none", kat=KATConfig(), prefix_len=None, random_target=None, seed=0)
    policy.begin_step(0)
    rollouts, _ = eng.run(encode_prompts(tok, PROMPTS), policy, torch.Generator().manual_seed(3))
    scored = score_completions(student, teacher, [r.prompt_ids.tolist() for r in rollouts],
                               [r.token_ids.tolist() for r in rollouts], pad_token_id=tok.pad_token_id,
                               top_n=5, micro_batch=micro_batch)
    assert len({r.gen_len for r in rollouts}) > 1  # ragged rows really were padded together
    for r, s in zip(rollouts, scored, strict=True):
        for key in ("kl", "kl_sampled", "student_logprob", "teacher_logprob", "student_entropy", "teacher_top_probs"):
            torch.testing.assert_close(s[key], getattr(r, key), atol=1e-5, rtol=0, msg=key)
        assert torch.equal(s["teacher_top_ids"], r.teacher_top_ids)
    with pytest.raises(ValueError, match="prompts but"):
        score_completions(student, teacher, [[1]], [], pad_token_id=tok.pad_token_id)


def test_rollouts_are_a_function_of_the_generator_seed(models):
    """Same seed and config -> identical rollouts (what exact resume relies on); another seed differs."""
    tok, student, teacher = models
    outs = []
    for seed in (5, 5, 6):
        eng = RolloutEngine(student, teacher, tok.eos_token_id, tok.pad_token_id,
                            SamplingConfig(max_new_tokens=20, chunk_size=4, slots=2))
        policy = make_policy("none", kat=KATConfig(), prefix_len=None, random_target=None, seed=0)
        policy.begin_step(0)
        ro, _ = eng.run(encode_prompts(tok, PROMPTS[:3]), policy, torch.Generator().manual_seed(seed))
        outs.append([r.token_ids.tolist() for r in ro])
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]


def test_prefix_policy_truncates_and_compacts(models):
    tok, student, teacher = models
    eng = RolloutEngine(student, teacher, tok.eos_token_id, tok.pad_token_id,
                        SamplingConfig(max_new_tokens=40, chunk_size=4, slots=3))
    policy = make_policy("prefix", kat=KATConfig(), prefix_len=9, random_target=None, seed=0)
    policy.begin_step(0)
    rollouts, stats = eng.run(encode_prompts(tok, PROMPTS), policy, torch.Generator().manual_seed(1))
    for r in rollouts:
        assert r.gen_len <= 9 and r.keep <= 9
    assert stats.generated_tokens <= 9 * len(PROMPTS)


def test_top_p_sampling_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, 0.5, gen)) for _ in range(50)}
    assert draws == {0}
    draws = {int(sample_next(logits, 1.0, 0.85, gen)) for _ in range(200)}
    assert draws == {0, 1}


def _inputs(seed=0, n=6, v=11, full=True):
    g = torch.Generator().manual_seed(seed)
    s_logits = torch.randn(n, v, generator=g, requires_grad=True)
    t_logp = torch.log_softmax(torch.randn(n, v, generator=g), -1)
    tokens = torch.randint(0, v, (n,), generator=g)
    old = torch.log_softmax(s_logits.detach(), -1).gather(-1, tokens[:, None]).squeeze(-1)
    return LossInputs(s_logits, tokens, old, t_logp.gather(-1, tokens[:, None]).squeeze(-1),
                      t_logp if full else None)


def test_full_reverse_kl_matches_direct_formula():
    x = _inputs()
    loss = FullReverseKL()(x)
    ref = 0.0
    for i in range(x.student_logits_NV.shape[0]):
        p = torch.softmax(x.student_logits_NV[i].detach().double(), -1)
        q = x.teacher_logprobs_NV[i].double().exp()
        ref += float((p * (p / q).log()).sum())
    assert float(loss.detach()) == pytest.approx(ref, rel=1e-5)
    loss.backward()
    # d/dz KL(softmax(z) || q) = p * (log p - log q - KL)
    p = torch.softmax(x.student_logits_NV.detach(), -1)
    lp, lq = p.log(), x.teacher_logprobs_NV
    kl = (p * (lp - lq)).sum(-1, keepdim=True)
    torch.testing.assert_close(x.student_logits_NV.grad, p * (lp - lq - kl), atol=1e-5, rtol=1e-4)


def test_sampled_token_loss_is_advantage_weighted_policy_gradient():
    x = _inputs(full=False)
    loss = SampledTokenKL()(x)
    adv = x.teacher_logprob_N - x.old_logprob_N
    assert float(loss.detach()) == pytest.approx(float(-adv.sum()), rel=1e-5)  # ratio = 1 at the sampling policy
    loss.backward()
    p = torch.softmax(x.student_logits_NV.detach(), -1)
    onehot = torch.nn.functional.one_hot(x.token_ids_N, p.shape[-1]).float()
    torch.testing.assert_close(x.student_logits_NV.grad, -adv[:, None] * (onehot - p), atol=1e-5, rtol=1e-4)


def _topk_inputs(x: LossInputs, k: int) -> LossInputs:
    """x with the teacher state the engine keeps for TopKReverseKL (top-k of the student)."""
    s_logp = torch.log_softmax(x.student_logits_NV.detach(), -1)
    st = topk_teacher_state(s_logp[None], x.teacher_logprobs_NV[None], k)
    return LossInputs(x.student_logits_NV, x.token_ids_N, x.old_logprob_N, x.teacher_logprob_N,
                      topk_ids_NK=st["topk_ids"][0], teacher_topk_logprobs_NK=st["teacher_topk_logprobs"][0],
                      teacher_tail_logprob_N=st["teacher_tail_logprob"][0])


@pytest.mark.parametrize("k", [11, 64])
def test_topk_equals_full_when_k_covers_the_vocabulary(k):
    a, b = _inputs(seed=3), _inputs(seed=3)
    full = FullReverseKL()(a)
    topk = TopKReverseKL(k)(_topk_inputs(b, k))
    assert float(topk.detach()) == pytest.approx(float(full.detach()), rel=1e-6)
    full.backward()
    topk.backward()
    torch.testing.assert_close(b.student_logits_NV.grad, a.student_logits_NV.grad, atol=1e-6, rtol=1e-5)


def test_topk_with_a_tail_bucket_matches_the_direct_formula():
    x = _inputs(seed=4, v=11)
    k = 3
    loss = TopKReverseKL(k)(_topk_inputs(x, k))
    ref = 0.0
    for i in range(x.student_logits_NV.shape[0]):
        p = torch.softmax(x.student_logits_NV[i].detach().double(), -1)
        q = x.teacher_logprobs_NV[i].double().exp()
        top = p.topk(k).indices
        rest = torch.ones_like(p, dtype=torch.bool)
        rest[top] = False
        ref += float((p[top] * (p[top] / q[top]).log()).sum())
        ref += float(p[rest].sum() * (p[rest].sum() / q[rest].sum()).log())
    assert float(loss.detach()) == pytest.approx(ref, rel=1e-5)
    full = FullReverseKL()(_inputs(seed=4, v=11))
    assert 0 < float(loss.detach()) < float(full.detach())  # a coarser partition: log-sum inequality


def test_engine_keeps_the_topk_teacher_state(models):
    tok, student, teacher = models
    eng = RolloutEngine(student, teacher, tok.eos_token_id, tok.pad_token_id,
                        SamplingConfig(max_new_tokens=12, chunk_size=4))
    policy = make_policy("none")
    policy.begin_step(0)
    rollouts, _ = eng.run(encode_prompts(tok, PROMPTS), policy, torch.Generator().manual_seed(0),
                          teacher_state="topk", topk=3)
    for r in rollouts:
        lt = _posthoc(teacher, r.prompt_ids, r.token_ids)[: r.keep]
        ls = _posthoc(student, r.prompt_ids, r.token_ids)[: r.keep]
        assert r.topk_ids.shape == (r.keep, 3) and r.teacher_logprobs_full is None
        torch.testing.assert_close(r.topk_ids.long(), ls.topk(3, -1).indices)
        torch.testing.assert_close(r.teacher_topk_logprobs, lt.gather(-1, r.topk_ids.long()), atol=1e-5, rtol=0)
        tail = torch.log1p(-lt.gather(-1, r.topk_ids.long()).exp().sum(-1))
        torch.testing.assert_close(r.teacher_tail_logprob, tail, atol=1e-4, rtol=0)


def test_make_loss_and_missing_teacher():
    assert make_loss("full").teacher_state == "full" and make_loss("sampled").teacher_state == "none"
    assert make_loss("topk", 8).teacher_state == "topk" and make_loss("topk", 8).k == 8
    with pytest.raises(ValueError, match="topk=0"):
        make_loss("topk", 0)
    with pytest.raises(ValueError, match="top-k"):
        TopKReverseKL(4)(_inputs())
    with pytest.raises(ValueError, match="unknown loss"):
        make_loss("forward")
    with pytest.raises(ValueError, match="full log-probs"):
        FullReverseKL()(_inputs(full=False))


def test_prompts_use_the_chat_template_when_the_tokenizer_has_one():
    tok = build_char_tokenizer()
    plain = encode_prompts(tok, ["1 +2\n"])
    assert tok.decode(plain[0]) == "1 +2\n"
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}>"
    templated = encode_prompts(tok, ["1 +2\n"])
    assert tok.decode(templated[0]) == "<user>1 +2\n>"


def _reference_kl(p: torch.Tensor, q: torch.Tensor, parts: list[torch.Tensor]) -> float:
    """sum over parts of P log(P / Q), P and Q the parts' masses, with 0 log 0 = 0 (double precision)."""
    out = 0.0
    for idx in parts:
        ps, qs = float(p[idx].sum()), float(q[idx].sum())
        out += 0.0 if ps == 0 else ps * math.log(ps / qs)
    return out


@settings(max_examples=60, deadline=None)
@given(masked=st.integers(0, 10), k=st.integers(1, 11), seed=st.integers(0, 10_000))
def test_losses_are_finite_when_the_student_masks_tokens_with_minus_inf(masked, k, seed):
    """M5 (issue 23): masked student logits (-inf: probability exactly 0 outside the top-k, or
    inside it) gave NaN (0 x -inf). The losses now equal the direct formula with 0 log 0 = 0, with
    finite gradients, and the engine's per-token KL and entropy stay finite too."""
    from kat_diag.opd.rollout import token_stats

    v = 11
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, v, generator=g)
    order = torch.randperm(v, generator=g)
    logits[:, order[:masked]] = float("-inf")  # at least one token keeps mass
    t_logp = torch.log_softmax(torch.randn(4, v, generator=g), -1)
    tokens = logits.argmax(-1)
    s_logp = torch.log_softmax(logits, -1)
    x = LossInputs(logits.clone().requires_grad_(True), tokens, s_logp.gather(-1, tokens[:, None])[:, 0],
                   t_logp.gather(-1, tokens[:, None])[:, 0], t_logp)
    full = FullReverseKL()(x)
    full.backward()
    y = _topk_inputs(LossInputs(logits.clone().requires_grad_(True), tokens, x.old_logprob_N,
                                x.teacher_logprob_N, t_logp), k)
    topk = TopKReverseKL(k)(y)
    topk.backward()
    ref_full = ref_topk = 0.0
    for i in range(4):
        p, q = s_logp[i].double().exp(), t_logp[i].double().exp()
        ref_full += _reference_kl(p, q, [torch.tensor([j]) for j in range(v)])
        top = y.topk_ids_NK[i].long()
        rest = torch.tensor([j for j in range(v) if j not in set(top.tolist())], dtype=torch.long)
        ref_topk += _reference_kl(p, q, [torch.tensor([j]) for j in top.tolist()] + ([rest] if len(rest) else []))
    assert float(full.detach()) == pytest.approx(ref_full, rel=1e-5, abs=1e-6)
    assert float(topk.detach()) == pytest.approx(ref_topk, rel=1e-5, abs=1e-6)
    for grad in (x.student_logits_NV.grad, y.student_logits_NV.grad):
        assert torch.isfinite(grad).all() and (grad[:, order[:masked]] == 0).all()
    stats = token_stats(s_logp[None], t_logp[None], tokens[None], 3)
    assert torch.isfinite(stats["kl"]).all() and torch.isfinite(stats["student_entropy"]).all()
    torch.testing.assert_close(stats["kl"][0].double(), torch.tensor(
        [_reference_kl(s_logp[i].double().exp(), t_logp[i].double().exp(), [torch.tensor([j]) for j in range(v)])
         for i in range(4)], dtype=torch.float64), atol=1e-6, rtol=1e-5)
