"""A real Airflow 3 cluster (CeleryExecutor) on the systemd test host, for tests, demo and bench.

- PostgreSQL 15 (Debian's binaries) and redis-server run as plain processes on the machine's
  loopback, as the `postgres` user / root, ended by PID; their ports are bridged into the
  host's network namespace, so the units reach them on 127.0.0.1 like a VPC endpoint.
  The migrated metadata database is cached as a PGDATA copy under
  .cache/airflow-pgdata-<key> (first run: initdb + `airflow db migrate`, ~1 min; then a copy).
- Inside the host: the project's own units (systemd/, installed by systemd/install-units.sh:
  airflow user, tmpfiles, units), /opt/airflow/venv -> .cache/airflow-venv (Airflow 3.3 +
  the Celery provider, celery 5.6.3), `airflow-agent` from this work tree's venv (it has the
  `worker` extra), /etc/airflow-agent/agent.yaml.
- Settings: SSM parameters in the rig's moto, rendered into /etc/sysconfig/airflow.env by the
  real `airflow-agent-env.service` (`env sync`), the product path.
- Units started: airflow-api-server (Airflow 3 workers run tasks through its execution API),
  airflow-scheduler, airflow-dag-processor, airflow-worker (`airflow celery worker`, node
  celery@<hostname>, queue "default", concurrency 4 so the 4-task DAG runs at once).

Rig-only adaptations (drop-ins, nothing in systemd/ changes): this machine's Python lives in
/root/.pyenv, so the Airflow units get `ProtectHome=no` and /root is made traversable *inside
the host's overlay only*. On an instance the venv's python is /usr/bin/python3.x.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from sandbox.proc import die_with_parent, end_process, wait_for
from sandbox.redis_server import RedisServer, free_port
from sandbox.systemd_host import SystemdHost
from sandbox.tiers import heavy, heavy_names

REPO = Path(__file__).resolve().parents[1]
AIRFLOW_VENV = REPO / ".cache" / "airflow-venv"
AIRFLOW = AIRFLOW_VENV / "bin" / "airflow"
# a test that names the Airflow venv runs Airflow's own code: it is in the airflow tier
heavy_names("airflow", "AIRFLOW_VENV", "AIRFLOW")
PG_BIN = Path("/usr/lib/postgresql/15/bin")
SSM_PATH = "/airflow/test/"
HOSTNAME = "afhost"
NODE = f"celery@{HOSTNAME}"
AIRFLOW_UNITS = ["airflow-api-server", "airflow-scheduler", "airflow-dag-processor"]
WORKER = "airflow-worker"

DROPIN = """\
[Service]
# test rig only: the units run Airflow and the agent from this work tree's venvs (the machine's
# python is under /root/.pyenv, and a CI clone may live under /tmp, which PrivateTmp= would
# hide); the shipped units keep both protections
ProtectHome=no
PrivateTmp=no
"""


def _pg_key() -> str:
    h = hashlib.sha256()
    for p in sorted(
        (AIRFLOW_VENV / "lib").glob("python*/site-packages/apache_airflow-*.dist-info")
    ):
        h.update(p.name.encode())
    h.update((PG_BIN / "postgres").read_bytes()[:4096])
    return h.hexdigest()[:12]


def _as_postgres():
    pw = pwd.getpwnam("postgres")

    def preexec() -> None:
        die_with_parent()  # a server the rig started must not outlive a killed test run
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)

    return preexec, pw


@heavy("airflow")
class Postgres:
    """PostgreSQL 15 on 127.0.0.1:port as the postgres user; trust auth, database `airflow`."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="aea-pg-"))
        self.data = self.dir / "data"
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/airflow"

    def _chown(self) -> None:
        _, pw = _as_postgres()
        for dp, dns, fns in os.walk(self.dir):
            for n in [dp] + [os.path.join(dp, x) for x in dns + fns]:
                os.lchown(n, pw.pw_uid, pw.pw_gid)

    def start(self) -> Postgres:
        cache = REPO / ".cache" / f"airflow-pgdata-{_pg_key()}"
        fresh = not (cache / ".complete").exists()
        if fresh:
            self.data.mkdir(parents=True)
            self._chown()
            preexec, _ = _as_postgres()
            subprocess.run(
                [
                    str(PG_BIN / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ],
                check=True,
                preexec_fn=preexec,
                capture_output=True,
            )
        else:
            shutil.copytree(cache, self.data, symlinks=True)
            (self.data / ".complete").unlink()
            self._chown()
            os.chmod(self.data, 0o700)
        self._run()
        if fresh:
            self.psql("postgres", "CREATE DATABASE airflow")
            env = dict(
                os.environ,
                AIRFLOW_HOME=str(self.dir / "home"),
                AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=self.url,
                AIRFLOW__CORE__LOAD_EXAMPLES="False",
            )
            subprocess.run(
                [str(AIRFLOW), "db", "migrate"],
                check=True,
                env=env,
                capture_output=True,
                timeout=600,
            )
            self._stop_server()
            tmp = cache.with_name(cache.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(self.data, tmp, symlinks=True)
            (tmp / ".complete").write_text("ok\n")
            shutil.rmtree(cache, ignore_errors=True)
            os.rename(tmp, cache)
            self._run()
        return self

    def _run(self) -> None:
        preexec, _ = _as_postgres()
        log = open(self.dir / "postgres.log", "ab")  # noqa: SIM115 - kept by the child
        self.proc = subprocess.Popen(
            [
                str(PG_BIN / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"unix_socket_directories={self.dir}",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "max_connections=200",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=preexec,
        )
        log.close()
        wait_for(
            lambda: self.proc.poll() is None and self.psql("postgres", "SELECT 1") == "1",
            30,
            f"postgres on {self.port}",
            interval=0.2,
        )

    def psql(self, db: str, sql: str) -> str:
        proc = subprocess.run(
            [
                str(PG_BIN / "psql"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                db,
                "-At",
                "-F",
                "|",
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr)
        return proc.stdout.strip()

    def _stop_server(self) -> None:
        end_process(self.proc, signal.SIGINT, grace=30)  # SIGINT: PostgreSQL's fast shutdown

    def stop(self) -> None:
        self._stop_server()
        shutil.rmtree(self.dir, ignore_errors=True)


def dag_source(version: str, dag_id: str = "headline", tasks: int = 4) -> str:
    """A DAG of `tasks` parallel tasks that sleep conf.seconds (default 20) and leave a
    start/end line naming this bundle's VERSION in /airflow/out (one file per try)."""
    return f'''\
from __future__ import annotations

import datetime
import os
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
        ti = ctx["ti"]
        seconds = float((ctx["dag_run"].conf or {{}}).get("seconds", 20))
        os.makedirs("/airflow/out", exist_ok=True)
        path = "/airflow/out/%s.%s.%s" % (ctx["run_id"].replace(":", "_"), ti.task_id,
                                          ti.try_number)
        with open(path, "a") as f:
            f.write("start %s %.3f %d\\n" % (VERSION, time.time(), os.getpid()))
        time.sleep(seconds)
        with open(path, "a") as f:
            f.write("end %s %.3f\\n" % (VERSION, time.time()))
        return VERSION

    for i in range({tasks}):
        work.override(task_id="t%d" % i)(i)


{dag_id}()
'''


@heavy("airflow", "systemd", "redis")
class AirflowCluster:
    def __init__(
        self,
        shared: Path,
        aws_server,
        imds_server,
        name: str = HOSTNAME,
        worker_concurrency: int = 4,
        agent_config: Optional[dict] = None,
        extra_settings: Optional[Dict[str, str]] = None,
    ):
        self.shared = Path(shared)
        self.aws = aws_server
        self.imds = imds_server
        self.name = name
        self.node = f"celery@{name}"
        self.concurrency = worker_concurrency
        self.agent_config = agent_config or {}
        self.extra_settings = extra_settings or {}
        self.pg = Postgres()
        self.redis = RedisServer()
        self.host = SystemdHost(self.shared, name=name)
        self.api_port = 8080
        self.timings: Dict[str, float] = {}
        self.cli_home = Path(tempfile.mkdtemp(prefix="aea-af-cli-"))

    # -- bring-up ----------------------------------------------------------------------------

    def _t(self, what: str, t0: float) -> None:
        self.timings[what] = round(time.monotonic() - t0, 1)

    def start(self) -> AirflowCluster:
        try:
            t = time.monotonic()
            self.pg.start()
            self._t("postgres", t)
            self.redis.start()
            t = time.monotonic()
            self.host.start()
            for port in (self.pg.port, self.redis.port, self.aws.port, self.imds.port):
                self.host.bridge_port(port)
            self.host.set_default_environment(self.agent_env())
            self._install()
            self._t("host+install", t)
            t = time.monotonic()
            self._settings()
            self.host.systemctl("start", "airflow-agent-env.service")
            self._t("env sync", t)
        except BaseException as exc:
            self._dump(exc)
            self.stop()
            raise
        return self

    def _dump(self, exc: BaseException) -> None:
        """Failed bring-up: put the units' journals in the error (the host is about to go)."""
        if self.host.pid is None:
            return
        try:
            logs = [
                f"--- {u} ---\n{self.host.journal(u)[-3000:]}"
                for u in ["airflow-agent-env"] + AIRFLOW_UNITS + [WORKER]
            ]
            exc.args = (*exc.args, "\n".join(logs))
        except Exception:  # noqa: BLE001 - best effort
            pass

    def agent_env(self) -> Dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.aws.url,
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": self.imds.url + "/",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        }

    def _install(self) -> None:
        h = self.host
        stage = self.shared / "systemd"
        if stage.exists():
            shutil.rmtree(stage)
        shutil.copytree(REPO / "systemd", stage)
        h.run(["sh", str(stage / "install-units.sh"), str(stage)])
        h.run(["mkdir", "-p", "/opt/airflow"])
        h.run(["ln", "-sfn", str(AIRFLOW_VENV), "/opt/airflow/venv"])
        h.run(["ln", "-sfn", str(REPO / ".venv/bin/airflow-agent"), "/usr/local/bin/airflow-agent"])
        h.run(["chmod", "0711", "/root"])  # inside the overlay only: see the module docstring
        for unit in AIRFLOW_UNITS + [
            WORKER,
            "airflow-triggerer",
            "airflow-agent-env",
            "airflow-agent-task-credentials",
        ]:
            h.write_file(
                f"/etc/systemd/system/{unit}.service.d/50-rig.conf",
                DROPIN,
            )
        h.systemctl("daemon-reload")

    def airflow_settings(self) -> Dict[str, str]:
        """SSM parameter (relative name) -> value: the cluster's whole Airflow config."""
        db = self.pg.url
        return {
            "core/executor": "CeleryExecutor",
            "core/load_examples": "False",
            "core/dags_are_paused_at_creation": "False",
            "core/execution_api_server_url": f"http://127.0.0.1:{self.api_port}/execution/",
            "core/simple_auth_manager_all_admins": "True",
            "database/sql_alchemy_conn": db,
            "celery/broker_url": self.redis.url,
            "celery/result_backend": "db+" + db,
            "celery/worker_concurrency": str(self.concurrency),
            "api/port": str(self.api_port),
            "api/host": "127.0.0.1",
            "api/workers": "1",
            "api_auth/jwt_secret": "rig-" + secrets.token_hex(16),
            "dag_processor/refresh_interval": "5",
            "dag_processor/min_file_process_interval": "5",
            "scheduler/scheduler_heartbeat_sec": "2",
            "logging/logging_level": "INFO",
        }

    def _settings(self) -> None:

        ssm = self.aws.client("ssm")
        for rel, value in {**self.airflow_settings(), **self.extra_settings}.items():
            ssm.put_parameter(Name=SSM_PATH + rel, Value=value, Type="SecureString", Overwrite=True)
        cfg = {
            "cluster": "test",
            "airflow_home": "/airflow",
            "role": {"override": "worker"},
            "env": {
                "ssm_paths": [SSM_PATH],
                "group": "airflow",
                "static": {"AIRFLOW_HOME": "/airflow"},
            },
            "imds": {"timeout": 1.0, "attempts": 2},
            "drain": {"timeout": 300},
            "deploy": {"validate_timeout": 120},
        }
        for k, v in self.agent_config.items():
            cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
        self.host.write_file("/etc/airflow-agent/agent.yaml", json.dumps(cfg, indent=1))

    def start_core(self, timeout: float = 120) -> None:
        """api-server, scheduler, dag-processor; waits for the api-server's health."""
        t = time.monotonic()
        try:
            self.host.systemctl("start", *[u + ".service" for u in AIRFLOW_UNITS])
            for u in AIRFLOW_UNITS:
                self.host.wait_active(u, timeout)
            wait_for(self._api_healthy, timeout, "the api-server's health endpoint", interval=0.5)
        except BaseException as exc:
            self._dump(exc)
            raise
        self._t("core units", t)

    def _api_healthy(self) -> bool:
        proc = self.host.run(
            [
                "python3",
                "-c",
                "import urllib.request,sys;"
                f"r=urllib.request.urlopen('http://127.0.0.1:{self.api_port}"
                "/api/v2/monitor/health',timeout=3);sys.exit(r.status!=200)",
            ],
            check=False,
            timeout=20,
        )
        return proc.returncode == 0

    def stop(self) -> None:
        errors = []
        for fn in (self.host.stop, self.redis.stop, self.pg.stop):
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - stop the rest, then report
                errors.append(f"{fn.__qualname__}: {exc}")
        shutil.rmtree(self.cli_home, ignore_errors=True)
        if errors:
            raise RuntimeError("; ".join(errors))

    # -- driving it --------------------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """The Airflow CLI on the machine, against the cluster's database."""
        env = dict(
            os.environ,
            AIRFLOW_HOME=str(self.cli_home),
            AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=self.pg.url,
            AIRFLOW__CORE__LOAD_EXAMPLES="False",
            AIRFLOW__CORE__EXECUTOR="CeleryExecutor",
            AIRFLOW__CELERY__BROKER_URL=self.redis.url,
        )
        return subprocess.run(
            [str(AIRFLOW), *args], capture_output=True, text=True, env=env, timeout=timeout
        )

    def wait_dag(self, dag_id: str, timeout: float = 120) -> None:
        wait_for(
            lambda: (
                self.pg.psql(
                    "airflow", f"SELECT 1 FROM dag WHERE dag_id='{dag_id}' AND is_stale = false"
                )
                == "1"
            ),
            timeout,
            f"DAG {dag_id} to be parsed",
            interval=1,
        )

    def trigger(self, dag_id: str, run_id: str, conf: Optional[dict] = None) -> None:
        proc = self.cli(
            "dags", "trigger", dag_id, "--run-id", run_id, "--conf", json.dumps(conf or {})
        )
        if proc.returncode != 0:
            raise RuntimeError(f"trigger failed: {proc.stdout}\n{proc.stderr}")

    def task_instances(self, dag_id: str, run_id: str) -> List[dict]:
        rows = self.pg.psql(
            "airflow",
            "SELECT task_id, state, try_number, extract(epoch from start_date), "
            "extract(epoch from end_date) FROM task_instance "
            f"WHERE dag_id='{dag_id}' AND run_id='{run_id}' ORDER BY task_id",
        )
        out = []
        for line in rows.splitlines():
            tid, state, tn, start, end = line.split("|")
            out.append(
                {
                    "task_id": tid,
                    "state": state or None,
                    "try_number": int(tn or 0),
                    "start": float(start) if start else None,
                    "end": float(end) if end else None,
                }
            )
        return out

    def run_state(self, dag_id: str, run_id: str) -> str:
        return self.pg.psql(
            "airflow", f"SELECT state FROM dag_run WHERE dag_id='{dag_id}' AND run_id='{run_id}'"
        )

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 300) -> str:
        return wait_for(
            lambda: (s := self.run_state(dag_id, run_id)) in ("success", "failed") and s,
            timeout,
            f"run {run_id} to finish",
            interval=1,
        )

    def out_files(self) -> Dict[str, List[str]]:
        """/airflow/out/<run>.<task>.<try> -> lines (what the task code wrote)."""
        proc = self.host.run(
            [
                "sh",
                "-c",
                "cd /airflow/out 2>/dev/null && "
                'for f in *; do [ -f "$f" ] && printf \'==%s\\n\' "$f" && '
                'cat "$f"; done; true',
            ]
        )
        out: Dict[str, List[str]] = {}
        cur = None
        for line in proc.stdout.splitlines():
            if line.startswith("=="):
                cur = line[2:]
                out[cur] = []
            elif cur is not None:
                out[cur].append(line)
        return out

    def celery_done_times(self) -> List[float]:
        """When the worker finished each Celery task (its `succeeded in`/`failed`/`raised`
        log lines, journald's receive time): the moment the slot is free again."""
        out = self.host.run(
            ["journalctl", "-u", WORKER, "-o", "short-unix", "--no-pager", "-q"], check=False
        ).stdout
        return [
            float(line.split()[0])
            for line in out.splitlines()
            if "Task execute_workload[" in line
            and any(w in line for w in (" succeeded in ", " raised ", " failed"))
        ]

    def running_tasks(self, dag_id: str, run_id: str) -> int:
        return sum(1 for ti in self.task_instances(dag_id, run_id) if ti["state"] == "running")
