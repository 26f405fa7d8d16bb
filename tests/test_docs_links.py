"""Every relative link and image in README.md and docs/*.md resolves in a clone: the
file exists (tracked by git, so a file .gitignore hides counts as missing) and an
#anchor names a heading of the target."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _tracked() -> set[str] | None:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None  # not a git checkout (an sdist): existence is the check
    return set(out.splitlines())


def _anchors(md: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    in_code = False
    for line in md.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m and not in_code:
            text = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower())
            out.add(text.replace(" ", "-"))
    return out


def _links(md: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)  # not inside code blocks
    text = re.sub(r"`[^`\n]*`", "", text)
    return LINK.findall(text)


@pytest.mark.parametrize("md", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_every_relative_link_resolves(md):
    tracked = _tracked()
    dead = []
    for target in _links(md):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        rel = dest.relative_to(ROOT).as_posix() if dest.is_relative_to(ROOT) else None
        if not dest.exists() or (tracked is not None and dest.is_file() and rel not in tracked):
            dead.append(f"{target} (no such file in the repository)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            dead.append(f"{target} (no heading #{anchor})")
    assert not dead, f"{md.relative_to(ROOT)}: dead links: {dead}"


def test_the_walker_sees_links_and_anchors(tmp_path):
    md = tmp_path / "a.md"
    md.write_text("# Top title\n\n[x](b.md#the-part) ![i](img.png) `[no](c.md)`\n"
                  "```\n[no](d.md)\n```\n## Other, part\n")
    assert _links(md) == ["b.md#the-part", "img.png"]
    assert _anchors(md) == {"top-title", "other-part"}


def test_ci_runs_the_readme_test_command_verbatim():
    """.ci/run calls the README's second command as written (CI checks what a newcomer
    runs), and then the sanitizer step the README's suite leaves to CI."""
    readme = (ROOT / "README.md").read_text()
    after = readme.split("Set up and pass the tests:", 1)[1]
    command = next(line.strip() for line in after.splitlines() if line.startswith("    "))
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in ci, command
    assert any("SPARSEFL_SANITIZERS=1" in line and "test_sanitizers.py" in line
               for line in ci[ci.index(command):])
