"""`make demo`: cloudformation/airflow-cluster.yaml launched locally (sandbox/demo_stack.py):
what the template created, what each instance did, a deployment with tasks in flight, a stack
update, a scale-in, with figures. Everything started here is stopped here.

`python -m sandbox.demo parts` runs the earlier single-instance demo instead: `env sync` on
embedded AWS + strict IMDSv2 with a realistic parameter set (values redacted, a change shown as
a diff, a refused suspicious result), then confapply restarts and a CodeDeploy drain on one
sandbox instance (sandbox/demo_confapply.py, sandbox/demo_deploy.py).
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from agent.platform.envfile import parse_env
from sandbox.aws_server import AwsServer
from sandbox.imds_server import ImdsServer

REPO = Path(__file__).resolve().parents[1]

PARAMETERS = [
    ("core/executor", "CeleryExecutor", "String"),
    ("core/parallelism", "64", "String"),
    ("core/load_examples", "False", "String"),
    ("core/fernet_key", "q6Jt1bS0m8pYQ0ufm3oO9E2mQk4q3d8Xv7c2Zr1yW5A=", "SecureString"),
    (
        "database/sql_alchemy_conn",
        "postgresql+psycopg2://airflow:Pg$ecret`pw@db.internal:5432/airflow",
        "SecureString",
    ),
    ("celery/broker_url", "redis://:r3dis-Secret@redis.internal:6379/0", "SecureString"),
    (
        "celery/result_backend",
        "db+postgresql://airflow:Pg$ecret`pw@db.internal/airflow",
        "SecureString",
    ),
    ("celery/worker_concurrency", "16", "String"),
    ("logging/remote_logging", "True", "String"),
    ("logging/remote_base_log_folder", "s3://demo-airflow-logs/logs", "String"),
    ("api/base_url", "https://airflow.example.internal", "String"),
    ("env/TZ", "UTC", "String"),
    ("env/BANNER", 'multi-line "quoted" value\nwith $dollar and \\ backslash', "String"),
]


def banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 70 - len(text)), flush=True)


def run_agent(cfg: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "agent", "--config", str(cfg), *args]
    print("$ airflow-agent " + " ".join(args), flush=True)
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=str(REPO))
    for line in (proc.stdout + proc.stderr).splitlines():
        print("  " + line)
    print(f"  (exit {proc.returncode})", flush=True)
    return proc


def show_redacted(path: Path) -> None:
    values = parse_env(path.read_bytes())
    mode = oct(os.stat(path).st_mode & 0o777)
    print(f"  {path} (mode {mode}, {len(values)} variables; values redacted):")
    for name in sorted(values):
        print(f"    {name}=<{len(values[name])} chars>")


def env_sync_demo(aws: AwsServer, imds: ImdsServer, work: Path) -> None:

    banner("1. SSM Parameter Store -> /etc/sysconfig/airflow.env (sandboxed)")
    ssm = aws.client("ssm")
    for key, value, kind in PARAMETERS:
        ssm.put_parameter(Name=f"/airflow/demo/{key}", Value=value, Type=kind, Overwrite=True)
    print(
        f"  seeded {len(PARAMETERS)} parameters under /airflow/demo/ "
        f"({sum(1 for p in PARAMETERS if p[2] == 'SecureString')} SecureString)"
    )
    cfg = work / "agent.yaml"
    cfg.write_text(
        json.dumps(
            {
                "cluster": "demo",
                "state_dir": str(work / "state"),
                "env": {
                    "file": str(work / "sysconfig" / "airflow.env"),
                    "ssm_paths": ["/airflow/demo/"],
                    "group": "root",
                    "required": ["AIRFLOW__CORE__FERNET_KEY"],
                },
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(aws.client_env())
    env.update(imds.client_env())
    env.pop("AWS_REGION")
    env.pop("AWS_DEFAULT_REGION")
    env["PYTHONPATH"] = str(REPO)
    print("  (no region configured: the agent asks the strict IMDSv2 server for it)")
    run_agent(cfg, env, "env", "sync", "--diff")
    show_redacted(work / "sysconfig" / "airflow.env")

    banner("2. one parameter changes")
    ssm.put_parameter(
        Name="/airflow/demo/celery/worker_concurrency", Value="32", Type="String", Overwrite=True
    )
    run_agent(cfg, env, "env", "sync", "--diff")

    banner("3. nothing changed: nothing is written")
    run_agent(cfg, env, "env", "sync", "--diff")

    banner("4. a suspicious result keeps the last good file")
    ssm.delete_parameters(Names=[f"/airflow/demo/{k}" for k, _, _ in PARAMETERS[:6]])
    before = (work / "sysconfig" / "airflow.env").read_bytes()
    run_agent(cfg, env, "env", "sync")
    same = before == (work / "sysconfig" / "airflow.env").read_bytes()
    print(f"  env file byte-identical after the refused sync: {same}")


def main() -> int:
    if sys.argv[1:] == ["parts"]:
        return parts()
    from sandbox import demo_stack

    return demo_stack.main()


def parts() -> int:
    work = Path(tempfile.mkdtemp(prefix="airflow-agent-demo-"))
    try:
        with AwsServer() as aws, ImdsServer() as imds:
            print(f"embedded AWS (moto + our wrapper) at {aws.url}; strict IMDSv2 at {imds.url}")
            env_sync_demo(aws, imds, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # the sandbox-instance parts, each in its own module
    for module in ("sandbox.demo_confapply", "sandbox.demo_deploy"):
        try:
            part = importlib.import_module(module)
        except ModuleNotFoundError:
            continue
        rc = part.main()
        if rc:
            return rc
    banner("done: every server and sandbox this demo started has been stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
