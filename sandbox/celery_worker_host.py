"""A plain Celery worker as `airflow-worker.service` inside the systemd test host.

For the drain tests: redis-server runs on the machine's loopback and is bridged into the
host's network namespace; the worker (sandbox/celery_app.py, Airflow's delivery settings)
runs as a real unit with KillMode=mixed like the product's airflow-worker unit, reading its
broker from the same EnvironmentFile the agent reads. The agent runs inside the host too
(`run_agent`), from this work tree's venv, which the host sees through its overlay.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from sandbox import celery_app
from sandbox.proc import wait_for
from sandbox.redis_server import RedisServer
from sandbox.systemd_host import SystemdHost
from sandbox.tiers import heavy

REPO = Path(__file__).resolve().parents[1]
VENV_PY = str(Path(sys.executable))
NODE_HOST = "drainhost"
NODE = f"celery@{NODE_HOST}"

UNIT = """\
[Unit]
Description=test Celery worker (Airflow's delivery settings)

[Service]
Type=simple
EnvironmentFile={env_file}
Environment=PYTHONPATH={repo} {task_dir_env}={tasks}
WorkingDirectory={repo}
ExecStart={venv_bin}/celery -A sandbox.celery_app worker -n celery@%H -Q {queues} \
-c {concurrency} --without-gossip --without-mingle --without-heartbeat -l INFO
KillMode=mixed
TimeoutStopSec=300
"""


@heavy("systemd", "redis")
class CeleryWorkerHost:
    def __init__(self, shared: Path, queues: str = "default,q2", concurrency: int = 2):
        self.shared = Path(shared)
        self.queues = queues
        self.concurrency = concurrency
        self.redis = RedisServer()
        self.host = SystemdHost(self.shared, name=NODE_HOST)
        self.env_file = self.shared / "airflow.env"
        self.tasks = self.shared / "tasks"
        self._n = 0

    def start(self) -> CeleryWorkerHost:
        self.redis.start()
        try:
            self.host.start()
            self.host.bridge_port(self.redis.port)
            self.tasks.mkdir(exist_ok=True)
            os.chmod(self.tasks, 0o777)
            self.write_env(self.redis.url)
            self.host.write_file(
                "/etc/systemd/system/airflow-worker.service",
                UNIT.format(
                    env_file=self.env_file,
                    repo=REPO,
                    task_dir_env=celery_app.TASK_DIR_ENV,
                    tasks=self.tasks,
                    venv_bin=Path(VENV_PY).parent,
                    queues=self.queues,
                    concurrency=self.concurrency,
                ),
            )
            self.host.systemctl("daemon-reload")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        try:
            self.host.stop()
        finally:
            self.redis.stop()

    # -- per test ------------------------------------------------------------------------------

    def write_env(self, broker_url: str, extra: Optional[Dict[str, str]] = None) -> None:
        lines = [f"AIRFLOW__CELERY__BROKER_URL={broker_url}"]
        lines += [f"{k}={v}" for k, v in (extra or {}).items()]
        self.env_file.write_text("\n".join(lines) + "\n")
        os.chmod(self.env_file, 0o600)

    def fresh(self, drain: Optional[dict] = None) -> Path:
        """Reset broker, task records and state; worker running and answering; a new agent.yaml."""
        self._n += 1
        self.host.systemctl("stop", "airflow-worker")
        self.host.systemctl("reset-failed", "airflow-worker", check=False)
        self.write_env(self.redis.url)
        self.client().flushall()
        for f in self.tasks.glob("*"):
            f.unlink()
        self.host.systemctl("start", "airflow-worker")
        self.wait_consuming()
        cfg = {
            "cluster": "test",
            "state_dir": str(self.shared / f"state-{self._n}"),
            "env": {"file": str(self.env_file), "ssm_paths": ["/airflow/test/"]},
            "drain": {"worker_unit": "airflow-worker", "timeout": 120, **(drain or {})},
        }
        path = self.shared / f"agent-{self._n}.yaml"
        path.write_text(json.dumps(cfg))
        return path

    def client(self):
        import redis

        return redis.Redis.from_url(self.redis.url)

    def control(self, node: str = NODE):
        from agent.worker.celery_control import BrokerSettings, WorkerControl

        return WorkerControl(BrokerSettings(self.redis.url, {}), node)

    def consuming(self) -> List[str]:
        with self.control() as c:
            return sorted(q.name for q in c.active_queues())

    def wait_consuming(self, timeout: float = 30) -> None:
        want = sorted(self.queues.split(","))
        wait_for(
            lambda: self.consuming() == want, timeout, f"{NODE} to consume {want}", interval=0.3
        )

    def submit(self, key: str, seconds: float, queue: str = "default") -> None:
        celery_app.submit(self.redis.url, key, seconds, queue)

    def records(self) -> Dict[str, List[str]]:
        """key -> ['start', 'end', ...] in order."""
        return celery_app.records(self.tasks)

    def times(self, key: str, what: str) -> List[float]:
        return celery_app.times(self.tasks, key, what)

    def started(self, n: int, timeout: float = 20) -> None:
        wait_for(
            lambda: sum(r.count("start") for r in self.records().values()) >= n,
            timeout,
            f"{n} task(s) to start",
            interval=0.1,
        )

    def queued(self) -> int:
        """Messages waiting in the broker (queues + Redis' unacked hash)."""
        r = self.client()
        n = sum(r.llen(q) for q in self.queues.split(","))
        return n + r.hlen("unacked")

    def run_agent(self, config: Path, *args: str, timeout: float = 120, check: bool = False):
        t = time.monotonic()
        proc = self.host.run(
            [VENV_PY, "-m", "agent", "--config", str(config), *args],
            env={"PYTHONPATH": str(REPO)},
            check=check,
            timeout=timeout,
        )
        proc.elapsed = time.monotonic() - t  # type: ignore[attr-defined]
        return proc

    def state(self, config: Path) -> dict:
        state_dir = Path(json.loads(config.read_text())["state_dir"])
        try:
            return json.loads((state_dir / "drain.json").read_text())
        except FileNotFoundError:
            return {}

    def active_state(self) -> str:
        return self.host.unit_property("airflow-worker", "ActiveState")
