"""The documents the project cites exist, and every cited section of the protocol resolves."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROTOCOL = REPO / "docs" / "protocol.md"
TEXT = (".py", ".md", ".smk", ".yaml", ".rst", ".toml")
# what a checkout holds beside the project's own files: version control, environments, caches, and
# (at the top) the workflow's outputs and build folders
ANYWHERE = {".git", ".venv", ".snakemake", ".pytest_cache", ".ruff_cache", "__pycache__"}
AT_THE_TOP = {"results", ".whl", "build", "dist"}


def project_text_files() -> list[Path]:
    """The project's text files, read from the tree itself (a git archive or a copy has no .git)."""
    found = []
    for folder, subfolders, files in os.walk(REPO):
        skip = ANYWHERE | (AT_THE_TOP if Path(folder) == REPO else set())
        subfolders[:] = sorted(d for d in subfolders if d not in skip and not d.endswith(".egg-info"))
        found += [Path(folder, name) for name in sorted(files) if name.endswith(TEXT)]
    return found


def test_the_file_list_is_gits_where_there_is_git():
    """Walking the tree finds what git holds (tracked files, and new ones it does not ignore)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout (a git archive or a copy): nothing to compare the walk with")
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split("\0")  # fmt: skip
    expected = {name for name in listed if name.endswith(TEXT) and (REPO / name).is_file()}
    assert {path.relative_to(REPO).as_posix() for path in project_text_files()} == expected


def test_every_citation_of_the_protocol_names_a_section_it_has():
    sections = set(re.findall(r"^## (§\d+) ", PROTOCOL.read_text(), re.M))
    assert sections == {f"§{i}" for i in range(1, 11)}
    cited = {}
    for path in project_text_files():
        for match in re.finditer(
            r"docs/protocol\.md((?:[ :,]+(?:and )?§\d+(?: \([^)]*\))?)+)", path.read_text()
        ):
            for section in re.findall(r"§\d+", match[1]):
                cited.setdefault(section, set()).add(path.name)
    assert cited, "nothing cites the protocol"
    assert set(cited) <= sections, {s: files for s, files in cited.items() if s not in sections}


def test_nothing_cites_documents_outside_the_repository():
    for path in project_text_files():
        if path.name == "test_docs.py":
            continue
        text = path.read_text()
        assert "PROTOCOL.md" not in text and "../shared" not in text, path


def test_the_lora_and_block_lora_defaults_are_the_protocols():
    """docs/protocol.md §2 states CLIP-LoRA's values; the methods' defaults must be those values."""
    from blocklora.catalog import load_catalog

    section = PROTOCOL.read_text().split("## §2")[1].split("## §3")[0]
    assert "r = 2, alpha = 1, s = alpha / √r" in section
    assert "AdamW, lr 2e-4, weight decay 1e-2, betas (0.9, 0.999)" in section
    assert "cosine from lr to 1e-6" in section and "500 × shots gradient steps" in section
    assert "batch 32" in section and "100 · norm(image features)" in section
    assert '"a photo of a {}."' in section and "scale 0.08–1" in section
    assert "Dropout (0.25)" in PROTOCOL.read_text().split("## §1")[1].split("## §2")[0]
    expected = {
        "rank": 2, "alpha": 1.0, "scaling": "sqrt", "lr": 2e-4, "weight_decay": 1e-2, "betas": [0.9, 0.999],
        "eta_min": 1e-6, "iterations_per_shot": 500, "iterations": None, "batch_size": 32, "logit_scale": 100.0,
        "template": "a photo of a {}.", "crop_scale": [0.08, 1.0], "dropout": 0.25, "optimizer": "adamw",
        "warmup_iterations": 0, "targets": ["q", "k", "v"], "encoders": ["vision", "text"], "layers": "all",
        "precision": "auto",
    }  # fmt: skip
    catalog = load_catalog()
    for method in ("lora", "blocklora"):
        defaults = catalog[method]["defaults"]
        assert {k: defaults[k] for k in expected} == expected, method
    assert catalog["blocklora"]["defaults"]["blocks"] == 8 and "(n = 8)" in PROTOCOL.read_text()
