# shellcheck shell=bash
# Reusable pieces of the VFIO lab: fetch a pinned Debian kernel without installing it,
# build an out-of-tree module against its headers, pack a busybox initramfs, and boot it
# under qemu-system-x86_64 -accel tcg with a timeout. Sourced by lab.sh; a kernel matrix
# (for example io_uring tests on Debian's 6.1) sources it too and calls:
#
#   lab_kernel_resolve <abi|""> <pkg-version|"">   # sets LAB_ABI, LAB_PKGVER, LAB_KDIR
#   lab_fetch_kernel                                # vmlinuz + modules under $LAB_KDIR/root
#   lab_fetch_busybox                               # $LAB_WORK/busybox/busybox
#   lab_initrd_stage <dir> ; lab_stage_modules <dir> <module>... ; lab_initrd_pack <dir> <out>
#   lab_boot <initrd> <serial-log> <timeout-s> [extra kernel args]
#
# Nothing here installs a kernel on the host: every .deb is fetched with `apt-get download`
# and unpacked with `dpkg-deb -x` (../shared/docs/vfio-lab.md, "no-install path").

LAB_DIR=${LAB_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
LAB_WORK=${LAB_WORK:-$LAB_DIR/work}
LAB_ARCH=amd64
# The pin studied in ../shared/docs/vfio-lab.md. mtty migration needs 6.7 or later.
LAB_DEFAULT_ABI=6.12.117+deb12
LAB_DEFAULT_PKGVER=6.12.117-1~deb12u1
LAB_BUSYBOX_PKGVER=${LAB_BUSYBOX_PKGVER:-1:1.35.0-4+deb12u1+b1}
LAB_T0=${LAB_T0:-$(date +%s%3N)}

# Elapsed wall time since LAB_T0, in seconds with one decimal.
lab_elapsed() {
  local ms=$(($(date +%s%3N) - LAB_T0))
  printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100))
}
lab_log() {
  printf '[lab %5ss] %s\n' "$(lab_elapsed)" "$*" >&2
}
lab_die() {
  printf '[lab] error: %s\n' "$*" >&2
  exit 1
}

# Runs a command as root: directly, or through `sudo -n`; fails clearly otherwise.
lab_as_root() {
  if [ "$(id -u)" = 0 ]; then
    "$@"
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo -n "$@"
  else
    return 1
  fi
}

# Host build tools, installed with apt only when missing (never a kernel).
lab_host_tools() {
  local missing=() pkg
  for pkg in gcc make cpio xz-utils libc6-dev; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    lab_log "installing host tools: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive lab_as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
      { lab_as_root apt-get update -qq && DEBIAN_FRONTEND=noninteractive lab_as_root \
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; } ||
      lab_die "cannot install ${missing[*]} (need root or passwordless sudo)"
  fi
}

# True when apt knows pkg=version.
lab_apt_has() {
  apt-cache show "$1=$2" >/dev/null 2>&1
}

# apt-get download pkg=version into $LAB_WORK/debs; prints the .deb path.
# Refreshes the package lists once (as root) if apt does not know the version yet.
lab_download() {
  local pkg=$1 ver=$2 debs=$LAB_WORK/debs f
  mkdir -p "$debs"
  f=$(lab_deb_path "$pkg" "$ver")
  if [ -z "$f" ]; then
    if ! lab_apt_has "$pkg" "$ver"; then
      lab_as_root apt-get update -qq >&2 || true
    fi
    lab_log "apt-get download $pkg=$ver"
    (cd "$debs" && apt-get download -qq -o APT::Sandbox::User="$(id -un)" "$pkg=$ver" >&2) ||
      lab_die "apt-get download $pkg=$ver failed"
    f=$(lab_deb_path "$pkg" "$ver")
    [ -n "$f" ] || lab_die "downloaded $pkg=$ver but cannot find its .deb in $debs"
  fi
  printf '%s\n' "$f"
}
lab_deb_path() {
  local v=${2//:/%3a} f
  for f in "$LAB_WORK/debs/${1}_${v}_"*.deb; do
    [ -f "$f" ] && { printf '%s\n' "$f"; return 0; }
  done
  return 0
}

# Picks the kernel: an explicit ABI (e.g. 6.12.117+deb12, 6.1.0-41) and optional package
# version, or the default pin. If the default pin has left the archive, falls back to the
# newest 6.12.x apt knows and says so (LAB-KERNEL line); an explicit choice never falls back.
# Sets LAB_ABI, LAB_PKGVER, LAB_K (ABI-amd64), LAB_KDIR (cache dir for this kernel).
lab_kernel_resolve() {
  local abi=$1 ver=$2 explicit=1 cand best_abi="" best_ver="" v
  if [ -z "$abi" ]; then
    abi=$LAB_DEFAULT_ABI
    ver=${ver:-$LAB_DEFAULT_PKGVER}
    explicit=0
  fi
  LAB_K=$abi-$LAB_ARCH
  if [ -z "$ver" ] && [ -f "$LAB_WORK/k-$abi/PKGVER" ]; then
    ver=$(cat "$LAB_WORK/k-$abi/PKGVER")
  fi
  if [ -z "$ver" ]; then
    ver=$(apt-cache policy "linux-image-$LAB_K-unsigned" 2>/dev/null | awk '/Candidate:/ {print $2}')
    [ -n "$ver" ] && [ "$ver" != "(none)" ] || lab_die "apt knows no linux-image-$LAB_K-unsigned (run apt-get update?)"
  fi
  if [ ! -f "$LAB_WORK/k-$abi/.image.ok" ] && ! lab_apt_has "linux-image-$LAB_K-unsigned" "$ver" &&
    ! lab_apt_has "linux-image-$LAB_K" "$ver"; then
    lab_as_root apt-get update -qq >&2 || true
    if ! lab_apt_has "linux-image-$LAB_K-unsigned" "$ver" && ! lab_apt_has "linux-image-$LAB_K" "$ver"; then
      [ "$explicit" = 1 ] && lab_die "linux-image-$LAB_K=$ver is not in the apt archive"
      for cand in $(apt-cache pkgnames "linux-headers-6.12." | grep -E '^linux-headers-6\.12\.[0-9]+\+deb12-amd64$'); do
        v=$(apt-cache policy "$cand" | awk '/Candidate:/ {print $2}')
        if [ -z "$best_ver" ] || dpkg --compare-versions "$v" gt "$best_ver"; then
          best_ver=$v
          best_abi=${cand#linux-headers-}
          best_abi=${best_abi%-amd64}
        fi
      done
      [ -n "$best_abi" ] || lab_die "neither the pinned kernel $abi ($ver) nor any 6.12.x is in the apt archive"
      echo "LAB-KERNEL pinned $abi=$ver is gone from the archive; using newest 6.12.x $best_abi=$best_ver"
      abi=$best_abi ver=$best_ver LAB_K=$abi-$LAB_ARCH
    fi
  fi
  LAB_ABI=$abi
  LAB_PKGVER=$ver
  LAB_KDIR=$LAB_WORK/k-$abi
  mkdir -p "$LAB_KDIR"
  echo "$ver" >"$LAB_KDIR/PKGVER"
  echo "LAB-KERNEL $LAB_ABI $LAB_PKGVER"
}

# Unpacks the kernel image package (vmlinuz, modules) into $LAB_KDIR/root. Prefers the
# -unsigned package (same binary as the signed one, no shim/signing deps).
lab_fetch_kernel() {
  local deb
  [ -f "$LAB_KDIR/.image.ok" ] && return 0
  if lab_apt_has "linux-image-$LAB_K-unsigned" "$LAB_PKGVER" || [ -n "$(lab_deb_path "linux-image-$LAB_K-unsigned" "$LAB_PKGVER")" ]; then
    deb=$(lab_download "linux-image-$LAB_K-unsigned" "$LAB_PKGVER")
  else
    deb=$(lab_download "linux-image-$LAB_K" "$LAB_PKGVER")
  fi
  lab_log "unpacking $(basename "$deb")"
  dpkg-deb -x "$deb" "$LAB_KDIR/root"
  [ -f "$LAB_KDIR/root/boot/vmlinuz-$LAB_K" ] || lab_die "no boot/vmlinuz-$LAB_K in $deb"
  rm -f "$deb"
  touch "$LAB_KDIR/.image.ok"
}

# Kernel headers + kbuild for out-of-tree modules, unpacked beside the image; the headers
# Makefile's absolute include of /usr/src is pointed into the unpacked tree.
lab_fetch_headers() {
  local deb deps dep name f
  [ -f "$LAB_KDIR/.headers.ok" ] && return 0
  deb=$(lab_download "linux-headers-$LAB_K" "$LAB_PKGVER")
  deps=$(dpkg-deb -f "$deb" Depends)
  set -- "$deb"
  for dep in ${deps//,/ }; do
    name=${dep%% *}
    case $name in
      linux-headers-*-common | linux-kbuild-*) set -- "$@" "$(lab_download "$name" "$LAB_PKGVER")" ;;
    esac
  done
  for f in "$@"; do
    lab_log "unpacking $(basename "$f")"
    dpkg-deb -x "$f" "$LAB_KDIR/root"
  done
  sed -i "s|^include /usr/src/|include $LAB_KDIR/root/usr/src/|" "$LAB_KDIR/root/usr/src/linux-headers-$LAB_K/Makefile"
  rm -f "$@"
  touch "$LAB_KDIR/.headers.ok"
}

# One file out of Debian's linux-source-X.Y tarball (153 MB .deb; only the file is kept).
# usage: lab_fetch_source_file <path-in-tree> <dest>
lab_fetch_source_file() {
  local rel=$1 dest=$2 series deb tmp
  [ -f "$dest" ] && return 0
  series=$(echo "$LAB_PKGVER" | sed -E 's/^([0-9]+\.[0-9]+).*/\1/')
  deb=$(lab_download "linux-source-$series" "$LAB_PKGVER")
  tmp=$LAB_KDIR/src.tmp
  rm -rf "$tmp" && mkdir -p "$tmp"
  lab_log "extracting $rel from $(basename "$deb")"
  dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$tmp" "./usr/src/linux-source-$series.tar.xz"
  tar -xJf "$tmp/usr/src/linux-source-$series.tar.xz" -C "$tmp" --occurrence=1 "linux-source-$series/$rel"
  mkdir -p "$(dirname "$dest")"
  mv "$tmp/linux-source-$series/$rel" "$dest"
  rm -rf "$tmp" "$deb"
}

# Builds mtty.ko (samples/vfio-mdev/mtty.c) against the unpacked headers.
lab_build_mtty() {
  local m=$LAB_KDIR/mtty
  lab_fetch_headers
  lab_fetch_source_file samples/vfio-mdev/mtty.c "$m/mtty.c"
  if [ ! -f "$m/mtty.ko" ] || [ "$m/mtty.c" -nt "$m/mtty.ko" ]; then
    echo 'obj-m := mtty.o' >"$m/Kbuild"
    lab_log "building mtty.ko for $LAB_K"
    # No BTF for the module: it would need pahole (dwarves) on the host.
    make -s -C "$LAB_KDIR/root/usr/src/linux-headers-$LAB_K" M="$m" CONFIG_DEBUG_INFO_BTF_MODULES= modules >"$m/build.log" 2>&1 ||
      { cat "$m/build.log" >&2; lab_die "mtty.ko build failed"; }
  fi
  LAB_MTTY_KO=$m/mtty.ko
}

lab_fetch_busybox() {
  local d=$LAB_WORK/busybox deb
  LAB_BUSYBOX=$d/busybox
  [ -x "$LAB_BUSYBOX" ] && return 0
  deb=$(lab_download busybox-static "$LAB_BUSYBOX_PKGVER")
  rm -rf "$d/root" && mkdir -p "$d"
  dpkg-deb -x "$deb" "$d/root"
  cp "$d/root/bin/busybox" "$LAB_BUSYBOX"
  rm -rf "$d/root" "$deb"
}

# Fresh initramfs staging dir with busybox and the /init from $LAB_DIR/init.sh.
lab_initrd_stage() {
  local s=$1
  rm -rf "$s" && mkdir -p "$s"/{bin,dev,proc,sys,tmp,lib/modules}
  cp "$LAB_BUSYBOX" "$s/bin/busybox"
  install -m 0755 "$LAB_DIR/init.sh" "$s/init"
}

# Copies kernel modules and their dependencies into <stage>/lib/modules, decompressed, and
# appends their names in load order to <stage>/lib/modules/order. The .deb ships no
# modules.dep (depmod runs at install), so dependencies come from each module's
# .modinfo "depends=" field.
lab_stage_modules() {
  local s=$1 m
  shift
  touch "$s/lib/modules/order"
  for m in "$@"; do
    _lab_stage_module "$s" "$m"
  done
}
_lab_stage_module() {
  local s=$1 name=${2//-/_} kdir=$LAB_KDIR/root/lib/modules/$LAB_K/kernel f dep deps
  grep -qx "$name" "$s/lib/modules/order" && return 0
  f=$(find "$kdir" \( -name "$name.ko*" -o -name "${name//_/-}.ko*" \) -print -quit)
  [ -n "$f" ] || lab_die "module $2 is not in $kdir (built in, or not in this kernel?)"
  case $f in
    *.xz) xz -dc "$f" >"$s/lib/modules/$name.ko" ;;
    *.zst) zstd -qdc "$f" >"$s/lib/modules/$name.ko" ;;
    *.gz) gzip -dc "$f" >"$s/lib/modules/$name.ko" ;;
    *) cp "$f" "$s/lib/modules/$name.ko" ;;
  esac
  deps=$(tr '\0' '\n' <"$s/lib/modules/$name.ko" | sed -n 's/^depends=//p' | head -1)
  for dep in ${deps//,/ }; do
    _lab_stage_module "$s" "$dep"
  done
  echo "$name" >>"$s/lib/modules/order"
}

lab_initrd_pack() {
  (cd "$1" && find . -print0 | cpio --null -o -H newc --quiet) | gzip -1 >"$2"
}

# Boots $LAB_KDIR's kernel with an initrd under TCG; the serial console goes to <log>.
# Returns qemu's status (124 on timeout). LAB_SMP / LAB_MEM tune the guest.
lab_boot() {
  local initrd=$1 log=$2 timeout_s=$3
  shift 3
  timeout --foreground -k 5 "$timeout_s" qemu-system-x86_64 -accel tcg \
    -m "${LAB_MEM:-1024}" -smp "${LAB_SMP:-2}" -nic none -nographic -no-reboot \
    -kernel "$LAB_KDIR/root/boot/vmlinuz-$LAB_K" -initrd "$initrd" \
    -append "console=ttyS0 panic=-1 quiet $*" </dev/null >"$log" 2>&1
}
