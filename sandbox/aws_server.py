"""Embedded AWS for tests, demo and benchmarks: moto's server app behind a thin wrapper of ours.

The wrapper adds what moto lacks (TESTING.md): it answers Auto Scaling's
`RecordLifecycleActionHeartbeat` and `CompleteLifecycleAction` and records them; it can inject
N errors (throttling, AccessDenied, ...) for any action; and it records every call's service
and action so tests and benchmarks can count API calls. Control endpoints live under `/_rig/`.

Run as `python -m sandbox.aws_server --port-file F`; drive it with `AwsServer`.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import threading
import time
import urllib.parse
import uuid
from typing import Any, Dict, List, Optional

from sandbox.proc import ServerProcess, serve_forever
from sandbox.tiers import heavy

_LIFECYCLE_ACTIONS = ("RecordLifecycleActionHeartbeat", "CompleteLifecycleAction")
_SCOPE_RE = re.compile(r"Credential=[^/]+/\d+/[^/]+/([^/]+)/aws4_request")


class RigApp:
    """WSGI middleware around moto's DomainDispatcherApplication."""

    def __init__(self, moto_app):
        self.moto_app = moto_app
        self.lock = threading.Lock()
        self.faults: Dict[str, List[Dict[str, Any]]] = {}
        self.calls: List[Dict[str, Any]] = []
        self.lifecycle: List[Dict[str, Any]] = []

    # -- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _json(start_response, status: str, body: Any):
        data = json.dumps(body).encode()
        start_response(
            status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
        )
        return [data]

    def _control(self, environ, start_response, path: str, body: bytes):
        method = environ["REQUEST_METHOD"]
        payload = json.loads(body or b"{}")
        with self.lock:
            if path == "/_rig/health":
                return self._json(start_response, "200 OK", "ok")
            if path == "/_rig/faults" and method == "POST":
                fault = {
                    "code": payload.get("code", "ThrottlingException"),
                    "status": int(payload.get("status", 400)),
                    "message": payload.get("message", "Rate exceeded"),
                    "remaining": int(payload.get("count", 1)),
                }
                self.faults.setdefault(payload["action"], []).append(fault)
                return self._json(start_response, "200 OK", {"ok": True})
            if path == "/_rig/faults" and method == "DELETE":
                self.faults.clear()
                return self._json(start_response, "200 OK", {"ok": True})
            if path == "/_rig/calls":
                return self._json(start_response, "200 OK", self.calls)
            if path == "/_rig/calls/clear":
                self.calls.clear()
                return self._json(start_response, "200 OK", {"ok": True})
            if path == "/_rig/lifecycle":
                return self._json(start_response, "200 OK", self.lifecycle)
            if path == "/_rig/reset":
                self.faults.clear()
                self.calls.clear()
                self.lifecycle.clear()
        if path == "/_rig/reset":
            # moto's own reset, through its app, so every backend is cleared
            inner = dict(environ)
            inner.update(
                {
                    "PATH_INFO": "/moto-api/reset",
                    "REQUEST_METHOD": "POST",
                    "wsgi.input": io.BytesIO(b""),
                    "CONTENT_LENGTH": "0",
                }
            )
            list(self.moto_app(inner, lambda *a, **k: None))
            return self._json(start_response, "200 OK", {"ok": True})
        return self._json(start_response, "404 Not Found", {"error": path})

    @staticmethod
    def _identify(environ, body: bytes) -> tuple[str, str, Dict[str, str]]:
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        scope = _SCOPE_RE.search(environ.get("HTTP_AUTHORIZATION", ""))
        service = scope.group(1) if scope else ""
        if target:
            return service, target.rsplit(".", 1)[-1], {}
        params = dict(urllib.parse.parse_qsl(environ.get("QUERY_STRING", "")))
        ctype = environ.get("CONTENT_TYPE", "")
        if "x-www-form-urlencoded" in ctype:
            params.update(urllib.parse.parse_qsl(body.decode("utf-8", "replace")))
        return service, params.get("Action", ""), params

    @staticmethod
    def _error(start_response, json_protocol: bool, fault: Dict[str, Any]):
        status = f"{fault['status']} Error"
        if json_protocol:
            data = json.dumps({"__type": fault["code"], "message": fault["message"]}).encode()
            headers = [
                ("Content-Type", "application/x-amz-json-1.1"),
                ("x-amzn-ErrorType", fault["code"]),
            ]
        else:
            data = (
                "<ErrorResponse><Error><Type>Sender</Type>"
                f"<Code>{fault['code']}</Code><Message>{fault['message']}</Message>"
                f"</Error><RequestId>{uuid.uuid4()}</RequestId></ErrorResponse>"
            ).encode()
            headers = [("Content-Type", "text/xml")]
        headers.append(("Content-Length", str(len(data))))
        start_response(status, headers)
        return [data]

    @staticmethod
    def _lifecycle_ok(start_response, action: str):
        data = (
            f'<{action}Response xmlns="http://autoscaling.amazonaws.com/doc/2011-01-01/">'
            f"<{action}Result/><ResponseMetadata><RequestId>{uuid.uuid4()}</RequestId>"
            f"</ResponseMetadata></{action}Response>"
        ).encode()
        start_response("200 OK", [("Content-Type", "text/xml"), ("Content-Length", str(len(data)))])
        return [data]

    # -- WSGI ------------------------------------------------------------------------------

    def __call__(self, environ, start_response):
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        path = environ.get("PATH_INFO", "")
        if path.startswith("/_rig/"):
            return self._control(environ, start_response, path, body)
        service, action, params = self._identify(environ, body)
        json_protocol = bool(environ.get("HTTP_X_AMZ_TARGET"))
        with self.lock:
            call = {"service": service, "action": action, "time": time.time()}
            if action in _LIFECYCLE_ACTIONS:
                call["params"] = params
            self.calls.append(call)
            queue = self.faults.get(action) or []
            fault: Optional[Dict[str, Any]] = None
            if queue:
                fault = queue[0]
                fault["remaining"] -= 1
                if fault["remaining"] <= 0:
                    queue.pop(0)
        if fault is not None:
            return self._error(start_response, json_protocol, fault)
        if action in _LIFECYCLE_ACTIONS:
            with self.lock:
                self.lifecycle.append({"action": action, "time": time.time(), "params": params})
            return self._lifecycle_ok(start_response, action)
        # moto reads the body itself, so hand it a fresh stream holding what we consumed
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        return self.moto_app(environ, start_response)


@heavy("aws")
class AwsServer(ServerProcess):
    """The embedded AWS as a child process, with Python methods for its control API."""

    def __init__(self):
        super().__init__("sandbox.aws_server")

    def reset(self) -> None:
        self.post("/_rig/reset")

    def inject(
        self,
        action: str,
        code: str = "ThrottlingException",
        count: int = 1,
        status: int = 400,
        message: str = "Rate exceeded",
    ) -> None:
        self.post(
            "/_rig/faults",
            {"action": action, "code": code, "count": count, "status": status, "message": message},
        )

    def clear_faults(self) -> None:
        self.request("DELETE", "/_rig/faults")

    def calls(self, action: Optional[str] = None) -> List[Dict[str, Any]]:
        calls = self.get("/_rig/calls")
        return [c for c in calls if action is None or c["action"] == action]

    def clear_calls(self) -> None:
        self.post("/_rig/calls/clear")

    def lifecycle_actions(self) -> List[Dict[str, Any]]:
        return self.get("/_rig/lifecycle")

    def client(self, service: str) -> Any:
        """A boto3 client of `service` on this server (for seeding and inspecting state)."""
        import boto3

        return boto3.client(
            service,
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def client_env(self) -> Dict[str, str]:
        """Environment for a process (the agent, boto3) that should talk to this server."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()

    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    app = RigApp(DomainDispatcherApplication(create_backend_app))
    server = make_server(
        "127.0.0.1", args.port, app, threaded=True, request_handler=MotoRequestHandler
    )
    serve_forever(server, args.port_file)


if __name__ == "__main__":
    main()
