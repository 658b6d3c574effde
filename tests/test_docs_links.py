"""Every relative link of the user docs (README.md, docs/, examples/benchmarks/) points to a file that exists, and
every `#anchor` to a heading of the file it names (GitHub's heading ids)."""

import re
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "examples" / "benchmarks").glob("*.md")])

FENCED_CODE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
# [text](target) and ![alt](target), with an optional "title".
LINK = re.compile(r"!?\[[^\]]*\]\(\s*([^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")


def links(page: Path) -> list[str]:
    text = INLINE_CODE.sub("", FENCED_CODE.sub("", page.read_text(encoding="utf-8")))
    return LINK.findall(text)


def heading_ids(page: Path) -> set[str]:
    """The ids GitHub gives the headings of a markdown page: lower case, punctuation dropped, spaces to hyphens, a
    repeated id suffixed with -1, -2, ..."""
    ids, seen = set(), {}
    text = FENCED_CODE.sub("", page.read_text(encoding="utf-8"))
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, re.M):
        heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("\\", "").replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        ids.add(slug if count == 0 else f"{slug}-{count}")
    return ids


def test_pages_are_found():
    names = {page.relative_to(ROOT).as_posix() for page in PAGES}
    assert {"README.md", "docs/quicktour.md", "docs/model_doc.md", "examples/benchmarks/RESULTS.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in heading_ids(linked):
            broken.append(f"{target} (no heading #{anchor} in {linked.relative_to(ROOT).as_posix()})")
    assert not broken, f"{page.relative_to(ROOT).as_posix()}: broken links: {broken}"
