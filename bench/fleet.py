"""Benchmark: `env sync` on a fleet of N instances at once against SSM's 40 TPS quota.

N instance processes (forked from this one, so each has the agent and boto3 already imported;
each has its own agent.yaml, state directory and env file, and an SSM client that has made one
warm-up call) wait on a pipe and are released at one moment: the parent closes the pipe's write
end and every read returns together. They sync through a throttling proxy (sandbox.throttle_proxy:
token bucket of 40 requests per second, one second of burst, SSM's ThrottlingException beyond it)
in front of the embedded AWS (moto server over HTTP) holding 60 parameters.

Two behaviours, same run, same proxy:
  old  what `env sync` did before fleet pacing: no splay, botocore's retries only
       (adaptive mode, aws.max_attempts 6; env.fetch_deadline 0 gives exactly that)
  new  `env sync --splay`: a random wait of 0..env.splay, then throttled calls retried with
       full-jitter backoff until env.fetch_deadline (the defaults)

Per row: failed instances, convergence (release -> the last instance done, failed ones
excluded) against the ideal N x pages / rate, calls the proxy saw and how many it throttled.
Goal for new: 0 failed and convergence <= 1.5 x ideal.
Run (CPU-heavy at N=500; take the machine's heavy lock):
  flock /tmp/aea-heavy.lock .venv/bin/python bench/fleet.py [--instances 200 500] [--params 60]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import boto3  # noqa: E402,F401 - imported before the fork: every instance has it already

from agent.config import config_from_dict  # noqa: E402
from agent.jobs.env_sync.sync import EnvSync  # noqa: E402
from agent.platform.aws import AwsClients  # noqa: E402
from sandbox.aws_server import AwsServer  # noqa: E402
from sandbox.throttle_proxy import ThrottleProxy  # noqa: E402

PATH = "/airflow/fleet/"
BEHAVIOURS = {
    # env sync without --splay, throttling beyond botocore's attempts fails the sync
    "old": {"splay": False, "env": {"fetch_deadline": 0}},
    # env sync --splay with the defaults of env.splay, env.fetch_deadline, env.backoff_cap
    "new": {"splay": True, "env": {}},
}


def instance(
    work: Path, env_overrides: Dict[str, Any], splay: bool, ready_w: int, go_r: int
) -> None:
    """One instance, in a forked child: prepare, report ready, wait for the release, sync."""
    # stderr (the agent's log) to the instance's own file
    fd = os.open(work / "agent.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 2)
    os.close(fd)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result: Dict[str, Any] = {"ok": False}
    try:
        cfg = config_from_dict(
            {
                "state_dir": str(work / "state"),
                "env": dict(
                    {
                        "file": str(work / "airflow.env"),
                        "ssm_paths": [PATH],
                        "group": "root",
                        "max_drop_fraction": 1.0,
                    },
                    **env_overrides,
                ),
            }
        )
        ssm = AwsClients(cfg).client("ssm")
        # warm-up (uncounted: the proxy is not armed yet): botocore's first-call set-up and the
        # connection, which a real instance pays on its own CPU, not on the fleet's shared two
        ssm.get_parameters_by_path(Path=PATH, Recursive=True, MaxResults=1)
        sync = EnvSync(cfg, ssm, splay=cfg.env.splay if splay else 0.0)
        os.write(ready_w, b"r")
        os.read(go_r, 1)  # returns b"" for every instance when the parent closes the write end
        started = time.monotonic()
        try:
            sync.run()
            result["ok"] = True
        except Exception as exc:
            result["error"] = str(exc)[:300]
        result.update(
            started=started,
            done=time.monotonic(),
            calls=sync.pacer.calls,
            throttled=sync.pacer.throttled,
            splay=sync.pacer.splayed,
        )
    except BaseException as exc:
        result["error"] = f"set-up: {type(exc).__name__}: {exc}"[:300]
    (work / "result.json").write_text(json.dumps(result))


def run_fleet(
    n: int, behaviour: str, proxy: ThrottleProxy, root: Path, timeout: float
) -> Dict[str, Any]:
    spec = BEHAVIOURS[behaviour]
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pids: List[int] = []
    dirs: List[Path] = []
    # what is already allocated stays shared with every instance (no copy-on-write through
    # the collector touching it)
    gc.freeze()
    for i in range(n):
        work = root / f"{behaviour}-{n}-{i:04d}"
        work.mkdir(parents=True)
        dirs.append(work)
        pid = os.fork()
        if pid == 0:  # the instance
            code = 0
            try:
                os.close(go_w)  # else the release (EOF) would never come
                os.close(ready_r)
                instance(work, spec["env"], spec["splay"], ready_w, go_r)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        pids.append(pid)
    os.close(ready_w)
    os.close(go_r)
    got = 0
    deadline = time.monotonic() + 300
    while got < n and time.monotonic() < deadline:
        chunk = os.read(ready_r, n - got)
        if not chunk:
            break  # every instance exited or reported; some failed their set-up
        got += len(chunk)
    os.close(ready_r)
    memory = children_pss_mb(pids)
    proxy.arm()
    released = time.monotonic()
    os.close(go_w)  # the release: every instance's read returns now
    end_by = released + timeout
    for pid in pids:
        # each instance ends on its own deadline (env.fetch_deadline); this only bounds a hang
        while True:
            done, _status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > end_by:
                os.kill(pid, 9)  # our own child, by its PID
                os.waitpid(pid, 0)
                break
            time.sleep(0.05)
    counts = proxy.counts()
    proxy.disarm()
    results = []
    for work in dirs:
        try:
            results.append(json.loads((work / "result.json").read_text()))
        except (OSError, ValueError):
            results.append({"ok": False, "error": "no result (killed or crashed)"})
    ok = [r for r in results if r["ok"]]
    errors: Dict[str, int] = {}
    for r in results:
        if not r["ok"]:
            key = r.get("error", "?").split(";")[0][:140]
            errors[key] = errors.get(key, 0) + 1
    return {
        "n": n,
        "behaviour": behaviour,
        "ready": got,
        "failed": n - len(ok),
        "converged": max((r["done"] for r in ok), default=released) - released,
        "calls": counts["forwarded"] + counts["throttled"],
        "throttled": counts["throttled"],
        "forwarded": counts["forwarded"],
        "errors": errors,
        "memory_mb": memory,
    }


def children_pss_mb(pids: List[int]) -> float:
    """What the ready instances take together (proportional set size: shared pages split)."""
    total_kb = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total_kb += int(line.split()[1])
        except OSError:
            pass
    return total_kb / 1024


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--instances", type=int, nargs="+", default=[200, 500])
    ap.add_argument("--params", type=int, default=60)
    ap.add_argument("--rate", type=float, default=40.0, help="the proxy's requests per second")
    ap.add_argument("--behaviours", nargs="+", default=["old", "new"], choices=BEHAVIOURS)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds before a hang is killed")
    ap.add_argument("--keep", action="store_true", help="keep the instances' directories")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="aea-fleet-"))
    rows = []
    with AwsServer() as aws:
        seed = aws.client("ssm")
        for i in range(args.params):
            kind = "SecureString" if i % 10 == 0 else "String"
            name = f"{PATH}section{i % 6}/key_{i:03d}"
            seed.put_parameter(Name=name, Value=f"value-{i}", Type=kind, Overwrite=True)
        # pages per sync, as the agent pages (10 per call; moto ends with an empty page)
        aws.clear_calls()
        cfg = config_from_dict({"env": {"ssm_paths": [PATH]}})
        os.environ.update(aws.client_env())
        from agent.jobs.env_sync.sync import fetch_parameters

        fetch_parameters(AwsClients(cfg).client("ssm"), [PATH])
        pages = len(aws.calls("GetParametersByPath"))
        with ThrottleProxy(aws.url, rate=args.rate) as proxy:
            # the instances reach SSM through the proxy only
            os.environ["AWS_ENDPOINT_URL_SSM"] = proxy.url
            for n in args.instances:
                for behaviour in args.behaviours:
                    aws.clear_calls()  # the rig's call log would grow with every run
                    row = run_fleet(n, behaviour, proxy, root, args.timeout)
                    row["ideal"] = n * pages / args.rate
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)

    defaults = config_from_dict({}).env
    print(
        f"\n{args.params} parameters ({pages} pages per sync), proxy {args.rate:g} TPS with "
        f"{args.rate:g} tokens of burst, moto server over HTTP; new = env.splay "
        f"{defaults.splay:g} s, env.fetch_deadline {defaults.fetch_deadline:g} s, "
        f"env.backoff_cap {defaults.backoff_cap:g} s\n"
    )
    print(
        f"| {'N':>4} | {'behaviour':<9} | {'failed':>6} | {'converged s':>11} | {'ideal s':>7} "
        f"| {'x ideal':>7} | {'calls':>6} | {'throttled':>9} | goal |"
    )
    widths = (6, 11, 8, 13, 9, 9, 8, 11, 6)
    print("|" + "|".join("-" * w for w in widths) + "|")
    for r in rows:
        ratio = r["converged"] / r["ideal"]
        goal = "-"
        if r["behaviour"] == "new":
            goal = "met" if r["failed"] == 0 and ratio <= 1.5 else "MISS"
        # with failures, the time is that of the instances that succeeded only
        converged = f"{r['converged']:.1f}" + ("*" if r["failed"] else "")
        print(
            f"| {r['n']:>4} | {r['behaviour']:<9} | {r['failed']:>6} | {converged:>11} "
            f"| {r['ideal']:>7.1f} | {ratio:>6.2f}x | {r['calls']:>6} | {r['throttled']:>9} "
            f"| {goal:<4} |"
        )
    if any(r["failed"] for r in rows):
        print("* the last instance that succeeded; the failed ones never converged")
    for r in rows:
        for error, count in r["errors"].items():
            print(f"  {r['behaviour']} N={r['n']}: {count} x {error}")
    for r in rows:
        print(
            f"memory of the {r['n']} ready instances ({r['behaviour']}): {r['memory_mb']:.0f} MB "
            f"PSS, {r['memory_mb'] / r['n']:.0f} MB each"
        )


if __name__ == "__main__":
    main()
