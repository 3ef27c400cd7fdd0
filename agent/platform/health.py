"""The api-server's health URL, asked once: None when it answers 200, else why not.

Shared by ValidateService (agent.jobs.deploy.validate) and every restart of an api-server
(agent.airflow.restart_guard), which puts it back into the load balancer's rotation only once
this answers. No proxy is used: the URL is the instance's own.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Optional

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def health_problem(url: str, timeout: float = 5.0) -> Optional[str]:
    """None if `url` answers 200 within `timeout`; otherwise a one-line reason."""
    try:
        with _OPENER.open(url, timeout=timeout) as resp:
            return None if resp.status == 200 else f"{url} answered {resp.status}"
    except (urllib.error.URLError, OSError) as exc:
        return f"{url}: {exc}"
