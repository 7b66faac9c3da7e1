"""Golden values on the committed embedded world: loading, greedy decoding and online scoring.

These pin the shipped checkpoints and the rollout path end to end. If a deliberate change (a
rebuilt world, a new torch) moves them, re-measure and update the numbers in one commit.
"""

import json

import pytest
import torch

from kat_diag.evaluation import evaluate_split
from kat_diag.kat.policies import make_policy
from kat_diag.models import count_parameters, load_model, load_tokenizer
from kat_diag.opd.config import SamplingConfig
from kat_diag.opd.rollout import RolloutEngine, encode_prompts
from kat_diag.world.paths import DEFAULT_WORLD_DIR, load_world_splits, world_paths

pytestmark = pytest.mark.skipif(not (DEFAULT_WORLD_DIR / "world.json").exists(), reason="no committed world")


@pytest.fixture(scope="module")
def world():
    p = world_paths()
    return (load_tokenizer(p["tokenizer"]), load_model(p["teacher"], device="cpu"),
            load_model(p["student"], device="cpu"), load_world_splits())


def test_committed_world_summary(world):
    _, teacher, student, splits = world
    summary = json.loads((DEFAULT_WORLD_DIR / "world.json").read_text())
    assert count_parameters(teacher) == summary["models"]["teacher"]["parameters"] == 866_048
    assert count_parameters(student) == summary["models"]["student"]["parameters"] == 652_736
    assert [len(splits[k]) for k in ("train", "ops2", "ops3", "ops4", "ops5")] == [4000, 200, 200, 200, 200]


def test_greedy_accuracy_on_ops3_head(world):
    tok, teacher, student, splits = world
    assert evaluate_split(teacher, tok, splits["ops3"][:40], k=0)["greedy"] == 38 / 40
    assert evaluate_split(student, tok, splits["ops3"][:40], k=0)["greedy"] == 24 / 40


def test_seeded_rollouts_and_their_kl(world):
    tok, teacher, student, splits = world
    eng = RolloutEngine(student, teacher, tok.eos_token_id, tok.pad_token_id,
                        SamplingConfig(max_new_tokens=64, chunk_size=16))
    policy = make_policy("none")
    policy.begin_step(0)
    rollouts, _ = eng.run(encode_prompts(tok, [q.prompt for q in splits["ops3"][:8]]), policy,
                          torch.Generator().manual_seed(0))
    # fixed-width lines: every finished ops3 rollout is 31 tokens; two run to the 64-token budget
    assert [r.gen_len for r in rollouts] == [31, 64, 31, 31, 31, 31, 31, 64]
    assert tok.decode(rollouts[0].token_ids) == "13+29=42\n42-16=28\n28+32=60\n#60<eos>"
    assert float(sum(r.kl.sum() for r in rollouts)) == pytest.approx(33.7018, rel=1e-4)
