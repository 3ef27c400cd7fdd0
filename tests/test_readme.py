"""The README's agent.yaml block is the real set of keys and defaults, so the docs cannot drift."""

import dataclasses
import re
from pathlib import Path

import yaml

from agent.config import config_from_dict

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_config_block_equals_the_defaults():
    text = README.read_text()
    block = re.search(r"```yaml\n(cluster: prod.*?)```", text, re.S).group(1)
    data = yaml.safe_load(block)
    documented = dataclasses.asdict(config_from_dict(data, source="README"))
    defaults = dataclasses.asdict(config_from_dict({}))
    documented.pop("source")
    defaults.pop("source")
    assert documented == defaults


def test_readme_opens_with_the_two_commands():
    head = README.read_text().split("\n\n", 2)[1]
    assert "make demo" in head and "make test" in head


def test_readme_config_block_lists_every_key():
    text = README.read_text()
    data = yaml.safe_load(re.search(r"```yaml\n(cluster: prod.*?)```", text, re.S).group(1))
    defaults = dataclasses.asdict(config_from_dict({}))
    defaults.pop("source")
    missing = [k for k in defaults if k not in data]
    for section, value in defaults.items():
        sub = data.get(section)
        if dataclasses.is_dataclass(getattr(config_from_dict({}), section)):
            missing += [f"{section}.{k}" for k in value if k not in (sub or {})]
    assert missing == []
