"""Tasks: the embedded arithmetic world's problems, real math data sets, and answer checking.

The embedded world (DESIGN §5) is a seeded chain of integer operations solved step by step:

    prompt      "23 +7 -5 *2\\n"
    completion  "23+7=30\\n30-5=25\\n25*2=50\\n#50"

Every intermediate value stays in [0, 99], so a character-level model of ~1 M parameters can learn
the arithmetic in minutes on a CPU, and a wrong intermediate result is a recoverable-looking but
wrong state that a teacher conditioned on it will happily continue from (the agreement trap).

Real data (GSM8K-style `#### 42` answers, MATH-style `\\boxed{}` answers) load from local JSONL or
Parquet with a field mapping and are graded with math-verify.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

ANSWER_MARKER = "#"
MAX_VALUE = 99

# Benchmark splits of rising difficulty: name -> number of operations.
BENCHMARK_OPS: dict[str, int] = {"ops2": 2, "ops3": 3, "ops4": 4, "ops5": 5}


@dataclass(frozen=True)
class Problem:
    """One problem: the prompt the model sees, the reference answer and (optionally) a solution."""

    id: str
    prompt: str
    answer: str
    solution: str = ""
    kind: str = "arith"  # "arith" -> exact match; "math" -> math-verify

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: dict) -> Problem:
        return Problem(**d)


# ---------------------------------------------------------------------------------------------
# The arithmetic world
# ---------------------------------------------------------------------------------------------


def _next_op(rng: random.Random, value: int) -> tuple[str, int, int]:
    """Draw an operation that keeps the running value inside [0, MAX_VALUE]."""
    choices: list[str] = []
    if value < MAX_VALUE:
        choices.append("+")
    if value > 0:
        choices.append("-")
    if 1 <= value <= MAX_VALUE // 2:
        choices.append("*")
    op = rng.choice(choices)
    if op == "+":
        b = rng.randint(1, min(40, MAX_VALUE - value))
        return op, b, value + b
    if op == "-":
        b = rng.randint(1, min(40, value))
        return op, b, value - b
    b = rng.randint(2, min(5, MAX_VALUE // value))
    return op, b, value * b


def _num(value: int, width: int) -> str:
    return str(value).zfill(width) if width else str(value)


def make_problem(rng: random.Random, n_ops: int, pid: str, width: int = 0) -> Problem:
    """One chain of `n_ops` operations with its step-by-step solution. `width` 2 zero-pads every
    number ("23+07=30"): every step line then has the same length, so a repetition loop is exactly
    periodic and a tiny model can follow it by position."""
    value = rng.randint(2, 60)
    ops_text = [_num(value, width)]
    lines = []
    for _ in range(n_ops):
        op, b, new = _next_op(rng, value)
        ops_text.append(f"{op}{_num(b, width)}")
        lines.append(f"{_num(value, width)}{op}{_num(b, width)}={_num(new, width)}")
        value = new
    prompt = " ".join(ops_text) + "\n"
    solution = "\n".join(lines) + f"\n{ANSWER_MARKER}{_num(value, width)}"
    return Problem(id=pid, prompt=prompt, answer=str(value), solution=solution, kind="arith")


def generate_problems(n: int, n_ops: int | Sequence[int], seed: int, prefix: str, width: int = 0) -> list[Problem]:
    """`n` problems, deterministic in `seed`; `n_ops` an int or a set to draw from uniformly."""
    rng = random.Random(seed)
    ops_choices = [n_ops] if isinstance(n_ops, int) else list(n_ops)
    return [make_problem(rng, rng.choice(ops_choices), f"{prefix}-{i}", width) for i in range(n)]


def world_splits(
    seed: int, n_train: int, n_bench: int, train_ops: Sequence[int] = (2, 3, 4, 5), width: int = 0
) -> dict[str, list[Problem]]:
    """The training prompt split and the four benchmark splits, disjoint by prompt text."""
    splits: dict[str, list[Problem]] = {}
    seen: set[str] = set()
    for i, (name, k) in enumerate(BENCHMARK_OPS.items()):
        rng = random.Random(seed * 1000 + 17 + i)
        probs: list[Problem] = []
        while len(probs) < n_bench:
            p = make_problem(rng, k, f"{name}-{len(probs)}", width)
            if p.prompt not in seen:
                seen.add(p.prompt)
                probs.append(p)
        splits[name] = probs
    rng = random.Random(seed * 1000 + 3)
    train: list[Problem] = []
    while len(train) < n_train:
        p = make_problem(rng, rng.choice(list(train_ops)), f"train-{len(train)}", width)
        if p.prompt not in seen:
            seen.add(p.prompt)
            train.append(p)
    splits["train"] = train
    return splits


def wrong_line(rng: random.Random, a: int, op: str, b: int, c: int, width: int = 0) -> str:
    """A step line with an error like a sampling accident: one digit of the result changed (3 in
    4), or the left operand not the previous result (1 in 4)."""
    if rng.random() < 0.75:
        digits = list(_num(c, width))
        i = rng.randrange(len(digits))
        digits[i] = rng.choice([d for d in "0123456789"
                                if d != digits[i] and (width or i or d != "0" or len(digits) == 1)])
        return f"{_num(a, width)}{op}{_num(b, width)}={''.join(digits)}"
    a2 = rng.choice([x for x in range(max(0, a - 9), min(MAX_VALUE, a + 9) + 1) if x != a])
    c2 = {"+": a2 + b, "-": a2 - b, "*": a2 * b}[op]
    return f"{_num(a2, width)}{op}{_num(b, width)}={_num(c2, width)}"


def error_loop_variant(p: Problem, rng: random.Random, length: int, context_repeats: int,
                       wrong: bool = True, width: int = 0) -> Problem:
    """A repetition loop: the correct steps up to a random one, that step with a wrong result
    (`wrong_line`; with wrong=False the correct step itself), then that line repeated until the
    completion is `length` characters long (cut mid-line, no answer, no end of text, like a
    rollout that hits its budget).

    Everything up to and including the wrong line and its first `context_repeats` repeats goes
    into the prompt, so the SFT loss (completion only) never teaches the model to make the error.
    With `context_repeats` 0 the model learns to start a loop after an inconsistent line (the
    student); with 1 it only learns that a line repeated twice goes on repeating (the teacher:
    it follows a loop once begun but never starts one).
    """
    lines = p.solution.split("\n")[:-1]  # the step lines, without "#answer"
    k = rng.randrange(len(lines))
    m = re.match(r"^(\d+)([+\-*])(\d+)=(\d+)$", lines[k])
    assert m is not None
    bad = wrong_line(rng, int(m[1]), m[2], int(m[3]), int(m[4]), width) if wrong else lines[k]
    context = "".join(line + "\n" for line in lines[:k] + [bad] * (1 + context_repeats))
    n_rep = (length - len(context)) // (len(bad) + 1) + 1
    body = ((bad + "\n") * max(1, n_rep))[: max(1, length - len(context))]
    return Problem(id=p.id + "-loop", prompt=p.prompt + context, answer=p.answer, solution=body, kind="loop")


def spontaneous_loop_variant(p: Problem, rng: random.Random, length: int) -> Problem:
    """A document that falls into a repetition loop, as small LMs do: the correct steps up to a
    random one, then that step repeated until the completion is `length` characters long (cut
    mid-line, no answer, no end of text, like a rollout that hits its budget). The whole completion
    is trained on, so a model learns both to start such a loop (with the mixture's frequency) and
    that a loop, once begun, goes on."""
    lines = p.solution.split("\n")[:-1]  # the step lines, without "#answer"
    k = rng.randrange(len(lines))
    head = "".join(line + "\n" for line in lines[: k + 1])
    n_rep = max(1, (length - len(head)) // (len(lines[k]) + 1) + 1)
    body = (head + (lines[k] + "\n") * n_rep)[: max(len(head) + 1, length)]
    return Problem(id=p.id + "-loop", prompt=p.prompt, answer=p.answer, solution=body, kind="loop")


@dataclass(frozen=True)
class LoopDocs:
    """Loop documents in an SFT mixture: a `share` of the batches consist of them."""

    share: float = 0.0
    length: int = 192  # characters of completion, as the rollout budget
    context_repeats: int = 0  # repeats of the line kept out of the loss (see error_loop_variant)
    wrong: bool = True  # the repeated line is a wrong step (True) or a correct one (a spontaneous loop)
    spontaneous: bool = False  # whole-document loops (spontaneous_loop_variant); the two fields above unused


def sft_batches(seed: int, ops: Sequence[int], exclude: set[str], batch_size: int,
                loops: LoopDocs | Sequence[LoopDocs] = LoopDocs(), width: int = 0) -> Iterable[list[Problem]]:
    """Endless SFT batches (prompt + solution), never a benchmark prompt. A `loops.share` of the
    batches are loop documents only (`error_loop_variant`, or `spontaneous_loop_variant`): whole
    batches, so the long loop documents do not pad the short clean ones. Several `LoopDocs` mix
    several kinds, each with its own share (e.g. short loops that set how often a model starts a
    loop, long ones that teach it to go on to the budget)."""
    kinds = [loops] if isinstance(loops, LoopDocs) else list(loops)
    if sum(k.share for k in kinds) > 1:
        raise ValueError(f"loop document shares sum to {sum(k.share for k in kinds)} > 1")
    rng = random.Random(seed)
    i = 0

    def problem() -> Problem:
        nonlocal i
        while True:
            p = make_problem(rng, rng.choice(list(ops)), f"sft-{i}", width)
            i += 1
            if p.prompt not in exclude:
                return p

    def kind_of(u: float) -> LoopDocs | None:
        for k in kinds:
            if u < k.share:
                return k
            u -= k.share
        return None

    while True:
        k = kind_of(rng.random()) if any(k.share for k in kinds) else None
        if k is None:
            yield [problem() for _ in range(batch_size)]
        elif k.spontaneous:
            yield [spontaneous_loop_variant(problem(), rng, k.length) for _ in range(batch_size)]
        else:
            yield [error_loop_variant(problem(), rng, k.length, k.context_repeats, k.wrong, width)
                   for _ in range(batch_size)]


def write_jsonl(problems: Iterable[Problem], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for p in problems:
            f.write(json.dumps(p.to_json()) + "\n")


def read_problems(path: str | Path) -> list[Problem]:
    """Read problems written by `write_jsonl` (the world's own format)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"problem file not found: {path}")
    out = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(Problem.from_json(json.loads(line)))
                except (json.JSONDecodeError, TypeError) as e:
                    raise ValueError(f"{path}:{lineno}: not a kat-diag problem record ({e})") from e
    if not out:
        raise ValueError(f"{path}: no problems in file")
    return out


# ---------------------------------------------------------------------------------------------
# Real math data sets from local files
# ---------------------------------------------------------------------------------------------

_GSM8K_RE = re.compile(r"####\s*(.+?)\s*$", re.S)


def extract_gsm8k_answer(text: str) -> str | None:
    """`... #### 1,234` -> `1234`."""
    m = _GSM8K_RE.search(text)
    return m.group(1).replace(",", "").strip() if m else None


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), with nested braces."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not starts:
        return None
    i = start = starts[-1]
    depth = 1
    while i < len(text):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i].strip()
        i += 1
    return None


HF_PREFIX = "hf:"


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """`hf:NAME[:CONFIG]:SPLIT` -> (name, config or None, split)."""
    parts = spec[len(HF_PREFIX):].split(":")
    if not spec.startswith(HF_PREFIX) or len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"--data {spec!r}: expected hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT "
                         "(e.g. hf:openai/gsm8k:main:train)")
    return (parts[0], None, parts[1]) if len(parts) == 2 else (parts[0], parts[1], parts[2])


def is_datasets_dir(path: str | Path) -> bool:
    """A directory written by `Dataset.save_to_disk` (state.json) or `DatasetDict.save_to_disk`."""
    p = Path(path)
    return p.is_dir() and ((p / "state.json").exists() or (p / "dataset_dict.json").exists())


def _read_hf_dataset(spec: str) -> list[dict]:
    """`hf:NAME[:CONFIG]:SPLIT` through `datasets.load_dataset` (the local cache when offline)."""
    name, config, split = parse_hf_spec(spec)
    datasets = _import_datasets(spec)
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown name or split: the hub client raises many types
        import os

        offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                      for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        why = "offline (HF_HUB_OFFLINE=1) and not in the local cache" if offline else str(e).splitlines()[0]
        raise ValueError(f"--data {spec!r}: cannot load {name!r} ({why}); pass a local path instead "
                         "(a save_to_disk directory, JSONL or Parquet)") from e
    return ds.to_list()


def _import_datasets(source: str):
    try:
        import datasets
    except ImportError:
        raise ValueError(f"--data {source!r} needs the `datasets` package: pip install 'kat-diag[data]'") from None
    return datasets


def _read_disk_dataset(path: Path) -> list[dict]:
    """A directory written by `datasets.Dataset.save_to_disk`."""
    if (path / "dataset_dict.json").exists():
        splits = sorted(p.name for p in path.iterdir() if (p / "state.json").exists())
        raise ValueError(f"{path}: a DatasetDict; pass one split's directory, e.g. {path / (splits or ['train'])[0]}")
    ds = _import_datasets(str(path)).load_from_disk(str(path))
    return ds.to_list()


def _read_records(path: Path) -> list[dict]:
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.is_dir():
        if not is_datasets_dir(path):
            raise ValueError(f"{path}: a directory but not a datasets save_to_disk directory (no state.json)")
        return _read_disk_dataset(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        records = []
        with path.open() as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
        return records
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise ValueError(f"{path}: unsupported data format {suffix!r} (use .jsonl, .parquet, a datasets directory "
                     "or hf:NAME:CONFIG:SPLIT)")


def is_problem_record(record: dict) -> bool:
    """A record of the world's own format (`write_jsonl`), read as a `Problem` with its ground truth."""
    return set(record) == {"id", "prompt", "answer", "solution", "kind"}


def load_math_dataset(
    path: str | Path,
    question_field: str = "question",
    answer_field: str = "answer",
    answer_format: str = "auto",
    id_field: str | None = None,
    limit: int | None = None,
) -> list[Problem]:
    """Load a real math set with a field mapping, from local JSONL/Parquet, a directory written by
    `datasets.Dataset.save_to_disk`, or `hf:NAME[:CONFIG]:SPLIT` (loaded by `datasets`).

    answer_format: "gsm8k" (`#### 42` inside the answer field), "boxed" (MATH-style `\\boxed{}`
    inside a solution field), "plain" (the field is the answer), or "auto" (try gsm8k, boxed, plain).
    """
    if answer_format not in ("auto", "gsm8k", "boxed", "plain"):
        raise ValueError(f"answer_format must be auto|gsm8k|boxed|plain, got {answer_format!r}")
    if str(path).startswith(HF_PREFIX):
        records = _read_hf_dataset(str(path))
        path = Path(str(path)[len(HF_PREFIX):].split(":")[0].replace("/", "_"))  # ids and messages name it
    else:
        path = Path(path)
        records = _read_records(path)
    if not records:
        raise ValueError(f"{path}: the data set is empty")
    if question_field not in records[0] and is_problem_record(records[0]):
        # a world data file (`write_jsonl`): keep its kind and solution, hence its ground truth
        return [Problem.from_json(r) for r in (records[:limit] if limit else records)]
    problems = []
    for i, rec in enumerate(records[:limit] if limit else records):
        for field in (question_field, answer_field) + ((id_field,) if id_field else ()):
            if field not in rec:
                raise KeyError(
                    f"{path}: record {i} has no field {field!r} (fields: {sorted(rec)}); "
                    f"set the field mapping"
                )
        raw = str(rec[answer_field])
        ans = None
        if answer_format in ("auto", "gsm8k"):
            ans = extract_gsm8k_answer(raw)
        if ans is None and answer_format in ("auto", "boxed"):
            ans = extract_boxed(raw)
        if ans is None and answer_format in ("auto", "plain"):
            ans = raw.strip()
        if ans is None or ans == "":
            raise ValueError(
                f"{path}: record {i}: no {answer_format} answer found in field {answer_field!r}"
            )
        pid = str(rec[id_field]) if id_field else f"{path.stem}-{i}"
        problems.append(
            Problem(id=pid, prompt=str(rec[question_field]), answer=ans, solution=raw, kind="math")
        )
    return problems


# ---------------------------------------------------------------------------------------------
# Answer checking
# ---------------------------------------------------------------------------------------------

_MARKER_RE = re.compile(re.escape(ANSWER_MARKER) + r"\s*(-?\d+)")


def extract_arith_answer(completion: str) -> str | None:
    """The integer after the first answer marker, or None."""
    m = _MARKER_RE.search(completion)
    return m.group(1) if m else None


def check_arith(completion: str, answer: str) -> bool:
    """Exact match of the marked final answer."""
    got = extract_arith_answer(completion)
    return got is not None and int(got) == int(answer)


def check_math(completion: str, answer: str) -> bool:
    """math-verify: parse the completion's final answer and the gold one, compare symbolically."""
    from math_verify import parse, verify

    gold = parse("$" + answer + "$") or parse(answer)
    boxed = extract_boxed(completion)
    gsm = extract_gsm8k_answer(completion)
    candidate_text = f"${boxed}$" if boxed is not None else (f"${gsm}$" if gsm is not None else completion)
    pred = parse(candidate_text)
    if not gold or not pred:
        return False
    try:
        return bool(verify(gold, pred))
    except Exception:  # math-verify raises on exotic expressions; such an answer is not verified
        return False


def check_answer(problem: Problem, completion: str) -> bool:
    """Grade a completion: exact match in the arithmetic world, math-verify on real data."""
    if problem.kind == "arith":
        return check_arith(completion, problem.answer)
    return check_math(completion, problem.answer)
