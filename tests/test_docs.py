"""The pages a reader walks: every relative link lands (file and heading), the pages state the present, and each
model card's "Use" code runs as written."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import TINY, TINY_DIT, tiny_checkpoint
from pretrained import export

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
# words that narrate how the pages came to be instead of what is true: "today's preset", "a third session", "(was 32)"
NARRATION = re.compile(r"\btoday\b|\bsessions?\b|\(was\b", re.IGNORECASE)


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a Markdown page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves_to_a_file_and_heading(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", target):  # https:, mailto: - outside the repo
            continue
        path, _, anchor = target.partition("#")
        found = (page.parent / path).resolve() if path else page
        assert found.exists(), f"{page.name}: {target}"
        if anchor and found.suffix == ".md":
            assert anchor in anchors(found), f"{page.name}: {target} (no such heading)"


def test_headings_become_githubs_anchors(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Solver, steps and guidance\n\n```\n# not a heading\n```\n## U-Net or transformer\n")
    assert anchors(page) == {"solver-steps-and-guidance", "u-net-or-transformer"}


@pytest.mark.parametrize("page", [p for p in PAGES if p.name != "CHANGELOG.md"], ids=lambda p: p.name)
def test_the_readme_and_docs_state_the_present(page):
    found = [line for line in page.read_text().splitlines() if NARRATION.search(line)]
    assert not found, f"{page.name} narrates: {found[0]}"


def test_the_narration_check_catches_each_word():
    for line in ("today's preset", "a third session", "+ width 48 (was 32)", "Today the run"):
        assert NARRATION.search(line), line
    assert not NARRATION.search("the committed preset (preset: 32), a second set")


@pytest.mark.parametrize("model_cfg", [TINY, TINY_DIT], ids=["unet", "dit"])
def test_each_cards_use_code_runs_as_written(model_cfg, tmp_path):
    """Export a tiny model to the folder the card's code names, then run that code block unchanged."""
    tiny_checkpoint(tmp_path / "tiny.pth", model_cfg)
    folder = export(tmp_path / "tiny.pth", tmp_path / "path/to/this/folder")
    code = re.search(r"## Use\n\n```python\n(.*?)```", (folder / "README.md").read_text(), re.DOTALL).group(1)
    assert ("DiT.from_pretrained" if model_cfg.backbone == "dit" else "ConditionalUNet.from_pretrained") in code
    check = "\nassert images.shape[0] == 3 and type(model).__name__ == %r\n" % ("DiT" if model_cfg.backbone == "dit"
                                                                            else "ConditionalUNet")
    done = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r})\n{code}{check}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
