"""`variables sync` / `variables watch` run as the agent CLI against the rig.

(Moved from tests/test_variables_plan.py, which keeps only the pure core's tests.)
"""

from __future__ import annotations


def test_sync_without_a_secret_configured_is_a_warning_not_a_failure(make_config, run_agent):
    """The scheduler's timer is on by default; a cluster without variables must stay green."""
    cfg = make_config()
    proc = run_agent(cfg, "variables", "sync")
    assert proc.returncode == 0, proc.stderr
    assert "WARNING" in proc.stderr and "variables.secret_id is not set" in proc.stderr
    # the daemon, which an operator enables on purpose, still refuses to start without one
    proc = run_agent(cfg, "variables", "watch")
    assert proc.returncode == 2 and "variables.secret_id" in proc.stderr
