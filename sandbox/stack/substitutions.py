"""Everything the launched sandbox stack does differently from a real instance, in one place.

The instances run the template's `AWS::CloudFormation::Init` as written (sandbox/stack/
cfn_init_apply.py), except what needs the internet, which the test hosts do not have: package
installs, pip from PyPI, the CodeDeploy agent's download. Each is replaced here by a prebuilt
stand-in, with the reason. A command that still reaches for the network after these
substitutions is refused by name (`network_use`), so a template change cannot slip a download
past the sandbox. Also listed: the one environment override and the unit drop-ins of the rig.

Stdlib only: this module is imported inside the test hosts by the sandbox's cfn-init.
"""

from __future__ import annotations

import re
from typing import Dict, List, NamedTuple, Optional, Tuple


class Substitution(NamedTuple):
    name: str
    pattern: str  # regex searched in the resolved command text
    replacement: str  # re.sub template; {wheelhouse} {airflow_venv} filled from the context
    why: str


COMMANDS: Tuple[Substitution, ...] = (
    Substitution(
        "agent from the wheelhouse",
        r'pip install (?:--no-cache-dir |-q )*"?/opt/airflow-agent/src(?P<extra>\[worker\])?"?',
        'pip install --no-cache-dir -q --no-index --find-links {wheelhouse} "airflow-ec2-agent'
        '\\g<extra>"',
        "pip would fetch the agent's dependencies (and the build backend) from PyPI; the same "
        "package is installed from wheels built on the machine (systemd_host.build_wheelhouse; "
        "the agent's own wheel from `make dist`'s artifact, the bytes the bucket holds), with "
        "the same extras",
    ),
    Substitution(
        "prebuilt Airflow venv",
        r"python3(?:\.\d+)? -m venv /opt/airflow/venv && /opt/airflow/venv/bin/pip install "
        r'[^"]*"apache-airflow\[[^\]]*\]==(?P<version>[0-9.]+)"\s+--constraint\s+"?\S+"?',
        "mkdir -p /opt/airflow && ln -sfn {airflow_venv} /opt/airflow/venv",
        "Airflow with its providers is ~300 MB from PyPI; the venv `make deps` built "
        "(.cache/airflow-venv: the same Airflow version, celery/amazon/postgres providers) is "
        "linked at the path the units use; a different AirflowVersion is refused",
    ),
    Substitution(
        "no CodeDeploy agent download",
        r"curl [^&]*codedeploy[^&]*/install && ruby /tmp/codedeploy-install auto"
        r"(?: && rm -f /tmp/codedeploy-install)?",
        ": codedeploy-agent is played by sandbox/codedeploy_runner.py",
        "the installer downloads the agent from S3 over the internet; deployments are run by "
        "sandbox/codedeploy_runner.py, which follows the agent's contract (appspec hooks as "
        "root with CodeDeploy's variables) and runs each hook inside this host",
    ),
    Substitution(
        "no CloudWatch agent",
        r"^/usr/local/sbin/airflow-cloudwatch-agent$",
        ": amazon-cloudwatch-agent cannot run in the sandbox",
        "the CloudWatch agent is Amazon Linux's package (not installed here: no RPM on a Debian "
        "host, no internet) and reads EC2 metadata and the journal to ship to CloudWatch Logs; "
        "its per-role configuration is still written by cfn-init on each instance, and the "
        "stack's log groups are created in the embedded AWS (sandbox/stack/aws_logs.py)",
    ),
)

# (manager, package): why nothing needs installing. Any other package is refused.
PACKAGES: Dict[Tuple[str, str], str] = {
    ("yum", "python3.11"): "Debian 12's /usr/bin/python3.11 (the test hosts share its root)",
    ("yum", "python3.11-pip"): "python3.11 -m venv brings pip (Debian's python3-venv)",
    ("yum", "ruby"): "only the CodeDeploy installer used it, and that is substituted",
    ("yum", "awscli-2"): "the machine's aws CLI (v1, same `s3 cp`), linked as /usr/local/bin/aws",
    ("yum", "amazon-cloudwatch-agent"): "the CloudWatch agent cannot run in the sandbox (see the "
    "'no CloudWatch agent' substitution): its configuration files are written, nothing runs them",
}

# The one environment override (systemd DefaultEnvironment of every instance): the embedded
# AWS, forwarded into the switch's namespace. Real instances reach AWS's public endpoints.
ENVIRONMENT_WHY = {
    "AWS_ENDPOINT_URL": "AWS is the embedded moto (sandbox/aws_server.py), forwarded to "
    "10.77.0.1 inside the private link; every boto3/botocore client and the aws CLI honour it (the "
    "Airflow children the agent starts get it from the agent's own environment, as a manager-wide "
    "endpoint setting: agent/airflow/units_env.py)",
}

# Drop-ins for the Airflow units (prefix drop-in dir: every airflow-*.service), filled with
# the prebuilt Airflow venv's real path.
UNIT_DROPINS = {
    "/etc/systemd/system/airflow-.service.d/50-aea-sandbox.conf": (
        "[Service]\n"
        "# sandbox only: the prebuilt Airflow venv's python lives under /root (pyenv), so no\n"
        "# ProtectHome; the venv itself may be under /tmp (a clone there), which PrivateTmp=\n"
        "# would hide: instead a fresh writable /tmp as PrivateTmp gives (Airflow's imports\n"
        "# need one), with the venv bound into it read-only. The shipped units keep both.\n"
        "ProtectHome=no\nPrivateTmp=no\nTemporaryFileSystem=/tmp:mode=1777\n"
        "BindReadOnlyPaths={airflow_venv}\n"
    ),
}


def unit_dropins(context: Dict[str, str]) -> Dict[str, str]:
    """UNIT_DROPINS with the context's paths filled in ({airflow_venv}: resolved, no symlink)."""
    return {path: text.format(**context) for path, text in UNIT_DROPINS.items()}


# Commands run in each host before its UserData (inside its overlay only).
HOST_ADJUSTMENTS = (
    (
        ("chmod", "0711", "/root"),
        "the prebuilt venvs' python lives under /root/.pyenv: the airflow user must traverse "
        "/root to run them (on an instance the venvs use /usr/bin/python3.11)",
    ),
)

# cfn-init / cfn-hup themselves: no Python 3 aws-cfn-bootstrap 2.0 on any registry reachable
# here, so /opt/aws/bin/cfn-init is sandbox/stack/cfn_init_apply.py and /opt/aws/bin/cfn-hup is
# sandbox/stack/cfn_hup.py; they read the stack's resolved metadata from METADATA_FILE, which
# the supervisor writes (and rewrites on a stack update), instead of DescribeStackResource.
METADATA_FILE = "/var/lib/aea-sandbox/cfn/metadata.json"
CONTEXT_FILE = "/var/lib/aea-sandbox/cfn/context.json"
SIGNAL_FILE = "/var/lib/aea-sandbox/cfn/signals.jsonl"
BOOTSTRAP_WHY = (
    "cfn-init/cfn-hup 2.0 are on no reachable registry; the sandbox's own implement the "
    "template's subset and read the resolved metadata from a file the supervisor writes; "
    "cfn-hup also takes SIGUSR1 as 'check now', so a stack update does not wait out its "
    "interval (minutes); cfn-signal records its arguments for the supervisor"
)
# Also on every instance: the sandbox CA (sandbox/stack/tls.py) in the system trust store,
# since the broker's and database's certificates are signed by it instead of Amazon's CAs;
# and /etc/hosts naming the template's endpoints (10.77.0.1) and the ip-10-77-0-N hostnames,
# as the VPC's DNS would.

_NETWORK = re.compile(r"https?://|\bcurl\b|\bwget\b|\bdnf\b|\byum\b|\bpip3? install\b")


class SubstitutionError(ValueError):
    """A command needs the network and no substitution covers it, or a stand-in does not fit."""


def substitute_command(command: str, context: Dict[str, str]) -> Tuple[str, List[str]]:
    """The command with every network install replaced; and the names of the substitutions."""
    used: List[str] = []
    for sub in COMMANDS:
        m = re.search(sub.pattern, command)
        if not m:
            continue
        want = m.groupdict().get("version")
        have = context.get("airflow_version")
        if want and have and want != have:
            raise SubstitutionError(
                f"{sub.name}: the template installs Airflow {want}, the prebuilt venv has {have}"
            )
        repl = sub.replacement.format(**context)
        command = command[: m.start()] + m.expand(repl) + command[m.end() :]
        used.append(sub.name)
    bad = network_use(command)
    if bad:
        raise SubstitutionError(f"reaches the network ({bad!r}) and no substitution covers it")
    return command, used


def network_use(command: str) -> Optional[str]:
    """The first sign of a network install left in a command (pip with --no-index is local)."""
    for m in _NETWORK.finditer(command):
        if m.group(0).startswith("pip"):
            rest = command[m.end() :].split("&&", 1)[0]
            if "--no-index" in rest:
                continue
        return m.group(0)
    return None


def package_why(manager: str, name: str) -> str:
    why = PACKAGES.get((manager, name))
    if why is None:
        raise SubstitutionError(f"package {manager}:{name} has no sandbox stand-in")
    return why
