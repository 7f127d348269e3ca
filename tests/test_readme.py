"""The README's commands name scripts, sub-commands and flags that exist, and it stays the front door."""
import json
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
    assert len(README.encode()) <= 10_240
    assert "../shared" not in README
    assert len(commands()) >= 15  # the parser found the command blocks


def test_every_docs_link_in_the_readme_resolves():
    for target in re.findall(r"\]\(((?:docs/|notebooks/|CHANGELOG)[^)#]*)", README):
        assert (ROOT / target).exists(), target


def test_every_link_between_docs_pages_resolves():
    for page in (ROOT / "docs").glob("*.md"):
        for target in re.findall(r"\]\(([^)#:]+)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name}: {target}"


def json_rows(path: str) -> list[dict]:
    return json.loads((ROOT / "docs" / path).read_text())["rows"]


def one(rows: list[dict], **match) -> dict:
    """The one row whose fields equal match."""
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    assert len(found) == 1, (match, len(found))
    return found[0]


def test_the_readme_quotes_figures_as_the_json_behind_them_has_them():
    rows = json_rows("one-step/xeon.json")
    flow = rows[0]["readings"][0]
    made = [r for r in rows if r["command"] == "make one-step"]
    assert len(made) == 1
    jump = made[0]["readings"][0]
    staged = one(rows, route="make one-step + a matching stage: weight 5, clip 10, AdamW beta1 0 (2 training seeds)")
    staged = staged["readings"][0]
    assert (f"one step from `make train`'s flow: `make one-step`, {made[0]['added_minutes']:.1f} min more | 1 NFE: "
            f"excess Fréchet {jump['cnn']:.1f}, {jump['bn']:.2f} by the BatchNorm CNN; {staged['cnn']:.1f}, "
            f"{staged['bn']:.2f} after 3.1 min of distribution matching; the flow at {flow['nfe']} NFE: "
            f"{flow['cnn']:.1f}, {flow['bn']:.2f} |") in README
    inversion = json_rows("inversion/inversion.json")
    euler8 = one(inversion, kind="2-rectified", solver="euler", steps=8)["psnr"]
    bpd = [one(inversion, kind=kind, solver="dopri5")["bpd"] for kind in ("2-rectified", "1-rectified")]
    assert f"({euler8:.1f} dB at 8); {bpd[0]:.2f} vs {bpd[1]:.2f} bits/dim" in README


def test_every_generated_docs_table_equals_its_json():
    sys.path.insert(0, str(ROOT / "docs"))
    import tables

    assert tables.main(["--check"]) == 0, "run `python docs/tables.py` to regenerate"


def test_the_readme_quotes_the_make_train_model_as_its_json_has_it():
    flow, second = (json.loads((ROOT / "docs" / "results-mnist" / name).read_text())
                    for name in ("zen4-make-train.json", "zen4-make-train-bn-cnn.json"))
    assert (f"| {flow['accuracy']:.1%} of digits as asked, N = {flow['n']:,}, excess Fréchet {flow['excess']:.1f} "
            f"(floor {flow['floor']:.1f}); {second['accuracy']:.1%} by a second, BatchNorm CNN |") in README


def test_the_readme_quotes_make_train_minutes_on_the_xeon_as_its_json_has_them():
    amx, capped = json_rows("results-mnist/xeon-make-train.json")[:2]
    quoted = f"{amx['total_minutes']:.1f} on an Intel Xeon (AMX), {capped['total_minutes']:.1f} on it capped to AVX2"
    assert quoted in README


def test_the_readme_and_docs_pages_hold_at_most_15000_words():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    words = sum(len(page.read_text().split()) for page in pages)
    assert 10_000 < words <= 15_000, f"{words} words in README.md and docs/*.md: the dated record goes to CHANGELOG.md"
