#!/bin/sh
# System packages the test suite needs beyond Python: systemd-analyze, systemd-sysusers and systemd-tmpfiles (Debian
# package `systemd`) check the unit files in systemd/ offline. Installs them with apt-get when missing; otherwise,
# and where it cannot install (not root, no apt-get), it changes nothing and says why. Those tests then skip.
set -eu

if command -v systemd-analyze >/dev/null 2>&1; then
    echo "system-deps: systemd-analyze present ($(command -v systemd-analyze)); nothing to install"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: systemd-analyze missing and no apt-get here; install your distribution's systemd package" \
         "or the unit-file tests will skip"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "system-deps: systemd-analyze missing; not root, so not installing. Run:" \
         "sudo apt-get install --no-install-recommends systemd   (else the unit-file tests skip)"
    exit 0
fi

echo "system-deps: installing Debian package systemd (for systemd-analyze)"
export DEBIAN_FRONTEND=noninteractive
# A fresh container has empty package lists; update only then, to keep repeat runs offline and fast.
if ! apt-cache show systemd >/dev/null 2>&1; then
    apt-get update -qq
fi
apt-get install -y -qq --no-install-recommends systemd
command -v systemd-analyze >/dev/null 2>&1 || { echo "system-deps: systemd installed but no systemd-analyze" >&2; exit 1; }
echo "system-deps: systemd-analyze installed ($(systemd-analyze --version | head -n 1))"
