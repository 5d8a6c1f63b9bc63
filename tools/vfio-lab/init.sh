#!/bin/busybox sh
# /init of the VFIO lab guest (busybox initramfs). lab.sh writes /lab.env:
#   LAB_MDEV_TYPE   mdev type to create (e.g. mtty-2), empty for none
#   LAB_MDEV_UUIDS  UUIDs to create, in order
#   LAB_CMD         the guest command; its exit status is printed as "LAB-RC <n>"
# Kernel modules load in the order of /lib/modules/order. The guest powers off at the end.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
. /lab.env
echo "LAB-INIT uptime=$(cut -d' ' -f1 /proc/uptime) kernel=$(uname -r)"
if [ -f /lib/modules/order ]; then
  for m in $(cat /lib/modules/order); do
    insmod "/lib/modules/$m.ko" || echo "LAB-INIT insmod $m failed"
  done
fi
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
if [ -n "$LAB_MDEV_TYPE" ]; then
  for u in $LAB_MDEV_UUIDS; do
    for t in /sys/class/mdev_bus/*/mdev_supported_types/"$LAB_MDEV_TYPE"; do
      echo "$u" >"$t/create" || echo "LAB-INIT mdev $u create failed"
    done
  done
fi
echo "LAB-INIT ready uptime=$(cut -d' ' -f1 /proc/uptime)"
sh -c "$LAB_CMD"
echo "LAB-RC $? uptime=$(cut -d' ' -f1 /proc/uptime)"
poweroff -f
