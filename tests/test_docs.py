"""The documents the project cites exist, and every cited section of the protocol resolves."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTOCOL = REPO / "docs" / "protocol.md"


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [REPO / n for n in names.split() if n.endswith((".py", ".md", ".smk", ".yaml", ".rst", ".toml"))]


def test_every_citation_of_the_protocol_names_a_section_it_has():
    sections = set(re.findall(r"^## (§\d+) ", PROTOCOL.read_text(), re.M))
    assert sections == {f"§{i}" for i in range(1, 11)}
    cited = {}
    for path in tracked_text_files():
        for match in re.finditer(
            r"docs/protocol\.md((?:[ :,]+(?:and )?§\d+(?: \([^)]*\))?)+)", path.read_text()
        ):
            for section in re.findall(r"§\d+", match[1]):
                cited.setdefault(section, set()).add(path.name)
    assert cited, "nothing cites the protocol"
    assert set(cited) <= sections, {s: files for s, files in cited.items() if s not in sections}


def test_nothing_cites_documents_outside_the_repository():
    for path in tracked_text_files():
        if path.name == "test_docs.py":
            continue
        text = path.read_text()
        assert "PROTOCOL.md" not in text and "../shared" not in text, path
