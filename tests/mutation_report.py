"""The verdict of `make mutate`: per-module counts from mutmut's results, and the gate.

mutmut 3 leaves one `mutants/<module>.py.meta` (JSON) per mutated module, mapping each mutant
to the exit code of the tests that ran against it. This prints killed/survived/total per
module and fails (exit 1) when fewer than 90% of all mutants are killed, when a mutant
survives that docs/mutation.md does not list as equivalent, or when a listed one is killed
(the list must stay exact, so it is re-read whenever a plan module changes).

Run from the repository root after `mutmut run`: `python tests/mutation_report.py`.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parents[1]
THRESHOLD = 0.90
# mutmut's exit codes (mutmut/stats.py): 1 and 3 fail the tests, the timeouts never finish
KILLED = {1, 3, 24, -24, 36, 152, 255}
SURVIVED = {0}
NO_TESTS = {5, 33}
MUTANT_RE = re.compile(r"`(agent\.[\w.\u01c1]+__mutmut_\d+)`")


def load_results(mutants: Path) -> Dict[str, Dict[str, object]]:
    """module path -> {mutant name: exit code or None (not run)}."""
    out: Dict[str, Dict[str, object]] = {}
    for meta in sorted(mutants.glob("**/*.py.meta")):
        module = str(meta.relative_to(mutants))[: -len(".meta")]
        out[module] = json.loads(meta.read_text())["exit_code_by_key"]
    return out


def listed_equivalents(doc: Path) -> Set[str]:
    """Mutant names in backticks in docs/mutation.md's equivalents section."""
    text = doc.read_text(encoding="utf-8")
    section = text.split("## Equivalent mutants", 1)[-1].split("\n## ", 1)[0]
    return set(MUTANT_RE.findall(section))


def verdict(results: Dict[str, Dict[str, object]], equivalent: Set[str]) -> List[str]:
    """Print the table; return the problems (empty when the gate passes)."""
    problems: List[str] = []
    total_all = killed_all = 0
    print(f"{'module':36} {'killed':>7} {'survived':>9} {'equiv.':>7} {'total':>6} {'killed%':>8}")
    for module, codes in results.items():
        killed = sum(1 for c in codes.values() if c in KILLED)
        survivors = sorted(name for name, c in codes.items() if c not in KILLED)
        equiv = [name for name in survivors if name in equivalent]
        total_all += len(codes)
        killed_all += killed
        pct = 100.0 * killed / len(codes) if codes else 100.0
        print(
            f"{module:36} {killed:7} {len(survivors):9} {len(equiv):7} {len(codes):6} {pct:7.1f}%"
        )
        for name in survivors:
            if name not in equivalent:
                why = "no test reaches it" if codes[name] in NO_TESTS else "survived"
                if codes[name] not in SURVIVED | NO_TESTS:
                    why = f"not decided (exit code {codes[name]})"
                problems.append(f"{name}: {why}, and docs/mutation.md does not list it")
        for name in sorted(equivalent):
            if name in codes and codes[name] in KILLED:
                problems.append(f"{name} is listed as equivalent but was killed: unlist it")
    known = {name for codes in results.values() for name in codes}
    for name in sorted(equivalent - known):
        problems.append(f"{name} is listed as equivalent but no such mutant exists: update it")
    pct_all = 100.0 * killed_all / total_all if total_all else 0.0
    print(
        f"{'all':36} {killed_all:7} {total_all - killed_all:9} {'':7} {total_all:6} {pct_all:7.1f}%"
    )
    if killed_all < THRESHOLD * total_all:
        problems.append(f"only {pct_all:.1f}% of mutants killed (the floor is 90%)")
    return problems


def main() -> int:
    results = load_results(ROOT / "mutants")
    if not results:
        print("no mutmut results under mutants/: run `make mutate`", file=sys.stderr)
        return 1
    problems = verdict(results, listed_equivalents(ROOT / "docs" / "mutation.md"))
    for problem in problems:
        print("FAIL", problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
