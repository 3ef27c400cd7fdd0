"""`python -m sandbox up`: the stack of cloudformation/airflow-cluster.yaml, launched locally.

`Stack(template, params, workers).up()` does what CloudFormation and EC2 would, in the
template's order:
1. the embedded AWS (moto behind sandbox/aws_server.py, IAM enforced) gets every resource an
   instance reads (sandbox/stack/aws_resources.py); the agent's package goes to the artifact
   bucket the parameters name (a prerequisite of the template, as in a real account);
2. the private link (a switch namespace, 10.77.0.1), the embedded AWS forwarded onto it, and
   the stand-ins of RDS, ElastiCache (before any group: the groups depend on them);
3. each Auto Scaling group's instances (the ones moto launched for it), group by group in
   CloudFormation's dependency order (the scheduler group first: the others DependsOn it):
   one systemd test host per instance with its own IMDS (instance id, placement, the group's
   tags, lifecycle state, credentials of the instance role of its launch template's profile),
   built by the launch template's own UserData (sandbox/stack/instance.py); the ALB's
   stand-in (HAProxy) once its targets (the webserver group's instances) exist.
`scale_in(instance)` is a scale-in through the termination lifecycle hook; `update(model)`
a stack update through each instance's cfn-hup; `down()` ends everything, by PID.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set

from sandbox.aws_server import AwsServer
from sandbox.cfn_init import check_init
from sandbox.imds_server import ImdsServer
from sandbox.proc import wait_for
from sandbox.stack.aws_resources import CreatedReport, create_in_aws
from sandbox.stack.fleet import Member, SerialSwitch
from sandbox.stack.model import ROLE_TAG, TEMPLATE, StackModel
from sandbox.tiers import heavy

RUN_DIR = Path(os.environ.get("AEA_SANDBOX_RUN", "/run/aea-sandbox"))
STATE_FILE = "stack.json"
# instances of one group boot concurrently, as an Auto Scaling group launches them
PARALLEL = True


def say(text: str) -> None:
    print(text, flush=True)


def raise_first_error(futures: List[concurrent.futures.Future]) -> None:
    """Wait for every one of `futures` (none is left running), then raise the first error."""
    errors = [e for e in (f.exception() for f in futures) if e is not None]
    if errors:
        raise errors[0]


@heavy("systemd", "airflow", "aws", "redis")
class Stack:
    def __init__(
        self,
        template: Path = TEMPLATE,
        params: Any = None,
        workers: Optional[int] = None,
        run_dir: Optional[Path] = None,
        progress: Callable[[str], None] = say,
        extra: Optional[Dict[str, Any]] = None,
        wait_healthy: bool = True,
        state_dir: Optional[Path] = None,
    ):
        self.template, self.params, self.workers = Path(template), params, workers
        self.extra, self.wait_healthy = extra, wait_healthy
        # the instances' shared directories live here (under /tmp: a test host mounts its own
        # /run); the state file in state_dir (default: here too)
        self.run_dir = Path(run_dir or tempfile.mkdtemp(prefix="aea-stack-"))
        self.state_dir = Path(state_dir or self.run_dir)
        self.progress = progress
        self.aws: Optional[AwsServer] = None
        self.model: Optional[StackModel] = None
        self.report: Optional[CreatedReport] = None
        self.switch: Any = None
        self.ca: Any = None
        self.standins: Dict[str, Any] = {}
        self.members: List[Member] = []
        self.timings: Dict[str, float] = {}
        self.aws_at = ""
        # what the supervisor adds to the state file (the UI's local address, ...)
        self.state_extra: Dict[str, Any] = {}
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._serial_switch: Any = None

    # -- up ------------------------------------------------------------------------------------

    def up(self) -> Stack:
        return self.start()

    def start(self) -> Stack:
        try:
            self._up()
        except BaseException:
            self.down()
            raise
        return self

    def _timed(self, what: str, fn: Callable[[], Any]) -> Any:
        t = time.monotonic()
        out = fn()
        self.timings[what] = time.monotonic() - t
        return out

    def _up(self) -> None:
        from sandbox.stack.instance import agent_package
        from sandbox.stack.network import Switch
        from sandbox.stack.standins import Broker, Postgres
        from sandbox.stack.tls import SandboxCa

        self.model = model = StackModel.load(
            self.template, self.params, workers=self.workers, extra=self.extra
        )
        # an Init the sandbox's cfn-init cannot apply is refused before anything starts
        for group_rid in self.group_order():
            check_init(model.init_metadata(self.role_of(group_rid)))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.aws = AwsServer().start()
        self.progress(f"stack {model.stack_name}: creating the template's resources")
        self.report = self._timed("aws", lambda: create_in_aws(model, self.aws))
        self.progress(
            f"  {len(self.report.created)} created, {len(self.report.skipped)} stood in for "
            f"or not created ({self.timings['aws']:.1f}s)"
        )
        s3 = self.aws.client("s3")
        bucket, key = model.parameters["ArtifactBucket"], model.parameters["AgentPackageKey"]
        s3.create_bucket(Bucket=bucket)
        s3.put_object(Bucket=bucket, Key=key, Body=agent_package())
        self.ca = SandboxCa(self.run_dir / "ca").create()
        self.switch = Switch().start()
        self._serial_switch = SerialSwitch(self.switch)
        self.aws_at = self.switch.forward(self.aws.port)
        self.progress(f"private link up; the embedded AWS at {self.aws_at}")
        for name, cls in (("database", Postgres), ("broker", Broker)):
            self.standins[name] = self._timed(
                name, lambda cls=cls: cls.from_model(model, self.switch, self.ca).start()
            )
            self.progress(f"  {name} stand-in up ({self.timings[name]:.1f}s)")
        # groups that do not depend on each other are created at once, as CloudFormation does
        # (the api-servers and workers both wait for the scheduler's group alone). Every thread
        # that starts a host or a stand-in is a pool thread: a child dies with the thread that
        # started it (die_with_parent), and the pool's threads live as long as the stack
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=16)
        for wave in self.group_waves():
            raise_first_error([self._pool.submit(self._launch_group, rid) for rid in wave])
        self.write_state()

    def group_order(self) -> List[str]:
        """The Auto Scaling groups in the order CloudFormation creates them."""
        assert self.model is not None
        return [
            rid
            for rid in self.model.creation_order()
            if self.model.resources[rid]["Type"] == "AWS::AutoScaling::AutoScalingGroup"
        ]

    def group_waves(self) -> List[List[str]]:
        """The groups in waves: each group after every group it depends on, directly or
        through other resources; the groups of one wave depend on none of each other."""
        assert self.model is not None
        groups = self.group_order()
        model = self.model

        def needs(rid: str) -> Set[str]:
            seen: Set[str] = set()
            todo = [rid]
            while todo:
                for dep in model.dependencies(todo.pop()):
                    if dep in model.resources and dep not in seen:
                        seen.add(dep)
                        todo.append(dep)
            return seen & set(groups)

        wait = {g: needs(g) for g in groups}
        waves: List[List[str]] = []
        done: Set[str] = set()
        while len(done) < len(groups):
            wave = [g for g in groups if g not in done and wait[g] <= done]
            waves.append(wave)
            done |= set(wave)
        return waves

    def role_of(self, group_rid: str) -> str:
        assert self.model is not None
        tags = self.model.prop(group_rid, "Tags") or []
        return next(t["Value"] for t in tags if t["Key"] == ROLE_TAG)

    def _launch_group(self, group_rid: str) -> None:
        from sandbox.stack.instance import Instance

        assert self.model is not None and self.aws is not None
        role, name = self.role_of(group_rid), self.model.ref(group_rid)
        group = self.aws.client("autoscaling").describe_auto_scaling_groups(
            AutoScalingGroupNames=[name]
        )["AutoScalingGroups"][0]
        self.progress(f"group {name}: {len(group['Instances'])} instance(s)")
        members = []
        for inst in group["Instances"]:
            member = Member(
                inst["InstanceId"], role, name, inst["AvailabilityZone"], ImdsServer().start()
            )
            self.members.append(member)
            self._serve_imds(member, group)
            (self.run_dir / member.name).mkdir(parents=True, exist_ok=True)
            member.instance = Instance(
                member.name, role, self.model, self._serial_switch, self.aws_at, member.imds,
                self.ca,
                shared_dir=self.run_dir / member.name,
            )  # fmt: skip
            members.append(member)
        # an Auto Scaling group launches its instances at once, each booted by a pool thread
        # (a host dies with the thread that started it: the pool's live as long as the stack)
        assert self._pool is not None
        if PARALLEL and len(members) > 1:
            from sandbox.stack.instance import _WHEELHOUSE_LOCK, REPO
            from sandbox.systemd_host import build_wheelhouse

            with _WHEELHOUSE_LOCK:  # its cache filled once, before the threads read it
                build_wheelhouse(REPO)
            raise_first_error([self._pool.submit(self._boot, m) for m in members])
        else:
            for m in members:
                raise_first_error([self._pool.submit(self._boot, m)])
        if self._needs_load_balancer(group_rid):
            self._start_load_balancer(group_rid)

    def _boot(self, member: Member) -> None:
        assert self.model is not None
        t = time.monotonic()
        member.instance.start()
        self.timings[member.name] = time.monotonic() - t
        self.progress(
            f"  {member.name} ({member.instance_id}) at {member.instance.address}: "
            f"{self.model.configset_for(member.role)} configSet applied, cfn-signal 0 "
            f"({self.timings[member.name]:.0f}s)"
        )

    def _needs_load_balancer(self, group_rid: str) -> bool:
        assert self.model is not None
        return bool(self.model.prop(group_rid, "TargetGroupARNs"))

    def _start_load_balancer(self, group_rid: str) -> None:
        from sandbox.stack.standins import LoadBalancer

        assert self.model is not None
        name = self.model.ref(group_rid)
        targets = [m.instance.address for m in self.members if m.group == name]
        self.standins["load balancer"] = lb = LoadBalancer.from_model(
            self.model, self.switch, targets
        ).start()
        self._follow_target_group(group_rid, lb)
        if not self.wait_healthy:  # exploring a stack whose api-servers may not come up
            return
        try:
            wait_for(
                lambda: self._all_healthy(lb), 300, "the load balancer's targets to be healthy"
            )
        except TimeoutError as exc:
            tails = "\n".join(
                f"--- {m.name} ---\n{m.instance.journal()[-2500:]}"
                for m in self.members
                if m.group == name
            )
            raise TimeoutError(f"{exc}: {lb.target_health()}\n{tails}") from exc
        self.progress(f"  load balancer stand-in: {len(targets)} healthy target(s)")

    def _follow_target_group(self, group_rid: str, lb: Any) -> None:
        """HAProxy follows the group's target group in moto (moto's group registered the
        instances in it at launch; the agent deregisters and registers them around restarts)."""
        from sandbox.stack.registrations import Follower

        assert self.model is not None and self.aws is not None
        name = self.model.ref(group_rid)
        (arn,) = self.model.prop(group_rid, "TargetGroupARNs")
        members = [m for m in self.members if m.group == name]

        def addresses() -> Dict[str, str]:
            return {m.instance_id: m.instance.address for m in self.members if m.group == name}

        follower = Follower(
            lb, self.aws.client("elbv2"), arn, addresses, report=self.aws.set_routed
        )
        missing = {m.instance_id for m in members} - follower.registered()
        if missing:
            raise RuntimeError(f"{name}: not registered in the target group {arn}: {missing}")
        self.standins["target group"] = follower.start()

    @staticmethod
    def _all_healthy(lb: Any) -> bool:
        health = lb.target_health() or {}
        return bool(health) and all(v == "UP" or v.startswith("UP") for v in health.values())

    def _serve_imds(self, member: Member, group: Dict[str, Any]) -> None:
        """What EC2's IMDS answers this instance (TESTING.md's strict IMDSv2)."""
        assert self.model is not None and self.aws is not None
        model, region = self.model, self.model.pseudo["AWS::Region"]
        role_name = model.instance_role_for(member.role)
        creds = self.aws.issue_credentials(role_name, session=member.instance_id)
        profile_arn = model.get_att(model.instance_profile_for(member.role), "Arn")
        member.imds.set_role_credentials(role_name, creds, profile_arn)
        doc = {
            "instanceId": member.instance_id,
            "region": region,
            "availabilityZone": member.zone,
            "accountId": model.pseudo["AWS::AccountId"],
        }
        member.imds.set_paths(
            {
                "meta-data/instance-id": member.instance_id,
                "meta-data/placement/region": region,
                "meta-data/placement/availability-zone": member.zone,
                "meta-data/autoscaling/target-lifecycle-state": "InService",
                "dynamic/instance-identity/document": json.dumps(doc),
            }
        )
        member.imds.set_tags(self.instance_tags(member, group))

    def instance_tags(self, member: Member, group: Dict[str, Any]) -> Dict[str, str]:
        """The launch template's instance tags, the group's propagated tags, the group name."""
        assert self.model is not None
        data = self.model.prop(self.model.launch_template_for(member.role), "LaunchTemplateData")
        tags: Dict[str, str] = {}
        for spec in data.get("TagSpecifications", []):
            if spec.get("ResourceType") == "instance":
                tags.update({t["Key"]: str(t["Value"]) for t in spec.get("Tags", [])})
        tags.update({t["Key"]: t["Value"] for t in group.get("Tags", []) if t["PropagateAtLaunch"]})
        tags["aws:autoscaling:groupName"] = member.group
        return tags

    # -- what happens to a running stack -------------------------------------------------------

    def role_members(self, role: str) -> List[Member]:
        return [m for m in self.members if m.role == role and m.instance is not None]

    def scale_in(self, member: Member, timeout: float = 600) -> Dict[str, Any]:
        """Auto Scaling terminates `member` with the termination hook in place: Terminating:Wait
        (IMDS target-lifecycle-state Terminated) until the agent's one CompleteLifecycleAction,
        then the instance is terminated (moto) and its host stopped."""
        assert self.aws is not None
        before = len(self.aws.lifecycle_actions())
        member.imds.set(**{"meta-data/autoscaling/target-lifecycle-state": "Terminated"})

        def completed() -> List[Dict[str, Any]]:
            acts = self.aws.lifecycle_actions()[before:]
            return [a for a in acts if a["action"] == "CompleteLifecycleAction"]

        done = wait_for(completed, timeout, f"{member.name}: CompleteLifecycleAction")
        self.aws.client("autoscaling").terminate_instance_in_auto_scaling_group(
            InstanceId=member.instance_id, ShouldDecrementDesiredCapacity=True
        )
        return {"completions": done, "journal": member.instance.journal()}

    def remove(self, member: Member) -> None:
        if member.instance is not None:
            member.instance.stop()
        member.imds.stop()
        self.members.remove(member)
        self.write_state()

    def update(self, model: StackModel) -> Dict[str, Any]:
        """A stack update: what changed in the embedded AWS (update_in_aws), then the new
        metadata reaches every instance through its cfn-hup, whose hook action runs."""
        from sandbox.stack.aws_resources import update_in_aws

        assert self.model is not None and self.aws is not None
        changed = update_in_aws(self.model, model, self.aws)
        # every instance's cfn-hup sees the change within its interval, so at about the same
        # time (and each hook's `env sync --splay` waits its own random time)
        assert self._pool is not None
        runs = {m.name: self._pool.submit(m.instance.apply_update, model) for m in self.members}
        hooks = {name: run.result() for name, run in runs.items()}
        self.model = model
        return {"changed": changed, "hooks": hooks}

    # -- state, down -------------------------------------------------------------------------

    def state(self) -> Dict[str, Any]:
        return {
            "pid": os.getpid(),
            "stack": self.model.stack_name if self.model else None,
            "aws": self.aws.url if self.aws else None,
            "aws_at": self.aws_at,  # the embedded AWS as the instances reach it
            "region": self.model.pseudo["AWS::Region"] if self.model else None,
            "run_dir": str(self.run_dir),
            **self.state_extra,
            "instances": [
                {
                    "name": m.name,
                    "instance_id": m.instance_id,
                    "role": m.role,
                    "group": m.group,
                    "address": getattr(m.instance, "address", None),
                    "host_pid": getattr(getattr(m.instance, "host", None), "pid", None),
                }
                for m in self.members
            ],
        }

    def write_state(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.state_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state(), indent=1))
        os.replace(tmp, path)

    def down(self) -> None:
        """End everything this stack started, newest first, each by its PID."""
        for member in reversed(self.members):
            if member.instance is not None:
                member.instance.stop()
            member.imds.stop()
        self.members = []
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for standin in reversed(list(self.standins.values())):
            standin.stop()
        self.standins = {}
        if self.switch is not None:
            self.switch.stop()
            self.switch = None
        if self.aws is not None:
            self.aws.stop()
            self.aws = None
        if self.ca is not None:
            self.ca.remove()
            self.ca = None
        (self.state_dir / STATE_FILE).unlink(missing_ok=True)

    def cleanup_run_dir(self) -> None:
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> Stack:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()
