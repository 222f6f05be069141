#!/bin/sh
# System packages the agent and its tests need beyond Python, installed with apt-get when missing:
#   systemd      systemd-analyze, systemd-sysusers, systemd-tmpfiles check the unit files in systemd/ offline;
#   etcd-server  the consensus store each agent runs as a supervised child for the MagStack cluster;
#   git          what the built-in git MCP server (mcp-server-git, through GitPython) runs;
#   docker-registry  the OCI registry (CNCF distribution) models are published to and pulled from
#                (scripts/model-registry.sh starts one on loopback for `make run` and the tests).
# Where it cannot install (not root, no apt-get) it changes nothing and says what to run; the tests that need a
# missing package then skip with that reason.
set -eu

missing=""
command -v systemd-analyze >/dev/null 2>&1 || missing="$missing systemd"
command -v etcd >/dev/null 2>&1 || missing="$missing etcd-server"
command -v git >/dev/null 2>&1 || missing="$missing git"
command -v docker-registry >/dev/null 2>&1 || missing="$missing docker-registry"

if [ -z "$missing" ]; then
    echo "system-deps: systemd-analyze, etcd, git and docker-registry present; nothing to install"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: missing:$missing and no apt-get here; install them with your distribution's package manager"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "system-deps: missing:$missing; not root, so not installing. Run:" \
         "sudo apt-get install --no-install-recommends$missing"
    exit 0
fi

echo "system-deps: installing Debian packages:$missing"
export DEBIAN_FRONTEND=noninteractive
# A fresh container has empty package lists; update only then, to keep repeat runs offline and fast.
for package in $missing; do
    if ! apt-cache show "$package" >/dev/null 2>&1; then
        apt-get update -qq
        break
    fi
done
# shellcheck disable=SC2086 # word splitting of the package list is intended
apt-get install -y -qq --no-install-recommends $missing
# Debian's etcd-server package enables a system-wide etcd service; the agent runs its own members, so a running
# system service would only hold port 2379. Stop it where a service manager runs (containers have none).
# The same for docker-registry's service (port 5000): registries are started by scripts/model-registry.sh.
for service in etcd docker-registry; do
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$service" 2>/dev/null; then
        systemctl disable --now "$service" >/dev/null 2>&1 || true
    fi
done
command -v systemd-analyze >/dev/null 2>&1 || { echo "system-deps: systemd installed but no systemd-analyze" >&2; exit 1; }
command -v etcd >/dev/null 2>&1 || { echo "system-deps: etcd-server installed but no etcd binary" >&2; exit 1; }
command -v docker-registry >/dev/null 2>&1 || { echo "system-deps: docker-registry installed but no binary" >&2; exit 1; }
echo "system-deps: ready ($(systemd-analyze --version | head -n 1); $(etcd --version | head -n 1))"
