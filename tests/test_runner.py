"""The job runner (agent/runtime/runner.py): every way a job can end becomes the README's exit
code, and a failed run is recorded in the job's document (when, result, reason)."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import botocore.exceptions
import pytest

from agent.errors import AgentError, ConfigError, DeadlineError, RefusedError
from agent.jobs.env_sync.state import EnvDoc
from agent.jobs.variables.state import VariablesDoc, VariablesHashesDoc
from agent.runtime.runner import classify, record_failure, run_job
from agent.state import StateStore


def cfg_at(tmp_path):
    return SimpleNamespace(state_dir=str(tmp_path / "state"))


def raising(exc):
    def job(args, cfg):
        raise exc

    return job


@pytest.mark.parametrize(
    "exc, code, result, reason",
    [
        (AgentError("SSM down"), 1, "failed", "SSM down"),
        (RefusedError("empty secret"), 3, "refused", "empty secret"),
        (DeadlineError("too slow"), 4, "timeout", "too slow"),
        (ConfigError("bad key"), 2, "failed", "bad key"),
        (KeyboardInterrupt(), 130, "interrupted", "interrupted"),
        (ValueError("odd"), 1, "failed", "internal error: ValueError: odd"),
    ],
)
def test_an_error_becomes_an_exit_code_and_a_record(tmp_path, exc, code, result, reason):
    cfg = cfg_at(tmp_path)
    before = time.time()
    outcome = run_job("env", raising(exc), SimpleNamespace(), lambda: cfg, EnvDoc)
    assert (outcome.exit_code, outcome.result, outcome.reason) == (code, result, reason)
    doc = StateStore(cfg.state_dir).read(EnvDoc)
    if isinstance(exc, ConfigError):
        # a usage error: the job did not run, so nothing is recorded
        assert outcome.recorded is False and doc is None
        return
    assert outcome.recorded is True
    assert doc.last_sync_result == result and doc.last_failure_reason == reason
    assert before <= doc.last_failure <= time.time()


def test_an_aws_error_is_described_without_a_traceback(tmp_path, caplog):
    err = botocore.exceptions.ClientError(
        {"Error": {"Code": "AccessDenied", "Message": "no"}}, "GetParametersByPath"
    )
    code, result, reason = classify(err)
    assert (code, result) == (1, "failed") and "AccessDenied" in reason
    with caplog.at_level(logging.ERROR, logger="agent"):
        outcome = run_job("env", raising(err), None, lambda: cfg_at(tmp_path), EnvDoc)
    assert outcome.exit_code == 1 and "AccessDenied" in caplog.text
    assert "Traceback" not in caplog.text


def test_success_records_nothing_and_returns_the_jobs_code(tmp_path):
    cfg = cfg_at(tmp_path)
    assert run_job("x", lambda a, c: None, None, lambda: cfg, EnvDoc).exit_code == 0
    assert run_job("x", lambda a, c: 3, None, lambda: cfg, EnvDoc).exit_code == 3
    assert StateStore(cfg.state_dir).read(EnvDoc) is None


def test_a_config_that_does_not_load_is_exit_2_and_not_recorded(tmp_path):
    def load():
        raise ConfigError("agent.yaml: key 'x' unknown")

    outcome = run_job("env", lambda a, c: 0, None, load, EnvDoc)
    assert (outcome.exit_code, outcome.recorded) == (2, False)


def test_the_failure_document_can_depend_on_the_arguments(tmp_path):
    cfg = cfg_at(tmp_path)

    def doc_for(args):
        return None if args.dry_run else VariablesDoc

    run_job(
        "variables", raising(AgentError("x")), SimpleNamespace(dry_run=True), lambda: cfg, doc_for
    )
    assert StateStore(cfg.state_dir).read(VariablesDoc) is None
    run_job(
        "variables", raising(AgentError("y")), SimpleNamespace(dry_run=False), lambda: cfg, doc_for
    )
    doc = StateStore(cfg.state_dir).read(VariablesDoc)
    assert (doc.last_result, doc.last_error) == ("failed", "y")


def test_a_failure_keeps_the_rest_of_the_document(tmp_path):
    cfg = cfg_at(tmp_path)
    store = StateStore(cfg.state_dir)
    store.update_doc(VariablesDoc, version_id="v-3", synced_at=10.0, last_result="ok")
    assert record_failure(cfg.state_dir, VariablesDoc, "refused", "not an object", when=20.0)
    assert store.read(VariablesDoc) == VariablesDoc(
        version_id="v-3",
        synced_at=10.0,
        last_run_at=20.0,
        last_result="refused",
        last_error="not an object",
    )


def test_an_unwritable_state_dir_does_not_hide_the_error(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg = SimpleNamespace(state_dir=str(blocker / "state"))  # a path under a regular file
    with caplog.at_level(logging.WARNING):
        outcome = run_job("env", raising(AgentError("SSM down")), None, lambda: cfg, EnvDoc)
    assert (outcome.exit_code, outcome.recorded) == (1, False)
    assert "SSM down" in caplog.text and "cannot record the failure" in caplog.text


def test_a_document_without_failure_fields_is_refused_up_front(tmp_path):
    with pytest.raises(TypeError, match="does not record failures"):
        record_failure(str(tmp_path), VariablesHashesDoc, "failed", "x")


def test_every_command_goes_through_the_runner(monkeypatch, tmp_path):
    """cli.main hands each command to run_job (one place maps outcomes to exit codes)."""
    from agent import cli

    seen = []

    def fake_run_job(command, job, args, load_cfg, failure_document):
        seen.append((command, failure_document(args)))
        return SimpleNamespace(exit_code=7)

    monkeypatch.setattr(cli, "run_job", fake_run_job)
    assert cli.main(["env", "sync"]) == 7
    assert cli.main(["variables", "sync"]) == 7
    assert cli.main(["variables", "sync", "--dry-run"]) == 7
    assert cli.main(["status"]) == 7
    assert seen == [
        ("env", EnvDoc),
        ("variables", VariablesDoc),
        ("variables", None),
        ("status", None),
    ]
