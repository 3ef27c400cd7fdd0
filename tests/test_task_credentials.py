"""`airflow-agent task-credentials` (issue 12 item 5): Airflow's processes get the task role.

Fast: the pure core (when to assume the role again, the documents written, the section's
checks). aws tier, against moto over real HTTP: the job assumes the role with the instance
credentials, writes credentials.json root:<group> 0640 and the AWS config file, keeps fresh
credentials, replaces expiring ones, refuses a directory others could write; and a separate
Python process configured only by AWS_CONFIG_FILE (as Airflow's units are) gets the task role
as its STS caller identity. Nothing secret reaches the log or the state document.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import botocore.exceptions
import pytest

from agent.config import config_from_dict
from agent.errors import AgentError
from agent.jobs.task_credentials import plan
from agent.jobs.task_credentials.config import TaskCredentialsConfig, check_task_credentials
from agent.jobs.task_credentials.job import TaskCredentials, check_directory
from agent.jobs.task_credentials.state import TaskCredentialsDoc
from agent.state import StateStore

ROLE = "arn:aws:iam::123456789012:role/airflow-test-task"
NOW = 1_800_000_000.0


# -- pure core --------------------------------------------------------------------------------


def test_iso8601_round_trips_and_refuses_other_forms():
    assert plan.iso8601(NOW) == "2027-01-15T08:00:00Z"
    assert plan.parse_iso8601("2027-01-15T08:00:00Z") == NOW
    assert plan.parse_iso8601("2027-01-15T08:00:00.123+00:00") == NOW
    for bad in ("2027-01-15 08:00:00", "2027-01-15T08:00:00+02:00", "soon", "2027-13-45T99:00:00Z"):
        assert plan.parse_iso8601(bad) is None, bad


def test_credentials_document_is_credential_process_output():
    creds = {
        "AccessKeyId": "ASIAX",
        "SecretAccessKey": "s3cr3t",
        "SessionToken": "tok",
        "Expiration": NOW + 3600,
    }
    doc = json.loads(plan.credentials_document(creds, ROLE))
    assert doc == {
        "Version": 1,
        "AccessKeyId": "ASIAX",
        "SecretAccessKey": "s3cr3t",
        "SessionToken": "tok",
        "Expiration": "2027-01-15T09:00:00Z",
        "RoleArn": ROLE,
    }
    current = plan.read_current(plan.credentials_document(creds, ROLE))
    assert current == plan.Current(ROLE, NOW + 3600)


@pytest.mark.parametrize("data", [None, b"", b"{", b"[]", b'{"Expiration": 5}', b'{"RoleArn": 1}'])
def test_read_current_of_a_missing_or_broken_file_is_empty(data):
    assert plan.read_current(data).expiration is None


def test_config_document():
    text = plan.config_document("eu-west-1", "/run/airflow-aws/credentials.json").decode()
    assert "[default]\nregion = eu-west-1\n" in text
    assert text.endswith("credential_process = /usr/bin/cat /run/airflow-aws/credentials.json\n")
    assert "credential_process" not in plan.config_document("us-east-1", None).decode()
    with pytest.raises(ValueError):
        plan.config_document("us-east-1\ncredential_process = /bin/sh", None)
    with pytest.raises(ValueError):
        plan.config_document("us-east-1", "/run/x y; rm")


def test_decide():
    fresh = plan.Current(ROLE, NOW + 3000)
    assert plan.decide(fresh, ROLE, NOW, 1800) == plan.Decision(
        False, "valid until 2027-01-15T08:50:00Z (3000 s left)"
    )
    assert plan.decide(fresh, ROLE, NOW, 1800, force=True).refresh
    assert plan.decide(plan.Current(ROLE, NOW + 1800), ROLE, NOW, 1800) == plan.Decision(
        True, "expiring in 1800 s"
    )
    assert plan.decide(plan.Current(ROLE, NOW - 5), ROLE, NOW, 1800).reason == "expiring in 0 s"
    other = plan.Current(ROLE + "-other", NOW + 3000)
    assert plan.decide(other, ROLE, NOW, 1800).reason == "the file is for another role"
    assert plan.decide(plan.Current(None, None), ROLE, NOW, 1800).refresh


def test_session_name():
    assert plan.session_name(None, "prod", "i-0abc") == "airflow-prod-i-0abc"
    assert plan.session_name("mine", "prod", "i-0abc") == "mine"
    assert plan.session_name(None, "a b/c", None) == "airflow-a-b-c-unknown"
    assert len(plan.session_name(None, "x" * 100, "i-1")) == 64


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({}, None),
        ({"role_arn": ROLE}, None),
        ({"role_arn": "airflow-test-task"}, "task_credentials.role_arn"),
        ({"role_arn": "arn:aws:iam::123:role/x"}, "task_credentials.role_arn"),
        ({"session_name": "a"}, "task_credentials.session_name"),
        ({"session_name": "has space"}, "task_credentials.session_name"),
        ({"directory": "/run"}, "task_credentials.directory"),
        ({"directory": "relative"}, "task_credentials.directory"),
        ({"duration": 7200}, "task_credentials.duration"),
        ({"duration": 600}, "task_credentials.duration"),
        ({"refresh_before": 600}, "task_credentials.refresh_before"),
        ({"refresh_before": 3500}, "task_credentials.refresh_before"),
        ({"duration": 1500, "refresh_before": 1200}, None),
    ],
)
def test_section_checks(kwargs, key):
    bad = check_task_credentials(TaskCredentialsConfig(**kwargs))
    assert (bad[0] if bad else None) == key


def test_status_line_shows_role_and_expiry_only():
    line = plan.summary({"role_arn": ROLE, "expiration": NOW})
    assert line == f"role {ROLE}, expires 2027-01-15T08:00:00Z"


# -- the directory ----------------------------------------------------------------------------


def test_check_directory_creates_it_and_refuses_what_others_control(tmp_path):
    d = tmp_path / "aws"
    check_directory(d)
    assert stat.S_IMODE(d.stat().st_mode) == 0o755
    os.chmod(d, 0o775)
    with pytest.raises(AgentError, match="writable by it alone"):
        check_directory(d)
    os.chmod(d, 0o755)
    link = tmp_path / "link"
    link.symlink_to(d)
    with pytest.raises(AgentError, match="symlink is refused"):
        check_directory(link)


# -- the job against moto ---------------------------------------------------------------------


@pytest.fixture
def task_role(aws):
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}],
    }
    role = aws.client("iam").create_role(
        RoleName="airflow-test-task", AssumeRolePolicyDocument=json.dumps(policy)
    )
    return role["Role"]["Arn"]


def _cfg(tmp_path, role_arn, **extra):
    cfg = config_from_dict(
        {"cluster": "test", "state_dir": str(tmp_path / "state"), "env": {"group": "root"}}
    )
    cfg.task_credentials = TaskCredentialsConfig(
        role_arn=role_arn, directory=str(tmp_path / "aws"), group=_group(), **extra
    )
    return cfg


def _group() -> str:
    import grp

    return grp.getgrgid(os.getgid()).gr_name


def test_job_assumes_the_role_and_writes_both_files(tmp_path, task_role, imds, caplog):
    caplog.set_level("INFO", logger="agent")
    cfg = _cfg(tmp_path, task_role)
    assert TaskCredentials(cfg).run() == "refreshed"
    creds = tmp_path / "aws" / "credentials.json"
    st = creds.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getgid())
    doc = json.loads(creds.read_text())
    assert doc["RoleArn"] == task_role and doc["Version"] == 1
    expiry = plan.parse_iso8601(doc["Expiration"])
    assert 3000 < expiry - time.time() <= 3600
    conf = (tmp_path / "aws" / "config").read_text()
    assert "region = us-east-1" in conf and f"cat {creds}" in conf
    assert stat.S_IMODE((tmp_path / "aws" / "config").stat().st_mode) == 0o644
    state = StateStore(cfg.state_dir).read(TaskCredentialsDoc)
    assert state.role_arn == task_role and state.expiration == expiry
    assert state.last_result == "refreshed"
    text = caplog.text + (Path(cfg.state_dir) / "task-credentials.json").read_text()
    for secret in (doc["SecretAccessKey"], doc["SessionToken"]):
        assert secret not in text
    assert "valid until" in caplog.text


def test_fresh_credentials_are_kept_and_expiring_ones_replaced(tmp_path, task_role, imds, aws):
    cfg = _cfg(tmp_path, task_role)
    TaskCredentials(cfg).run()
    creds = tmp_path / "aws" / "credentials.json"
    first = creds.read_bytes()
    aws.clear_calls()
    assert TaskCredentials(cfg).run() == "valid"
    assert creds.read_bytes() == first
    assert aws.calls("AssumeRole") == []
    # a file 20 min from its end (under refresh_before, 30 min): assumed again
    doc = json.loads(first)
    doc["Expiration"] = plan.iso8601(time.time() + 1200)
    creds.write_text(json.dumps(doc))
    assert TaskCredentials(cfg).run() == "refreshed"
    assert len(aws.calls("AssumeRole")) == 1
    assert json.loads(creds.read_bytes())["AccessKeyId"] != doc["AccessKeyId"]


def test_without_a_role_the_credentials_file_goes(tmp_path, task_role, imds):
    TaskCredentials(_cfg(tmp_path, task_role)).run()
    cfg = _cfg(tmp_path, None)
    assert TaskCredentials(cfg).run() == "disabled"
    assert not (tmp_path / "aws" / "credentials.json").exists()
    assert "credential_process" not in (tmp_path / "aws" / "config").read_text()
    assert StateStore(cfg.state_dir).read(TaskCredentialsDoc).last_result == "disabled"


def test_a_refused_assume_role_keeps_the_last_file(tmp_path, task_role, imds, aws):
    cfg = _cfg(tmp_path, task_role)
    TaskCredentials(cfg).run()
    before = (tmp_path / "aws" / "credentials.json").read_bytes()
    aws.inject("AssumeRole", code="AccessDenied", count=1, status=403, message="not allowed")
    with pytest.raises(botocore.exceptions.ClientError, match="AccessDenied"):
        TaskCredentials(cfg).run(force=True)
    assert (tmp_path / "aws" / "credentials.json").read_bytes() == before


PROBE = """
import json, boto3
ident = boto3.client("sts").get_caller_identity()
print(json.dumps({"arn": ident["Arn"], "region": boto3.session.Session().region_name}))
"""


def test_a_process_configured_like_airflow_acts_as_the_task_role(tmp_path, task_role, imds, aws):
    """Only AWS_CONFIG_FILE (+ the endpoint the rig needs): credential_process -> task role."""
    TaskCredentials(_cfg(tmp_path, task_role)).run()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_CONFIG_FILE=str(tmp_path / "aws" / "config"),
        AWS_SHARED_CREDENTIALS_FILE="/dev/null",
        AWS_EC2_METADATA_DISABLED="true",
        AWS_ENDPOINT_URL=aws.url,
    )
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["arn"].startswith("arn:aws:sts::123456789012:assumed-role/airflow-test-task/")
    assert got["arn"].endswith("/airflow-test-i-0123456789abcdef0")  # cluster + instance id
    assert got["region"] == "us-east-1"


def test_status_shows_the_last_result_then_role_and_expiry():
    from agent.state import registration

    entry = registration(TaskCredentialsDoc)
    assert entry.status_key == "task_credentials" and entry.shown == ("last_result",)
    doc = {"role_arn": ROLE, "expiration": NOW, "last_result": "refreshed", "last_refresh": NOW}
    assert entry.detail(doc) == f", role {ROLE}, expires 2027-01-15T08:00:00Z"


def test_a_deployments_dag_check_gets_the_task_credentials_first(tmp_path, task_role, imds):
    """A fresh worker's first AfterInstall runs the Airflow CLI before any Airflow unit has
    started (the boot gate holds them), so before the task-credentials unit ever ran: the
    hook writes the credentials itself, and the CLI finds them where AWS_CONFIG_FILE says."""
    from agent.jobs.deploy.hook import DeployHook

    cfg = _cfg(tmp_path, task_role)
    cfg.airflow_home = str(tmp_path / "home")
    (tmp_path / "home").mkdir()
    seen = tmp_path / "seen.json"
    cli = tmp_path / "airflow"  # stands in for the Airflow CLI: reports what it was given
    cli.write_text(
        "#!/bin/sh\n"
        f'test -s "$AWS_CONFIG_FILE" && grep -q credential_process "$AWS_CONFIG_FILE" '
        f"&& echo ok > {seen}\n"
        "echo '[]'\n"
    )
    cli.chmod(0o755)
    cfg.deploy.airflow_command = [str(cli)]
    cfg.deploy.owner = cfg.deploy.group = "root"
    cfg.deploy.check_import_errors = True
    assert not (tmp_path / "aws").exists()
    DeployHook(cfg, "worker", "AfterInstall").step_check_imports()
    assert seen.read_text() == "ok\n"
    assert json.loads((tmp_path / "aws" / "credentials.json").read_text())["RoleArn"] == task_role
