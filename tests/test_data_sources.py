"""`--data` sources: a datasets save_to_disk directory loads the same records as its JSONL; hf: names."""

import json
import os
import subprocess
import sys

import pytest

from kat_diag.data.sources import load_math_dataset

datasets = pytest.importorskip("datasets", reason="datasets not installed (pip install 'kat-diag[data]')")

RECORDS = [
    {"q": "Tom has 3 apples and buys 4 more. How many?", "sol": "3+4=7\n#### 7", "uid": "a"},
    {"q": "What is 1,000 + 234?", "sol": "1000+234=1234\n#### 1,234", "uid": "b"},
    {"q": "Simplify 6/4.", "sol": "It is $\\boxed{\\frac{3}{2}}$.", "uid": "c"},
]


def test_save_to_disk_directory_loads_the_same_records_as_the_jsonl(tmp_path):
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    disk = tmp_path / "train_ds"
    datasets.Dataset.from_json(str(jsonl)).save_to_disk(str(disk))
    kw = dict(question_field="q", answer_field="sol", id_field="uid")
    from_jsonl = load_math_dataset(jsonl, **kw)
    from_disk = load_math_dataset(disk, **kw)
    assert from_disk == from_jsonl
    assert [p.answer for p in from_disk] == ["7", "1234", "\\frac{3}{2}"]
    # Without an id field the ids come from the source name, as for files.
    assert [p.id for p in load_math_dataset(disk, question_field="q", answer_field="sol")][0] == "train_ds-0"


def test_dataset_dict_directory_asks_for_a_split(tmp_path):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS)})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"DatasetDict; pass one split's directory, e.g. .*dd/train"):
        load_math_dataset(tmp_path / "dd", question_field="q", answer_field="sol")
    assert len(load_math_dataset(tmp_path / "dd" / "train", question_field="q", answer_field="sol")) == 3


def test_field_mapping_errors_are_the_same_for_a_datasets_directory(tmp_path):
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(KeyError, match="has no field 'question'"):
        load_math_dataset(tmp_path / "ds")


def test_hf_name_offline_is_a_one_line_error_saying_to_pass_a_local_path(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    code = "from cli.main import main; main()"
    proc = subprocess.run([sys.executable, "-c", code, "train", "--data", "hf:openai/gsm8k:main:train",
                           "--out", str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --data 'hf:openai/gsm8k:main:train'"), proc.stderr
    assert "offline" in lines[0] and "pass a local path" in lines[0]


def test_hf_spec_must_name_a_split():
    with pytest.raises(ValueError, match="expected hf:NAME:SPLIT"):
        load_math_dataset("hf:openai/gsm8k")
