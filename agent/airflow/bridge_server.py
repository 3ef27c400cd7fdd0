"""The Airflow side of `variables.method: api`: a co-process in the Airflow venv's interpreter.

This file is shipped in the agent's package but never imported into the Airflow venv: the agent
sends its source as the first line of the co-process's stdin (see agent/airflow/bridge_client.py),
so nothing of ours has to be installed next to Airflow. It must therefore stay standalone:
standard library plus Airflow, Python >= 3.9.

Protocol: newline-delimited JSON. The co-process first prints one `hello` line (after `import
airflow`, which is the cost paid once), then answers one line per request, in order:

  {"op": "ping"}                                  -> {"ok": true}  (also checks the database)
  {"op": "set", "items": {key: {"value": str, "description": str|null}}}
                                                  -> {"ok": true, "failed": {key: "ErrorClass"}}
  {"op": "delete", "keys": [key, ...]}            -> {"ok": true, "failed": {key: "ErrorClass"}}
  {"op": "digest", "keys": [...], "hmac_key": hex}
        -> {"ok": true, "digests": {key: hex | null (absent)}, "failed": {key: "ErrorClass"}}
  anything else / a broken request                -> {"ok": false, "error": "ErrorClass"}

Values travel only over the pipe, one way: they are never echoed back. Verification reads each
key in a new database session and answers an HMAC (key chosen by the agent per co-process) of
what is stored, so the agent compares digests, not values. Errors are reported as exception
class names only: SQLAlchemy's messages quote the statement's parameters (the values).

Writes go through `airflow.models.Variable.set/delete`, Airflow's own API (what `airflow
variables import` calls per key, with the same upsert, encryption and cache invalidation). Run
outside a task there is no Task SDK supervisor, so it writes to the metadata database directly.
Airflow logs to stdout; the protocol keeps the original stdout to itself and points file
descriptor 1 at stderr (which the agent discards) before Airflow is imported.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sys

# never committed: the warm-up's write is rolled back
WARMUP_KEY = "__airflow_agent_bridge_warm_up__"
# SQLite's default limit on bound parameters is 999 in old builds; keep IN lists below it
CHUNK = 500


def digest(hmac_key: bytes, stored: str, description) -> str:
    """The agent computes the same over what it meant to store (variables_plan.stored_form)."""
    material = json.dumps([stored, description], ensure_ascii=True)
    return hmac.new(hmac_key, material.encode("ascii"), hashlib.sha256).hexdigest()


def _err(exc: BaseException) -> str:
    return type(exc).__name__


def _load_err(exc: BaseException) -> str:
    """Why Airflow did not load: the class, and for an OS error its strerror (the OS's or
    the stdlib's words, not a setting's value), e.g. no usable temporary directory."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return _err(exc)


class Bridge:
    def __init__(self):
        # imported here: the agent imports this module for `digest` without Airflow installed
        from airflow.models.variable import Variable
        from airflow.utils.session import create_session
        from sqlalchemy import select, text

        self.Variable = Variable
        self.create_session = create_session
        self.select = select
        self.text = text

    def warm_up(self) -> None:
        """Pay Airflow's lazy set-up (secrets backends, fernet, the dialect's upsert) before the
        first change instead of during it: the same Variable.set a change makes, rolled back."""
        from airflow import settings

        session = settings.Session()
        try:
            self.Variable.set(WARMUP_KEY, "warm-up", description=None, session=session)
        finally:
            session.rollback()
            session.close()

    def ping(self, _req: dict) -> dict:
        with self.create_session() as session:
            session.execute(self.text("SELECT 1"))
        return {"ok": True}

    def set(self, req: dict) -> dict:
        failed = {}
        for key, item in req["items"].items():
            try:
                # one session (one transaction) per key: a key that fails leaves the rest
                self.Variable.set(key, item["value"], description=item.get("description"))
            except Exception as exc:
                failed[key] = _err(exc)
        return {"ok": True, "failed": failed}

    def delete(self, req: dict) -> dict:
        failed = {}
        for key in req["keys"]:
            try:
                self.Variable.delete(key)
            except Exception as exc:
                failed[key] = _err(exc)
        return {"ok": True, "failed": failed}

    def digest(self, req: dict) -> dict:
        hmac_key = bytes.fromhex(req["hmac_key"])
        keys = list(req["keys"])
        digests = {k: None for k in keys}
        failed = {}
        Variable = self.Variable
        for i in range(0, len(keys), CHUNK):
            chunk = keys[i : i + CHUNK]
            # a new session per read: what another connection committed, not a cached object
            with self.create_session() as session:
                rows = session.scalars(self.select(Variable).where(Variable.key.in_(chunk)))
                for var in rows:
                    try:
                        digests[var.key] = digest(hmac_key, var.val, var.description)
                    except Exception as exc:  # e.g. InvalidFernetToken: a wrong fernet key
                        failed[var.key] = _err(exc)
                        digests[var.key] = None
        return {"ok": True, "digests": digests, "failed": failed}


def main() -> None:
    # the protocol's stdout is ours alone; Airflow's log lines (stdout) go to stderr
    proto = os.fdopen(os.dup(1), "w", encoding="utf-8", newline="\n")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(doc: dict) -> None:
        proto.write(json.dumps(doc, ensure_ascii=True) + "\n")
        proto.flush()

    try:
        bridge = Bridge()
        bridge.warm_up()
        import airflow

        version = getattr(airflow, "__version__", "?")
    except BaseException as exc:  # noqa: BLE001 - reported by class name, then exit
        send({"op": "hello", "ok": False, "error": _load_err(exc)})
        sys.exit(3)
    send({"op": "hello", "ok": True, "airflow": version, "pid": os.getpid()})
    ops = {"ping": bridge.ping, "set": bridge.set, "delete": bridge.delete, "digest": bridge.digest}
    for line in sys.stdin:
        try:
            req = json.loads(line)
            reply = ops[req["op"]](req)
        except Exception as exc:
            reply = {"ok": False, "error": _err(exc)}
        send(reply)


if __name__ in ("__main__", "__airflow_bridge__"):
    main()
