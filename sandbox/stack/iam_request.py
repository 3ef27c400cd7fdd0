"""Which IAM action and resource ARNs one request to the embedded AWS needs (as AWS decides).

Runs inside the embedded AWS's process (sandbox/aws_server.py), next to moto, whose backends
it reads to name a resource by its full ARN (a secret named by its name, an Auto Scaling group
by its name, a KMS key by an alias). `checks(service, action, params, environ, account,
region)` returns the (action, resource, context) triples the request must be allowed, in the
order AWS checks them: e.g. GetSecretValue of a secret encrypted with a customer key also needs
kms:Decrypt on that key, with kms:ViaService = secretsmanager.<region>.amazonaws.com (Secrets
Manager calls KMS for the caller). Actions with no resource-level permission check "*".
"""

from __future__ import annotations

import urllib.parse
from typing import Any, Dict, List, Tuple

Check = Tuple[str, str, Dict[str, str]]


def _secret(account: str, region: str, secret_id: str):
    from moto.secretsmanager.models import secretsmanager_backends

    backend = secretsmanager_backends[account][region]
    try:
        return backend.describe_secret(secret_id)
    except Exception:
        return None


def _key_arn(account: str, region: str, key_id: str) -> str:
    from moto.kms.models import kms_backends

    try:
        return kms_backends[account][region].describe_key(key_id).arn
    except Exception:
        if key_id.startswith("arn:"):
            return key_id
        return f"arn:aws:kms:{region}:{account}:key/{key_id}"


def _group_arn(account: str, region: str, name: str) -> str:
    from moto.autoscaling.models import autoscaling_backends

    group = autoscaling_backends[account][region].autoscaling_groups.get(name)
    if group is not None:
        return group.arn
    return f"arn:aws:autoscaling:{region}:{account}:autoScalingGroup:*:autoScalingGroupName/{name}"


def _parameter_arn(account: str, region: str, name: str) -> str:
    if name.startswith("arn:"):
        return name
    return f"arn:aws:ssm:{region}:{account}:parameter" + (
        name if name.startswith("/") else "/" + name
    )


def _ssm(action: str, params: Dict[str, Any], account: str, region: str) -> List[str]:
    if action == "GetParametersByPath":
        return [_parameter_arn(account, region, params.get("Path", "/"))]
    if action in ("GetParameters", "DeleteParameters"):
        return [_parameter_arn(account, region, n) for n in params.get("Names", [])]
    if "Name" in params:
        return [_parameter_arn(account, region, params["Name"])]
    return ["*"]


def _secretsmanager(action, params, account, region, checks: List[Check]) -> List[str]:
    secret_id = params.get("SecretId")
    if not secret_id:
        return ["*"]
    secret = _secret(account, region, secret_id)
    if secret is None:
        arn = (
            secret_id
            if secret_id.startswith("arn:")
            else (f"arn:aws:secretsmanager:{region}:{account}:secret:{secret_id}")
        )
        return [arn]
    key = getattr(secret, "kms_key_id", None)
    if (
        key
        and action in ("GetSecretValue", "PutSecretValue", "UpdateSecret")
        and "alias/aws/" not in key
    ):
        verb = "kms:Decrypt" if action == "GetSecretValue" else "kms:GenerateDataKey"
        via = {"kms:ViaService": f"secretsmanager.{region}.amazonaws.com"}
        checks.append((verb, _key_arn(account, region, key), via))
    return [secret.arn]


# CloudWatch Logs actions on one stream; the others act on a log group
_LOG_STREAM_ACTIONS = ("CreateLogStream", "PutLogEvents", "GetLogEvents", "DeleteLogStream")


def _logs(action: str, params: Dict[str, Any], account: str, region: str) -> List[str]:
    """A stream's ARN for stream actions; `log-group:G:log-stream:` (what AWS checks and names
    in its AccessDenied) for DescribeLogStreams; the group's ARN for the other group actions."""
    group = params.get("logGroupName")
    if not isinstance(group, str):
        return ["*"]
    arn = f"arn:aws:logs:{region}:{account}:log-group:{group}"
    if action in _LOG_STREAM_ACTIONS:
        return [f"{arn}:log-stream:{params.get('logStreamName', '')}"]
    if action == "DescribeLogStreams":
        return [f"{arn}:log-stream:"]
    return [arn]


def _autoscaling(action: str, params: Dict[str, Any], account: str, region: str) -> List[str]:
    if action.startswith("Describe"):
        return ["*"]
    name = params.get("AutoScalingGroupName")
    if name:
        return [_group_arn(account, region, name)]
    return ["*"]


def s3_action(environ: Dict[str, Any]) -> Tuple[str, str]:
    """(s3:Action, resource ARN) of a path-style S3 request."""
    method = environ.get("REQUEST_METHOD", "GET")
    path = urllib.parse.unquote(environ.get("PATH_INFO", "/"))
    query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
    bucket, _, key = path.lstrip("/").partition("/")
    if not bucket:
        return "s3:ListAllMyBuckets", "*"
    if not key:
        arn = f"arn:aws:s3:::{bucket}"
        sub = {
            "location": "GetBucketLocation",
            "versioning": "GetBucketVersioning" if method == "GET" else "PutBucketVersioning",
            "versions": "ListBucketVersions",
            "uploads": "ListBucketMultipartUploads",
            "policy": "GetBucketPolicy" if method == "GET" else "PutBucketPolicy",
            "delete": "DeleteObject",
        }
        for name, verb in sub.items():
            if name in query:
                return "s3:" + verb, arn + ("/*" if name == "delete" else "")
        verb = {
            "GET": "ListBucket",
            "HEAD": "ListBucket",
            "PUT": "CreateBucket",
            "DELETE": "DeleteBucket",
        }
        return "s3:" + verb.get(method, "ListBucket"), arn
    arn = f"arn:aws:s3:::{bucket}/{key}"
    if method in ("GET", "HEAD"):
        if "tagging" in query:
            return "s3:GetObjectTagging", arn
        return ("s3:GetObjectVersion" if "versionId" in query else "s3:GetObject"), arn
    if method in ("PUT", "POST"):
        if "tagging" in query:
            return "s3:PutObjectTagging", arn
        return "s3:PutObject", arn  # also multipart create/part/complete and copies
    if method == "DELETE":
        if "uploadId" in query:
            return "s3:AbortMultipartUpload", arn
        return ("s3:DeleteObjectVersion" if "versionId" in query else "s3:DeleteObject"), arn
    return "s3:" + method, arn


def checks(
    service: str,
    action: str,
    params: Dict[str, Any],
    environ: Dict[str, Any],
    account: str,
    region: str,
) -> List[Check]:
    """The (IAM action, resource ARN, condition context) triples this request needs."""
    base = {"aws:SecureTransport": "false", "aws:RequestedRegion": region}
    if service == "s3":
        verb, arn = s3_action(environ)
        return [(verb, arn, base)]
    if service == "sts" and action == "GetCallerIdentity":
        return []  # AWS allows it to everyone
    if service == "monitoring":
        # CloudWatch signs as "monitoring" and names its IAM actions "cloudwatch:..."; PutMetricData
        # has no resource-level permission, its namespace is the condition key cloudwatch:namespace
        ctx = dict(base)
        if isinstance(params.get("Namespace"), str):
            ctx["cloudwatch:namespace"] = params["Namespace"]
        return [(f"cloudwatch:{action}", "*", ctx)]
    extra: List[Check] = []
    if service == "ssm":
        arns = _ssm(action, params, account, region)
    elif service == "secretsmanager":
        arns = _secretsmanager(action, params, account, region, extra)
    elif service == "kms" and params.get("KeyId"):
        arns = [_key_arn(account, region, params["KeyId"])]
    elif service == "autoscaling":
        arns = _autoscaling(action, params, account, region)
    elif service == "logs":
        arns = _logs(action, params, account, region)
    elif service == "sts" and params.get("RoleArn"):
        arns = [params["RoleArn"]]
    elif service == "elasticloadbalancing" and not action.startswith("Describe"):
        # Register/DeregisterTargets and the other writes: on the target group (or load
        # balancer) they name; ELBv2's Describe actions have no resource-level permission
        named = params.get("TargetGroupArn") or params.get("LoadBalancerArn")
        arns = [named] if named else ["*"]
    else:
        arns = ["*"]
    out = [(f"{service}:{action}", arn, base) for arn in arns]
    return out + [(verb, arn, dict(base, **ctx)) for verb, arn, ctx in extra]
