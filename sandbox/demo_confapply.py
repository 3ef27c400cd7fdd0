"""`make demo` piece: confapply restarts on a real change and not on an identical rewrite.

Run: `python -m sandbox.demo_confapply` (root; boots the systemd test host). It starts its own
moto and IMDS servers and one SystemdHost, installs the agent the way cfn-init does, bootstraps
the instance as a scheduler, and then:

1. changes an SSM parameter (moto) and runs `airflow-agent env sync` inside the instance:
   confapply restarts each scheduler unit once (new MainPIDs);
2. rewrites the env file with the same content (an atomic replace): no restart.

The Airflow units run STAND-INS (sandbox/agent_host.py): the real unit files with their
`EnvironmentFile=`, but a tiny process that prints a hash of its environment instead of
Airflow. Everything it started (the host, the servers) is stopped at the end, also on error.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sandbox import agent_host as ah  # noqa: E402
from sandbox.aws_server import AwsServer  # noqa: E402
from sandbox.imds_server import ImdsServer  # noqa: E402
from sandbox.systemd_host import SystemdHost  # noqa: E402

UNITS = ["airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"]
CONFAPPLY = "airflow-agent-confapply.service"
ENV_FILE = "/etc/sysconfig/airflow.env"


def say(text: str = "") -> None:
    print(text, flush=True)


def table(host, title: str, before=None) -> dict:
    pids = ah.main_pids(host, UNITS)
    say(f"  {title}")
    for u in UNITS:
        env_hash = "?"
        for line in reversed(host.journal(u + ".service").splitlines()):
            if "environment sha256" in line:
                env_hash = line.rsplit(" ", 1)[-1]
                break
        mark = ""
        if before is not None:
            mark = "  <- restarted" if pids[u] != before[u] else "  (same process)"
        say(f"    {u:<24} MainPID {pids[u]:>5}  env sha256 {env_hash}{mark}")
    return pids


def checks(host) -> int:
    text = host.unit_property(CONFAPPLY, "StatusText")
    for part in text.split(";"):
        if "check(s)" in part:
            return int(part.split()[0])
    return -1


def main() -> int:
    aws = imds = None
    shared = tempfile.mkdtemp(prefix="aea-demo-")
    try:
        aws, imds = AwsServer().start(), ImdsServer().start()

        ssm = aws.client("ssm")
        ah.put_params(ssm, {"FOO": "first", "STANDIN_READY_DELAY": "0"})
        ssm.put_parameter(
            Name=f"{ah.SSM_PATH}core/parallelism", Value="32", Type="String", Overwrite=True
        )
        say("== confapply demo: restart on a real change, not on an identical rewrite ==")
        say("NOTE: the Airflow units below are STAND-INS: the real unit files (EnvironmentFile=,")
        say("      User=airflow, hardening) running a tiny process that prints a hash of the")
        say("      environment it got, instead of Airflow itself.")
        with SystemdHost(shared, name="aea-demo") as host:
            say(
                f"booted a systemd {host.run(['systemctl', '--version']).stdout.split()[1]} "
                f"test instance in {host.boot_seconds:.1f} s; installing the agent ..."
            )
            ah.prepare(host, aws, imds)
            say("$ airflow-agent bootstrap --role scheduler")
            ah.agent(host, aws, imds, "bootstrap", "--role", "scheduler")
            for u in UNITS:
                host.wait_active(u)
            host.wait_active(CONFAPPLY)
            before = table(host, "after bootstrap:")

            say()
            say(
                "$ aws ssm put-parameter --name /airflow/test/core/parallelism --value 64 "
                "--overwrite   (moto)"
            )
            ssm.put_parameter(
                Name=f"{ah.SSM_PATH}core/parallelism", Value="64", Type="String", Overwrite=True
            )
            say("$ airflow-agent env sync")
            n = checks(host)
            out = ah.agent(host, aws, imds, "env", "sync", "--diff")
            say("  " + out.stdout.strip())
            host.wait_for(
                lambda: all(host.main_pid(u) != before[u] for u in UNITS) and checks(host) > n,
                30,
                "the restarts",
            )
            for u in UNITS:  # the new stand-ins' start lines, in the journal
                pid = host.main_pid(u)
                host.wait_for(
                    lambda u=u, pid=pid: f"pid {pid} environment" in host.journal(u + ".service"),
                    10,
                    f"{u}'s start line",
                )
            after = table(host, "after the change (each unit restarted once, in order):", before)
            for line in host.journal(CONFAPPLY).splitlines():
                if "config changed" in line or "applied" in line:
                    say(f"  confapply: {line.split(': ', 1)[-1]}")

            say()
            say("$ rewrite /etc/sysconfig/airflow.env with the same bytes (atomic replace)")
            n = checks(host)
            host.write_file(ENV_FILE, host.read_file(ENV_FILE), mode=0o640, owner="root:airflow")
            host.wait_for(lambda: checks(host) > n, 30, "confapply to look at the rewrite")
            table(
                host, "after the identical rewrite (confapply checked the hash: no restart):", after
            )
            say(f"  confapply status: {host.unit_property(CONFAPPLY, 'StatusText')}")
            say()
            say("$ airflow-agent status")
            for line in ah.agent(host, aws, imds, "status").stdout.splitlines():
                say("  " + line)
        say()
        say("stopped the test instance and the moto/IMDS servers.")
        return 0
    finally:
        for server in (aws, imds):
            if server is not None:
                server.stop()
        with contextlib.suppress(OSError):
            Path(shared).rmdir()


if __name__ == "__main__":
    sys.exit(main())
