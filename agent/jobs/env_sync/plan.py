"""SSM parameter names -> environment variables, and the checks a new env file must pass.

Pure functions, no I/O:
- `map_parameters` applies the naming contract (`<path>/<section>/<key>` ->
  `AIRFLOW__<SECTION>__<KEY>`, `<path>/env/<NAME>` -> `NAME`) and reports every bad, colliding
  or refused parameter at once;
- `refused_variable` says why a variable may not come from the env file at all: it would change
  how processes load code or reach AWS (docs/design.md: "Variables the env file never sets");
- `plan_env` merges static values (SSM wins), checks required keys, the drop limit and the
  systemd round-trip, and returns the bytes to write with a name-only diff.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from agent.errors import RefusedError
from agent.platform.envfile import NAME_RE, encode_env, parse_env, roundtrip_failures

_SEGMENT_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")

FILE_HEADER = (
    "Written by airflow-agent env sync from SSM Parameter Store. Do not edit:\n"
    "the next sync replaces this file."
)


# Variables that change how a process loads code or reaches AWS. Whoever writes an SSM parameter
# (or the env file) configures Airflow, by design; these would give them more: code of their
# choosing in every Airflow process, credentials or endpoints of their choosing for AWS calls,
# or the agent's own configuration. Matched case-insensitively: several consumers read the
# lower-case forms (http_proxy), and no legitimate variable differs from these only in case.
LOADS_CODE = "changes how processes load code"
REACHES_AWS = "changes how processes reach AWS (credentials, endpoints, config)"
REACHES_NETWORK = "changes how processes reach the network (proxy, TLS trust)"
CONFIGURES_AGENT = "configures the root agent itself"

# prefix -> why; the AWS_ prefix excepts ALLOWED_VARIABLES
REFUSED_PREFIXES: Tuple[Tuple[str, str], ...] = (
    ("LD_", LOADS_CODE),  # the dynamic loader: LD_PRELOAD, LD_LIBRARY_PATH, LD_AUDIT
    ("PYTHON", LOADS_CODE),  # PYTHONPATH, PYTHONHOME, PYTHONSTARTUP, PYTHONWARNINGS, ...
    ("BASH_FUNC_", LOADS_CODE),  # exported bash functions
    ("GIT_", LOADS_CODE),  # GIT_SSH_COMMAND, GIT_CONFIG_* (core.fsmonitor runs a program)
    ("PIP_", LOADS_CODE),  # PIP_INDEX_URL: where a virtualenv task's packages come from
    ("UV_", LOADS_CODE),  # the same for uv
    ("AWS_", REACHES_AWS),  # keys, session tokens, endpoints, IMDS, profiles, CA bundles
    ("AIRFLOW_AGENT_", CONFIGURES_AGENT),  # AIRFLOW_AGENT_CONFIG
)
REFUSED_NAMES: Dict[str, str] = {
    **dict.fromkeys(
        (
            "PATH",  # which program a bare command name runs
            "HOME",  # ~/.aws, ~/.gitconfig, pip.conf, the Python user site
            "XDG_CONFIG_HOME",  # git and pip configuration
            "BASH_ENV",  # a script every non-interactive bash runs first
            "ENV",  # the same for sh
            "SHELLOPTS",
            "BASHOPTS",
            "PS4",  # expanded (command substitution included) under `set -x`
            "IFS",
            "PERL5LIB",
            "PERLLIB",
            "PERL5OPT",
            "RUBYLIB",
            "RUBYOPT",
            "NODE_OPTIONS",
            "NODE_PATH",
            "JAVA_TOOL_OPTIONS",
            "_JAVA_OPTIONS",
            "JDK_JAVA_OPTIONS",
            "CLASSPATH",
            "GCONV_PATH",  # glibc loads iconv modules from it
            "GLIBC_TUNABLES",
            "OPENSSL_CONF",  # can load engines and providers
            "OPENSSL_ENGINES",
            "OPENSSL_MODULES",
        ),
        LOADS_CODE,
    ),
    **dict.fromkeys(
        (
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "NO_PROXY",
            "FTP_PROXY",
            "SSL_CERT_FILE",
            "SSL_CERT_DIR",
            "REQUESTS_CA_BUNDLE",
            "CURL_CA_BUNDLE",
            "NODE_EXTRA_CA_CERTS",
            "SSLKEYLOGFILE",  # writes every TLS session's keys to a file
        ),
        REACHES_NETWORK,
    ),
}
# Airflow's AWS clients need a region, and its units cannot ask IMDS: a region only picks
# among AWS's own endpoints, with the credentials the task role gives
ALLOWED_VARIABLES = frozenset({"AWS_REGION", "AWS_DEFAULT_REGION"})


def refused_variable(name: str) -> Optional[str]:
    """Why the env file may not set `name` ("NAME (rule), which ..."), or None when it may."""
    upper = name.upper()
    if upper in ALLOWED_VARIABLES:
        return None
    why = REFUSED_NAMES.get(upper)
    if why is not None:
        return f"{name}, which {why}"
    for prefix, why in REFUSED_PREFIXES:
        if upper.startswith(prefix):
            return f"{name} ({prefix}*), which {why}"
    return None


class MappingError(RefusedError):
    """One or more parameters do not map to a variable; the message names each of them."""


@dataclass(frozen=True)
class Parameter:
    name: str
    value: str
    type: str = "String"


def variable_name(param_name: str, path: str) -> Tuple[Optional[str], Optional[str]]:
    """(variable, None) for a parameter under `path`, or (None, why it does not map)."""
    rest = param_name[len(path) :]
    parts = rest.split("/")
    if len(parts) != 2 or not all(parts):
        return None, "is not <path>/<section>/<key> or <path>/env/<NAME>"
    section, key = parts
    if section == "env":
        if not NAME_RE.match(key):
            return None, "is not a valid environment variable name after env/"
        return key, None
    if not _SEGMENT_RE.match(section) or not _SEGMENT_RE.match(key):
        return None, "has characters other than letters, digits, '_', '-', '.'"
    var = "AIRFLOW__{}__{}".format(
        section.upper().replace("-", "_").replace(".", "_"),
        key.upper().replace("-", "_").replace(".", "_"),
    )
    return var, None


def map_parameters(params: Sequence[Parameter], paths: Sequence[str]) -> Dict[str, Parameter]:
    """variable -> the parameter that sets it; MappingError naming every bad parameter."""
    problems: List[str] = []
    sources: Dict[str, List[str]] = {}
    out: Dict[str, Parameter] = {}
    for p in sorted(params, key=lambda p: p.name):
        path = next((x for x in paths if p.name.startswith(x)), None)
        if path is None:
            problems.append(f"{p.name} is under none of the configured paths")
            continue
        var, why = variable_name(p.name, path)
        if var is None:
            problems.append(f"{p.name} {why}")
            continue
        refused = refused_variable(var)
        if refused is not None:
            problems.append(f"{p.name} sets {refused}")
            continue
        sources.setdefault(var, []).append(p.name)
        out[var] = p
    for var, names in sorted(sources.items()):
        if len(names) > 1:
            problems.append(f"{' and '.join(names)} all map to {var}")
    if problems:
        raise MappingError("parameters refused: " + "; ".join(problems))
    return out


@dataclass
class EnvPlan:
    content: bytes
    variables: Dict[str, str]
    added: List[str] = field(default_factory=list)
    removed: List[str] = field(default_factory=list)
    changed: List[str] = field(default_factory=list)

    @property
    def changes(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    def summary(self) -> str:
        return f"+{len(self.added)} -{len(self.removed)} ~{len(self.changed)}"


def plan_env(
    mapped: Dict[str, Parameter],
    static: Dict[str, str],
    required: Sequence[str],
    max_drop_fraction: float,
    current: Optional[bytes],
    allow_drop: bool = False,
) -> EnvPlan:
    """The env file to write, or RefusedError saying why the current one must stay."""
    if not mapped:
        raise RefusedError("SSM returned no parameters under the configured paths")
    variables = dict(static)
    variables.update({var: p.value for var, p in mapped.items()})

    missing = [name for name in required if name not in variables]
    if missing:
        raise RefusedError("required variables missing: " + ", ".join(sorted(missing)))

    failures = roundtrip_failures(variables)
    if failures:
        origin = {var: p.name for var, p in mapped.items()}
        described = [
            f"{origin.get(var, 'env.static ' + var)} ({var}) {why}"
            for var, why in sorted(failures.items())
        ]
        raise RefusedError("values systemd cannot carry: " + "; ".join(described))

    old = parse_env(current) if current is not None else {}
    plan = EnvPlan(content=encode_env(variables, header=FILE_HEADER), variables=variables)
    plan.added = sorted(variables.keys() - old.keys())
    plan.removed = sorted(old.keys() - variables.keys())
    plan.changed = sorted(k for k in variables.keys() & old.keys() if variables[k] != old[k])

    if old and not allow_drop and len(plan.removed) / len(old) > max_drop_fraction:
        raise RefusedError(
            f"sync would drop {len(plan.removed)} of {len(old)} variables "
            f"({len(plan.removed) / len(old):.0%} > env.max_drop_fraction "
            f"{max_drop_fraction:.0%}): {', '.join(plan.removed[:10])}"
            + (" ..." if len(plan.removed) > 10 else "")
            + "; rerun with --allow-drop if this is intended"
        )
    return plan
