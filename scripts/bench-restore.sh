#!/usr/bin/env bash
# Every read path against cp, on the shared workload, in one run (#18):
#
#   scripts/bench-restore.sh BIN [IMAGE_DIR] [WORK_DIR]
#
# A repository with disk-0 .. disk-3, then for the snapshot of disk-3, page
# cache dropped before each step, /usr/bin/time for wall, CPU and peak RSS:
# restore to a file (ends with fsync), restore to tmpfs, verify, NBD
# (serve + nbdcopy to a file), FUSE (mount + cp --sparse=always to a
# file), cp --sparse=always of the image, cp then sync; and a delta
# restore of disk-3 onto a copy of disk-2 next to its floor (reading the
# target cold + writing the bytes that differ, durably).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:?BIN}
IMG=${2:-/var/tmp/imgstore-bench/images}
WORK=${3:-/var/tmp/imgstore-bench/restore}
if [ ! -f "$IMG/disk-3.img" ]; then
    bash ../shared/workload/make-images.sh "$IMG" 2G >/dev/null
fi
rm -rf "$WORK"; mkdir -p "$WORK"
R="$WORK/repo"
"$BIN" -r "$R" init -q
for g in 0 1 2 3; do "$BIN" -r "$R" -q backup "$IMG/disk-$g.img" --name disk >/dev/null; done
ID=$("$BIN" -r "$R" snapshots --json --name disk | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["id"])')
SHM=/dev/shm/imgstore-bench-$$
cleanup() { rm -f "$SHM"; fusermount3 -u "$WORK/mnt" 2>/dev/null || true; kill "${SRV:-0}" 2>/dev/null || true; }
trap cleanup EXIT
drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }
row() { # row LABEL CMD... : one line "label wall user sys maxrss_kib"
    local label=$1; shift
    drop
    /usr/bin/time -f "%e %U %S %M" -o "$WORK/t" "$@" > /dev/null 2> "$WORK/err" ||
        { echo "$label failed:"; cat "$WORK/err"; exit 1; }
    read -r wall user sys rss < "$WORK/t"
    printf '%-34s %7.2f s  cpu %5.2f s  (%.2f cores)  rss %4d MiB\n' "$label" "$wall" \
        "$(echo "$user + $sys" | bc)" "$(echo "($user + $sys) / $wall" | bc -l)" "$((rss / 1024))"
}
rm -f "$WORK/a.img"
row "cp --sparse=always" cp --sparse=always "$IMG/disk-3.img" "$WORK/a.img"
rm -f "$WORK/a.img"
row "cp --sparse=always; sync" sh -c "cp --sparse=always '$IMG/disk-3.img' '$WORK/a.img' && sync"
rm -f "$WORK/a.img"
row "restore to a file (fsync)" "$BIN" -r "$R" --no-progress restore "$ID" "$WORK/a.img"
cmp "$WORK/a.img" "$IMG/disk-3.img"
row "restore to tmpfs" "$BIN" -r "$R" --no-progress restore "$ID" "$SHM"
rm -f "$SHM"
row "verify" "$BIN" -r "$R" --no-progress verify "$ID"
# NBD: the server is started with a cold cache, nbdcopy timed.
drop
"$BIN" -r "$R" serve "$ID" --socket "$WORK/nbd.sock" 2>/dev/null & SRV=$!
for _ in $(seq 200); do [ -S "$WORK/nbd.sock" ] && break; sleep 0.05; done
rm -f "$WORK/n.img"
row "serve + nbdcopy to a file" nbdcopy "nbd+unix:///?socket=$WORK/nbd.sock" "$WORK/n.img"
kill $SRV; wait $SRV 2>/dev/null || true; SRV=
cmp "$WORK/n.img" "$IMG/disk-3.img"
mkdir -p "$WORK/mnt"
"$BIN" -r "$R" mount "$WORK/mnt" "$ID" 2>/dev/null & SRV=$!
for _ in $(seq 200); do [ -d "$WORK/mnt/by-id" ] && break; sleep 0.05; done
F=$(ls "$WORK/mnt/by-id/"*)
rm -f "$WORK/f.img"
row "mount + cp --sparse=always" cp --sparse=always "$F" "$WORK/f.img"
fusermount3 -u "$WORK/mnt"; wait $SRV 2>/dev/null || true; SRV=
cmp "$WORK/f.img" "$IMG/disk-3.img"
# Delta restore onto the previous generation, and its floor.
cp --sparse=always "$IMG/disk-2.img" "$WORK/d.img"; sync
drop
"$BIN" -r "$R" --no-progress restore "$ID" --delta "$WORK/d.img" 2> "$WORK/delta.txt" >/dev/null
cmp "$WORK/d.img" "$IMG/disk-3.img"
cat "$WORK/delta.txt"
cp --sparse=always "$IMG/disk-2.img" "$WORK/d.img"; sync
row "delta restore onto disk-2" "$BIN" -r "$R" --no-progress restore "$ID" --delta "$WORK/d.img"
row "floor: read the target (cat)" sh -c "cat '$WORK/d.img' > /dev/null"
DIFF=$(python3 - "$IMG/disk-2.img" "$IMG/disk-3.img" <<'PY'
import sys
a, b = open(sys.argv[1], 'rb'), open(sys.argv[2], 'rb')
n = 0
while True:
    x, y = a.read(1 << 20), b.read(1 << 20)
    if not x and not y: break
    for i in range(0, max(len(x), len(y)), 4096):
        if x[i:i+4096] != y[i:i+4096]: n += 4096
print(n)
PY
)
echo "bytes differing (4 KiB blocks): $DIFF"
row "floor: write that many bytes + fsync" dd if=/dev/urandom of="$WORK/w.img" bs=4096 count=$((DIFF / 4096)) conv=fsync status=none
