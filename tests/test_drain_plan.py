"""Pure tests of the drain state machine and the broker settings read from the env file."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.jobs.drain import plan
from agent.worker.celery_control import ControlError, QueueSpec, broker_settings, redact_url

Q = [
    {"name": "default", "exchange": "default", "exchange_type": "direct", "routing_key": "default"}
]


def _state(phase, **kw):
    base = dict(phase=phase, node="celery@a", started=100.0, deadline=400.0, queues=list(Q))
    base.update(kw)
    return plan.DrainState(**base)


def test_fresh_drain_gets_the_timeout_as_deadline():
    s = plan.begin(None, "celery@a", now=1000.0, timeout=60)
    assert (s.phase, s.started, s.deadline, s.resumed) == ("cancelling", 1000.0, 1060.0, 0)


def test_a_callers_earlier_deadline_wins():
    assert plan.begin(None, "celery@a", 1000.0, 600, deadline=1030.0).deadline == 1030.0
    assert plan.begin(None, "celery@a", 1000.0, 10, deadline=5000.0).deadline == 1010.0


@pytest.mark.parametrize("phase", plan.IN_PROGRESS)
def test_in_progress_drain_resumes_without_extending_its_deadline(phase):
    s = plan.begin(_state(phase), "celery@a", now=300.0, timeout=3000)
    assert (s.phase, s.started, s.deadline, s.resumed) == (phase, 100.0, 400.0, 1)
    assert s.queues == Q
    assert plan.begin(_state(phase), "celery@a", 300.0, 3000, deadline=350.0).deadline == 350.0


def test_drain_after_a_deadline_retries_with_a_new_deadline_keeping_queues():
    s = plan.begin(_state("deadline"), "celery@a", now=500.0, timeout=60)
    assert (s.phase, s.started, s.deadline, s.queues) == ("cancelling", 500.0, 560.0, Q)


def test_finished_or_other_node_state_starts_afresh():
    assert plan.begin(_state("stopped"), "celery@a", 500.0, 60).queues == []
    assert plan.begin(_state("waiting"), "celery@b", 500.0, 60).resumed == 0


def test_state_round_trips_and_rejects_garbage():
    s = _state("waiting", resumed=2, method="warm-stop", note="x")
    assert plan.DrainState.from_dict(s.to_dict()) == s
    assert plan.DrainState.from_dict({}) is None
    assert (
        plan.DrainState.from_dict({"phase": "bogus", "node": "n", "started": 1, "deadline": 2})
        is None
    )
    assert (
        plan.DrainState.from_dict({"phase": "waiting", "node": "n", "started": "x", "deadline": 2})
        is None
    )


@pytest.mark.parametrize(
    "active,reserved,now,on_deadline,want",
    [
        (0, 0, 999, "fail", plan.IDLE),  # idle wins even past the deadline
        (1, 0, 10, "fail", plan.WAIT),
        (0, 1, 10, "fail", plan.WAIT),  # a reserved task still runs locally
        (1, 0, 100, "fail", plan.DEADLINE_FAIL),
        (2, 0, 101, "stop", plan.DEADLINE_STOP),
    ],
)
def test_poll_decision(active, reserved, now, on_deadline, want):
    assert plan.poll_decision(active, reserved, now, 100, on_deadline) == want
    # no task process, or processes not countable: the same decision
    assert plan.poll_decision(active, reserved, now, 100, on_deadline, 0) == want
    assert plan.poll_decision(active, reserved, now, 100, on_deadline, None) == want


def test_remote_control_idle_is_not_idle_while_task_processes_run():
    assert plan.poll_decision(0, 0, 10, 100, "fail", tasks=1) == plan.WAIT
    assert plan.poll_decision(0, 0, 100, 100, "fail", tasks=1) == plan.DEADLINE_FAIL
    assert plan.poll_decision(0, 0, 100, 100, "stop", tasks=2) == plan.DEADLINE_STOP


# (busy, tasks, silent_for, now, on_deadline) -> decision; reply_timeout 30, deadline 100
WITNESS_CASES = [
    # remote control answers: both witnesses must say idle
    ((0, 0), 0, 0.0, 10, "fail", plan.IDLE),
    ((0, 0), None, 0.0, 10, "fail", plan.IDLE),  # processes not countable: control alone
    ((0, 0), 1, 0.0, 10, "fail", plan.WAIT),
    ((1, 0), 0, 0.0, 10, "fail", plan.WAIT),  # accepted, not forked yet
    ((0, 1), 0, 0.0, 10, "fail", plan.WAIT),
    ((1, 0), 1, 0.0, 100, "fail", plan.DEADLINE_FAIL),
    ((0, 0), 0, 0.0, 500, "fail", plan.IDLE),  # idle wins at the deadline
    # remote control silent (a broker restart): the processes decide, however long the silence
    (None, 2, 5.0, 10, "fail", plan.WAIT),
    (None, 2, 3000.0, 10, "fail", plan.WAIT),
    (None, 0, 5.0, 10, "fail", plan.IDLE),
    (None, 0, 3000.0, 500, "stop", plan.IDLE),
    (None, 1, 90.0, 100, "fail", plan.DEADLINE_FAIL),
    (None, 1, 90.0, 100, "stop", plan.DEADLINE_STOP),
    # neither witness: retry a while, then blind (the warm-stop fallback)
    (None, None, 0.0, 10, "fail", plan.RETRY),
    (None, None, 29.9, 10, "fail", plan.RETRY),
    (None, None, 30.0, 10, "fail", plan.BLIND),
    (None, None, 1.0, 100, "fail", plan.BLIND),  # at the deadline: no more retries
]


@pytest.mark.parametrize("busy,tasks,silent_for,now,on_deadline,want", WITNESS_CASES)
def test_witness_decision(busy, tasks, silent_for, now, on_deadline, want):
    assert plan.witness_decision(busy, tasks, silent_for, 30.0, now, 100, on_deadline) == want


@settings(max_examples=300, deadline=None)
@given(
    busy=st.one_of(st.none(), st.tuples(st.integers(0, 3), st.integers(0, 3))),
    tasks=st.one_of(st.none(), st.integers(0, 3)),
    silent_for=st.floats(0, 5000),
    now=st.floats(0, 200),
)
def test_idle_never_comes_from_a_silent_broker_alone(busy, tasks, silent_for, now):
    decision = plan.witness_decision(busy, tasks, silent_for, 30.0, now, 100, "fail")
    if decision == plan.IDLE:
        assert busy is not None or tasks == 0  # someone saw nothing running
        assert busy in (None, (0, 0)) and tasks in (None, 0)  # and nobody saw something
    if busy is None and tasks is None:
        assert decision in (plan.RETRY, plan.BLIND)


def test_sleep_never_passes_the_deadline():
    assert plan.next_sleep(1.0, now=10.0, deadline=100.0) == 1.0
    assert plan.next_sleep(1.0, now=99.7, deadline=100.0) == pytest.approx(0.3)
    assert plan.next_sleep(1.0, now=101.0, deadline=100.0) == 0.0


@pytest.mark.parametrize(
    "active_state,cond",
    [
        ("active", plan.UNIT_RUNNING),
        ("deactivating", plan.UNIT_STOPPING),
        ("activating", plan.UNIT_STARTING),
        ("inactive", plan.UNIT_STOPPED),
        ("failed", plan.UNIT_STOPPED),
        ("unknown", plan.UNIT_STOPPED),
    ],
)
def test_unit_condition(active_state, cond):
    assert plan.unit_condition(active_state) == cond


def test_undrain_actions():
    assert plan.undrain_action(None, plan.UNIT_STOPPED) == plan.START_UNIT
    assert (
        plan.undrain_action(_state("deadline"), plan.UNIT_STOPPING) == plan.WAIT_STOPPED_THEN_START
    )
    assert plan.undrain_action(_state("deadline"), plan.UNIT_RUNNING) == plan.ADD_CONSUMERS
    assert plan.undrain_action(None, plan.UNIT_RUNNING) == plan.NOTHING
    two = Q + [{"name": "q2"}]
    assert plan.missing_queues(two, ["default"]) == [{"name": "q2"}]
    assert plan.merge_queues(Q, [{"name": "default", "exchange": "other"}, {"name": "q2"}]) == two


def test_broker_settings_from_env_file_values():
    env = {
        "AIRFLOW__CELERY__BROKER_URL": "redis://:pw@redis.internal:6379/1",
        "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "21600",
        "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__SOCKET_TIMEOUT": "2.5",
        "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__GLOBAL_KEYPREFIX": "airflow",
        "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__IS_SECURE": "True",
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
    }
    s = broker_settings(env)
    assert s.transport_options == {
        "visibility_timeout": 21600,
        "socket_timeout": 2.5,
        "global_keyprefix": "airflow",
        "is_secure": True,
    }
    assert s.remote_control and s.redacted == "redis://redis.internal:6379/1"
    assert "pw" not in s.redacted
    assert not broker_settings({"AIRFLOW__CELERY__BROKER_URL": "sqs://"}).remote_control


def test_missing_or_indirect_broker_url_is_named():
    with pytest.raises(ControlError, match="has no AIRFLOW__CELERY__BROKER_URL"):
        broker_settings({})
    with pytest.raises(ControlError, match="sets AIRFLOW__CELERY__BROKER_URL_SECRET"):
        broker_settings({"AIRFLOW__CELERY__BROKER_URL_SECRET": "celery/broker"})


def test_queue_spec_from_active_queues_reply():
    item = {"name": "gpu", "exchange": {"name": "gpu", "type": "direct"}, "routing_key": "gpu"}
    spec = QueueSpec.from_active_queues(item)
    assert spec == QueueSpec("gpu", "gpu", "direct", "gpu")
    assert QueueSpec.from_dict(spec.to_dict()) == spec
    assert redact_url("rediss://u:p@h:1/0") == "rediss://h:1/0"


def test_paused_consumers_then_a_drain_gets_its_own_deadline():
    s = plan.begin(_state("paused", deadline=50.0), "celery@a", now=500.0, timeout=60)
    assert (s.phase, s.deadline, s.queues, s.resumed) == ("cancelling", 560.0, Q, 0)
    assert plan.undrain_action(_state("paused"), plan.UNIT_RUNNING) == plan.ADD_CONSUMERS


def test_import_error_output_parsing_ignores_log_lines_with_brackets():
    from agent.jobs.deploy.hook import _parse_import_errors

    out = (
        "2026 [warning] graphviz [py.warnings] x\n"
        '[{"filepath": "/airflow/dags/bad.py", "error": "Traceback\\nImportError: x"}]\n'
    )
    assert _parse_import_errors(out) == [
        {"filepath": "/airflow/dags/bad.py", "error": "Traceback\nImportError: x"}
    ]
    assert _parse_import_errors("noise [1\n[]\n") == []
    assert _parse_import_errors("only logs [here]\n") is None


def test_every_import_error_gets_its_own_line_with_the_errors_last_line():
    from agent.jobs.deploy.hook import import_error_lines

    errors = [
        {"filepath": "/airflow/dags/a.py", "error": "Traceback\nImportError: no module x"},
        {"fileloc": "/airflow/dags/b.py", "stacktrace": "SyntaxError: bad\n"},
        {"error": ""},
    ]
    assert import_error_lines(errors) == [
        "DAG import error 1/3: /airflow/dags/a.py: ImportError: no module x",
        "DAG import error 2/3: /airflow/dags/b.py: SyntaxError: bad",
        "DAG import error 3/3: ?: unknown error",
    ]
    assert import_error_lines([{"filepath": "c.py", "error": "E" * 500}])[0].endswith(
        ": " + "E" * 200
    )


# -- the persisted state, exactly (each kills a mutant `make mutate` found surviving) ---------

_FINITE = st.floats(allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=100, deadline=None)
@given(
    phase=st.sampled_from(plan.PHASES),
    node=st.text(max_size=20),
    started=_FINITE,
    deadline=_FINITE,
    method=st.sampled_from(["remote-control", "warm-stop"]),
    queues=st.lists(st.fixed_dictionaries({"name": st.text(min_size=1, max_size=8)}), max_size=3),
    resumed=st.integers(min_value=0, max_value=10**6),
    note=st.text(max_size=20),
    idle_at=st.none() | _FINITE,
    stopped_at=st.none() | _FINITE,
)
def test_every_state_survives_drain_json(**fields):
    s = plan.DrainState(**fields)
    assert plan.DrainState.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_state_document_names_every_field():
    s = _state("stopped", idle_at=150.0, stopped_at=160.0, note="n", resumed=1)
    assert s.to_dict() == {
        "phase": "stopped",
        "node": "celery@a",
        "started": 100.0,
        "deadline": 400.0,
        "method": "remote-control",
        "queues": Q,
        "resumed": 1,
        "note": "n",
        "idle_at": 150.0,
        "stopped_at": 160.0,
        "task_processes": None,
        "silent_since": None,
    }
    witnessed = _state("waiting", task_processes=3, silent_since=120.5)
    assert (witnessed.to_dict()["task_processes"], witnessed.to_dict()["silent_since"]) == (
        3,
        120.5,
    )
    assert plan.DrainState.from_dict(witnessed.to_dict()) == witnessed
    assert s.remaining(300.0) == 100.0
    assert s.remaining(450.0) == -50.0


def test_state_defaults_for_fields_an_older_agent_did_not_write():
    minimal = {"phase": "waiting", "node": "n", "started": 1, "deadline": "2"}
    s = plan.DrainState.from_dict(minimal)
    assert s == plan.DrainState(phase="waiting", node="n", started=1.0, deadline=2.0)
    assert (s.method, s.queues, s.resumed, s.note, s.idle_at, s.stopped_at) == (
        "remote-control",
        [],
        0,
        "",
        None,
        None,
    )
    assert (s.task_processes, s.silent_since) == (None, None)
    assert plan.DrainState.from_dict(dict(minimal, task_processes="2")).task_processes == 2
    assert plan.DrainState.from_dict(dict(minimal, task_processes="two")) is None
    nulls = dict(minimal, method=None, queues=None, resumed=None, note=None, idle_at=None)
    assert plan.DrainState.from_dict(nulls) == s
    assert plan.DrainState.from_dict(dict(minimal, idle_at="7", stopped_at=8)).idle_at == 7.0
    assert plan.DrainState.from_dict(dict(minimal, stopped_at="8.5")).stopped_at == 8.5
    # a value that is not a number makes the whole document unusable, not half-read
    assert plan.DrainState.from_dict(dict(minimal, idle_at="soon")) is None
    assert plan.DrainState.from_dict(dict(minimal, resumed="x")) is None


def test_only_named_queue_specs_are_kept():
    data = {
        "phase": "deadline",
        "node": "n",
        "started": 1,
        "deadline": 2,
        "queues": ["default", {"exchange": "x"}, {"name": ""}, {"name": "q", "exchange": "q"}],
    }
    assert plan.DrainState.from_dict(data).queues == [{"name": "q", "exchange": "q"}]


def test_begin_keeps_node_and_method_on_every_path():
    warm = _state("waiting", method="warm-stop")
    resumed = plan.begin(warm, "celery@a", 300.0, 60)
    assert (resumed.node, resumed.method) == ("celery@a", "warm-stop")
    retried = plan.begin(_state("deadline", method="warm-stop"), "celery@a", 500.0, 60)
    assert (retried.node, retried.method) == ("celery@a", "warm-stop")
    fresh = plan.begin(None, "celery@b", 500.0, 60)
    assert (fresh.node, fresh.method) == ("celery@b", "remote-control")


def test_status_lines_are_exact():
    assert plan.status_line("waiting", "celery@a", 2, 1, 59.9) == (
        "draining celery@a: 2 task(s) running, 1 reserved, 59s to deadline"
    )
    assert plan.status_line("waiting", "n") == (
        "draining n: 0 task(s) running, 0 reserved, 0s to deadline"
    )
    assert plan.status_line("waiting", "n", 1, 0, -30.0).endswith(", 0s to deadline")
    assert plan.status_line("stopping", "n", 3, 3, 10.0) == "draining n: stopping"
    assert plan.status_line("waiting", "n", 2, 0, 59.9, tasks=2) == (
        "draining n: 2 task(s) running, 0 reserved, 2 task process(es), 59s to deadline"
    )
    assert plan.status_line("waiting", "n", 2, 0, 59.9, tasks=2, silent_for=12.7) == (
        "draining n: remote control silent for 12s; 2 task process(es) running, 59s to deadline"
    )
    assert plan.status_line("waiting", "n", 0, 0, 5.0, silent_for=3.0) == (
        "draining n: remote control silent for 3s; uncounted task process(es) running, "
        "5s to deadline"
    )


def test_a_reloading_worker_is_running():
    assert plan.unit_condition("reloading") == plan.UNIT_RUNNING
