"""Unit tests of confapply's pure core: content hash, coalescing, restart decisions."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.jobs.confapply.plan import (
    ApplyOutcome,
    Coalescer,
    content_hash,
    is_relevant,
    needs_apply,
    should_reset_and_retry,
    units_to_restart,
    watched_files,
)


def test_hash_depends_on_content_not_on_anything_else():
    a = content_hash([("/e", b"A=1\n")])
    assert a == content_hash([("/e", b"A=1\n")])
    assert a != content_hash([("/e", b"A=2\n")])
    # a missing file differs from an empty one, so deleting the file is a change
    assert content_hash([("/e", None)]) != content_hash([("/e", b"")])


@settings(deadline=None)
@given(
    st.lists(st.tuples(st.text(min_size=1), st.one_of(st.none(), st.binary())), max_size=3),
    st.lists(st.tuples(st.text(min_size=1), st.one_of(st.none(), st.binary())), max_size=3),
)
def test_hash_is_injective_on_inputs(x, y):
    # length-prefixing means no two different inputs share a byte stream
    assert (content_hash(x) == content_hash(y)) == (x == y)


def test_watched_files_env_first_no_duplicates():
    assert watched_files("/e", ["/a", "/e", "/a", "/b"]) == ["/e", "/a", "/b"]


def test_relevance_of_events():
    watched = ["/etc/sysconfig/airflow.env"]
    # atomic replace: moved from the temp name to the file
    assert is_relevant(["/etc/sysconfig/.airflow.env.1.tmp", "/etc/sysconfig/airflow.env"], watched)
    assert is_relevant(["/etc/sysconfig/airflow.env", None], watched)
    assert not is_relevant(["/etc/sysconfig/other", None], watched)
    assert not is_relevant([None, None], watched)


def test_coalescer_debounces_a_burst_into_one_check():
    c = Coalescer(debounce=0.5, max_wait=3.0)
    assert not c.pending and c.due_at() is None
    for i in range(20):  # 20 writes within 1 s
        c.note(10.0 + i * 0.05)
    assert c.due_at() == 10.95 + 0.5
    assert not c.due(11.4)
    assert c.due(11.45)
    assert c.take() == 20
    assert not c.pending


def test_coalescer_max_wait_bounds_an_endless_stream():
    c = Coalescer(debounce=1.0, max_wait=3.0)
    t = 0.0
    while t < 10:
        c.note(t)
        if c.due(t):
            break
        t += 0.2
    assert 3.0 <= t <= 3.2


def test_changes_after_take_form_the_next_burst():
    c = Coalescer(debounce=0.5, max_wait=2.0)
    c.note(1.0)
    c.take()
    c.note(5.0)  # arrives while restarting
    assert c.pending and c.due_at() == 5.5


def test_needs_apply():
    assert needs_apply(None, "x")
    assert needs_apply("x", "y")
    assert not needs_apply("x", "x")
    # after a part-way failed apply, even the applied content must be applied again
    assert needs_apply("x", "x", dirty=True)


def test_units_to_restart_keeps_order_and_skips_stopped_units():
    units = ["a", "b", "c", "d"]
    states = {"a": "active", "b": "inactive", "c": "failed", "d": "activating"}
    assert units_to_restart(units, states) == (["a", "c", "d"], ["b"])


def test_start_limit_retry_only_once_and_only_for_start_limit():
    assert should_reset_and_retry("start-limit-hit", retried=False)
    assert not should_reset_and_retry("start-limit-hit", retried=True)
    assert not should_reset_and_retry("exit-code", retried=False)


def test_outcome_ok_only_without_failure_or_interruption():
    o = ApplyOutcome(hash="h", restarted=["a"])
    assert o.ok
    o.failed["b"] = "timeout"
    assert not o.ok and "failed b (timeout)" in o.summary()
    assert not ApplyOutcome(hash="h", interrupted=True).ok


# -- pinned details (each kills a mutant `make mutate` found surviving; see docs/mutation.md) --


def test_hash_value_is_pinned_because_it_is_persisted():
    # confapply.json keeps the applied hash across agent upgrades: if this function's output
    # changed, every unit would be restarted once after the upgrade for nothing
    files = [("/etc/sysconfig/airflow.env", b"A=1\n"), ("/etc/airflow/extra.cfg", None)]
    assert content_hash(files) == (
        "a6e42b5ad2d58917f30f78263362e40d8dc81b287d7343769298f8e773597999"
    )
    assert content_hash([]) == "87b76f6aca0a0d573f194692c46c4f3b8451ce63ee020f3a88facb70d07863a0"


def test_hash_accepts_paths_that_are_not_valid_utf8():
    # os.fsdecode gives undecodable path bytes as lone surrogates; they must hash, not raise
    a = content_hash([("/etc/\udcff.env", b"x")])
    assert a != content_hash([("/etc/\udcfe.env", b"x")])


def test_coalescer_counts_each_burst_from_zero():
    c = Coalescer(debounce=0.5, max_wait=2.0)
    c.note(1.0)
    c.note(1.1)
    assert c.take() == 2
    c.note(5.0)
    assert c.take() == 1
    assert c.take() == 0


def test_coalescer_with_only_one_time_set_is_not_due():
    assert Coalescer(1.0, 3.0, first=None, last=5.0).due_at() is None
    assert Coalescer(1.0, 3.0, first=5.0, last=None).due_at() is None
    assert not Coalescer(1.0, 3.0, first=None, last=5.0).due(100.0)


def test_outcome_summary_is_exact():
    assert ApplyOutcome(hash="h").summary() == "restarted none"
    full = ApplyOutcome(
        hash="h",
        restarted=["a", "b"],
        skipped=["c", "d"],
        failed={"e": "timeout", "f": "exit-code"},
        interrupted=True,
    )
    assert full.summary() == (
        "restarted a,b; skipped (not running) c,d; failed e (timeout), f (exit-code); "
        "interrupted by stop"
    )
    assert not full.ok
