"""The world variants of docs/world.md "How the world was found", as configs that rebuild and re-measure them.

Each variant is a `WorldConfig` (the committed one is `WorldConfig()` itself); building one and
scoring it is the same as for the committed world:

    .venv/bin/python examples/world_variants.py --list
    .venv/bin/python examples/world_variants.py w4 --out /tmp/w4     # build (~10-13 min) + measure

The measurement is docs/world.md's: `kat-diag world eval --k 4 --n 100` (the exploratory builds; the
committed world's table uses k = 8 on all 200 problems), then 400 ops5 rollouts with `kat-diag
record` and `kat-diag trap` at the world preset, and the same after 200 steps of plain OPD (`--opd-
steps`). SFT is deterministic in the seed (the committed world's SFT losses equal those of its
exploratory runs bit for bit), so a variant's teacher or student is the same model wherever its
recipe is the same. The stage-2 variants A-E2 (fine-tunes of the previous world's models with error-
tied loops) are not here: that world is gone.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from kat_diag.world.build import ModelSpec, WorldConfig, build_world
from kat_diag.world.sft import SFTConfig
from kat_diag.world.tasks import LoopDocs


def _loops(*kinds: tuple) -> tuple[LoopDocs, ...]:
    """(share, length): spontaneous loops of a correct line; (share, length, "error"): loops of a wrong
    line that start right after it (`tasks.error_loop_variant`, loss on the first repeat too)."""
    return tuple(LoopDocs(k[0], k[1], spontaneous=len(k) == 2) for k in kinds)


def _teacher(steps: int, *kinds: tuple, hidden: int = 128, layers: int = 4) -> ModelSpec:
    return ModelSpec(hidden, layers, 4, 3 * hidden, SFTConfig(steps=steps, batch_size=64, lr=3e-3, seed=1),
                     mix=_loops(*kinds))


def _stage2(*kinds: tuple) -> ModelSpec:
    """The w7 teacher (900 steps, 12 % long loops), then 200 steps at lr 1e-3 on a mixture with `kinds`."""
    return replace(_teacher(900, (0.12, 192)), loops=_loops(*kinds),
                   loop_sft=SFTConfig(steps=200, batch_size=64, lr=1e-3, warmup=10, seed=5))


def _student(hidden: int, heads: int, steps: int, *kinds: tuple[float, int]) -> ModelSpec:
    return ModelSpec(hidden, 3, heads, 3 * hidden, SFTConfig(steps=steps, batch_size=64, lr=3e-3, seed=2),
                     mix=_loops(*kinds))


BASE = WorldConfig()
VARIANTS: dict[str, WorldConfig] = {
    "v1": replace(BASE, teacher=_teacher(800, (0.03, 192)), student=_student(96, 3, 600, (0.4, 192))),
    "v2": replace(BASE, teacher=_teacher(800, (0.1, 192)), student=_student(96, 3, 600, (0.6, 192))),
    "sa": replace(BASE, teacher=_teacher(800, (0.03, 192)), student=_student(128, 4, 800, (0.4, 192))),
    "w3": replace(BASE, teacher=_teacher(900, (0.12, 192)), student=_student(128, 4, 800, (0.4, 96))),
    "w4": replace(BASE, teacher=_teacher(900, (0.12, 192)), student=_student(128, 4, 800, (0.55, 64))),
    "H": replace(BASE, teacher=_teacher(900, (0.15, 48), (0.12, 192))),  # the committed student
    # Teachers for the trap's persistence through OPD, all with the committed student:
    "w8": replace(BASE, teacher=_teacher(900, (0.12, 192), (0.10, 192, "error"))),
    "w9": replace(BASE, teacher=_teacher(900, (0.12, 192), (0.05, 48))),
    "x1": replace(BASE, teacher=_teacher(1200, (0.15, 48), (0.12, 192))),
    "x2": replace(BASE, teacher=_teacher(1200, (0.10, 48), (0.12, 192))),
    "x3": replace(BASE, teacher=_teacher(1200, (0.12, 48), (0.12, 192))),
    "x4": replace(BASE, teacher=_teacher(1200, (0.135, 48), (0.12, 192))),
    "x5": replace(BASE, teacher=_teacher(1000, (0.15, 48), (0.12, 192), hidden=160)),
    "x6": replace(BASE, teacher=_teacher(1000, (0.15, 48), (0.12, 192), layers=5)),
    "w7": replace(BASE, teacher=_teacher(900, (0.12, 192))),  # committed before; its teacher starts no loops
    "y2": replace(BASE, teacher=_stage2((0.4, 48))),
    "y3": replace(BASE, teacher=_stage2((0.4, 48), (0.15, 192))),
    "y4": replace(BASE, teacher=_stage2((0.25, 48), (0.15, 192))),
    "y6": replace(BASE, teacher=_stage2((0.35, 48), (0.12, 192))),
    "committed": replace(BASE, teacher=_stage2((0.3, 48), (0.08, 192)),
                         student=_student(128, 4, 1000, (0.4, 48), (0.15, 192))),  # y5
}
assert VARIANTS["committed"] == WorldConfig()  # the table's last row is the default build


def _kinds(mix) -> list:
    mix = (mix,) if isinstance(mix, LoopDocs) else mix
    return [(k.share, k.length) if k.spontaneous else (k.share, k.length, "error") for k in mix]


def measure(world: Path, opd_steps: int = 200, eval_n: int = 100, eval_k: int = 4) -> None:
    """docs/world.md's measurement of a world, printed as the commands print it: world eval (with the
    loop-start rate loop/ln), KAT on 400 ops5 rollouts, and the same after `opd_steps` of plain OPD."""
    kat = str(Path(sys.executable).with_name("kat-diag"))
    models = ["--teacher", str(world / "teacher"), "--student", str(world / "student")]
    rec = ["--data", str(world / "data" / "ops5.jsonl"), "--n-prompts", "200", "--samples", "2", "--batch-size", "64"]
    out = world.parent / world.name
    cmds = [
        [kat, "world", "eval", "--world", str(world), "--k", str(eval_k), "--n", str(eval_n)],
        [kat, "record", *models, *rec, "--out", f"{out}-rec_ops5", "--overwrite"],
        [kat, "trap", f"{out}-rec_ops5"],
    ]
    if opd_steps:
        cmds += [
            [kat, "train", *models, "--data", str(world / "data" / "train.jsonl"), "--termination", "none",
             "--steps", str(opd_steps), "--batch-size", "8", "--micro-batch", "8", "--trace-every", "0",
             "--out", f"{out}-opd", "--overwrite"],
            [kat, "record", *models[:2], "--student", f"{out}-opd/final", *rec, "--out", f"{out}-rec_opd",
             "--overwrite"],
            [kat, "trap", f"{out}-rec_opd"],
        ]
    for cmd in cmds:
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if cmd[1] in ("train", "record") else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("variant", nargs="?", choices=sorted(VARIANTS), help="Variant to build and measure.")
    ap.add_argument("--out", type=Path, help="Directory to build the variant's world into.")
    ap.add_argument("--list", action="store_true", help="Print the variants' model recipes and exit.")
    ap.add_argument("--opd-steps", type=int, default=200,
                    help="Steps of plain OPD after which the trap is measured again (0: skip).")
    ap.add_argument("--eval-n", type=int, default=100,
                    help="Problems per split in `world eval` (docs/world.md's persistence table: 200).")
    ap.add_argument("--eval-k", type=int, default=4,
                    help="Samples per problem in `world eval` (docs/world.md's persistence table: 1).")
    args = ap.parse_args()
    if args.list or args.variant is None:
        for name, cfg in VARIANTS.items():
            t, s = cfg.teacher, cfg.student
            stage2 = f" + {t.loop_sft.steps} steps, loops {_kinds(t.loops)}" if t.loop_sft.steps else ""
            print(f"{name:10s} teacher {t.hidden}x{t.layers}, {t.sft.steps} steps, loops {_kinds(t.mix)}{stage2}; "
                  f"student {s.hidden}x{s.layers}, {s.sft.steps} steps, loops {_kinds(s.mix)}")
        return
    if args.out is None:
        ap.error("--out is required to build a variant")
    build_world(args.out, VARIANTS[args.variant])
    measure(args.out, args.opd_steps, args.eval_n, args.eval_k)


if __name__ == "__main__":
    main()
