#!/usr/bin/env bash
# Installs what building and testing imgstore needs on Debian, when missing:
# clang/libclang (RocksDB's bindings), a C++ compiler, e2fsprogs and xorriso
# (test images), libnbd-bin and qemu-utils (NBD clients the serve tests
# drive; qemu-img and qemu-storage-daemon read and write VM image formats,
# qemu-nbd serves the NBD source tests), setpriv (util-linux: the QEMU
# daemon dies with imgstore), curl (hostile requests to the server). Safe to run repeatedly; does nothing when all is present.
set -euo pipefail
need=()
command -v clang >/dev/null 2>&1 || need+=(clang)
ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || need+=(libclang-dev)
command -v g++ >/dev/null 2>&1 || need+=(g++)
command -v make >/dev/null 2>&1 || need+=(make)
command -v mkfs.ext4 >/dev/null 2>&1 || need+=(e2fsprogs)
command -v xorriso >/dev/null 2>&1 || need+=(xorriso)
command -v nbdinfo >/dev/null 2>&1 || need+=(libnbd-bin)
command -v qemu-img >/dev/null 2>&1 || need+=(qemu-utils)
command -v qemu-storage-daemon >/dev/null 2>&1 || need+=(qemu-utils)
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)
command -v groff >/dev/null 2>&1 || need+=(groff-base)
command -v script >/dev/null 2>&1 || need+=(bsdutils)
command -v losetup >/dev/null 2>&1 || need+=(mount)
command -v curl >/dev/null 2>&1 || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}" >&2
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null 2>&1 || { echo "cargo not found: install Rust from https://rustup.rs" >&2; exit 1; }
