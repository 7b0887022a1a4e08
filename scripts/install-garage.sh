#!/usr/bin/env bash
# Installs Garage (the S3-compatible store the bucket tests run against) into
# /var/tmp/garage when it is missing: `cargo install` from the crate registry,
# about 15 minutes on 2 cores, once per machine. GARAGE_ROOT overrides where.
set -euo pipefail
root="${GARAGE_ROOT:-/var/tmp/garage}"
want="2.5.0"
bin="$root/bin/garage"
if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "$want"; then
    exit 0
fi
echo "installing garage $want into $root (about 15 minutes)" >&2
cargo install --locked garage --version "$want" --root "$root" \
    --target-dir "${GARAGE_TARGET_DIR:-/var/tmp/garage-build}" --quiet
"$bin" --version >/dev/null
