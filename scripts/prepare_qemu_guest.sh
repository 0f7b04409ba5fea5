#!/usr/bin/env bash
# Prepare the arm64 guest the QEMU tests boot (tests/qemu/, docs/qemu.md): Debian's arm64 kernel
# (linux-image-arm64) and a busybox initramfs (busybox-static:arm64) holding the virtio_pci and
# virtio_mem modules with their dependencies (from the kernel's modules.dep).
#
# Output, in $TAGSTORE_QEMU_GUEST_DIR (default ~/.cache/tagstore/qemu-guest): vmlinuz, initrd.img
# and kernel-release. Done once: a complete directory is left alone. Needs root (apt-get, dpkg).
set -euo pipefail

OUT="${TAGSTORE_QEMU_GUEST_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tagstore/qemu-guest}"
MODULES=(virtio_pci virtio_mem)

if [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/initrd.img" ] && [ -s "$OUT/kernel-release" ]; then
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    dpkg --add-architecture arm64
fi
apt-get update
if ! command -v cpio >/dev/null; then
    apt-get install -y --no-install-recommends cpio
fi

WORK="$(mktemp -d)"
chmod 755 "$WORK"  # apt-get download runs as _apt where it can
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

# linux-image-arm64 is a metapackage: download the versioned image package it depends on.
image_pkg="$(apt-cache depends linux-image-arm64:arm64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
image_pkg="${image_pkg%:arm64}"
if [ -z "$image_pkg" ]; then
    echo "prepare_qemu_guest: cannot find the kernel package behind linux-image-arm64:arm64" >&2
    exit 1
fi
apt-get download "${image_pkg}:arm64" busybox-static:arm64
dpkg -x linux-image-*_arm64.deb kernel
dpkg -x busybox-static_*_arm64.deb busybox

release="$(ls kernel/lib/modules | head -n1)"
moddir="kernel/lib/modules/$release"

# The modules to load, dependencies first. The package ships no modules.dep (depmod makes it at
# install time), so dependencies come from each module's own `depends=` (its .modinfo section,
# what depmod reads too); modules listed in modules.builtin need no loading.
mapfile -t ordered < <(python3 - "$moddir" "${MODULES[@]}" <<'PY'
import re, sys
from pathlib import Path

moddir, wanted = Path(sys.argv[1]), sys.argv[2:]
def norm(name: str) -> str:
    return name.replace("-", "_")
files = {norm(p.name.split(".ko")[0]): p for p in (moddir / "kernel").rglob("*.ko*")}
builtin = {norm(Path(line).name.split(".ko")[0])
           for line in (moddir / "modules.builtin").read_text().split()}
order: list[str] = []
def add(name: str) -> None:
    name = norm(name)
    if name in builtin or any(p == files.get(name) for p in order):
        return
    if name not in files:
        sys.exit(f"prepare_qemu_guest: module {name} is neither built in nor shipped")
    path = files[name]
    data = path.read_bytes()
    if path.suffix != ".ko":
        sys.exit(f"prepare_qemu_guest: compressed module {path.name} is not supported")
    match = re.search(rb"\0depends=([^\0]*)\0", data)
    for dep in (match.group(1).decode().split(",") if match else []):
        if dep:
            add(dep)
    order.append(path)
for name in wanted:
    add(name)
for path in order:
    print(path.relative_to(moddir))
PY
)

mkdir -p initramfs/bin initramfs/lib/modules initramfs/proc initramfs/sys initramfs/dev
cp busybox/bin/busybox initramfs/bin/busybox
for p in "${ordered[@]:-}"; do
    [ -n "$p" ] || continue
    f="${p##*/}"
    cp "$moddir/$p" "initramfs/lib/modules/$f"
    echo "$f" >>initramfs/lib/modules/load-order
done

# The guest: load the modules, let virtio-mem memory come online movable (kernel command line
# memhp_default_state=online_movable), report, and idle. /proc/cpuinfo shows whether MTE is on.
cat >initramfs/init <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
if [ -f /lib/modules/load-order ]; then
    while read -r m; do insmod "/lib/modules/$m" || echo "guest: insmod $m failed"; done \
        </lib/modules/load-order
fi
grep -q ' mte' /proc/cpuinfo && echo "guest: MTE present" || echo "guest: MTE absent"
echo "guest: ready"
while true; do sleep 3600; done
INIT
chmod +x initramfs/init
(cd initramfs && find . | cpio -o -H newc --quiet | gzip -1) >initrd.img

mkdir -p "$OUT"
cp kernel/boot/vmlinuz-"$release" "$OUT/vmlinuz.tmp"
cp initrd.img "$OUT/initrd.img.tmp"
mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
mv "$OUT/initrd.img.tmp" "$OUT/initrd.img"
echo "$release" >"$OUT/kernel-release"
echo "prepare_qemu_guest: $image_pkg ($release) + busybox in $OUT; modules: ${ordered[*]:-none}"
