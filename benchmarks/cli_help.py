"""How fast the CLI answers: wall time of `kat-diag --help`, `--version` and `train --help`.

Commands import torch, transformers and pyarrow inside their bodies, so help and version cost
only Python start-up, typer and the command modules. Each command runs REPEATS times as a fresh
process (what a user waits for); best and median wall seconds are printed as one JSON object, next
to `python -c pass` (the interpreter's own start-up on this machine) and the import time of
`cli.main` alone. Target (issue 12): --help under 0.5 s.

Run: .venv/bin/python benchmarks/cli_help.py [--repeats N]
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPEATS = 7


def wall(cmd: list[str], repeats: int) -> dict[str, float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return {"best_s": round(min(times), 3), "median_s": round(statistics.median(times), 3)}


def main() -> None:
    repeats = int(sys.argv[sys.argv.index("--repeats") + 1]) if "--repeats" in sys.argv else REPEATS
    exe = shutil.which("kat-diag", path=str(Path(sys.executable).parent)) or "kat-diag"
    out = {
        "python_startup": wall([sys.executable, "-c", "pass"], repeats),
        "import_cli_main": wall([sys.executable, "-c", "import cli.main"], repeats),
        "help": wall([exe, "--help"], repeats),
        "version": wall([exe, "--version"], repeats),
        "train_help": wall([exe, "train", "--help"], repeats),
        "repeats": repeats,
    }
    out["help_under_0_5_s"] = out["help"]["median_s"] < 0.5
    print(json.dumps(out))


if __name__ == "__main__":
    main()
