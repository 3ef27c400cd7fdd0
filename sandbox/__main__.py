"""`python -m sandbox up|status|down`: the stack of cloudformation/airflow-cluster.yaml, locally.

- `up [--params FILE] [--workers N] [--template FILE]`: launches the stack (sandbox/stack/
  launch.py) and stays in the foreground as its supervisor: progress on stdout, a state file
  (its PID, the instances) in the run directory; SIGINT/SIGTERM end everything it started.
- `status`: reads the state file and asks each instance's systemd what runs there.
- `down`: signals the supervisor's PID and waits until it has ended everything.
The state file is in $AEA_SANDBOX_RUN (default /run/aea-sandbox); the instances' working
directories in a temporary directory removed by `down`.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

from sandbox.cfn_init import UnsupportedInitKey
from sandbox.proc import running
from sandbox.stack.launch import RUN_DIR, STATE_FILE, Stack
from sandbox.stack.model import StackError


def _state(run_dir: Path) -> Optional[dict]:
    try:
        return json.loads((run_dir / STATE_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None


def up(args: argparse.Namespace) -> int:
    state = _state(args.run_dir)
    if state and running(state["pid"]):
        print(f"a stack is already up (supervisor PID {state['pid']}): `down` first")
        return 1
    stop = threading.Event()
    starting = [True]

    def on_signal(*_):
        stop.set()
        if starting[0]:  # interrupt the launch itself; up() ends what it started
            raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    # `down` asks for every thread's stack (to this process's stderr) before it gives up
    faulthandler.register(signal.SIGUSR2, all_threads=True)
    kwargs = {"workers": args.workers, "state_dir": args.run_dir, "params": args.params}
    if args.template:
        kwargs["template"] = args.template
    stack = Stack(**kwargs)
    try:
        stack.up()
        starting[0] = False
        print(f"stack up: supervisor PID {os.getpid()}; `python -m sandbox down` ends it")
        for m in stack.members:
            print(f"  {m.name:<18} {m.role:<10} {m.instance_id} {m.instance.address}")
        while not stop.wait(1):
            pass
        print("ending the stack ...")
        return 0
    except KeyboardInterrupt:
        print("interrupted: the stack is ended")
        return 130
    except (StackError, UnsupportedInitKey) as exc:
        print(f"sandbox up: refused: {exc}", file=sys.stderr)
        return 2
    finally:
        stack.down()
        stack.cleanup_run_dir()


def status(args: argparse.Namespace) -> int:
    state = _state(args.run_dir)
    if not state or not running(state["pid"]):
        print("no stack is up")
        return 3
    print(f"stack {state['stack']}: supervisor PID {state['pid']}, embedded AWS {state['aws']}")
    for inst in state["instances"]:
        units = _units(inst["host_pid"]) if inst.get("host_pid") else ["(no host)"]
        print(f"  {inst['name']:<18} {inst['role']:<10} {inst['address']:<12} {' '.join(units)}")
    return 0


def _units(host_pid: int) -> List[str]:
    p = subprocess.run(
        ["nsenter", "-t", str(host_pid), "-a", "systemctl", "list-units", "--no-legend",
         "--plain", "--state=active", "airflow-*.service", "cfn-hup.service"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return [line.split()[0].removesuffix(".service") for line in p.stdout.splitlines() if line]


def down(args: argparse.Namespace) -> int:
    state = _state(args.run_dir)
    if not state or not running(state["pid"]):
        print("no stack is up")
        return 0
    os.kill(state["pid"], signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while running(state["pid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    if running(state["pid"]):
        os.kill(state["pid"], signal.SIGUSR2)  # where it is stuck, on its stderr
        print(f"the supervisor (PID {state['pid']}) is still running after {args.timeout}s")
        return 1
    print("stack down")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox", description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, default=RUN_DIR)
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="launch the stack and supervise it")
    p_up.add_argument("--params", type=Path, help="a CloudFormation parameters file")
    p_up.add_argument("--workers", type=int, help="the worker group's desired capacity")
    p_up.add_argument("--template", type=Path, help="a copy of the template")
    sub.add_parser("status", help="what runs on each instance")
    p_down = sub.add_parser("down", help="end the stack")
    p_down.add_argument("--timeout", type=float, default=120)
    args = parser.parse_args(argv)
    return {"up": up, "status": status, "down": down}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
