"""The IAM grant `airflow-agent metrics` needs, as the embedded AWS enforces it for an instance
role (sandbox/stack/iam_request.py + iam_policy.py): `cloudwatch:PutMetricData` on "*" with the
condition `StringEquals cloudwatch:namespace = AirflowEC2Agent` lets the agent's call through
and refuses any other namespace (the statement the template's scheduler role needs)."""

from __future__ import annotations

import json

import boto3
import botocore.exceptions
import pytest

STATEMENT = {
    "Effect": "Allow",
    "Action": "cloudwatch:PutMetricData",
    "Resource": "*",
    "Condition": {"StringEquals": {"cloudwatch:namespace": "AirflowEC2Agent"}},
}


def test_put_metric_data_is_held_to_the_namespace_condition(aws):
    iam = aws.client("iam")
    trust = {"Version": "2012-10-17", "Statement": []}
    iam.create_role(RoleName="metrics-scheduler", AssumeRolePolicyDocument=json.dumps(trust))
    iam.put_role_policy(
        RoleName="metrics-scheduler",
        PolicyName="metrics",
        PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [STATEMENT]}),
    )
    creds = aws.issue_credentials("metrics-scheduler")
    cw = boto3.client(
        "cloudwatch",
        endpoint_url=aws.url,
        region_name="us-east-1",
        aws_access_key_id=creds["AccessKeyId"],
        aws_secret_access_key=creds["SecretAccessKey"],
        aws_session_token=creds["Token"],
    )
    datum = [{"MetricName": "DesiredWorkers", "Value": 1.0, "Unit": "Count"}]
    cw.put_metric_data(Namespace="AirflowEC2Agent", MetricData=datum)
    with pytest.raises(botocore.exceptions.ClientError) as refused:
        cw.put_metric_data(Namespace="Elsewhere", MetricData=datum)
    assert "AccessDenied" in refused.value.response["Error"]["Code"]
    denied = aws.denials()
    assert [d["action"] for d in denied] == ["cloudwatch:PutMetricData"]
