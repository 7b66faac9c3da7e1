"""The loop-start rate: the batched scorer against a direct one-context-at-a-time computation."""

import math

import pytest
import torch

from kat_diag.data.problems import Problem
from kat_diag.models import load_model, load_tokenizer
from kat_diag.world.loop_probe import _contexts, loop_start_rate
from kat_diag.world.paths import load_world_splits


def test_contexts_are_every_step_line_repeated_once():
    p = Problem(id="x", prompt="12 +03 *02\n", answer="30", solution="12+03=15\n15*02=30\n#30")
    assert _contexts([p]) == [("12 +03 *02\n12+03=15\n", "12+03=15\n"),
                              ("12 +03 *02\n12+03=15\n15*02=30\n", "15*02=30\n")]


def _direct(model, tok, problems) -> float:
    probs = []
    for ctx, rep in _contexts(problems):
        n0 = len(tok(ctx, add_special_tokens=False)["input_ids"])
        ids = torch.tensor([tok(ctx + rep, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        probs.append(math.exp(float(logp[n0 - 1:].gather(-1, ids[0, n0:, None]).sum())))
    return sum(probs) / len(probs)


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_batched_rate_equals_direct_scoring(quick_world, role):
    tok = load_tokenizer(quick_world / "tokenizer")
    model = load_model(quick_world / role, what=role, device="cpu")
    problems = load_world_splits(quick_world)["ops4"][:6]  # different lengths: padding is exercised
    rate = loop_start_rate(model, tok, problems, batch_size=5)
    assert 0.0 < rate < 1.0
    assert rate == pytest.approx(_direct(model, tok, problems), rel=1e-4)


def test_no_step_lines_is_nan(quick_world):
    tok = load_tokenizer(quick_world / "tokenizer")
    model = load_model(quick_world / "student", what="student", device="cpu")
    assert math.isnan(loop_start_rate(model, tok, [Problem(id="x", prompt="7\n", answer="7", solution="#7")]))
