"""Tasks: generator determinism, splits, real-data loading with field mapping, answer checking."""

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kat_diag.data.grading import check_answer, check_arith, check_math, extract_boxed, extract_gsm8k_answer
from kat_diag.data.problems import read_problems, write_jsonl
from kat_diag.data.sources import load_math_dataset
from kat_diag.world.tasks import BENCHMARK_OPS, generate_problems, world_splits


def _eval_chain(problem) -> int:
    """Independent reference: recompute the answer from the prompt's chain of operations."""
    first, *ops = problem.prompt.split()
    v = int(first)
    for op in ops:
        b = int(op[1:])
        v = {"+": v + b, "-": v - b, "*": v * b}[op[0]]
    return v


def test_generator_is_deterministic_and_seed_dependent():
    a = generate_problems(50, (2, 3), seed=7, prefix="x")
    b = generate_problems(50, (2, 3), seed=7, prefix="x")
    c = generate_problems(50, (2, 3), seed=8, prefix="x")
    assert a == b
    assert a != c


def test_solutions_are_correct_and_values_bounded():
    for p in generate_problems(300, (2, 3, 4, 5), seed=1, prefix="t"):
        assert int(p.answer) == _eval_chain(p)
        lines = p.solution.split("\n")
        assert lines[-1] == f"#{p.answer}"
        for line in lines[:-1]:
            lhs, rhs = line.split("=")
            assert 0 <= int(rhs) <= 99
            assert eval(lhs) == int(rhs)  # noqa: S307 - arithmetic of our own generator
        assert check_arith(p.solution, p.answer)


def test_world_splits_rising_difficulty_and_disjoint():
    s = world_splits(seed=0, n_train=200, n_bench=30)
    assert list(s) == [*BENCHMARK_OPS, "train"]
    for name, k in BENCHMARK_OPS.items():
        assert len(s[name]) == 30
        assert all(len(p.prompt.split()) == k + 1 for p in s[name])
    prompts = [p.prompt for v in s.values() for p in v]
    assert len(prompts) == len(set(prompts))
    assert world_splits(seed=0, n_train=200, n_bench=30) == s


def test_jsonl_round_trip(tmp_path):
    probs = generate_problems(10, 3, seed=0, prefix="r")
    write_jsonl(probs, tmp_path / "p.jsonl")
    assert read_problems(tmp_path / "p.jsonl") == probs


def test_read_problems_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_problems(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no problems"):
        read_problems(tmp_path / "empty.jsonl")


def test_gsm8k_and_boxed_extraction():
    assert extract_gsm8k_answer("She has 3+4=7 apples.\n#### 1,234") == "1234"
    assert extract_gsm8k_answer("no marker") is None
    assert extract_boxed(r"so \boxed{\frac{1}{2}} and") == r"\frac{1}{2}"
    assert extract_boxed(r"\boxed{1} then \boxed{x^{2}+1}") == "x^{2}+1"
    assert extract_boxed("nothing") is None


def test_load_gsm8k_jsonl_with_field_mapping(tmp_path):
    f = tmp_path / "gsm.jsonl"
    rows = [{"q": "What is 2+2?", "sol": "2+2=4\n#### 4", "uid": "a"},
            {"q": "Half of 10?", "sol": "10/2=5\n#### 5", "uid": "b"}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    probs = load_math_dataset(f, question_field="q", answer_field="sol", id_field="uid")
    assert [(p.id, p.prompt, p.answer, p.kind) for p in probs] == [
        ("a", "What is 2+2?", "4", "math"), ("b", "Half of 10?", "5", "math")]


def test_load_math_parquet_boxed(tmp_path):
    f = tmp_path / "math.parquet"
    pq.write_table(pa.table({"problem": ["Simplify 2/4."], "solution": [r"It is $\boxed{\frac12}$."]}), f)
    probs = load_math_dataset(f, question_field="problem", answer_field="solution", answer_format="boxed")
    assert probs[0].answer == r"\frac12"


def test_loader_errors_name_file_and_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_math_dataset(tmp_path / "nope.jsonl")
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(KeyError, match=r"d\.jsonl.*'answer'"):
        load_math_dataset(f)
    e = tmp_path / "e.jsonl"
    e.write_text("")
    with pytest.raises(ValueError, match="e.jsonl.*empty"):
        load_math_dataset(e)
    g = tmp_path / "g.jsonl"
    g.write_text(json.dumps({"question": "x", "answer": "no answer here"}) + "\n")
    with pytest.raises(ValueError, match="gsm8k"):
        load_math_dataset(g, answer_format="gsm8k")
    h = tmp_path / "h.csv"
    h.write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported"):
        load_math_dataset(h)


@pytest.mark.parametrize(
    ("completion", "answer", "ok"),
    [
        ("12+3=15\n#15", "15", True),
        ("12+3=15\n#16", "15", False),
        ("12+3=15\n", "15", False),  # no final answer marker
        ("#07", "7", True),
        ("#0", "0", True),
    ],
)
def test_check_arith(completion, answer, ok):
    assert check_arith(completion, answer) is ok


@pytest.mark.parametrize(
    ("completion", "answer", "ok"),
    [
        (r"The result is \boxed{\frac{1}{2}}.", "0.5", True),
        (r"The result is \boxed{\frac{1}{2}}.", r"\frac{2}{4}", True),
        (r"The result is \boxed{3}.", "4", False),
        ("Adding up gives 18.\n#### 18", "18", True),
        ("Adding up gives 18.\n#### 19", "18", False),
        (r"\boxed{x^2+2x+1}", "(x+1)^2", True),
    ],
)
def test_check_math_with_math_verify(completion, answer, ok):
    assert check_math(completion, answer) is ok


def test_check_answer_dispatches_on_kind():
    arith = generate_problems(1, 2, seed=0, prefix="k")[0]
    assert check_answer(arith, arith.solution)


def test_sft_batches_mix_whole_batches_of_error_loops():
    from kat_diag.world.tasks import LoopDocs, sft_batches

    stream = sft_batches(1, (2, 3), set(), 4, LoopDocs(share=0.25, length=64, context_repeats=1))
    batches = [next(stream) for _ in range(800)]
    kinds = [{p.kind for p in b} for b in batches]
    assert all(len(k) == 1 for k in kinds)  # a batch is all clean or all loops
    assert 0.2 < sum(k == {"loop"} for k in kinds) / 800 < 0.3
    clean = sft_batches(1, (2, 3), set(), 4)
    assert all(p.kind == "arith" for _ in range(100) for p in next(clean))


def test_sft_encoding_ends_solutions_with_eos_but_not_loops():
    import random

    from kat_diag.world.sft import encode_sft_batch
    from kat_diag.world.tasks import error_loop_variant
    from kat_diag.world.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    p = generate_problems(1, 3, seed=0, prefix="e")[0]
    lp = error_loop_variant(p, random.Random(1), 64, 0)
    batch = encode_sft_batch(tok, [p, lp])
    labels = batch["labels"]
    n0, n1 = int(batch["attention_mask"][0].sum()), int(batch["attention_mask"][1].sum())
    assert labels[0, n0 - 1] == tok.eos_token_id
    assert labels[1, n1 - 1] != tok.eos_token_id
    assert (labels[0, : len(p.prompt)] == -100).all()
    assert (labels[1, : len(lp.prompt)] == -100).all()  # the error itself is never a target


def test_fixed_width_problems_are_the_same_chains_zero_padded():
    plain = generate_problems(200, (2, 3, 4, 5), seed=3, prefix="w")
    padded = generate_problems(200, (2, 3, 4, 5), seed=3, prefix="w", width=2)
    for p, q in zip(plain, padded, strict=True):
        assert q.answer == p.answer and _eval_chain(q) == int(p.answer)
        lines = q.solution.split("\n")
        assert all(len(line) == 8 for line in lines[:-1])  # "23+07=30": every step line is 8 characters
        assert lines[-1] == "#" + p.answer.zfill(2)
        assert [int(x) for x in re.findall(r"\d+", q.solution)] == [int(x) for x in re.findall(r"\d+", p.solution)]
        assert check_arith(q.solution, q.answer)


def test_spontaneous_loop_documents_repeat_a_correct_step_to_the_budget():
    import random

    from kat_diag.world.tasks import LoopDocs, sft_batches, spontaneous_loop_variant
    from kat_diag.world.truth import first_wrong_line, loop_start

    rng = random.Random(0)
    for p in generate_problems(100, (2, 3, 4, 5), seed=4, prefix="s", width=2):
        lp = spontaneous_loop_variant(p, rng, 96)
        assert lp.prompt == p.prompt and lp.kind == "loop" and len(lp.solution) == 96
        start = loop_start(lp.solution)
        assert start > 0 and start % 9 == 0  # the loop begins at a line start
        assert lp.solution[:start] == p.solution[:start]  # correct steps up to the loop
        assert first_wrong_line(lp.solution, p.solution) == start  # the first repeat is the first error
        assert lp.solution[start:start + 8] == lp.solution[start - 9:start - 1]
        assert set(lp.solution[start:].split("\n")[:-1]) == {lp.solution[start:start + 8]}
        assert "#" not in lp.solution
    stream = sft_batches(2, (2, 3), set(), 4, LoopDocs(0.3, 64, spontaneous=True), width=2)
    kinds = [{q.kind for q in next(stream)} for _ in range(3000)]
    assert all(len(k) == 1 for k in kinds)
    assert 0.27 < sum(k == {"loop"} for k in kinds) / 3000 < 0.33  # binomial sd 0.008


def test_a_world_data_file_loads_as_world_problems(tmp_path):
    probs = generate_problems(5, 3, seed=0, prefix="d", width=2)
    write_jsonl(probs, tmp_path / "ops3.jsonl")
    assert load_math_dataset(tmp_path / "ops3.jsonl") == probs  # kind and solution kept: ground truth
    from kat_diag.data.sources import check_data_file

    check_data_file("--data", tmp_path / "ops3.jsonl", ("question", "answer"))  # the CLI's check lets it through
    (tmp_path / "other.jsonl").write_text(json.dumps({"prompt": "1 +1\n", "answer": "2"}) + "\n")
    with pytest.raises(KeyError, match="no field 'question'"):  # other records still need the mapping
        check_data_file("--data", tmp_path / "other.jsonl", ("question", "answer"))


def test_sft_batches_mix_several_kinds_of_loop_documents_with_their_shares():
    from kat_diag.world.tasks import LoopDocs, sft_batches

    kinds = (LoopDocs(0.3, 40, spontaneous=True), LoopDocs(0.1, 90, spontaneous=True))
    stream = sft_batches(5, (2, 3), set(), 2, kinds, width=2)
    lengths = [{len(q.solution) if q.kind == "loop" else 0 for q in next(stream)} for _ in range(4000)]
    assert all(len(k) == 1 for k in lengths)
    share = {n: sum(k == {n} for k in lengths) / 4000 for n in (0, 40, 90)}
    assert abs(share[40] - 0.3) < 0.025 and abs(share[90] - 0.1) < 0.015 and abs(share[0] - 0.6) < 0.025
    with pytest.raises(ValueError, match="sum to"):
        next(sft_batches(5, (2,), set(), 2, (LoopDocs(0.7, 40, spontaneous=True), LoopDocs(0.5, 40, spontaneous=True))))
