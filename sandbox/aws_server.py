"""Embedded AWS for tests, demo and benchmarks: moto's server app behind a thin wrapper of ours.

The wrapper adds what moto lacks (TESTING.md): it answers Auto Scaling's
`RecordLifecycleActionHeartbeat` and `CompleteLifecycleAction` and records them; it can inject
N errors (throttling, AccessDenied, ...) for any action; and it records every call's service
and action (and the access key id that signed it, so a test can tell two callers apart) so
tests and benchmarks can count API calls. Control endpoints live under `/_rig/`.

IAM (issue 11): `/_rig/iam/credentials` issues credentials of an IAM role of the embedded AWS
(what an instance's IMDS serves); a request signed with them is allowed only if that role's
policies, as they are in the embedded IAM at that moment, allow each action on each resource
ARN the request needs (sandbox/stack/iam_request.py, evaluated by sandbox/stack/iam_policy.py);
otherwise it is refused with AccessDenied naming the action and the resource, in the error
shape of the service's protocol, and the refusal is recorded (`/_rig/iam/denials`). Any other
key (the harness's own `testing`) is not checked, so existing users are unchanged.

Run as `python -m sandbox.aws_server --port-file F`; drive it with `AwsServer`.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import secrets
import string
import threading
import time
import urllib.parse
import uuid
from typing import AbstractSet, Any, Dict, List, Optional, Set

from sandbox.elbv2_draining import mark_draining, mark_failing
from sandbox.proc import ServerProcess, serve_forever
from sandbox.tiers import heavy

_LIFECYCLE_ACTIONS = ("RecordLifecycleActionHeartbeat", "CompleteLifecycleAction")
_SCOPE_RE = re.compile(r"Credential=[^/]+/\d+/[^/]+/([^/]+)/aws4_request")
_KEY_RE = re.compile(r"Credential=([^/]+)/\d+/([^/]+)/")
ACCOUNT = "123456789012"


class RigApp:
    """WSGI middleware around moto's DomainDispatcherApplication."""

    def __init__(self, moto_app):
        self.moto_app = moto_app
        self.lock = threading.Lock()
        self.faults: Dict[str, List[Dict[str, Any]]] = {}
        self.calls: List[Dict[str, Any]] = []
        self.lifecycle: List[Dict[str, Any]] = []
        # access key id -> {"role": name, "session": name} for credentials issued per role
        self.principals: Dict[str, Dict[str, str]] = {}
        self.denials: List[Dict[str, Any]] = []
        self.unevaluated: List[Dict[str, Any]] = []
        # instance ids the load balancer stand-in still routes to, and those its health checks
        # have down (sandbox.elbv2_draining)
        self.routed: Set[str] = set()
        self.failing: Set[str] = set()

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
            if path == "/_rig/elbv2/routed" and method == "POST":
                self.routed = set(payload["targets"])
                self.failing = set(payload.get("failing", ()))
                return self._json(start_response, "200 OK", {"ok": True})
            if path == "/_rig/calls":
                return self._json(start_response, "200 OK", self.calls)
            if path == "/_rig/calls/clear":
                self.calls.clear()
                return self._json(start_response, "200 OK", {"ok": True})
            if path == "/_rig/lifecycle":
                return self._json(start_response, "200 OK", self.lifecycle)
            if path == "/_rig/iam/credentials" and method == "POST":
                return self._json(start_response, "200 OK", self._issue(payload))
            if path == "/_rig/iam/denials":
                return self._json(start_response, "200 OK", self.denials)
            if path == "/_rig/iam/unevaluated":
                return self._json(start_response, "200 OK", self.unevaluated)
            if path == "/_rig/reset":
                self.faults.clear()
                self.calls.clear()
                self.lifecycle.clear()
                self.principals.clear()
                self.denials.clear()
                self.unevaluated.clear()
                self.routed.clear()
                self.failing.clear()
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

    def _issue(self, payload: Dict[str, Any]) -> Dict[str, str]:
        """Credentials of IAM role payload["role"] (session payload["session"])."""
        alphabet = string.ascii_uppercase + string.digits
        key = "ASIA" + "".join(secrets.choice(alphabet) for _ in range(16))
        self.principals[key] = {"role": payload["role"], "session": payload.get("session", "rig")}
        return {
            "AccessKeyId": key,
            "SecretAccessKey": secrets.token_urlsafe(30),
            "Token": secrets.token_urlsafe(60),
        }

    def _authorize(self, environ, service: str, action: str, params: Dict[str, Any]):
        """None if allowed (or not a role's key), else (code-less) refusal details."""
        from sandbox.stack import iam_policy, iam_request

        auth = environ.get("HTTP_AUTHORIZATION", "")
        query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
        found = _KEY_RE.search(auth) or _KEY_RE.search(
            "Credential=" + query.get("X-Amz-Credential", [""])[0]
        )
        principal = self.principals.get(found.group(1)) if found else None
        if principal is None:
            return None
        region = found.group(2)
        from moto.iam.models import iam_backends

        try:
            role = iam_backends[ACCOUNT]["global"].get_role(principal["role"])
            statements = iam_policy.role_statements(role)
        except Exception:
            statements = []  # the role is gone: nothing is allowed
        who = f"arn:aws:sts::{ACCOUNT}:assumed-role/{principal['role']}/{principal['session']}"
        for verb, arn, context in iam_request.checks(
            service, action, params, environ, ACCOUNT, region
        ):
            decision = iam_policy.evaluate(statements, verb, arn, context)
            if decision.unevaluated:
                with self.lock:
                    self.unevaluated.append(
                        {
                            "role": principal["role"],
                            "action": verb,
                            "resource": arn,
                            "conditions": decision.unevaluated,
                        }
                    )
            if not decision.allowed:
                refusal = {
                    "time": time.time(),
                    "role": principal["role"],
                    "session": principal["session"],
                    "action": verb,
                    "resource": arn,
                    "message": (
                        f"User: {who} is not authorized to perform: {verb} on resource: {arn} "
                        f"{decision.reason}"
                    ),
                }
                with self.lock:
                    self.denials.append(refusal)
                return refusal
        return None

    @staticmethod
    def _identify(environ, body: bytes) -> tuple[str, str, Dict[str, Any]]:
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        scope = _SCOPE_RE.search(environ.get("HTTP_AUTHORIZATION", ""))
        service = scope.group(1) if scope else ""
        if target:
            try:
                payload = json.loads(body or b"{}")
            except ValueError:
                payload = {}
            return service, target.rsplit(".", 1)[-1], payload if isinstance(payload, dict) else {}
        params = dict(urllib.parse.parse_qsl(environ.get("QUERY_STRING", "")))
        ctype = environ.get("CONTENT_TYPE", "")
        if "x-www-form-urlencoded" in ctype:
            params.update(urllib.parse.parse_qsl(body.decode("utf-8", "replace")))
        return service, params.get("Action", ""), params

    @staticmethod
    def _error(start_response, json_protocol: bool, fault: Dict[str, Any], service: str = ""):
        status = f"{fault['status']} Error"
        if service in ("s3", "ec2") and not json_protocol:
            # S3's REST errors and EC2's query errors have shapes of their own
            inner = f"<Code>{fault['code']}</Code><Message>{_xml(fault['message'])}</Message>"
            request_id = uuid.uuid4()
            data = (
                f"<Error>{inner}<RequestId>{request_id}</RequestId></Error>"
                if service == "s3"
                else f"<Response><Errors><Error>{inner}</Error></Errors>"
                f"<RequestID>{request_id}</RequestID></Response>"
            ).encode()
            headers = [("Content-Type", "application/xml"), ("Content-Length", str(len(data)))]
            start_response(status, headers)
            return [data]
        if json_protocol:
            data = json.dumps({"__type": fault["code"], "message": fault["message"]}).encode()
            headers = [
                ("Content-Type", "application/x-amz-json-1.1"),
                ("x-amzn-ErrorType", fault["code"]),
            ]
        else:
            data = (
                "<ErrorResponse><Error><Type>Sender</Type>"
                f"<Code>{fault['code']}</Code><Message>{_xml(fault['message'])}</Message>"
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
        refusal = self._authorize(environ, service, action, params)
        if refusal is not None:
            code = {"ec2": "UnauthorizedOperation", "s3": "AccessDenied"}.get(
                service, "AccessDenied"
            )
            if json_protocol:
                code = "AccessDeniedException"
            fault = {
                "code": code,
                "status": 400 if json_protocol else 403,
                "message": refusal["message"],
            }
            return self._error(start_response, json_protocol, fault, service)
        with self.lock:
            call = {"service": service, "action": action, "time": time.time()}
            signed = _KEY_RE.search(environ.get("HTTP_AUTHORIZATION", ""))
            call["key"] = signed.group(1) if signed else None
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
        if service == "sts" and action == "AssumeRole":
            return self._assume_role(environ, start_response, params)
        if action == "DescribeTargetHealth":
            return self._target_health(environ, start_response)
        return self.moto_app(environ, start_response)

    def _target_health(self, environ, start_response):
        """moto's answer, with a target the load balancer stand-in still routes to `draining`
        and one its health checks have down `unhealthy` (sandbox.elbv2_draining)."""
        got: Dict[str, Any] = {}
        out = b"".join(self.moto_app(environ, lambda s, h, e=None: got.update(s=s, h=h)))
        with self.lock:
            out = mark_failing(mark_draining(out, self.routed), self.failing)
        headers = [(k, v) for k, v in got["h"] if k.lower() != "content-length"]
        start_response(got["s"], headers + [("Content-Length", str(len(out)))])
        return [out]

    def _assume_role(self, environ, start_response, params: Dict[str, Any]):
        """moto's AssumeRole, with the credentials it issues held to the assumed role's policies
        (as those of instance roles are): the role is the last part of RoleArn."""
        out = b"".join(self.moto_app(environ, start_response))
        key = re.search(rb"<AccessKeyId>([^<]+)</AccessKeyId>", out)
        role = str(params.get("RoleArn", "")).rsplit("/", 1)[-1]
        if key and role:
            with self.lock:
                self.principals[key.group(1).decode()] = {
                    "role": role,
                    "session": str(params.get("RoleSessionName", "assumed")),
                }
        return [out]


def _xml(text: str) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


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

    def set_routed(self, instance_ids: Set[str], failing: AbstractSet[str] = frozenset()) -> None:
        """The instances the load balancer stand-in routes to now, and those its health checks
        have down (sandbox.elbv2_draining)."""
        self.post(
            "/_rig/elbv2/routed", {"targets": sorted(instance_ids), "failing": sorted(failing)}
        )

    def calls(self, action: Optional[str] = None) -> List[Dict[str, Any]]:
        calls = self.get("/_rig/calls")
        return [c for c in calls if action is None or c["action"] == action]

    def clear_calls(self) -> None:
        self.post("/_rig/calls/clear")

    def lifecycle_actions(self) -> List[Dict[str, Any]]:
        return self.get("/_rig/lifecycle")

    def issue_credentials(self, role: str, session: str = "rig") -> Dict[str, str]:
        """Credentials whose every request is checked against IAM role `role`'s policies."""
        return self.post("/_rig/iam/credentials", {"role": role, "session": session})

    def denials(self) -> List[Dict[str, Any]]:
        """Every request refused by IAM so far: role, session, action, resource, message."""
        return self.get("/_rig/iam/denials")

    def unevaluated_conditions(self) -> List[Dict[str, Any]]:
        return self.get("/_rig/iam/unevaluated")

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
