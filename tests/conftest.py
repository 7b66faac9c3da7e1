"""Shared test setup: thread count for 2 cores, and one quick embedded world per session."""

from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def quick_world(tmp_path_factory) -> Path:
    """A `--quick` world (data, tokenizer, tiny Qwen3 teacher and student) built once per session."""
    from kat_diag.world.build import WorldConfig, build_world

    out = tmp_path_factory.mktemp("world")
    build_world(out, WorldConfig.quick(), progress=False)
    return out
