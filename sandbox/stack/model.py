"""The stack as CloudFormation sees it: the template, its parameters and conditions resolved.

`StackModel.load(template, params)` reads `cloudformation/airflow-cluster.yaml` (or a copy) with
parameter values from a CloudFormation parameters file (the example's values) and the
sandbox-only overrides of `parameters.sandbox.json` beside this module. It validates the values
as CloudFormation does (AllowedPattern, AllowedValues, MinValue/MaxValue, no value and no
default), evaluates the Conditions, and resolves intrinsic functions (Ref, Fn::Sub, Fn::GetAtt,
Fn::Join, Fn::Select, Fn::Split, Fn::If, Fn::Equals/Not/And/Or, Fn::FindInMap, Fn::GetAZs,
Fn::Base64, AWS::NoValue) and dynamic references (`{{resolve:secretsmanager:...}}`,
`{{resolve:ssm:...}}`) against the physical ids that `aws_resources.create_in_aws` records as
it creates each resource, in dependency order, as CloudFormation does. Before a resource exists
its Ref/GetAtt gives a realistically shaped placeholder (the same shapes as
sandbox/cfn_template.Resolver, whose methods `resolve`, `ref`, `get_att` and `sub` this keeps).

What the other parts read: `init_metadata()`, `configset_for(role)`, `instance_role_for(role)`,
`group_for(role)`, `endpoints()`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Dict, Optional, Set, Union

from sandbox.cfn_template import PSEUDO, load_template
from sandbox.stack.parameters import (
    EXAMPLE_PARAMETERS,
    REPO_ROOT,
    SANDBOX_PARAMETERS,
    StackError,
    generated,
    read_parameters,
    sandbox_overrides,
    validate_parameters,
)
from sandbox.stack.queries import ROLE_TAG, StackQueries

TEMPLATE = REPO_ROOT / "cloudformation" / "airflow-cluster.yaml"
STACK_NAME = "airflow-sandbox"
ROLES = ("scheduler", "webserver", "worker")
__all__ = ["NO_VALUE", "ROLES", "ROLE_TAG", "STACK_NAME", "TEMPLATE", "StackError", "StackModel"]

_SUB_VAR = re.compile(r"\$\{([^}!][^}]*)\}")
_DYNAMIC = re.compile(r"\{\{resolve:(secretsmanager|ssm):([^}]*)\}\}")


class NoValue:
    """AWS::NoValue: the property (or list item) it stands for is removed."""


NO_VALUE = NoValue()


def _short_id(*parts: str, n: int = 12) -> str:
    """A stable made-up id (CloudFormation appends random ones; stable keeps runs comparable)."""
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:n]


class StackModel(StackQueries):
    def __init__(
        self,
        template: Dict[str, Any],
        parameters: Dict[str, Any],
        stack_name: str = STACK_NAME,
        template_path: Optional[Path] = None,
    ):
        self.template = template
        self.template_path = template_path
        self.pseudo = dict(PSEUDO)
        self.pseudo["AWS::StackName"] = stack_name
        self.pseudo["AWS::StackId"] = PSEUDO["AWS::StackId"].replace("airflow-test", stack_name)
        self.stack_name = stack_name
        self.resources: Dict[str, Any] = template.get("Resources", {})
        self.parameters = validate_parameters(template.get("Parameters", {}), parameters)
        # filled by create_in_aws: logical id -> Ref value, (logical id, attribute) -> value
        self.physical: Dict[str, Any] = {}
        self.attributes: Dict[tuple, Any] = {}
        # secret ARN and name -> its SecretString; SSM parameter name -> value
        self.secret_values: Dict[str, str] = {}
        self.ssm_values: Dict[str, str] = {}
        self.endpoint_hosts: Dict[str, str] = {}
        # parameters whose value was made at load (the Fernet key), not given: a stack update
        # keeps the running stack's value for these (aws_resources.update_in_aws)
        self.generated_parameters: Set[str] = set()
        self.conditions = {
            name: bool(self._cond(name, ())) for name in template.get("Conditions", {})
        }

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        template_path: Union[str, Path] = TEMPLATE,
        params: Union[None, str, Path, Dict[str, Any]] = None,
        overrides: Union[None, Path, Dict[str, Any]] = None,
        stack_name: str = STACK_NAME,
        workers: Optional[int] = None,
        extra: Optional[Dict[str, Any]] = None,
    ) -> StackModel:
        """The model of `template_path` with the example's parameter values (or `params`), the
        sandbox overrides on top, `extra` values on top of those (a test's), and `workers` as
        the worker group's desired capacity."""
        values: Dict[str, Any] = {}
        if params is None or isinstance(params, (str, Path)):
            values.update(read_parameters(params or EXAMPLE_PARAMETERS))
        else:
            values.update(params)
        if overrides is None or isinstance(overrides, Path):
            values.update(sandbox_overrides(overrides or SANDBOX_PARAMETERS))
        else:
            values.update(overrides)
        values.update(extra or {})
        if workers is not None:
            values["WorkerDesiredCapacity"] = str(workers)
            if int(values.get("WorkerMaxSize", workers)) < workers:
                values["WorkerMaxSize"] = str(workers)
        made = {k for k, v in values.items() if generated(k, v) is not v}
        values = {k: generated(k, v) for k, v in values.items()}
        template = load_template(Path(template_path))
        model = cls(template, values, stack_name, Path(template_path))
        model.generated_parameters = made
        return model

    # -- conditions --------------------------------------------------------------------------

    def _cond(self, name: str, seen: tuple) -> bool:
        if name in seen:
            raise StackError(f"condition cycle: {' -> '.join(seen + (name,))}")
        return bool(self._cond_value(self.template["Conditions"][name], seen + (name,)))

    def _cond_value(self, value: Any, seen: tuple) -> Any:
        if isinstance(value, dict) and len(value) == 1:
            ((fn, arg),) = value.items()
            if fn == "Condition":
                return self._cond(arg, seen)
            if fn == "Fn::Equals":
                a, b = (self._cond_value(v, seen) for v in arg)
                return str(a) == str(b)
            if fn == "Fn::Not":
                return not self._cond_value(arg[0], seen)
            if fn == "Fn::And":
                return all(self._cond_value(v, seen) for v in arg)
            if fn == "Fn::Or":
                return any(self._cond_value(v, seen) for v in arg)
        return self.resolve(value)

    def condition(self, name: str) -> bool:
        return self.conditions[name]

    def active(self, logical_id: str) -> bool:
        """Whether CloudFormation creates this resource (its Condition, if any, holds)."""
        cond = self.resources[logical_id].get("Condition")
        return cond is None or self.conditions[cond]

    # -- physical ids ------------------------------------------------------------------------

    def prop(self, logical_id: str, name: str, default: Any = None) -> Any:
        props = self.resources[logical_id].get("Properties", {})
        if name not in props:
            return default
        value = self.resolve(props[name])
        return default if value is NO_VALUE else value

    def properties(self, logical_id: str) -> Dict[str, Any]:
        return self.resolve(self.resources[logical_id].get("Properties", {}))

    def generated_name(self, logical_id: str, max_len: int = 64, lower: bool = False) -> str:
        """The name CloudFormation makes for a resource the template does not name."""
        suffix = _short_id(self.stack_name, logical_id).upper()
        name = f"{self.stack_name}-{logical_id}"[: max_len - len(suffix) - 1] + "-" + suffix
        return name.lower() if lower else name

    def ref(self, name: str) -> Any:
        if name in self.pseudo:
            return NO_VALUE if name == "AWS::NoValue" else self.pseudo[name]
        if name in self.parameters:
            return self.parameters[name]
        if name not in self.resources:
            raise StackError(f"Ref to unknown name {name}")
        if name in self.physical:
            return self.physical[name]
        return self._placeholder_ref(name)

    def _placeholder_ref(self, name: str) -> Any:
        rtype = self.resources[name]["Type"]
        region, account = self.pseudo["AWS::Region"], self.pseudo["AWS::AccountId"]
        named = {
            "AWS::SSM::Parameter": "Name",
            "AWS::AutoScaling::AutoScalingGroup": "AutoScalingGroupName",
            "AWS::AutoScaling::LifecycleHook": "LifecycleHookName",
            "AWS::CodeDeploy::Application": "ApplicationName",
            "AWS::CodeDeploy::DeploymentGroup": "DeploymentGroupName",
            "AWS::KMS::Alias": "AliasName",
            "AWS::IAM::Role": "RoleName",
            "AWS::S3::Bucket": "BucketName",
        }
        if rtype == "AWS::SecretsManager::Secret":
            secret = self.prop(name, "Name") or self.generated_name(name)
            return f"arn:aws:secretsmanager:{region}:{account}:secret:{secret}-AbCdEf"
        if rtype in named and self.prop(name, named[rtype]) is not None:
            return self.prop(name, named[rtype])
        if rtype == "AWS::KMS::Key":
            return "0000aaaa-bbbb-cccc-dddd-" + _short_id(name)
        if rtype == "AWS::S3::Bucket":
            return self.generated_name(name, 63, lower=True)
        if rtype in ("AWS::IAM::Role", "AWS::IAM::InstanceProfile"):
            return self.generated_name(name)
        if rtype == "AWS::ElasticLoadBalancingV2::TargetGroup":
            tg = self.generated_name(name, 32).replace("_", "-")
            return f"arn:aws:elasticloadbalancing:{region}:{account}:targetgroup/{tg}/{'0' * 16}"
        return f"{name}-physical-id"

    def get_att(self, name: str, attr: str) -> Any:
        if (name, attr) in self.attributes:
            return self.attributes[(name, attr)]
        rtype = self.resources[name]["Type"]
        region, account = self.pseudo["AWS::Region"], self.pseudo["AWS::AccountId"]
        if attr == "Arn":
            if rtype == "AWS::S3::Bucket":
                return f"arn:aws:s3:::{self.ref(name)}"
            if rtype == "AWS::KMS::Key":
                return f"arn:aws:kms:{region}:{account}:key/{self.ref(name)}"
            if rtype in ("AWS::IAM::Role", "AWS::IAM::InstanceProfile"):
                kind = "role" if rtype == "AWS::IAM::Role" else "instance-profile"
                return f"arn:aws:iam::{account}:{kind}/{self.ref(name)}"
        if attr.endswith(".Address") or attr == "DNSName":
            return self.endpoint_host(name)
        if attr.endswith(".Port"):
            return str(self.prop(name, "Port") or {"AWS::RDS::DBInstance": 5432}.get(rtype, 6379))
        if attr == "LatestVersionNumber":
            return "1"
        return f"{name}.{attr}"

    def endpoint_host(self, name: str) -> str:
        """The DNS name of a resource the sandbox stands in for (database, broker, LB)."""
        if name not in self.endpoint_hosts:
            region = self.pseudo["AWS::Region"]
            rtype = self.resources[name]["Type"]
            short = _short_id(self.stack_name, name, n=10)
            host = {
                "AWS::RDS::DBInstance": f"{name.lower()}.c{short}.{region}.rds.amazonaws.com",
                "AWS::ElasticLoadBalancingV2::LoadBalancer": (
                    f"internal-{self.stack_name}-{name.lower()}-{short}.{region}.elb.amazonaws.com"
                ),
            }.get(rtype, f"master.{name.lower()}.{short}.use1.cache.amazonaws.com")
            self.endpoint_hosts[name] = host
        return self.endpoint_hosts[name]

    def endpoints(self) -> Dict[str, str]:
        """{logical id: DNS name} of every resource with an address the instances resolve."""
        types = {
            "AWS::RDS::DBInstance",
            "AWS::ElastiCache::ReplicationGroup",
            "AWS::ElastiCache::CacheCluster",
            "AWS::ElasticLoadBalancingV2::LoadBalancer",
        }
        return {
            rid: self.endpoint_host(rid)
            for rid, res in self.resources.items()
            if res["Type"] in types and self.active(rid)
        }

    # -- functions ---------------------------------------------------------------------------

    def sub(self, text: str, variables: Optional[Dict[str, Any]] = None) -> str:
        variables = variables or {}

        def one(m: re.Match[str]) -> str:
            key = m.group(1)
            if key in variables:
                return _text(self.resolve(variables[key]))
            if "." in key and key.split(".", 1)[0] in self.resources:
                res, attr = key.split(".", 1)
                return _text(self.get_att(res, attr))
            return _text(self.ref(key))

        return self.dynamic(_SUB_VAR.sub(one, text).replace("${!", "${"))

    def dynamic(self, text: str) -> str:
        """Dynamic references replaced by the values they name, once those exist."""

        def one(m: re.Match[str]) -> str:
            service, rest = m.group(1), m.group(2)
            if service == "ssm":
                return self.ssm_values.get(rest.split(":", 1)[0], m.group(0))
            # secret-id may be an ARN (with colons): the last 4 fields are optional selectors
            match = re.match(r"(arn:[^:]*:[^:]*:[^:]*:[^:]*:secret:[^:]*|[^:]*)(?::(.*))?$", rest)
            secret_id, tail = match.group(1), (match.group(2) or "")
            fields = tail.split(":") if tail else []
            if secret_id not in self.secret_values:
                return m.group(0)
            value = self.secret_values[secret_id]
            json_key = fields[1] if len(fields) > 1 and fields[1] else None
            return str(json.loads(value)[json_key]) if json_key else value

        return _DYNAMIC.sub(one, text)

    def resolve(self, value: Any) -> Any:
        if isinstance(value, list):
            items = [self.resolve(v) for v in value]
            return [v for v in items if v is not NO_VALUE]
        if isinstance(value, str):
            return self.dynamic(value) if "{{resolve:" in value else value
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            ((fn, arg),) = value.items()
            if fn == "Ref":
                return self.ref(arg)
            if fn == "Fn::Sub":
                return self.sub(arg[0], arg[1]) if isinstance(arg, list) else self.sub(arg)
            if fn == "Fn::GetAtt":
                parts = arg.split(".", 1) if isinstance(arg, str) else arg
                return self.get_att(parts[0], self.resolve(parts[1]))
            if fn == "Fn::Join":
                return str(arg[0]).join(_text(v) for v in self.resolve(arg[1]))
            if fn == "Fn::Base64":
                return base64.b64encode(str(self.resolve(arg)).encode()).decode()
            if fn == "Fn::Select":
                return self.resolve(arg[1])[int(self.resolve(arg[0]))]
            if fn == "Fn::Split":
                return str(self.resolve(arg[1])).split(arg[0])
            if fn == "Fn::If":
                cond, yes, no = arg
                return self.resolve(yes if self.conditions[cond] else no)
            if fn in ("Fn::Equals", "Fn::Not", "Fn::And", "Fn::Or", "Condition"):
                return self._cond_value(value, ())
            if fn == "Fn::FindInMap":
                mapping, top, second = (self.resolve(v) for v in arg)
                return self.template["Mappings"][mapping][top][second]
            if fn == "Fn::GetAZs":
                region = self.resolve(arg) or self.pseudo["AWS::Region"]
                return [region + z for z in "abcdef"]
            if fn.startswith("Fn::"):
                raise StackError(f"{fn} is not implemented by the sandbox's template model")
        out = {}
        for k, v in value.items():
            resolved = self.resolve(v)
            if resolved is not NO_VALUE:
                out[k] = resolved
        return out


def _text(value: Any) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, list) else str(value)
