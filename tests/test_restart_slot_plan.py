"""The restart slot's pure core on virtual time, its config section, and the ways a restart goes
uncoordinated at once (no database needed): disabled, no sql_alchemy_conn, not PostgreSQL, a
co-process that cannot hold a slot. The real PostgreSQL cases: tests/test_restart_slot_postgres.py.
"""

from __future__ import annotations

import json
import logging
import sys
import time

import pytest

from agent.airflow.restart_slot import restart_slot
from agent.airflow.restart_slot_plan import REPORT_GRACE, Acquisition, slot_key, slot_keys
from agent.config import config_from_dict
from agent.errors import ConfigError


def line(**kw) -> str:
    return json.dumps(kw)


def test_keys_are_stable_signed_bigints_distinct_per_cluster_role_and_slot():
    keys = {
        slot_key(c, r, i) for c in ("prod", "dev") for r in ("scheduler", "worker") for i in (0, 1)
    }
    assert len(keys) == 8
    assert all(-(2**63) <= k < 2**63 for k in keys)
    assert slot_key("prod", "worker", 1) == slot_keys("prod", "worker", 2)[1]


def test_acquisition_waits_then_holds_on_virtual_time():
    acq = Acquisition("webserver", 2, timeout=60.0, start=100.0)
    assert acq.report(line(state="waiting", why="all 2 slot(s) busy"), 101.0) is None
    assert acq.why == "all 2 slot(s) busy"
    slot = acq.report(line(state="held", slot=1), 112.5)
    assert (slot.index, slot.slots, slot.waited, slot.uncoordinated) == (1, 2, 12.5, False)
    assert slot.describe() == "restart slot webserver 1/2"


def test_acquisition_timeout_and_expiry_on_virtual_time():
    acq = Acquisition("worker", 1, timeout=30.0, start=0.0)
    slot = acq.report(line(state="timeout", why="database unreachable: OperationalError: x"), 30.2)
    assert slot.uncoordinated and "none free after 30 s: database unreachable" in slot.why
    assert slot.describe() == "restart slot worker uncoordinated"
    assert not acq.expired(30.0 + REPORT_GRACE - 0.1) and acq.expired(30.0 + REPORT_GRACE)
    gone = acq.gone(30.0 + REPORT_GRACE)
    assert gone.uncoordinated and gone.why.startswith("no answer within 45 s")
    assert acq.gone(1.0, "ModuleNotFoundError: x").why == (
        "the slot's co-process exited before holding a slot: ModuleNotFoundError: x"
    )


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        line(state="held", slot=2),
        line(state="held", slot=-1),
        line(state="held", slot=True),
        line(state="held"),
        line(state="mine"),
        json.dumps([1]),
    ],
)
def test_what_the_co_process_says_is_not_trusted(text):
    slot = Acquisition("scheduler", 2, timeout=10.0, start=0.0).report(text, 1.0)
    assert slot.uncoordinated and "unexpected" in slot.why


def test_config_section_defaults_and_checks():
    c = config_from_dict({}).coordination
    assert (c.enabled, c.slots, c.timeout, c.poll_interval, c.user) == (
        True,
        {},
        900.0,
        2.0,
        "airflow",
    )
    assert c.python == "/opt/airflow/venv/bin/python"
    assert c.slots_for("worker") == 1
    assert (
        config_from_dict({"coordination": {"slots": {"worker": 3}}}).coordination.slots_for(
            "worker"
        )
        == 3
    )
    bad = [
        ({"slots": {"workers": 1}}, "coordination.slots.workers"),
        ({"slots": {"worker": 0}}, "coordination.slots.worker"),
        ({"timeout": 0}, "coordination.timeout"),
        ({"poll_interval": -1}, "coordination.poll_interval"),
        ({"python": "python3"}, "coordination.python"),
        ({"user": "root"}, "coordination.user"),
    ]
    for section, key in bad:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            config_from_dict({"coordination": section})


def cfg_with(tmp_path, env: str, **coordination):
    env_file = tmp_path / "airflow.env"
    env_file.write_text(env)
    return config_from_dict(
        {"env": {"file": str(env_file)}, "coordination": {"user": None, **coordination}}
    )


@pytest.mark.parametrize(
    "env, coordination, why, level",
    [
        ("FOO=1\n", {"enabled": False}, "coordination.enabled is false", logging.INFO),
        ("FOO=1\n", {}, "gives no [database] sql_alchemy_conn", logging.WARNING),
        (
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=sqlite:////tmp/airflow.db\n",
            {},
            "sql_alchemy_conn is sqlite, not PostgreSQL",
            logging.WARNING,
        ),
        (
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=postgresql://u:pw0secret0here@127.0.0.1:9/db\n",
            {"python": "/nonexistent/bin/python"},
            "cannot run the slot's co-process",
            logging.WARNING,
        ),
    ],
)
def test_nothing_to_coordinate_through_is_uncoordinated_at_once(
    tmp_path, caplog, env, coordination, why, level
):
    caplog.set_level(logging.INFO)
    cfg = cfg_with(tmp_path, env, **coordination)
    start = time.monotonic()
    with restart_slot(cfg, "webserver", "host-a") as slot:
        assert slot.uncoordinated and why in slot.why
    assert time.monotonic() - start < 5
    records = [
        r for r in caplog.records if "restart slot webserver uncoordinated" in r.getMessage()
    ]
    assert records and records[0].levelno == level
    assert "pw0secret0here" not in caplog.text


def test_a_co_process_without_a_driver_is_uncoordinated_at_once_naming_why(tmp_path, caplog):
    # the agent's own venv has no SQLAlchemy: the co-process fails on its import
    cfg = cfg_with(
        tmp_path,
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=postgresql://u:pw0secret0here@127.0.0.1:9/db\n",
        python=sys.executable,
    )
    with restart_slot(cfg, "worker", "host-a") as slot:
        assert slot.uncoordinated
    assert "exited before holding a slot" in slot.why
    assert "ModuleNotFoundError" in slot.why or "sqlalchemy" in slot.why
    assert "restarting anyway" in caplog.text and "pw0secret0here" not in caplog.text
