"""`systemctl` for one unit backed by a PID, for tests without the systemd host.

Usage: fake_systemctl.py --pidfile F [--log F] <systemctl args...>. Understands what the drain
and the lifecycle watch call: show UNIT --property=..., stop UNIT, is-active, reset-failed;
start is refused (logged), so a test can prove nothing started the worker. `stop` sends
SIGTERM (Celery's warm shutdown, as KillMode=mixed does) and waits for the process to end.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

# run as a script: the sandbox package is two directories up
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from sandbox.proc import running  # noqa: E402


def main() -> int:
    argv = sys.argv[1:]
    pidfile = argv[argv.index("--pidfile") + 1]
    log = argv[argv.index("--log") + 1] if "--log" in argv else None
    args = [
        a
        for i, a in enumerate(argv)
        if a not in ("--pidfile", "--log") and argv[i - 1] not in ("--pidfile", "--log")
    ]
    if log:
        with open(log, "a") as f:
            f.write(" ".join(args) + "\n")
    try:
        pid = int(Path(pidfile).read_text().strip() or 0)
    except FileNotFoundError:
        pid = 0
    stopping = os.path.exists(pidfile + ".stopping")
    alive = pid > 0 and running(pid)
    state = ("deactivating" if stopping else "active") if alive else "inactive"
    cmd = args[0] if args else ""
    if cmd == "show":
        props = {
            "ActiveState": state,
            "SubState": "running" if alive else "dead",
            "MainPID": str(pid if alive else 0),
            "LoadState": "loaded",
            "UnitFileState": "enabled",
            "Result": "success",
            "NRestarts": "0",
        }
        wanted = [
            p for a in args if a.startswith("--property=") for p in a.split("=", 1)[1].split(",")
        ]
        for p in wanted or props:
            print(f"{p}={props.get(p, '')}")
        return 0
    if cmd == "is-active":
        print(state)
        return 0 if alive else 3
    if cmd == "reset-failed":
        return 0
    if cmd == "stop":
        if alive:
            Path(pidfile + ".stopping").touch()
            os.kill(pid, signal.SIGTERM)
            while running(pid):
                time.sleep(0.1)
        return 0
    print(f"fake systemctl: {cmd} not supported", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
