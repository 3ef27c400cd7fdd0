"""The release builders: the agent's package the template installs and a CodeDeploy revision.

`make dist` and `make bundle DAGS=dir` call this module; the sandbox calls the same functions
(`sandbox.stack.instance.agent_package()` puts `build_dist()`'s bytes in the stack's artifact
bucket, `sandbox.stack.scenario.revision()` deploys a `build_bundle()` zip), so what the tests
install and deploy is byte for byte what an operator uploads.

- **dist**: `dist/airflow-ec2-agent-<version>.tar.gz`, the object the template's
  `AgentPackageKey` names (`airflow-ec2-agent/airflow-ec2-agent-<version>.tar.gz`). Its files
  sit at the top of the archive, as the template's `tar -xzf ... -C /opt/airflow-agent/src`
  expects: setup.cfg, pyproject.toml, README.md, CHANGELOG.md, agent/, systemd/. The version
  has one home, `agent/__init__.py`'s `__version__` (setup.cfg reads it with `attr:`).
- **bundle**: `dist/airflow-bundle-<sha256 prefix>.zip`, a revision for `aws deploy
  create-deployment --s3-location bundleType=zip,...`: codedeploy/appspec.yml, its hook scripts
  (mode 0755 in the zip, as CodeDeploy needs to run them), the DAGs under dags/ and, when given,
  plugins under plugins/.

Both archives are reproducible: sorted entries, fixed times, owner root, modes 0644 or 0755
from the source's executable bit; the same tree gives the same bytes. Standard library only,
Python >= 3.9, so it runs without the project's venv.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import io
import os
import stat
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
NAME = "airflow-ec2-agent"
# the template's AgentPackageKey is this prefix + dist_name(version)
KEY_PREFIX = f"{NAME}/"
# top-level files of the package (each that exists) and the trees under it
PACKAGE_FILES = ("setup.cfg", "pyproject.toml", "README.md", "CHANGELOG.md", "LICENSE")
PACKAGE_TREES = ("agent", "systemd", "docs")
# what a revision takes from codedeploy/ (its README stays out of AIRFLOW_HOME)
APPSPEC = "appspec.yml"
HOOKS = "hooks"
# 2000-01-01 UTC: a fixed time for reproducible archives, after 1980 (zip and wheel refuse
# earlier times, and pip builds a wheel from the unpacked package)
FIXED_TIME = 946684800
ZIP_TIME = (2000, 1, 1, 0, 0, 0)


class ReleaseError(Exception):
    """What the operator must fix, in one line (the CLI prints it and exits 2)."""


def version(repo: Path = REPO) -> str:
    """`agent.__version__`, read from the source without importing the agent."""
    tree = ast.parse((repo / "agent" / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets
        ):
            value = node.value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                return value.value
    raise ReleaseError(f"{repo / 'agent' / '__init__.py'} has no __version__ = '...'")


def dist_name(ver: str) -> str:
    return f"{NAME}-{ver}.tar.gz"


def package_key(ver: str) -> str:
    """The S3 key the template's AgentPackageKey default names for this version."""
    return KEY_PREFIX + dist_name(ver)


def _skipped(rel: Path) -> bool:
    return any(
        part == "__pycache__" or part.startswith(".") or part.endswith(".egg-info")
        for part in rel.parts
    ) or rel.suffix in (".pyc", ".pyo")


def _tree(root: Path, base: Path) -> List[Path]:
    """Regular files under root, relative to base, sorted; caches, dotfiles, symlinks left out."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(base)
            if not _skipped(rel) and p.is_file() and not p.is_symlink():
                out.append(rel)
    return sorted(out)


def package_files(repo: Path = REPO) -> List[str]:
    """The package's files, relative paths in archive order."""
    files = [Path(n) for n in PACKAGE_FILES if (repo / n).is_file()]
    for top in PACKAGE_TREES:
        files += _tree(repo / top, repo)
    return [f.as_posix() for f in files]


def _mode(path: Path) -> int:
    return 0o755 if os.stat(path).st_mode & stat.S_IXUSR else 0o644


def build_dist(repo: Path = REPO) -> bytes:
    """The agent's package: a reproducible tar.gz with its files at the top."""
    raw = io.BytesIO()
    with (
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for rel in package_files(repo):
            src = repo / rel
            data = src.read_bytes()
            info = tarfile.TarInfo(rel)
            info.size, info.mode, info.mtime = len(data), _mode(src), FIXED_TIME
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def write_dist(out_dir: Path, repo: Path = REPO) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / dist_name(version(repo))
    path.write_bytes(build_dist(repo))
    return path


def bundle_entries(
    dags: Optional[Path], plugins: Optional[Path] = None, repo: Path = REPO
) -> List[Tuple[str, Path]]:
    """(name in the revision, source file) for a revision, in archive order; refuses what
    CodeDeploy would deploy as an empty or broken Airflow tree."""
    if dags is None or str(dags) == "":
        raise ReleaseError(
            "no DAGs directory: give one, e.g. `make bundle DAGS=examples/dags` "
            "(python -m tools.release bundle --dags DIR)"
        )
    codedeploy = repo / "codedeploy"
    entries = [(APPSPEC, codedeploy / APPSPEC)]
    entries += [(r.as_posix(), codedeploy / r) for r in _tree(codedeploy / HOOKS, codedeploy)]
    for label, arc, src in (("DAGS", "dags", dags), ("PLUGINS", "plugins", plugins)):
        if src is None:
            continue
        src = Path(src)
        if not src.is_dir():
            raise ReleaseError(f"{label}={src} is not a directory")
        files = _tree(src, src)
        if label == "DAGS" and not any(f.suffix in (".py", ".zip") for f in files):
            raise ReleaseError(f"DAGS={src} holds no .py or .zip file: no DAG to deploy")
        entries += [(f"{arc}/{f.as_posix()}", src / f) for f in files]
    return entries


def build_bundle(dags: Optional[Path], plugins: Optional[Path] = None, repo: Path = REPO) -> bytes:
    """A CodeDeploy revision as a reproducible zip (Unix modes kept for the hook scripts)."""
    raw = io.BytesIO()
    with zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, src in bundle_entries(dags, plugins, repo):
            info = zipfile.ZipInfo(name, date_time=ZIP_TIME)
            info.create_system = 3  # Unix: unzip and CodeDeploy honour external_attr's mode
            info.external_attr = (stat.S_IFREG | _mode(src)) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, src.read_bytes())
    return raw.getvalue()


def write_bundle(
    out_dir: Path, dags: Optional[Path], plugins: Optional[Path] = None, repo: Path = REPO
) -> Path:
    """dist/airflow-bundle-<12 hex of its sha256>.zip: a new name for new content, so each
    revision can be uploaded under its own S3 key."""
    data = build_bundle(dags, plugins, repo)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"airflow-bundle-{hashlib.sha256(data).hexdigest()[:12]}.zip"
    path.write_bytes(data)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.release", description="make dist / make bundle (tools/release.py)"
    )
    sub = parser.add_subparsers(dest="what", required=True)
    d = sub.add_parser("dist", help="the agent's package the template installs")
    d.add_argument("--out", type=Path, default=REPO / "dist", metavar="DIR")
    b = sub.add_parser("bundle", help="a CodeDeploy revision: appspec, hooks, DAGs")
    b.add_argument("--dags", type=Path, default=None, metavar="DIR")
    b.add_argument("--plugins", type=Path, default=None, metavar="DIR")
    b.add_argument("--out", type=Path, default=REPO / "dist", metavar="DIR")
    sub.add_parser("version", help="print the agent's version")
    sub.add_parser("key", help="print the AgentPackageKey for this version")
    args = parser.parse_args(argv)
    try:
        if args.what == "version":
            print(version())
            return 0
        if args.what == "key":
            print(package_key(version()))
            return 0
        if args.what == "dist":
            path = write_dist(args.out)
        else:
            path = write_bundle(args.out, args.dags, args.plugins)
    except ReleaseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{path} ({path.stat().st_size} bytes)", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
