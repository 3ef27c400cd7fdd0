#!/bin/sh
# Builds the root of a disposable systemd test host and execs systemd as its PID 1.
#
# Run ONLY by sandbox/systemd_host.py, as the child of
#   unshare --cgroup --pid --fork --mount --net --uts --ipc --kill-child=SIGKILL
# after the launcher moved itself into a fresh child cgroup of the name=systemd and unified
# hierarchies. Everything it mounts lives in the new mount namespace; everything it writes goes
# to an overlay whose upper layer is a tmpfs. Every step fails closed: `set -eu`, explicit checks
# before the first write, and nothing is written outside the overlay before pivot_root.
# (TESTING.md, "A real systemd as a test host": each point there was learned the hard way.)
#
# Inputs (environment):
#   AEA_BASE         an empty host directory used as the mount point of this host's private tmpfs
#   AEA_SHARED       a host directory bind-mounted at the same path inside
#   AEA_REPO         optional: the project's tree, overlaid copy-on-write at the same path
#   AEA_NAME         the container name (container=<name>, hostname)
#   AEA_HOST_MNTNS   readlink /proc/self/ns/mnt of the launcher (must differ from ours)
#   AEA_HOST_NETNS   readlink /proc/self/ns/net of the launcher (must differ from ours)
#   AEA_HOST_PIDNS   readlink /proc/self/ns/pid of the launcher (must differ from ours)
#   AEA_HOST_CGNS    readlink /proc/self/ns/cgroup of the launcher (must differ from ours)
set -eu

die() {
    echo "systemd_host_init: ABORT: $*" >&2
    exit 1
}

: "${AEA_BASE:?}" "${AEA_SHARED:?}" "${AEA_NAME:?}"
: "${AEA_HOST_MNTNS:?}" "${AEA_HOST_NETNS:?}" "${AEA_HOST_PIDNS:?}" "${AEA_HOST_CGNS:?}"

# --- 1. Are we really in fresh namespaces? Refuse to touch anything otherwise. -------------
[ "$$" = 1 ] || die "not PID 1 of a new pid namespace (pid $$)"
[ "$(readlink /proc/self/ns/mnt)" != "$AEA_HOST_MNTNS" ] || die "still in the host mount namespace"
[ "$(readlink /proc/self/ns/net)" != "$AEA_HOST_NETNS" ] || die "still in the host network namespace"
[ "$(readlink /proc/self/ns/pid)" != "$AEA_HOST_PIDNS" ] || die "still in the host pid namespace"
[ "$(readlink /proc/self/ns/cgroup)" != "$AEA_HOST_CGNS" ] || die "still in the host cgroup namespace"
case "$AEA_BASE" in /*) ;; *) die "AEA_BASE must be absolute" ;; esac
case "$AEA_SHARED" in /*) ;; *) die "AEA_SHARED must be absolute" ;; esac
[ -d "$AEA_BASE" ] || die "AEA_BASE $AEA_BASE is not a directory"
[ -z "$(ls -A "$AEA_BASE")" ] || die "AEA_BASE $AEA_BASE is not empty"
[ -d "$AEA_SHARED" ] || die "AEA_SHARED $AEA_SHARED is not a directory"

# --- 2. No mount event may ever propagate back to the host. FIRST. -------------------------
mount --make-rprivate /
# Prove it: no mount in this namespace may still be shared.
if grep -q ' shared:' /proc/self/mountinfo; then die "a mount is still shared after --make-rprivate"; fi

# --- 3. Overlay root: lower = the host's /, upper + work on a private tmpfs. --------------
B=$AEA_BASE
R=$B/root
mount -t tmpfs -o mode=0700 aea-host "$B"
mkdir "$B/upper" "$B/work" "$R"
mount -t overlay -o "lowerdir=/,upperdir=$B/upper,workdir=$B/work" aea-root "$R"
[ "$(findmnt -n -o FSTYPE --mountpoint "$R")" = overlay ] || die "$R is not the overlay"
# From here on, writes below $R land in the tmpfs upper layer, never in the host's files.

# --- 4. API filesystems. ---------------------------------------------------------------
mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
# Kernel-global knobs stay read-only (sysctl, sysrq could reach the real machine).
for p in sys sysrq-trigger irq bus; do
    if [ -e "$R/proc/$p" ]; then
        mount --bind "$R/proc/$p" "$R/proc/$p"
        mount -o remount,bind,ro,nosuid,nodev,noexec "$R/proc/$p"
    fi
done

mount --rbind /sys "$R/sys"
# Drop our private copies of the machine's cgroup mounts (mounts are private: checked above).
umount -R "$R/sys/fs/cgroup"
# Fresh cgroup trees, rooted at our cgroup namespace (= the child cgroup the launcher made).
mount -t tmpfs -o mode=0755,nosuid,nodev,noexec aea-cgroup "$R/sys/fs/cgroup"
mkdir "$R/sys/fs/cgroup/systemd" "$R/sys/fs/cgroup/unified"
mount -t cgroup -o none,name=systemd,nosuid,nodev,noexec cgroup "$R/sys/fs/cgroup/systemd"
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup/unified"
# Read-only now, so systemd cannot create mount points for the cpu/memory/pids/devices ...
# controllers: those v1 hierarchies are the machine's own, and systemd would create (and on
# SIGKILL leave behind) system.slice/init.scope directories in them, outside our subtree.
mount -o remount,bind,ro,nosuid,nodev,noexec "$R/sys/fs/cgroup"
# The rbind of the host's /sys is made read-only *per mount* (remount,bind): the sysfs
# superblock is the host's, so a plain remount would change it for the host too.
mount -o remount,bind,ro,nosuid,nodev,noexec "$R/sys"

# /dev: a private tmpfs with the few character devices a host needs, bound from the real ones.
# (An rbind of the real /dev let systemd create /dev/log and friends in the host's devtmpfs.)
mount -t tmpfs -o mode=0755,nosuid aea-dev "$R/dev"
for n in null zero full random urandom tty; do
    : >"$R/dev/$n"
    mount --bind "/dev/$n" "$R/dev/$n"
done
mkdir "$R/dev/pts" "$R/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,nosuid,noexec devpts "$R/dev/pts"
ln -s pts/ptmx "$R/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev aea-shm "$R/dev/shm"
ln -s /proc/self/fd "$R/dev/fd"
ln -s /proc/self/fd/0 "$R/dev/stdin"
ln -s /proc/self/fd/1 "$R/dev/stdout"
ln -s /proc/self/fd/2 "$R/dev/stderr"

mount -t tmpfs -o mode=0755,nosuid,nodev aea-run "$R/run"
mount -t tmpfs -o mode=1777,nosuid,nodev aea-tmp "$R/tmp"
mount -t tmpfs -o mode=1777,nosuid,nodev aea-vartmp "$R/var/tmp"

# The project's tree (its venvs and rigs are named by path) at its own path, copy-on-write like
# the rest of the root: it may live under /tmp (a CI clone), which is a private tmpfs in here.
if [ -n "${AEA_REPO:-}" ]; then
    case "$AEA_REPO" in /*) ;; *) die "AEA_REPO must be absolute" ;; esac
    [ -d "$AEA_REPO" ] || die "AEA_REPO $AEA_REPO is not a directory"
    mkdir "$B/repo-upper" "$B/repo-work"
    mkdir -p "$R$AEA_REPO"
    mount -t overlay -o "lowerdir=$AEA_REPO,upperdir=$B/repo-upper,workdir=$B/repo-work" \
        aea-repo "$R$AEA_REPO"
    [ "$(findmnt -n -o FSTYPE --mountpoint "$R$AEA_REPO")" = overlay ] || die "repo overlay missing"
fi

# The directory the test shares with the host, at the same path (after the repo: it may be
# inside it).
mkdir -p "$R$AEA_SHARED"
mount --bind "$AEA_SHARED" "$R$AEA_SHARED"

# --- 5. systemd configuration of the test host (written into the overlay only). ------------
[ "$(findmnt -n -o FSTYPE --mountpoint "$R")" = overlay ] || die "$R is not the overlay"
U=$R/etc/systemd/system
mkdir -p "$U"
# Units that would reach past the namespaces (real /tmp, kernel modules, sysctl, clock, binfmt,
# pstore, partitions, kernel mounts) or need a console, plus every timer/sysinit unit the
# host's admin enabled (apt, fstrim, e2scrub ...).
MASK="systemd-tmpfiles-setup.service systemd-tmpfiles-clean.timer
systemd-tmpfiles-setup-dev.service systemd-remount-fs.service getty.target
kmod-static-nodes.service systemd-modules-load.service systemd-sysctl.service
systemd-binfmt.service proc-sys-fs-binfmt_misc.automount proc-sys-fs-binfmt_misc.mount
sys-fs-fuse-connections.mount sys-kernel-config.mount sys-kernel-debug.mount
sys-kernel-tracing.mount dev-hugepages.mount dev-mqueue.mount systemd-pstore.service
systemd-timesyncd.service systemd-repart.service systemd-random-seed.service
systemd-firstboot.service systemd-machine-id-commit.service systemd-hwdb-update.service
systemd-journald-audit.socket systemd-pcrphase.service systemd-pcrphase-sysinit.service
systemd-fsck-root.service systemd-udevd.service systemd-udev-trigger.service
systemd-udev-settle.service console-getty.service systemd-ask-password-console.path
systemd-ask-password-wall.path"
for w in /etc/systemd/system/sysinit.target.wants /etc/systemd/system/timers.target.wants \
    /etc/systemd/system/sockets.target.wants /etc/systemd/system/basic.target.wants; do
    [ -d "$w" ] || continue
    for u in "$w"/*; do
        [ -e "$u" ] || [ -L "$u" ] || continue
        MASK="$MASK ${u##*/}"
    done
done
for u in $MASK; do
    rm -f "$U/$u"
    ln -s /dev/null "$U/$u"
done
# No fstab/crypttab: nothing to mount, remount, fsck or swap on.
: >"$R/etc/fstab"
[ ! -e "$R/etc/crypttab" ] || : >"$R/etc/crypttab"
echo "$AEA_NAME" >"$R/etc/hostname"
cat >"$U/aea-host.target" <<'EOF'
[Unit]
Description=Minimal default target of the airflow-ec2-agent test host
Requires=basic.target
After=basic.target
AllowIsolate=no
EOF

# --- 6. Switch root. ------------------------------------------------------------------
cd "$R"
mkdir .aea-oldroot
pivot_root . .aea-oldroot
cd /
# Detaching the old root only drops this namespace's private copy of the host's mounts.
umount -l /.aea-oldroot
rmdir /.aea-oldroot

# --- 7. Become systemd. Capabilities that act on the whole machine (modules, clock, reboot,
# raw I/O, kernel log, audit config, immutable flags, MAC policy, suspend) are dropped from
# the bounding set, so neither systemd nor any unit can ever use them.
exec /usr/bin/setpriv \
    --bounding-set=-sys_module,-sys_time,-sys_boot,-sys_rawio,-syslog,-wake_alarm,-block_suspend,-mac_admin,-mac_override,-sys_pacct,-audit_control,-audit_read,-linux_immutable \
    /usr/bin/env -i \
    container="$AEA_NAME" \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    /lib/systemd/systemd --system --unit=aea-host.target --log-target=journal --show-status=no
