"""The embedded world: tokenizer round trip, quick build loading through the Auto classes, eval math."""

import itertools
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kat_diag.evaluation import avg_at_k, evaluate_split, generate, pass_at_k
from kat_diag.models import check_compatible, load_model, load_tokenizer
from kat_diag.world.build import WorldConfig, build_world
from kat_diag.world.paths import load_world_splits
from kat_diag.world.tasks import generate_problems, world_splits
from kat_diag.world.tokenizer import save_char_tokenizer


def test_tokenizer_round_trip_on_every_problem(tmp_path):
    save_char_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    splits = world_splits(seed=0, n_train=500, n_bench=100)
    for p in itertools.chain.from_iterable(splits.values()):
        text = p.prompt + p.solution
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text)  # one token per character
        assert tok.decode(ids) == text
    assert tok.decode(tok("a b\n  c", add_special_tokens=False)["input_ids"]) == "a b\n  c"


def test_quick_world_layout_and_auto_loading(quick_world):
    summary = json.loads((quick_world / "world.json").read_text())
    assert set(summary["models"]) == {"teacher", "student"}
    assert summary["models"]["student"]["parameters"] < summary["models"]["teacher"]["parameters"]
    splits = load_world_splits(quick_world)
    assert list(splits) == ["train", "ops2", "ops3", "ops4", "ops5"]
    tok = AutoTokenizer.from_pretrained(quick_world / "tokenizer")
    for role in ("teacher", "student"):
        model = AutoModelForCausalLM.from_pretrained(quick_world / role)
        assert type(model).__name__ == "Qwen3ForCausalLM"
        enc = tok(["12 +3\n", "7 -2 *3\n"], return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
        assert out.shape == (2, enc["input_ids"].shape[1] + 5)


def test_world_build_is_reproducible(quick_world, tmp_path):
    build_world(tmp_path, WorldConfig.quick(), progress=False)
    for role in ("teacher", "student"):
        a = load_model(quick_world / role, device="cpu").state_dict()
        b = load_model(tmp_path / role, device="cpu").state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert (quick_world / "data" / "ops3.jsonl").read_text() == (tmp_path / "data" / "ops3.jsonl").read_text()


def test_stage1_from_gives_the_full_build(quick_world, tmp_path):
    from dataclasses import replace

    from kat_diag.world.sft import SFTConfig

    full = WorldConfig.quick()
    stage1 = replace(full, teacher=replace(full.teacher, loop_sft=SFTConfig(steps=0)),
                     student=replace(full.student, loop_sft=SFTConfig(steps=0)))
    build_world(tmp_path / "s1", stage1, progress=False)
    build_world(tmp_path / "s2", full, progress=False, stage1_from=tmp_path / "s1")
    for role in ("teacher", "student"):
        a = load_model(quick_world / role, device="cpu").state_dict()
        b = load_model(tmp_path / "s2" / role, device="cpu").state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="not stage 1"):  # a world that already has stage 2
        build_world(tmp_path / "s3", full, progress=False, stage1_from=quick_world)
    other_mix = replace(full, teacher=replace(full.teacher, mix=()))
    with pytest.raises(ValueError, match="not stage 1"):  # stage 1 trained on another mixture
        build_world(tmp_path / "s4", other_mix, progress=False, stage1_from=tmp_path / "s1")


def test_sft_lowers_the_loss(quick_world):
    summary = json.loads((quick_world / "world.json").read_text())
    # ln(99) = 4.6 is the loss of a uniform guess over the vocabulary.
    assert summary["models"]["teacher"]["sft_final_loss"] < 4.3


def test_load_errors_and_vocab_mismatch(quick_world, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope", what="teacher")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path / "empty", what="student")
    teacher = load_model(quick_world / "teacher", device="cpu")
    student = load_model(quick_world / "student", device="cpu")
    check_compatible(teacher, student)
    student.resize_token_embeddings(120)
    with pytest.raises(ValueError, match=r"teacher has 99 .* student has 120"):
        check_compatible(teacher, student)


def test_generate_and_evaluate_split(quick_world):
    tok = load_tokenizer(quick_world / "tokenizer")
    model = load_model(quick_world / "teacher", device="cpu")
    probs = generate_problems(6, 2, seed=3, prefix="e")
    outs = generate(model, tok, [p.prompt for p in probs], max_new_tokens=8)
    assert len(outs) == 6 and all(isinstance(o, str) for o in outs)
    res = evaluate_split(model, tok, probs, k=3, max_new_tokens=8)
    assert set(res) == {"n", "greedy", "avg@3", "pass@3"}
    assert 0 <= res["avg@3"] <= res["pass@3"] <= 1


def _pass_at_k_brute(n: int, c: int, k: int) -> float:
    """Share of k-subsets of n samples (c correct) that contain at least one correct sample."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize(("n", "c", "k"), [(5, 0, 1), (5, 1, 1), (6, 2, 3), (8, 3, 4), (8, 8, 2), (7, 1, 7)])
def test_pass_at_k_matches_brute_force(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_brute(n, c, k), abs=1e-12)


def test_pass_at_k_errors_and_avg():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)
    assert avg_at_k(np.array([[1, 0], [1, 1]])) == 0.75
