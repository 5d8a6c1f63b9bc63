#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian 12 (bookworm) machine:
# QEMU 10.0.x from bookworm-backports (a real peer for the wire format and the VFIO lab's
# TCG guest), the lab's build tools, FUSE (fault-injecting simulated devices), strace (a
# destination under it ends its workers in odd orders), and the Python hdrhistogram decoder.
# Idempotent: installs only what is missing.
set -euo pipefail

need_qemu=0
if ! command -v qemu-system-x86_64 >/dev/null || ! qemu-system-x86_64 --version | grep -q 'version 10\.'; then
  need_qemu=1
fi
others=()
for pkg in gcc make cpio xz-utils libc6-dev fuse3 util-linux strace; do
  dpkg -s "$pkg" >/dev/null 2>&1 || others+=("$pkg")
done

if [ "$need_qemu" = 1 ] || [ ${#others[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  if [ "$need_qemu" = 1 ]; then
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
  fi
  apt-get update -qq
  if [ "$need_qemu" = 1 ]; then
    apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86 qemu-utils >/dev/null
  fi
  if [ ${#others[@]} -gt 0 ]; then
    apt-get install -y -qq --no-install-recommends "${others[@]}" >/dev/null
  fi
fi
qemu-system-x86_64 --version | head -1

python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore 'hdrhistogram>=0.10'
python3 -c 'import hdrh; print("python hdrhistogram", "ok")'
