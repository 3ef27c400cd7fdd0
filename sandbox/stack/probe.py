"""What the launched stack's checks watch while a deployment or an update runs: a health probe
(GET each URL every `interval` s from inside an instance, every answer kept) and a sampler of
the load balancer stand-in's rotation.

It runs as a transient systemd service on the instance (`systemd-run`), so one process does
every request (no process per probe) and it outlives no test: the block's exit stops it and
reads its record (one JSON line per request: url, time, HTTP status or 0 and the error).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

from sandbox.proc import wait_for

_PROBE = r"""
import json, sys, time, urllib.error, urllib.request
urls, interval, out = json.loads(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
limit = float(sys.argv[4])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
with open(out, "a", buffering=1) as f:
    while True:
        tick = time.monotonic()
        for url in urls:
            t = time.time()
            try:
                with opener.open(url, timeout=limit) as resp:
                    status, err = resp.status, ""
            except urllib.error.HTTPError as e:
                status, err = e.code, ""
            except Exception as e:
                status, err = 0, repr(e)[:200]
            took = time.time() - t
            row = {"url": url, "t": t, "took": took, "status": status, "error": err}
            f.write(json.dumps(row) + "\n")
        time.sleep(max(0.0, interval - (time.monotonic() - tick)))
"""

_UNIT = "sandbox-health-probe"
# how long one probe waits for its answer: the task SDK's own wait for an execution API call
# ([workers] execution_api_timeout, 5 s), so a probe fails when a task's call would have
EXECUTION_API_TIMEOUT = 5.0
_OUT = "/run/sandbox-health-probe.jsonl"


@dataclass
class ProbeResult:
    answers: List[Dict[str, Any]]

    def failures(self) -> List[Dict[str, Any]]:
        return [a for a in self.answers if a["status"] != 200]

    def count(self, url: str) -> int:
        return sum(1 for a in self.answers if a["url"] == url)

    def slowest(self) -> float:
        """The longest any answer took (s)."""
        return max((a.get("took", 0.0) for a in self.answers), default=0.0)

    def failure_times(self) -> List[float]:
        """Seconds from the first answer to each failure."""
        start = self.answers[0]["t"] if self.answers else 0.0
        return [round(a["t"] - start, 1) for a in self.failures()]

    def span(self) -> float:
        """Seconds from the first answer to the last."""
        times = [a["t"] for a in self.answers]
        return max(times) - min(times) if times else 0.0


class HealthProbe:
    def __init__(self, member: Any, urls: Sequence[str], interval: float = 0.5) -> None:
        self.host = member.instance.host
        self.urls, self.interval = list(urls), interval
        self.result = ProbeResult([])

    def __enter__(self) -> HealthProbe:
        self.host.run(["rm", "-f", _OUT])
        self.host.run(
            ["systemd-run", f"--unit={_UNIT}", "--collect", "/usr/bin/python3", "-I", "-c",
             _PROBE, json.dumps(self.urls), str(self.interval), _OUT, str(EXECUTION_API_TIMEOUT)]
        )  # fmt: skip
        # started: every URL answered once (whatever it answered)
        wait_for(lambda: len(self._read()) >= len(self.urls), 30, "the health probe's first round")
        return self

    def _read(self) -> List[Dict[str, Any]]:
        p = self.host.run(["cat", _OUT], check=False)
        return [json.loads(ln) for ln in p.stdout.splitlines() if ln.strip().endswith("}")]

    def __exit__(self, *exc: object) -> None:
        self.host.run(["systemctl", "stop", _UNIT], check=False)
        self.result = ProbeResult(self._read())


class RotationSampler:
    """Which targets the load balancer stand-in sends new requests to (`in_rotation()`),
    sampled every `interval` s from a thread while a block runs: at most how many were out at
    once, and which were ever out."""

    def __init__(self, lb: Any, interval: float = 0.2) -> None:
        self.lb, self.interval = lb, interval
        self.samples: List[Tuple[float, List[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rotation-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), list(self.lb.in_rotation())))
            self._stop.wait(self.interval)

    def __enter__(self) -> RotationSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def max_out(self) -> int:
        return max((len(self.lb.targets) - len(now) for _, now in self.samples), default=0)

    def ever_out(self) -> List[str]:
        return sorted({t for _, now in self.samples for t in self.lb.targets if t not in now})
