#!/bin/busybox sh
# trenvx initramfs /init (busybox-static only).
#
# Loads the modules listed in /etc/trenvx/modules (dependency order, computed on the host),
# reads the kernel command line, configures the network, waits for the root device, mounts it
# and switch_roots to the root filesystem's init (/opt/trenvx/init).
#
# Kernel command line:
#   root=DEV            root device (default /dev/vda); LABEL=x / UUID=x also work
#   rootflags=OPTS      extra ext4 mount options (e.g. dax for root=/dev/pmem0)
#   trenvx.upper=DEV    overlay mode: root is mounted read-only as the lower layer, DEV (an ext4
#                       disk) holds the writable upper layer, and / is an overlayfs of the two
#   trenvx.net=IP/PREFIX,GATEWAY   configure eth0 (and lo)
#   trenvx.probe=1      print TRENVX-PROBE-OK and power off (can this accelerator boot us?)
#   trenvx.init=PATH    the init to switch to (default /opt/trenvx/init)
#   trenvx.rootwait=S   seconds to wait for the root device (default 30)
#
# Never drops to a shell: the host is waiting on the console. Any failure prints one line
# "TRENVX-INIT-ERROR: <reason>" and powers the VM off.

B=/bin/busybox
export PATH=/bin:/sbin

fail() {
	echo "TRENVX-INIT-ERROR: $*" >/dev/console 2>/dev/null || echo "TRENVX-INIT-ERROR: $*"
	$B sync
	$B poweroff -f
	# poweroff should not return; if it does, make the kernel panic (init exits) rather than hang.
	$B sleep 5
	exit 1
}

$B mount -t proc proc /proc || fail "cannot mount /proc"
$B mount -t sysfs sysfs /sys || fail "cannot mount /sys"
$B mount -t devtmpfs devtmpfs /dev || fail "cannot mount devtmpfs on /dev"

root=/dev/vda
rootflags=
net=
probe=
init=/opt/trenvx/init
rootwait=30
upper=
for a in $($B cat /proc/cmdline); do
	case "$a" in
	root=*) root=${a#root=} ;;
	rootflags=*) rootflags=${a#rootflags=} ;;
	trenvx.net=*) net=${a#trenvx.net=} ;;
	trenvx.probe=*) probe=${a#trenvx.probe=} ;;
	trenvx.init=*) init=${a#trenvx.init=} ;;
	trenvx.rootwait=*) rootwait=${a#trenvx.rootwait=} ;;
	trenvx.upper=*) upper=${a#trenvx.upper=} ;;
	esac
done
case "$rootwait" in '' | *[!0-9]*) rootwait=30 ;; esac

# Modules, in the order the host computed from modules.dep. "name 1" = required, "name 0" = optional.
if [ -f /etc/trenvx/modules ]; then
	while read -r m req; do
		[ -n "$m" ] || continue
		if ! out=$($B insmod "/lib/modules/$m.ko" 2>&1); then
			case "$out" in
			*"File exists"*) ;;
			*)
				if [ "$req" = 1 ]; then
					fail "insmod $m failed: $out"
				else
					echo "trenvx-initramfs: optional module $m not loaded: $out"
				fi
				;;
			esac
		fi
	done </etc/trenvx/modules
fi

if [ "$probe" = 1 ]; then
	echo "TRENVX-PROBE-OK" >/dev/console
	$B sync
	$B poweroff -f
	$B sleep 5
	exit 1
fi

$B ip link set lo up 2>/dev/null

if [ -n "$net" ]; then
	addr=${net%%,*}
	gw=
	case "$net" in *,*) gw=${net#*,} ;; esac
	i=0
	while [ ! -e /sys/class/net/eth0 ]; do
		i=$((i + 1))
		[ $i -gt 500 ] && fail "trenvx.net=$net given but no eth0 appeared within 5 s (attach a virtio-net device)"
		$B usleep 10000
	done
	$B ip link set eth0 up || fail "ip link set eth0 up failed"
	$B ip addr add "$addr" dev eth0 || fail "ip addr add $addr dev eth0 failed (trenvx.net=$net; expected IP/PREFIX,GATEWAY)"
	if [ -n "$gw" ]; then
		$B ip route add default via "$gw" dev eth0 || fail "ip route add default via $gw failed (trenvx.net=$net)"
	fi
fi

# Wait (bounded) for a block device named like root= (LABEL=x / UUID=x / a path); prints it.
wait_dev() {
	want=$1
	found=
	i=0
	limit=$((rootwait * 100))
	while :; do
		case "$want" in
		LABEL=* | UUID=*) found=$($B findfs "$want" 2>/dev/null) ;;
		*) [ -b "$want" ] && found=$want ;;
		esac
		[ -n "$found" ] && break
		i=$((i + 1))
		[ $i -gt $limit ] && return 1
		$B usleep 10000
	done
	echo "$found"
}

dev=$(wait_dev "$root") ||
	fail "root device $root did not appear within ${rootwait} s (attach the image as virtio-blk for /dev/vda, or virtio-pmem for /dev/pmem0)"

if [ -z "$upper" ]; then
	opts=rw,noatime
	[ -n "$rootflags" ] && opts="$opts,$rootflags"
	$B mount -t ext4 -o "$opts" "$dev" /newroot || fail "mount -t ext4 -o $opts $dev /newroot failed"
else
	# Overlay mode: the template's image is the read-only lower layer (on virtio-pmem with DAX,
	# its pages are the host's page cache, shared by every sandbox and never copied into this
	# guest's page cache); this sandbox's writes go to its own disk, the upper layer.
	opts=ro,noatime
	[ -n "$rootflags" ] && opts="$opts,$rootflags"
	$B mkdir -p /lower /upper
	$B mount -t ext4 -o "$opts" "$dev" /lower || fail "mount -t ext4 -o $opts $dev /lower (the overlay's lower layer) failed"
	udev=$(wait_dev "$upper") || fail "upper layer device $upper did not appear within ${rootwait} s (attach the writable disk as virtio-blk)"
	$B mount -t ext4 -o rw,noatime "$udev" /upper || fail "mount -t ext4 $udev /upper (the overlay's upper layer) failed"
	$B mkdir -p /upper/root /upper/work || fail "cannot create the overlay's directories on $udev"
	$B mount -t overlay overlay -o "lowerdir=/lower,upperdir=/upper/root,workdir=/upper/work" /newroot ||
		fail "mount -t overlay (lower $dev, upper $udev) failed: is the overlay module in the initramfs?"
	dev="overlay of $dev and $udev"
fi
[ -f "/newroot$init" ] && [ -x "/newroot$init" ] ||
	fail "$init is missing or not executable in the root filesystem on $dev (was the image built by trenvx?)"
[ -d /newroot/dev ] || $B mkdir -p /newroot/dev || fail "no /dev directory in the root filesystem"
$B mount --move /dev /newroot/dev || fail "mount --move /dev /newroot/dev failed"
# Fewer wakeups of an idle guest: under TCG each one is emulated work, and a host holding a
# hundred idle sandboxes paid whole cores for them (measured ~15 wakeups/s and 5.5% of a core per
# idle sandbox). No proactive compaction (2/s), vm statistics every 60 s instead of every second,
# dirty-page writeback every 15 s instead of 5 s.
echo 0 2>/dev/null >/proc/sys/vm/compaction_proactiveness
echo 60 2>/dev/null >/proc/sys/vm/stat_interval
echo 1500 2>/dev/null >/proc/sys/vm/dirty_writeback_centisecs
# Free page reporting (virtio-balloon) gives the host back free blocks of 16 KiB and up, not only
# of 2 MiB (the kernel's default, which suits hosts backing guests with huge pages): after a
# numpy+pandas run the freed memory sat in smaller blocks, and a sandbox kept 53 MiB of private
# guest RAM; with 16 KiB it keeps 15 MiB (measured). The kernel resets a command-line value when
# the balloon driver registers, so it is set here, after the modules are loaded.
echo 2 2>/dev/null >/sys/module/page_reporting/parameters/page_reporting_order
$B umount /sys
$B umount /proc
echo "trenvx-initramfs: switching to $init on $dev" >/newroot/dev/console
exec $B switch_root /newroot "$init"
fail "switch_root to $init failed"
