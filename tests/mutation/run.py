"""Mutation testing of the core modules with cosmic-ray, in a throwaway clone of HEAD.

    pip install cosmic-ray
    python tests/mutation/run.py                 # all of MODULES (one to two hours on 2 CPU cores)
    python tests/mutation/run.py adapters gpus   # some of them

Each module is mutated against the fast tests that guard it (MODULES); a mutant survives when
those tests still pass. cosmic-ray rewrites the source files in place, so the run happens in a
fresh clone (uncommitted changes are not mutated, and nothing in this tree is touched), then
prints each survivor's diff and writes the counts and survivors to results/mutation/<module>.json.
Survivors are killed with a test, or listed in docs/testing.md with why they are equivalent.

Operators are thinned where cosmic-ray multiplies them: a binary operator is replaced by its
counterpart only (+ by -, * by /, ...), a comparison by its boundary and its negation (< by <= and
>=, == by !=, is by is not, in by not in); every other operator runs in full.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODULES = {  # name: (module, the tests that guard it)
    "adapters": ("blocklora/adapters.py", "tests/test_adapters.py tests/test_inject.py"),
    "inject": ("blocklora/inject.py", "tests/test_inject.py tests/test_adapters.py tests/test_io.py"),
    "fewshot": ("blocklora/data/fewshot.py", "tests/data/test_fewshot.py tests/data/test_splits.py"),
    "fetch": ("blocklora/data/fetch.py", "tests/data/test_download.py tests/data/test_prepare.py"),
    "train": ("blocklora/train.py", "tests/test_train.py"),
    "gpus": ("blocklora/gpus.py", "tests/test_gpus.py"),
}
BINARY_KEPT = "Add_Sub|Sub_Add|Mul_Div|Div_Mul|FloorDiv_Div|Mod_FloorDiv|Pow_Mul|BitOr_BitAnd|BitAnd_BitOr|BitXor_BitOr|LShift_RShift|RShift_LShift"
COMPARISON_KEPT = "Eq_NotEq|NotEq_Eq|Lt_LtE|Lt_GtE|LtE_Lt|LtE_Gt|Gt_GtE|Gt_LtE|GtE_Gt|GtE_Lt|Is_IsNot|IsNot_Is|In_NotIn|NotIn_In"
EXCLUDED = [
    rf"core/ReplaceBinaryOperator_(?!({BINARY_KEPT})$)",
    rf"core/ReplaceComparisonOperator_(?!({COMPARISON_KEPT})$)",
]
CONFIG = """[cosmic-ray]
module-path = "{module}"
timeout = {timeout}
excluded-modules = []
test-command = "env OMP_NUM_THREADS=1 {python} -m pytest -x -q -p no:cacheprovider -m 'not slow' {tests}"

[cosmic-ray.distributor]
name = "local"

[cosmic-ray.filters.operators-filter]
exclude-operators = {excluded}
"""


def tool(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def survivors(session: Path) -> tuple[dict[str, int], list[dict]]:
    with sqlite3.connect(session) as db:
        rows = db.execute(
            "SELECT m.operator_name, m.start_pos_row, r.test_outcome, r.worker_outcome, r.diff "
            "FROM mutation_specs m JOIN work_results r ON m.job_id = r.job_id"
        ).fetchall()
    counts: dict[str, int] = {}
    alive = []
    for operator, line, test, worker, diff in rows:
        outcome = "skipped" if worker == "SKIPPED" else (test or worker).lower()
        counts[outcome] = counts.get(outcome, 0) + 1
        if outcome == "survived":
            alive.append({"line": line, "operator": operator, "diff": diff})
    return counts, sorted(alive, key=lambda s: s["line"])


def run(name: str, clone: Path, timeout: float, out: Path) -> int:
    module, tests = MODULES[name]
    config = clone / f"{name}.toml"
    config.write_text(CONFIG.format(module=module, timeout=timeout, python=sys.executable, tests=tests,
                                    excluded=json.dumps(EXCLUDED)))  # fmt: skip
    session = clone / f"{name}.sqlite"
    for command in (
        [tool("cosmic-ray"), "init", str(config), str(session)],
        [tool("cr-filter-operators"), str(session), str(config)],
        [tool("cosmic-ray"), "baseline", str(config)],
        [tool("cosmic-ray"), "exec", str(config), str(session)],
    ):
        subprocess.run(command, cwd=clone, check=True, stderr=subprocess.DEVNULL)
    counts, alive = survivors(session)
    print(f"\n## {module}: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    for s in alive:
        print(f"\n### line {s['line']}: {s['operator']}\n{s['diff']}")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(
        json.dumps({"module": module, "tests": tests, "counts": counts, "survivors": alive}, indent=1)
    )
    os.replace(tmp, path)
    return len(alive)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "modules", nargs="*", metavar="MODULE", help=f"some of: {', '.join(MODULES)} (default: all)"
    )
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before a mutant counts as killed")
    p.add_argument("--out", type=Path, default=REPO / "results" / "mutation", help="where the JSON goes")
    args = p.parse_args(argv)
    unknown = sorted(set(args.modules) - set(MODULES))
    if unknown:
        p.error(f"unknown module(s) {', '.join(unknown)}: choose from {', '.join(MODULES)}")
    args.modules = args.modules or list(MODULES)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="blocklora-mutation-") as tmp:
        clone = Path(tmp) / "clone"
        subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
        alive = sum(run(name, clone, args.timeout, args.out) for name in args.modules)
    print(f"\n{alive} survivor(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
