"""The README and docs/ stay true: generated tables are current, links resolve, the README stays short."""

from __future__ import annotations

import re
import subprocess
import sys

from service.api.settings import Settings
from tests.conftest import ROOT

DOCS = ROOT / "docs"
# The README is the front door (what it is, quick start, endpoints, the map, links); the reference
# lives in docs/. Past this size it has started to become a manual again.
README_MAX_BYTES = 10 * 1024


def test_configuration_tables_are_current() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/settings_table.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_the_configuration_page_names_every_setting() -> None:
    page = (DOCS / "configuration.md").read_text(encoding="utf-8")
    for name in Settings.model_fields:
        assert f"`TAPESERVE_{name.upper()}`" in page


def test_the_readme_is_a_short_front_door() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode()) <= README_MAX_BYTES, len(readme.encode())
    assert "make run" in readme and "make test" in readme
    for heading in ("## Quick start", "### Install", "## Endpoints", "## The code", "## Documentation"):
        assert heading in readme


def _anchors(text: str) -> set[str]:
    found = set()
    for heading in re.findall(r"(?m)^#{1,6} (.+)$", text):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug)
    return found


def test_every_relative_link_in_the_readme_and_docs_resolves() -> None:
    pages = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
    broken = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # http(s): and friends
                continue
            path, _, anchor = target.partition("#")
            file = page if not path else (page.parent / path).resolve()
            if not file.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file.read_text(encoding="utf-8")):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
