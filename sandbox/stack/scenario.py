"""What the launched stack's checks and its demo do to it: the DAG bundle, deployments through
codedeploy/appspec.yml on every instance, the admin's credentials from the template's secret,
a copy of the template for a stack update, when a unit started on an instance, the Airflow CLI
run on an instance as docs/rotating-secrets.md has an operator run it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

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


PLUGIN_SOURCE = """\
from airflow.plugins_manager import AirflowPlugin


class SandboxPlugin(AirflowPlugin):
    name = "{name}"
"""


def revision(dest: Path, version: str, tasks: int = 4, plugin: Optional[str] = None) -> Path:
    """A CodeDeploy revision of the stack's DAG of `version` and the example DAGs the project
    ships (examples/dags: `make bundle DAGS=examples/dags`): the zip `make bundle` builds
    (tools/release.py: codedeploy/appspec.yml, its hooks, dags/, plugins/), at
    dest/bundle.zip; the CodeDeploy stand-in unpacks it as DownloadBundle does. `plugin`: an
    Airflow plugin of that name in plugins/ (what makes the scheduler and api-servers restart)."""
    dags = Path(dest) / "dags"
    shutil.copytree(EXAMPLE_DAGS, dags)
    (dags / f"{DAG}.py").write_text(DAG_SOURCE.format(version=version, dag_id=DAG, tasks=tasks))
    plugins = None
    if plugin is not None:
        plugins = Path(dest) / "plugins"
        plugins.mkdir()
        (plugins / f"{plugin}.py").write_text(PLUGIN_SOURCE.format(name=plugin))
    bundle = Path(dest) / "bundle.zip"
    bundle.write_bytes(build_bundle(dags, plugins))
    return bundle


def admin_secret_id(model: Any) -> str:
    """The name of the template's admin secret (the one whose Name says admin)."""
    rid = next(
        r
        for r, res in model.resources.items()
        if res["Type"] == "AWS::SecretsManager::Secret" and "admin" in str(model.prop(r, "Name"))
    )
    return str(model.ref(rid))


def admin_credentials(stack: Any) -> Tuple[str, str]:
    """The admin's user and password, from the template's admin secret (read as the operator
    would, with the rig's own credentials)."""
    value = stack.aws.client("secretsmanager").get_secret_value(
        SecretId=admin_secret_id(stack.model)
    )
    doc = json.loads(value["SecretString"])
    return doc["username"], doc["password"]


def deployment_order(model: Any) -> List[Tuple[str, List[str]]]:
    """[(deployment group name, its Auto Scaling group names)] in the order the template's
    DeploymentOrder output gives (the order an operator deploys a bundle in)."""
    order = str(model.resolve(model.template["Outputs"]["DeploymentOrder"]["Value"])).split()
    groups = {
        model.ref(rid): list(model.prop(rid, "AutoScalingGroups") or [])
        for rid, res in model.resources.items()
        if res.get("Type") == "AWS::CodeDeploy::DeploymentGroup" and model.active(rid)
    }
    missing = [name for name in order if name not in groups]
    if missing or sorted(order) != sorted(groups):
        raise ValueError(f"DeploymentOrder {order} does not name the deployment groups {groups}")
    return [(name, groups[name]) for name in order]


def deploy_everywhere(
    stack: Any,
    rev: Path,
    deployment_id: str,
    between: Optional[Callable[[str, Any], None]] = None,
) -> Dict[str, Deployment]:
    """A bundle deployed as the README says: one deployment per deployment group, in the
    template's DeploymentOrder, each waited for before the next. Within a group, one instance
    at a time (CodeDeployDefault.OneAtATime), each through its own CodeDeploy agent stand-in.
    The deployment ids are `<deployment_id>-<group>`. `between(event, member)` runs after
    each lifecycle event of each instance (CodeDeployRunner's `between`)."""
    model = stack.model
    app = model.ref("CodeDeployApplication")
    out: Dict[str, Deployment] = {}
    for group, asgs in deployment_order(model):
        for member in [m for m in stack.members if m.group in asgs]:
            root = stack.run_dir / member.name / "codedeploy"
            # the real agent is a systemd service: its hooks get the manager's
            # DefaultEnvironment, which holds the sandbox's one override (AWS_ENDPOINT_URL)
            env = {"AWS_ENDPOINT_URL": f"http://{stack.aws_at}"}
            runner = CodeDeployRunner(
                host_execute(member.instance.host, env), root, application=app, group=group
            )
            hook = None if between is None else (lambda event, m=member: between(event, m))
            out[member.name] = dep = runner.deploy(rev, f"{deployment_id}-{group}", between=hook)
            if not dep.succeeded:
                return out  # CodeDeploy stops a OneAtATime deployment at the first failure
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


def role_units(member: Any) -> List[str]:
    """The Airflow units of the instance's role, as its agent.yaml (the template's) lists them."""
    cfg = yaml.safe_load(member.instance.host.read_file("/etc/airflow-agent/agent.yaml"))
    return list(cfg["units"][member.role])


def service_pids(stack: Any) -> Dict[Tuple[str, str], int]:
    """{(instance, unit): MainPID} of the scheduler and webserver roles' Airflow units."""
    members = stack.role_members("scheduler") + stack.role_members("webserver")
    return {(m.name, u): m.instance.host.main_pid(u) for m in members for u in role_units(m)}


def health_urls(stack: Any) -> List[str]:
    """The api-server health URL through the load balancer's DNS name, then on each
    api-server directly (the target group's port and health check path)."""
    model = stack.model
    port = int(model.prop("ApiServerTargetGroup", "Port"))
    path = model.prop("ApiServerTargetGroup", "HealthCheckPath")
    direct = [f"http://{m.instance.address}:{port}{path}" for m in stack.role_members("webserver")]
    return [f"http://{model.endpoints()['LoadBalancer']}{path}"] + direct


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


# systemd's catalog id of "Started <unit>" (SD_MESSAGE_UNIT_STARTED), logged by PID 1 with
# UNIT= set: what a unit's own output can never forge, unlike a line that says "Started"
UNIT_STARTED = "39f53479d3a045ac8e11786248231fbf"


def unit_starts(member: Any, unit: str, since: float) -> List[float]:
    """When systemd finished starting `unit` on the instance since `since` (epoch seconds)."""
    p = member.instance.run(
        ["journalctl", "--no-pager", "-q", "-o", "json", f"--since=@{since:.3f}",
         f"UNIT={unit}.service", f"MESSAGE_ID={UNIT_STARTED}"],
        check=False,
    )  # fmt: skip
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    return [int(json.loads(ln)["__REALTIME_TIMESTAMP"]) / 1e6 for ln in lines]


def airflow_cli(member: Any, *args: str, timeout: float = 300) -> Any:
    """The Airflow CLI on the instance as docs/rotating-secrets.md has an operator run it (and
    the template its `db migrate`): a transient unit with the Airflow units' env file, as
    airflow, in AIRFLOW_HOME. The CompletedProcess (stdout: what Airflow printed)."""
    return member.instance.run(
        ["systemd-run", "--quiet", "--wait", "--pipe", "--collect",
         "-p", "EnvironmentFile=/etc/sysconfig/airflow.env", "-p", "User=airflow",
         "-p", "WorkingDirectory=/airflow", "/opt/airflow/venv/bin/airflow", *args],
        check=False, timeout=timeout,
    )  # fmt: skip


def journal_lines(member: Any, unit: str, since: float) -> List[Tuple[float, str]]:
    """(epoch seconds, message) of the unit's journal entries on the instance since `since`."""
    p = member.instance.run(
        ["journalctl", "--no-pager", "-q", "-o", "json", "-u", unit, f"--since=@{since:.3f}"],
        check=False,
    )
    out = []
    for line in p.stdout.splitlines():
        if line.strip():
            entry = json.loads(line)
            message = entry.get("MESSAGE")
            if isinstance(message, str):
                out.append((int(entry["__REALTIME_TIMESTAMP"]) / 1e6, message))
    return out


def slot_intervals(
    stack: Any, role: str, unit: str, since: float
) -> List[Tuple[float, float, str]]:
    """(held, released, instance) of every restart slot the role's instances held in `unit`
    since `since`, from their journals (agent.airflow.restart_slot's log lines)."""
    out = []
    for member in stack.role_members(role):
        held: Optional[float] = None
        for t, message in journal_lines(member, unit, since):
            if f"restart slot {role} " in message and " held (waited " in message:
                held = t
            elif f"restart slot {role} " in message and " released (held " in message:
                assert held is not None, (member.name, message)
                out.append((held, t, member.name))
                held = None
        assert held is None, f"{member.name}: a slot held and never released"
    return sorted(out)
