"""Real parts for the lifecycle tests: a redis-server, a plain Celery worker, a PID systemctl.

- Redis comes from sandbox/redis_server.py (shared with the drain tests).
- `CeleryWorker`: `celery -A sandbox.celery_app worker` (acks_late, prefetch 1, 2 slots,
  one queue), the way Airflow runs its worker; tasks log start/end (sandbox/celery_app.py) so
  a test can prove no task was lost or run twice.
- `fake_systemctl.py`: what the drain's `systemctl show/stop airflow-worker` needs, acting on
  the worker's PID, for tests that do not boot the systemd host (cfg.systemctl points at it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from sandbox import celery_app
from sandbox.proc import REPO_ROOT, end_process, wait_for
from sandbox.tiers import heavy

HERE = Path(__file__).resolve().parent
FAKE_SYSTEMCTL = HERE / "fake_systemctl.py"
QUEUE = "lcq"


@heavy("redis")
class CeleryWorker:
    """A Celery worker process like `airflow celery worker -c 2` (acks_late, prefetch 1)."""

    def __init__(self, broker_url: str, node: str, mark_dir: Path, log_path: Path):
        self.broker_url = broker_url
        self.node = node
        self.mark_dir = Path(mark_dir)
        self.mark_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self.proc: Optional[subprocess.Popen] = None
        self.client = celery_app.client(broker_url)

    def env(self) -> Dict[str, str]:
        env = dict(os.environ)
        env.update(
            AIRFLOW__CELERY__BROKER_URL=self.broker_url,
            PYTHONPATH=str(REPO_ROOT),
            **{celery_app.TASK_DIR_ENV: str(self.mark_dir)},
        )
        return env

    def start(self) -> CeleryWorker:
        celery = str(Path(sys.executable).with_name("celery"))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    celery,
                    "-A",
                    "sandbox.celery_app",
                    "worker",
                    "-n",
                    self.node,
                    "-c",
                    "2",
                    "-Q",
                    QUEUE,
                    "--prefetch-multiplier",
                    "1",
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                    "-l",
                    "INFO",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env(),
                cwd=str(REPO_ROOT),
            )
        wait_for(self.ping, 30, f"celery worker {self.node} to answer")
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def ping(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"worker exited: {self.log_path.read_text()[-2000:]}")
        replies = self.client.control.ping(destination=[self.node], timeout=1.0)
        return bool(replies)

    def send(self, tag: str, seconds: float) -> None:
        self.client.send_task("record", args=[tag, seconds], queue=QUEUE)

    def marks(self, tag: str, what: str) -> List[float]:
        """When task `tag` logged `what` ('start' or 'end')."""
        return celery_app.times(self.mark_dir, tag, what)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, cold: bool = False) -> None:
        """Warm shutdown (running tasks finish), or cold (SIGQUIT: the pool ends them now)."""
        end_process(self.proc, signal.SIGQUIT if cold else signal.SIGTERM, grace=30)
        self.client.close()


def wait_until(predicate, timeout: float, what: str):
    return wait_for(predicate, timeout, what, interval=0.1)


def now() -> float:
    return time.time()


def make_asg(aws, imds, hook: str, group: str, heartbeat_timeout: int) -> Dict[str, object]:
    """A real moto group (launch template, one instance) with a termination hook; IMDS then
    speaks for that instance (its id, the aws:autoscaling:groupName tag)."""
    aws.client("ec2").create_launch_template(
        LaunchTemplateName="lt-worker",
        LaunchTemplateData={"ImageId": "ami-12345678", "InstanceType": "t3.micro"},
    )
    client = aws.client("autoscaling")
    client.create_auto_scaling_group(
        AutoScalingGroupName=group,
        LaunchTemplate={"LaunchTemplateName": "lt-worker"},
        MinSize=1,
        MaxSize=2,
        DesiredCapacity=1,
        AvailabilityZones=["us-east-1a"],
    )
    client.put_lifecycle_hook(
        LifecycleHookName=hook,
        AutoScalingGroupName=group,
        LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING",
        HeartbeatTimeout=heartbeat_timeout,
        DefaultResult="CONTINUE",
    )
    groups = client.describe_auto_scaling_groups(AutoScalingGroupNames=[group])
    iid = groups["AutoScalingGroups"][0]["Instances"][0]["InstanceId"]
    imds.set_paths({"meta-data/instance-id": iid})
    imds.set_tags({"aws:autoscaling:groupName": group, "airflow:role": "worker"})
    return {"client": client, "instance_id": iid}
