"""`make demo`: cloudformation/airflow-cluster.yaml launched locally, its story told with figures.

1. the stack: what the template created in the embedded AWS, what stands in for the rest;
2. each instance: built by its launch template's UserData (cfn-init's configSet), how long it
   took, what runs on it;
3. the admin logs in (one password, from the template's secret) on both api-servers;
4. a CodeDeploy deployment with tasks in flight on a worker: drained, none killed;
5. a stack update (ConfigRevision + one Airflow setting) through every instance's cfn-hup;
6. a worker scale-in through the termination lifecycle hook;
7. what IAM refused (nothing, with the real template); everything started is ended.
Run alone: `python -m sandbox.demo_stack` (root; a few minutes).
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from sandbox.stack.airflow_api import AirflowApi
from sandbox.stack.launch import Stack
from sandbox.stack.model import StackModel
from sandbox.stack.scenario import (
    DAG,
    admin_credentials,
    deploy_everywhere,
    revision,
    service_pids,
    updated_template,
)

WORKERS = 1


def say(text: str = "") -> None:
    print(text, flush=True)


def banner(text: str) -> None:
    say(f"\n=== {text} " + "=" * max(3, 86 - len(text)))


def created(stack: Stack) -> None:
    banner("1. the template in the embedded AWS")
    counts = Counter(t for _rid, t, _pid in stack.report.created)
    for rtype, n in sorted(counts.items()):
        say(f"  {n:3d} x {rtype}")
    say("  stood in for / not created:")
    for rid, rtype, why in stack.report.skipped:
        say(f"    {rid} ({rtype}): {why}")


def instances(stack: Stack) -> None:
    banner("2. the instances, each built by its launch template's UserData")
    say(f"  {'instance':<20} {'role':<10} {'address':<12} {'boot':>5}  active units")
    for m in stack.members:
        out = m.instance.run(
            ["systemctl", "list-units", "--no-legend", "--plain", "--state=active",
             "airflow-*.service", "cfn-hup.service"], check=False,
        ).stdout  # fmt: skip
        units = [ln.split()[0].removesuffix(".service") for ln in out.splitlines() if ln]
        say(
            f"  {m.instance_id:<20} {m.role:<10} {m.instance.address:<12} "
            f"{stack.timings.get(m.name, 0):4.0f}s  {' '.join(units)}"
        )


def main() -> int:
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="aea-demo-stack-"))
    # one worker: every step is shown on the smallest stack with each role and both
    # api-servers (the suite's tests/test_stack_launch.py runs two workers)
    stack = Stack(workers=WORKERS, run_dir=work / "run")
    try:
        banner("0. launching cloudformation/airflow-cluster.yaml (example parameters)")
        stack.up()
        created(stack)
        instances(stack)

        banner("3. the admin logs in on every api-server with the template's password")
        user, password = admin_credentials(stack)
        scheduler = stack.role_members("scheduler")[0]
        port = stack.model.prop("ApiServerTargetGroup", "Port")
        for m in stack.role_members("webserver"):
            AirflowApi(scheduler, f"http://{m.instance.address}:{port}").login(user, password)
            say(f"  {user} logged in on {m.instance.address}:{port}")
        api = AirflowApi(scheduler, f"http://{stack.model.endpoints()['LoadBalancer']}")
        api.login(user, password)
        say("  ... and through the load balancer's DNS name")

        banner("4. a deployment while tasks run on a worker")
        t = time.monotonic()
        first = deploy_everywhere(stack, revision(work / "v1", "v1"), "d-V1")
        ok = sum(d.succeeded for d in first.values())
        say(f"  bundle v1 on {ok} instances ({time.monotonic() - t:.0f}s)")
        api.wait_dag(DAG)
        api.trigger(DAG, "inflight", {"seconds": 30})
        running = api.wait_running(DAG, "inflight", 2)
        say(f"  {len(running)} tasks running; a live log line, via the api-server:")
        log = api.task_log(DAG, "inflight", running[0]["task_id"])
        line = next((ln for ln in log.splitlines() if "sandbox task" in ln), log[-200:])
        say(f"    {line.strip()[:120]}")
        t = time.monotonic()
        pids = service_pids(stack)
        # workers first (the DeploymentOrder output): their drain meets the running tasks
        second = deploy_everywhere(stack, revision(work / "v2", "v2"), "d-V2")
        for name, dep in second.items():
            stop = [e for e in dep.events if e.event == "ApplicationStop"]
            secs = stop[0].seconds if stop else 0.0
            say(f"  {name:<18} {'ok' if dep.succeeded else 'FAILED'}  ApplicationStop {secs:5.1f}s")
            waited = [ln for e in stop for ln in e.output.splitlines() if "task(s) running" in ln]
            if waited:  # the drain's first count of the tasks it waited for
                say(f"    {waited[0].split(': ', 1)[-1].strip()[:110]}")
        say(f"  deployment v2: {time.monotonic() - t:.0f}s")
        kept = sum(pids[k] == pid for k, pid in service_pids(stack).items())
        say(f"  a DAG-only bundle: {kept} of {len(pids)} scheduler/api-server units kept running")
        api.wait_run(DAG, "inflight")
        tis = api.task_instances(DAG, "inflight")
        say(
            "  in-flight tasks: "
            + ", ".join(f"{t['task_id']} {t['state']} try {t['try_number']}" for t in tis)
        )

        banner("5. Variables from the template's secret")
        stack.aws.client("secretsmanager").put_secret_value(
            SecretId=stack.model.ref("VariablesSecret"),
            SecretString='{"greeting": "hello from the stack"}',
        )
        sched = stack.role_members("scheduler")[0]
        sched.instance.run(["systemctl", "start", "airflow-agent-variables.service"], timeout=300)
        say(f"  Airflow Variable greeting = {api.variable('greeting')!r}")

        banner("6. a stack update: ConfigRevision + [core] dagbag_import_timeout")
        result = stack.update(StackModel.load(updated_template(work), workers=WORKERS))
        for rid, what in result["changed"]:
            say(f"  AWS: {rid}: {what}")
        for name, hook in result["hooks"].items():
            say(f"  {name:<18} cfn-hup hook rc {hook['rc']}")

        banner("7. a worker scale-in through the termination lifecycle hook")
        worker = stack.role_members("worker")[-1]
        t = time.monotonic()
        stack.scale_in(worker)
        done = [
            a for a in stack.aws.lifecycle_actions()
            if a["params"].get("InstanceId") == worker.instance_id
        ]  # fmt: skip
        say(
            f"  {worker.instance_id}: drained, {len(done)} lifecycle call(s) "
            f"({', '.join(a['action'] for a in done)}) in {time.monotonic() - t:.0f}s"
        )
        stack.remove(worker)

        banner("8. IAM")
        denials = stack.aws.denials()
        say(f"  requests refused by the instance roles' policies: {len(denials)}")
        for d in denials:
            say(f"    {d['message']}")
        return 0 if not denials else 1
    finally:
        stack.down()
        stack.cleanup_run_dir()
        banner(f"done in {time.monotonic() - t0:.0f}s: everything this demo started is ended")


if __name__ == "__main__":
    sys.exit(main())
