"""The operator docs' command blocks and where each one can run.

docs/operations.md, docs/upgrading.md, docs/troubleshooting.md and docs/rotating-secrets.md hold
shell blocks an operator types. Each one is marked, on the line right before its fence, with
where it runs:

    <!-- sandbox: worker -->                          runs on a worker of the sandbox stack
    <!-- sandbox: scheduler; expect: config hash -->  ... and its output contains the text
    <!-- needs: aws-account -->                       needs a real AWS account (the AWS CLI
                                                      against the account, Session Manager,
                                                      the real CodeDeploy agent's files)

docs/sandbox.md's blocks run on this machine, from the repository's root, in doc order:

    <!-- local: run -->                               runs to its end (exit 0)
    <!-- local: run; expect: deployed -->             ... and its output contains the text
    <!-- local: background; expect: stack up: -->     runs on (its own terminal); the next
                                                      block starts once its output shows the
                                                      text; it ends with exit 0 after the last

`tests/test_stack_launch.py` runs every sandbox block on a member of its role of the launched
stack and asserts exit 0 and each `expect:` text; `tests/test_stack_cli_up.py` runs the local
blocks as a newcomer would; the fast tier fails on a shell block marked
neither way, so no command in the docs goes unchecked by accident. Fences whose info string is
not a shell (`text` for output shown, `yaml`, `json`) are not commands and take no mark; a fence
with no info string is refused, so a command block cannot hide as one.

The mark is an HTML comment, which a rendered page does not show; the line before it is the
label a reader sees (`On a worker:`, `From your workstation (AWS CLI):`, ...). `LABELS` holds
the label each role's blocks begin with, and `tests/test_docs.py` checks every block has one.

Pure: text in, blocks out (no I/O but `doc_blocks(path)` reading the one file).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

ROLES = ("scheduler", "webserver", "worker")
SHELLS = ("sh", "bash", "shell")
NOT_COMMANDS = ("text", "yaml", "json", "ini")
AWS_ACCOUNT = "aws-account"
# the visible label above a sandbox block of each role starts with this; a needs: aws-account
# block's label starts with one of NEEDS_LABELS
LABELS = {"scheduler": "On a scheduler", "webserver": "On an api-server", "worker": "On a worker"}
NEEDS_LABELS = ("From your workstation", "On ")
LOCAL_LABEL = "On this machine"  # docs/sandbox.md's blocks, from the repository's root
OPERATOR_DOCS = (
    "docs/operations.md",
    "docs/upgrading.md",
    "docs/troubleshooting.md",
    "docs/rotating-secrets.md",
    "docs/sandbox.md",
)
LOCAL = "local"
LOCAL_MODES = ("run", "background")

_FENCE = re.compile(r"^(```+)\s*([\w-]*)\s*$")
_MARK = re.compile(r"^<!--\s*(sandbox|needs|local)\s*:\s*(.*?)\s*-->\s*$")


class DocBlockError(ValueError):
    """A doc's blocks are not all marked, or a mark is malformed; names every place."""


@dataclass(frozen=True)
class Block:
    doc: str
    line: int  # 1-based line of the opening fence
    text: str
    where: str  # "sandbox", "aws-account" or "local"
    role: Optional[str] = None  # "sandbox": the role whose member runs it; "local": the mode
    expect: Tuple[str, ...] = ()  # texts the output must contain

    @property
    def name(self) -> str:
        return f"{self.doc}:{self.line}"


def _parse_mark(kind: str, body: str, where: str) -> Tuple[str, Optional[str], Tuple[str, ...]]:
    parts = [p.strip() for p in body.split(";")]
    if kind == "needs":
        if parts != [AWS_ACCOUNT]:
            raise DocBlockError(f"{where}: `needs:` takes only {AWS_ACCOUNT!r}, got {body!r}")
        return AWS_ACCOUNT, None, ()
    role, expect = parts[0], []
    if kind == LOCAL and role not in LOCAL_MODES:
        raise DocBlockError(f"{where}: `local:` takes {' or '.join(LOCAL_MODES)}, got {role!r}")
    if kind == "sandbox" and role not in ROLES:
        raise DocBlockError(f"{where}: `sandbox:` names a role ({', '.join(ROLES)}), got {role!r}")
    for part in parts[1:]:
        key, sep, value = part.partition(":")
        if key.strip() != "expect" or not sep or not value.strip():
            raise DocBlockError(f"{where}: after the role only `expect: TEXT` parts, got {part!r}")
        expect.append(value.strip())
    return kind, role, tuple(expect)


def parse_blocks(text: str, doc: str = "<doc>") -> List[Block]:
    """Every shell block of a markdown text with its mark; DocBlockError names every problem
    (an unmarked shell block, a fence without an info string, a bad or stray mark)."""
    lines = text.splitlines()
    out: List[Block] = []
    problems: List[str] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            if _MARK.match(lines[i].strip()) and not (
                i + 1 < len(lines) and _FENCE.match(lines[i + 1])
            ):
                problems.append(f"{doc}:{i + 1}: a mark not right before a fence")
            i += 1
            continue
        fence, info = m.group(1), m.group(2)
        end = i + 1
        while end < len(lines) and not lines[end].startswith(fence):
            end += 1
        where = f"{doc}:{i + 1}"
        if end >= len(lines):
            problems.append(f"{where}: fence never closed")
            break
        body = "\n".join(lines[i + 1 : end]) + "\n"
        mark = _MARK.match(lines[i - 1].strip()) if i > 0 else None
        if not info:
            problems.append(f"{where}: a fence without an info string (sh, text, yaml, ...)")
        elif info in SHELLS:
            if mark is None:
                problems.append(
                    f"{where}: shell block marked neither `<!-- sandbox: ROLE -->`, "
                    f"`<!-- needs: {AWS_ACCOUNT} -->` nor `<!-- local: MODE -->`"
                )
            else:
                try:
                    kind, role, expect = _parse_mark(mark.group(1), mark.group(2), where)
                    out.append(Block(doc, i + 1, body, kind, role, expect))
                except DocBlockError as exc:
                    problems.append(str(exc))
        elif info not in NOT_COMMANDS:
            problems.append(f"{where}: unknown fence language {info!r}")
        elif mark is not None:
            problems.append(f"{where}: a `{info}` block is not a command; it takes no mark")
        i = end + 1
    if problems:
        raise DocBlockError("; ".join(problems))
    return out


def doc_blocks(path: Path, root: Optional[Path] = None) -> List[Block]:
    """parse_blocks of one file, named relative to `root` when given."""
    name = str(path.relative_to(root)) if root is not None else str(path)
    return parse_blocks(Path(path).read_text(encoding="utf-8"), name)


def operator_blocks(root: Path) -> List[Block]:
    """Every block of the operator docs, in OPERATOR_DOCS' order, each in doc order."""
    return [b for d in OPERATOR_DOCS for b in doc_blocks(Path(root) / d, Path(root))]


def sandbox_blocks(root: Path) -> List[Block]:
    """Every sandbox-marked block of the operator docs, in doc order (the runbook's order
    matters: a drain comes before its undrain)."""
    return [b for b in operator_blocks(root) if b.where == "sandbox"]


def local_blocks(root: Path) -> List[Block]:
    """Every local-marked block of the operator docs (docs/sandbox.md's), in doc order."""
    return [b for b in operator_blocks(root) if b.where == LOCAL]


README = "README.md"
QUICK_START = "## Quick start"  # README's section for an AWS account: every block needs one


def section_only(text: str, heading: str) -> str:
    """`text` with every line outside the section under `heading` (up to the next heading of
    its level or higher, outside a fence) blanked: its blocks keep their real line numbers."""
    lines = text.splitlines()
    level = len(heading) - len(heading.lstrip("#"))
    start = lines.index(heading)
    end, fence = len(lines), None
    for i in range(start + 1, len(lines)):
        m = _FENCE.match(lines[i])
        if m and (fence is None or m.group(1) == fence):
            fence = m.group(1) if fence is None else None
            continue
        hashes = len(lines[i]) - len(lines[i].lstrip("#"))
        if fence is None and 0 < hashes <= level and lines[i][hashes:].startswith(" "):
            end = i
            break
    return "\n".join(ln if start <= i < end else "" for i, ln in enumerate(lines)) + "\n"


def all_blocks(root: Path) -> List[Block]:
    """Every command block an operator is shown: README's quick start, then the operator docs."""
    readme = (Path(root) / README).read_text(encoding="utf-8")
    blocks = parse_blocks(section_only(readme, QUICK_START), README)
    return blocks + operator_blocks(root)


def main() -> int:
    """`python -m tools.doc_blocks`: every block and where it runs, then the counts."""
    root = Path(__file__).resolve().parents[1]
    blocks = all_blocks(root)
    for b in blocks:
        print(f"{b.name:<34} {b.where:<12} {b.role or ''}")
    counts = {w: sum(b.where == w for b in blocks) for w in ("sandbox", LOCAL, AWS_ACCOUNT)}
    print(
        f"{counts['sandbox']} run on the sandbox's instances (tests/test_stack_launch.py), "
        f"{counts[LOCAL]} on this machine (tests/test_stack_cli_up.py), "
        f"{counts[AWS_ACCOUNT]} need an AWS account (not run)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
