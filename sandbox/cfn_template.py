"""Read the CloudFormation template the way CloudFormation does, for tests.

- `load_template(path)`: YAML with CloudFormation's short tags (!Ref, !Sub, !GetAtt, ...)
  turned into their long forms ({"Ref": ...}, {"Fn::Sub": ...}), so the rest of the code sees
  one shape.
- `Resolver`: evaluates the intrinsic functions the template uses (Ref, Fn::Sub, Fn::GetAtt,
  Fn::Join, Fn::Base64, Fn::Select, and the template's Conditions with Fn::If, Fn::Equals,
  Fn::Not, Fn::And, Fn::Or, Condition; AWS::NoValue drops the key or item, as CloudFormation
  does) against chosen parameter values and made-up, but realistically shaped, physical ids
  (ARNs for secrets and keys, names where the template sets them). Enough to check the values
  that cross between resources (paths, names, ARNs) and the settings that depend on parameters.
- `references(value)`: the names a value refers to (for dependency order).
- `reduce_for_moto(template, supported)`: the template without the resource types moto cannot
  create, with every reference to a dropped resource replaced by the value `Resolver` gives it.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple

import yaml

from sandbox.stack.aws_logs import log_group_arn

_SHORT_TAGS = {
    "Ref": "Ref",
    "Condition": "Condition",
    **{
        name: "Fn::" + name
        for name in (
            "Sub",
            "GetAtt",
            "Join",
            "Select",
            "Split",
            "If",
            "Equals",
            "Not",
            "And",
            "Or",
            "Base64",
            "FindInMap",
            "GetAZs",
            "ImportValue",
            "Cidr",
            "Length",
            "ToJsonString",
        )
    },
}


class CfnLoader(yaml.SafeLoader):
    """yaml.SafeLoader that understands CloudFormation's short-form tags."""


def _construct(long_name: str):
    def construct(loader: CfnLoader, node: yaml.Node) -> Dict[str, Any]:
        if isinstance(node, yaml.ScalarNode):
            value: Any = loader.construct_scalar(node)
            if long_name == "Fn::GetAtt":
                value = value.split(".", 1)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_mapping(node, deep=True)
        return {long_name: value}

    return construct


for _short, _long in _SHORT_TAGS.items():
    CfnLoader.add_constructor("!" + _short, _construct(_long))


def load_template(path: Path) -> Dict[str, Any]:
    return yaml.load(Path(path).read_text(encoding="utf-8"), Loader=CfnLoader)  # noqa: S506


PSEUDO = {
    "AWS::Region": "us-east-1",
    "AWS::AccountId": "123456789012",
    "AWS::Partition": "aws",
    "AWS::URLSuffix": "amazonaws.com",
    "AWS::StackName": "airflow-test",
    "AWS::StackId": (
        "arn:aws:cloudformation:us-east-1:123456789012:stack/airflow-test/"
        "00000000-0000-0000-0000-000000000000"
    ),
    "AWS::NoValue": None,
}

_SUB_VAR = re.compile(r"\$\{([^}!][^}]*)\}")


class Resolver:
    """Evaluates intrinsic functions with fixed pseudo parameters and parameter values."""

    def __init__(
        self,
        template: Dict[str, Any],
        parameters: Optional[Dict[str, Any]] = None,
        pseudo: Optional[Dict[str, Any]] = None,
    ):
        self.template = template
        self.resources: Dict[str, Any] = template.get("Resources", {})
        self.pseudo = dict(PSEUDO, **(pseudo or {}))
        self.parameters: Dict[str, Any] = {}
        for name, spec in template.get("Parameters", {}).items():
            if "Default" in spec:
                self.parameters[name] = spec["Default"]
        self.parameters.update(parameters or {})

    # -- physical ids ------------------------------------------------------------------------

    def _prop(self, logical_id: str, prop: str) -> Optional[Any]:
        props = self.resources[logical_id].get("Properties", {})
        return self.resolve(props[prop]) if prop in props else None

    def ref(self, name: str) -> Any:
        if name in self.pseudo:
            return self.pseudo[name]
        if name in self.parameters:
            return self.parameters[name]
        if name in self.template.get("Parameters", {}):
            raise KeyError(f"parameter {name} has no default and no test value")
        if name not in self.resources:
            raise KeyError(f"Ref to unknown name {name}")
        rtype = self.resources[name]["Type"]
        region, account = self.pseudo["AWS::Region"], self.pseudo["AWS::AccountId"]
        if rtype == "AWS::SecretsManager::Secret":
            secret_name = self._prop(name, "Name")
            return f"arn:aws:secretsmanager:{region}:{account}:secret:{secret_name}-AbCdEf"
        named = {
            "AWS::SSM::Parameter": "Name",
            "AWS::AutoScaling::AutoScalingGroup": "AutoScalingGroupName",
            "AWS::AutoScaling::LifecycleHook": "LifecycleHookName",
            "AWS::CodeDeploy::Application": "ApplicationName",
            "AWS::CodeDeploy::DeploymentGroup": "DeploymentGroupName",
            "AWS::KMS::Alias": "AliasName",
            "AWS::Logs::LogGroup": "LogGroupName",
        }
        if rtype in named and self._prop(name, named[rtype]) is not None:
            return self._prop(name, named[rtype])
        if rtype == "AWS::KMS::Key":
            return "0000aaaa-bbbb-cccc-dddd-" + name.lower()[:12].ljust(12, "0")
        if rtype == "AWS::S3::Bucket":
            return f"{self.pseudo['AWS::StackName']}-{name.lower()}-1a2b3c"
        if rtype == "AWS::ElasticLoadBalancingV2::TargetGroup":
            tg = f"{self.pseudo['AWS::StackName']}-{name}"[:25].rstrip("-") + "-1A2B3C"
            return (
                f"arn:aws:elasticloadbalancing:{region}:{account}:targetgroup/{tg}/0123456789abcdef"
            )
        return f"{name}-physical-id"

    def get_att(self, name: str, attr: str) -> Any:
        rtype = self.resources[name]["Type"]
        region, account = self.pseudo["AWS::Region"], self.pseudo["AWS::AccountId"]
        if attr == "Arn":
            if rtype == "AWS::S3::Bucket":
                return f"arn:aws:s3:::{self.ref(name)}"
            if rtype == "AWS::KMS::Key":
                return f"arn:aws:kms:{region}:{account}:key/{self.ref(name)}"
            if rtype in ("AWS::IAM::Role", "AWS::IAM::InstanceProfile"):
                kind = "role" if rtype == "AWS::IAM::Role" else "instance-profile"
                return f"arn:aws:iam::{account}:{kind}/{name}"
            if rtype == "AWS::Logs::LogGroup":
                return log_group_arn(region, account, self.ref(name))
        if attr.endswith(".Address"):
            return f"{name.lower()}.example.{region}.amazonaws.com"
        if attr.endswith(".Port"):
            return {"AWS::RDS::DBInstance": "5432"}.get(rtype, "6379")
        if attr == "DNSName":
            return f"internal-{name.lower()}-123.{region}.elb.amazonaws.com"
        if attr == "LatestVersionNumber":
            return "1"
        return f"{name}.{attr}"

    # -- conditions --------------------------------------------------------------------------

    def condition(self, name: str) -> bool:
        """The value of the template's condition `name` with this resolver's parameters."""
        conditions = self.template.get("Conditions", {})
        if name not in conditions:
            raise KeyError(f"no condition {name}")
        return self._truth(conditions[name])

    def _truth(self, value: Any) -> bool:
        if isinstance(value, bool):
            return value
        if not (isinstance(value, dict) and len(value) == 1):
            raise ValueError(f"not a condition: {value!r}")
        ((fn, arg),) = value.items()
        if fn == "Condition":
            return self.condition(arg)
        if fn == "Fn::Equals":
            left, right = (self.resolve(v) for v in arg)
            # CloudFormation compares strings: a Number parameter's Ref is its text
            return str(left) == str(right)
        if fn == "Fn::Not":
            (only,) = arg
            return not self._truth(only)
        if fn == "Fn::And":
            return all(self._truth(v) for v in arg)
        if fn == "Fn::Or":
            return any(self._truth(v) for v in arg)
        raise NotImplementedError(f"{fn} is not a condition function")

    # -- functions ---------------------------------------------------------------------------

    def sub(self, text: str, variables: Optional[Dict[str, Any]] = None) -> str:
        variables = variables or {}

        def one(m: re.Match[str]) -> str:
            key = m.group(1)
            if key in variables:
                return str(self.resolve(variables[key]))
            if "." in key and key.split(".", 1)[0] in self.resources:
                res, attr = key.split(".", 1)
                return str(self.get_att(res, attr))
            return str(self.ref(key))

        # ${!Literal} stays as ${Literal}
        return _SUB_VAR.sub(one, text).replace("${!", "${")

    def resolve(self, value: Any) -> Any:
        if isinstance(value, list):
            # an item that is AWS::NoValue is removed, as CloudFormation does
            resolved = [(v, self.resolve(v)) for v in value]
            return [r for v, r in resolved if not (r is None and _yields_no_value(v))]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            ((fn, arg),) = value.items()
            if fn == "Ref":
                return self.ref(arg)
            if fn == "Fn::If":
                name, if_true, if_false = arg
                return self.resolve(if_true if self.condition(name) else if_false)
            if fn in ("Fn::Equals", "Fn::Not", "Fn::And", "Fn::Or", "Condition"):
                return self._truth(value)
            if fn == "Fn::Sub":
                if isinstance(arg, list):
                    return self.sub(arg[0], arg[1])
                return self.sub(arg)
            if fn == "Fn::GetAtt":
                return self.get_att(arg[0], arg[1])
            if fn == "Fn::Join":
                return str(arg[0]).join(str(self.resolve(v)) for v in arg[1])
            if fn == "Fn::Base64":
                # kept as text: tests read user data, they do not decode it
                return self.resolve(arg)
            if fn == "Fn::Select":
                return self.resolve(arg[1])[int(self.resolve(arg[0]))]
            if fn.startswith("Fn::"):
                raise NotImplementedError(f"{fn} is not resolved by this test helper")
        out = {k: self.resolve(v) for k, v in value.items()}
        # a property whose value is AWS::NoValue is removed, as CloudFormation does
        return {k: v for k, v in out.items() if not (v is None and _yields_no_value(value[k]))}


def _yields_no_value(value: Any) -> bool:
    """Whether `value` may resolve to AWS::NoValue (a Ref to it, or an Fn::If branch)."""
    if isinstance(value, dict) and len(value) == 1:
        ((fn, arg),) = value.items()
        if fn == "Ref":
            return arg == "AWS::NoValue"
        if fn == "Fn::If":
            return any(_yields_no_value(branch) for branch in arg[1:])
    return False


# -- a reduced template for moto --------------------------------------------------------------


def _references(value: Any) -> Set[str]:
    """Logical ids a value refers to (Ref, GetAtt, and ${Name} / ${Name.Attr} in Sub)."""
    found: Set[str] = set()
    if isinstance(value, list):
        for v in value:
            found |= _references(v)
    elif isinstance(value, dict):
        if len(value) == 1:
            ((fn, arg),) = value.items()
            if fn == "Ref" and isinstance(arg, str):
                found.add(arg)
            elif fn == "Fn::GetAtt":
                found.add(arg[0])
            elif fn == "Fn::Sub":
                text = arg[0] if isinstance(arg, list) else arg
                found |= {m.group(1).split(".", 1)[0] for m in _SUB_VAR.finditer(text)}
                if isinstance(arg, list):
                    found |= _references(arg[1])
        for v in value.values():
            found |= _references(v)
    return found


def references(value: Any) -> Set[str]:
    """Logical ids (and parameter or pseudo names) a value refers to: Ref, Fn::GetAtt, and the
    ${Name} / ${Name.Attr} of Fn::Sub."""
    return _references(value)


def _replace_refs(value: Any, dropped: Set[str], resolver: Resolver) -> Any:
    """`value` with every reference to a dropped resource replaced by its resolved value."""
    if isinstance(value, list):
        return [_replace_refs(v, dropped, resolver) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((fn, arg),) = value.items()
        if fn == "Ref" and arg in dropped:
            return resolver.ref(arg)
        if fn == "Fn::GetAtt" and arg[0] in dropped:
            return resolver.get_att(arg[0], arg[1])
        if fn == "Fn::Sub":
            text, variables = (arg[0], dict(arg[1])) if isinstance(arg, list) else (arg, {})

            def one(m: re.Match[str]) -> str:
                key = m.group(1)
                if key.split(".", 1)[0] in dropped and key not in variables:
                    return resolver.sub("${" + key + "}")
                return m.group(0)

            text = _SUB_VAR.sub(one, text)
            # a dynamic reference to a dropped secret cannot resolve: a placeholder stands in
            text = re.sub(r"\{\{resolve:secretsmanager:arn:[^}]*\}\}", "PlaceholderSecret0", text)
            variables = {k: _replace_refs(v, dropped, resolver) for k, v in variables.items()}
            return {"Fn::Sub": [text, variables] if variables else text}
    return {k: _replace_refs(v, dropped, resolver) for k, v in value.items()}


def reduce_for_moto(
    template: Dict[str, Any], supported: Iterable[str], resolver: Resolver
) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """(reduced template, {dropped logical id: its type}).

    Drops resources of types moto's CloudFormation cannot create (and, transitively, any
    resource left with nothing to stand on is *not* dropped: references are replaced by
    resolved values instead). Outputs that refer to dropped resources are dropped too.
    """
    supported = set(supported)
    out = copy.deepcopy(template)
    resources = out["Resources"]
    dropped = {rid: r["Type"] for rid, r in resources.items() if r["Type"] not in supported}
    for rid in dropped:
        del resources[rid]
    for rid, res in list(resources.items()):
        for key in ("Properties", "Metadata"):
            if key in res:
                res[key] = _replace_refs(res[key], set(dropped), resolver)
        deps = res.get("DependsOn")
        if deps is not None:
            deps = [deps] if isinstance(deps, str) else deps
            kept = [d for d in deps if d not in dropped]
            if kept:
                res["DependsOn"] = kept
            else:
                del res["DependsOn"]
    outputs = out.get("Outputs", {})
    for name in list(outputs):
        if _references(outputs[name]) & set(dropped):
            del outputs[name]
    return out, dropped


def statements(policy_document: Dict[str, Any]) -> List[Dict[str, Any]]:
    stmts = policy_document.get("Statement", [])
    return [stmts] if isinstance(stmts, dict) else list(stmts)


def as_list(value: Any) -> List[Any]:
    return value if isinstance(value, list) else [value]
