"""The embedded AWS's DescribeTargetHealth, as the load balancer stand-in sees its targets.

moto answers from registrations alone. The sandbox's load balancer (HAProxy, following moto's
registrations every 0.5 s: sandbox.stack.registrations) reports after every pass which instances
it still routes to and which its own health checks have down, and this answer is corrected with
both, as AWS would answer:

- `draining`: on AWS a deregistered target reads `draining` until the load balancer has stopped
  routing to it and its in-flight requests ended (up to the target group's deregistration
  delay); only then `unused`. moto reads `unused` at once, while HAProxy may still route to it:
  an agent that waits for `unused` before restarting its api-server, as it must on AWS, would
  restart it while requests still arrive. A target moto calls `unused` that HAProxy still routes
  to is answered `draining`. (The delay itself is not emulated: `draining` ends as soon as HAProxy
  stops routing, not after the deregistration delay.)
- `unhealthy`: on AWS a registered target reads `healthy` only while the load balancer's health
  checks pass (HealthyThresholdCount in a row after a failure). moto reads every registered
  running instance `healthy` at once, so an agent's "wait until healthy" after registering again,
  and its "is another target healthy" before leaving, would pass while HAProxy still has that
  api-server down after a long restart: the next api-server could leave the group with none
  serving. A target moto calls `healthy` that HAProxy's checks have down is answered `unhealthy`
  (Target.FailedHealthChecks). (`initial` is not told apart: HAProxy keeps a server's last
  health across its removal from rotation.)
"""

from __future__ import annotations

import re
from typing import AbstractSet

_MEMBER = re.compile(rb"<member>.*?</member>", re.S)
_ID = re.compile(rb"<Id>([^<]+)</Id>")
_UNUSED = re.compile(rb"<State>unused</State>(.*?)</TargetHealth>", re.S)
_HEALTHY = re.compile(rb"<State>healthy</State>(.*?)</TargetHealth>", re.S)
_DRAINING = (
    b"<State>draining</State><Reason>Target.DeregistrationInProgress</Reason>"
    b"<Description>Target deregistration is in progress</Description></TargetHealth>"
)
_FAILING = (
    b"<State>unhealthy</State><Reason>Target.FailedHealthChecks</Reason>"
    b"<Description>Health checks failed</Description></TargetHealth>"
)


def mark_draining(xml: bytes, routed: AbstractSet[str]) -> bytes:
    """moto's DescribeTargetHealth XML with every `unused` target in `routed` made `draining`."""
    return _mark(xml, routed, _UNUSED, _DRAINING)


def mark_failing(xml: bytes, failing: AbstractSet[str]) -> bytes:
    """moto's DescribeTargetHealth XML with every `healthy` target in `failing` made
    `unhealthy`."""
    return _mark(xml, failing, _HEALTHY, _FAILING)


def _mark(xml: bytes, ids: AbstractSet[str], state: re.Pattern, replacement: bytes) -> bytes:
    def one(member: re.Match) -> bytes:
        block = member.group(0)
        found = {i.decode() for i in _ID.findall(block)}
        return state.sub(replacement, block) if found & set(ids) else block

    return _MEMBER.sub(one, xml)
