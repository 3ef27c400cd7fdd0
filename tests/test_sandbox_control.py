"""The supervisor's control socket (sandbox/stack/control.py) over a real Unix socket: a
deploy request streams its progress then its result; bad requests and a failing deployment are
answered with an error and the server goes on serving; the socket is the owner's alone; a
client with no server gets ControlError naming the path. The deployment itself is the
injection point (the stack's is proven by tests/test_stack_cli_up.py)."""

from __future__ import annotations

import json
import socket
import stat

import pytest

from sandbox.stack.control import ControlError, ControlServer, request


def _server(tmp_path, deploy):
    return ControlServer(tmp_path / "control.sock", deploy).start()


def test_a_deploy_streams_progress_then_the_result(tmp_path):
    bundle = tmp_path / "bundle.zip"
    bundle.write_bytes(b"zip")
    seen = []

    def deploy(path, deployment_id, progress):
        seen.append((path, deployment_id))
        progress("worker-1 ApplicationStop ok")
        return {"worker-1": {"succeeded": True, "message": ""}}

    server = _server(tmp_path, deploy)
    try:
        assert stat.S_IMODE(server.path.stat().st_mode) == 0o600
        answers = list(request(server.path, {"deploy": str(bundle)}))
        again = list(request(server.path, {"deploy": str(bundle)}))
    finally:
        server.stop()
    assert answers[0]["progress"].startswith("deployment d-SANDBOX1")
    assert answers[1:] == [
        {"progress": "worker-1 ApplicationStop ok"},
        {"result": {"worker-1": {"succeeded": True, "message": ""}}},
    ]
    assert seen[0][0] == bundle and seen[0][1] != seen[1][1]  # each deployment its own id
    assert again[-1]["result"]["worker-1"]["succeeded"] is True
    assert not server.path.exists()


@pytest.mark.parametrize(
    "doc, says",
    [
        ({"deploy": "relative.zip"}, "not an absolute path of a file"),
        ({"deploy": "/nonexistent/bundle.zip"}, "not an absolute path of a file"),
        ({"undeploy": "/x"}, "not a request this supervisor serves"),
    ],
)
def test_a_bad_request_is_refused_naming_it(tmp_path, doc, says):
    server = _server(tmp_path, lambda *a: pytest.fail("no deployment for a bad request"))
    try:
        (answer,) = list(request(server.path, doc))
    finally:
        server.stop()
    assert says in answer["error"]


def test_a_deployment_that_raises_is_an_error_and_the_server_serves_on(tmp_path):
    bundle = tmp_path / "b.zip"
    bundle.write_bytes(b"zip")
    calls = []

    def deploy(path, deployment_id, progress):
        calls.append(deployment_id)
        if len(calls) == 1:
            raise RuntimeError("hook runner broke")
        return {}

    server = _server(tmp_path, deploy)
    try:
        first = list(request(server.path, {"deploy": str(bundle)}))
        second = list(request(server.path, {"deploy": str(bundle)}))
    finally:
        server.stop()
    assert first[-1] == {"error": "RuntimeError: hook runner broke"}
    assert second[-1] == {"result": {}}


def test_garbage_on_the_socket_is_refused(tmp_path):
    server = _server(tmp_path, lambda *a: {})
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(server.path))
            s.sendall(b"not json\n")
            answer = json.loads(s.makefile().readline())
    finally:
        server.stop()
    assert "not a request" in answer["error"]


def test_no_server_is_a_control_error_naming_the_socket(tmp_path):
    with pytest.raises(ControlError, match=str(tmp_path / "control.sock")):
        list(request(tmp_path / "control.sock", {"deploy": "/x"}))
