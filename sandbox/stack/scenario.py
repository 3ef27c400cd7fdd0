"""What the launched stack's checks and its demo do to it: the DAG bundle, deployments through
codedeploy/appspec.yml on every instance, the admin's credentials from the template's secret,
a copy of the template for a stack update, when a unit started on an instance.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import yaml

from sandbox.cfn_template import load_template
from sandbox.codedeploy_runner import CodeDeployRunner, Deployment, host_execute
from sandbox.stack.model import TEMPLATE
from tools.release import build_bundle

DAG = "sandbox_stack"
EXAMPLE_DAGS = Path(TEMPLATE).resolve().parents[1] / "examples" / "dags"
EXAMPLE_DAG = "hello"  # examples/dags/hello.py

DAG_SOURCE = """\
from __future__ import annotations

import datetime
import socket
import time

from airflow.sdk import dag, get_current_context, task

VERSION = "{version}"


@dag(schedule=None, start_date=datetime.datetime(2024, 1, 1), catchup=False,
     max_active_tasks=16, default_args={{"retries": 2,
     "retry_delay": datetime.timedelta(seconds=1)}})
def {dag_id}():
    @task
    def work(i: int):
        ctx = get_current_context()
        seconds = float((ctx["dag_run"].conf or {{}}).get("seconds", 20))
        print("sandbox task %s on %s, bundle %s" % (ctx["ti"].task_id, socket.gethostname(),
                                                    VERSION), flush=True)
        time.sleep(seconds)
        print("sandbox task %s done" % ctx["ti"].task_id, flush=True)
        return VERSION

    for i in range({tasks}):
        work.override(task_id="t%d" % i)(i)


{dag_id}()
"""


def revision(dest: Path, version: str, tasks: int = 4) -> Path:
    """A CodeDeploy revision of the stack's DAG of `version` and the example DAGs the project
    ships (examples/dags: `make bundle DAGS=examples/dags`): the zip `make bundle` builds
    (tools/release.py: codedeploy/appspec.yml, its hooks, dags/), at dest/bundle.zip; the
    CodeDeploy stand-in unpacks it as DownloadBundle does."""
    dags = Path(dest) / "dags"
    shutil.copytree(EXAMPLE_DAGS, dags)
    (dags / f"{DAG}.py").write_text(DAG_SOURCE.format(version=version, dag_id=DAG, tasks=tasks))
    bundle = Path(dest) / "bundle.zip"
    bundle.write_bytes(build_bundle(dags))
    return bundle


def admin_credentials(stack: Any) -> Tuple[str, str]:
    """The admin's user and password, from the template's admin secret (read as the operator
    would, with the rig's own credentials)."""
    model = stack.model
    rid = next(
        r
        for r, res in model.resources.items()
        if res["Type"] == "AWS::SecretsManager::Secret" and "admin" in str(model.prop(r, "Name"))
    )
    value = stack.aws.client("secretsmanager").get_secret_value(SecretId=model.ref(rid))
    doc = json.loads(value["SecretString"])
    return doc["username"], doc["password"]


def deploy_everywhere(
    stack: Any, rev: Path, deployment_id: str, first: Optional[str] = None
) -> Dict[str, Deployment]:
    """One deployment of the template's deployment group: every instance of its groups, one at
    a time (CodeDeployDefault.OneAtATime), each through its own CodeDeploy agent stand-in.

    CodeDeploy picks the order; `first` (a role) puts that role's instances first, one of the
    orders it may pick: workers first reach a worker's drain while its tasks still run.
    """
    model = stack.model
    app = model.ref("CodeDeployApplication")
    group = model.ref("CodeDeployGroup")
    out: Dict[str, Deployment] = {}
    members = sorted(stack.members, key=lambda m: m.role != first)  # stable: else as launched
    for member in members:
        root = stack.run_dir / member.name / "codedeploy"
        # the real agent is a systemd service: its hooks get the manager's DefaultEnvironment,
        # which holds the sandbox's one override (AWS_ENDPOINT_URL; substitutions.py)
        env = {"AWS_ENDPOINT_URL": f"http://{stack.aws_at}"}
        runner = CodeDeployRunner(
            host_execute(member.instance.host, env), root, application=app, group=group
        )
        out[member.name] = dep = runner.deploy(rev, deployment_id)
        if not dep.succeeded:
            break  # CodeDeploy stops a OneAtATime deployment at the first failed instance
    return out


def updated_template(dest_dir: Path, revision: str = "sandbox-2", timeout: str = "45") -> Path:
    """A copy of the template: ConfigRevision's default bumped and one Airflow setting added
    ([core] dagbag_import_timeout, an SSM parameter of the stack)."""
    template = load_template(TEMPLATE)
    template["Parameters"]["ConfigRevision"]["Default"] = revision
    template["Resources"]["ParamDagbagImportTimeout"] = {
        "Type": "AWS::SSM::Parameter",
        "Properties": {
            "Name": {"Fn::Sub": "/airflow/${AWS::StackName}/core/dagbag_import_timeout"},
            "Type": "String",
            "Value": timeout,
        },
    }
    path = Path(dest_dir) / "airflow-cluster-updated.yaml"
    path.write_text(yaml.safe_dump(template, sort_keys=False))
    return path


def unit_started_at(member: Any, unit: str) -> Optional[float]:
    """When `unit` last entered active on the instance (epoch seconds; None if never)."""
    p = member.instance.run(
        ["systemctl", "show", "-p", "ActiveEnterTimestamp", "--timestamp=unix", unit + ".service"],
        check=False,
    )
    value = p.stdout.strip().partition("=")[2].lstrip("@")
    return float(value) if value and value != "0" else None


def unit_last_logged_at(member: Any, unit: str) -> Optional[float]:
    """Time of the unit's last journal entry on the instance (epoch seconds; None if none)."""
    p = member.instance.run(
        ["journalctl", "--no-pager", "-o", "json", "-n", "1", "-u", unit], check=False
    )
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    return int(json.loads(lines[-1])["__REALTIME_TIMESTAMP"]) / 1e6 if lines else None
