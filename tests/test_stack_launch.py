"""The launched stack (issue 11 Build 5): cloudformation/airflow-cluster.yaml as it ships, with
the example's parameters, one scheduler, two api-servers behind the load balancer's stand-in and
two workers, every instance built by its launch template's UserData, IAM enforced. One stack
for the whole module (it takes minutes); the tests run in order on it:

- the schema is migrated once, on the scheduler, before any api-server or worker starts;
- the admin logs in with the template's credentials (one password, from its secret) on both
  api-servers and through the load balancer;
- a DAG bundle deployed through codedeploy/appspec.yml to the template's deployment groups in
  its DeploymentOrder; with tasks in flight on a worker, a second, DAG-only one: the tasks' live
  log is read through the api-server from the worker's log server, the worker drains (none
  killed: every task success on try 1), the scheduler's and api-servers' units keep running
  (same MainPIDs) and a health probe every 0.5 s (directly and through the load balancer)
  never fails;
- a bundle adding a plugin restarts those units, each api-server out of the load balancer's
  rotation while the other serves (never both out; the load balancer answers every probe);
- the example DAG the bundle ships (examples/dags) runs;
- Variables put in the template's variables secret reach Airflow;
- a stack update (ConfigRevision + one Airflow setting, in a copy of the template) lands on
  every instance through its cfn-hup hook, and confapply restarts never two instances of a
  role at once (the restart slot, from the journals), with tasks in flight succeeding;
- the CloudWatch agent's configuration cfn-init wrote on each instance names only the units of
  its role (installed, enabled) and files that exist there, and the stack's log groups, which
  exist in the embedded AWS with CloudWatchLogRetentionDays (the agent itself cannot run here);
- a Fernet key rotation as docs/rotating-secrets.md has it (FernetKey=new,old with a new
  SecretsRevision, `airflow rotate-fernet-key` once, then FernetKey=new): each Airflow unit
  restarts once per step, values written under the old key still read, new ones are stored
  under the new key, and after the rotation the new key alone decrypts them all;
- a worker scale-in through the termination lifecycle hook, as the template's scaling policy
  decides it (the queue falls to work for one worker) and of the worker Auto Scaling's default
  termination policy picks: drained, then exactly one CompleteLifecycleAction;
- the workers sent the agent's event metrics (the drains) with their own credentials;
- with the real template, no request was refused and no journal holds an AccessDenied.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from agent.config import config_from_dict
from agent.platform.envfile import parse_env
from sandbox.proc import wait_for
from sandbox.stack.airflow_api import AirflowApi
from sandbox.stack.cloudwatch_config import AGENT_YAML, expected_units, role_config_path, shipped
from sandbox.stack.launch import Stack
from sandbox.stack.model import StackModel
from sandbox.stack.probe import HealthProbe, RotationSampler
from sandbox.stack.scenario import (
    DAG,
    EXAMPLE_DAG,
    admin_credentials,
    airflow_cli,
    deploy_everywhere,
    health_urls,
    journal_lines,
    revision,
    role_units,
    service_pids,
    slot_intervals,
    unit_last_logged_at,
    unit_started_at,
    unit_starts,
    updated_template,
)
from sandbox.stack.target_tracking import (
    LOW_DATAPOINTS,
    choose_for_scale_in,
    simulate,
    tracking_policy,
)

AWS_DENIED = re.compile(r"(?<!DBus\.Error\.)AccessDenied\w*[^\n]*")

pytestmark = [pytest.mark.systemd, pytest.mark.airflow, pytest.mark.aws, pytest.mark.redis]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("stack")
    s = Stack(workers=2, run_dir=run_dir).up()
    yield s
    s.down()


@pytest.fixture(scope="module")
def api(stack) -> AirflowApi:
    """The API through the load balancer's DNS name, from the scheduler instance, logged in."""
    lb = stack.model.endpoints()["LoadBalancer"]
    client = AirflowApi(stack.role_members("scheduler")[0], f"http://{lb}")
    client.login(*admin_credentials(stack))
    return client


def test_the_schema_is_migrated_once_before_api_servers_and_workers_start(stack):
    (scheduler,) = stack.role_members("scheduler")
    # the scheduler configSet's `airflow db migrate` (a transient unit), finished at:
    migrated = unit_last_logged_at(scheduler, "airflow-db-migrate.service")
    assert migrated is not None, scheduler.instance.journal()[-3000:]
    for member in stack.role_members("webserver") + stack.role_members("worker"):
        # nothing but the scheduler group migrated
        assert unit_last_logged_at(member, "airflow-db-migrate.service") is None, member.name
        unit = "airflow-api-server" if member.role == "webserver" else "airflow-worker"
        started = unit_started_at(member, unit)
        assert started is None or started > migrated, (member.name, started, migrated)
    for member in stack.role_members("webserver"):
        assert unit_started_at(member, "airflow-api-server") is not None, member.name


def test_status_lists_every_instance_and_what_runs_there(stack):
    p = subprocess.run(
        [sys.executable, "-m", "sandbox", "--run-dir", str(stack.run_dir), "status"],
        capture_output=True, text=True, timeout=120, cwd=str(Path(__file__).resolve().parents[1]),
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    lines = {ln.split()[0]: ln for ln in p.stdout.splitlines()[1:] if ln.strip()}
    for member in stack.members:
        assert member.instance.address in lines[member.name]
        assert "cfn-hup" in lines[member.name].split()
    for member in stack.role_members("webserver"):
        assert "airflow-api-server" in lines[member.name].split()


def test_the_admin_logs_in_on_every_api_server_with_one_password(stack, api):
    user, password = admin_credentials(stack)
    port = int(stack.model.prop("ApiServerTargetGroup", "Port"))
    scheduler = stack.role_members("scheduler")[0]
    for member in stack.role_members("webserver"):
        direct = AirflowApi(scheduler, f"http://{member.instance.address}:{port}")
        token = direct.login(user, password)
        assert token
        assert direct.ok("GET", "/api/v2/monitor/health")["metadatabase"]["status"] == "healthy"
        status, _ = AirflowApi(scheduler, direct.base).call(
            "POST", "/auth/token", {"username": user, "password": password + "x"}
        )
        assert status in (401, 403)
    assert api.ok("GET", "/api/v2/version")["version"]


def test_a_deployment_with_tasks_in_flight_drains_the_worker_and_kills_none(stack, api, tmp_path):
    first = deploy_everywhere(stack, revision(tmp_path / "v1", "v1"), "d-V1")
    assert all(d.succeeded for d in first.values()), {n: d.message for n, d in first.items()}
    api.wait_dag(DAG)
    api.trigger(DAG, "inflight", {"seconds": 40})
    running = api.wait_running(DAG, "inflight", 2)
    # the live log of a running task, served by the worker's log server via the api-server
    log = api.task_log(DAG, "inflight", running[0]["task_id"], running[0]["try_number"])
    assert re.search(r"sandbox task t\d on ip-10-77-0-\d+", log), log[-2000:]
    # a DAG-only bundle: the scheduler's and api-servers' units keep running (same MainPIDs),
    # and the api-servers answer every health probe, directly and through the load balancer
    pids = service_pids(stack)
    (scheduler,) = stack.role_members("scheduler")
    urls = health_urls(stack)
    with HealthProbe(scheduler, urls) as probe:
        second = deploy_everywhere(stack, revision(tmp_path / "v2", "v2"), "d-V2")
    assert all(d.succeeded for d in second.values()), {n: d.message for n, d in second.items()}
    assert service_pids(stack) == pids
    answers = probe.result
    print(
        f"\nDAG-only deployment: {len(pids)} scheduler/api-server units kept their MainPIDs; "
        f"health probes {[answers.count(u) for u in urls]} (load balancer, then each api-server),"
        f" {len(answers.failures())} failed, over {answers.span():.0f} s, slowest answer "
        f"{answers.slowest():.2f} s"
    )
    assert answers.failures() == [], answers.failures()[:5]
    assert min(answers.count(u) for u in urls) >= 20, [answers.count(u) for u in urls]
    for member in stack.role_members("scheduler") + stack.role_members("webserver"):
        (start,) = second[member.name].event("ApplicationStart")
        assert "kept running, nothing they load changed" in start.output, start.output[-1500:]
    stops = [e for d in second.values() for e in d.events if e.event == "ApplicationStop"]
    assert stops and all(e.ok for e in stops)
    # the drain really had tasks to wait for: its worker's ApplicationStop saw them running
    waited = [
        e.output
        for m in stack.role_members("worker")
        for e in second[m.name].events
        if e.event == "ApplicationStop"
    ]
    assert any(re.search(r"draining \S+: [1-9]\d* task\(s\) running", o) for o in waited), [
        o[-1500:] for o in waited
    ]
    assert api.wait_run(DAG, "inflight")["state"] == "success"
    tis = api.task_instances(DAG, "inflight")
    assert [(t["state"], t["try_number"]) for t in tis] == [("success", 1)] * len(tis)
    # ... with the template's broker configuration: a secret's name, no plain URL anywhere
    for member in stack.members:
        env = parse_env(member.instance.host.read_file("/etc/sysconfig/airflow.env"))
        assert "AIRFLOW__CELERY__BROKER_URL" not in env, member.name
        if member.role == "worker":
            assert env.get("AIRFLOW__CELERY__BROKER_URL_SECRET"), member.name


def test_a_plugins_change_restarts_one_api_server_at_a_time_out_of_rotation(stack, api, tmp_path):
    """A bundle that adds a plugin: the scheduler's and api-servers' units restart (the
    plugin is what they load), each api-server out of the load balancer's rotation while the
    other serves: the load balancer answers every probe, and tasks running meanwhile succeed."""
    api.trigger(DAG, "plugins", {"seconds": 30})
    api.wait_running(DAG, "plugins", 2)
    pids = service_pids(stack)
    (scheduler,) = stack.role_members("scheduler")
    lb_url = health_urls(stack)[0]
    rotation = RotationSampler(stack.standins["load balancer"])
    with HealthProbe(scheduler, [lb_url]) as probe, rotation:
        third = deploy_everywhere(
            stack, revision(tmp_path / "v3", "v2", plugin="sandbox_plugin"), "d-V3"
        )
    assert all(d.succeeded for d in third.values()), {n: d.message for n, d in third.items()}
    after = service_pids(stack)
    assert all(after[k] != pid for k, pid in pids.items()), (pids, after)
    for member in stack.role_members("scheduler") + stack.role_members("webserver"):
        (start,) = third[member.name].event("ApplicationStart")
        assert "the bundle changed plugins" in start.output, start.output[-1500:]
        if member.role == "webserver":
            assert "leaving the target group" in start.output, start.output[-1500:]
    took = [
        ln.split(" restarted ", 1)[1]
        for d in third.values()
        for e in d.event("ApplicationStart")
        for ln in e.output.splitlines()
        if " restarted (MainPID " in ln
    ]
    print(
        f"\nplugins deployment: restarts {took}; load balancer probes {probe.result.count(lb_url)}"
        f", {len(probe.result.failures())} failed, slowest answer {probe.result.slowest():.2f} s "
        f"(failures at {probe.result.failure_times()} s);"
        f" at most {rotation.max_out()} api-server(s) "
        f"out of rotation in {len(rotation.samples)} samples"
    )
    assert probe.result.failures() == [], probe.result.failures()[:5]
    # never both api-servers out of the target group, and each was out once
    webservers = [m.instance.address for m in stack.role_members("webserver")]
    assert rotation.max_out() == 1, rotation.samples[-5:]
    assert sorted(rotation.ever_out()) == sorted(webservers)
    assert api.wait_run(DAG, "plugins")["state"] == "success"
    tis = api.task_instances(DAG, "plugins")
    assert [(t["state"], t["try_number"]) for t in tis] == [("success", 1)] * len(tis)
    plugins = api.ok("GET", "/api/v2/plugins")["plugins"]
    assert "sandbox_plugin" in [p["name"] for p in plugins]


def test_the_example_bundles_dag_runs(stack, api):
    # the deployments carried examples/dags (what `make bundle DAGS=examples/dags` ships)
    api.wait_dag(EXAMPLE_DAG)
    api.trigger(EXAMPLE_DAG, "example")
    assert api.wait_run(EXAMPLE_DAG, "example", timeout=300)["state"] == "success"
    tis = api.task_instances(EXAMPLE_DAG, "example")
    assert sorted((t["task_id"], t["state"]) for t in tis) == [
        ("greet", "success"),
        ("show", "success"),
    ]


def test_variables_come_from_the_templates_secret(stack, api):
    sm = stack.aws.client("secretsmanager")
    sm.put_secret_value(
        SecretId=stack.model.ref("VariablesSecret"),
        SecretString=json.dumps({"sandbox_greeting": "hello from the secret"}),
    )
    # the scheduler's airflow-agent-variables.timer runs the sync every 5 min; run it now, as
    # an operator would after changing the secret
    (scheduler,) = stack.role_members("scheduler")
    p = scheduler.instance.run(
        ["systemctl", "start", "airflow-agent-variables.service"], check=False, timeout=300
    )
    journal = scheduler.instance.journal("airflow-agent-variables.service")
    assert p.returncode == 0, journal[-3000:]
    wait_for(
        lambda: api.variable("sandbox_greeting") == "hello from the secret",
        60,
        "the variable to reach Airflow",
        interval=3,
    )


def wait_confapply_slots(stack, role: str, count: int, since: float) -> None:
    """Wait until confapply on `count` instances of `role` restarted in a slot since `since`."""
    wait_for(
        lambda: len(slot_intervals(stack, role, "airflow-agent-confapply", since)) >= count,
        600,
        f"confapply on every {role} to restart in a slot",
        interval=2,
    )


def test_a_stack_update_lands_on_every_instance_through_cfn_hup(stack, api, tmp_path):
    """A config push: the new setting reaches every instance's env file, and confapply
    restarts their units never two instances of one role at once (the fleet's restart slot,
    from the journals), the workers through Celery's warm shutdown, with no task failing."""
    api.trigger(DAG, "update", {"seconds": 30})
    api.wait_running(DAG, "update", 2)
    since = time.time()
    new = StackModel.load(updated_template(tmp_path), workers=2)
    result = stack.update(new)
    assert (
        "ParamDagbagImportTimeout",
        f"created /airflow/{new.stack_name}/core/dagbag_import_timeout",
    ) in result["changed"]
    for member in stack.members:
        assert result["hooks"][member.name]["rc"] == 0
        h = member.instance.host
        env = parse_env(h.read_file("/etc/sysconfig/airflow.env"))
        assert env.get("AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT") == "45", member.name
        agent_yaml = h.read_file("/etc/airflow-agent/agent.yaml").decode()
        assert "# config revision: sandbox-2" in agent_yaml, member.name
    # every instance's confapply restarted its units for the new file, each in a slot
    for role in ("scheduler", "webserver", "worker"):
        count = len(stack.role_members(role))
        wait_confapply_slots(stack, role, count, since)
        spans = slot_intervals(stack, role, "airflow-agent-confapply", since)
        print(f"\nconfig push, {role} slots: " + ", ".join(
            f"{name} {held - since:.1f}-{released - since:.1f} s" for held, released, name in spans
        ))  # fmt: skip
        for (_, released, first), (held, _, second) in zip(spans, spans[1:]):
            assert released <= held, (role, first, second, spans)
    for member in stack.role_members("webserver"):  # each restarted out of rotation
        journal = [m for _, m in journal_lines(member, "airflow-agent-confapply", since)]
        for what in ("leaving the target group", "back in the target group, healthy"):
            assert any(what in m for m in journal), (member.name, what, journal[-20:])
        # the restarted api-server's first execution-API request was its unit's warm-up, not
        # a task's call (which would have met Airflow's cold start: docs/design.md)
        served = execution_requests_since_start(member, since)
        assert served and served[0][:2] == ("127.0.0.1", "/execution/health"), (member.name, served)
    for member in stack.role_members("worker"):
        journal = [m for _, m in journal_lines(member, "airflow-worker", since)]
        assert any("Warm shutdown" in m for m in journal), (member.name, journal[-20:])
    assert api.wait_run(DAG, "update")["state"] == "success"
    tis = api.task_instances(DAG, "update")
    outcome = [(t["state"], t["try_number"]) for t in tis]
    assert outcome == [("success", 1)] * len(tis), why_retried(stack, api, "update", tis, since)


ACCESS = re.compile(r"client_addr=([^\s:]+):\d+ duration_us=(\d+) .*path=(/execution/\S*)")


def execution_requests_since_start(member, since: float):
    """(client address, path, seconds) of each execution-API request the instance's api-server
    logged since its unit's last start after `since`, in the order they finished."""
    lines = [m for _, m in journal_lines(member, "airflow-api-server", since)]
    starts = [i for i, m in enumerate(lines) if m.startswith("Starting airflow-api-server")]
    assert starts, (member.name, "no start of airflow-api-server since the push", lines[-20:])
    found = (ACCESS.search(m) for m in lines[starts[-1] :])
    return [(g[1], g[3], int(g[2]) / 1e6) for g in found if g]


def why_retried(stack, api, run_id: str, tis, since: float) -> str:
    """For a failed assertion: the first try's log of every retried task, whole entries from
    its failure on (the exception's fields, not only the event line), and the journals of the
    units a config push restarts (the first 120 s, the botocore endpoint chatter left out), so
    a retry says what it met."""
    parts = []
    for t in tis:
        if t["try_number"] > 1:
            entries = api.task_log_content(DAG, run_id, t["task_id"], 1)
            if isinstance(entries, list):
                at = next(
                    (i for i, e in enumerate(entries) if "failed" in json.dumps(e).lower()), 0
                )
                text = "\n".join(json.dumps(e, default=str) for e in entries[max(at - 3, 0) :])
            else:
                text = str(entries)[-2000:]
            last = f"try {t['try_number']} ran on {t.get('hostname')}"
            parts.append(f"--- {t['task_id']} try 1 ({last}):\n{text[-6000:]}")
    for role, unit in (
        ("webserver", "airflow-api-server"),
        ("worker", "airflow-worker"),
        ("scheduler", "airflow-scheduler"),
        ("webserver", "airflow-agent-confapply"),
        ("worker", "airflow-agent-confapply"),
    ):
        for member in stack.role_members(role):
            lines = [
                (t, m)
                for t, m in journal_lines(member, unit, since)
                if t - since < 120 and "Found endpoint for" not in m
            ]
            text = "\n".join(f"{t - since:7.1f} {m[:400]}" for t, m in lines[:150])
            parts.append(f"--- {member.name} {unit}:\n{text}")
    return "\n".join(parts)


def policy_scale_in(stack):
    """The scale-in the template's scaling policy decides when the queue falls from work for
    every worker to work for one (sandbox/stack/target_tracking.py, from the stack's resolved
    template), and the workers it removes as Auto Scaling's default termination policy picks
    them from the group in the embedded AWS (none protected from scale in: a busy worker with
    lifecycle.scale_in_protection on is waited for until its agent lifts the protection)."""
    workers = stack.role_members("worker")
    policy = tracking_policy(stack.model)
    run = simulate(policy, [float(len(workers))] * 3 + [1.0] * LOW_DATAPOINTS, start=len(workers))
    (decision,) = run.scale_ins()
    count = decision.before - decision.after
    asg = stack.aws.client("autoscaling")
    name = stack.model.ref("WorkerGroup")

    def chosen():
        (group,) = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])[
            "AutoScalingGroups"
        ]
        ids = choose_for_scale_in(group["Instances"], count)
        return ids if len(ids) == count else None

    ids = wait_for(chosen, 600, f"{count} worker(s) not protected from scale in", interval=5)
    print(f"\nscaling policy: {decision} -> removes {ids}")
    return decision, [m for m in workers if m.instance_id in ids]


# Files the logs configuration names whose writer the sandbox replaces, and why each cannot
# exist on a sandbox instance (sandbox/stack/substitutions.py "no CodeDeploy agent download"):
# the CodeDeploy agent is not installed; sandbox/codedeploy_runner.py runs its hooks from the
# rig, inside the host, and writes neither the agent's own log nor its deployments log.
NOT_ON_SANDBOX_INSTANCES = {
    "/var/log/aws/codedeploy-agent/codedeploy-agent.log": "written by the CodeDeploy agent",
    "/opt/codedeploy-agent/deployment-root/deployment-logs/codedeploy-agent-deployments.log": (
        "the CodeDeploy agent's record of its deployments' hook output"
    ),
}


def test_the_cloudwatch_agent_config_names_only_what_each_instance_has(stack):
    """issue 14 item 2: the CloudWatch agent's configuration cfn-init wrote on each instance
    ships the journals of exactly the units the agent enabled for its role (each installed,
    loaded, enabled or triggered by an enabled timer), files that exist there, and the log
    groups the stack created in the embedded AWS with CloudWatchLogRetentionDays."""
    model = stack.model
    groups = {
        model.ref(rid)
        for rid, res in model.resources.items()
        if res["Type"] == "AWS::Logs::LogGroup"
    }
    found = stack.aws.client("logs").describe_log_groups()["logGroups"]
    days = int(model.ref("CloudWatchLogRetentionDays"))
    retention = {g["logGroupName"]: g.get("retentionInDays") for g in found}
    assert retention == dict.fromkeys(groups, days)
    named = set()
    for member in stack.members:
        host = member.instance.host
        # the role /usr/local/sbin/airflow-cloudwatch-agent applies: agent.yaml's link
        link = host.run(["readlink", AGENT_YAML]).stdout.strip()
        assert link.endswith(f"/{member.role}.yaml"), (member.name, link)
        path = role_config_path(member.role)
        logs = shipped(host.read_file(path).decode(), source=f"{member.name}:{path}")
        cfg = config_from_dict(yaml.safe_load(host.read_file(AGENT_YAML)), source=member.name)
        assert sorted(logs.units) == sorted(expected_units(cfg, member.role)), member.name
        for unit in logs.units:
            assert host.unit_property(unit, "LoadState") == "loaded", (member.name, unit)
            assert host.unit_property(unit, "FragmentPath") == f"/etc/systemd/system/{unit}"
            triggers = host.unit_property(unit, "TriggeredBy").split()
            states = [host.unit_property(u, "UnitFileState") for u in [unit, *triggers]]
            assert "enabled" in states, (member.name, unit, triggers, states)
        missing = [f for f in logs.files if host.run(["test", "-f", f], check=False).returncode]
        assert sorted(missing) == sorted(NOT_ON_SANDBOX_INSTANCES), (member.name, missing)
        named |= logs.groups
    assert named == groups


def _running_units(stack):
    """{(instance, unit): MainPID} of every Airflow unit that runs now."""
    return {
        (m.name, u): m.instance.host.main_pid(u)
        for m in stack.members
        for u in role_units(m)
        if m.instance.host.unit_property(u, "ActiveState") == "active"
    }


def _rotate_to(stack, tmp_path, fernet_key: str, revision: str, running) -> float:
    """docs/rotating-secrets.md's stack update: FernetKey and a new SecretsRevision (in a copy
    of the template as the previous update left it); returns when the confapply of every
    instance with `running` units has restarted them in a slot. The time the update started."""
    since = time.time()
    tmp_path.mkdir(parents=True, exist_ok=True)
    new = StackModel.load(
        updated_template(tmp_path),
        workers=2,
        extra={"FernetKey": fernet_key, "SecretsRevision": revision},
    )
    result = stack.update(new)
    assert ("FernetKeySecret", "new secret version") in result["changed"], result["changed"]
    for member in stack.members:
        assert result["hooks"][member.name]["rc"] == 0, member.name
        env = parse_env(member.instance.host.read_file("/etc/sysconfig/airflow.env"))
        assert env.get("AIRFLOW_SECRETS_REVISION") == revision, member.name
        # the env file names the secret and carries the revision, never a key
        assert env.get("AIRFLOW__CORE__FERNET_KEY_SECRET") == "fernet_key", member.name
        assert fernet_key.split(",")[0] not in json.dumps(env), member.name
    for role in ("scheduler", "webserver", "worker"):
        count = len({m.name for m in stack.role_members(role) for n, _ in running if n == m.name})
        wait_confapply_slots(stack, role, count, since)
    return since


def _restarted_once_each(stack, since: float, running) -> None:
    """Every Airflow unit that ran restarted exactly once since `since` (one 'Started' from
    systemd, a new MainPID) and is active; one that did not run was not started."""
    for member in stack.members:
        h = member.instance.host
        for unit in role_units(member):
            starts = unit_starts(member, unit, since)
            if (member.name, unit) not in running:
                assert starts == [], (member.name, unit, starts)
                continue
            assert len(starts) == 1, (member.name, unit, starts)
            assert h.unit_property(unit, "ActiveState") == "active", (member.name, unit)
            assert h.main_pid(unit) != running[(member.name, unit)], (member.name, unit)


def test_a_fernet_key_rotation_keeps_old_values_and_restarts_each_unit_once(stack, api, tmp_path):
    """docs/rotating-secrets.md on the running stack: a Variable and a Connection encrypted with
    the old key; FernetKey=new,old (+ SecretsRevision) through cfn-hup: each Airflow unit
    restarts once, the old values still read, a new Variable is stored under the new key; then
    `airflow rotate-fernet-key` once on the scheduler re-encrypts the old values under the new
    key; FernetKey=new alone: they still read. The stack is left on the new key."""
    from cryptography.fernet import Fernet, InvalidToken

    db = stack.standins["database"]
    (scheduler,) = stack.role_members("scheduler")
    old = stack.model.parameters["FernetKey"]
    new = Fernet.generate_key().decode()

    def stored(sql: str) -> bytes:
        out = db.psql(sql).strip()
        assert out, sql
        return out.encode()

    variable = "SELECT val FROM variable WHERE key = '{}' AND is_encrypted"
    password = "SELECT password FROM connection WHERE conn_id = 'rotation_old' AND is_encrypted"

    def connection_password() -> str:
        p = airflow_cli(scheduler, "connections", "get", "rotation_old", "-o", "json")
        assert p.returncode == 0, p.stderr[-2000:]
        (line,) = [ln for ln in p.stdout.splitlines() if ln.startswith("[{")]  # -o json's row
        return json.loads(line)[0]["password"]

    api.ok("POST", "/api/v2/variables", {"key": "rotation_old", "value": "written under old"})
    api.ok("POST", "/api/v2/connections", {
        "connection_id": "rotation_old", "conn_type": "http", "host": "example.internal",
        "login": "svc", "password": "old-conn-password",
    })  # fmt: skip
    assert Fernet(old).decrypt(stored(variable.format("rotation_old"))) == b"written under old"
    assert Fernet(old).decrypt(stored(password)) == b"old-conn-password"

    # workers start only with a deployed revision (the boot gate): run alone (-k), this test
    # deploys one, so that every role has units to restart
    if not all(m.instance.host.unit_property("airflow-worker", "ActiveState") == "active"
               for m in stack.role_members("worker")):  # fmt: skip
        deployed = deploy_everywhere(stack, revision(tmp_path / "v1", "v1"), "d-FERNET")
        assert all(d.succeeded for d in deployed.values()), deployed
    running = _running_units(stack)
    assert {u for _, u in running} >= {"airflow-scheduler", "airflow-api-server", "airflow-worker"}

    # 1. FernetKey=new,old
    since = _rotate_to(stack, tmp_path / "a", f"{new},{old}", "fernet-1", running)
    converged = time.time() - since
    _restarted_once_each(stack, since, running)
    for role in ("scheduler", "webserver", "worker"):
        spans = slot_intervals(stack, role, "airflow-agent-confapply", since)
        for (_, released, first), (held, _, second) in zip(spans, spans[1:]):
            assert released <= held, (role, first, second, spans)
    # the old values still decrypt, through the API (api-servers) and the CLI (scheduler)
    assert api.variable("rotation_old") == "written under old"
    assert connection_password() == "old-conn-password"
    with pytest.raises(InvalidToken):  # still stored under the old key
        Fernet(new).decrypt(stored(variable.format("rotation_old")))
    # a value written now is stored under the new key, which alone decrypts it
    api.ok("POST", "/api/v2/variables", {"key": "rotation_new", "value": "written under new"})
    fresh = stored(variable.format("rotation_new"))
    assert Fernet(new).decrypt(fresh) == b"written under new"
    with pytest.raises(InvalidToken):
        Fernet(old).decrypt(fresh)

    # 2. airflow rotate-fernet-key, once, on the scheduler
    p = airflow_cli(scheduler, "rotate-fernet-key")
    assert p.returncode == 0, (p.stdout[-1500:], p.stderr[-1500:])
    assert Fernet(new).decrypt(stored(variable.format("rotation_old"))) == b"written under old"
    assert Fernet(new).decrypt(stored(password)) == b"old-conn-password"
    assert Fernet(new).decrypt(stored(variable.format("rotation_new"))) == b"written under new"

    # 3. FernetKey=new: the old key is gone from every unit; the values still read
    running = _running_units(stack)
    again = _rotate_to(stack, tmp_path / "b", new, "fernet-2", running)
    converged_again = time.time() - again
    _restarted_once_each(stack, again, running)
    assert api.variable("rotation_old") == "written under old"
    assert api.variable("rotation_new") == "written under new"
    assert connection_password() == "old-conn-password"
    print(
        f"\nfernet rotation: new,old converged (every unit restarted once) in {converged:.0f} s,"
        f" new alone in {converged_again:.0f} s"
    )


def test_a_worker_scale_in_drains_then_completes_the_hook_once(stack):
    # the scale-in comes from the policy's decision: 2 workers, work for 1 -> remove 1
    decision, chosen = policy_scale_in(stack)
    assert (decision.before, decision.after) == (2, 1), decision
    (member,) = chosen
    result = stack.scale_in(member)
    mine = [
        a
        for a in stack.aws.lifecycle_actions()
        if a["action"] == "CompleteLifecycleAction"
        and a["params"].get("InstanceId") == member.instance_id
    ]
    assert len(mine) == 1, mine
    assert mine[0]["params"]["LifecycleActionResult"] == "CONTINUE"
    assert member.instance.host.unit_property("airflow-worker", "ActiveState") == "inactive"
    assert "drain" in result["journal"].lower()
    stack.remove(member)


def test_workers_sent_the_agents_event_metrics_with_their_own_role(stack):
    """The drains of the deployments above (and the scale-in's) were sent by the workers
    themselves, with their instance role's credentials (as their IMDS serves them), to the
    agent's namespace; none refused."""
    from agent.events.plan import METRICS
    from agent.platform.imds import ImdsClient

    role = stack.model.instance_role_for("worker")
    keys = set()
    for member in stack.role_members("worker"):
        creds = ImdsClient(member.imds.url + "/").get(f"meta-data/iam/security-credentials/{role}")
        keys.add(json.loads(creds or "{}").get("AccessKeyId"))
    sent = wait_for(
        lambda: [c for c in stack.aws.calls("PutMetricData") if c["key"] in keys],
        timeout=60,
        what="a PutMetricData call signed with a worker's credentials",
    )
    assert sent
    cw = stack.aws.client("cloudwatch")
    published = cw.list_metrics(
        Namespace="AirflowEC2Agent",
        Dimensions=[
            {"Name": "Cluster", "Value": stack.model.stack_name},
            {"Name": "Role", "Value": "worker"},
        ],
    )["Metrics"]
    names = {m["MetricName"] for m in published}
    assert {"Drains", "DrainSeconds"} <= names <= set(METRICS), names
    assert [d for d in stack.aws.denials() if d["action"] == "cloudwatch:PutMetricData"] == []


def test_no_access_denied_with_the_real_template(stack):
    assert stack.aws.denials() == []
    assert stack.aws.unevaluated_conditions() == []  # every condition of the template evaluated
    for member in stack.members:
        # AWS's AccessDenied (not D-Bus's "org.freedesktop.DBus.Error.AccessDenied: Failed to set
        # fd limit", which every test host's dbus-daemon logs at boot)
        denied = AWS_DENIED.findall(member.instance.journal() + member.instance.cfn_init_log())
        assert denied == [], member.name


def test_the_operator_docs_sandbox_blocks_run_on_the_stack(stack, tmp_path):
    """docs/operations.md, upgrading.md, troubleshooting.md and rotating-secrets.md
    (tools/doc_blocks.OPERATOR_DOCS): every shell block marked
    `<!-- sandbox: ROLE -->` (tools/doc_blocks.py) runs, in doc order, as root (what Session
    Manager's `sudo -i` gives) on the first instance of its role: exit 0, and every `expect:`
    text in its output. The shell gets the sandbox's one override, the embedded AWS's endpoint
    (a real instance reaches AWS's own). Blocks marked `needs: aws-account` are not run."""
    from tools.doc_blocks import sandbox_blocks

    (worker, *_) = stack.role_members("worker")
    deployed = worker.instance.run(["test", "-e", "/airflow/.deployed-revision"], check=False)
    if deployed.returncode != 0:  # run alone (-k): the runbook's worker gets a revision first
        done = deploy_everywhere(stack, revision(tmp_path / "v1", "v1"), "d-RUNBOOK")
        assert all(d.succeeded for d in done.values()), {n: d.message for n, d in done.items()}
    env = {"AWS_ENDPOINT_URL": f"http://{stack.aws_at}"}
    failed = []
    for block in sandbox_blocks(Path(__file__).resolve().parents[1]):
        member = stack.role_members(block.role)[0]
        t = time.monotonic()
        p = member.instance.run(
            ["bash", "-eo", "pipefail", "-c", block.text], check=False, timeout=900, env=env
        )
        out = p.stdout + p.stderr
        missing = [text for text in block.expect if text not in out]
        print(f"\n{block.name} on {member.name}: rc {p.returncode} in {time.monotonic() - t:.1f} s")
        if p.returncode != 0 or missing:
            failed.append((block.name, member.name, p.returncode, missing, out[-2500:]))
    assert failed == []
