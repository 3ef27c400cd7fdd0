"""The sandbox's cfn-hup: runs the template's hooks when the stack's metadata changes.

Installed in every test host as /opt/aws/bin/cfn-hup (the template's cfn-hup.service runs it).
Like aws-cfn-bootstrap's cfn-hup it reads /etc/cfn/cfn-hup.conf (`[main]` stack, region,
interval in minutes) and every /etc/cfn/hooks.d/*.conf (sections with triggers, path, action,
runas) ONCE, at start: a hook file changed later is not seen until the service restarts (the
reason the template's configSet restarts cfn-hup when its files change). On each pass it reads
the value at each hook's `path` (Resources.<id>.Metadata...) and runs the hook's `action` as
`runas` when that value changed since the last pass (`post.update`); the first pass only
records values. Differences, listed in substitutions.py: the metadata comes from the file the
supervisor writes (METADATA_FILE), not DescribeStackResource; and SIGUSR1 starts a pass at
once, so a stack update does not wait out the interval. Each action's result is appended to
HUP_RESULTS for the supervisor, and logged to /var/log/cfn-hup.log as the real cfn-hup logs.
Stdlib only (the host's /usr/bin/python3).
"""

from __future__ import annotations

import configparser
import glob
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

from sandbox.stack import substitutions as subst

CONF = "/etc/cfn/cfn-hup.conf"
HOOKS = "/etc/cfn/hooks.d"
HUP_RESULTS = "/var/lib/aea-sandbox/cfn/hup.jsonl"
# where aws-cfn-bootstrap's cfn-hup logs (the template ships it to CloudWatch Logs)
LOG = "/var/log/cfn-hup.log"
TRIGGERS = ("post.update",)
_MISSING = object()


def read_hooks() -> List[Dict[str, str]]:
    hooks = []
    for path in sorted(glob.glob(os.path.join(HOOKS, "*.conf"))):
        cp = configparser.RawConfigParser()
        cp.read(path)
        for section in cp.sections():
            hook = dict(cp.items(section), name=section, file=path)
            for key in ("triggers", "path", "action"):
                if key not in hook:
                    raise ValueError(f"{path} [{section}]: no {key}")
            for trig in hook["triggers"].split(","):
                if trig.strip() not in TRIGGERS:
                    raise ValueError(f"{path} [{section}]: trigger {trig} not implemented")
            hooks.append(hook)
    return hooks


def value_at(path: str) -> Any:
    """The metadata value a hook path names, as JSON text (_MISSING when it is absent)."""
    with open(subst.METADATA_FILE, encoding="utf-8") as f:
        doc = json.load(f)
    parts = path.split(".")
    if len(parts) < 3 or parts[0] != "Resources" or parts[2] != "Metadata":
        raise ValueError(f"hook path {path}: only Resources.<id>.Metadata... is implemented")
    node: Any = doc["resources"].get(parts[1], {})
    for part in parts[2:]:
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return json.dumps(node, sort_keys=True)


def log(text: str) -> None:
    """To the journal (stderr) and to cfn-hup's log file, as the real one keeps it."""
    sys.stderr.write(text)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    # 0600: a hook's output can hold what it read
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(f"{stamp},000 [INFO] {text}")


def run_action(hook: Dict[str, str]) -> Dict[str, Any]:
    runas = hook.get("runas", "root")
    argv = ["sh", "-c", hook["action"]]
    if runas != "root":
        argv = ["runuser", "-u", runas, "--", *argv]
    t0 = time.time()
    p = subprocess.run(argv, capture_output=True, text=True)
    return {
        "hook": hook["name"],
        "rc": p.returncode,
        "started": t0,
        "seconds": round(time.time() - t0, 2),
        "output": (p.stdout + p.stderr)[-4000:],
    }


def main(argv: Optional[List[str]] = None) -> int:
    cp = configparser.RawConfigParser()
    if not cp.read(CONF) or not cp.has_section("main"):
        sys.stderr.write(f"cfn-hup: {CONF} has no [main] section\n")
        return 1
    interval = 60.0 * float(cp.get("main", "interval", fallback="15"))
    hooks = read_hooks()
    # SIGUSR1 blocked and taken synchronously: a poke between passes is never lost
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    seen = {h["name"]: value_at(h["path"]) for h in hooks}
    log(f"cfn-hup: {len(hooks)} hook(s), every {interval:g} s or on SIGUSR1\n")
    while True:
        signal.sigtimedwait({signal.SIGUSR1}, interval)
        for hook in hooks:
            now = value_at(hook["path"])
            if now == seen[hook["name"]]:
                continue
            seen[hook["name"]] = now
            result = run_action(hook)
            log(f"cfn-hup: {hook['name']} rc {result['rc']}\n{result['output']}\n")
            os.makedirs(os.path.dirname(HUP_RESULTS), exist_ok=True)
            fd = os.open(HUP_RESULTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "a") as f:  # 0600: a hook's output can hold what it read
                f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    sys.exit(main())
