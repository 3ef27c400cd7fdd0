"""The embedded AWS's DescribeTargetHealth, with AWS's `draining` state where moto has none.

On AWS a deregistered target reads `draining` until the load balancer has stopped routing to it
and its in-flight requests ended (up to the target group's deregistration delay); only then
`unused`. moto reads `unused` at once, while the sandbox's load balancer (HAProxy, following
moto's registrations every 0.5 s: sandbox.stack.registrations) may still route to it: an agent
that waits for `unused` before restarting its api-server, as it must on AWS, would restart it
while requests still arrive. So the load balancer stand-in reports which instances it still
routes to (`/_rig/elbv2/routed`), and a target moto calls `unused` that is among them is
answered `draining`, as AWS would. (The delay itself is not emulated: `draining` ends as soon as
HAProxy stops routing, not after the deregistration delay.)
"""

from __future__ import annotations

import re
from typing import AbstractSet

_MEMBER = re.compile(rb"<member>.*?</member>", re.S)
_ID = re.compile(rb"<Id>([^<]+)</Id>")
_UNUSED = re.compile(rb"<State>unused</State>(.*?)</TargetHealth>", re.S)
_DRAINING = (
    b"<State>draining</State><Reason>Target.DeregistrationInProgress</Reason>"
    b"<Description>Target deregistration is in progress</Description></TargetHealth>"
)


def mark_draining(xml: bytes, routed: AbstractSet[str]) -> bytes:
    """moto's DescribeTargetHealth XML with every `unused` target in `routed` made `draining`."""

    def one(member: re.Match) -> bytes:
        block = member.group(0)
        ids = {i.decode() for i in _ID.findall(block)}
        return _UNUSED.sub(_DRAINING, block) if ids & set(routed) else block

    return _MEMBER.sub(one, xml)
