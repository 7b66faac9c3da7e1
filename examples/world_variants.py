"""The world variants of README "How the world was found", as configs that rebuild and re-measure them.

Each variant is a `WorldConfig` (the committed one is `WorldConfig()` itself); building one and
scoring it is the same as for the committed world:

    .venv/bin/python examples/world_variants.py --list
    .venv/bin/python examples/world_variants.py w4 --out /tmp/w4     # build (~10-13 min) + measure

The measurement is the README's: `kat-diag world eval --k 4 --n 100` (the exploratory builds; the
committed world's table uses k = 8 on all 200 problems), then 400 ops5 rollouts with `kat-diag
record` and `kat-diag trap` at the world preset. SFT is deterministic in the seed (the committed
world's SFT losses equal those of its exploratory runs bit for bit), so a variant's teacher or
student is the same model wherever its recipe is the same. The stage-2 variants A-E2 (fine-tunes of
the previous world's models with error-tied loops) are not here: that world is gone.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from kat_diag.sft import SFTConfig
from kat_diag.tasks import LoopDocs
from kat_diag.world import ModelSpec, WorldConfig, build_world


def _loops(*kinds: tuple[float, int]) -> tuple[LoopDocs, ...]:
    return tuple(LoopDocs(share, length, spontaneous=True) for share, length in kinds)


def _teacher(steps: int, *kinds: tuple[float, int]) -> ModelSpec:
    return ModelSpec(128, 4, 4, 384, SFTConfig(steps=steps, batch_size=64, lr=3e-3, seed=1), mix=_loops(*kinds))


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
    "committed": replace(BASE, teacher=_teacher(900, (0.12, 192)),
                         student=_student(128, 4, 1000, (0.4, 48), (0.15, 192))),
}
assert VARIANTS["committed"] == WorldConfig()  # the table's last row is the default build


def measure(world: Path) -> None:
    """The README's measurement of a world, printed as the commands print it."""
    kat = [str(Path(sys.executable).with_name("kat-diag"))]
    rec = world.parent / (world.name + "-rec_ops5")
    for cmd in (
        [*kat, "world", "eval", "--world", str(world), "--k", "4", "--n", "100"],
        [*kat, "record", "--teacher", str(world / "teacher"), "--student", str(world / "student"),
         "--data", str(world / "data" / "ops5.jsonl"), "--n-prompts", "200", "--samples", "2",
         "--batch-size", "64", "--out", str(rec), "--overwrite"],
        [*kat, "trap", str(rec)],
    ):
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("variant", nargs="?", choices=sorted(VARIANTS), help="Variant to build and measure.")
    ap.add_argument("--out", type=Path, help="Directory to build the variant's world into.")
    ap.add_argument("--list", action="store_true", help="Print the variants' model recipes and exit.")
    args = ap.parse_args()
    if args.list or args.variant is None:
        for name, cfg in VARIANTS.items():
            t, s = cfg.teacher, cfg.student
            print(f"{name:10s} teacher {t.sft.steps} steps, loops {[(k.share, k.length) for k in t.mix]}; "
                  f"student hidden {s.hidden}, {s.sft.steps} steps, loops {[(k.share, k.length) for k in s.mix]}")
        return
    if args.out is None:
        ap.error("--out is required to build a variant")
    build_world(args.out, VARIANTS[args.variant])
    measure(args.out)


if __name__ == "__main__":
    main()
