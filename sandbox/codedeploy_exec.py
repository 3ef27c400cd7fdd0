"""The on-instance half of the test CodeDeploy agent (stdlib only; runs inside the test host).

Two jobs, as the CodeDeploy agent does them on an instance:

    codedeploy_exec.py hook SCRIPT --timeout S --runas USER --cwd DIR [--env K=V ...]
        Run one hook script in its own process group with CodeDeploy's variables. Like the
        agent, wait until the script has exited *and* its stdout/stderr are closed (a child
        left holding them keeps the hook running); at the timeout kill the whole process group.
        Prints one JSON line: rc, timed_out, seconds, output (the last 4 KiB).

    codedeploy_exec.py install --archive DIR --appspec-json JSON --cleanup FILE
        The Install event: delete the files the previous deployment installed (listed in
        FILE), copy each `files` entry, refuse/overwrite/retain existing files per
        file_exists_behavior, and write the new list to FILE.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import threading
import time


def run_hook(args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    for kv in args.env or []:
        k, _, v = kv.partition("=")
        env[k] = v
    argv = [args.script]
    if args.runas and args.runas != pwd.getpwuid(os.geteuid()).pw_name:
        argv = ["su", "-s", "/bin/sh", args.runas, "-c", args.script]
    if not os.access(args.script, os.X_OK):  # the agent makes it executable, then runs it
        os.chmod(args.script, os.stat(args.script).st_mode | 0o755)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        argv,
        cwd=args.cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    chunks: list = []
    lock = threading.Lock()

    def pump(stream) -> None:
        for line in iter(stream.readline, b""):
            with lock:
                chunks.append(line)
        stream.close()

    pumps = [
        threading.Thread(target=pump, args=(s,), daemon=True) for s in (proc.stdout, proc.stderr)
    ]
    for p in pumps:
        p.start()
    deadline = t0 + args.timeout
    timed_out = False
    while proc.poll() is None or any(p.is_alive() for p in pumps):
        if time.monotonic() >= deadline:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    rc = proc.wait()
    for p in pumps:
        p.join(timeout=2)
    out = b"".join(chunks).decode("utf-8", "replace")
    return {
        "rc": rc,
        "timed_out": timed_out,
        "seconds": round(time.monotonic() - t0, 3),
        "output": out[-4096:],
    }


def install(args: argparse.Namespace) -> dict:
    spec = json.loads(args.appspec_json)
    behavior = (spec.get("file_exists_behavior") or "DISALLOW").upper()
    previous = []
    if os.path.exists(args.cleanup):
        with open(args.cleanup) as f:
            previous = [line.rstrip("\n") for line in f if line.strip()]
    # 1. remove what the last deployment installed (files first, then its now-empty dirs)
    for path in sorted(previous, key=len, reverse=True):
        if os.path.isdir(path) and not os.path.islink(path):
            # not empty: something else lives there (logs, __pycache__); CodeDeploy keeps it
            with contextlib.suppress(OSError):
                os.rmdir(path)
        elif os.path.lexists(path):
            os.unlink(path)
    installed = []
    for entry in spec.get("files") or []:
        src = os.path.join(args.archive, entry["source"].lstrip("/"))
        dest = entry["destination"]
        pairs = []
        if os.path.isdir(src):
            for dirpath, dirnames, filenames in os.walk(src):
                dirnames.sort()
                rel = os.path.relpath(dirpath, src)
                target_dir = os.path.normpath(os.path.join(dest, rel))
                pairs.append((None, target_dir))
                pairs += [
                    (os.path.join(dirpath, f), os.path.join(target_dir, f))
                    for f in sorted(filenames)
                ]
        else:
            pairs = [(None, dest), (src, os.path.join(dest, os.path.basename(src)))]
        for s, d in pairs:
            if s is None:
                if not os.path.isdir(d):
                    os.makedirs(d)
                    installed.append(d)
                continue
            if os.path.lexists(d):
                if behavior == "DISALLOW":
                    return {
                        "ok": False,
                        "error": (
                            f"The deployment failed because a specified file already exists at "
                            f"this location: {d}"
                        ),
                    }
                if behavior == "RETAIN":
                    installed.append(d)
                    continue
                os.unlink(d)
            shutil.copy2(s, d)
            installed.append(d)
    tmp = args.cleanup + ".tmp"
    with open(tmp, "w") as f:
        f.write("".join(p + "\n" for p in installed))
    os.replace(tmp, args.cleanup)
    return {"ok": True, "installed": len(installed)}


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("hook")
    h.add_argument("script")
    h.add_argument("--timeout", type=float, required=True)
    h.add_argument("--runas", default="root")
    h.add_argument("--cwd", default="/")
    h.add_argument("--env", action="append")
    i = sub.add_parser("install")
    i.add_argument("--archive", required=True)
    i.add_argument("--appspec-json", required=True)
    i.add_argument("--cleanup", required=True)
    args = ap.parse_args()
    result = run_hook(args) if args.cmd == "hook" else install(args)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
