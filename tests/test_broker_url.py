"""The broker URL the root agent takes from the Airflow env file may not choose code to import.

kombu resolves a transport name holding `.` or `:` with `symbol_by_name` (an import), and the
redis transport imports and instantiates a URL's `?credential_provider=module.Class` — measured
here: a drain's `ensure_connection` on `redis://127.0.0.1:9/0?credential_provider=this.s`
imported `this` (it printed the Zen of Python). The env file is written from SSM parameters and
the drain runs as root, so `read_broker` refuses such a URL, naming the variable and the file
and never quoting the URL (it may hold a password).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import config_from_dict
from agent.errors import AgentError
from agent.jobs.drain.broker import broker_url_problem, read_broker


def _cfg(tmp_path: Path, url: str):
    env = tmp_path / "airflow.env"
    env.write_text(f'AIRFLOW__CELERY__BROKER_URL="{url}"\n')
    return config_from_dict({"state_dir": str(tmp_path / "state"), "env": {"file": str(env)}})


@pytest.mark.parametrize(
    "url",
    [
        "redis://:pw@127.0.0.1:6379/0",
        "rediss://h:6380/0?ssl_cert_reqs=required",
        "redis+socket:///run/redis.sock",
        "sentinel://h1:26379;sentinel://h2:26379",
        "amqp://u:p@h:5672//",
        "pyamqp://h//",
        "sqs://",
        "memory://",
    ],
)
def test_airflows_brokers_are_accepted(tmp_path, url):
    assert broker_url_problem(url) == ""
    assert read_broker(_cfg(tmp_path, url)).url == url


@pytest.mark.parametrize(
    "url, why",
    [
        ("redis://:pw@h/0?credential_provider=this.s", "credential_provider"),
        ("redis+socket:///r.sock?connection_class=x.Y", "connection_class"),
        ("os.path://h", "'<not a transport name>'"),
        ("mod:Transport://h", "'<not a transport name>'"),
        ("filesystem://", "'filesystem'"),
        ("sqla+sqlite:////tmp/x.db", "'sqla+sqlite'"),
        ("redis://h/0;evil.mod://h", "URL 2"),
        ("127.0.0.1:6379", "no scheme"),
    ],
)
def test_urls_that_choose_code_or_files_are_refused(tmp_path, url, why):
    problem = broker_url_problem(url)
    assert why in problem
    with pytest.raises(AgentError) as err:
        read_broker(_cfg(tmp_path, url))
    msg = str(err.value)
    assert "AIRFLOW__CELERY__BROKER_URL" in msg and str(tmp_path / "airflow.env") in msg
    assert "pw@" not in msg and "this.s" not in msg and "x.Y" not in msg


def test_the_refused_url_imports_nothing(tmp_path):
    """End to end through the drain's own factory: the module named never gets imported."""
    mod_dir = tmp_path / "mods"
    mod_dir.mkdir()
    flag = tmp_path / "imported"
    (mod_dir / "aea_evil_provider.py").write_text(
        f"open({str(flag)!r}, 'w').write('x')\nclass P: pass\n"
    )
    cfg_env = tmp_path / "airflow.env"
    cfg_env.write_text(
        'AIRFLOW__CELERY__BROKER_URL="redis://127.0.0.1:9/0'
        '?credential_provider=aea_evil_provider.P"\n'
    )
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(mod_dir)!r})\n"
        "from agent.config import config_from_dict\n"
        "from agent.jobs.drain.control import worker_control\n"
        f"cfg = config_from_dict({{'state_dir': {str(tmp_path / 'st')!r}, "
        f"'env': {{'file': {str(cfg_env)!r}}}}})\n"
        "try:\n"
        "    with worker_control(cfg) as c:\n"
        "        c.ping()\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=repo
    )
    assert "refusing to use it" in proc.stdout, proc.stdout + proc.stderr
    assert not flag.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="the _CMD form runs as another user")
def test_resolved_settings_are_kept_a_while_per_env_file_content(tmp_path, monkeypatch):
    """A command whose every run gives a new URL shows when read_broker resolves afresh."""
    from agent.jobs.drain import broker

    env = tmp_path / "airflow.env"
    command = "sh -c 'echo redis://h/$(cut -c1-8 /proc/sys/kernel/random/uuid)'"
    env.write_text(f'AIRFLOW__CELERY__BROKER_URL_CMD="{command}"\n')
    cfg = config_from_dict(
        {
            "state_dir": str(tmp_path / "state"),
            "env": {"file": str(env)},
            "airflow_config": {"command_user": "nobody"},
        }
    )
    now = [1000.0]
    monkeypatch.setattr(broker.time, "monotonic", lambda: now[0])
    first = read_broker(cfg).url
    assert first.startswith("redis://h/") and len(first) == len("redis://h/") + 8
    now[0] += broker.CACHE_SECONDS - 1
    assert read_broker(cfg).url == first  # lifecycle's next polls: no new run
    now[0] += 2
    second = read_broker(cfg).url
    assert second != first  # expired: resolved again
    env.write_text(f'AIRFLOW__CELERY__BROKER_URL_CMD="{command}"\nX=1\n')
    assert read_broker(cfg).url != second  # another file content: at once
