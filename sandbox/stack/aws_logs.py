"""CloudWatch Logs log groups of the launched stack (AWS::Logs::LogGroup) in the embedded AWS.

`create_log_group` follows create_in_aws's contract (sandbox/stack/aws_resources.py): (model, aws,
logical id, report) -> the Ref value, the log group's name. The group is created with the
template's resolved LogGroupName (or a generated one) and its RetentionInDays applied, so a
test can read back what CloudFormation would have made. Nothing ships to these groups in the
sandbox: the CloudWatch agent cannot run there (sandbox/stack/substitutions.py, "no CloudWatch
agent"); the launch report says so for each group.
"""

from __future__ import annotations


def log_group_arn(region: str, account: str, name: str) -> str:
    """The ARN CloudFormation's Fn::GetAtt <group>.Arn gives: the group's, ending in ':*'."""
    return f"arn:aws:logs:{region}:{account}:log-group:{name}:*"


def create_log_group(model, aws, rid, report):
    p = model.properties(rid)
    logs = aws.client("logs")
    name = p.get("LogGroupName") or model.generated_name(rid, 512)
    logs.create_log_group(logGroupName=name)
    if "RetentionInDays" in p:
        logs.put_retention_policy(logGroupName=name, retentionInDays=int(p["RetentionInDays"]))
    pseudo = model.pseudo
    model.attributes[(rid, "Arn")] = log_group_arn(
        pseudo["AWS::Region"], pseudo["AWS::AccountId"], name
    )
    report.notes.append(
        (rid, "created with its retention; nothing ships to it: no CloudWatch agent here")
    )
    return name
