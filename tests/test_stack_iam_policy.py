"""sandbox/stack/iam_policy.py: IAM's identity-policy logic as the embedded AWS applies it
(explicit Deny wins, then Allow, else refused; Action/Resource globs; conditions evaluated or
listed). Fast: pure functions."""

from __future__ import annotations

from sandbox.stack.iam_policy import evaluate

ARN = "arn:aws:ssm:us-east-1:123456789012:parameter/airflow/prod/core/executor"
SECRET = (
    "arn:aws:secretsmanager:us-east-1:123456789012:secret:airflow/prod/config/broker_url-AbCdEf"
)
KEY = "arn:aws:kms:us-east-1:123456789012:key/1234"


def allow(action, resource, **extra):
    return dict({"Effect": "Allow", "Action": action, "Resource": resource}, **extra)


def test_action_and_resource_globs():
    stmts = [allow("ssm:GetParametersByPath", "arn:aws:ssm:*:*:parameter/airflow/prod/*")]
    assert evaluate(stmts, "ssm:GetParametersByPath", ARN).allowed
    # actions match case-insensitively, as IAM does; resources do not
    assert evaluate(stmts, "SSM:getParametersByPath", ARN).allowed
    assert not evaluate(stmts, "ssm:GetParametersByPath", ARN.replace("/prod/", "/Prod/")).allowed
    other = evaluate(stmts, "ssm:GetParametersByPath", ARN.replace("/prod/", "/dev/"))
    assert not other.allowed
    assert (
        other.reason == "because no identity-based policy allows the ssm:GetParametersByPath action"
    )
    assert not evaluate(stmts, "ssm:PutParameter", ARN).allowed


def test_a_list_of_resources_and_the_question_mark():
    stmts = [allow(["secretsmanager:GetSecretValue"], [SECRET[:-6] + "??????", "arn:other"])]
    assert evaluate(stmts, "secretsmanager:GetSecretValue", SECRET).allowed
    assert not evaluate(stmts, "secretsmanager:GetSecretValue", SECRET + "x").allowed


def test_explicit_deny_wins_over_allow():
    stmts = [
        allow("s3:*", "*"),
        {
            "Sid": "NoBundles",
            "Effect": "Deny",
            "Action": "s3:PutObject",
            "Resource": "arn:aws:s3:::b/*",
        },
    ]
    assert evaluate(stmts, "s3:GetObject", "arn:aws:s3:::b/k").allowed
    denied = evaluate(stmts, "s3:PutObject", "arn:aws:s3:::b/k")
    assert not denied.allowed and "explicit deny" in denied.reason and "NoBundles" in denied.reason


def test_not_action_and_not_resource():
    stmts = [{"Effect": "Allow", "NotAction": "iam:*", "NotResource": "arn:aws:s3:::secret/*"}]
    assert evaluate(stmts, "s3:GetObject", "arn:aws:s3:::logs/k").allowed
    assert not evaluate(stmts, "iam:CreateUser", "*").allowed
    assert not evaluate(stmts, "s3:GetObject", "arn:aws:s3:::secret/k").allowed


def test_conditions_on_the_requests_context():
    via = {"StringEquals": {"kms:ViaService": "secretsmanager.us-east-1.amazonaws.com"}}
    stmts = [allow("kms:Decrypt", KEY, Condition=via)]
    through_sm = {"kms:ViaService": "secretsmanager.us-east-1.amazonaws.com"}
    assert evaluate(stmts, "kms:Decrypt", KEY, through_sm).allowed
    # called directly (no kms:ViaService in the context): the condition does not hold
    assert not evaluate(stmts, "kms:Decrypt", KEY, {}).allowed
    assert not evaluate(stmts, "kms:Decrypt", KEY, {"kms:ViaService": "s3.x"}).allowed


def test_a_condition_it_cannot_evaluate_is_listed_and_not_taken_as_met():
    cond = {"IpAddress": {"aws:SourceIp": "10.0.0.0/8"}}
    decision = evaluate([allow("s3:GetObject", "*", Condition=cond)], "s3:GetObject", "arn:x")
    assert not decision.allowed
    assert decision.unevaluated == ['IpAddress {"aws:SourceIp": "10.0.0.0/8"}']


def test_target_group_writes_are_checked_on_the_target_group_and_reads_on_star():
    from sandbox.stack.iam_request import checks

    tg = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/api/0123456789abcdef"
    params = {"Action": "DeregisterTargets", "TargetGroupArn": tg, "Targets.member.1.Id": "i-1"}
    ((verb, arn, _ctx),) = checks("elasticloadbalancing", "DeregisterTargets", params, {},
                                  "123456789012", "us-east-1")  # fmt: skip
    assert (verb, arn) == ("elasticloadbalancing:DeregisterTargets", tg)
    params = {"Action": "DescribeTargetHealth", "TargetGroupArn": tg}
    ((verb, arn, _ctx),) = checks("elasticloadbalancing", "DescribeTargetHealth", params, {},
                                  "123456789012", "us-east-1")  # fmt: skip
    assert (verb, arn) == ("elasticloadbalancing:DescribeTargetHealth", "*")
    stmts = [allow(["elasticloadbalancing:RegisterTargets"], tg)]
    assert evaluate(stmts, "elasticloadbalancing:RegisterTargets", tg).allowed
    assert not evaluate(
        stmts, "elasticloadbalancing:RegisterTargets", tg.replace("api", "x")
    ).allowed
