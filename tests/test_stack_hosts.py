"""The launched stack's hosts on their private link (sandbox/stack/network.py).

Two systemd test hosts joined by the switch exchange TCP over 10.77.0.0/24, reach a machine
port forwarded to 10.77.0.1, serve a port the switch exposes on the machine's 127.0.0.1, and
each serves its own IMDS at 169.254.169.254; the machine's own network namespace never gains a
link or an address, during or after. And the sandbox's cfn-init, as installed in an instance,
drives services on a real systemd as cfn-init does.
"""

from __future__ import annotations

import http.server
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from sandbox.stack.instance import install_cfn_tools, write_metadata
from sandbox.stack.network import GATEWAY, Switch
from sandbox.systemd_host import SystemdHost, wait_for

pytestmark = pytest.mark.systemd

CONNECT = (
    "import socket,sys\n"
    "s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=5)\n"
    "s.sendall(sys.argv[3].encode()); s.shutdown(socket.SHUT_WR)\n"
    "sys.stdout.write(s.recv(100).decode())\n"
)
ECHO_UPPER = (
    "import socket,sys\n"
    "l=socket.socket(); l.bind((sys.argv[1],int(sys.argv[2]))); l.listen(1)\n"
    "c,peer=l.accept(); c.sendall((c.recv(100).decode().upper()+' from '+peer[0]).encode())\n"
)


def _machine_net() -> str:
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    addrs = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
    # counters and states of the machine's own links change on their own; names do not
    return "\n".join(sorted(line.split(":")[1] for line in links.splitlines())) + addrs


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server API
        body = b"machine"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_two_hosts_talk_over_the_link_and_the_machine_is_untouched(tmp_path: Path) -> None:
    before = _machine_net()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    try:
        with (
            Switch() as switch,
            SystemdHost(tmp_path / "a", name="aea-link-a") as a,
            SystemdHost(tmp_path / "b", name="aea-link-b") as b,
        ):
            addr_a, addr_b = switch.attach(a), switch.attach(b)
            assert (addr_a, addr_b) == ("10.77.0.10", "10.77.0.11")
            a.run(
                ["systemd-run", "--unit", "echo-upper", "python3", "-c", ECHO_UPPER, addr_a, "9000"]
            )
            out = wait_for(
                lambda: b.run(["python3", "-c", CONNECT, addr_a, "9000", "hello"]).stdout,
                15,
                "b to reach a's listener",
            )
            assert out == f"HELLO from {addr_b}"
            # the machine's loopback only where forwarded, at the switch's address
            where = switch.forward(srv.server_address[1])
            assert where == f"{GATEWAY}:{srv.server_address[1]}"
            code = (
                "import urllib.request,sys;sys.stdout.write(urllib.request.urlopen("
                f"'http://{where}/',timeout=5).read().decode())"
            )
            assert b.run(["python3", "-c", code]).stdout == "machine"
            # the other way (the load balancer's for `sandbox up`): a's port on the machine's
            # 127.0.0.1, connecting from the switch (10.77.0.1), nowhere else
            a.run(
                ["systemd-run", "--unit", "echo-up2", "python3", "-c", ECHO_UPPER, addr_a, "9001"]
            )
            local = switch.expose(addr_a, 9001)
            host, _, port = local.partition(":")
            assert host == "127.0.0.1" and int(port) > 0

            def through_exposed() -> str:
                with socket.create_connection((host, int(port)), timeout=5) as conn:
                    conn.sendall(b"hi")
                    conn.shutdown(socket.SHUT_WR)
                    return conn.recv(100).decode()

            assert wait_for(through_exposed, 15, "a's port on the machine") == f"HI from {GATEWAY}"
            # each host's own IMDS address; the other host does not have it
            a.serve_link_local(srv.server_address[1])
            assert "169.254.169.254/32" in a.run(["ip", "-o", "addr", "show", "lo"]).stdout
            assert "169.254.169.254" not in b.run(["ip", "-o", "addr"]).stdout
            assert _machine_net() == before, "the machine's namespace changed while up"
            assert "br0" not in before
    finally:
        srv.shutdown()
        srv.server_close()
    assert _machine_net() == before, "the machine's namespace changed"
    assert switch.proc is not None and switch.proc.poll() is not None


UNIT = "[Service]\nExecStart=/bin/sleep infinity\n[Install]\nWantedBy=multi-user.target\n"


def test_cfn_init_services_on_a_real_systemd(tmp_path: Path) -> None:
    """The sandbox's cfn-init (the /opt/aws/bin/cfn-init a launched instance runs): a service
    is enabled and started; re-applying unchanged metadata restarts nothing; a change of one of
    its `files`, or a run of one of its `commands`, restarts it; ensureRunning/enabled false
    stop and disable it."""
    init: dict = {
        "configSets": {"one": ["c"]},
        "c": {
            "files": {
                "/etc/systemd/system/aea-svc.service": {"content": UNIT, "mode": "000644"},
                "/etc/aea/svc.conf": {"content": "v1\n", "mode": "000600"},
            },
            "commands": {"10-when-asked": {"command": "true", "test": "test -e /etc/aea/ask"}},
            "services": {
                "systemd": {
                    "aea-svc": {
                        "enabled": "true",
                        "ensureRunning": True,
                        "files": ["/etc/aea/svc.conf"],
                        "commands": ["10-when-asked"],
                    }
                }
            },
        },
    }
    cmd = ["/opt/aws/bin/cfn-init", "-v", "--stack", "s", "--resource", "R", "--configsets", "one"]
    with SystemdHost(tmp_path, name="aea-cfninit") as h:
        install_cfn_tools(h, {})

        def apply() -> int:
            write_metadata(h, "s", "arn:s", "R", init)
            h.run(cmd)
            return h.main_pid("aea-svc.service")

        first = apply()
        assert first > 0
        assert h.systemctl("is-enabled", "aea-svc.service").stdout.strip() == "enabled"
        # cfn-init's logs hold command output: root only
        for log in ("/var/log/cfn-init.log", "/var/log/cfn-init-cmd.log"):
            assert h.run(["stat", "-c", "%a %U", log]).stdout.split() == ["600", "root"]
        assert apply() == first, "unchanged metadata restarted the service"
        init["c"]["files"]["/etc/aea/svc.conf"]["content"] = "v2\n"
        second = apply()
        assert second not in (0, first), "a changed file did not restart it"
        h.run(["touch", "/etc/aea/ask"])
        third = apply()
        assert third not in (0, second), "a command that ran did not restart it"
        init["c"]["services"]["systemd"]["aea-svc"].update(enabled=False, ensureRunning="false")
        assert apply() == 0
        assert h.systemctl("is-enabled", "aea-svc.service", check=False).stdout.strip() == (
            "disabled"
        )
        # a failing command fails cfn-init (cfn-signal -e $? reports it)
        init["c"]["commands"]["20-fails"] = {"command": "echo nope >&2; exit 9"}
        write_metadata(h, "s", "arn:s", "R", init)
        p = h.run(cmd, check=False)
        assert p.returncode == 1 and "command 20-fails failed (rc 9):\nnope" in p.stderr


def test_hosts_attach_in_parallel_threads(tmp_path: Path) -> None:
    """A group's instances boot at once (launch.py uses threads): each gets its own address
    and link, and all reach one another."""
    from concurrent.futures import ThreadPoolExecutor
    from contextlib import ExitStack

    with Switch() as switch, ExitStack() as stack:
        hosts = []
        for i in range(3):
            (tmp_path / str(i)).mkdir()
            hosts.append(stack.enter_context(SystemdHost(tmp_path / str(i), name=f"aea-par-{i}")))
        with ThreadPoolExecutor(3) as pool:
            addrs = list(pool.map(switch.attach, hosts))
        assert sorted(addrs) == ["10.77.0.10", "10.77.0.11", "10.77.0.12"]
        assert switch.addresses == {h.name: a for h, a in zip(hosts, addrs)}
        hosts[0].run(["systemd-run", "--unit", "echo-upper", "python3", "-c", ECHO_UPPER,
                      addrs[0], "9000"])  # fmt: skip
        out = wait_for(
            lambda: hosts[2].run(["python3", "-c", CONNECT, addrs[0], "9000", "x"]).stdout,
            15,
            "the third host to reach the first",
        )
        assert out == f"X from {addrs[2]}"
