"""CodeDeploy hooks through a CodeDeploy-agent stand-in that reads codedeploy/appspec.yml.

The worker here is the plain Celery worker unit of tests/test_drain.py (fast to start); the
headline test with a real Airflow cluster is further down in this file
(`test_headline_deploy_with_tasks_in_flight_kills_nothing`). The runner executes the real hook
scripts inside the systemd test host, as root, with CodeDeploy's variables, so the appspec and
the scripts are what is tested.
"""

from __future__ import annotations

import json
import time

import pytest

from agent.jobs.deploy.hook import EVENTS, plan_hook
from sandbox.celery_worker_host import REPO, VENV_PY, CeleryWorkerHost
from sandbox.codedeploy_runner import CodeDeployRunner, host_execute, local_execute, make_revision
from sandbox.proc import running, wait_for

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    w = CeleryWorkerHost(tmp_path_factory.mktemp("deploy-shared")).start()
    h = w.host
    # the agent as the hooks find it: `airflow-agent` on PATH, /etc/airflow-agent/agent.yaml
    h.run(["ln", "-sfn", str(REPO / ".venv/bin/airflow-agent"), "/usr/local/bin/airflow-agent"])
    h.run(["sh", "-c", "getent passwd airflow || useradd --system --user-group airflow"])
    yield w
    w.stop()


def _agent_yaml(rig, **deploy):
    cfg = {
        "cluster": "test",
        "state_dir": "/var/lib/airflow-agent",
        "airflow_home": "/airflow",
        "role": {"override": "worker"},
        "env": {"file": str(rig.env_file), "ssm_paths": ["/airflow/test/"]},
        "drain": {"timeout": 120},
        "deploy": {"validate_timeout": 30, "check_import_errors": False, **deploy},
    }
    rig.host.write_file("/etc/airflow-agent/agent.yaml", json.dumps(cfg))


def _runner(rig, tmp_path):
    root = rig.shared / f"cd-root-{tmp_path.name}"
    return CodeDeployRunner(host_execute(rig.host), root, application="airflow", group="workers")


def _rev(rig, tmp_path, name, version):
    return make_revision(
        rig.shared / f"rev-{tmp_path.name}-{name}",
        {"dags/version.txt": version + "\n", "dags/dag.py": "# " + version},
    )


def test_plan_covers_every_event_and_role():
    for event in EVENTS:
        for role in ("worker", "scheduler", "webserver"):
            assert plan_hook(event, role)
    assert plan_hook("ApplicationStop", "worker") == ["drain"]
    assert plan_hook("ApplicationStop", "scheduler") == ["keep-units"]
    assert plan_hook("BeforeInstall", "webserver") == ["clear-pycache", "snapshot-tree"]
    assert plan_hook("ApplicationStart", "webserver") == ["write-marker", "apply-units"]
    assert plan_hook("ApplicationStart", "worker") == ["write-marker", "undrain"]
    assert "scheduler-job" in plan_hook("ValidateService", "scheduler")


def test_deploy_drains_running_tasks_then_starts_and_validates(rig, tmp_path):
    rig.fresh()
    _agent_yaml(rig)
    runner = _runner(rig, tmp_path)
    first = runner.deploy(_rev(rig, tmp_path, "v1", "v1"), deployment_id="d-FIRST")
    assert first.succeeded, first.message
    assert not first.event("ApplicationStop")  # nothing to stop on a first deployment
    assert rig.host.read_file("/airflow/dags/version.txt") == b"v1\n"
    assert rig.host.read_file("/airflow/.deployed-revision") == b"d-FIRST\n"
    owner = rig.host.run(["stat", "-c", "%U:%G", "/airflow/dags/dag.py"]).stdout.strip()
    assert owner == "airflow:airflow"

    rig.submit("t1", 5, "default")
    rig.submit("t2", 5, "q2")
    rig.started(2)
    seen = {}

    def between(event):
        if event == "ApplicationStop":
            seen["stopped"] = rig.active_state()
            seen["records"] = rig.records()

    second = runner.deploy(
        _rev(rig, tmp_path, "v2", "v2"), deployment_id="d-SECOND", between=between
    )
    assert second.succeeded, second.message
    stop = second.event("ApplicationStop")[0]
    assert stop.script == "hooks/application_stop.sh"  # from the previous revision
    assert "drain: drained (remote-control)" in stop.output
    assert "cancelled consumer of queue q2" in stop.output
    assert seen["stopped"] == "inactive"
    assert seen["records"] == {"t1": ["start", "end"], "t2": ["start", "end"]}
    assert rig.host.read_file("/airflow/dags/version.txt") == b"v2\n"
    assert rig.host.read_file("/airflow/.deployed-revision") == b"d-SECOND\n"
    assert rig.active_state() == "active" and rig.consuming() == ["default", "q2"]
    validate = second.event("ValidateService")[0]
    assert "worker celery@drainhost answers and consumes" in validate.output
    for e in second.events:
        if e.script:
            assert "deployment=d-SECOND application=airflow group=workers" in e.output


def test_every_hook_twice_in_a_row_is_harmless(rig, tmp_path):
    rig.fresh()
    _agent_yaml(rig)
    runner = _runner(rig, tmp_path)
    rev = _rev(rig, tmp_path, "v1", "v1")
    assert runner.deploy(rev, deployment_id="d-A").succeeded
    archive = runner.last_successful_archive()
    for event, script in [
        ("ApplicationStop", "application_stop"),
        ("BeforeInstall", "before_install"),
        ("AfterInstall", "after_install"),
        ("ApplicationStart", "application_start"),
        ("ValidateService", "validate_service"),
    ]:
        for _ in range(2):
            t = time.monotonic()
            proc = rig.host.run(
                [str(archive / "hooks" / f"{script}.sh")],
                check=False,
                env={"LIFECYCLE_EVENT": event, "DEPLOYMENT_ID": "d-A"},
                timeout=120,
            )
            assert proc.returncode == 0, (event, proc.stdout, proc.stderr)
            if event == "ApplicationStop":
                assert time.monotonic() - t < 30
    assert rig.active_state() == "active" and rig.consuming() == ["default", "q2"]
    # and the same revision deployed again (every hook of a whole deployment once more)
    again = runner.deploy(rev, deployment_id="d-B")
    assert again.succeeded, again.message


def test_failing_hook_exits_non_zero_with_a_one_line_reason(rig, tmp_path):
    rig.fresh()
    _agent_yaml(rig, validate_timeout=3)
    data = json.loads(rig.host.read_file("/etc/airflow-agent/agent.yaml"))
    data["drain"]["node_name"] = "celery@elsewhere"
    rig.host.write_file("/etc/airflow-agent/agent.yaml", json.dumps(data))
    dep = _runner(rig, tmp_path).deploy(_rev(rig, tmp_path, "v1", "v1"))
    assert not dep.succeeded
    assert dep.failed.event == "ValidateService" and dep.failed.rc == 4
    last = dep.failed.output.strip().splitlines()[-1]
    assert last.startswith("ERROR agent: worker celery@elsewhere not healthy after 3s")
    assert "Script at specified location: hooks/validate_service.sh failed with exit code 4" in (
        dep.message
    )


def test_hook_without_a_role_fails_clearly(rig, tmp_path):
    rig.fresh()
    _agent_yaml(rig)
    data = json.loads(rig.host.read_file("/etc/airflow-agent/agent.yaml"))
    data["role"] = {"override": None}
    data["state_dir"] = "/var/lib/airflow-agent-empty"
    rig.host.write_file("/etc/airflow-agent/agent.yaml", json.dumps(data))
    dep = _runner(rig, tmp_path).deploy(_rev(rig, tmp_path, "v1", "v1"))
    assert dep.failed is not None and dep.failed.event == "BeforeInstall"
    assert "ERROR agent: this instance has no role" in dep.failed.output


def test_runner_kills_the_process_group_at_the_timeout_and_waits_for_held_pipes(tmp_path):
    # The runner itself: a script that leaves a child holding stdout keeps the hook running
    # until the timeout, then the whole group is killed (what CodeDeploy does).
    rev = tmp_path / "rev"
    (rev / "hooks").mkdir(parents=True)
    (rev / "appspec.yml").write_text(
        "version: 0.0\nos: linux\nhooks:\n  BeforeInstall:\n"
        "    - location: hooks/leak.sh\n      timeout: 2\n      runas: root\n"
    )
    (rev / "hooks" / "leak.sh").write_text(
        f"#!/bin/sh\necho $LIFECYCLE_EVENT $DEPLOYMENT_ID\nsleep 60 &\necho $! > {tmp_path}/pid\n"
    )
    (rev / "hooks" / "leak.sh").chmod(0o755)
    runner = CodeDeployRunner(local_execute, tmp_path / "root", python=VENV_PY)
    t = time.monotonic()
    dep = runner.deploy(rev, deployment_id="d-LEAK")
    assert time.monotonic() - t < 10
    assert dep.failed is not None and dep.failed.timed_out
    assert "BeforeInstall d-LEAK" in dep.failed.output
    pid = int((tmp_path / "pid").read_text())
    wait_for(lambda: not running(pid), 5, "the leaked child to be killed")


# -- the headline: a real Airflow 3 cluster ------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, aws_server, imds_server):
    from sandbox.airflow_cluster import AirflowCluster

    aws_server.reset()
    c = AirflowCluster(tmp_path_factory.mktemp("airflow-shared"), aws_server, imds_server)
    c.start()
    c.start_core()
    yield c
    c.stop()


@pytest.mark.timeout(600)
def test_headline_deploy_with_tasks_in_flight_kills_nothing(cluster, tmp_path):
    """4 tasks x 20 s running on the one worker (concurrency 4); a CodeDeploy deployment of a
    new bundle through the real appspec: every task ends success on try 1, the drain ends
    right after the last task, and a run triggered afterwards runs the new bundle's code."""
    from sandbox.airflow_cluster import dag_source

    c = cluster
    runner = CodeDeployRunner(host_execute(c.host), c.shared / "cd-root", group="workers")
    rev1 = make_revision(c.shared / "rev1", {"dags/headline.py": dag_source("v1")})
    first = runner.deploy(rev1, deployment_id="d-V1")
    assert first.succeeded, first.message
    assert "DAG import check: no import errors" in first.event("AfterInstall")[0].output
    c.wait_dag("headline")

    c.trigger("headline", "before", {"seconds": 20})
    wait_for(
        lambda: len([f for f in c.out_files() if f.startswith("before.")]) == 4,
        90,
        "all four tasks to start on the worker",
        interval=0.5,
    )
    time.sleep(3)
    seen = {}

    def between(event):
        if event == "ApplicationStop":
            seen["at"] = time.time()
            seen["drain"] = json.loads(c.host.read_file("/var/lib/airflow-agent/drain.json"))
            seen["worker"] = c.host.unit_property("airflow-worker", "ActiveState")

    rev2 = make_revision(c.shared / "rev2", {"dags/headline.py": dag_source("v2")})
    dep = runner.deploy(rev2, deployment_id="d-V2", between=between)
    assert dep.succeeded, dep.message
    assert seen["worker"] == "inactive"
    assert c.wait_run("headline", "before") == "success"
    tis = c.task_instances("headline", "before")
    assert [(t["task_id"], t["state"], t["try_number"]) for t in tis] == [
        (f"t{i}", "success", 1) for i in range(4)
    ]
    files = {k: v for k, v in c.out_files().items() if k.startswith("before.")}
    assert sorted(files) == [f"before.t{i}.1" for i in range(4)]  # no second try anywhere
    for lines in files.values():
        assert [ln.split()[:2] for ln in lines] == [["start", "v1"], ["end", "v1"]]
    last_end = max(float(lines[1].split()[2]) for lines in files.values())
    drain = seen["drain"]
    assert drain["phase"] == "stopped" and [q["name"] for q in drain["queues"]] == ["default"]
    # "the last task finished": the worker's Celery task returned (Airflow's supervisor
    # reports the state, then returns; the slot is free only then)
    celery_done = max(c.celery_done_times())
    idle_after = drain["idle_at"] - celery_done
    stopped_after = drain["stopped_at"] - celery_done
    print(
        f"\nheadline: task code ended {celery_done - last_end:.2f}s before its Celery task "
        f"returned; drain saw the worker idle {idle_after:.2f}s and the unit stopped "
        f"{stopped_after:.2f}s after that; ApplicationStop took "
        f"{dep.event('ApplicationStop')[0].seconds:.1f}s"
    )
    assert -0.5 <= idle_after < 2.0, drain
    assert stopped_after < 2.0 + 5.0, drain  # + the idle Airflow worker's warm shutdown (~3 s)

    # the new bundle is what runs now
    assert c.host.read_file("/airflow/.deployed-revision") == b"d-V2\n"
    c.trigger("headline", "after", {"seconds": 1})
    assert c.wait_run("headline", "after", timeout=120) == "success"
    after = {k: v for k, v in c.out_files().items() if k.startswith("after.")}
    assert len(after) == 4
    assert all(v[0].split()[1] == "v2" for v in after.values()), after


@pytest.mark.timeout(400)
def test_scheduler_role_keeps_its_units_for_dags_and_restarts_them_for_plugins(cluster):
    """The hooks on a scheduler: a DAG-only bundle leaves its units running (same MainPIDs);
    one that adds a plugin restarts each of them, saying why; ValidateService waits for
    `airflow jobs check --job-type SchedulerJob --local`."""
    c = cluster
    units = ["airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"]
    cfg = json.loads(c.host.read_file("/etc/airflow-agent/agent.yaml"))
    cfg["role"] = {"override": "scheduler"}
    c.host.write_file("/etc/airflow-agent/scheduler.yaml", json.dumps(cfg))
    worker_before = c.host.unit_property("airflow-worker", "ActiveState")

    def hook(event, deployment):
        env = {"AIRFLOW_AGENT_CONFIG": "/etc/airflow-agent/scheduler.yaml"}
        p = c.host.run(
            ["airflow-agent", "deploy-hook"],
            env={**env, "LIFECYCLE_EVENT": event, "DEPLOYMENT_ID": deployment},
            check=False,
            timeout=300,
        )
        assert p.returncode == 0, (event, p.stdout, p.stderr)
        return p.stderr

    def deployment(deployment_id, files):
        """The events in CodeDeploy's order, the bundle's files landing at Install."""
        out = hook("ApplicationStop", deployment_id) + hook("BeforeInstall", deployment_id)
        for path, text in files.items():
            c.host.write_file(path, text)
        out += hook("ApplicationStart", deployment_id)
        return out + hook("ValidateService", deployment_id)

    def pids():
        return {u: c.host.main_pid(u) for u in units}

    # units not running are started (the cluster runs only some of them)
    inactive = [u for u in units if c.host.unit_property(u, "ActiveState") != "active"]
    out = deployment("d-S0", {})
    for unit in inactive:
        assert f"started {unit} (it was inactive)" in out, out
    assert all(c.host.unit_property(u, "ActiveState") == "active" for u in units)

    before = pids()
    out = deployment("d-S1", {"/airflow/dags/only_a_dag.py": "# a DAG-only change\n"})
    assert "role=scheduler" in out and "kept running, nothing they load changed" in out, out
    assert "this deployment changed: dags" in out, out
    assert pids() == before
    assert "scheduler job alive" in out

    plugin_file = "/airflow/plugins/deploy_test_plugin.py"
    plugin = "from airflow.plugins_manager import AirflowPlugin\n\n\nclass P(AirflowPlugin):\n"
    out = deployment("d-S2", {plugin_file: plugin + "    name = 'p'\n"})
    for unit in units:
        assert f"restarting {unit}: the bundle changed plugins" in out, out
    # in the role's fleet-wide restart slot (through the cluster's metadata database)
    assert "restart slot scheduler 0/1 held" in out and "restart slot scheduler 0/1 released" in out
    restarted = pids()
    assert all(restarted[u] != before[u] for u in units), (before, restarted)
    assert "scheduler job alive" in out

    # the record follows the restarted processes: the next DAG-only bundle restarts nothing
    out = deployment("d-S3", {"/airflow/dags/only_a_dag.py": "# another DAG-only change\n"})
    assert "kept running, nothing they load changed" in out and pids() == restarted, out
    c.host.run(["rm", "-f", plugin_file, "/airflow/dags/only_a_dag.py"])
    # the worker is not a scheduler's business
    assert c.host.unit_property("airflow-worker", "ActiveState") == worker_before


def test_after_install_fails_on_a_dag_import_error_with_one_line(make_config, run_agent, tmp_path):
    # The real Airflow CLI (`dags list-import-errors --local`) on a bundle with a broken DAG.
    from sandbox.airflow_cluster import AIRFLOW

    home = tmp_path / "airflow"
    (home / "dags").mkdir(parents=True)
    (home / "dags" / "good.py").write_text("from airflow.sdk import dag\nx = 1\n")
    env_file = tmp_path / "airflow.env"
    env_file.write_text(
        f"AIRFLOW_HOME={home}\nAIRFLOW__CORE__LOAD_EXAMPLES=False\n"
        f"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=sqlite:///{tmp_path}/airflow.db\n"
    )
    import os
    import subprocess

    from agent.platform.envfile import parse_env

    env = dict(os.environ, **parse_env(env_file.read_bytes()))
    subprocess.run([str(AIRFLOW), "db", "migrate"], env=env, check=True, capture_output=True)
    cfg = make_config(
        {
            "role": {"override": "worker"},
            "airflow_home": str(home),
            "env": {"file": str(env_file)},
            "deploy": {"owner": "root", "group": "root", "airflow_command": [str(AIRFLOW)]},
        }
    )
    ok = run_agent(cfg, "deploy-hook", "AfterInstall")
    assert ok.returncode == 0, ok.stderr
    assert "DAG import check: no import errors" in ok.stderr
    (home / "dags" / "bad.py").write_text("from airflow.sdk import dag\nimport nonexistent_mod\n")
    bad = run_agent(cfg, "deploy-hook", env={"LIFECYCLE_EVENT": "AfterInstall"})
    assert bad.returncode == 1
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("ERROR agent: the bundle has 1 DAG import error(s); first: ")
    assert "bad.py: ModuleNotFoundError: No module named 'nonexistent_mod'" in last
    # an unknown event is a usage error naming it
    unknown = run_agent(cfg, "deploy-hook", "AfterInstal")
    assert unknown.returncode == 2 and "unknown lifecycle event 'AfterInstal'" in unknown.stderr


def test_runner_install_follows_codedeploy_file_rules(tmp_path):
    # Install removes the previous revision's files, copies the new ones, and with the
    # default file_exists_behavior (DISALLOW) refuses a file it did not install.
    dest = tmp_path / "dest"

    def rev(name, files, behavior=None):
        d = tmp_path / name
        d.mkdir()
        spec = f"version: 0.0\nos: linux\nfiles:\n  - source: /dags\n    destination: {dest}\n"
        if behavior:
            spec += f"file_exists_behavior: {behavior}\n"
        (d / "appspec.yml").write_text(spec)
        for rel, text in files.items():
            (d / "dags" / rel).parent.mkdir(parents=True, exist_ok=True)
            (d / "dags" / rel).write_text(text)
        return d

    runner = CodeDeployRunner(local_execute, tmp_path / "root", python=VENV_PY)
    assert runner.deploy(rev("r1", {"a.py": "1", "sub/b.py": "1"})).succeeded
    assert (dest / "sub" / "b.py").read_text() == "1"
    (dest / "sub" / "local.txt").write_text("not CodeDeploy's")
    assert runner.deploy(rev("r2", {"a.py": "2"})).succeeded
    assert (dest / "a.py").read_text() == "2" and not (dest / "sub" / "b.py").exists()
    assert (dest / "sub" / "local.txt").exists()  # not ours to delete; its dir stays too
    (dest / "c.py").write_text("hand-copied")
    refused = runner.deploy(rev("r3", {"a.py": "3", "c.py": "3"}))
    assert refused.failed is not None and refused.failed.event == "Install"
    assert "already exists at this location" in refused.failed.output
    assert runner.deploy(rev("r4", {"c.py": "4"}, "OVERWRITE")).succeeded
    assert (dest / "c.py").read_text() == "4"
