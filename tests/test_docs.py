"""The README and docs/: every relative link points at a file that exists (and at a heading that
exists, for `#anchor` links), the README stays a front page, and the commands it shows parse."""

import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in path.read_text().splitlines() if line.startswith("#")}


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_every_relative_link_resolves(document):
    for target in LINK.findall(document.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file, _, anchor = target.partition("#")
        path = (document.parent / file).resolve() if file else document
        assert path.exists(), f"{document.name}: {target} does not exist"
        if anchor and path.suffix == ".md":
            assert anchor in anchors(path), f"{document.name}: no heading #{anchor} in {path.name}"


def test_the_readme_is_a_front_page():
    assert len((REPO / "README.md").read_text().splitlines()) <= 250


def test_the_fedtune_commands_in_the_readme_parse():
    from fedtune.cli import build_parser

    text = (REPO / "README.md").read_text()
    commands = [line.split("#")[0].strip().rstrip("\\").strip() for line in text.splitlines()
                if line.startswith("fedtune ")]
    assert commands, "the README shows no fedtune command"
    for command in commands:
        build_parser().parse_args(shlex.split(command)[1:])
