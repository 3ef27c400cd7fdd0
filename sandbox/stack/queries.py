"""What the stack's instances are, read from the template: the part of StackModel that
answers questions about roles (which group, launch template, configSet, instance role).

Every answer follows the template's own links (group tag -> launch template -> UserData's
cfn-init call; launch template -> instance profile -> role), so a template change moves them.
"""

from __future__ import annotations

import base64
import copy
import re
from typing import Any, Dict, List, Set

from sandbox.stack.parameters import StackError

ROLE_TAG = "airflow:role"
_SUB_VAR = re.compile(r"\$\{([^}!][^}]*)\}")


class StackQueries:
    """Mixin of StackModel (which provides resources, prop, resolve, active)."""

    resources: Dict[str, Any]

    def user_data(self, launch_template: str) -> str:
        data = self.prop(launch_template, "LaunchTemplateData")
        return base64.b64decode(data.get("UserData", "")).decode()

    def group_for(self, role: str) -> str:
        """Logical id of the Auto Scaling group whose instances carry `airflow:role` = role."""
        for rid, res in self.resources.items():
            if res["Type"] != "AWS::AutoScaling::AutoScalingGroup" or not self.active(rid):
                continue
            tags = self.prop(rid, "Tags") or []
            if any(t.get("Key") == ROLE_TAG and t.get("Value") == role for t in tags):
                return rid
        raise StackError(f"no Auto Scaling group has the tag {ROLE_TAG}={role}")

    def launch_template_for(self, role: str) -> str:
        spec = self.resources[self.group_for(role)]["Properties"]["LaunchTemplate"][
            "LaunchTemplateId"
        ]
        if not (isinstance(spec, dict) and "Ref" in spec):
            raise StackError(f"the {role} group's LaunchTemplateId is not a Ref to this stack")
        return spec["Ref"]

    def _cfn_init_call(self, role: str) -> Dict[str, str]:
        text = self.user_data(self.launch_template_for(role))
        for line in text.splitlines():
            if "cfn-init" in line and "--configsets" in line:
                args = line.split()
                return {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("--")}
        raise StackError(f"the {role} launch template's UserData runs no cfn-init --configsets")

    def configset_for(self, role: str) -> str:
        """The configSet the role's UserData runs at first boot."""
        return self._cfn_init_call(role)["--configsets"]

    def init_resource(self, role: str = "worker") -> str:
        return self._cfn_init_call(role)["--resource"]

    def init_metadata(self, role: str = "worker") -> Dict[str, Any]:
        """The resolved AWS::CloudFormation::Init the role's UserData runs cfn-init on."""
        res = self.resources[self.init_resource(role)]
        return self.resolve(copy.deepcopy(res["Metadata"]["AWS::CloudFormation::Init"]))

    def instance_profile_for(self, role: str) -> str:
        data = self.resources[self.launch_template_for(role)]["Properties"]["LaunchTemplateData"]
        arn = data["IamInstanceProfile"]["Arn"]
        if not (isinstance(arn, dict) and "Fn::GetAtt" in arn):
            raise StackError(f"the {role} launch template's profile is not this stack's")
        target = arn["Fn::GetAtt"]
        return target.split(".")[0] if isinstance(target, str) else target[0]

    def instance_role_for(self, role: str) -> str:
        """Name of the IAM role the role's instances get credentials of (profile -> role)."""
        roles = self.prop(self.instance_profile_for(role), "Roles")
        if len(roles) != 1:
            raise StackError(f"instance profile of {role} has {len(roles)} roles")
        return roles[0]

    def creation_order(self) -> List[str]:
        """Active resources in an order CloudFormation could create them (dependencies first)."""
        deps = {rid: self.dependencies(rid) for rid in self.resources if self.active(rid)}
        done: List[str] = []
        placed: Set[str] = set()
        visiting: Set[str] = set()

        def visit(rid: str) -> None:
            if rid in placed:
                return
            if rid in visiting:
                raise StackError(f"circular dependency at {rid}")
            visiting.add(rid)
            for dep in sorted(deps[rid]):
                if dep in deps:
                    visit(dep)
            visiting.discard(rid)
            placed.add(rid)
            done.append(rid)

        for rid in self.resources:
            if rid in deps:
                visit(rid)
        return done

    def dependencies(self, rid: str) -> Set[str]:
        res = self.resources[rid]
        found = _references(res.get("Properties", {}), set(self.resources))
        on = res.get("DependsOn", [])
        found |= set([on] if isinstance(on, str) else on)
        return found


def _references(value: Any, names: Set[str]) -> Set[str]:
    found: Set[str] = set()
    if isinstance(value, list):
        for v in value:
            found |= _references(v, names)
    elif isinstance(value, dict):
        if len(value) == 1:
            ((fn, arg),) = value.items()
            if fn == "Ref" and arg in names:
                found.add(arg)
            elif fn == "Fn::GetAtt":
                found.add(arg.split(".")[0] if isinstance(arg, str) else arg[0])
            elif fn == "Fn::Sub":
                text = arg[0] if isinstance(arg, list) else arg
                found |= {m.group(1).split(".", 1)[0] for m in _SUB_VAR.finditer(text)} & names
        for v in value.values():
            found |= _references(v, names)
    elif isinstance(value, str):
        # a dynamic reference names a secret by its ARN only after ${Secret} is substituted,
        # which the Fn::Sub above already counts
        pass
    return found
