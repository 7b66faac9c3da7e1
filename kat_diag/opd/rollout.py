"""Rollout engine: student sampling with online, chunked teacher scoring and early termination.

Why it exists: KAT must see each token's reverse KL while the rollout is still being generated,
and the tokens it saves must turn into time saved. So:

* the student samples token by token with its KV cache; every C tokens (C = 1 lockstep, up to
  C = W) the teacher scores the new chunk in ONE forward over its own KV cache — no prefix is
  ever scored twice;
* per token we compute the full-vocabulary reverse KL KL(pi_s || pi_T), the sampled-token
  estimate log pi_s(y) - log pi_T(y), both logprobs, the student entropy and the teacher's top-n;
  for the loss we keep only what its estimator needs of the teacher (`teacher_state`): nothing,
  the student's top-k ids with the teacher's k log-probs and tail mass (tokens x (k + 1)), or the
  full log-probs (tokens x vocabulary);
* the termination policy (`kat_diag.kat.policies`) sees the chunk's KL and may stop rows;
* rows that stop (EOS, budget, policy) leave the batch (compaction) and further prompts from the
  queue are prefilled into the freed slots (refill), so a step's compute follows the number of
  generated tokens, not its longest rollout.

Layout: every live row is right-aligned in a shared column space; row b occupies columns
[start_b, T) and a 2-D attention mask hides the rest (left padding). New rows join only at chunk
boundaries, when student and teacher caches have the same length, which keeps one mask for both.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kat_diag.opd import kvcache
from kat_diag.opd.config import SamplingConfig
from kat_diag.opd.loss import p_log_ratio, topk_teacher_state

_TEACHER_STATES = ("none", "full", "topk")

_LOSS_KEYS = ("teacher_logprobs_full", "topk_ids", "teacher_topk_logprobs", "teacher_tail_logprob")


@dataclass
class Rollout:
    """One finished rollout. Per-token tensors have length `gen_len` (first dim)."""

    index: int  # position in the step's prompt list
    prompt_ids: torch.Tensor
    token_ids: torch.Tensor
    student_logprob: torch.Tensor
    teacher_logprob: torch.Tensor
    kl: torch.Tensor
    kl_sampled: torch.Tensor
    student_entropy: torch.Tensor
    teacher_top_ids: torch.Tensor  # [gen_len, top_n]
    teacher_top_probs: torch.Tensor  # [gen_len, top_n]
    keep: int  # tokens to train on (prefix)
    stop_reason: str  # "eos" | "max_len" | "policy"
    teacher_logprobs_full: torch.Tensor | None = None  # [keep, V] for teacher_state "full"
    topk_ids: torch.Tensor | None = None  # [keep, k] for teacher_state "topk" (student's top-k ids)
    teacher_topk_logprobs: torch.Tensor | None = None  # [keep, k]
    teacher_tail_logprob: torch.Tensor | None = None  # [keep]
    onset: int = -1  # trap onset / fire position reported by the policy (-1: none)
    fire: int = -1

    @property
    def gen_len(self) -> int:
        return int(self.token_ids.shape[0])


@dataclass
class RolloutStats:
    generated_tokens: int = 0  # tokens sampled, including those discarded after a stop
    student_forwards: int = 0
    teacher_forwards: int = 0


def sample_next(logits_BV: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """Temperature + nucleus sampling with an explicit generator (reproducible, resumable)."""
    probs_BV = torch.softmax(logits_BV.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, sorted_i = probs_BV.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs_BV = torch.zeros_like(probs_BV).scatter(-1, sorted_i, sorted_p)
    return torch.multinomial(probs_BV, 1, generator=gen).squeeze(-1)


def token_stats(
    s_logp_BCV: torch.Tensor, t_logp_BCV: torch.Tensor, tokens_BC: torch.Tensor, top_n: int
) -> dict[str, torch.Tensor]:
    """Per-token reverse KL (full and sampled), logprobs, student entropy, teacher top-n."""
    kl = p_log_ratio(s_logp_BCV, t_logp_BCV).sum(-1)  # 0, not NaN, where the student's p is 0
    s_lp = s_logp_BCV.gather(-1, tokens_BC[..., None]).squeeze(-1)
    t_lp = t_logp_BCV.gather(-1, tokens_BC[..., None]).squeeze(-1)
    out = {
        "kl": kl,
        "kl_sampled": s_lp - t_lp,
        "student_logprob": s_lp,
        "teacher_logprob": t_lp,
        "student_entropy": -p_log_ratio(s_logp_BCV, torch.zeros((), dtype=s_logp_BCV.dtype,
                                                                 device=s_logp_BCV.device)).sum(-1),
    }
    n = min(top_n, t_logp_BCV.shape[-1])
    top_lp, top_i = t_logp_BCV.topk(n, dim=-1)
    out["teacher_top_ids"] = top_i
    out["teacher_top_probs"] = top_lp.exp()
    return out


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt; the chat template is applied when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          tokenize=False)
            for p in prompts
        ]
    else:
        texts = list(prompts)
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


class _Model:
    """A model, its KV cache and its next-token log-probs for each live row."""

    def __init__(self, model):
        self.model = model
        self.cache = None
        self.next_logp_BV: torch.Tensor | None = None

    @torch.no_grad()
    def forward(self, ids_BC, mask_BT, pos_BC) -> torch.Tensor:
        from transformers import DynamicCache

        if self.cache is None:
            self.cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids_BC, attention_mask=mask_BT, position_ids=pos_BC,
                         cache=self.cache, use_cache=True)
        return torch.log_softmax(out.logits.float(), dim=-1)


class RolloutEngine:
    """Generates and scores rollouts for a list of prompts under a termination policy."""

    def __init__(self, student, teacher, eos_token_id: int | Sequence[int], pad_token_id: int, cfg: SamplingConfig):
        """eos_token_id: one id, or every id that ends a rollout (chat models declare several)."""
        self.student, self.teacher = student, teacher
        eos_ids = [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(i) for i in eos_token_id]
        if not eos_ids:
            raise ValueError("eos_token_id: at least one end-of-sequence id is needed")
        self.eos, self.pad = eos_ids[0], pad_token_id
        self.cfg = cfg
        self.device = next(student.parameters()).device
        self._eos_ids = torch.tensor(eos_ids, dtype=torch.long, device=self.device)

    # -- batch surgery -------------------------------------------------------------------------

    def _prefill(self, prompts: list[list[int]]):
        """Left-padded prefill of new prompts in both models; returns their row state."""
        L = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), L), self.pad, dtype=torch.long, device=self.device)
        start = torch.empty(len(prompts), dtype=torch.long, device=self.device)
        for i, p in enumerate(prompts):
            ids[i, L - len(p):] = torch.tensor(p, device=self.device)
            start[i] = L - len(p)
        cols = torch.arange(L, device=self.device)
        mask = (cols[None, :] >= start[:, None]).long()
        pos = (cols[None, :] - start[:, None]).clamp(min=0)
        s, t = _Model(self.student), _Model(self.teacher)
        s.next_logp_BV = s.forward(ids, mask, pos)[:, -1]
        t.next_logp_BV = t.forward(ids, mask, pos)[:, -1]
        return s, t, start, L

    def _insert(self, new_s: _Model, new_t: _Model, new_start: torch.Tensor, new_T: int) -> None:
        """Splice prefilled rows into the live batch (both at a chunk boundary)."""
        if self.s is None:
            self.s, self.t, self.start, self.T = new_s, new_t, new_start, new_T
            return
        if new_T < self.T:
            for m in (new_s, new_t):
                kvcache.pad_left(m.cache, self.T - new_T)
            new_start = new_start + (self.T - new_T)
        elif new_T > self.T:
            for m in (self.s, self.t):
                kvcache.pad_left(m.cache, new_T - self.T)
            self.start = self.start + (new_T - self.T)
            self.T = new_T
        for live, new in ((self.s, new_s), (self.t, new_t)):
            kvcache.append_rows(live.cache, new.cache)
            live.next_logp_BV = torch.cat([live.next_logp_BV, new.next_logp_BV], 0)
        self.start = torch.cat([self.start, new_start])

    def _select(self, idx_B: torch.Tensor) -> None:
        for m in (self.s, self.t):
            kvcache.select_rows(m.cache, idx_B)
            m.next_logp_BV = m.next_logp_BV.index_select(0, idx_B)
        self.start = self.start.index_select(0, idx_B)
        # Trim columns no live row uses any more, so attention cost follows the live rows.
        if self.start.numel():
            drop = int(self.start.min())
            if drop > 0:
                for m in (self.s, self.t):
                    kvcache.trim_left(m.cache, drop)
                self.start -= drop
                self.T -= drop

    def _mask(self, extra: int) -> torch.Tensor:
        cols = torch.arange(self.T + extra, device=self.device)
        return (cols[None, :] >= self.start[:, None]).long()

    # -- the loop ------------------------------------------------------------------------------

    @torch.no_grad()
    def run(
        self,
        prompts: Sequence[Sequence[int]],
        policy,
        gen: torch.Generator,
        teacher_state: str = "none",
        topk: int = 64,
    ) -> tuple[list[Rollout], RolloutStats]:
        """Roll out every prompt once; returns rollouts in prompt order and engine statistics.

        teacher_state: what to keep of the teacher for the loss on the kept tokens: "none",
        "topk" (the student's top-`topk` ids, the teacher's log-probs there and its tail log-mass)
        or "full" (the teacher's log-probs over the vocabulary).
        """
        if teacher_state not in _TEACHER_STATES:
            raise ValueError(f"teacher_state={teacher_state!r}: must be one of {_TEACHER_STATES}")
        cfg = self.cfg
        budget = policy.max_new_tokens(cfg.max_new_tokens)
        slots = cfg.slots or len(prompts)
        queue = deque(range(len(prompts)))
        self.s = self.t = None
        self.start, self.T = None, 0
        rows: list[int] = []  # prompt index of each live row
        buf: dict[int, dict[str, list[torch.Tensor]]] = {}
        n_gen = torch.zeros(0, dtype=torch.long, device=self.device)
        done: dict[int, Rollout] = {}
        stats = RolloutStats()

        def refill() -> None:
            nonlocal n_gen
            take = [queue.popleft() for _ in range(min(slots - len(rows), len(queue)))]
            if not take:
                return
            s, t, start, L = self._prefill([list(prompts[i]) for i in take])
            stats.student_forwards += 1
            stats.teacher_forwards += 1
            self._insert(s, t, start, L)
            rows.extend(take)
            for i in take:
                buf[i] = {}
            n_gen = torch.cat([n_gen, torch.zeros(len(take), dtype=torch.long, device=self.device)])
            policy.add_rows(len(take))

        refill()
        while rows:
            B, C = len(rows), cfg.chunk_size
            toks_BC = torch.empty(B, C, dtype=torch.long, device=self.device)
            s_logp = []
            ended_B = torch.zeros(B, dtype=torch.bool, device=self.device)
            valid_BC = torch.zeros(B, C, dtype=torch.bool, device=self.device)
            for c in range(C):
                logp_BV = self.s.next_logp_BV
                tok_B = sample_next(logp_BV, cfg.temperature, cfg.top_p, gen)
                valid_BC[:, c] = ~ended_B & (n_gen + c < budget)
                tok_B = torch.where(valid_BC[:, c], tok_B, torch.full_like(tok_B, self.pad))
                toks_BC[:, c] = tok_B
                s_logp.append(logp_BV)
                ended_B |= torch.isin(tok_B, self._eos_ids)
                # The student's distribution for the next token (also needed after the chunk).
                pos = (self.T - self.start)[:, None]
                self.s.next_logp_BV = self.s.forward(tok_B[:, None], self._mask(1), pos)[:, -1]
                stats.student_forwards += 1
                self.T += 1
                n_ended = int((ended_B | (n_gen + c + 1 >= budget)).sum())
                if n_ended == B or (queue and n_ended >= max(1.0, cfg.refill_share * B)):
                    C = c + 1  # rows are done: score what we have, retire them, refill their slots
                    break
            toks_BC, valid_BC = toks_BC[:, :C], valid_BC[:, :C]
            stats.generated_tokens += int(valid_BC.sum())

            # The teacher scores the whole chunk in one forward over its cache.
            T0 = self.T - C
            pos_BC = (T0 - self.start)[:, None] + torch.arange(C, device=self.device)[None, :]
            t_out_BCV = self.t.forward(toks_BC, self._mask(0), pos_BC)
            stats.teacher_forwards += 1
            t_logp_BCV = torch.cat([self.t.next_logp_BV[:, None], t_out_BCV[:, :-1]], dim=1)
            self.t.next_logp_BV = t_out_BCV[:, -1]
            s_logp_BCV = torch.stack(s_logp, dim=1)
            st = token_stats(s_logp_BCV, t_logp_BCV, toks_BC, cfg.top_n)
            kl_for_policy = st["kl"].masked_fill(~valid_BC, 0.0)
            decision = policy.update(kl_for_policy, valid_BC)

            # Book-keeping per row (a loop over rows per chunk, never per token).
            n_valid_B = valid_BC.sum(1)
            n_gen = n_gen + n_valid_B
            stop_B = decision.stop_B.to(self.device)
            finished = ended_B | (n_gen >= budget) | stop_B
            st["token_ids"] = toks_BC
            if teacher_state == "full":
                st["teacher_logprobs_full"] = t_logp_BCV
            elif teacher_state == "topk":
                st.update(topk_teacher_state(s_logp_BCV, t_logp_BCV, topk))
            info = policy.row_info() if bool(finished.any()) else None
            # Per-row values come to the host once per chunk (one transfer, not one per row).
            nv_l, total_l, fin_l, stop_l, eos_l = (x.tolist() for x in (n_valid_B, n_gen, finished, stop_B, ended_B))
            end_l, keep_l = decision.end_B.tolist(), decision.keep_B.tolist()
            onset_l, fire_l = (info["onset"].tolist(), info["fire"].tolist()) if info else ([], [])
            for b, pi in enumerate(rows):
                for k, v in st.items():
                    buf[pi].setdefault(k, []).append(v[b, : nv_l[b]])
                if fin_l[b]:
                    total = total_l[b]
                    if stop_l[b]:
                        # Tokens sampled past the policy's end (rest of the chunk) are discarded.
                        reason, length, keep = "policy", min(total, end_l[b]), keep_l[b]
                    else:
                        reason, length, keep = ("eos" if eos_l[b] else "max_len"), total, total
                    r = self._finish(pi, prompts[pi], buf.pop(pi), keep, length, reason)
                    r.onset, r.fire = onset_l[b], fire_l[b]
                    done[pi] = r
            live = (~finished).nonzero().squeeze(-1)
            if live.numel() < B:
                rows = [rows[int(i)] for i in live]
                n_gen = n_gen.index_select(0, live)
                self._select(live)
                policy.keep_rows(live)
            if queue and len(rows) < slots:
                refill()
        return [done[i] for i in range(len(prompts))], stats

    def _finish(self, pi: int, prompt, parts: dict[str, list[torch.Tensor]], keep: int, length: int,
                reason: str) -> Rollout:
        cat = {k: torch.cat(v, 0)[:length] for k, v in parts.items()}
        keep = max(0, min(keep, length))
        for k in _LOSS_KEYS:  # the loss only ever reads the kept tokens
            if k in cat:
                cat[k] = cat[k][:keep]
        return Rollout(
            index=pi,
            prompt_ids=torch.tensor(list(prompt), dtype=torch.long),
            keep=keep,
            stop_reason=reason,
            **cat,
        )
