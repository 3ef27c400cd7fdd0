#!/bin/sh
# CodeDeploy AfterInstall hook: everything is in `airflow-agent deploy-hook` (agent/jobs/deploy/hook.py).
# stdin from /dev/null; stdout and stderr go to CodeDeploy's log (the agent logs to stderr, one
# line per event; a failure ends with one "ERROR agent: ..." line, which the console shows).
# exec: no shell stays behind holding the pipes CodeDeploy waits on. --appspec: this revision's
# appspec (CodeDeploy runs the script from the revision's archive), whose timeouts apply.
PATH=/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin
export PATH
exec airflow-agent deploy-hook AfterInstall --appspec "$(dirname "$0")/../appspec.yml" </dev/null 2>&1
