"""The rest of create_in_aws's per-type creators: EC2 (security groups, launch templates), S3
buckets, Auto Scaling groups (with their metrics collection) and lifecycle hooks, the ELBv2
target group, CodeDeploy; the scaling policies and alarms are sandbox/stack/aws_scaling.py's.

Each takes (model, aws, logical id, report), creates the resource from its resolved properties
and returns the value `Ref` gives it; attributes (Arn, LatestVersionNumber, ...) go into
`model.attributes`. Kept apart from aws_resources.py only to keep modules small.
"""

from __future__ import annotations

from typing import Any, Callable, Dict

from sandbox.stack.aws_logs import create_log_group
from sandbox.stack.aws_scaling import HANDLERS_SCALING, enable_metrics_collection


def _tags(p: Dict[str, Any]) -> list:
    return [{"Key": t["Key"], "Value": str(t["Value"])} for t in p.get("Tags", [])]


def _security_group(model, aws, rid, report):
    p = model.properties(rid)
    ec2 = aws.client("ec2")
    name = p.get("GroupName") or model.generated_name(rid, 255)
    group_id = ec2.create_security_group(
        GroupName=name, Description=p["GroupDescription"], VpcId=p["VpcId"]
    )["GroupId"]
    for direction in ("Ingress", "Egress"):
        rules = p.get(f"SecurityGroup{direction}", [])
        if rules:
            _authorize(ec2, direction, group_id, rules)
    model.attributes[(rid, "GroupId")] = group_id
    return group_id


def _permission(rule: Dict[str, Any]) -> Dict[str, Any]:
    perm: Dict[str, Any] = {"IpProtocol": str(rule.get("IpProtocol", "-1"))}
    if "FromPort" in rule:
        perm["FromPort"] = int(rule["FromPort"])
        perm["ToPort"] = int(rule.get("ToPort", rule["FromPort"]))
    if "CidrIp" in rule:
        perm["IpRanges"] = [{"CidrIp": rule["CidrIp"]}]
    if "CidrIpv6" in rule:
        perm["Ipv6Ranges"] = [{"CidrIpv6": rule["CidrIpv6"]}]
    other = rule.get("SourceSecurityGroupId") or rule.get("DestinationSecurityGroupId")
    if other:
        perm["UserIdGroupPairs"] = [{"GroupId": other}]
    return perm


def _authorize(ec2, direction: str, group_id: str, rules: list) -> None:
    perms = [_permission(r) for r in rules]
    if direction == "Ingress":
        ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=perms)
    else:
        ec2.authorize_security_group_egress(GroupId=group_id, IpPermissions=perms)


def _security_group_rule(model, aws, rid, report):
    p = model.properties(rid)
    direction = "Ingress" if model.resources[rid]["Type"].endswith("Ingress") else "Egress"
    _authorize(aws.client("ec2"), direction, p["GroupId"], [p])
    return f"{rid}-rule"


def _launch_template(model, aws, rid, report):
    p = model.properties(rid)
    name = p.get("LaunchTemplateName") or model.generated_name(rid, 128)
    kwargs: Dict[str, Any] = {
        "LaunchTemplateName": name,
        "LaunchTemplateData": p["LaunchTemplateData"],
    }
    if p.get("TagSpecifications"):
        kwargs["TagSpecifications"] = p["TagSpecifications"]
    lt = aws.client("ec2").create_launch_template(**kwargs)["LaunchTemplate"]
    model.attributes[(rid, "LatestVersionNumber")] = str(lt["LatestVersionNumber"])
    model.attributes[(rid, "DefaultVersionNumber")] = str(lt["DefaultVersionNumber"])
    model.attributes[(rid, "LaunchTemplateId")] = lt["LaunchTemplateId"]
    return lt["LaunchTemplateId"]


def _bucket(model, aws, rid, report):
    p = model.properties(rid)
    s3 = aws.client("s3")
    name = p.get("BucketName") or model.generated_name(rid, 63, lower=True)
    s3.create_bucket(Bucket=name)
    if "VersioningConfiguration" in p:
        s3.put_bucket_versioning(
            Bucket=name, VersioningConfiguration={"Status": p["VersioningConfiguration"]["Status"]}
        )
    if "BucketEncryption" in p:
        s3.put_bucket_encryption(
            Bucket=name,
            ServerSideEncryptionConfiguration={
                "Rules": [
                    {"ApplyServerSideEncryptionByDefault": r["ServerSideEncryptionByDefault"]}
                    for r in p["BucketEncryption"]["ServerSideEncryptionConfiguration"]
                ]
            },
        )
    if "PublicAccessBlockConfiguration" in p:
        s3.put_public_access_block(
            Bucket=name, PublicAccessBlockConfiguration=p["PublicAccessBlockConfiguration"]
        )
    if "OwnershipControls" in p:
        s3.put_bucket_ownership_controls(Bucket=name, OwnershipControls=p["OwnershipControls"])
    if "LifecycleConfiguration" in p:
        rules = [_lifecycle_rule(r) for r in p["LifecycleConfiguration"]["Rules"]]
        s3.put_bucket_lifecycle_configuration(Bucket=name, LifecycleConfiguration={"Rules": rules})
    region = model.pseudo["AWS::Region"]
    model.attributes[(rid, "Arn")] = f"arn:aws:s3:::{name}"
    model.attributes[(rid, "DomainName")] = f"{name}.s3.amazonaws.com"
    model.attributes[(rid, "RegionalDomainName")] = f"{name}.s3.{region}.amazonaws.com"
    return name


def _lifecycle_rule(rule: Dict[str, Any]) -> Dict[str, Any]:
    """CloudFormation's shape of a lifecycle rule -> the S3 API's."""
    out: Dict[str, Any] = {"Status": rule["Status"], "Filter": {"Prefix": rule.get("Prefix", "")}}
    if "Id" in rule:
        out["ID"] = rule["Id"]
    if "ExpirationInDays" in rule:
        out["Expiration"] = {"Days": int(rule["ExpirationInDays"])}
    if "NoncurrentVersionExpiration" in rule:
        days = rule["NoncurrentVersionExpiration"]["NoncurrentDays"]
        out["NoncurrentVersionExpiration"] = {"NoncurrentDays": int(days)}
    elif "NoncurrentVersionExpirationInDays" in rule:
        days = rule["NoncurrentVersionExpirationInDays"]
        out["NoncurrentVersionExpiration"] = {"NoncurrentDays": int(days)}
    if "AbortIncompleteMultipartUpload" in rule:
        days = rule["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"]
        out["AbortIncompleteMultipartUpload"] = {"DaysAfterInitiation": int(days)}
    return out


def _group(model, aws, rid, report):
    p = model.properties(rid)
    asg = aws.client("autoscaling")
    name = p.get("AutoScalingGroupName") or model.generated_name(rid, 255)
    kwargs: Dict[str, Any] = {
        "AutoScalingGroupName": name,
        "MinSize": int(p["MinSize"]),
        "MaxSize": int(p["MaxSize"]),
        "VPCZoneIdentifier": ",".join(p.get("VPCZoneIdentifier", [])),
        "Tags": [
            {
                "Key": t["Key"],
                "Value": str(t["Value"]),
                "PropagateAtLaunch": str(t.get("PropagateAtLaunch", "false")).lower() == "true",
                "ResourceId": name,
                "ResourceType": "auto-scaling-group",
            }
            for t in p.get("Tags", [])
        ],
    }
    if "LaunchTemplate" in p:
        lt = p["LaunchTemplate"]
        kwargs["LaunchTemplate"] = {
            "LaunchTemplateId": lt["LaunchTemplateId"],
            "Version": str(lt["Version"]),
        }
    # DefaultInstanceWarmup: sent as CloudFormation would; moto 5.2 does not keep it (the
    # warmup the sandbox's evaluator applies is read from the template, target_tracking.py)
    for key in ("DesiredCapacity", "HealthCheckGracePeriod", "DefaultInstanceWarmup"):
        if key in p:
            kwargs[key] = int(p[key])
    if "HealthCheckType" in p:
        kwargs["HealthCheckType"] = p["HealthCheckType"]
    if p.get("TargetGroupARNs"):
        # moto registers the group's instances in its target groups, as Auto Scaling does
        kwargs["TargetGroupARNs"] = list(p["TargetGroupARNs"])
        report.notes.append(
            (rid, "its instances registered in the target group(s); HAProxy follows them")
        )
    asg.create_auto_scaling_group(**kwargs)
    enable_metrics_collection(aws, name, p.get("MetricsCollection", []))
    return name


def _target_group(model, aws, rid, report):
    """The target group in moto (its ARN is what the api-servers' agent.yaml names); HAProxy
    stands in for its data plane and follows moto's registrations (sandbox/stack/standins.py).
    moto does not emulate the data plane: a registered running instance reads `healthy` at
    once (no health checks) and a deregistered one `unused` at once (no deregistration delay)."""
    p = model.properties(rid)
    elb = aws.client("elbv2")
    kwargs: Dict[str, Any] = {
        "Name": p.get("Name") or model.generated_name(rid, 32),
        "TargetType": p.get("TargetType", "instance"),
    }
    for key in ("Protocol", "VpcId", "HealthCheckPath", "HealthCheckProtocol", "Matcher"):
        if key in p:
            kwargs[key] = p[key]
    for key in (
        "Port", "HealthCheckIntervalSeconds", "HealthCheckTimeoutSeconds",
        "HealthyThresholdCount", "UnhealthyThresholdCount",
    ):  # fmt: skip
        if key in p:
            kwargs[key] = int(p[key])
    tg = elb.create_target_group(**kwargs)["TargetGroups"][0]
    attributes = [
        {"Key": a["Key"], "Value": str(a["Value"])} for a in p.get("TargetGroupAttributes", [])
    ]
    if attributes:
        elb.modify_target_group_attributes(
            TargetGroupArn=tg["TargetGroupArn"], Attributes=attributes
        )
    model.attributes[(rid, "TargetGroupName")] = tg["TargetGroupName"]
    model.attributes[(rid, "TargetGroupFullName")] = tg["TargetGroupArn"].split(":")[-1]
    report.notes.append(
        (rid, "moto: targets healthy/unused at once (no health checks, no draining delay)")
    )
    return tg["TargetGroupArn"]


def _lifecycle_hook(model, aws, rid, report):
    p = model.properties(rid)
    kwargs = {
        k: p[k]
        for k in ("LifecycleHookName", "AutoScalingGroupName", "LifecycleTransition")
        if k in p
    }
    for key in ("DefaultResult", "NotificationTargetARN", "RoleARN", "NotificationMetadata"):
        if key in p:
            kwargs[key] = p[key]
    if "HeartbeatTimeout" in p:
        kwargs["HeartbeatTimeout"] = int(p["HeartbeatTimeout"])
    aws.client("autoscaling").put_lifecycle_hook(**kwargs)
    return kwargs["LifecycleHookName"]


def _codedeploy_application(model, aws, rid, report):
    p = model.properties(rid)
    name = p.get("ApplicationName") or model.generated_name(rid, 100)
    aws.client("codedeploy").create_application(
        applicationName=name, computePlatform=p.get("ComputePlatform", "Server")
    )
    return name


def _codedeploy_group(model, aws, rid, report):
    p = model.properties(rid)
    name = p.get("DeploymentGroupName") or model.generated_name(rid, 100)
    kwargs: Dict[str, Any] = {
        "applicationName": p["ApplicationName"],
        "deploymentGroupName": name,
        "serviceRoleArn": p["ServiceRoleArn"],
        "autoScalingGroups": p.get("AutoScalingGroups", []),
    }
    if "DeploymentConfigName" in p:
        kwargs["deploymentConfigName"] = p["DeploymentConfigName"]
    if "DeploymentStyle" in p:
        style = p["DeploymentStyle"]
        kwargs["deploymentStyle"] = {
            "deploymentType": style.get("DeploymentType", "IN_PLACE"),
            "deploymentOption": style.get("DeploymentOption", "WITHOUT_TRAFFIC_CONTROL"),
        }
    if "AutoRollbackConfiguration" in p:
        arc = p["AutoRollbackConfiguration"]
        kwargs["autoRollbackConfiguration"] = {
            "enabled": str(arc.get("Enabled", "false")).lower() == "true",
            "events": arc.get("Events", []),
        }
    aws.client("codedeploy").create_deployment_group(**kwargs)
    return name


HANDLERS_MORE: Dict[str, Callable[..., Any]] = {
    "AWS::EC2::SecurityGroup": _security_group,
    "AWS::EC2::SecurityGroupIngress": _security_group_rule,
    "AWS::EC2::SecurityGroupEgress": _security_group_rule,
    "AWS::EC2::LaunchTemplate": _launch_template,
    "AWS::S3::Bucket": _bucket,
    "AWS::AutoScaling::AutoScalingGroup": _group,
    "AWS::AutoScaling::LifecycleHook": _lifecycle_hook,
    "AWS::ElasticLoadBalancingV2::TargetGroup": _target_group,
    "AWS::CodeDeploy::Application": _codedeploy_application,
    "AWS::CodeDeploy::DeploymentGroup": _codedeploy_group,
    **HANDLERS_SCALING,
    "AWS::Logs::LogGroup": create_log_group,
}
