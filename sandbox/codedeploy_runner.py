"""A CodeDeploy agent stand-in that follows the agent's documented contract, for tests.

It reads the revision's `appspec.yml` itself, so what is tested is the appspec and its
scripts, not a copy of them:

- events in CodeDeploy's in-place order: ApplicationStop, (DownloadBundle), BeforeInstall,
  Install, AfterInstall, ApplicationStart, ValidateService; the first failure ends the
  deployment and skips the rest;
- ApplicationStop runs the *previous successful* revision's appspec and scripts (none on the
  first deployment), the others the new revision's;
- each script runs as its `runas` user with LIFECYCLE_EVENT, DEPLOYMENT_ID, APPLICATION_NAME,
  DEPLOYMENT_GROUP_NAME and DEPLOYMENT_GROUP_ID, cwd the deployment archive, in its own process
  group; the hook lasts until the script exits *and* its stdout/stderr close; at its
  `timeout` (default 3600) the process group is killed;
- Install removes the files the previous deployment installed, then copies `files` with
  `file_exists_behavior` (DISALLOW by default);
- the deployment archive lives under `root/<group-id>/<deployment-id>/deployment-archive`;
  a revision is a directory, or a zip bundle (`make bundle`, tools/release.py) unpacked there as
  DownloadBundle does, with the file modes the zip records (the hook scripts' 0755).

The instance side (sandbox/codedeploy_exec.py) runs through `execute(argv, timeout)`:
`SystemdHost.run` for the systemd test host, or a local subprocess.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import yaml

EXEC = Path(__file__).resolve().with_name("codedeploy_exec.py")
ORDER = (
    "ApplicationStop",
    "BeforeInstall",
    "Install",
    "AfterInstall",
    "ApplicationStart",
    "ValidateService",
)
MAX_TIMEOUT = 3600

Execute = Callable[[List[str], float], subprocess.CompletedProcess]


def local_execute(argv: List[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def host_execute(host, env: Optional[dict] = None) -> Execute:
    """Run the instance side inside a SystemdHost, as root, with `env` added."""
    return lambda argv, timeout: host.run(argv, check=False, timeout=timeout, env=env)


@dataclass
class EventResult:
    event: str
    script: str = ""
    rc: int = 0
    timed_out: bool = False
    seconds: float = 0.0
    output: str = ""

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.timed_out


@dataclass
class Deployment:
    deployment_id: str
    events: List[EventResult] = field(default_factory=list)
    failed: Optional[EventResult] = None

    @property
    def succeeded(self) -> bool:
        return self.failed is None

    def event(self, name: str) -> List[EventResult]:
        return [e for e in self.events if e.event == name]

    @property
    def message(self) -> str:
        """What the console shows for a failed hook: the status line and the script's tail."""
        if self.failed is None:
            return ""
        f = self.failed
        why = "timed out" if f.timed_out else f"failed with exit code {f.rc}"
        return f"Script at specified location: {f.script} {why}\n{f.output[-2048:]}"


class CodeDeployRunner:
    def __init__(
        self,
        execute: Execute,
        root: Path,
        application: str = "airflow",
        group: str = "airflow-workers",
        python: str = "python3",
    ):
        self.execute = execute
        self.root = Path(root)
        self.application = application
        self.group = group
        self.group_id = "dg-" + uuid.uuid5(uuid.NAMESPACE_DNS, group).hex[:12]
        self.python = python
        self.root.mkdir(parents=True, exist_ok=True)

    # -- paths ---------------------------------------------------------------------------------

    @property
    def _group_dir(self) -> Path:
        return self.root / self.group_id

    @property
    def _last_ok_file(self) -> Path:
        return self.root / "deployment-instructions" / f"{self.group_id}_last_successful_install"

    @property
    def _cleanup_file(self) -> Path:
        return self.root / "deployment-instructions" / f"{self.group_id}-cleanup"

    def last_successful_archive(self) -> Optional[Path]:
        try:
            return Path(self._last_ok_file.read_text().strip())
        except FileNotFoundError:
            return None

    # -- one deployment ------------------------------------------------------------------------

    def deploy(
        self,
        revision: Path,
        deployment_id: Optional[str] = None,
        stop_before: Optional[str] = None,
        between: Optional[Callable[[str], None]] = None,
    ) -> Deployment:
        """Deploy `revision` (a directory with appspec.yml at its root, or a zip bundle of one).

        `stop_before`: end the deployment (successfully) before this event.
        `between(event)`: called after each event, e.g. to observe the cluster mid-deploy.
        """
        dep = Deployment(deployment_id or "d-" + uuid.uuid4().hex[:9].upper())
        previous = self.last_successful_archive()
        archive = self._group_dir / dep.deployment_id / "deployment-archive"
        for event in ORDER:
            if stop_before == event:
                return dep
            if event == "ApplicationStop":
                if previous is None:  # first deployment: there is nothing to stop
                    continue
                results = self._run_hooks(previous, event, dep)
            elif event == "Install":
                results = [self._install(archive)]
            else:
                if event == "BeforeInstall":  # DownloadBundle happens just before
                    if Path(revision).is_file():
                        unpack_bundle(Path(revision), archive)
                    else:
                        shutil.copytree(revision, archive)
                results = self._run_hooks(archive, event, dep)
            dep.events += results
            bad = [r for r in results if not r.ok]
            if bad:
                dep.failed = bad[0]
                return dep
            if between is not None:
                between(event)
        self._last_ok_file.parent.mkdir(parents=True, exist_ok=True)
        self._last_ok_file.write_text(str(archive) + "\n")
        return dep

    def _appspec(self, archive: Path) -> dict:
        spec = yaml.safe_load((archive / "appspec.yml").read_text())
        if not isinstance(spec, dict) or spec.get("os") != "linux":
            raise ValueError(f"{archive}/appspec.yml: not an EC2 appspec with os: linux")
        return spec

    def _run_hooks(self, archive: Path, event: str, dep: Deployment) -> List[EventResult]:
        hooks = (self._appspec(archive).get("hooks") or {}).get(event) or []
        out = []
        for hook in hooks:
            timeout = min(float(hook.get("timeout", MAX_TIMEOUT)), MAX_TIMEOUT)
            script = str(archive / hook["location"])
            env = {
                "LIFECYCLE_EVENT": event,
                "DEPLOYMENT_ID": dep.deployment_id,
                "APPLICATION_NAME": self.application,
                "DEPLOYMENT_GROUP_NAME": self.group,
                "DEPLOYMENT_GROUP_ID": self.group_id,
            }
            argv = [
                self.python,
                str(EXEC),
                "hook",
                script,
                "--timeout",
                str(timeout),
                "--runas",
                str(hook.get("runas") or "root"),
                "--cwd",
                str(archive),
            ]
            for k, v in env.items():
                argv += ["--env", f"{k}={v}"]
            proc = self.execute(argv, timeout + 30)
            if proc.returncode != 0:
                raise RuntimeError(f"codedeploy_exec failed: {proc.stderr}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            out.append(
                EventResult(
                    event, hook["location"], r["rc"], r["timed_out"], r["seconds"], r["output"]
                )
            )
            if not out[-1].ok:
                break
        return out

    def _install(self, archive: Path) -> EventResult:
        spec = self._appspec(archive)
        self._cleanup_file.parent.mkdir(parents=True, exist_ok=True)
        argv = [
            self.python,
            str(EXEC),
            "install",
            "--archive",
            str(archive),
            "--appspec-json",
            json.dumps({k: spec.get(k) for k in ("files", "file_exists_behavior")}),
            "--cleanup",
            str(self._cleanup_file),
        ]
        proc = self.execute(argv, 300)
        if proc.returncode != 0:
            raise RuntimeError(f"codedeploy_exec install failed: {proc.stderr}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        return EventResult("Install", "", 0 if r["ok"] else 1, False, 0.0, r.get("error", ""))


def unpack_bundle(bundle: Path, dest: Path) -> Path:
    """A zip bundle unpacked into `dest` as CodeDeploy's DownloadBundle does: every member at
    its path (one that would land outside `dest` is refused), with the Unix mode the zip records
    (0644 when it records none)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    with zipfile.ZipFile(bundle) as zf:
        for info in zf.infolist():
            target = (dest / info.filename).resolve()
            if root not in target.parents:
                raise ValueError(f"{bundle}: member {info.filename!r} is outside the revision")
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(info))
            target.chmod((info.external_attr >> 16) & 0o777 or 0o644)
    return dest


def make_revision(dest: Path, files: dict, appspec_dir: Optional[Path] = None) -> Path:
    """A revision directory: the project's codedeploy/ (appspec.yml, hooks/) plus `files`
    ({relative path: text}), e.g. {"dags/x.py": "..."}."""
    src = appspec_dir or Path(__file__).resolve().parents[1] / "codedeploy"
    dest = Path(dest)
    shutil.copytree(src, dest)
    for rel, text in files.items():
        p = dest / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return dest
