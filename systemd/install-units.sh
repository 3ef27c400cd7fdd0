#!/bin/sh
# Install the agent's and Airflow's systemd units, the airflow user and the agent's directories.
# Called by cfn-init (AWS::CloudFormation::Init) on an instance and by the systemd test host,
# so both install the same way. Enabling units is per role: `airflow-agent role --apply`.
#
#   install-units.sh [SOURCE_DIR]     (default: the directory of this script)
set -eu
SRC=${1:-$(dirname "$0")}
UNITDIR=/etc/systemd/system

install -d -m 0755 "$UNITDIR" /etc/sysusers.d /etc/tmpfiles.d
for f in "$SRC"/*.service "$SRC"/*.timer; do
    install -m 0644 "$f" "$UNITDIR/"
done
install -m 0644 "$SRC/airflow-agent.sysusers" /etc/sysusers.d/airflow-agent.conf
install -m 0644 "$SRC/airflow-agent.tmpfiles" /etc/tmpfiles.d/airflow-agent.conf
# Only our own snippets: never a full systemd-tmpfiles/sysusers run from here.
systemd-sysusers /etc/sysusers.d/airflow-agent.conf
systemd-tmpfiles --create /etc/tmpfiles.d/airflow-agent.conf
# Not while building an image (no systemd running): the next boot loads the units anyway.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi
