"""`lifecycle watch` when IMDS or the loop misbehaves: the pure parts, fast.

facts.py reads each IMDS fact on its own and decides which failures to log; Watcher.step keeps
a failed pass from ending the daemon. The real IMDS server serving malformed answers to the
real Watcher (virtual clock) and to the daemon: tests/test_lifecycle_watcher.py and
tests/test_lifecycle.py.
"""

from __future__ import annotations

import logging

from agent.config import config_from_dict
from agent.jobs.lifecycle import facts
from agent.jobs.lifecycle.watch import Watcher
from agent.platform.imds import ImdsClient, ImdsMalformed, ImdsNoToken, ImdsUnavailable
from agent.state import StateStore


def test_each_fact_is_read_on_its_own():
    def broken_json():
        raise ImdsMalformed("IMDS meta-data/spot/instance-action is not JSON: '{'")

    def bug():
        raise KeyError("action")

    values, errors = facts.read_facts(
        {facts.TARGET: lambda: "Terminated", facts.SPOT: broken_json, facts.REBALANCE: bug}
    )
    assert values == {facts.TARGET: "Terminated"}
    assert errors == {
        facts.SPOT: "IMDS meta-data/spot/instance-action is not JSON: '{'",
        facts.REBALANCE: "KeyError: 'action'",  # not an IMDS error: named by its type
    }


def test_without_a_session_token_the_other_facts_are_not_tried():
    calls = []

    def no_token():
        calls.append("target")
        raise ImdsNoToken("IMDS at http://x/ unreachable for a session token after 3 attempts")

    def spot():
        calls.append("spot")
        return None

    values, errors = facts.read_facts({facts.TARGET: no_token, facts.SPOT: spot})
    assert calls == ["target"] and values == {}
    assert errors[facts.SPOT] == errors[facts.TARGET]


def test_each_distinct_failure_is_logged_once_and_recovery_once():
    seen = {}
    log_now, seen, recovered = facts.report(seen, {facts.SPOT: "A"})
    assert log_now == {facts.SPOT: "A"} and recovered == []
    for _ in range(3):  # the same answer again: nothing new to say
        log_now, seen, recovered = facts.report(seen, {facts.SPOT: "A"})
        assert log_now == {} and recovered == []
    log_now, seen, _ = facts.report(seen, {facts.SPOT: "B", facts.TARGET: "A"})
    assert log_now == {facts.SPOT: "B", facts.TARGET: "A"}  # per path, per answer
    log_now, seen, _ = facts.report(seen, {facts.SPOT: "A", facts.TARGET: "A"})
    assert log_now == {}  # A was already said for the Spot path while it kept failing
    log_now, seen, recovered = facts.report(seen, {facts.TARGET: "A"})
    assert recovered == [facts.SPOT] and log_now == {} and facts.SPOT not in seen
    log_now, seen, _ = facts.report(seen, {facts.SPOT: "A", facts.TARGET: "A"})
    assert log_now == {facts.SPOT: "A"}  # failing again after recovering: said again


def test_ever_changing_garbage_is_logged_a_bounded_number_of_times():
    seen = {}
    logged = 0
    for i in range(100):
        log_now, seen, _ = facts.report(seen, {facts.SPOT: f"garbage {i}"})
        logged += len(log_now)
    assert logged == facts.SEEN_KEEP and len(seen[facts.SPOT]) == facts.SEEN_KEEP


class _Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


def test_a_failing_pass_is_named_once_and_the_loop_carries_on(tmp_path, caplog):
    """The state dir turns into a file: every save fails. step() must not raise."""
    state = tmp_path / "state"
    cfg = config_from_dict({"state_dir": str(state), "lifecycle": {"poll_interval": 7.0}})
    # IMDS on a closed port: each fact fails fast (a named error, not a pass failure)
    imds = ImdsClient(endpoint="http://127.0.0.1:9/", timeout=0.2, attempts=1)
    clock = _Clock()
    watcher = Watcher(cfg, imds, None, StateStore(str(state)), clock=clock)
    caplog.set_level(logging.INFO, logger="agent")
    watcher.step()
    assert sorted(watcher.state["poll_errors"]) == sorted(facts.PATHS)
    assert all("unreachable" in e for e in watcher.state["poll_errors"].values())
    blocker = tmp_path / "state-as-a-file"
    blocker.write_text("x")
    watcher.store = StateStore(str(blocker / "sub"))
    for _ in range(4):
        clock.t += 7.0
        assert watcher.step() == 7.0  # retried a poll interval later
    failed = [r for r in caplog.records if "pass failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].levelno == logging.ERROR
    assert watcher.state["last_pass_error"].startswith(("NotADirectoryError", "FileExistsError"))
    watcher.store = StateStore(str(state))
    clock.t += 7.0
    watcher.step()
    assert watcher.state["last_pass_error"] is None
    assert any("pass succeeded again" in r.getMessage() for r in caplog.records)
    assert watcher.store.load_raw("lifecycle")["last_pass_error"] is None


def test_imds_errors_are_one_family():
    assert issubclass(ImdsMalformed, facts.ImdsError)
    assert issubclass(ImdsUnavailable, facts.ImdsError)
