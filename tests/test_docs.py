"""Every relative link in README.md and docs/*.md names a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(doc: Path) -> None:
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if "://" in target or target.startswith(("#", "mailto:")):
            continue
        path = (doc.parent / target.split("#", 1)[0]).resolve()
        assert path.exists(), f"{doc.name}: broken link {target}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_no_references_to_missing_docs(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    for name in re.findall(r"docs/([A-Z]+\.md)", text):
        assert (ROOT / "docs" / name).exists(), f"{doc.name}: mentions docs/{name}"
