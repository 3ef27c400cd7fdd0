"""The `make mutate` gate (tests/mutation_report.py) on made-up mutmut results."""

from __future__ import annotations

from tests.mutation_report import listed_equivalents, verdict

M = "agent.jobs.x.plan.x_f__mutmut_"


def _results(killed, survived):
    codes = {f"{M}{i}": 1 for i in range(killed)}
    codes.update({f"{M}{killed + i}": 0 for i in range(survived)})
    return {"agent/jobs/x/plan.py": codes}


def test_listed_survivors_pass_and_unlisted_fail():
    results = _results(killed=95, survived=5)
    listed = {f"{M}{i}" for i in range(95, 100)}
    assert verdict(results, listed) == []
    problems = verdict(results, listed - {f"{M}99"})
    assert problems == [f"{M}99: survived, and docs/mutation.md does not list it"]


def test_the_floor_is_90_percent_even_when_every_survivor_is_listed():
    results = _results(killed=89, survived=11)
    problems = verdict(results, {f"{M}{i}" for i in range(89, 100)})
    assert problems == ["only 89.0% of mutants killed (the floor is 90%)"]


def test_the_list_must_stay_exact():
    results = _results(killed=100, survived=0)
    problems = verdict(results, {f"{M}3", f"{M}500"})
    assert problems == [
        f"{M}3 is listed as equivalent but was killed: unlist it",
        f"{M}500 is listed as equivalent but no such mutant exists: update it",
    ]


def test_untested_and_undecided_mutants_are_named():
    results = {"m.py": {f"{M}1": 33, f"{M}2": None, **{f"{M}{i}": 1 for i in range(3, 40)}}}
    assert verdict(results, set()) == [
        f"{M}1: no test reaches it, and docs/mutation.md does not list it",
        f"{M}2: not decided (exit code None), and docs/mutation.md does not list it",
    ]


def test_equivalents_are_read_from_their_section_only(tmp_path):
    doc = tmp_path / "mutation.md"
    doc.write_text(
        "# t\n`agent.a.x_f__mutmut_1` before\n## Equivalent mutants\n"
        "| `agent.a.x\u01c1C\u01c1m__mutmut_2` | why |\n## Later\n`agent.a.x_g__mutmut_3`\n",
        encoding="utf-8",
    )
    assert listed_equivalents(doc) == {"agent.a.x\u01c1C\u01c1m__mutmut_2"}
