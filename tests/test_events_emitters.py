"""Where the agent records its events (agent.events): the drain API for every trigger, env
sync's failures and refusals, the lifecycle hold's completion and expiry; a disabled section
or an unknown metric records nothing and raises nothing. The spool is read back from a
temporary state dir; the drain, the sync and Auto Scaling are stand-ins whose outcome the test
chooses."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest

from agent.config import config_from_dict
from agent.errors import AgentError, ConfigError, DeadlineError, RefusedError
from agent.events.publish import record
from agent.events.spool import Spool
from agent.jobs.drain import drainer
from agent.jobs.drain.shell import DrainResult
from agent.jobs.env_sync.sync import EnvSync
from agent.jobs.lifecycle.action import HookAction


@pytest.fixture
def cfg(tmp_path):
    return config_from_dict({"cluster": "c", "state_dir": str(tmp_path / "state")})


def spooled(cfg):
    return [(e.metric, e.value, e.role) for e in Spool(cfg.state_dir, 100).read()]


def drain_ending(monkeypatch, outcome):
    def fake(self, timeout=None, deadline=None):
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    monkeypatch.setattr(drainer.Drainer, "__init__", lambda self, cfg, **kw: None)
    monkeypatch.setattr(drainer.Drainer, "drain", fake)


def test_a_drain_records_itself_and_its_duration(cfg, monkeypatch):
    drain_ending(monkeypatch, DrainResult("drained", "n", "control", [], 100.0, 150.0, 160.5))
    drainer.drain(cfg)
    assert spooled(cfg) == [("Drains", 1.0, "worker"), ("DrainSeconds", 60.5, "worker")]


def test_a_drain_stopped_at_its_deadline_counts_as_past_it(cfg, monkeypatch):
    drain_ending(monkeypatch, DrainResult("stopped-at-deadline", "n", "c", [], 0.0, None, 9.0))
    drainer.drain(cfg)
    assert ("DrainsPastDeadline", 1.0, "worker") in spooled(cfg)


@pytest.mark.parametrize(
    "error, metric",
    [(DeadlineError("late"), "DrainsPastDeadline"), (AgentError("broker"), "DrainFailures")],
)
def test_a_failed_drain_records_why_and_still_raises(cfg, monkeypatch, error, metric):
    drain_ending(monkeypatch, error)
    with pytest.raises(type(error)):
        drainer.drain(cfg)
    assert spooled(cfg) == [(metric, 1.0, "worker")]


@pytest.mark.parametrize(
    "outcome",
    [ConfigError("bad --timeout"), DrainResult("already-stopped", "n", "c", [], 1.0)],
)
def test_nothing_drained_records_nothing(cfg, monkeypatch, outcome):
    drain_ending(monkeypatch, outcome)
    with contextlib.suppress(ConfigError):  # a bad --timeout still raises
        drainer.drain(cfg)
    assert spooled(cfg) == []


@pytest.mark.parametrize(
    "error, metric",
    [(RefusedError("suspicious"), "EnvSyncRefusals"), (AgentError("ssm"), "EnvSyncFailures")],
)
def test_env_sync_records_a_failed_or_refused_run(cfg, error, metric):
    EnvSync(cfg)._failed(error, record=True)
    assert [m for m, _v, _r in spooled(cfg)] == [metric]
    EnvSync(cfg)._failed(error, record=False)  # a dry run records nothing
    assert len(spooled(cfg)) == 1


class FakeAws:
    def complete(self, hook):
        pass


def test_a_completed_hold_records_the_hold_and_its_length(cfg):
    action = HookAction(cfg, FakeAws(), clock=lambda: 0.0, save=lambda: None)
    record = {
        "hook": "h",
        "complete_attempts": 0,
        "heartbeats_sent": 2,
        "plan": {"global_deadline": 10_000.0, "wait_started": 1000.0},
    }
    action._complete(record, 1300.0)
    assert spooled(cfg) == [
        ("LifecycleHolds", 1.0, "worker"),
        ("LifecycleHoldSeconds", 300.0, "worker"),
    ]


def test_an_expired_hold_records_its_expiry(cfg):
    action = HookAction(cfg, FakeAws(), clock=lambda: 0.0, save=lambda: None)
    action._complete({"plan": {"global_deadline": 10.0}}, 11.0)
    assert spooled(cfg) == [("LifecycleHoldsExpired", 1.0, "worker")]


def test_a_disabled_section_or_a_config_without_it_records_nothing(tmp_path):
    cfg = config_from_dict(
        {"state_dir": str(tmp_path / "s"), "metrics": {"events": {"enabled": False}}}
    )
    record(cfg, "Drains")
    record(SimpleNamespace(state_dir=cfg.state_dir), "Drains")  # a test's stand-in config
    assert not Spool(cfg.state_dir, 10).pending()


def test_an_unknown_metric_is_a_warning_not_an_error(cfg, caplog):
    record(cfg, "NoSuchEvent")
    assert "event NoSuchEvent not recorded" in caplog.text
    assert spooled(cfg) == []
