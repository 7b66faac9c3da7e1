"""KATDistillationTrainer (kat_diag.integrations.trl) on the embedded world's checkpoints with the pinned TRL.

Tiers: pure functions on TRL's batch dict (spans into masks, rows, problems); a few real TRL steps in
online and post-hoc mode (KAT fires, nothing is generated past a fire, the store replays with
fire_match 1.0, unfired rows train exactly as plain `trl.DistillationTrainer`, every policy runs,
resume restores KAT's state bit-identically); a 2-process gloo run (tests/test_trl_gloo.py).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402
from trl import DistillationConfig, DistillationTrainer  # noqa: E402

from kat_diag.integrations.trl import KATDistillationTrainer  # noqa: E402
from kat_diag.integrations.trl import batch as B  # noqa: E402
from kat_diag.kat.config import KATConfig, kat_preset  # noqa: E402
from kat_diag.kat.policies import make_policy  # noqa: E402
from kat_diag.opd.config import SamplingConfig  # noqa: E402
from kat_diag.opd.rollout import RolloutEngine  # noqa: E402
from kat_diag.opd.scoring import score_completions  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WORLD = REPO / "data" / "world"
# KAT that can act in a few steps of 8 prompts: active from step 1 (train) or once 8 values are in.
KAT_TRAIN = kat_preset("world", warmup_steps=1, min_fill=8)
KAT_NOW = kat_preset("world", warmup_steps=0, min_fill=8)


@pytest.fixture(scope="module")
def world():
    tok = AutoTokenizer.from_pretrained(WORLD / "student")
    rows = [json.loads(line) for line in (WORLD / "data" / "train.jsonl").open()][:96]
    return tok, Dataset.from_list(rows)


def make(world, out, *, plain=False, steps=2, batch=8, budget=96, save_steps=None, seed=0, **kw):
    tok, ds = world
    student = AutoModelForCausalLM.from_pretrained(WORLD / "student")
    teacher = AutoModelForCausalLM.from_pretrained(WORLD / "teacher")
    args = DistillationConfig(
        output_dir=str(out), bf16=False, use_cpu=True, per_device_train_batch_size=batch, max_steps=steps,
        max_completion_length=budget, learning_rate=1e-4, report_to="none", logging_steps=1,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, gradient_checkpointing=False,
        seed=seed, disable_tqdm=True)
    cls = DistillationTrainer if plain else KATDistillationTrainer
    return cls(model=student, teacher_model=teacher, args=args, train_dataset=ds, processing_class=tok, **kw)


def gen_batch(trainer, start=0, n=8):
    """One generation batch through the trainer's `_generate_and_score_completions` (what TRL calls)."""
    trainer.model.train()
    return trainer._generate_and_score_completions([trainer.train_dataset[i] for i in range(start, start + n)])


def row_loss_sum(trainer, batch, b):
    """Sum of TRL's per-token divergence over row b's loss mask (num_items 1 turns the mean into a sum)."""
    row = {k: v[b : b + 1] for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() == 2}
    with torch.no_grad():
        loss, _, n = trainer._compute_loss(trainer.accelerator.unwrap_model(trainer.model), row, 1)
    return float(loss), int(n)


# ------------------------------------------------------------------------------------------------ pure


def test_apply_spans_cuts_masks_trims_and_counts():
    batch = {"completion_ids": torch.arange(12).reshape(2, 6), "completion_mask": torch.tensor(
        [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]), "num_items_in_batch": torch.tensor(9)}
    B.apply_spans(batch, torch.tensor([0, 0]), torch.tensor([4, 2]), lambda x: x * 3)  # 3 "ranks"
    assert batch["completion_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]  # cut at hi, trimmed to 4
    assert batch["completion_ids"].shape == (2, 4) and "tool_mask" not in batch
    assert int(batch["num_items_in_batch"]) == 3 * 6
    # a span that starts later keeps the context visible (completion_mask) but out of the loss (tool_mask)
    batch = {"completion_ids": torch.zeros(2, 5, dtype=torch.long),
             "completion_mask": torch.ones(2, 5, dtype=torch.long)}
    B.apply_spans(batch, torch.tensor([2, 0]), torch.tensor([4, 0]), lambda x: x, pad_to_multiple_of=3)
    assert batch["completion_mask"].tolist() == [[1, 1, 1, 1, 0], [0, 0, 0, 0, 0]]  # width 4 -> 5 (x3, capped)
    assert batch["tool_mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert int(batch["num_items_in_batch"]) == 2
    with pytest.raises(ValueError, match="beyond"):
        B.apply_spans({"completion_mask": torch.ones(1, 2)}, torch.tensor([0]), torch.tensor([3]), lambda x: x)
    with pytest.raises(ValueError, match="lo <= hi"):
        B.apply_spans({"completion_mask": torch.ones(1, 2)}, torch.tensor([2]), torch.tensor([1]), lambda x: x)


def test_unpadded_rows_and_problems():
    batch = {"prompt_ids": torch.tensor([[0, 5, 6], [7, 8, 9]]), "prompt_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]),
             "completion_ids": torch.tensor([[3, 1, 0], [4, 4, 4]]),
             "completion_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])}
    assert B.unpadded_rows(batch) == ([[5, 6], [7, 8, 9]], [[3, 1], [4, 4, 4]])
    world_row = {"id": "train-1", "prompt": "40 +31 -36\n", "answer": "35", "solution": "40+31=71\n71-36=35\n#35",
                 "kind": "arith", "extra": 1}
    probs, graded = B.problems_of([world_row, {"prompt": "What is 2+2?"}, {"prompt": [{"role": "user", "content": "x"}],
                                                                         "prompt_id": 7, "answer": "4"}])
    assert probs[0].id == "train-1" and probs[0].solution.endswith("#35") and probs[0].kind == "arith"
    assert probs[1].id.startswith("sha1-") and probs[1].kind == "math" and graded == [True, False, True]
    assert probs[1].id == B.problems_of([{"prompt": "What is 2+2?"}])[0][0].id  # stable across epochs
    assert probs[2].id == "7" and '"role": "user"' in probs[2].prompt


def test_engine_ends_rollouts_at_any_of_several_eos_ids(world):
    """TRL passes every EOS id the model declares; the engine stops at the first of any of them."""
    tok, _ = world
    student = AutoModelForCausalLM.from_pretrained(WORLD / "student")
    teacher = AutoModelForCausalLM.from_pretrained(WORLD / "teacher")
    newline = tok.convert_tokens_to_ids("\n") if "\n" in tok.get_vocab() else tok("\n")["input_ids"][-1]
    prompts = [tok(p)["input_ids"] for p in ("40 +31 -36\n", "14 *05 -26 *02\n", "21 +18 -39\n")]
    eng = RolloutEngine(student, teacher, [tok.eos_token_id, newline], tok.pad_token_id,
                        SamplingConfig(max_new_tokens=40, chunk_size=4))
    policy = make_policy("none")
    policy.begin_step(0)
    rollouts, _ = eng.run(prompts, policy, torch.Generator().manual_seed(0))
    for r in rollouts:
        ids = r.token_ids.tolist()
        assert r.stop_reason == "eos" and ids[-1] == newline and newline not in ids[:-1]
    with pytest.raises(ValueError, match="at least one"):
        RolloutEngine(student, teacher, [], tok.pad_token_id, SamplingConfig())


def test_posthoc_decides_what_online_decides_on_the_same_tokens(world):
    """The policy over teacher-forced stats of whole completions (post-hoc) gives the keep / onset / fire
    / end that it gives streamed chunk by chunk over the engine's own online KL."""
    tok, ds = world
    student = AutoModelForCausalLM.from_pretrained(WORLD / "student")
    teacher = AutoModelForCausalLM.from_pretrained(WORLD / "teacher")
    prompts = [tok(ds[i]["prompt"])["input_ids"] for i in range(16)]
    eng = RolloutEngine(student, teacher, tok.eos_token_id, tok.pad_token_id,
                        SamplingConfig(max_new_tokens=128, chunk_size=16))
    none = make_policy("none")
    none.begin_step(0)
    full, _ = eng.run(prompts, none, torch.Generator().manual_seed(1))
    cfg = kat_preset("world", warmup_steps=0, min_fill=8, tau_quantile=0.9)
    online = make_policy("kat", kat=cfg)
    online.threshold.observe([float(r.kl[i : i + cfg.window].mean()) for r in full for i in (0, 8)])
    posthoc = copy.deepcopy(online)
    # online: the engine's KL, 16 tokens at a time, as the engine feeds it
    online.begin_step(0)
    online.add_rows(len(full))
    L = max(r.gen_len for r in full)
    kl = torch.zeros(len(full), L)
    for b, r in enumerate(full):
        kl[b, : r.gen_len] = r.kl
    valid = torch.arange(L)[None] < torch.tensor([r.gen_len for r in full])[:, None]
    for c in range(0, L, 16):
        dec = online.update(kl[:, c : c + 16].masked_fill(~valid[:, c : c + 16], 0), valid[:, c : c + 16])
    info = online.row_info()
    # post-hoc: teacher-forced scoring of the same completions, one update
    posthoc.begin_step(0)
    scored = score_completions(student, teacher, prompts, [r.token_ids.tolist() for r in full],
                               pad_token_id=tok.pad_token_id, micro_batch=5)
    ph = B.posthoc_rollouts(posthoc, prompts, [r.token_ids.tolist() for r in full], scored, [tok.eos_token_id], 128)
    fired = [r.fire >= 0 for r in ph]
    assert 0 < sum(fired) < len(ph), "the test needs fired and unfired rows"
    for b, r in enumerate(ph):
        assert (r.fire, r.onset) == (int(info["fire"][b]), int(info["onset"][b]))
        if dec.stop_B[b]:
            assert r.stop_reason == "policy" and r.keep == int(dec.keep_B[b]) and r.gen_len == int(dec.end_B[b])
            assert r.gen_len == r.fire + 1 and r.keep == r.onset
        else:
            assert r.stop_reason == full[b].stop_reason and r.keep == r.gen_len == full[b].gen_len
        torch.testing.assert_close(r.kl, full[b].kl[: r.gen_len], atol=1e-5, rtol=1e-4)  # fp32 reductions
    pm_on = online.end_step([r.kl[: r.gen_len] for r in ph])
    pm_ph = posthoc.end_step([r.kl for r in ph])
    assert pm_on["fired_share"] == pm_ph["fired_share"] and pm_on["kept_len_mean"] == pm_ph["kept_len_mean"]


# ------------------------------------------------------------------------------------- real TRL steps


def test_online_kat_fires_generates_nothing_past_a_fire_and_replays(world, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    tr = make(world, tmp_path / "run", steps=4, termination="kat", kat=KAT_TRAIN, record_traces=True, chunk_size=1,
              data="world")
    assert tr.kat_mode == "online"
    tr.train()
    from kat_diag.traces.reader import TraceReader

    t = TraceReader(tmp_path / "run").read(["step", "fire", "onset", "gen_len", "kept_len", "stop_reason", "kl",
                                            "token_ids", "verdict", "tau"])
    fired = t["fire"] >= 0
    assert fired.any(), "KAT never fired"
    assert (t["gen_len"][fired] == t["fire"][fired] + 1).all()  # the rollout ends at its fire
    assert (t["kept_len"][fired] == t["onset"][fired]).all() and (t["stop_reason"][fired] == "policy").all()
    assert set(t["verdict"]) <= {"right", "wrong", "loop", "unfinished"}  # the world's ground truth is there
    logs = [h for h in tr.state.log_history if "kat/sampled_tokens" in h]
    # chunk_size 1: every sampled token is in a rollout, i.e. not one token was generated past a fire
    per_step = [int(t["gen_len"][t["step"] == s].sum()) for s in range(4)]
    assert [int(h["kat/sampled_tokens"]) for h in logs] == per_step
    assert any(h["kat/fired_share"] > 0 for h in logs) and all(0 < h["kat/kept_share"] <= 1 for h in logs)
    assert logs[0]["kat/tau"] is None and logs[-1]["kat/tau"] > 0 and logs[-1]["kat/buffer_fill"] > 0
    res = CliRunner().invoke(app, ["replay", str(tmp_path / "run"), "--tau", "recorded", "--json"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)["recorded"]  # (the progress bar goes to stderr)
    assert rec["compared"] == len(t["fire"]) and rec["fire_match"] == 1.0 and rec["onset_match"] == 1.0
    # metrics.jsonl mirrors TRL's logs for kat-diag's curves; the manifest holds the run config
    from kat_diag.analysis.curves import read_metrics

    curves = read_metrics(tmp_path / "run")
    assert curves.train_step.tolist() == [0, 1, 2, 3] and "fired_share" in curves.train
    manifest = json.loads((tmp_path / "run" / "traces" / "_manifest.json").read_text())
    assert manifest["config"]["kat"] == KAT_TRAIN.to_dict() and manifest["config"]["data"] == "world"
    assert manifest["loss"]["estimator"] == "full"
    # a model saved into OUTPUT_DIR (TRL's save_model) is not mistaken for the run config
    tr.save_model()
    from kat_diag.analysis.gradproj import trained_checkpoints
    from kat_diag.analysis.phase_sample import run_config

    assert run_config(tmp_path / "run")["kat"] == KAT_TRAIN.to_dict()
    assert trained_checkpoints(tmp_path / "run")[0] == tmp_path / "run"


def test_fired_rows_are_masked_and_unfired_rows_train_as_plain_trl(world, tmp_path):
    """Online: a fired row's completion is its kept prefix, its padding (pad id != EOS here) is masked;
    rows that did not fire give exactly plain DistillationTrainer's loss on the same tokens."""
    tok, _ = world
    assert tok.pad_token_id not in (tok.eos_token_id,)  # padding that TRL's EOS rule would not mask
    tr = make(world, tmp_path / "kat", termination="kat", kat=KAT_NOW, budget=128)
    plain = make(world, tmp_path / "plain", plain=True, budget=128)
    gen_batch(tr, 0, 16)  # fills KAT's buffer (8 values -> active from the next batch)
    rollouts = []
    orig = tr._generate_single_turn

    def spy(*a):
        out = orig(*a)
        rollouts.append(tr._online[0])
        return out

    tr._generate_single_turn = spy
    batch = gen_batch(tr, 16, 16)
    ro = rollouts[0]
    assert any(r.fire >= 0 for r in ro) and any(r.fire < 0 for r in ro)
    mask = batch["completion_mask"]
    assert mask.sum(1).tolist() == [r.keep for r in ro]
    assert int(batch["num_items_in_batch"]) == sum(r.keep for r in ro)
    for b, r in enumerate(ro):
        ids = batch["completion_ids"][b, : r.keep].tolist()
        assert ids == r.token_ids[: r.keep].tolist()
        kat_sum, n = row_loss_sum(tr, batch, b)
        ref_sum, ref_n = row_loss_sum(plain, batch, b)
        assert n == r.keep and (kat_sum, n) == (ref_sum, ref_n)
        # the same row without any padding column: the masked padding contributed nothing
        alone = {k: v[b : b + 1, : max(r.keep, 1)] if k.startswith("completion") else v[b : b + 1]
                 for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() == 2}
        if r.keep:
            torch.testing.assert_close(row_loss_sum(plain, alone, 0)[0], kat_sum, atol=1e-6, rtol=1e-5)
        if r.fire < 0:
            assert r.keep == r.gen_len and (r.stop_reason == "max_len" or ids[-1] == tok.eos_token_id)
    # the batch loss is the mean over the kept tokens of all rows
    with torch.no_grad():
        loss = tr.compute_loss(tr.model, batch)
    total = sum(row_loss_sum(tr, batch, b)[0] for b in range(len(ro)))
    torch.testing.assert_close(float(loss), total / sum(r.keep for r in ro), atol=1e-6, rtol=1e-5)


def test_posthoc_cuts_masks_and_keeps_plain_loss_on_unfired_rows(world, tmp_path):
    """Post-hoc: TRL's own completions stay whole, their masks are cut at the kept length, num_items is
    recomputed; every row's loss is plain DistillationTrainer's over its kept tokens."""
    tr = make(world, tmp_path / "kat", termination="kat", kat=KAT_NOW, mode="posthoc", budget=96,
              score_micro_batch=3)
    plain = make(world, tmp_path / "plain", plain=True, budget=96)
    gen_batch(tr, 0, 16)
    kept = []
    orig = tr._score_posthoc

    def spy(batch):
        out = orig(batch)
        kept.append((out[0], batch["completion_mask"].clone()))
        return out

    tr._score_posthoc = spy
    batch = gen_batch(tr, 16, 16)
    ro, full_mask = kept[0]
    assert any(r.fire >= 0 for r in ro) and any(r.fire < 0 for r in ro)
    assert batch["completion_mask"].sum(1).tolist() == [r.keep for r in ro]
    assert int(batch["num_items_in_batch"]) == sum(r.keep for r in ro)
    width = batch["completion_mask"].shape[1]
    for b, r in enumerate(ro):
        kat_sum, n = row_loss_sum(tr, batch, b)
        full = dict(batch, completion_mask=full_mask[:, :width])
        ref_sum, ref_n = row_loss_sum(plain, full, b)
        if r.fire < 0:
            assert (kat_sum, n) == (ref_sum, ref_n) and n == r.gen_len
        else:
            assert n == r.keep < int(full_mask[b].sum()) and r.gen_len == r.fire + 1
            assert kat_sum <= ref_sum + 1e-6


@pytest.mark.parametrize("mode", ["online", "posthoc"])
@pytest.mark.parametrize("termination, extra", [
    ("none", {}), ("prefix", {"prefix_len": 12}), ("kat+prefix", {"prefix_len": 40}),
    ("random", {"random_target": 10.0}), ("none", {"supervise": "agreement+post"}),
])
def test_every_policy_in_both_modes(world, tmp_path, mode, termination, extra):
    from kat_diag.integrations.trl.trainer import _loss_reads_tool_mask

    if extra.get("supervise") and not _loss_reads_tool_mask():  # TRL 1.10: refused, not silently wrong
        with pytest.raises(ValueError, match="reads tool_mask"):
            make(world, tmp_path / "run", termination=termination, kat=KAT_NOW, mode=mode, **extra)
        return
    tr = make(world, tmp_path / "run", termination=termination, kat=KAT_NOW, mode=mode, budget=64, **extra)
    gen_batch(tr, 0)
    batch = gen_batch(tr, 8)
    loss_mask = batch["completion_mask"] * batch.get("tool_mask", 1)
    assert int(batch["num_items_in_batch"]) == int(loss_mask.sum())
    kept = batch["completion_mask"].sum(1)
    logs = {k: v[-1] for k, v in tr._metrics["train"].items() if k.startswith("kat/")}
    assert logs["kat/trained_tokens"] == int(loss_mask.sum())
    if termination == "prefix":
        assert int(kept.max()) <= 12 and logs["kat/stopped_share"] > 0
    if termination == "kat+prefix":
        assert int(kept.max()) <= 40
    if termination == "random":
        assert logs["kat/stopped_share"] > 0 and logs["kat/kept_share"] < 1
    if extra.get("supervise"):
        # agreement+post: the pre-agreement tokens stay as context, out of the loss
        assert "kat/supervise_trained_share" in logs and logs["kat/tau"] > 0
        assert int(loss_mask.sum()) < int(kept.sum()) and "tool_mask" in batch
    elif termination == "none":
        assert logs["kat/kept_share"] == 1.0 and logs["kat/stopped_share"] == 0.0


class _Snapshots(TrainerCallback):
    def __init__(self, trainer_ref):
        self.ref, self.states, self.first = trainer_ref, {}, None

    def on_train_begin(self, args, state, control, **kw):
        self.first = copy.deepcopy(self.ref[0].kat_policy.state_dict())

    def on_step_end(self, args, state, control, **kw):
        self.states[state.global_step] = copy.deepcopy(self.ref[0].kat_policy.state_dict())


def test_resume_restores_kat_state_bit_identically(world, tmp_path):
    run = tmp_path / "run"
    ref: list = []
    snap = _Snapshots(ref)
    a = make(world, run, steps=4, save_steps=2, termination="kat", kat=KAT_TRAIN, record_traces=True,
             callbacks=[snap])
    ref.append(a)
    a.train()
    assert (run / "checkpoint-2" / "kat_state-rank00000.pt").is_file()
    ref2: list = []
    snap2 = _Snapshots(ref2)
    b = make(world, run, steps=4, save_steps=2, termination="kat", kat=KAT_TRAIN, record_traces=True,
             callbacks=[snap2])
    ref2.append(b)
    b.train(resume_from_checkpoint=str(run / "checkpoint-2"))  # as if the run had died after step 2
    restored, at2 = snap2.first["threshold"], snap.states[2]["threshold"]
    assert restored["buffer"].numel() > 0 and torch.equal(restored["buffer"], at2["buffer"])
    assert restored["step"] == at2["step"] and restored["tau"] == at2["tau"]
    # the resumed steps redo exactly the same thresholds and buffer
    for step in (3, 4):
        x, y = snap.states[step]["threshold"], snap2.states[step]["threshold"]
        assert torch.equal(x["buffer"], y["buffer"])
        assert x["tau"] == y["tau"] or (math.isnan(x["tau"]) and math.isnan(y["tau"]))
    # the store holds each step once: the first run's files of steps 2-3 were moved aside
    from kat_diag.traces.reader import TraceReader

    steps = TraceReader(run).read(["step"])["step"]
    assert sorted(steps.tolist()) == sorted([s for s in range(4) for _ in range(8)])
    assert any((run / "traces_discarded").glob("*.parquet"))


def test_refusals(world, tmp_path):
    with pytest.raises(ValueError, match="mode="):
        make(world, tmp_path, mode="sometimes")
    tok, ds = world
    args = DistillationConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True, top_k=5, repetition_penalty=1.1,
                              report_to="none")
    with pytest.raises(ValueError, match="top_k=5, repetition_penalty=1.1"):
        KATDistillationTrainer(model=str(WORLD / "student"), teacher_model=str(WORLD / "teacher"), args=args,
                               train_dataset=ds, processing_class=tok)
    with pytest.raises(ValueError, match="needs --termination none"):
        make(world, tmp_path, termination="kat", supervise="pre")
    with pytest.raises(ValueError, match="unknown termination"):
        make(world, tmp_path, termination="sometimes")
    tr = make(world, tmp_path / "r", termination="kat", kat=KATConfig())
    (tmp_path / "r" / "checkpoint-2").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="kat_state-rank00000.pt does not exist"):
        tr.load_kat_state(tmp_path / "r" / "checkpoint-2")
    from kat_diag.opd.checkpoint import save_state

    save_state(tmp_path / "r" / "checkpoint-2" / "kat_state-rank00000.pt",
               {"step": 2, "termination": "none", "policy": make_policy("none").state_dict()})
    with pytest.raises(ValueError, match="termination 'none'"):
        tr.load_kat_state(tmp_path / "r" / "checkpoint-2")
