#!/bin/sh
# Install the Debian packages py-hast's tests and demo need, only those missing.
# Called by `make test` and `make demo` (README's two commands) and by .ci/run.
set -eu

# command -> Debian package
need="losetup:util-linux nsenter:util-linux mkfs.ext4:e2fsprogs ip:iproute2
qemu-io:qemu-utils qemu-img:qemu-utils nbdinfo:libnbd-bin nbdcopy:libnbd-bin nbdfuse:libnbd-bin
fusermount3:fuse3 fio:fio nbdkit:nbdkit
dash:dash posh:posh shellcheck:shellcheck mandoc:mandoc bmake:bmake pgrep:procps objdump:binutils
aarch64-linux-gnu-gcc:gcc-aarch64-linux-gnu fuser:psmisc logger:bsdutils flock:util-linux
iptables:iptables tc:iproute2"

missing=""
for pair in $need; do
	cmd=${pair%%:*}
	pkg=${pair#*:}
	command -v "$cmd" >/dev/null 2>&1 || PATH="$PATH:/sbin:/usr/sbin" command -v "$cmd" >/dev/null 2>&1 \
		|| missing="$missing $pkg"
done
# shared libraries -> Debian package
for pair in liblzf.so.1:liblzf1; do
	lib=${pair%%:*}
	pkg=${pair#*:}
	ldconfig -p 2>/dev/null | grep -q "$lib" || missing="$missing $pkg"
done
# libfuse3 headers: pip builds pyfuse3 (the torture harness's EIO-injecting provider)
pkg-config --exists fuse3 2>/dev/null || missing="$missing libfuse3-dev pkg-config"
# nbdkit's python plugin: the pure-Python reference of the benchmark
nbdkit python --dump-plugin >/dev/null 2>&1 || missing="$missing nbdkit-plugin-python"
[ -z "$missing" ] && exit 0

if [ "$(id -u)" != 0 ]; then
	echo "sysdeps: missing packages:$missing (run as root, or install them)" >&2
	exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing >/dev/null
