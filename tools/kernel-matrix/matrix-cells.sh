#!/bin/sh
# Kernel matrix, one kernel: runs every cell's end-to-end transfer with `vfio-multifd demo`
# and prints machine-readable MATRIX-* lines for matrix.py. POSIX sh: it runs on the host and,
# unchanged, as the guest command of a busybox initramfs (tools/vfio-lab/lab.sh).
#
#   matrix-cells.sh --bin PATH [--seccomp-exec PATH] [--profile host|guest] [--cells LIST]
#                   [--perf-reps N] [--timeout S] [--demo-timeout S]
#
# Per cell: `probe --json` with the cell's mask (MATRIX-PATH), a correctness transfer (several
# devices, odd sizes, odd small chunks, short reads from a rate-limited pipe, several channels)
# and a throughput transfer (MATRIX-RUN / MATRIX-JSON / MATRIX-LOG). demo verifies every byte
# and every config blob at the destination; the JSON's "verified" says so.
set -u

bin="" seccomp="" profile=host cells="" perf_reps=1 timeout_s=120 demo_timeout=20
while [ $# -gt 0 ]; do
  case $1 in
    --bin) bin=$2; shift 2 ;;
    --seccomp-exec) seccomp=$2; shift 2 ;;
    --profile) profile=$2; shift 2 ;;
    --cells) cells=$(echo "$2" | tr ',' ' '); shift 2 ;;
    --perf-reps) perf_reps=$2; shift 2 ;;
    --timeout) timeout_s=$2; shift 2 ;;
    --demo-timeout) demo_timeout=$2; shift 2 ;;
    *) echo "matrix-cells.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
[ -x "$bin" ] || { echo "matrix-cells.sh: --bin $bin is not executable" >&2; exit 2; }

# Every single-feature mask, the all-off cell, io_uring off, the default, SQPOLL actually
# used (the engine tries it only when asked and when DEFER/COOP are off), and io_uring refused
# by a real seccomp filter (ENOSYS, EPERM).
all_cells="default send-zc fixed-buffers linked-chains defer-taskrun coop-taskrun sqpoll
buffer-ring all io-uring sqpoll-on seccomp-enosys seccomp-eperm"
cells=${cells:-$all_cells}

case $profile in
  host)
    check="--devices 3 --size 1000003 --chunk 4099 --channels 3 --device-speed 64MiB/s"
    perf="--devices 4 --size 48MiB --chunk 1MiB --channels 4"
    ;;
  guest)
    check="--devices 3 --size 300007 --chunk 4099 --channels 3 --device-speed 16MiB/s"
    perf="--devices 2 --size 8MiB --chunk 256KiB --channels 2 --pool-buffers 16"
    ;;
  *) echo "matrix-cells.sh: unknown profile $profile" >&2; exit 2 ;;
esac
# demo's own limit on a step without progress: a stalled cell fails in seconds, not minutes.
common="--json --no-progress --timeout $demo_timeout --log-level warn"

now_ms() {
  t=$(date +%s%N 2>/dev/null)
  case $t in
    *N | "") awk '{ printf "%d\n", $1 * 1000 }' /proc/uptime ;;
    *) echo $((t / 1000000)) ;;
  esac
}

tmp=${TMPDIR:-/tmp}/matrix-cells.$$
mkdir -p "$tmp" || exit 1
trap 'rm -rf "$tmp"' EXIT

# Sets `wrap` (a command prefix), `forbid_env`, `sqpoll_env` and `extra` (demo/probe flags)
# for a cell; returns 1 for an unknown cell.
cell_setup() {
  wrap="" forbid_env="" sqpoll_env="" extra=""
  case $1 in
    default) ;;
    send-zc | fixed-buffers | linked-chains | defer-taskrun | coop-taskrun | sqpoll | buffer-ring | io-uring)
      forbid_env=$1 ;;
    all) extra="--forbid all" ;;
    sqpoll-on) sqpoll_env=1 extra="--forbid defer-taskrun,coop-taskrun" ;;
    seccomp-enosys | seccomp-eperm)
      [ -x "$seccomp" ] || return 2
      case $1 in
        seccomp-enosys) wrap="$seccomp ENOSYS" ;;
        *) wrap="$seccomp EPERM" ;;
      esac
      ;;
    *) return 1 ;;
  esac
  return 0
}

# run_in_cell <out> <err> <vfio-multifd args...>
run_in_cell() {
  out=$1 err=$2
  shift 2
  # shellcheck disable=SC2086 # $wrap is a command prefix
  env ${forbid_env:+VFIO_MULTIFD_FORBID=$forbid_env} ${sqpoll_env:+VFIO_MULTIFD_SQPOLL=$sqpoll_env} \
    timeout "$timeout_s" $wrap "$bin" "$@" >"$out" 2>"$err"
}

echo "MATRIX-KERNEL $(uname -r)"
echo "MATRIX-UNAME $(uname -v)"
echo "MATRIX-PROFILE $profile check=[$check] perf=[$perf] perf_reps=$perf_reps"
"$bin" probe --json >"$tmp/probe" 2>"$tmp/probe.err" && echo "MATRIX-PROBE $(head -c 65536 "$tmp/probe")" ||
  echo "MATRIX-PROBE null $(head -c 300 "$tmp/probe.err" | tr '\n' ' ')"

# One unrecorded default transfer first: the first run after boot pays for page faults and
# cold caches, which would skew the default cell every other cell is compared with.
cell_setup default
# shellcheck disable=SC2086
run_in_cell "$tmp/out" "$tmp/err" demo $perf $common
echo "MATRIX-WARMUP rc=$?"

for cell in $cells; do
  cell_setup "$cell"
  case $? in
    1) echo "MATRIX-RUN $cell setup rc=2 wall_ms=0 why=unknown-cell"; continue ;;
    2) echo "MATRIX-RUN $cell setup rc=2 wall_ms=0 why=no-seccomp-exec"; continue ;;
  esac
  # shellcheck disable=SC2086
  if run_in_cell "$tmp/path" "$tmp/path.err" probe --json $extra; then
    echo "MATRIX-PATH $cell $(head -c 65536 "$tmp/path")"
  else
    echo "MATRIX-PATH $cell null"
  fi
  for run in check perf; do
    reps=1
    [ "$run" = perf ] && reps=$perf_reps
    r=1
    while [ "$r" -le "$reps" ]; do
      if [ "$run" = check ]; then args=$check; else args=$perf; fi
      t0=$(now_ms)
      # shellcheck disable=SC2086
      run_in_cell "$tmp/out" "$tmp/err" demo $args $common $extra
      rc=$?
      t1=$(now_ms)
      echo "MATRIX-RUN $cell $run rc=$rc wall_ms=$((t1 - t0)) rep=$r"
      echo "MATRIX-JSON $cell $run $(tail -n 1 "$tmp/out" | head -c 65536)"
      head -n 40 "$tmp/err" | while IFS= read -r line; do
        echo "MATRIX-LOG $cell $run $line"
      done
      r=$((r + 1))
    done
  done
done
echo "MATRIX-END"
