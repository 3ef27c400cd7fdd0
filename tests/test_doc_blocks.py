"""tools/doc_blocks.py: the operator docs' shell blocks and their marks (where each runs)."""

import pytest

from tools.doc_blocks import AWS_ACCOUNT, Block, DocBlockError, parse_blocks

DOC = """# Title

<!-- sandbox: worker -->
```sh
airflow-agent status
```

Text.

<!-- sandbox: scheduler; expect: config hash; expect: in sync -->
```sh
airflow-agent env sync --dry-run
```

<!-- needs: aws-account -->
```bash
aws ssm start-session --target i-1
```

```text
output shown, not run
```
"""


def test_marked_blocks_come_back_in_order_with_role_and_expectations():
    blocks = parse_blocks(DOC, "d.md")
    assert blocks == [
        Block("d.md", 4, "airflow-agent status\n", "sandbox", "worker", ()),
        Block("d.md", 11, "airflow-agent env sync --dry-run\n", "sandbox", "scheduler",
              ("config hash", "in sync")),
        Block("d.md", 16, "aws ssm start-session --target i-1\n", AWS_ACCOUNT, None, ()),
    ]  # fmt: skip
    assert blocks[0].name == "d.md:4"


@pytest.mark.parametrize(
    "text, says",
    [
        ("```sh\nls\n```\n", "d.md:1: shell block marked neither"),
        ("<!-- sandbox: worker -->\n\n```sh\nls\n```\n", "a mark not right before a fence"),
        ("<!-- sandbox: databaseserver -->\n```sh\nls\n```\n", "names a role"),
        ("<!-- needs: a-laptop -->\n```sh\nls\n```\n", "`needs:` takes only"),
        ("<!-- sandbox: worker; want: x -->\n```sh\nls\n```\n", "only `expect: TEXT` parts"),
        ("<!-- sandbox: worker; expect: -->\n```sh\nls\n```\n", "only `expect: TEXT` parts"),
        ("```\nls\n```\n", "a fence without an info string"),
        ("```python\nprint()\n```\n", "unknown fence language 'python'"),
        ("<!-- sandbox: worker -->\n```text\nout\n```\n", "is not a command; it takes no mark"),
        ("```sh\nls\n", "fence never closed"),
        ("<!-- local: detached -->\n```sh\nls\n```\n", "`local:` takes run or background"),
        ("<!-- local: scheduler -->\n```sh\nls\n```\n", "`local:` takes run or background"),
    ],
)
def test_an_unmarked_or_badly_marked_block_is_refused_naming_where(text, says):
    with pytest.raises(DocBlockError) as err:
        parse_blocks(text, "d.md")
    assert says in str(err.value)


def test_every_problem_is_named_at_once():
    text = "```sh\na\n```\n\n```sh\nb\n```\n"
    with pytest.raises(DocBlockError) as err:
        parse_blocks(text, "d.md")
    assert "d.md:1:" in str(err.value) and "d.md:5:" in str(err.value)


def test_a_longer_fence_holds_a_shorter_one():
    text = "<!-- needs: aws-account -->\n````sh\ncat <<EOF\n```\nEOF\n````\n"
    (block,) = parse_blocks(text)
    assert block.text == "cat <<EOF\n```\nEOF\n"


def test_local_blocks_come_back_with_their_mode_and_expectations():
    text = (
        "<!-- local: background; expect: stack up: -->\n```sh\nmake sandbox\n```\n"
        "<!-- local: run -->\n```bash\npython -m sandbox status\n```\n"
    )
    assert parse_blocks(text, "s.md") == [
        Block("s.md", 2, "make sandbox\n", "local", "background", ("stack up:",)),
        Block("s.md", 6, "python -m sandbox status\n", "local", "run", ()),
    ]


def test_the_readme_quick_start_section_is_cut_at_its_end_not_at_a_comment_in_a_block():
    from tools.doc_blocks import section_only

    text = (
        "# Title\n```sh\nmake test\n```\n## Quick start\n<!-- needs: aws-account -->\n"
        "```sh\n# 1. a comment, not a heading\naws s3 ls\n```\n### Steps\n## Next\n```sh\nls\n```\n"
    )
    (block,) = parse_blocks(section_only(text, "## Quick start"), "R.md")
    assert (block.line, block.where) == (7, "aws-account")
    assert block.text == "# 1. a comment, not a heading\naws s3 ls\n"
