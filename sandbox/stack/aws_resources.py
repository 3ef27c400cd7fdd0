"""Create in the embedded AWS everything the stack's instances read, from the template itself.

`create_in_aws(model, aws)` walks the template's active resources in dependency order (as
CloudFormation does) and creates each one with the embedded AWS's API from its resolved
properties: KMS keys and aliases, Secrets Manager secrets (GenerateSecretString honoured:
SecretStringTemplate + GenerateStringKey, PasswordLength, Exclude*/Include*/Require*, drawn
with GetRandomPassword), secret target attachments, SSM parameters, IAM roles with their
policies, instance profiles, security groups and their rules, S3 buckets,
launch templates, the api-servers' target group, Auto Scaling groups (moto launches their
instances and registers them in their target groups), lifecycle hooks, scaling policies
(stored, not run: sandbox/stack/aws_scaling.py), the CodeDeploy application and deployment
groups, CloudWatch alarms. As each is created its physical id and attributes go into the
model, so later resources (and dynamic references) resolve to them.
Types it does not create are reported with the reason (their stand-ins are in stack/standins.py).

Parameters the sandbox takes from the embedded AWS (`{"from": ...}` in parameters.sandbox.json)
and SSM-typed parameters are resolved first, as CloudFormation resolves SSM parameter types.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Tuple

from sandbox.stack.aws_alarms import put_alarm
from sandbox.stack.aws_resources_more import HANDLERS_MORE
from sandbox.stack.model import StackModel

# types the sandbox does not create, and why (what stands in for them)
NOT_CREATED = {
    "AWS::RDS::DBInstance": "PostgreSQL 15 stand-in on the private link (master user and password "
    "from the template's properties)",
    "AWS::RDS::DBSubnetGroup": "no RDS: the database stand-in is on the sandbox's private link",
    "AWS::ElastiCache::ReplicationGroup": "redis-server stand-in with the template's TLS and AUTH "
    "token",
    "AWS::ElastiCache::CacheCluster": "redis-server stand-in",
    "AWS::ElastiCache::SubnetGroup": "no ElastiCache: the broker stand-in is on the private link",
    "AWS::ElastiCache::ParameterGroup": "no ElastiCache: its settings are the broker stand-in's",
    "AWS::ElasticLoadBalancingV2::LoadBalancer": "HAProxy stand-in in front of the api-servers",
    "AWS::ElasticLoadBalancingV2::Listener": "HAProxy's frontend (the listener's port)",
    "AWS::CloudFormation::WaitConditionHandle": "creates nothing; its metadata is read by the "
    "sandbox's cfn-init",
    "AWS::CloudFormation::WaitCondition": "the launch waits for each instance's cfn-init itself",
    "AWS::S3::BucketPolicy": "not applied: moto applies a bucket policy's Deny ignoring its "
    "Condition, and this one denies only plain-HTTP requests (aws:SecureTransport false), which "
    "is every request to the sandbox's HTTP endpoint; the instance roles' policies are enforced",
}
NOT_ENFORCED = {
    "AWS::EC2::SecurityGroup": "created, not enforced: every host on the sandbox's link reaches "
    "every other",
    "AWS::EC2::SecurityGroupIngress": "created, not enforced (see security groups)",
    "AWS::EC2::SecurityGroupEgress": "created, not enforced (see security groups)",
}


@dataclass
class CreatedReport:
    created: List[Tuple[str, str, str]] = field(default_factory=list)  # id, type, physical id
    skipped: List[Tuple[str, str, str]] = field(default_factory=list)  # id, type, reason
    notes: List[Tuple[str, str]] = field(default_factory=list)  # id, note

    def lines(self) -> List[str]:
        out = [f"created {t:<40} {rid} ({pid})" for rid, t, pid in self.created]
        out += [f"note    {rid}: {note}" for rid, note in self.notes]
        out += [f"skipped {t:<40} {rid}: {why}" for rid, t, why in self.skipped]
        return out

    def count(self, rtype: str) -> int:
        return sum(1 for _rid, t, _p in self.created if t == rtype)


def resolve_sandbox_parameters(model: StackModel, aws) -> None:
    """Fill the parameters the sandbox takes from the embedded AWS, and SSM-typed ones."""
    ec2, ssm = aws.client("ec2"), aws.client("ssm")
    specs = model.template.get("Parameters", {})
    for name, value in list(model.parameters.items()):
        ptype = str(specs[name].get("Type", ""))
        source = value.get("from") if isinstance(value, dict) else None
        if source == "default-vpc":
            vpcs = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])
            model.parameters[name] = vpcs["Vpcs"][0]["VpcId"]
        elif source == "default-subnets":
            vpcs = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])
            vpc = vpcs["Vpcs"][0]["VpcId"]
            subnets = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc]}])
            by_az = {s["AvailabilityZone"]: s["SubnetId"] for s in subnets["Subnets"]}
            model.parameters[name] = [by_az[az] for az in sorted(by_az)[:2]]
        elif isinstance(source, str) and source.startswith("ssm:"):
            got = ssm.get_parameter(Name=source[4:])["Parameter"]["Value"]
            model.parameters[name] = got
        elif ptype.startswith("AWS::SSM::Parameter::Value<"):
            model.parameters[name] = ssm.get_parameter(Name=value)["Parameter"]["Value"]
        elif isinstance(value, dict):
            raise ValueError(f"parameter {name}: unknown sandbox source {source!r}")


def create_in_aws(model: StackModel, aws) -> CreatedReport:
    """Create the stack's resources in `aws` (an AwsServer, the rig's admin credentials)."""
    resolve_sandbox_parameters(model, aws)
    report = CreatedReport()
    for rid in model.creation_order():
        rtype = model.resources[rid]["Type"]
        if rtype in NOT_CREATED:
            report.skipped.append((rid, rtype, NOT_CREATED[rtype]))
            continue
        handler = HANDLERS.get(rtype)
        if handler is None:
            report.skipped.append((rid, rtype, "the sandbox does not implement this type"))
            continue
        physical = handler(model, aws, rid, report)
        model.physical[rid] = physical
        report.created.append((rid, rtype, str(physical)))
        if rtype in NOT_ENFORCED:
            report.notes.append((rid, NOT_ENFORCED[rtype]))
    return report


# -- one function per type: (model, aws, logical id, report) -> the Ref value ----------------


def _kms_key(model, aws, rid, report):
    p = model.properties(rid)
    kms = aws.client("kms")
    kwargs = {"Description": p.get("Description", "")}
    if "KeyPolicy" in p:
        kwargs["Policy"] = json.dumps(p["KeyPolicy"])
    for key in ("KeyUsage", "KeySpec"):
        if key in p:
            kwargs[key] = p[key]
    meta = kms.create_key(**kwargs)["KeyMetadata"]
    if p.get("EnableKeyRotation"):
        kms.enable_key_rotation(KeyId=meta["KeyId"])
    model.attributes[(rid, "Arn")] = meta["Arn"]
    model.attributes[(rid, "KeyId")] = meta["KeyId"]
    return meta["KeyId"]


def _kms_alias(model, aws, rid, report):
    p = model.properties(rid)
    aws.client("kms").create_alias(AliasName=p["AliasName"], TargetKeyId=p["TargetKeyId"])
    return p["AliasName"]


_PASSWORD_OPTIONS = (
    "PasswordLength",
    "ExcludeCharacters",
    "ExcludeNumbers",
    "ExcludePunctuation",
    "ExcludeUppercase",
    "ExcludeLowercase",
    "IncludeSpace",
    "RequireEachIncludedType",
)


def generate_secret_string(sm, spec: Dict[str, Any]) -> str:
    """What CloudFormation stores for a GenerateSecretString (GetRandomPassword draws it)."""
    unknown = set(spec) - set(_PASSWORD_OPTIONS) - {"SecretStringTemplate", "GenerateStringKey"}
    if unknown:
        raise ValueError(f"GenerateSecretString: {sorted(unknown)} not implemented")
    kwargs = {k: spec[k] for k in _PASSWORD_OPTIONS if k in spec}
    for flag in set(kwargs) - {"PasswordLength", "ExcludeCharacters"}:
        kwargs[flag] = str(kwargs[flag]).lower() == "true"
    if "PasswordLength" in kwargs:
        kwargs["PasswordLength"] = int(kwargs["PasswordLength"])
    password = sm.get_random_password(**kwargs)["RandomPassword"]
    if ("SecretStringTemplate" in spec) != ("GenerateStringKey" in spec):
        raise ValueError(
            "GenerateSecretString needs both SecretStringTemplate and GenerateStringKey"
        )
    if "SecretStringTemplate" not in spec:
        return password
    doc = json.loads(spec["SecretStringTemplate"])
    doc[spec["GenerateStringKey"]] = password
    return json.dumps(doc)


def _secret(model, aws, rid, report):
    p = model.properties(rid)
    sm = aws.client("secretsmanager")
    if "GenerateSecretString" in p:
        value = generate_secret_string(sm, p["GenerateSecretString"])
    else:
        value = p.get("SecretString", "")
        if "{{resolve:" in value:
            raise ValueError(f"{rid}: a dynamic reference did not resolve: {value[:60]}...")
    name = p.get("Name") or model.generated_name(rid)
    kwargs = {"Name": name, "SecretString": value}
    for key in ("Description", "KmsKeyId"):
        if key in p:
            kwargs[key] = p[key]
    if p.get("Tags"):
        kwargs["Tags"] = p["Tags"]
    arn = sm.create_secret(**kwargs)["ARN"]
    model.secret_values[arn] = model.secret_values[name] = value
    return arn


def _secret_attachment(model, aws, rid, report):
    """As CloudFormation: the target's connection fields are added to the secret's JSON."""
    p = model.properties(rid)
    target = next(r for r in model.resources if model.ref(r) == p["TargetId"])
    sm = aws.client("secretsmanager")
    doc = json.loads(sm.get_secret_value(SecretId=p["SecretId"])["SecretString"])
    tp = model.properties(target)
    doc.update(
        {
            "engine": tp.get("Engine", ""),
            "host": model.get_att(target, "Endpoint.Address"),
            "port": int(model.get_att(target, "Endpoint.Port")),
            "dbInstanceIdentifier": model.ref(target),
        }
    )
    value = json.dumps(doc)
    sm.put_secret_value(SecretId=p["SecretId"], SecretString=value)
    model.secret_values[p["SecretId"]] = value
    report.notes.append((rid, f"connection fields of {target} (its stand-in) added to the secret"))
    return p["SecretId"]


def _ssm_parameter(model, aws, rid, report):
    p = model.properties(rid)
    name = p.get("Name") or "/" + model.generated_name(rid)
    kwargs = {"Name": name, "Type": p["Type"], "Value": str(p["Value"])}
    for key in ("Description", "AllowedPattern", "Tier", "DataType"):
        if key in p:
            kwargs[key] = p[key]
    if p.get("Tags"):
        kwargs["Tags"] = [{"Key": k, "Value": v} for k, v in p["Tags"].items()]
    aws.client("ssm").put_parameter(**kwargs)
    model.ssm_values[name] = kwargs["Value"]
    model.attributes[(rid, "Value")] = kwargs["Value"]
    return name


def _iam_role(model, aws, rid, report):
    p = model.properties(rid)
    iam = aws.client("iam")
    name = p.get("RoleName") or model.generated_name(rid)
    kwargs = {
        "RoleName": name,
        "AssumeRolePolicyDocument": json.dumps(p["AssumeRolePolicyDocument"]),
        "Path": p.get("Path", "/"),
    }
    if "Description" in p:
        kwargs["Description"] = p["Description"]
    role = iam.create_role(**kwargs)["Role"]
    for policy in p.get("Policies", []):
        iam.put_role_policy(
            RoleName=name,
            PolicyName=policy["PolicyName"],
            PolicyDocument=json.dumps(policy["PolicyDocument"]),
        )
    for arn in p.get("ManagedPolicyArns", []):
        try:
            iam.attach_role_policy(RoleName=name, PolicyArn=arn)
        except iam.exceptions.NoSuchEntityException:
            report.notes.append(
                (rid, f"{arn} is not in the embedded AWS (AWS-managed): not attached")
            )
    model.attributes[(rid, "Arn")] = role["Arn"]
    model.attributes[(rid, "RoleId")] = role["RoleId"]
    return name


def _instance_profile(model, aws, rid, report):
    p = model.properties(rid)
    iam = aws.client("iam")
    name = p.get("InstanceProfileName") or model.generated_name(rid)
    profile = iam.create_instance_profile(InstanceProfileName=name, Path=p.get("Path", "/"))
    for role in p.get("Roles", []):
        iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=role)
    model.attributes[(rid, "Arn")] = profile["InstanceProfile"]["Arn"]
    return name


def _iam_policy(model, aws, rid, report):
    p = model.properties(rid)
    iam = aws.client("iam")
    for role in p.get("Roles", []):
        iam.put_role_policy(
            RoleName=role,
            PolicyName=p["PolicyName"],
            PolicyDocument=json.dumps(p["PolicyDocument"]),
        )
    return p["PolicyName"]


def _managed_policy(model, aws, rid, report):
    p = model.properties(rid)
    iam = aws.client("iam")
    name = p.get("ManagedPolicyName") or model.generated_name(rid)
    arn = iam.create_policy(PolicyName=name, PolicyDocument=json.dumps(p["PolicyDocument"]))[
        "Policy"
    ]["Arn"]
    for role in p.get("Roles", []):
        iam.attach_role_policy(RoleName=role, PolicyArn=arn)
    return arn


HANDLERS: Dict[str, Callable[..., Any]] = {
    "AWS::KMS::Key": _kms_key,
    "AWS::KMS::Alias": _kms_alias,
    "AWS::SecretsManager::Secret": _secret,
    "AWS::SecretsManager::SecretTargetAttachment": _secret_attachment,
    "AWS::SSM::Parameter": _ssm_parameter,
    "AWS::IAM::Role": _iam_role,
    "AWS::IAM::InstanceProfile": _instance_profile,
    "AWS::IAM::Policy": _iam_policy,
    "AWS::IAM::ManagedPolicy": _managed_policy,
    **HANDLERS_MORE,
    "AWS::CloudWatch::Alarm": put_alarm,  # sandbox/stack/aws_alarms.py
}


def update_in_aws(old: StackModel, new: StackModel, aws) -> List[Tuple[str, str]]:
    """A stack update of what the instances read: SSM parameters whose value changed are
    overwritten, secrets whose SecretString changed get a new version (as CloudFormation
    updates them in place). `new` takes over `old`'s physical ids and generated values.
    Returns (logical id, what changed). Anything else that differs is refused by name."""
    for attr in ("physical", "attributes", "secret_values", "ssm_values", "endpoint_hosts"):
        setattr(new, attr, getattr(old, attr))
    for name, value in old.parameters.items():
        # taken from the embedded AWS, or made afresh by this load (not given by the update,
        # as a rotation gives its new FernetKey): the update keeps the previous value
        if isinstance(new.parameters.get(name), dict) or name in new.generated_parameters:
            new.parameters[name] = value
    changed: List[Tuple[str, str]] = []
    for rid in new.creation_order():
        rtype = new.resources[rid]["Type"]
        if rid not in old.resources or not old.active(rid):
            if rtype not in HANDLERS:
                raise ValueError(f"stack update adds {rid} ({rtype}): not created by the sandbox")
            new.physical[rid] = HANDLERS[rtype](new, aws, rid, CreatedReport())
            changed.append((rid, f"created {new.physical[rid]}"))
            continue
        before, after = old.properties(rid), new.properties(rid)
        if before == after:
            continue
        if (
            rtype == "AWS::SSM::Parameter"
            and set(before) == set(after)
            and before["Name"] == after["Name"]
        ):
            aws.client("ssm").put_parameter(
                Name=after["Name"], Value=str(after["Value"]), Type=after["Type"], Overwrite=True
            )
            new.ssm_values[after["Name"]] = str(after["Value"])
            changed.append((rid, f"{after['Name']} = {after['Value']}"))
        elif rtype == "AWS::SecretsManager::Secret" and "SecretString" in after:
            aws.client("secretsmanager").put_secret_value(
                SecretId=new.ref(rid), SecretString=after["SecretString"]
            )
            new.secret_values[new.ref(rid)] = after["SecretString"]
            changed.append((rid, "new secret version"))
        elif rtype not in HANDLERS:
            changed.append((rid, "not created in the embedded AWS: nothing to update"))
        else:
            raise ValueError(
                f"stack update changes {rid} ({rtype}): not implemented by the sandbox"
            )
    return changed
