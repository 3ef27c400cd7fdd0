"""Airflow's REST API on the launched stack, called from inside an instance (the link's
addresses exist only in the sandbox's namespaces), as an operator or a client in the VPC would.

`AirflowApi(member, base)` sends each request with the host's own python3 (urllib); the body
and the bearer token go through stdin, never argv. `login(user, password)` gets a token from
SimpleAuthManager's /auth/token. The helpers cover what the stack's checks and demo need.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from typing import Any, Dict, List, Optional, Tuple

from sandbox.proc import wait_for

_CLIENT = r"""
import json, sys, urllib.error, urllib.request
req = json.load(sys.stdin)
headers = {"Content-Type": "application/json", "Accept": "application/json"}
if req.get("token"):
    headers["Authorization"] = "Bearer " + req["token"]
data = None if req.get("body") is None else json.dumps(req["body"]).encode()
r = urllib.request.Request(req["url"], data=data, method=req["method"], headers=headers)
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(r, timeout=req.get("timeout", 60)) as resp:
        out = {"status": resp.status, "body": resp.read().decode("utf-8", "replace")}
except urllib.error.HTTPError as e:
    out = {"status": e.code, "body": e.read().decode("utf-8", "replace")}
except Exception as e:
    out = {"status": 0, "body": repr(e)}
print(json.dumps(out))
"""


class ApiError(RuntimeError):
    pass


class AirflowApi:
    def __init__(self, member: Any, base: str, token: Optional[str] = None):
        self.member, self.base, self.token = member, base.rstrip("/"), token

    def call(
        self, method: str, path: str, body: Any = None, timeout: float = 60
    ) -> Tuple[int, Any]:
        req = {"method": method, "url": self.base + path, "body": body, "token": self.token}
        req["timeout"] = timeout
        p = self.member.instance.run(
            ["/usr/bin/python3", "-I", "-c", _CLIENT],
            input=json.dumps(req),
            check=False,
            timeout=timeout + 30,
        )
        if p.returncode != 0 or not p.stdout.strip():
            raise ApiError(f"{method} {path}: client failed: {p.stderr[-500:]}")
        out = json.loads(p.stdout.strip().splitlines()[-1])
        try:
            return out["status"], json.loads(out["body"])
        except ValueError:
            return out["status"], out["body"]

    def ok(self, method: str, path: str, body: Any = None, timeout: float = 60) -> Any:
        status, data = self.call(method, path, body, timeout)
        if not 200 <= status < 300:
            raise ApiError(f"{method} {path}: HTTP {status}: {str(data)[:500]}")
        return data

    def login(self, username: str, password: str) -> str:
        status, data = self.call(
            "POST", "/auth/token", {"username": username, "password": password}
        )
        if status not in (200, 201) or "access_token" not in data:
            raise ApiError(f"login as {username}: HTTP {status}: {str(data)[:300]}")
        self.token = data["access_token"]
        return self.token

    # -- DAGs, runs, tasks -----------------------------------------------------------------

    def wait_dag(self, dag_id: str, timeout: float = 300) -> None:
        wait_for(
            lambda: self.call("GET", f"/api/v2/dags/{dag_id}")[0] == 200,
            timeout,
            f"DAG {dag_id} to be parsed",
            interval=2,
        )
        self.ok("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})

    def trigger(self, dag_id: str, run_id: str, conf: Optional[Dict[str, Any]] = None) -> None:
        body = {"dag_run_id": run_id, "logical_date": None, "conf": conf or {}}
        self.ok("POST", f"/api/v2/dags/{dag_id}/dagRuns", body)

    def task_instances(self, dag_id: str, run_id: str) -> List[Dict[str, Any]]:
        run = urllib.parse.quote(run_id, safe="")
        data = self.ok("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run}/taskInstances")
        return sorted(data["task_instances"], key=lambda ti: ti["task_id"])

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 600) -> Dict[str, Any]:
        run = urllib.parse.quote(run_id, safe="")

        def finished() -> Optional[Dict[str, Any]]:
            data = self.ok("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run}")
            return data if data["state"] in ("success", "failed") else None

        return wait_for(finished, timeout, f"run {run_id} of {dag_id} to finish", interval=3)

    def wait_running(self, dag_id: str, run_id: str, count: int, timeout: float = 300) -> list:
        def running() -> Optional[list]:
            tis = [t for t in self.task_instances(dag_id, run_id) if t["state"] == "running"]
            return tis if len(tis) >= count else None

        return wait_for(running, timeout, f"{count} running tasks of {run_id}", interval=2)

    def _log_answer(self, dag_id: str, run_id: str, task_id: str, try_number: int) -> Any:
        run = urllib.parse.quote(run_id, safe="")
        path = f"/api/v2/dags/{dag_id}/dagRuns/{run}/taskInstances/{task_id}/logs/{try_number}"
        return self.ok("GET", path + "?full_content=true")

    def task_log_content(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1):
        """The log endpoint's `content` as Airflow returns it: a list of structured entries
        (each a dict: event, level, error_detail, ...), or the raw answer if it has none."""
        data = self._log_answer(dag_id, run_id, task_id, try_number)
        return data["content"] if isinstance(data, dict) and "content" in data else data

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1) -> str:
        data = self._log_answer(dag_id, run_id, task_id, try_number)
        if isinstance(data, dict) and "content" in data:
            content = data["content"]
            if isinstance(content, list):
                return "\n".join(
                    c.get("event", "") if isinstance(c, dict) else str(c) for c in content
                )
            return str(content)
        return str(data)

    def variable(self, key: str) -> Optional[str]:
        status, data = self.call("GET", f"/api/v2/variables/{urllib.parse.quote(key)}")
        return data.get("value") if status == 200 else None


def elapsed(since: float) -> str:
    return f"{time.monotonic() - since:.0f}s"
