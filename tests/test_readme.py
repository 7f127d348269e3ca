"""The README's commands name scripts, sub-commands and flags that exist, and it stays the front door."""
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SUBCOMMANDS = {"reflow.py", "evaluate.py", "benchmark.py", "editing.py", "pretrained.py"}


def commands() -> list[list[str]]:
    """Each `python SCRIPT ...` / `torchrun ... SCRIPT ...` line of the README's bash blocks, from the script on."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.splitlines():
            words = shlex.split(line.split("  #")[0], comments=True)
            script = next((i for i, w in enumerate(words) if w.endswith(".py")), None)
            if words and words[0] in ("python", "torchrun") and script is not None:
                found.append(words[script:])
    return found


@cache
def help_text(script: str, sub: str | None) -> str:
    out = subprocess.run([sys.executable, script, *([sub] if sub else []), "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.parametrize("command", commands(), ids=" ".join)
def test_every_readme_command_uses_flags_its_script_has(command):
    script, *args = command
    assert (ROOT / script).is_file(), script
    sub = args[0] if script in SUBCOMMANDS else None
    text = help_text(script, sub)
    for flag in (a.split("=")[0] for a in args if a.startswith("--")):
        assert re.search(rf"{re.escape(flag)}\b", text), f"{script} {sub or ''}: no {flag} in --help"


def test_the_readme_is_short_and_names_no_sibling_folder():
    assert len(README.encode()) <= 12_288
    assert "../shared" not in README
    assert len(commands()) >= 15  # the parser found the command blocks


def test_every_docs_link_in_the_readme_resolves():
    for target in re.findall(r"\]\(((?:docs/|notebooks/|CHANGELOG)[^)#]*)", README):
        assert (ROOT / target).exists(), target


def test_every_link_between_docs_pages_resolves():
    for page in (ROOT / "docs").glob("*.md"):
        for target in re.findall(r"\]\(([^)#:]+)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name}: {target}"
