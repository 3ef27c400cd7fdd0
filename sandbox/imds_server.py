"""A strict IMDSv2 server for tests, demo and benchmarks (moto's IMDS is v1 and lacks tags).

Rules it enforces: `PUT /latest/api/token` needs `X-aws-ec2-metadata-token-ttl-seconds` in
1..21600 (else 400); GET of the token path is 405; any other GET without a live token is 401;
a request carrying `X-Forwarded-For` is 403, as on EC2. Unknown paths are 404.
Control endpoints under `/_rig/` change answers at run time, expire tokens, return a log of
requests, and make a path answer what no real IMDS sends (`/_rig/fault`, `ImdsServer.fault`):
- `truncated`: a 200 whose Content-Length promises more than the body, then the connection
  closes (http.client's IncompleteRead);
- `bad-status-line`: a status line that is not HTTP, then close (BadStatusLine);
- `reset`: the connection closes without an answer (RemoteDisconnected);
- `raw`: these exact bytes on the wire (`raw` in the payload), then close.
A path's ordinary value (set with `set_paths`) is how a well-formed HTTP answer carries a bad
body (e.g. a Spot notice that is not JSON).
Run as `python -m sandbox.imds_server --port-file F`; drive it with `ImdsServer`.
"""

from __future__ import annotations

import argparse
import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional

from sandbox.proc import ServerProcess, serve_forever
from sandbox.tiers import heavy

INSTANCE_ID = "i-0123456789abcdef0"
FAULTS = ("truncated", "bad-status-line", "reset", "raw")


def default_metadata(region: str = "us-east-1") -> Dict[str, Optional[str]]:
    doc = {
        "instanceId": INSTANCE_ID,
        "region": region,
        "availabilityZone": region + "a",
        "accountId": "123456789012",
        "instanceType": "m6i.large",
        "imageId": "ami-0abcdef1234567890",
    }
    return {
        "meta-data/instance-id": INSTANCE_ID,
        "meta-data/placement/region": region,
        "meta-data/placement/availability-zone": region + "a",
        "meta-data/autoscaling/target-lifecycle-state": "InService",
        "meta-data/iam/security-credentials": "airflow-agent-role",
        "meta-data/iam/security-credentials/airflow-agent-role": json.dumps(
            {
                "Code": "Success",
                "Type": "AWS-HMAC",
                "AccessKeyId": "testing",
                "SecretAccessKey": "testing",
                "Token": "testing",
                "Expiration": "2099-01-01T00:00:00Z",
            }
        ),
        "dynamic/instance-identity/document": json.dumps(doc),
    }


class ImdsState:
    def __init__(self):
        self.lock = threading.Lock()
        self.values: Dict[str, Optional[str]] = default_metadata()
        self.tags: Dict[str, str] = {}
        self.tokens: Dict[str, float] = {}
        self.log: List[Dict[str, Any]] = []
        # path (relative to /latest/) -> {"fault": kind, "raw": text}
        self.faults: Dict[str, Dict[str, Any]] = {}

    def lookup(self, path: str) -> Optional[str]:
        path = path.strip("/")
        if path == "meta-data/tags/instance":
            return "\n".join(sorted(self.tags)) if self.tags else None
        if path.startswith("meta-data/tags/instance/"):
            return self.tags.get(path[len("meta-data/tags/instance/") :])
        return self.values.get(path)


class Handler(BaseHTTPRequestHandler):
    state: ImdsState  # set on the class by main()
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output quiet; the request log is in /_rig/log
        pass

    def _logged(self, status: Any) -> None:
        """Record the request before its answer goes out: a client that has the answer (or
        the fault) must find it in /_rig/log, and a late entry must not land in the log of
        whatever the test does next (after a reset)."""
        with self.state.lock:
            self.state.log.append(
                {"method": self.command, "path": self.path, "status": status, "time": time.time()}
            )

    def _send(self, status: int, body: str = "", ctype: str = "text/plain") -> None:
        data = body.encode()
        self._logged(status)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    # -- control ---------------------------------------------------------------------------

    def _control(self) -> None:
        st = self.state
        payload = json.loads(self._body() or b"{}")
        path = self.path
        with st.lock:
            if path == "/_rig/health":
                body: Any = "ok"
            elif path == "/_rig/set":
                for k, v in payload.get("values", {}).items():
                    st.values[k.strip("/")] = v
                if "tags" in payload:
                    st.tags = dict(payload["tags"])
                body = {"ok": True}
            elif path == "/_rig/fault":
                target = str(payload["path"]).strip("/")
                kind = payload.get("fault")
                # an unknown kind answers 404 (below), so a typo in a test fails loudly
                body = {"ok": True} if kind is None or kind in FAULTS else None
                if kind is None:
                    st.faults.pop(target, None)
                elif kind in FAULTS:
                    st.faults[target] = {"fault": kind, "raw": payload.get("raw", "")}
            elif path == "/_rig/expire-tokens":
                st.tokens.clear()
                body = {"ok": True}
            elif path == "/_rig/log":
                body = list(st.log)
            elif path == "/_rig/reset":
                st.values = default_metadata()
                st.tags = {}
                st.faults = {}
                st.tokens.clear()
                st.log.clear()
                body = {"ok": True}
            else:
                body = None
        if body is None:
            self._send(404, json.dumps({"error": path}), "application/json")
        else:
            data = json.dumps(body)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data.encode())

    def _fault(self, fault: Dict[str, Any]) -> None:
        """Answer as no real IMDS would, then close the connection."""
        kind = fault["fault"]
        self._logged(kind)
        if kind == "truncated":
            body = b'{"action": "terminate", "time": "2'
            head = (
                f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(body) + 100}"
            )
            self.wfile.write(head.encode() + b"\r\n\r\n" + body)
        elif kind == "bad-status-line":
            self.wfile.write(b"HTTP/1.1 TWO-HUNDRED OKAY\r\nContent-Length: 2\r\n\r\nok")
        elif kind == "raw":
            self.wfile.write(str(fault.get("raw", "")).encode())
        self.wfile.flush()
        self.close_connection = True

    # -- IMDS ------------------------------------------------------------------------------

    def do_PUT(self) -> None:
        if self.path.startswith("/_rig/"):
            return self._control()
        self._body()
        if self.headers.get("X-Forwarded-For"):
            return self._send(403, "Forbidden")
        if self.path.rstrip("/") != "/latest/api/token":
            return self._send(404, "Not Found")
        ttl_text = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
        try:
            ttl = int(ttl_text)
        except ValueError:
            return self._send(400, "Missing or invalid TTL header")
        if not 1 <= ttl <= 21600:
            return self._send(400, "TTL out of range")
        token = secrets.token_urlsafe(32)
        with self.state.lock:
            self.state.tokens[token] = time.monotonic() + ttl
        self._send(200, token)

    def do_POST(self) -> None:
        if self.path.startswith("/_rig/"):
            return self._control()
        self._send(405, "Method Not Allowed")

    def do_GET(self) -> None:
        if self.path.startswith("/_rig/"):
            return self._control()
        if self.headers.get("X-Forwarded-For"):
            return self._send(403, "Forbidden")
        if self.path.rstrip("/") == "/latest/api/token":
            return self._send(405, "Method Not Allowed")
        token = self.headers.get("X-aws-ec2-metadata-token", "")
        with self.state.lock:
            expires = self.state.tokens.get(token)
            valid = expires is not None and expires > time.monotonic()
        if not valid:
            return self._send(401, "Unauthorized")
        if not self.path.startswith("/latest/"):
            return self._send(404, "Not Found")
        with self.state.lock:
            value = self.state.lookup(self.path[len("/latest/") :])
            fault = self.state.faults.get(self.path[len("/latest/") :].strip("/"))
        if fault is not None:
            return self._fault(fault)
        if value is None:
            return self._send(404, "Not Found")
        self._send(200, value)


@heavy("aws")
class ImdsServer(ServerProcess):
    """The strict IMDSv2 server as a child process, with its control API as methods."""

    def __init__(self):
        super().__init__("sandbox.imds_server")

    def set(self, **values: Optional[str]) -> None:
        """Set paths (relative to /latest/, `/` as `__`); None makes a path answer 404."""
        self.post("/_rig/set", {"values": {k.replace("__", "/"): v for k, v in values.items()}})

    def set_paths(self, values: Dict[str, Optional[str]]) -> None:
        self.post("/_rig/set", {"values": values})

    def set_tags(self, tags: Dict[str, str]) -> None:
        self.post("/_rig/set", {"tags": tags})

    def set_role_credentials(
        self, role: str, credentials: Dict[str, str], profile_arn: Optional[str] = None
    ) -> None:
        """Serve `credentials` (from AwsServer.issue_credentials) as the instance role `role`:
        iam/security-credentials lists only it, and the default test role stops answering."""
        values: Dict[str, Optional[str]] = {
            "meta-data/iam/security-credentials": role,
            "meta-data/iam/security-credentials/airflow-agent-role": None,
            f"meta-data/iam/security-credentials/{role}": json.dumps(
                {
                    "Code": "Success",
                    "LastUpdated": "2026-01-01T00:00:00Z",
                    "Type": "AWS-HMAC",
                    "AccessKeyId": credentials["AccessKeyId"],
                    "SecretAccessKey": credentials["SecretAccessKey"],
                    "Token": credentials["Token"],
                    "Expiration": "2099-01-01T00:00:00Z",
                }
            ),
        }
        if profile_arn:
            values["meta-data/iam/info"] = json.dumps(
                {"Code": "Success", "InstanceProfileArn": profile_arn, "InstanceProfileId": "AIPA0"}
            )
        self.set_paths(values)

    def fault(self, path: str, kind: Optional[str], raw: str = "") -> None:
        """Make GET latest/<path> answer `kind` (see the module docstring); None ends it."""
        self.post("/_rig/fault", {"path": path, "fault": kind, "raw": raw})

    def expire_tokens(self) -> None:
        self.post("/_rig/expire-tokens")

    def reset(self) -> None:
        self.post("/_rig/reset")

    def log(self) -> List[Dict[str, Any]]:
        return self.get("/_rig/log")

    def client_env(self) -> Dict[str, str]:
        return {"AWS_EC2_METADATA_SERVICE_ENDPOINT": self.url + "/"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    Handler.state = ImdsState()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    serve_forever(server, args.port_file)


if __name__ == "__main__":
    main()
