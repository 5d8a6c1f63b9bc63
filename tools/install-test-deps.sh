#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian 12 (bookworm) machine:
# QEMU 10.0.x from bookworm-backports (a real peer for the wire format and the VFIO lab's
# TCG guest), the lab's build tools, and the Python test decoders. Idempotent.
set -euo pipefail

need_apt=()
if ! command -v qemu-system-x86_64 >/dev/null || ! qemu-system-x86_64 --version | grep -q 'version 10\.'; then
  need_apt+=(qemu-system-x86)
fi
for pkg in gcc make cpio xz-utils libc6-dev; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
# FUSE lets the fault devices return any errno from a real read()/write().
dpkg -s fuse3 >/dev/null 2>&1 || need_apt+=(fuse3)

if [ ${#need_apt[@]} -gt 0 ]; then
  src=/etc/apt/sources.list.d/bookworm-backports.sources
  if [ ! -f "$src" ]; then
    cat > "$src" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86 qemu-utils >/dev/null
  apt-get install -y -qq --no-install-recommends "${need_apt[@]/qemu-system-x86/}" >/dev/null
fi
qemu-system-x86_64 --version | head -1

python3 -m pip install -q --disable-pip-version-check 'hdrhistogram>=0.10' 2>&1 | grep -v -i 'root user' || true
python3 -c 'import hdrh; print("python hdrhistogram", "ok")'
