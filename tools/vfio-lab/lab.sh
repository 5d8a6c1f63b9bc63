#!/usr/bin/env bash
# VFIO lab: real kernel VFIO migration (the mtty sample driver) inside a Debian guest under
# qemu-system-x86_64 -accel tcg, no host VFIO or KVM needed (../shared/docs/vfio-lab.md).
#
# Fetches the pinned Debian kernel, headers and source with `apt-get download` (never
# installed on the host), builds mtty.ko against them, builds tools/vfio-lab/guest as a
# static binary, packs a busybox initramfs, boots it with a timeout and reports the guest's
# LAB lines. Exit status 0 only if every requested test passed. Everything is cached under
# tools/vfio-lab/work (LAB_WORK); a second run rebuilds only the guest binary and initramfs.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: tools/vfio-lab/lab.sh [options]
  --tests LIST             guest tests, comma separated (default: all; see `vfio-lab-guest list`)
  --guest-cmd CMD          run CMD in the guest instead of the vfio-lab-guest tests
                           (pass = exit status 0 and no "LAB <name> FAIL" line)
  --guest-bin PATH         also copy a static binary into the guest's /bin (repeatable)
  --kernel-version ABI     Debian kernel ABI, e.g. 6.12.117+deb12 (default) or 6.1.0-41
  --kernel-pkg-version V   its package version (default: the pin, or apt's candidate)
  --no-mtty                do not build or load mtty (no mdevs; for non-VFIO guest commands)
  --timeout S              qemu wall-clock limit (default 300)
  --smp N / --mem MB       guest CPUs (default 2) / memory (default 1024)
  --log FILE               where to keep the serial log (default work/runs/<abi>/serial.log)
USAGE
}

LAB_DIR=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$LAB_DIR/../.." && pwd)
# shellcheck source=tools/vfio-lab/lib.sh
. "$LAB_DIR/lib.sh"

tests="" guest_cmd="" kabi="" kver="" mtty=1 timeout_s=300 log="" extra_bins=()
while [ $# -gt 0 ]; do
  case $1 in
    --tests) tests=${2//,/ }; shift 2 ;;
    --guest-cmd) guest_cmd=$2; shift 2 ;;
    --guest-bin) extra_bins+=("$2"); shift 2 ;;
    --kernel-version) kabi=$2; shift 2 ;;
    --kernel-pkg-version) kver=$2; shift 2 ;;
    --no-mtty) mtty=0; shift ;;
    --timeout) timeout_s=$2; shift 2 ;;
    --smp) export LAB_SMP=$2; shift 2 ;;
    --mem) export LAB_MEM=$2; shift 2 ;;
    --log) log=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; lab_die "unknown option $1" ;;
  esac
done

command -v qemu-system-x86_64 >/dev/null || lab_die "qemu-system-x86_64 not found (tools/install-test-deps.sh installs it)"
mkdir -p "$LAB_WORK"
# One lab at a time per work dir: the cache is shared.
exec 9>"$LAB_WORK/.lock"
flock -w 1800 9 || lab_die "another lab.sh holds $LAB_WORK/.lock"

# --- prepare: host tools, kernel, modules, busybox, guest binary -------------------------
lab_host_tools
lab_kernel_resolve "$kabi" "$kver"
lab_fetch_kernel
lab_fetch_busybox
[ "$mtty" = 1 ] && lab_build_mtty

# The project's own binaries for the guest, built static: the lab tests, and the helper
# itself for the full multifd migration test.
GUEST_TARGET=x86_64-unknown-linux-gnu
GUEST_PACKAGES=(vfio-lab-guest vfio-multifd)
if [ -z "$guest_cmd" ] || [[ $guest_cmd == *vfio-lab-guest* ]]; then
  lab_log "building ${GUEST_PACKAGES[*]} (static, $GUEST_TARGET)"
  # Own target dir: this may run under `cargo test`, which holds the workspace's.
  (cd "$REPO" && CARGO_TARGET_DIR=$LAB_WORK/target RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build -q --release --target "$GUEST_TARGET" "${GUEST_PACKAGES[@]/#/-p=}") || lab_die "guest build failed"
  for p in "${GUEST_PACKAGES[@]}"; do
    bin=$LAB_WORK/target/$GUEST_TARGET/release/$p
    if readelf -lW "$bin" 2>/dev/null | grep -q 'Requesting program interpreter'; then
      lab_die "$bin is dynamically linked"
    fi
    extra_bins+=("$bin")
  done
fi

# --- initramfs --------------------------------------------------------------------------
run_dir=$LAB_WORK/runs/$LAB_ABI
stage=$run_dir/initrd
mkdir -p "$run_dir"
lab_initrd_stage "$stage"
uuid_a=c0ffee00-0000-4000-8000-00000000000a
uuid_b=c0ffee00-0000-4000-8000-00000000000b
mdev_type="" uuids=""
if [ "$mtty" = 1 ]; then
  lab_stage_modules "$stage" vfio vfio_iommu_type1 mdev
  cp "$LAB_MTTY_KO" "$stage/lib/modules/mtty.ko"
  echo mtty >>"$stage/lib/modules/order"
  mdev_type=mtty-2 uuids="$uuid_a $uuid_b"
fi
for b in ${extra_bins[@]+"${extra_bins[@]}"}; do
  install -m 0755 "$b" "$stage/bin/$(basename "$b")"
done
custom_cmd=1
if [ -z "$guest_cmd" ]; then
  custom_cmd=0
  guest_cmd="vfio-lab-guest --mdev $uuid_a --mdev $uuid_b run $tests"
fi
{
  printf 'LAB_MDEV_TYPE=%q\n' "$mdev_type"
  printf 'LAB_MDEV_UUIDS=%q\n' "$uuids"
  printf 'LAB_CMD=%q\n' "$guest_cmd"
} >"$stage/lab.env"
lab_initrd_pack "$stage" "$run_dir/initrd.cpio.gz"

# --- boot -------------------------------------------------------------------------------
log=${log:-$run_dir/serial.log}
lab_log "booting $LAB_K under TCG (timeout ${timeout_s}s): $guest_cmd"
boot_t0=$(date +%s%3N)
qemu_rc=0
lab_boot "$run_dir/initrd.cpio.gz" "$log" "$timeout_s" || qemu_rc=$?
boot_ms=$(($(date +%s%3N) - boot_t0))
lab_log "qemu exited $qemu_rc after $((boot_ms / 1000)).$((boot_ms % 1000 / 100))s; serial log: $log"

# --- report -----------------------------------------------------------------------------
# Serial log without CRs and terminal escapes (SeaBIOS clears the screen before /init).
out=$(tr -d '\r' <"$log" | sed -E 's/\x1b(\[[0-9;?]*[a-zA-Z]|c)//g')
grep -E '^LAB' <<<"$out" || true
if [ "$custom_cmd" = 1 ]; then
  # A custom guest command's own output, between "LAB-INIT ready" and "LAB-RC".
  awk '/^LAB-INIT ready/ {on=1; next} /^LAB-RC / {on=0} on && !/^LAB/ {print "  | " $0}' <<<"$out"
fi
fail=0
[ "$qemu_rc" = 0 ] || { echo "LAB-HOST FAIL qemu exit status $qemu_rc (124 = timeout)"; fail=1; }
rc_line=$(grep -E '^LAB-RC ' <<<"$out" | tail -1 || true)
if [ -z "$rc_line" ]; then
  echo "LAB-HOST FAIL no LAB-RC line: the guest command never finished"
  fail=1
elif [ "$(awk '{print $2}' <<<"$rc_line")" != 0 ]; then
  fail=1
fi
grep -qE '^LAB [^ ]+ FAIL' <<<"$out" && fail=1
if [[ $guest_cmd == *vfio-lab-guest*" run"* ]]; then
  grep -qx 'LAB ALL PASSED' <<<"$out" || fail=1
fi
if [ "$fail" = 0 ]; then
  echo "LAB-HOST PASS kernel=$LAB_ABI boot_s=$((boot_ms / 1000)).$((boot_ms % 1000 / 100)) total_s=$(lab_elapsed)"
else
  echo "LAB-HOST last serial lines:"
  grep -vE '^LAB' <<<"$out" | tail -n 20 | sed 's/^/  | /'
  echo "LAB-HOST FAIL kernel=$LAB_ABI total_s=$(lab_elapsed) (serial log: $log)"
fi
exit "$fail"
