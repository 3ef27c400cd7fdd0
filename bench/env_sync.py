"""Benchmark: `env sync` for 1,000 SSM parameters vs a naive GetParameter loop, same run.

Prints a table of API calls and wall time (median of several rounds) for:
  naive       one GetParameter(WithDecryption) per known name, then write the file
  bare fetch  the paginated GetParametersByPath loop alone (no mapping, no file)
  env sync    the full job (fetch, map, encode, round-trip check, atomic write)
  env sync 2  the same again with nothing changed (must write nothing)
Run: .venv/bin/python bench/env_sync.py [--params 1000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from agent.config import config_from_dict  # noqa: E402
from agent.jobs.env_sync.sync import EnvSync, fetch_parameters  # noqa: E402
from agent.platform.aws import AwsClients  # noqa: E402
from agent.platform.envfile import encode_env  # noqa: E402
from agent.platform.fsutil import atomic_write  # noqa: E402
from sandbox.aws_server import AwsServer  # noqa: E402

PATH = "/airflow/bench/"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--params", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    n = args.params
    with AwsServer() as aws:
        os.environ.update(aws.client_env())
        work = Path(tempfile.mkdtemp(prefix="aea-bench-"))
        cfg = config_from_dict(
            {
                "state_dir": str(work / "state"),
                "env": {
                    "file": str(work / "airflow.env"),
                    "ssm_paths": [PATH],
                    "group": "root",
                    "max_drop_fraction": 1.0,
                },
            }
        )
        ssm = AwsClients(cfg).client("ssm")
        names = []
        for i in range(n):
            section = f"section{i % 20}"
            name = f"{PATH}{section}/key_{i:04d}"
            kind = "SecureString" if i % 10 == 0 else "String"
            ssm.put_parameter(Name=name, Value=f"value-{i}-" + "x" * 40, Type=kind, Overwrite=True)
            names.append(name)

        def measure(fn):
            times, calls = [], []
            for _ in range(args.rounds):
                aws.clear_calls()
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
                calls.append(
                    len([c for c in aws.calls() if c["action"].startswith("GetParameter")])
                )
            return statistics.median(times), max(calls)

        def naive():
            values = {}
            for name in names:
                p = ssm.get_parameter(Name=name, WithDecryption=True)["Parameter"]
                values[name.rsplit("/", 1)[-1].upper()] = p["Value"]
            atomic_write(work / "naive.env", encode_env(values), mode=0o640)

        def bare():
            fetch_parameters(ssm, [PATH])

        env_path = Path(cfg.env.file)

        def full_sync():
            env_path.unlink(missing_ok=True)
            EnvSync(cfg, ssm).run()

        rows = []
        rows.append(("naive GetParameter loop",) + measure(naive) + ("yes",))
        bare_t, bare_c = measure(bare)
        rows.append(("bare paginated fetch", bare_t, bare_c, "no"))
        sync_t, sync_c = measure(full_sync)
        rows.append(("env sync (writes file)", sync_t, sync_c, "yes"))
        before = os.stat(env_path)
        again_t, again_c = measure(lambda: EnvSync(cfg, ssm).run())
        after = os.stat(env_path)
        unchanged = (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
        rows.append(
            ("env sync, nothing changed", again_t, again_c, "no" if unchanged else "YES (bug)")
        )

    goal_calls = -(-n // 10) + 1
    print(
        f"\n{n} parameters ({n // 10} SecureString), median of {args.rounds} rounds, "
        "moto server over HTTP\n"
    )
    print(f"| {'method':<28} | {'API calls':>9} | {'wall s':>7} | {'vs naive':>8} | wrote file |")
    print(f"|{'-' * 30}|{'-' * 11}|{'-' * 9}|{'-' * 10}|------------|")
    naive_t = rows[0][1]
    for name, t, calls, wrote in rows:
        print(f"| {name:<28} | {calls:>9} | {t:>7.3f} | {naive_t / t:>7.1f}x | {wrote:<10} |")
    overhead = (sync_t - bare_t) / bare_t
    print(
        f"\ncalls goal ceil(N/10)+1 = {goal_calls}: env sync made {sync_c} -> "
        f"{'met' if sync_c <= goal_calls else 'MISSED'}"
    )
    print(
        f"overhead of env sync over the bare fetch: {overhead:+.1%} (goal <= +10%) -> "
        f"{'met' if overhead <= 0.10 else 'MISSED'}"
    )
    print(f"second sync wrote nothing: {unchanged}")


if __name__ == "__main__":
    main()
