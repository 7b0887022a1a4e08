#!/usr/bin/env bash
# The main job on a generated disk image: builds imgstore, makes a 1 GiB ext4
# image, backs up two generations of it into an encrypted repository, lists the snapshots, restores both
# and checks them byte for byte and as sparse files; then diffs them, makes a
# changed-block backup, delta-restores, and checks the repository. No root
# needed.
#   scripts/demo.sh [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release
BIN="${CARGO_TARGET_DIR:-target}/release/imgstore"
WORK=${1:-$(mktemp -d /var/tmp/imgstore-demo.XXXXXX)}
mkdir -p "$WORK"; rm -rf "$WORK/repo" "$WORK"/*.img "$WORK/tree"
export IMGSTORE_REPO="$WORK/repo"
# An encrypted repository: the passphrase from a file (mode 0600), as a
# nightly job would keep it.
printf 'demo passphrase, keep it safe\n' > "$WORK/passphrase"; chmod 600 "$WORK/passphrase"
export IMGSTORE_PASSWORD_FILE="$WORK/passphrase"

echo "== making a 1 GiB ext4 image from /usr/share in $WORK"
mkdir -p "$WORK/tree"
cp -a /usr/share/doc "$WORK/tree/" 2>/dev/null || true
cp -a /usr/lib/x86_64-linux-gnu "$WORK/tree/lib" 2>/dev/null || true
mkfs.ext4 -q -F -E root_owner=0:0 -d "$WORK/tree" "$WORK/disk.img" 1G
cp --sparse=always "$WORK/disk.img" "$WORK/gen0.img"

"$BIN" init --encryption
"$BIN" key list
"$BIN" backup "$WORK/disk.img" --name disk --tag gen0

echo "== changing the image in place (debugfs writes a file, removes another)"
head -c 20M /dev/urandom > "$WORK/new.bin"
printf 'write %s new.bin\nrm doc/adduser/copyright\n' "$WORK/new.bin" > "$WORK/edit.debugfs"
debugfs -w -f "$WORK/edit.debugfs" "$WORK/disk.img" >/dev/null 2>&1
cp --sparse=always "$WORK/disk.img" "$WORK/gen1.img"
"$BIN" backup "$WORK/disk.img" --name disk --tag gen1

"$BIN" snapshots
first=$("$BIN" snapshots --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')
"$BIN" restore "$first" "$WORK/restored0.img"
"$BIN" restore latest "$WORK/restored1.img"
cmp "$WORK/gen0.img" "$WORK/restored0.img"
cmp "$WORK/gen1.img" "$WORK/restored1.img"
echo "== restored images are byte-identical; allocated vs apparent size:"
du -h "$WORK/restored1.img"; du -h --apparent-size "$WORK/restored1.img"
du -sh "$WORK/repo"

echo "== what changed between the generations (from recipes), and a changed-block backup reading only that"
second=$("$BIN" snapshots --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[1]["id"])')
# diff exits like diff(1): 1 means the snapshots differ.
rc=0; "$BIN" diff "$first" "$second" > "$WORK/changes.txt" || rc=$?
[ "$rc" -eq 1 ] || { echo "diff: expected exit 1 (they differ), got $rc" >&2; exit 1; }
sed -n 2p "$WORK/changes.txt"
"$BIN" backup "$WORK/disk.img" --name disk --base "$first" --changed "$WORK/changes.txt" --tag changed-block

echo "== delta restore: turn a copy of generation 0 into generation 1, writing only what differs"
cp --sparse=always "$WORK/gen0.img" "$WORK/delta.img"
"$BIN" restore "$second" "$WORK/delta.img" --delta
cmp "$WORK/gen1.img" "$WORK/delta.img"

echo "== integrity: structure, reference counts and every chunk re-hashed"
"$BIN" check --read-data
"$BIN" verify --all
echo "demo OK (work dir: $WORK)"
