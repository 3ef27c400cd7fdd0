"""`python -m sandbox`: the stack of cloudformation/airflow-cluster.yaml, launched on this machine.

- `up [--params FILE] [--workers N] [--template FILE]`: launches the stack (sandbox/stack/
  launch.py) and stays in the foreground as its supervisor: progress on stdout, then where the
  UI is (the load balancer, put on this machine's 127.0.0.1) and what to run next; a state
  file (its PID, the instances, the endpoints) in the run directory; SIGINT/SIGTERM end
  everything it started.
- `status`: reads the state file and asks each instance's systemd what runs there.
- `shell NAME|ROLE [CMD ...]`, `shell --all CMD ...`: a root shell (or CMD, run by the
  instance's bash as ssh does) on an instance, or CMD on every one, as Session Manager's
  `sudo -i` and Run Command give on EC2, with the one sandbox override (AWS_ENDPOINT_URL).
- `env`: `export` lines for this machine's AWS tools (the embedded AWS, REGION, STACK).
- `deploy BUNDLE`: a CodeDeploy revision (`make bundle`) deployed on every instance as on
  AWS: one deployment per deployment group in the template's DeploymentOrder, one instance at
  a time; the supervisor runs it (sandbox/stack/control.py).
- `credentials [--shell]`: the UI's local address and the admin's user and password (from the
  template's admin secret in the embedded AWS).
- `down`: signals the supervisor's PID and waits until it has ended everything.
The state file is in $AEA_SANDBOX_RUN (default /run/aea-sandbox); the instances' working
directories in a temporary directory removed by `down`. Exit codes: 0 done, 1 failed (a
deployment, `down` timing out, a stack already up), 2 refused (bad input), 3 no stack is up,
130 interrupted.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from sandbox.cfn_init import UnsupportedInitKey
from sandbox.proc import running
from sandbox.stack.control import (
    CONTROL_SOCKET,
    ControlError,
    ControlServer,
    deployment_summary,
    request,
)
from sandbox.stack.launch import RUN_DIR, STATE_FILE, Stack
from sandbox.stack.model import StackError
from sandbox.systemd_host import INSIDE_PATH, enter_argv

NO_STACK = 3


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
    control: Optional[ControlServer] = None
    try:
        stack.up()
        starting[0] = False
        stack.state_extra = _endpoints(stack)
        stack.write_state()
        control = ControlServer(args.run_dir / CONTROL_SOCKET, _deployer(stack)).start()
        _print_up(stack, args.run_dir)
        while not stop.wait(1):
            pass
        print("ending the stack ...", flush=True)
        return 0
    except KeyboardInterrupt:
        print("interrupted: the stack is ended")
        return 130
    except (StackError, UnsupportedInitKey) as exc:
        print(f"sandbox up: refused: {exc}", file=sys.stderr)
        return 2
    finally:
        if control is not None:
            control.stop()
        stack.down()
        stack.cleanup_run_dir()
        print("stack down: every process it started has ended", flush=True)


def _endpoints(stack: Stack) -> Dict[str, Any]:
    """The state file's endpoints: the load balancer on this machine's 127.0.0.1 (from this,
    the supervisor's main thread: the forwarder dies with the thread that starts it), the
    admin secret's name."""
    from sandbox.stack.network import GATEWAY
    from sandbox.stack.scenario import admin_secret_id

    out: Dict[str, Any] = {"admin_secret": admin_secret_id(stack.model)}
    lb = stack.standins.get("load balancer")
    if lb is not None:
        out["ui"] = "http://" + stack.switch.expose(GATEWAY, lb.port)
        out["ui_in_stack"] = f"http://{stack.model.endpoints()['LoadBalancer']}"
    return out


def _deployer(stack: Stack) -> Callable[[Path, str, Callable[[str], None]], Dict[str, Any]]:
    from sandbox.stack.scenario import deploy_everywhere

    def deploy(bundle: Path, deployment_id: str, progress: Callable[[str], None]) -> Dict:
        started = time.monotonic()

        def between(event: str, member: Any) -> None:
            progress(f"{member.name:<18} {event} ok ({time.monotonic() - started:.0f} s)")

        return deployment_summary(deploy_everywhere(stack, bundle, deployment_id, between))

    return deploy


def _print_up(stack: Stack, run_dir: Path) -> None:
    state = stack.state()
    # the command as it can be typed from here: the venv's python (a bare `python` may lack
    # boto3), relative when it is below the working directory (`.venv/bin/python`)
    python = Path(sys.executable)
    if python.is_relative_to(Path.cwd()):
        python = python.relative_to(Path.cwd())
    me = f"{python} -m sandbox" + ("" if run_dir == RUN_DIR else f" --run-dir {run_dir}")
    print(f"stack up: supervisor PID {os.getpid()}; `{me} down` (or Ctrl-C here) ends it")
    for m in stack.members:
        print(f"  {m.name:<18} {m.role:<10} {m.instance_id} {m.instance.address}")
    if "ui" in state:
        print(f"Airflow UI and REST API: {state['ui']} (the load balancer, on this machine)")
    print(
        f"  log in: `{me} credentials` prints the user and password (admin secret "
        f"{state['admin_secret']})"
    )
    print(f"The embedded AWS: {state['aws']}, region {state['region']}, stack {state['stack']} "
          f"(`eval \"$({me} env)\"` for this machine's AWS tools)")  # fmt: skip
    print(f"Next: `{me} deploy \"$(make -s bundle DAGS=examples/dags)\"` (workers start on their "
          f"first revision); `{me} shell worker` for a root shell on a worker")  # fmt: skip
    sys.stdout.flush()


def _up_state(args: argparse.Namespace) -> Optional[dict]:
    """The running stack's state, or None after saying that no stack is up."""
    state = _state(args.run_dir)
    if not state or not running(state["pid"]):
        print("no stack is up (`python -m sandbox up` launches one)", file=sys.stderr)
        return None
    return state


def status(args: argparse.Namespace) -> int:
    state = _up_state(args)
    if state is None:
        return NO_STACK
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


def shell(args: argparse.Namespace) -> int:
    state = _up_state(args)
    if state is None:
        return NO_STACK
    instances = state["instances"]
    if args.all:
        if args.instance is not None:  # `shell --all CMD...`: the first word is the command's
            args.command = [args.instance, *args.command]
        if not args.command and not sys.stdin.isatty():
            # `shell --all < block.sh`: the script, read once, is the command on each
            args.command = [sys.stdin.read()]
        if not args.command or not args.command[0].strip():
            print("sandbox shell --all: give the command to run, or a script on stdin",
                  file=sys.stderr)  # fmt: skip
            return 2
        chosen = instances
    else:
        chosen = [i for i in instances if i["name"] == args.instance] or [
            i for i in instances if i["role"] == args.instance
        ][:1]
    if not chosen or not all(i.get("host_pid") for i in chosen):
        names = ", ".join(f"{i['name']} ({i['role']})" for i in instances)
        print(f"sandbox shell: no instance or role {args.instance!r}; there are: {names}",
              file=sys.stderr)  # fmt: skip
        return 2
    # what a root login on the instance has: its PATH, root's home, no variable of ours but
    # the sandbox's one override (a real instance reaches AWS's own endpoints)
    env = {
        "PATH": INSIDE_PATH,
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "TERM": os.environ.get("TERM", "dumb"),
        "AWS_ENDPOINT_URL": f"http://{state['aws_at']}",
    }
    # as ssh does: the words are one command line for the instance's shell, so pipes, `;`
    # and quotes in it work there
    command = ["bash", "-lc", " ".join(args.command)] if args.command else ["bash", "-l"]
    sys.stdout.flush()
    if not args.all:
        # nsenter execs: this process becomes the command inside the instance, so its exit
        # code, its terminal and Ctrl-C are the caller's
        os.execvpe("nsenter", _enter(chosen[0], command), env)
    worst = 0
    for inst in chosen:  # one after the other, as Run Command's output reads
        print(f"== {inst['name']} ({inst['role']})", flush=True)
        rc = subprocess.run(_enter(inst, command), env=env, stdin=subprocess.DEVNULL).returncode
        if rc != 0:
            print(f"== {inst['name']}: exit {rc}", file=sys.stderr, flush=True)
            worst = worst or rc
    return worst


def _enter(inst: Dict[str, Any], command: List[str]) -> List[str]:
    return [*enter_argv(inst["host_pid"]), *command]


def env_exports(args: argparse.Namespace) -> int:
    state = _up_state(args)
    if state is None:
        return NO_STACK
    values = {
        "AWS_ENDPOINT_URL": state["aws"],
        # the embedded AWS takes any credentials; the instances use their roles' through IMDS
        "AWS_ACCESS_KEY_ID": "sandbox",
        "AWS_SECRET_ACCESS_KEY": "sandbox",
        "AWS_DEFAULT_REGION": state["region"],
        "REGION": state["region"],
        "STACK": state["stack"],
    }
    for name, value in values.items():
        print(f"export {name}={shlex.quote(str(value))}")
    return 0


def deploy(args: argparse.Namespace) -> int:
    bundle = args.bundle.resolve()
    if not bundle.is_file() or not zipfile.is_zipfile(bundle):
        print(f"sandbox deploy: {args.bundle}: not a zip file (`make bundle DAGS=dir` writes one)",
              file=sys.stderr)  # fmt: skip
        return 2
    with zipfile.ZipFile(bundle) as zf:
        if "appspec.yml" not in zf.namelist():
            print(f"sandbox deploy: {args.bundle}: no appspec.yml at the top: not a CodeDeploy "
                  "revision (`make bundle DAGS=dir` writes one)", file=sys.stderr)  # fmt: skip
            return 2
    state = _up_state(args)
    if state is None:
        return NO_STACK
    result: Optional[Dict[str, Any]] = None
    try:
        for doc in request(args.run_dir / CONTROL_SOCKET, {"deploy": str(bundle)}):
            if "progress" in doc:
                print(doc["progress"], flush=True)
            elif "error" in doc:
                print(f"sandbox deploy: refused: {doc['error']}", file=sys.stderr)
                return 2
            else:
                result = doc.get("result")
    except ControlError as exc:
        print(f"sandbox deploy: {exc}", file=sys.stderr)
        return 1
    if result is None:
        print("sandbox deploy: the supervisor ended before the deployment did", file=sys.stderr)
        return 1
    failed = {name: r for name, r in result.items() if not r["succeeded"]}
    for name, r in failed.items():
        print(f"{name}: FAILED: {r['message']}", file=sys.stderr)
    skipped = [i["name"] for i in state["instances"] if i["name"] not in result]
    if failed or skipped:
        if skipped:
            print(f"not deployed (a deployment stops at its first failure): {', '.join(skipped)}",
                  file=sys.stderr)  # fmt: skip
        return 1
    print(f"deployed on every instance: {', '.join(result)}")
    return 0


def credentials(args: argparse.Namespace) -> int:
    import boto3

    state = _up_state(args)
    if state is None:
        return NO_STACK
    sm = boto3.client(
        "secretsmanager", endpoint_url=state["aws"], region_name=state["region"],
        aws_access_key_id="sandbox", aws_secret_access_key="sandbox",
    )  # fmt: skip
    doc = json.loads(sm.get_secret_value(SecretId=state["admin_secret"])["SecretString"])
    values = {"url": state.get("ui", ""), "username": doc["username"], "password": doc["password"]}
    if args.shell:  # for eval: no value reaches a command line
        names = {"url": "AIRFLOW_URL", "username": "AIRFLOW_USER", "password": "AIRFLOW_PASSWORD"}
        for key, name in names.items():
            print(f"{name}={shlex.quote(values[key])}")
    else:
        for key, value in values.items():
            print(f"{key}: {value}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sandbox",
        description=__doc__.split("\n")[0] + " See docs/sandbox.md for a walk through.",
        epilog="Exit codes: 0 done; 1 failed (a deployment, `down` timing out, a stack already "
        "up); 2 refused (bad input: a file that is no CodeDeploy revision, an unknown "
        "instance); 3 no stack is up; 130 interrupted. `shell` exits with its command's code.",
    )
    parser.add_argument(
        "--run-dir", type=Path, default=RUN_DIR,
        help="where the state file and the control socket are (default $AEA_SANDBOX_RUN or "
        "/run/aea-sandbox)",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command_name", required=True)
    p_up = sub.add_parser("up", help="launch the stack and supervise it (foreground)")
    p_up.add_argument("--params", type=Path, help="a CloudFormation parameters file")
    p_up.add_argument("--workers", type=int, help="the worker group's desired capacity")
    p_up.add_argument("--template", type=Path, help="a copy of the template")
    sub.add_parser("status", help="what runs on each instance")
    p_shell = sub.add_parser(
        "shell", help="a root shell, or a command, on an instance",
        description="A root shell on an instance (bash -l), or COMMAND run by the instance's "
        "bash as ssh runs one: its words form one command line, so quote a pipe or `;` for it "
        "(shell worker 'journalctl -u airflow-worker | tail'). AWS_ENDPOINT_URL is set to the "
        "embedded AWS, the sandbox's one difference from a Session Manager shell. Exits with "
        "the command's code.",
    )  # fmt: skip
    p_shell.add_argument("--all", action="store_true",
                         help="run COMMAND on every instance, one after the other (as Run "
                         "Command on the stack); exit: the first failure's code")  # fmt: skip
    p_shell.add_argument(
        "instance", nargs="?", help="an instance's name (`status` lists them) or a role: "
        "scheduler, webserver, worker (its first instance)",
    )  # fmt: skip
    p_shell.add_argument("command", nargs=argparse.REMAINDER, help="the command (default bash -l)")
    sub.add_parser("env", help="export lines for this machine's AWS tools: the embedded AWS, "
                   "REGION, STACK (eval \"$(python -m sandbox env)\")")  # fmt: skip
    p_deploy = sub.add_parser("deploy", help="deploy a CodeDeploy revision on every instance")
    p_deploy.add_argument("bundle", type=Path, help="the zip `make bundle DAGS=dir` printed")
    p_cred = sub.add_parser("credentials", help="the UI's address, the admin's user and password")
    p_cred.add_argument("--shell", action="store_true", help="as AIRFLOW_URL=... lines for eval")
    p_down = sub.add_parser("down", help="end the stack")
    p_down.add_argument(
        "--timeout", type=float, default=120, metavar="S",
        help="seconds to wait for the supervisor to end everything (default 120); then exit 1 "
        "and have it print where it is stuck",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.command_name == "shell" and args.instance is None and not args.all:
        parser.error("shell: name an instance or a role, or give --all and a command")
    commands = {"up": up, "status": status, "shell": shell, "env": env_exports,
                "deploy": deploy, "credentials": credentials, "down": down}  # fmt: skip
    return commands[args.command_name](args)


if __name__ == "__main__":
    sys.exit(main())
