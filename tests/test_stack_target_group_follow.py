"""The ALB stand-in follows the target group in the embedded AWS (sandbox/stack/registrations.py).

Without the stack: a switch namespace, two tiny HTTP servers in it as the api-servers (on two
addresses of the link, port 8080 as the template's target group), HAProxy configured from the
template, and the target group created in moto with two running moto instances registered, as
the webserver group registers them. The agent's own `out_of_rotation` (over real HTTP, through
AwsClients) takes one instance out: HAProxy stops sending it requests while it is out, at most
one target is ever out, and both receive requests again afterwards.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import List, Set

import pytest

from agent.config import config_from_dict
from agent.platform.aws import AwsClients
from agent.platform.target_group import out_of_rotation
from sandbox.proc import end_process, wait_for
from sandbox.stack.model import StackModel
from sandbox.stack.network import GATEWAY, PREFIX, Switch
from sandbox.stack.registrations import Follower
from sandbox.stack.standins import LoadBalancer

pytestmark = [pytest.mark.systemd, pytest.mark.aws]

SERVE = (
    "import http.server, sys\n"
    "class H(http.server.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        b = sys.argv[1].encode(); self.send_response(200)\n"
    "        self.send_header('Content-Length', str(len(b))); self.end_headers()\n"
    "        self.wfile.write(b)\n"
    "    def log_message(self, *a): pass\n"
    "http.server.ThreadingHTTPServer((sys.argv[1], 8080), H).serve_forever()\n"
)
GET = (
    "import sys, urllib.request\n"
    "for _ in range(int(sys.argv[2])):\n"
    "    print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())\n"
)


def answers(switch: Switch, port: int, n: int = 6) -> Set[str]:
    """Which api-servers answered `n` requests through the load balancer."""
    p = subprocess.run(
        switch.argv([sys.executable, "-c", GET, f"http://{GATEWAY}:{port}/", str(n)]),
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return set(p.stdout.split())


def test_haproxy_follows_the_target_groups_registrations(aws, tmp_path: Path) -> None:
    model = StackModel.load()
    ec2, elb = aws.client("ec2"), aws.client("elbv2")
    vpc = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]
    port = int(model.prop("ApiServerTargetGroup", "Port"))
    arn = elb.create_target_group(
        Name="api-servers", Protocol="HTTP", Port=port, VpcId=vpc["VpcId"]
    )["TargetGroups"][0]["TargetGroupArn"]
    ids = [
        i["InstanceId"]
        for i in ec2.run_instances(ImageId="ami-12c6146b", MinCount=2, MaxCount=2)["Instances"]
    ]
    elb.register_targets(TargetGroupArn=arn, Targets=[{"Id": i} for i in ids])
    addrs = [f"{PREFIX}.201", f"{PREFIX}.202"]
    servers: List[subprocess.Popen] = []
    with Switch() as switch:
        try:
            for addr in addrs:
                switch.ip("addr", "add", f"{addr}/24", "dev", "br0")
                servers.append(subprocess.Popen(switch.argv([sys.executable, "-c", SERVE, addr])))
            lb = LoadBalancer.from_model(model, switch, addrs)
            lb.interval = 1  # the template's 15 s, shortened
            with lb:
                wait_for(lambda: lb.target_health() == dict.fromkeys(addrs, "UP"), 30, "UP")
                follower = Follower(lb, elb, arn, lambda: dict(zip(ids, addrs)), interval=0.2)
                follower.start()
                try:
                    assert sorted(lb.in_rotation()) == addrs
                    assert answers(switch, lb.port) == set(addrs)
                    out: List[List[str]] = []  # what was in rotation at each look
                    tg = {"arn": arn, "poll_interval": 0.2}
                    cfg = config_from_dict({"state_dir": str(tmp_path / "s"), "target_group": tg})
                    with out_of_rotation(cfg, AwsClients(cfg), instance_id=ids[0]) as outcome:
                        assert outcome.rotated
                        wait_for(lambda: lb.in_rotation() == [addrs[1]], 10, "a drained")
                        out.append(lb.in_rotation())
                        # every request goes to the other api-server while this one is out
                        assert answers(switch, lb.port, 8) == {addrs[1]}
                        # the other one, restarting now, stays in (restart in place)
                        with out_of_rotation(cfg, AwsClients(cfg), instance_id=ids[1]) as o2:
                            assert not o2.rotated
                            out.append(follower.sync())
                    wait_for(lambda: sorted(lb.in_rotation()) == addrs, 10, "a back")
                    assert answers(switch, lb.port) == set(addrs)
                    assert all(len(seen) >= len(addrs) - 1 for seen in out), out
                    assert follower.errors == []
                finally:
                    follower.stop()
        finally:
            for proc in servers:
                end_process(proc)
