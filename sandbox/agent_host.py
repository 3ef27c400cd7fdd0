"""The agent installed in a SystemdHost with stand-in Airflow services, for tests, demo and bench.

`prepare(host, aws_server, imds_server)` installs the project the way cfn-init does
(`SystemdHost.install_project`: venv, the real unit files from systemd/), makes the rig's moto
and IMDS reachable inside, writes /etc/airflow-agent/agent.yaml (small debounce for speed), and
replaces the ExecStart of every Airflow unit with a *stand-in*: a tiny Python process that
reads nothing but its environment (from the real unit's `EnvironmentFile=`), dumps it to
/airflow/standin/<unit>.env (NUL-separated name=value bytes), prints its environment hash, and
reports READY=1 after $STANDIN_READY_DELAY seconds (Type=notify, so a slow start is real), or
exits 3 at once when $STANDIN_FAIL is set (a configuration the service cannot start with).
Everything else of the real unit (User=airflow, hardening, Requires=airflow-agent-env) stays.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
STANDIN_PATH = "/usr/local/lib/aea-standin.py"
STANDIN_DIR = "/airflow/standin"
AIRFLOW_UNITS = [
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-api-server",
    "airflow-worker",
]
SSM_PATH = "/airflow/test/"

STANDIN = r'''"""Stand-in Airflow service (sandbox/agent_host.py): dumps its environment."""
import hashlib, os, socket, sys, time

name = sys.argv[1]
# set by systemd per start, not by the env file: left out of the hash
EXEC_VARS = {b"INVOCATION_ID", b"JOURNAL_STREAM", b"NOTIFY_SOCKET", b"SYSTEMD_EXEC_PID",
             b"MANAGERPID", b"WATCHDOG_PID", b"WATCHDOG_USEC", b"MAINPID"}
items = sorted(os.environb.items())
blob = b"\0".join(k + b"=" + v for k, v in items)
digest = hashlib.sha256(b"\0".join(k + b"=" + v for k, v in items if k not in EXEC_VARS))
os.makedirs("/airflow/standin", exist_ok=True)
tmp = "/airflow/standin/.%s.%d" % (name, os.getpid())
with open(tmp, "wb") as f:
    f.write(blob)
os.replace(tmp, "/airflow/standin/%s.env" % name)
with open("/airflow/standin/%s.starts" % name, "a") as f:  # one line per start, for counting
    f.write("%d %.6f\n" % (os.getpid(), time.time()))
print("%s (stand-in) pid %d environment sha256 %s" % (name, os.getpid(), digest.hexdigest()[:12]),
      flush=True)
if os.environ.get("STANDIN_FAIL"):  # a config this "service" cannot start with
    sys.exit(3)
time.sleep(float(os.environ.get("STANDIN_READY_DELAY") or 0))
addr = os.environ.get("NOTIFY_SOCKET")
if addr:
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.sendto(b"READY=1", addr)
while True:
    time.sleep(3600)
'''

STANDIN_DROPIN = """# test stand-in: same unit, a tiny process instead of Airflow (agent_host.py)
[Unit]
StartLimitIntervalSec=60
StartLimitBurst=5

[Service]
Type=notify
NotifyAccess=main
ExecStart=
ExecStart=/usr/bin/python3 {standin} %N
# the api-server's warm-up request (ExecStartPost) has no HTTP server to reach in a stand-in
ExecStartPost=
RestartSec=1
TimeoutStartSec=30
"""


def agent_yaml(extra: Optional[Dict[str, Any]] = None) -> str:
    data: Dict[str, Any] = {
        "cluster": "test",
        "env": {
            "ssm_paths": [SSM_PATH],
            "group": "airflow",
            "static": {"AIRFLOW_HOME": "/airflow"},
        },
        "confapply": {"debounce": 0.5, "max_wait": 2.0, "unit_timeout": 20.0},
        "imds": {"timeout": 1.0, "attempts": 2},
    }
    for k, v in (extra or {}).items():
        if isinstance(v, dict) and isinstance(data.get(k), dict):
            data[k] = {**data[k], **v}
        else:
            data[k] = v
    return json.dumps(data, indent=1) + "\n"


def agent_env(aws_server, imds_server) -> Dict[str, str]:
    """What the agent needs inside the host to reach the rig (ports are bridged as-is)."""
    return {
        "AWS_ENDPOINT_URL": aws_server.url,
        "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds_server.url + "/",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    }


def prepare(host, aws_server, imds_server, config: Optional[Dict[str, Any]] = None) -> None:
    host.install_project(REPO_ROOT)
    host.bridge_port(aws_server.port)
    host.bridge_port(imds_server.port)
    host.set_default_environment(agent_env(aws_server, imds_server))
    host.write_file("/etc/airflow-agent/agent.yaml", agent_yaml(config))
    install_standins(host)


def install_standins(host, units: List[str] = AIRFLOW_UNITS) -> None:
    host.write_file(STANDIN_PATH, STANDIN, mode=0o755)
    for unit in units:
        host.write_file(
            f"/etc/systemd/system/{unit}.service.d/50-standin.conf",
            STANDIN_DROPIN.format(standin=STANDIN_PATH),
        )
    host.systemctl("daemon-reload")


def agent(host, aws_server, imds_server, *args: str, check: bool = True, timeout: float = 120):
    """Run `airflow-agent ARGS` inside the host, as root, with the rig's endpoints."""
    return host.run(
        ["airflow-agent", *args],
        check=check,
        timeout=timeout,
        env=agent_env(aws_server, imds_server),
    )


def standin_env(host, unit: str) -> Dict[bytes, bytes]:
    """The environment the unit's stand-in last started with."""
    blob = host.read_file(f"{STANDIN_DIR}/{unit}.env")
    out = {}
    for item in blob.split(b"\0"):
        k, _, v = item.partition(b"=")
        out[k] = v
    return out


def main_pids(host, units: List[str]) -> Dict[str, int]:
    return {u: host.main_pid(u) for u in units}


def put_params(ssm, values: Dict[str, str], path: str = SSM_PATH) -> None:
    """Parameters under `path`, one per variable: <path>env/<NAME>."""
    for name, value in values.items():
        ssm.put_parameter(
            Name=f"{path}env/{name}", Value=value, Type="SecureString", Overwrite=True
        )


# test rig only: the Airflow venv's python lives under /root/.pyenv on this machine, and a
# clone may live under /tmp, which a unit's PrivateTmp= hides: a fresh /tmp instead, with the
# venv bound into it read-only (what the launched stack's drop-in does)
_VENV_DROPIN = """[Service]
ProtectHome=no
PrivateTmp=no
TemporaryFileSystem=/tmp:mode=1777
BindReadOnlyPaths={venv}
"""


def give_airflow_venv(host, unit: str) -> None:
    """/opt/airflow/venv in the host as the machine's Airflow venv, reachable by `unit` (an
    agent unit whose co-process runs that venv's python as the airflow user)."""
    from sandbox.airflow_cluster import AIRFLOW_VENV

    host.run(["mkdir", "-p", "/opt/airflow"])
    host.run(["ln", "-sfn", str(AIRFLOW_VENV), "/opt/airflow/venv"])
    host.run(["chmod", "0711", "/root"])  # inside the overlay only
    dropin = _VENV_DROPIN.format(venv=AIRFLOW_VENV.resolve())
    host.write_file(f"/etc/systemd/system/{unit}.d/50-rig.conf", dropin)
    host.systemctl("daemon-reload")
