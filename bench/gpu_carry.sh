#!/usr/bin/env bash
# Prepares .carry/ (git-ignored) for a GPU machine that reaches no package registry:
#   .carry/system.tar.xz  containerd and ctr, runc, criu and the libraries criu and runc
#                         need beyond a stock Debian/Ubuntu, taken from this machine's
#                         Debian packages (the versions installed here), as a usr/ tree
#   .carry/wheels/        cp312 (CARRY_PYTHON) manylinux wheels of what the agent and shim import,
#                         pytest for tests/gpu, and Kybernate's own wheel built from this tree
#   .carry/MANIFEST       package versions and sizes
# bench/gpu_validate.py --carry .carry unpacks both into a temporary prefix and runs from
# there (see bench/README.md). Fails unless the whole folder stays under 64 MiB, what the
# device tool carries. Needs root (apt-get download), the venv from .ci/setup and network
# access to Debian's archive and PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=${CARRY:-.carry}
# The GPU machine's Python; another version only to try the carry on this machine.
CARRY_PYTHON=${CARRY_PYTHON:-3.12}
ABI=cp${CARRY_PYTHON/./}
LIMIT=$((64 * 1024 * 1024))
PY=.venv/bin/python
[ -x "$PY" ] || { echo "gpu_carry: run .ci/setup first" >&2; exit 1; }
WORK=$(mktemp -d /tmp/kyb-carry.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
rm -rf "$CARRY"
mkdir -p "$CARRY/wheels" "$WORK/debs" "$WORK/tree"

# Packages whose files go along; the libraries are those of `ldd criu runc` that a stock
# Ubuntu or Debian install lacks (libc, gnutls, seccomp, uuid, bsd are there already).
PACKAGES="containerd runc criu libprotobuf-c1 libnet9 libnl-3-200 libnftables1 libnftnl11 libjansson4 libxtables12 libmnl0"
WANTED="usr/bin/containerd usr/bin/ctr usr/sbin/runc usr/sbin/criu"
(
  cd "$WORK/debs"
  for pkg in $PACKAGES; do
    version=$(dpkg-query -W -f='${Version}' "$pkg" 2>/dev/null) \
      || { echo "gpu_carry: $pkg is not installed here (bash .ci/setup)" >&2; exit 1; }
    apt-get download -q "$pkg=$version" >/dev/null 2>&1 \
      || { echo "gpu_carry: apt-get download $pkg=$version failed" >&2; exit 1; }
  done
)
for deb in "$WORK"/debs/*.deb; do
  dpkg-deb -x "$deb" "$WORK/unpacked"
  echo "deb $(dpkg-deb -f "$deb" Package) $(dpkg-deb -f "$deb" Version)" >> "$CARRY/MANIFEST"
done
(
  cd "$WORK/unpacked"
  for f in $WANTED; do
    [ -f "$f" ] || { echo "gpu_carry: $f is in none of the packages" >&2; exit 1; }
  done
  # Debian 12 and later keep libraries under usr/lib (merged /usr); older ones under lib.
  find usr/lib lib -maxdepth 2 -name '*.so*' 2>/dev/null > "$WORK/libs" || true
  # shellcheck disable=SC2086
  tar -cf - $WANTED -T "$WORK/libs"
) | tar -xf - -C "$WORK/tree"
for f in usr/sbin/criu usr/sbin/runc usr/bin/containerd usr/bin/ctr; do
  LD_LIBRARY_PATH="$WORK/tree/usr/lib/x86_64-linux-gnu" "$WORK/tree/$f" --version >/dev/null \
    || { echo "gpu_carry: the carried $f does not run" >&2; exit 1; }
done
tar -C "$WORK/tree" -cf - . | xz -T0 -3 > "$CARRY/system.tar.xz"

# Wheels for the GPU machine's Python. The agent's remote tier (boto3) is left out: the
# validation keeps checkpoints in the local tier.
"$PY" -m pip download -q --only-binary=:all: --python-version "$CARRY_PYTHON" --implementation cp \
  --abi "$ABI" --abi abi3 --abi none --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d "$CARRY/wheels" \
  "protobuf>=6.33.5,<7" "psutil>=5.9" "setproctitle>=1.3" "grpcio==1.81.1" "prometheus-client>=0.19" \
  "nvidia-ml-py>=12.570" "pytest>=8" "pytest-timeout>=2.2" 2>&1 | grep -v "WARNING: Location" || true
"$PY" -m pip wheel -q --no-deps -w "$CARRY/wheels" . > "$WORK/wheel.log" 2>&1 \
  || { cat "$WORK/wheel.log" >&2; echo "gpu_carry: building Kybernate's wheel failed" >&2; exit 1; }
for want in protobuf psutil setproctitle grpcio prometheus_client nvidia_ml_py pytest kybernate; do
  ls "$CARRY/wheels/$want"-*.whl >/dev/null 2>&1 \
    || { echo "gpu_carry: no wheel of $want in $CARRY/wheels" >&2; exit 1; }
done
(cd "$CARRY/wheels" && for w in *.whl; do echo "wheel $w"; done) >> "$CARRY/MANIFEST"

size=$(du -sb "$CARRY" | cut -f1)
echo "size $size bytes" >> "$CARRY/MANIFEST"
du -b "$CARRY/system.tar.xz" "$CARRY"/wheels/*.whl | sort -n | sed 's/^/  /'
echo "gpu_carry: $CARRY holds $size bytes ($((size / 1024 / 1024)) MiB) of a $((LIMIT / 1024 / 1024)) MiB limit"
[ "$size" -lt "$LIMIT" ] || { echo "gpu_carry: $CARRY is over the limit" >&2; exit 1; }
