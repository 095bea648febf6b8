#!/usr/bin/env bash
# Installs the system stack Kybernate's tests need on a fresh Debian 12 machine:
# containerd 1.7 and runc from trixie, CRIU 4.2 from sid (see shared/ENVIRONMENT.md
# for why each comes from where), busybox-static for test images, and containerd's
# own .proto files for the wire-compatibility test. Idempotent.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

criu_ok() { command -v criu >/dev/null && criu --version 2>/dev/null | grep -qE 'Version: 4\.([2-9]|[1-9][0-9])'; }
have_all() {
  criu_ok && command -v containerd >/dev/null && command -v runc >/dev/null \
    && command -v busybox >/dev/null && command -v iptables-restore >/dev/null \
    && [ -d /usr/share/gocode/src/github.com/containerd/containerd/api ] \
    && /usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null
}
if have_all; then
  echo "install-system: everything already present"
  exit 0
fi

SRC=/etc/apt/sources.list.d/debian.sources
if [ ! -f /etc/apt/sources.list.d/trixie-sid.sources ]; then
  URI=$(awk '/^URIs:/{print $2; exit}' "$SRC")
  KEY=$(awk '/^Signed-By:/{print $2; exit}' "$SRC")
  printf 'Types: deb\nURIs: %s\nSuites: trixie sid\nComponents: main\nSigned-By: %s\n' "$URI" "$KEY" \
    > /etc/apt/sources.list.d/trixie-sid.sources
  printf 'Package: *\nPin: release n=trixie\nPin-Priority: 100\n\nPackage: *\nPin: release n=sid\nPin-Priority: 50\n' \
    > /etc/apt/preferences.d/trixie-sid
fi
APT="apt-get install -y -q --no-install-recommends -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold"
apt-get update -q
# bookworm's: never -t trixie for these (it would remove gdb and more)
$APT iptables iproute2 tar gzip busybox-static
# Debian's own Python runs the shim: it starts about 3x faster than a pyenv build
# (measured: 21 vs 61 ms for `python -I -c pass`), and every container pays two starts.
$APT python3 python3-venv
$APT -t trixie containerd runc criu
$APT criu/sid
# containerd's own .proto files, for the field-by-field wire test (bookworm's is 1.6,
# whose task v2 and events protos match 1.7's field for field)
$APT golang-github-containerd-containerd-dev
criu --version
criu_ok || { echo "install-system: criu is older than 4.2" >&2; exit 1; }
containerd --version
runc --version
criu check
