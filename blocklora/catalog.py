"""The registered methods as data, for what must not import torch: the workflow and the listings.

``blocklora/methods/catalog.json`` holds, for each method in ``blocklora/methods/``, its summary,
defaults, its rules for values that depend on the dataset or the shot count (``when``), declared
hyper-parameter types and flags (``class_agnostic``, ``needs_fewshot``). It is
generated from the registry by ``blocklora methods --write-catalog`` and a test fails while it is
stale. A method living outside the package (``module:`` in config.yaml) is not in it: the workflow
then checks its hyper-parameters when its first job starts.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

CATALOG_FILE = Path(__file__).with_name("methods") / "catalog.json"


@cache
def load_catalog() -> dict[str, dict[str, Any]]:
    """``{method: {summary, defaults, when, types, class_agnostic, needs_fewshot}}`` of the built-in methods."""
    return json.loads(CATALOG_FILE.read_text())


def build_catalog() -> dict[str, dict[str, Any]]:
    """The catalog from the live registry (imports every method, so torch)."""
    from blocklora.methods import get_method, method_names

    catalog = {}
    for name in method_names():
        method = get_method(name)
        catalog[name] = {
            "summary": method.summary,
            "defaults": method.all_defaults(),
            "when": method.when,
            "types": method.all_types(),
            "class_agnostic": method.class_agnostic,
            "needs_fewshot": method.needs_fewshot,
        }
    return json.loads(json.dumps(catalog))  # as it reads back: tuples become lists


def write_catalog(path: str | Path = CATALOG_FILE) -> Path:
    from blocklora.io import write_text

    return write_text(path, json.dumps(build_catalog(), indent=2, sort_keys=True) + "\n")
