"""`kat-diag plan`: memory terms against hand computations (world models, Qwen3-4B/8B shapes)."""

import json

import pytest

from kat_diag.opd.plan import GB, ModelShape, PlanConfig, memory_plan, plan

# Qwen3-4B / Qwen3-8B as published (config.json fields that memory depends on).
QWEN3_4B = dict(model_type="qwen3", hidden_size=2560, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, intermediate_size=9728, vocab_size=151936,
                tie_word_embeddings=True)
QWEN3_8B = dict(model_type="qwen3", hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, intermediate_size=12288, vocab_size=151936,
                tie_word_embeddings=False)


def test_parameter_counts_match_the_world_models(quick_world):
    from kat_diag.models import load_model

    for name in ("teacher", "student"):
        shape = ModelShape.from_path(quick_world / name)
        model = load_model(quick_world / name, device="cpu")
        assert shape.params() == sum(p.numel() for p in model.parameters()), name


def test_world_plan_matches_a_hand_computation():
    from kat_diag.world.paths import DEFAULT_WORLD_DIR

    t = ModelShape.from_path(DEFAULT_WORLD_DIR / "teacher")  # H 128, 4 layers, 4/4 heads of 32, I 384, V 99
    s = ModelShape.from_path(DEFAULT_WORLD_DIR / "student")  # H 128, 3 layers, 4/4 heads of 32, I 384, V 99
    # Per layer: q,k,v,o + 3 MLP matrices + 2 RMSNorms + q/k norms (head_dim each).
    t_layer = 128 * (128 + 2 * 128) + 128 * 128 + 3 * 128 * 384 + 2 * 128 + 2 * 32
    s_layer = 128 * (128 + 2 * 128) + 128 * 128 + 3 * 128 * 384 + 2 * 128 + 2 * 32
    assert t.params() == 99 * 128 + 4 * t_layer + 128 == 866048  # tied embeddings: counted once
    assert s.params() == 99 * 128 + 3 * s_layer + 128 == 652736
    cfg = PlanConfig(devices=2, batch_size=4, budget=20, prompt_len=12, chunk_size=4, micro_batch=3, loss="full",
                     dtype="fp32", student_dtype="fp32", device_gb=1.0)
    ddp = memory_plan(t, s, cfg, "ddp")
    assert ddp["student_weights"] == 652736 * 4
    assert ddp["gradients"] == 652736 * 4
    assert ddp["optimizer"] == 652736 * 8  # AdamW m + v in fp32
    assert ddp["master_weights"] == 0
    assert ddp["teacher_weights"] == 866048 * 4
    assert ddp["teacher_state"] == 4 * 20 * 99 * 4  # batch x budget tokens x vocab fp32
    # 4 slots x 32 positions x (student 3 layers + teacher 4 layers) x K,V x kv_dim x fp32
    assert ddp["kv_cache"] == 4 * 32 * (3 * 2 * 128 * 4 + 4 * 2 * 128 * 4) == 917504
    assert ddp["rollout_activations"] == 3 * 4 * 4 * (99 + 4 * 99)
    assert ddp["update_activations"] == 3 * 32 * (3 * (4 * 128 + 2 * 128 + 2 * 128 + 3 * 384) * 4 + 3 * 4 * 99)
    assert ddp["gathered_student"] == 0 and ddp["gathered_layer"] == 0
    persistent = 652736 * (4 + 8) + 866048 * 4 + 31680  # weights + AdamW + teacher + teacher state
    assert ddp["persistent"] == persistent
    # gradients live only in the update phase (zero_grad(set_to_none=True) after each step)
    assert ddp["peak"] == persistent + max(917504 + 23760, 652736 * 4 + 2620800)
    fsdp = memory_plan(t, s, cfg, "fsdp")
    assert fsdp["student_weights"] == 652736 * 4 / 2 and fsdp["optimizer"] == 652736 * 8 / 2
    assert fsdp["gradients"] == 652736 * 4 / 2
    assert fsdp["gathered_student"] == 652736 * 4 / 2  # the other half, gathered once for the rollout
    assert fsdp["gathered_layer"] == 2 * s_layer * 4
    assert fsdp["teacher_weights"] == 866048 * 4  # not sharded without shard_teacher
    sharded = memory_plan(t, s, PlanConfig(**{**cfg.__dict__, "shard_teacher": True}), "fsdp")
    assert sharded["teacher_weights"] == 866048 * 4 / 2
    assert sharded["gathered_teacher"] == 866048 * 4 / 2  # gathered once for the rollout, like the student


def test_topk_and_sampled_teacher_state():
    s = ModelShape.from_config(QWEN3_4B)
    base = dict(batch_size=8, budget=100)
    full = memory_plan(s, s, PlanConfig(loss="full", **base), "ddp")["teacher_state"]
    topk = memory_plan(s, s, PlanConfig(loss="topk", top_k=16, **base), "ddp")["teacher_state"]
    sampled = memory_plan(s, s, PlanConfig(loss="sampled", **base), "ddp")["teacher_state"]
    assert full == 800 * 151936 * 4
    assert topk == 800 * (17 * 4 + 16 * 8)  # k+1 fp32 values (top-k log-probs, tail) + k int64 ids
    assert sampled == 800 * 4


def test_qwen3_paper_setup_reproduces_the_issue_numbers():
    student, teacher = ModelShape.from_config(QWEN3_4B), ModelShape.from_config(QWEN3_8B)
    assert student.params() == 4_022_468_096  # Qwen3-4B: 4.0 B
    assert teacher.params() == 8_190_735_360  # Qwen3-8B: 8.2 B
    cfg = PlanConfig(devices=4, device_gb=80, batch_size=8, budget=1024, micro_batch=2, loss="topk", dtype="bf16")
    ddp = memory_plan(teacher, student, cfg, "ddp")
    # "the 4B student with fp32 AdamW state alone needs ~64 GB before the teacher's 16 GB of bf16 weights"
    student_state = ddp["student_weights"] + ddp["gradients"] + ddp["optimizer"]
    assert student_state / GB == pytest.approx(64.36, abs=0.01)
    assert ddp["teacher_weights"] / GB == pytest.approx(16.38, abs=0.01)
    assert not ddp["fits"]
    fsdp = memory_plan(teacher, student, cfg, "fsdp")
    assert fsdp["fits"] and fsdp["optimizer"] == ddp["optimizer"] / 4
    assert plan(teacher, student, cfg)["verdict"].startswith("fsdp fits")


def test_bf16_student_adds_fp32_master_weights():
    s = ModelShape.from_config(QWEN3_4B)
    m = memory_plan(s, s, PlanConfig(student_dtype="bf16"), "ddp")
    assert m["student_weights"] == s.params() * 2 and m["master_weights"] == s.params() * 4
    assert m["gradients"] == s.params() * 2


def test_plan_cli_prints_table_and_json():
    from typer.testing import CliRunner

    from cli.main import app

    runner = CliRunner()  # defaults: the shipped world's teacher and student configs
    res = runner.invoke(app, ["plan", "--devices", "2", "--device-gb", "1"])
    assert res.exit_code == 0, res.output
    assert "student_weights" in res.output and "ddp fits in 1 GB x 2" in res.output
    res = runner.invoke(app, ["plan", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["student_params"] == 652736


def test_plan_rejects_a_config_without_the_shape():
    with pytest.raises(KeyError, match="hidden_size"):
        ModelShape.from_config({"model_type": "bert"})
