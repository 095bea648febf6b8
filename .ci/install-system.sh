#!/usr/bin/env bash
# Installs the system stack Kybernate's tests need on a fresh Debian 12 machine:
# containerd 1.7 and runc from trixie, CRIU 4.2 from sid (see shared/ENVIRONMENT.md
# for why each comes from where), busybox-static for test images; and, unpacked into
# /opt/kybernate without touching the system's packages, containerd 2.x from sid (so
# that both containerd lines run on one machine), the .proto files of each supported
# containerd for the wire-compatibility test, and the CRI API for the CRI test client.
# Idempotent.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

PREFIX=/opt/kybernate
CONTAINERD2=$PREFIX/containerd-2     # usr/bin/{containerd,ctr,containerd-shim-runc-v2}
UPSTREAM=$PREFIX/upstream            # one directory per source, each with a PACKAGES list
# What each upstream directory unpacks: the packages containerd was built from.
# containerd 1.7 (trixie): its API protos, cgroups v3 metrics, ttrpc 1.2.
UPSTREAM_17="golang-github-containerd-containerd-dev/trixie golang-github-containerd-cgroups-dev/trixie golang-github-containerd-ttrpc-dev/trixie"
# containerd 2.x (sid): the API moved into its own package.
UPSTREAM_2="golang-github-containerd-containerd-api-dev/sid golang-github-containerd-containerd-dev/sid golang-github-containerd-cgroups-dev/sid golang-github-containerd-ttrpc-dev/sid"
# What no containerd package carries whole: CRIU's RPC as go-criu has it, and
# google.rpc.Status (ttrpc ships only a stub of it); bookworm's, a frozen release.
UPSTREAM_COMMON="golang-github-checkpoint-restore-go-criu-dev/bookworm golang-github-gogo-googleapis-dev/bookworm golang-github-gogo-protobuf-dev/bookworm"
# The CRI API (runtime.v1) that kubelet speaks.
UPSTREAM_CRI="golang-k8s-cri-api-dev/sid"
# An OCI registry (distribution 2.8) for the checkpoint-image tests: unpacked, so that
# no system service starts; each test session runs it on loopback with its own config.
REGISTRY=$PREFIX/docker-registry     # usr/bin/docker-registry
# Debian's CNI plugins, unpacked (never installed) for the CRI tests' pods with their
# own network namespace (bridge, host-local, loopback).
CNI=$PREFIX/cni                      # usr/lib/cni/{bridge,host-local,loopback}

criu_ok() { command -v criu >/dev/null && criu --version 2>/dev/null | grep -qE 'Version: 4\.([2-9]|[1-9][0-9])'; }
# sid moves on and drops superseded versions: accept any 2.x from 2.1 on, as for criu.
containerd2_ok() {
  [ -x "$CONTAINERD2/usr/bin/containerd" ] && [ -x "$CONTAINERD2/usr/bin/ctr" ] \
    && "$CONTAINERD2/usr/bin/containerd" --version 2>/dev/null | grep -qE ' 2\.([1-9]|[1-9][0-9])\.'
}
# An unpacked directory is complete once its PACKAGES list (written last) names all
# the packages it should hold.
unpacked_ok() {  # DIR PKG/SUITE...
  local dir=$1 spec; shift
  [ -f "$dir/PACKAGES" ] || return 1
  for spec in "$@"; do grep -q "^${spec%%/*} " "$dir/PACKAGES" || return 1; done
}
have_system() {
  criu_ok && command -v containerd >/dev/null && command -v runc >/dev/null \
    && command -v busybox >/dev/null && command -v iptables-restore >/dev/null \
    && command -v gcc >/dev/null && command -v checkpointctl >/dev/null \
    && /usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null
}
have_unpacked() {
  containerd2_ok \
    && unpacked_ok "$UPSTREAM/containerd-1.7" $UPSTREAM_17 \
    && unpacked_ok "$UPSTREAM/containerd-2" $UPSTREAM_2 \
    && unpacked_ok "$UPSTREAM/common" $UPSTREAM_COMMON \
    && unpacked_ok "$UPSTREAM/cri-api" $UPSTREAM_CRI \
    && unpacked_ok "$REGISTRY" docker-registry/bookworm \
    && unpacked_ok "$CNI" containernetworking-plugins/trixie
}

# unpack DIR PKG/SUITE...: `apt-get download` the packages and `dpkg -x` them into DIR,
# replacing what was there; nothing is installed, so the system's packages never move.
# Several checkouts may run this at once: each unpacks aside and renames into place.
unpack() {
  local dir=$1 scratch staged deb; shift
  unpacked_ok "$dir" "$@" && return 0
  mkdir -p "$(dirname "$dir")"
  scratch=$(mktemp -d)
  chown _apt "$scratch" 2>/dev/null || true   # apt downloads as _apt where it can
  (cd "$scratch" && apt-get download -q "$@")
  staged=$(mktemp -d "$dir.new.XXXXXX")
  for deb in "$scratch"/*.deb; do
    dpkg-deb -x "$deb" "$staged"
    printf '%s %s\n' "$(dpkg-deb -f "$deb" Package)" "$(dpkg-deb -f "$deb" Version)" >> "$staged/PACKAGES.tmp"
  done
  mv "$staged/PACKAGES.tmp" "$staged/PACKAGES"
  chmod 755 "$staged"
  rm -rf "$scratch" "$dir"
  mv -T "$staged" "$dir" 2>/dev/null || rm -rf "$staged"   # another run was first
}
if have_system && have_unpacked; then
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
# The system part runs only where something is missing: a second `-t trixie` pass
# would move any installed golang-*-dev package (and what depends on it) to trixie.
if ! have_system; then
  # bookworm's: never -t trixie for these (it would remove gdb and more)
  $APT iptables iproute2 tar gzip busybox-static
  # Debian's own Python runs the shim: it starts about 3x faster than a pyenv build
  # (measured: 21 vs 61 ms for `python -I -c pass`), and every container pays two starts.
  $APT python3 python3-venv
  $APT -t trixie containerd runc criu
  $APT criu/sid
  # gcc builds the static pause binary of the CRI tests' sandbox image; libc6-dev must
  # match the trixie libc6 installed above.
  command -v gcc >/dev/null || $APT gcc libc6-dev/trixie
  # checkpointctl reads checkpoint archives as Podman and CRI-O write them (the
  # checkpoint-image tests show it reading ours); trixie's, built against its libc.
  command -v checkpointctl >/dev/null || $APT checkpointctl/trixie
fi
# containerd 2.x beside the system's 1.7: unpacked, run with its own private config.
containerd2_ok || { rm -rf "$CONTAINERD2"; unpack "$CONTAINERD2" containerd/sid; }
unpack "$UPSTREAM/containerd-1.7" $UPSTREAM_17
unpack "$UPSTREAM/containerd-2" $UPSTREAM_2
unpack "$UPSTREAM/common" $UPSTREAM_COMMON
unpack "$UPSTREAM/cri-api" $UPSTREAM_CRI
unpack "$REGISTRY" docker-registry/bookworm
unpack "$CNI" containernetworking-plugins/trixie
criu --version
criu_ok || { echo "install-system: criu is older than 4.2" >&2; exit 1; }
containerd --version
containerd2_ok || { echo "install-system: no containerd 2.1 or newer in $CONTAINERD2" >&2; exit 1; }
"$CONTAINERD2/usr/bin/containerd" --version
runc --version
"$REGISTRY/usr/bin/docker-registry" --version
command -v checkpointctl
criu check
