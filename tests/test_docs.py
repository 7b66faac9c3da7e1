"""The docs are runnable documents: links resolve, every command and option they name exists, the
CLI reference is generated from the commands, and the README's quick start runs as pasted.

Commands are read from fenced code blocks of README.md and docs/*.md: `kat-diag ...` lines (and
`torchrun`/`accelerate launch ... -m cli.main ...`), `make TARGET`, `python FILE`. Placeholders in
upper case (RUN, ID, CKPT, TEACHER, ...) are defined in the prose of the page that uses them.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
REPO_PATH = re.compile(r"^(examples|benchmarks|data|figures|docs|tests|kat_diag|cli)/")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.M)}


def shell_lines(page: Path) -> list[str]:
    """Logical lines (continuations joined, comments dropped) of the page's shell code blocks."""
    out = []
    for m in FENCE.finditer(page.read_text()):
        if m.group(1).strip() not in ("", "bash", "sh", "console", "shell"):
            continue
        joined = m.group(2).replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip() if not line.strip().startswith("#") else ""
            if line:
                out.append(line)
    return out


def kat_diag_args(line: str) -> list[str] | None:
    """The arguments after `kat-diag` (or `-m cli.main`) in a command line, else None."""
    try:
        words = shlex.split(line)
    except ValueError:
        return None
    for i, w in enumerate(words):
        if w.endswith("kat-diag") and not w.startswith("kat-diag["):
            return words[i + 1:]
        if w == "-m" and i + 1 < len(words) and words[i + 1] == "cli.main":
            return words[i + 2:]
    return None


def test_docs_exist_and_readme_is_short():
    names = {p.name for p in PAGES}
    for page in ("world.md", "kat.md", "training.md", "study.md", "diagnostics.md", "traces.md", "cli.md",
                 "cli-reference.md", "security.md", "performance.md", "api.md"):
        assert page in names, f"docs/{page} is missing"
    n = len((REPO / "README.md").read_text().splitlines())
    assert n <= 250, f"README.md has {n} lines; topic material belongs in docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page: Path):
    bad = []
    for m in LINK.finditer(page.read_text()):
        target = m.group(1) or m.group(2)
        if re.match(r"^[a-z]+://|^mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not bad, f"{page.name}: " + "; ".join(bad)


def _commands():
    import typer

    from cli.main import app

    return typer.main.get_command(app)


def resolve(root, args: list[str]):
    """The click command an argument list names, and the remaining arguments."""
    from typer import _click as click

    cmd, rest = root, list(args)
    while hasattr(cmd, "list_commands") and rest and not rest[0].startswith("-"):
        sub = cmd.get_command(click.Context(cmd), rest[0])
        if sub is None:
            return None, rest
        cmd, rest = sub, rest[1:]
    return cmd, rest


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_and_option_named_exists(page: Path):
    root = _commands()
    makefile = (REPO / "Makefile").read_text()
    bad = []
    for line in shell_lines(page):
        args = kat_diag_args(line)
        if args is not None:
            cmd, rest = resolve(root, args)
            if cmd is None:
                bad.append(f"`{line}`: no command {rest[0]!r}")
                continue
            known = {o for p in cmd.params for o in (*getattr(p, "opts", ()), *getattr(p, "secondary_opts", ()))}
            known |= {"--help"}
            for w in rest:
                opt = w.split("=", 1)[0]
                if opt.startswith("--") and opt not in known:
                    bad.append(f"`{line}`: {' '.join(['kat-diag', *args[: len(args) - len(rest)]])} has no {opt}")
        words = line.split()
        if words[:1] == ["make"] and len(words) > 1 and "=" not in words[1]:
            if not re.search(rf"^{re.escape(words[1])}:", makefile, re.M):
                bad.append(f"`{line}`: no make target {words[1]!r}")
        for w in words:
            w = w.strip("'\"`,;()")
            if REPO_PATH.match(w) and not any(c in w for c in "*{}<>$") and "runs/" not in w:
                if not (REPO / w).exists():
                    bad.append(f"`{line}`: {w} is not in the repository")
    assert not bad, f"{page.name}:\n" + "\n".join(bad)


def test_cli_reference_is_generated_from_the_commands():
    from cli.reference import reference

    page = (REPO / "docs" / "cli-reference.md").read_text()
    assert page == reference(), "docs/cli-reference.md is stale: run python -m cli.reference > docs/cli-reference.md"


def quickstart_lines() -> list[str]:
    text = (REPO / "README.md").read_text()
    m = re.search(r"<!-- quickstart: run by tests/test_docs.py -->\s*```bash\n(.*?)```", text, re.S)
    assert m, "README.md has no quick-start block"
    return [ln.split(" #", 1)[0].strip() for ln in m.group(1).replace("\\\n", " ").splitlines() if ln.strip()]


def test_readme_quickstart_runs_as_pasted(tmp_path: Path):
    """The quick-start commands, run in a fresh directory with the CLI of this checkout."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for line in quickstart_lines():
        assert line.startswith("kat-diag "), line
        proc = subprocess.run(line, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"`{line}` failed:\n{proc.stderr[-2000:]}"
    assert (tmp_path / "runs" / "try" / "traces").is_dir()


def test_the_checks_can_fail(tmp_path: Path):
    root = _commands()
    cmd, rest = resolve(root, ["train", "--no-such-option"])
    assert cmd is not None and "--no-such-option" not in {o for p in cmd.params for o in getattr(p, "opts", ())}
    assert resolve(root, ["no-such-command"])[0] is None
    page = tmp_path / "p.md"
    page.write_text("[x](missing.md) and [y](#nowhere)\n\n# Here\n")
    with pytest.raises(AssertionError, match="no such file"):
        test_relative_links_resolve(page)
    assert slug("The agreement trap in this world, measured") == "the-agreement-trap-in-this-world-measured"


MACHINE_PATH = re.compile(r"(?<![\w.])/(?:work|home|Users|tmp|root|private)/[\w.-]")


def test_committed_results_and_docs_name_no_machine_paths():
    # Results and docs are read on other machines: they must name paths relative to the project.
    # A fresh copy (an sdist, a tarball) has no .git: then there is nothing tracked to check.
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    files = subprocess.run(["git", "ls-files", "README.md", "docs", "figures", "data/world", "examples/configs"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    texts = [f for f in files if f.endswith((".md", ".json", ".jsonl", ".csv", ".yaml", ".txt"))]
    assert len(texts) > 20
    bad = [f"{f}:{i}: {line.strip()[:100]}" for f in texts
           for i, line in enumerate((REPO / f).read_text(errors="replace").splitlines(), 1)
           if MACHINE_PATH.search(line)]
    assert not bad, "absolute machine paths in committed files:\n" + "\n".join(bad[:20])
