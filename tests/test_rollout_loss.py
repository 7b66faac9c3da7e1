"""Rollout engine and OPD losses: online chunked scoring vs one post-hoc forward, losses vs references."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from kat_diag.detector import KATConfig
from kat_diag.loss import FullReverseKL, LossInputs, SampledTokenKL, make_loss
from kat_diag.models import tiny_qwen3_config
from kat_diag.rollout import RolloutEngine, SamplingConfig, encode_prompts, sample_next
from kat_diag.termination import make_policy
from kat_diag.tokenizer import build_char_tokenizer

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
                              keep_teacher_logprobs=True)
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


def test_make_loss_and_missing_teacher():
    assert make_loss("full").needs_full_teacher and not make_loss("sampled").needs_full_teacher
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
