#!/usr/bin/env bash
# Make sure `qemu-system-aarch64` is installed (Debian package qemu-system-arm), then prepare the
# arm64 guest (kernel + busybox initramfs) in its cache directory, for the tests in tests/qemu/.
# Both steps do nothing when already done.
set -euo pipefail

if ! command -v qemu-system-aarch64 >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends qemu-system-arm
fi
command -v qemu-system-aarch64 >/dev/null

exec bash "$(dirname "$0")/prepare_qemu_guest.sh"
