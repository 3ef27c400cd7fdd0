"""One instance of the launched stack: a systemd test host built by the template's own UserData.

`Instance(name, role, model, switch, aws_endpoint, imds).start()`:
1. refuses an Init the sandbox's cfn-init cannot apply (sandbox.cfn_init.check_init), before
   anything boots;
2. boots a SystemdHost, joins it to the switch (address 10.77.0.(10+N), hostname ip-10-77-0-N),
   serves its own IMDS (`imds`, a server on the machine's loopback) at 169.254.169.254:80,
   writes /etc/hosts (the template's endpoints -> the stand-ins on 10.77.0.1), puts the sandbox
   CA in its trust store, and sets the one environment override (AWS_ENDPOINT_URL);
3. installs the stand-ins of aws-cfn-bootstrap (/opt/aws/bin/cfn-init, cfn-hup, cfn-signal)
   and the stack's resolved metadata for them, then runs the launch template's UserData as a
   systemd unit, as cloud-init does: the template's own cfn-init call applies the role's
   configSet; its cfn-signal exit code decides success.
Everything substituted is listed in sandbox/stack/substitutions.py. `apply_update(model)` is
the cfn-hup path of a stack update: the new metadata is written, cfn-hup poked, and the
result of its hook action returned. `agent_package()` is what the template's install command
downloads from the artifact bucket (the launch uploads it): `make dist`'s artifact, same bytes.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from sandbox.cfn_init import check_init
from sandbox.proc import wait_for
from sandbox.stack import substitutions as subst
from sandbox.stack.network import PREFIX, Switch
from sandbox.stack.tls import SandboxCa
from sandbox.systemd_host import SystemdHost, build_wheelhouse
from sandbox.tiers import heavy

REPO = Path(__file__).resolve().parents[2]
AIRFLOW_VENV = REPO / ".cache" / "airflow-venv"
HOSTS_RANGE = range(10, 42)  # the ip-10-77-0-N names the VPC's DNS would answer
# instances of a group boot in threads: the wheelhouse cache is built by one of them only
_WHEELHOUSE_LOCK = threading.Lock()


class InstanceError(RuntimeError):
    """The instance could not be built; carries the cfn-init log."""


def agent_package(repo: Path = REPO) -> bytes:
    """The agent's package: the bytes `make dist` writes to dist/airflow-ec2-agent-<version>.tar.gz
    (one builder, tools/release.py), files at the top as `tar -xzf ... -C src` expects
    (src/setup.cfg, src/agent/, src/systemd/install-units.sh)."""
    from tools.release import build_dist

    return build_dist(repo)


def airflow_version(venv: Path = AIRFLOW_VENV) -> str:
    for d in (venv / "lib").glob("python*/site-packages/apache_airflow-*.dist-info"):
        return d.name[len("apache_airflow-") : -len(".dist-info")]
    raise InstanceError(f"no Airflow in {venv} (run make deps)")


def _machine_aws_cli() -> str:
    """The machine's aws CLI itself (a pyenv shim only works with pyenv's environment)."""
    found = shutil.which("aws")
    if found and "/shims/" in found:
        found = subprocess.run(
            ["pyenv", "which", "aws"], capture_output=True, text=True, check=True
        ).stdout.strip()
    if not found:
        raise InstanceError("no aws CLI on the machine (the awscli-2 package's stand-in)")
    return str(Path(found).resolve())


def _python_wrapper(module: str) -> str:
    # runs the module with the host's python, importing it from this tree, without leaking a
    # PYTHONPATH into the commands it runs
    return (
        "#!/bin/sh\n# sandbox stand-in: see sandbox/stack/substitutions.py\n"
        f'exec /usr/bin/python3 -I -c "import sys; sys.path.insert(0, {str(REPO)!r}); '
        f'from {module} import main; sys.exit(main())" "$@"\n'
    )


CFN_SIGNAL = (
    "#!/bin/sh\n# sandbox stand-in of cfn-signal: records its arguments for the supervisor\n"
    f'mkdir -p "$(dirname {subst.SIGNAL_FILE})"\n'
    "printf '%s\\n' \"$*\" >> " + subst.SIGNAL_FILE + "\n"
)


def install_cfn_tools(host: SystemdHost, context: Dict[str, str]) -> None:
    """/opt/aws/bin/cfn-init, cfn-hup, cfn-signal stand-ins, and the substitutions' context."""
    host.write_file(subst.CONTEXT_FILE, json.dumps(context, indent=1), mode=0o600)
    for tool, module in (
        ("cfn-init", "sandbox.stack.cfn_init_apply"),
        ("cfn-hup", "sandbox.stack.cfn_hup"),
    ):
        host.write_file(f"/opt/aws/bin/{tool}", _python_wrapper(module), mode=0o755)
    host.write_file("/opt/aws/bin/cfn-signal", CFN_SIGNAL, mode=0o755)


def write_metadata(
    host: SystemdHost, stack: str, stack_id: str, resource: str, init: Dict[str, Any]
) -> None:
    """The stack's metadata where the stand-ins read it (root only: it is the stack's)."""
    doc = {
        "stack": stack,
        "stack_id": stack_id,
        "resources": {resource: {"Metadata": {"AWS::CloudFormation::Init": init}}},
    }
    host.write_file(subst.METADATA_FILE, json.dumps(doc, indent=1), mode=0o600)


@heavy("systemd")
class Instance:
    def __init__(
        self,
        name: str,
        role: str,
        model: Any,
        switch: Switch,
        aws_endpoint: str,
        imds: Any,
        ca: Optional[SandboxCa] = None,
        shared_dir: Optional[Path] = None,
    ) -> None:
        self.name, self.role, self.model, self.switch = name, role, model, switch
        self.aws_endpoint, self.imds, self.ca = aws_endpoint, imds, ca
        self._own_shared = shared_dir is None
        self.shared_dir = Path(shared_dir or tempfile.mkdtemp(prefix=f"aea-{name}-"))
        self.host: Optional[SystemdHost] = None
        self.address: Optional[str] = None
        self.user_data_output = ""
        self.timings: Dict[str, float] = {}

    @property
    def hostname(self) -> str:
        return "ip-" + str(self.address).replace(".", "-")

    # -- boot --------------------------------------------------------------------------------

    def start(self, timeout: float = 1200) -> Instance:
        """Boot and build the instance. Its host, IMDS bridge and forwarders die with the
        thread that calls this (PR_SET_PDEATHSIG): call it from a thread that lives as long as
        the instance. Several instances may start in parallel threads."""
        init = self.model.init_metadata(self.role)
        check_init(init)
        t = time.monotonic()
        self.host = host = SystemdHost(self.shared_dir, name=self.name).start()
        try:
            self.address = self.switch.attach(host)
            host.run(["hostname", self.hostname])
            host.write_file("/etc/hostname", self.hostname + "\n")
            host.serve_link_local(int(self.imds.port))
            host.write_file("/etc/hosts", self._hosts())
            if self.ca is not None:
                host.write_file("/usr/local/share/ca-certificates/aea-sandbox-ca.crt",
                                self.ca.cert.read_bytes())  # fmt: skip
                host.run(["update-ca-certificates"])
            host.set_default_environment({"AWS_ENDPOINT_URL": f"http://{self.aws_endpoint}"})
            dropins = subst.unit_dropins({"airflow_venv": str(AIRFLOW_VENV.resolve())})
            for path, text in dropins.items():
                host.write_file(path, text)
            for argv, _why in subst.HOST_ADJUSTMENTS:
                host.run(list(argv))
            host.run(["ln", "-sfn", _machine_aws_cli(), "/usr/local/bin/aws"])
            self._install_bootstrap(init)
            self.timings["host"] = time.monotonic() - t
            t = time.monotonic()
            self._run_user_data(timeout)
            self.timings["user_data"] = time.monotonic() - t
        except BaseException:
            self.stop()
            raise
        return self

    def _hosts(self) -> str:
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
        for name in sorted(set(self.model.endpoints().values())):
            lines.append(f"{PREFIX}.1 {name}")
        for n in HOSTS_RANGE:
            lines.append(f"{PREFIX}.{n} ip-10-77-0-{n}.ec2.internal ip-10-77-0-{n}")
        return "\n".join(lines) + "\n"

    def _install_bootstrap(self, init: Dict[str, Any]) -> None:
        assert self.host is not None
        stage = self.shared_dir / "aea-install" / "wheelhouse"
        if stage.exists():
            shutil.rmtree(stage)
        with _WHEELHOUSE_LOCK:
            wheelhouse = build_wheelhouse(REPO)
        shutil.copytree(wheelhouse, stage)
        context = {
            "wheelhouse": str(stage),
            "airflow_venv": str(AIRFLOW_VENV),
            "airflow_version": airflow_version(),
        }
        self.write_metadata(init)
        install_cfn_tools(self.host, context)

    def write_metadata(self, init: Dict[str, Any]) -> None:
        """The stack's metadata as cfn-init/cfn-hup read it (root only: it is the stack's)."""
        assert self.host is not None
        write_metadata(
            self.host,
            self.model.stack_name,
            self.model.pseudo["AWS::StackId"],
            self.model.init_resource(self.role),
            init,
        )

    def _run_user_data(self, timeout: float) -> None:
        assert self.host is not None
        lt = self.model.launch_template_for(self.role)
        self.host.write_file("/var/lib/cloud/instance/user-data.txt",
                             self.model.user_data(lt), mode=0o700)  # fmt: skip
        # cloud-init runs user scripts from a unit (cloud-final.service): DefaultEnvironment
        # applies, as it does to every unit
        p = self.host.run(
            ["systemd-run", "--quiet", "--wait", "--pipe", "--collect",
             "--unit", "aea-cloud-final", "/var/lib/cloud/instance/user-data.txt"],
            check=False, timeout=timeout,
        )  # fmt: skip
        self.user_data_output = p.stdout + p.stderr
        signals = self.signals()
        rc = self._signalled_rc(signals)
        if rc != 0:
            raise InstanceError(
                f"{self.name} ({self.role}): cfn-signal -e {rc} (user data rc {p.returncode})\n"
                f"--- cfn-init.log (tail) ---\n{self.cfn_init_log()[-6000:]}\n"
                f"--- user data output (tail) ---\n{self.user_data_output[-3000:]}"
            )

    @staticmethod
    def _signalled_rc(signals: List[str]) -> Optional[int]:
        for line in reversed(signals):
            m = re.search(r"-e (\S+)", line)
            if m:
                return int(m.group(1)) if m.group(1).lstrip("-").isdigit() else -1
        return None

    def signals(self) -> List[str]:
        assert self.host is not None
        out = self.host.run(["cat", subst.SIGNAL_FILE], check=False).stdout
        return out.splitlines()

    def cfn_init_log(self) -> str:
        assert self.host is not None
        return self.host.run(["cat", "/var/log/cfn-init.log"], check=False).stdout

    # -- stack update ------------------------------------------------------------------------

    def apply_update(self, model: Any, timeout: float = 600) -> Dict[str, Any]:
        """Stack update: new metadata where cfn-hup reads it, a poke, the hook's result."""
        assert self.host is not None
        before = len(self.hup_results())
        init = model.init_metadata(self.role)
        check_init(init)
        self.model = model
        self.write_metadata(init)
        # cfn-hup alone: its interval pass may already be running the hook for this metadata,
        # and a signal to the whole unit would kill that hook (rc -10)
        self.host.systemctl("kill", "--kill-whom=main", "-s", "SIGUSR1", "cfn-hup.service")
        results = wait_for(
            lambda: self.hup_results()[before:], timeout, f"{self.name}: cfn-hup's hook to run"
        )
        if any(r["rc"] != 0 for r in results):
            raise InstanceError(f"{self.name}: cfn-hup hook failed: {results}")
        return results[-1]

    def hup_results(self) -> List[Dict[str, Any]]:
        assert self.host is not None
        from sandbox.stack.cfn_hup import HUP_RESULTS

        out = self.host.run(["cat", HUP_RESULTS], check=False).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    # -- passthrough -------------------------------------------------------------------------

    def run(self, argv: List[str], **kw: Any) -> subprocess.CompletedProcess:
        assert self.host is not None
        return self.host.run(argv, **kw)

    def journal(self, unit: Optional[str] = None, **kw: Any) -> str:
        assert self.host is not None
        return self.host.journal(unit, **kw)

    def stop(self) -> None:
        if self.host is not None:
            self.host.stop()
        if self._own_shared:
            shutil.rmtree(self.shared_dir, ignore_errors=True)

    def __enter__(self) -> Instance:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
