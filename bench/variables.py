"""Benchmark: `airflow-agent variables sync` vs a full `airflow variables import`, same run.

5,000 variables in one Secrets Manager secret (moto over HTTP), the real Airflow 3.3 CLI and
interpreter on SQLite (or PostgreSQL). Cases, one key changed each time unless said otherwise:
  full import     the anchor's way: `airflow variables import all.json -a overwrite`, all keys
  cli one-shot    `variables sync`, method cli: import of 1 key + export of all to verify
                  (two Airflow CLI processes)
  api one-shot    `variables sync`, method api: one cold bridge (the Airflow venv's python,
                  `import airflow` paid once), set 1 key, read its digest back
  watch (warm)    `variables watch --interval 1` already running with a warm bridge: from
                  put_secret_value to the daemon's `synced_at` (recorded after the read-back
                  verified the key); includes waiting for the next poll (<= the interval).
                  The sync's own work (the daemon's `last_sync_seconds`) is printed below.
  unchanged       `variables sync` with the same secret version: no Airflow process at all
Wall time includes everything each does (ours: Python start, GetSecretValue, planning, Airflow).
Each case runs --repeat times; the table shows the median. The warm bridge's and the watch
daemon's resident memory (VmRSS) are printed after the watch runs.

Run: .venv/bin/python bench/variables.py [--n 5000] [--repeat 3] [--db sqlite|postgres]
(--db postgres starts a throwaway PostgreSQL 15 from Debian's package on 127.0.0.1, as the
`postgres` user, fsync on, and stops it by its PID at the end.)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sandbox.airflow_cluster import AIRFLOW  # noqa: E402
from sandbox.aws_server import AwsServer  # noqa: E402
from sandbox.proc import end_process  # noqa: E402

SECRET_ID = "bench/variables"
PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_postgres() -> tuple:
    """(Popen, sqlalchemy URL, data dir) of a throwaway PostgreSQL owned by user postgres."""
    import pwd

    pg = pwd.getpwnam("postgres")
    data = Path(tempfile.mkdtemp(prefix="bench-pg-"))
    os.chown(data, pg.pw_uid, pg.pw_gid)
    as_pg = {"user": pg.pw_uid, "group": pg.pw_gid, "extra_groups": []}
    subprocess.run(
        [str(PG_BIN / "initdb"), "-D", str(data / "db"), "-A", "trust", "-U", "postgres"],
        check=True,
        capture_output=True,
        cwd=str(data),
        **as_pg,
    )
    port = _free_port()
    proc = subprocess.Popen(
        [
            str(PG_BIN / "postgres"),
            "-D",
            str(data / "db"),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-k",
            str(data),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=str(data),
        **as_pg,
    )
    deadline = time.monotonic() + 60
    while (
        subprocess.run(
            [str(PG_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)], capture_output=True
        ).returncode
        != 0
    ):
        if time.monotonic() > deadline or proc.poll() is not None:
            sys.exit("PostgreSQL did not start")
        time.sleep(0.2)
    subprocess.run(
        [str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "airflow"],
        check=True,
        capture_output=True,
    )
    return proc, f"postgresql+psycopg2://postgres@127.0.0.1:{port}/airflow", data


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def run_watch(args, work: Path, config: Path, env: dict, sm, secret: dict) -> tuple:
    """Runs `variables watch`; per change, put -> the daemon's verified synced_at."""
    state = work / "state" / "variables.json"
    watch_state = work / "state" / "variables-watch.json"
    log = open(work / "watch.log", "wb")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "--config", str(config)]
        + ["--log-level", "DEBUG", "variables", "watch", "--interval", str(args.watch_interval)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
        cwd=str(REPO),
    )

    def wait(pred, what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"watch: no {what}: " + (work / "watch.log").read_text()[-2000:])
            time.sleep(0.02)

    def doc(path: Path) -> dict:
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return {}

    runs: list = []
    work_s: list = []
    try:
        wait(lambda: doc(watch_state).get("bridge_pid"), "warm bridge")
        for r in range(max(args.repeat, 9)):
            # a change arrives at a random moment of the poll cycle, as in life
            time.sleep(random.uniform(0, args.watch_interval))
            key = f"bench_key_{2000 + r:05d}"
            secret[key] = f"changed-watch-{r}-{os.urandom(8).hex()}"
            t_put = time.time()
            version = sm.put_secret_value(SecretId=SECRET_ID, SecretString=json.dumps(secret))[
                "VersionId"
            ]
            t_put = (t_put + time.time()) / 2
            wait(lambda: doc(state).get("version_id") == version, "sync of the change")
            st = doc(state)
            runs.append((st["synced_at"] - t_put, st["counts"]["imported"], 0))
            wait(lambda: doc(watch_state).get("syncs", 0) >= r + 1, "watch state")
            work_s.append((doc(watch_state)["last_sync_seconds"], 1, 0))
        ws = doc(watch_state)
        rss = {"bridge": _rss_kib(ws["bridge_pid"]), "agent": _rss_kib(proc.pid)}
        rss["work"] = work_s
    finally:
        end_process(proc, grace=60)
        log.close()
    return runs, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    ap.add_argument("--watch-interval", type=float, default=1.0, help="variables watch --interval")
    args = ap.parse_args()
    pg = start_postgres() if args.db == "postgres" else None
    try:
        run_bench(args, pg)
    finally:
        if pg:
            end_process(pg[0], grace=30)
            shutil.rmtree(pg[2], ignore_errors=True)


def run_bench(args: argparse.Namespace, pg) -> None:

    work = Path(tempfile.mkdtemp(prefix="bench-variables-"))
    home = work / "airflow-home"
    home.mkdir()
    airflow_env = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": pg[1] if pg else f"sqlite:///{home}/airflow.db",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    }
    if pg:
        # the venv has no asyncpg; the variables commands never use the async engine
        airflow_env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC"] = (
            f"sqlite+aiosqlite:///{home}/x.db"
        )
    env_file = work / "airflow.env"
    env_file.write_text("".join(f'{k}="{v}"\n' for k, v in airflow_env.items()))
    cli_env = {"PATH": os.environ["PATH"], **airflow_env}
    mig = subprocess.run(
        [str(AIRFLOW), "db", "migrate"], env=cli_env, capture_output=True, text=True
    )
    if mig.returncode != 0:
        sys.exit("airflow db migrate failed: " + (mig.stdout + mig.stderr)[-3000:])

    # a wrapper that counts our Airflow calls, then execs the real CLI
    calls = work / "calls.log"
    wrapper = work / "airflow-counting"
    wrapper.write_text(f'#!/bin/sh\necho "$1 $2" >> {calls}\nexec {AIRFLOW} "$@"\n')
    wrapper.chmod(0o755)

    aws = AwsServer().start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(aws.client_env())
        env.update(AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null")
        env["PYTHONPATH"] = str(REPO)
        configs = {}
        for method in ("cli", "api"):
            configs[method] = work / f"agent-{method}.yaml"
            configs[method].write_text(
                json.dumps(
                    {
                        "state_dir": str(work / "state"),
                        "env": {"file": str(env_file)},
                        "variables": {
                            "secret_id": SECRET_ID,
                            "airflow_command": [str(wrapper)],
                            "airflow_python": str(AIRFLOW.parent / "python"),
                            "method": method,
                            "user": None,
                        },
                    }
                )
            )

        sm = aws.client("secretsmanager")
        secret = {f"bench_key_{i:05d}": f"value-{i}-{os.urandom(8).hex()}" for i in range(args.n)}
        sm.create_secret(Name=SECRET_ID, SecretString=json.dumps(secret))
        all_file = work / "all.json"

        def sync(method: str = "cli") -> tuple:
            config = configs[method]
            before = len(calls.read_text().splitlines()) if calls.exists() else 0
            t0 = time.monotonic()
            proc = subprocess.run(
                [sys.executable, "-m", "agent", "--config", str(config), "variables", "sync"],
                env=env,
                capture_output=True,
                text=True,
                cwd=str(REPO),
            )
            wall = time.monotonic() - t0
            if proc.returncode != 0:
                sys.exit(f"sync failed: {proc.stderr}")
            after = len(calls.read_text().splitlines()) if calls.exists() else 0
            state = json.loads((work / "state" / "variables.json").read_text())
            written = state["counts"]["imported"] if "no Airflow call" not in proc.stderr else 0
            if method == "api":
                # Airflow processes started: the bridge (its requests are not processes)
                return wall, written, 0 if written == 0 else 1
            return wall, written, after - before

        wall, written, ncalls = sync("cli")
        print(f"(first sync, cli, all {args.n} new: {wall:.1f} s, {written} written)")
        # the api's first full sync (every key again, --all): its cost for a new instance
        t0 = time.monotonic()
        subprocess.run(
            [sys.executable, "-m", "agent", "--config", str(configs["api"])]
            + ["variables", "sync", "--all"],
            env=env,
            capture_output=True,
            check=True,
            cwd=str(REPO),
        )
        print(f"(full sync, api, all {args.n} keys: {time.monotonic() - t0:.1f} s)")

        full, change, unchanged, api_change = [], [], [], []
        for r in range(args.repeat):
            # the anchor: every key, every time anything changed
            all_file.write_text(json.dumps(secret))
            t0 = time.monotonic()
            out = subprocess.run(
                [str(AIRFLOW), "variables", "import", str(all_file), "-a", "overwrite"],
                env=cli_env,
                capture_output=True,
                text=True,
            )
            full.append((time.monotonic() - t0, args.n if out.returncode == 0 else -1, 1))
            all_file.unlink()

            key = f"bench_key_{r:05d}"
            secret[key] = f"changed-{r}-{os.urandom(8).hex()}"
            sm.put_secret_value(SecretId=SECRET_ID, SecretString=json.dumps(secret))
            change.append(sync("cli"))
            unchanged.append(sync("cli"))

            key = f"bench_key_{1000 + r:05d}"
            secret[key] = f"changed-api-{r}-{os.urandom(8).hex()}"
            sm.put_secret_value(SecretId=SECRET_ID, SecretString=json.dumps(secret))
            api_change.append(sync("api"))
            unchanged.append(sync("api"))

        warm, rss = run_watch(args, work, configs["api"], env, sm, secret)

        def row(name: str, runs: list) -> str:
            wall = statistics.median(r[0] for r in runs)
            return f"| {name:<38} | {runs[0][1]:>12} | {runs[0][2]:>13} | {wall:>13.3f} |", wall

        db = "PostgreSQL 15 (localhost)" if pg else "SQLite"
        print(f"\n{args.n} variables, median of {args.repeat} runs, real Airflow CLI on {db}\n")
        print(f"| {'case':<38} | keys written | Airflow procs | wall time (s) |")
        print(f"|{'-' * 40}|--------------|---------------|---------------|")
        line, t_full = row("full `variables import` (all)", full)
        print(line)
        line, t_change = row("ours, cli one-shot", change)
        print(line)
        line, t_api = row("ours, api one-shot (cold bridge)", api_change)
        print(line)
        line, t_warm = row(f"ours, watch: put -> verified, {args.watch_interval:g}s poll", warm)
        print(line)
        line, t_work = row("ours, watch: the sync's own work", rss["work"])
        print(line)
        line, t_same = row("ours: secret unchanged", unchanged)
        print(line)
        print(
            f"\nspeed-up vs full import, 1 change: cli {t_full / t_change:.1f}x, "
            f"api one-shot {t_full / t_api:.1f}x, watch {t_full / t_warm:.1f}x end to end, "
            f"{t_full / t_work:.0f}x on the sync's own work; "
            f"unchanged {t_full / t_same:.1f}x"
        )
        print(
            f"(watch rows: median of {len(warm)} changes made at random moments of the poll "
            "cycle; 'own work' = GetSecretValue, plan, set, verify, state, timed by the daemon)"
        )
        print(
            f"resident memory while idle: warm bridge {rss['bridge'] / 1024:.0f} MiB, "
            f"watch daemon {rss['agent'] / 1024:.0f} MiB (VmRSS)"
        )
    finally:
        aws.stop()
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
