#!/usr/bin/env bash
# Make sure `prometheus` and `promtool` are installed (Debian package), for the monitoring tests.
# The tests start their own Prometheus on free ports, so a distro service that apt may have
# started is stopped again: it would hold port 9090 and scrape nothing useful.
set -euo pipefail

if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends prometheus

# Stop whatever the package's maintainer scripts started (systemd or sysvinit, if any).
if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
    systemctl stop prometheus || true
fi
if command -v service >/dev/null; then
    service prometheus stop >/dev/null 2>&1 || true
fi
# Without an init system the package runs nothing; if a process is left, it is the distro's.
if [ -f /run/prometheus.pid ]; then
    kill "$(cat /run/prometheus.pid)" 2>/dev/null || true
fi

command -v prometheus >/dev/null
command -v promtool >/dev/null
