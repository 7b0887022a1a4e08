#!/usr/bin/env bash
# First backups of thin-provisioned images: a 1 TiB sparse image holding
# 1 GiB of data (256 random 4 MiB extents), as #18 describes.
#
#   scripts/bench-thin.sh BIN [WORK_DIR] [VIRTUAL_GIB]
#
# Backs up image A into a fresh repository (its holes' chaining values are
# not cached yet), then image B (other extents and data, another name, so
# no parent) — the first backup of every later image; restores B and
# compares it. For reference, times zstd -3 -T2 over B's 1 GiB of data
# alone (what reading and compressing the data costs). Page cache dropped
# before each step; prints wall time and peak RSS.
set -euo pipefail
BIN=${1:?BIN}; WORK=${2:-/var/tmp/thin}; GIB=${3:-1024}
mkdir -p "$WORK"; rm -rf "$WORK/repo"
make_image() { # make_image PATH SEED: GIB GiB sparse, 256 x 4 MiB extents
    python3 - "$1" "$2" "$GIB" <<'PY'
import os, random, sys
path, seed, gib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
r = random.Random(seed)
size = gib << 30
slots = r.sample(range(size // (4 << 20)), 256)
with open(path, "wb") as f:
    f.truncate(size)
    for s in sorted(slots):
        f.seek(s * (4 << 20))
        f.write(r.randbytes(2 << 20) + bytes(r.randrange(256) for _ in range(1)) * (2 << 20))
PY
}
[ -f "$WORK/a.img" ] || make_image "$WORK/a.img" 1
[ -f "$WORK/b.img" ] || make_image "$WORK/b.img" 2
step() { # step LABEL CMD...
    local label=$1; shift
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
    local t0 t1; t0=$(date +%s.%N)
    /usr/bin/time -f '%M' -o "$WORK/rss" "$@" > /dev/null 2> "$WORK/err" || { cat "$WORK/err"; exit 1; }
    t1=$(date +%s.%N)
    printf '%-40s %8.2f s  %6d MiB\n' "$label" "$(echo "$t1 - $t0" | bc)" "$(( $(tail -n1 "$WORK/rss") / 1024 ))"
}
"$BIN" -r "$WORK/repo" init 2>/dev/null
step "backup a.img (cache cold)" "$BIN" -r "$WORK/repo" --no-progress backup "$WORK/a.img"
step "backup b.img (first backup, cache warm)" "$BIN" -r "$WORK/repo" --no-progress backup "$WORK/b.img"
# b.img's data alone, read and compressed (the floor the target is set by).
python3 - "$WORK/b.img" "$WORK/b-data.bin" <<'PY'
import os, sys
src, dst = sys.argv[1], sys.argv[2]
with open(src, "rb") as f, open(dst, "wb") as o:
    fd = f.fileno(); off = 0; end = os.fstat(fd).st_size
    while True:
        try: off = os.lseek(fd, off, os.SEEK_DATA)
        except OSError: break
        hole = os.lseek(fd, off, os.SEEK_HOLE)
        os.lseek(fd, off, 0); o.write(f.read(hole - off)); off = hole
PY
step "zstd -3 -T2 of b's 1 GiB of data" zstd -3 -T2 -q -c "$WORK/b-data.bin"
rm -f "$WORK/b-restored.img"
step "restore b.img" "$BIN" -r "$WORK/repo" --no-progress restore latest --name b.img "$WORK/b-restored.img"
# Compared where either file has data (cmp would read a TiB of holes).
python3 - "$WORK/b.img" "$WORK/b-restored.img" <<'PY'
import os, sys
def extents(path):
    fd = os.open(path, os.O_RDONLY); off = 0; out = []
    while True:
        try: off = os.lseek(fd, off, os.SEEK_DATA)
        except OSError: break
        hole = os.lseek(fd, off, os.SEEK_HOLE); out.append((off, hole)); off = hole
    os.close(fd); return out
a, b = sys.argv[1], sys.argv[2]
assert os.path.getsize(a) == os.path.getsize(b), "sizes differ"
with open(a, "rb") as fa, open(b, "rb") as fb:
    for lo, hi in sorted(set(extents(a) + extents(b))):
        fa.seek(lo); fb.seek(lo)
        assert fa.read(hi - lo) == fb.read(hi - lo), f"differ in {lo}..{hi}"
print("restored b.img is identical")
PY
rm -f "$WORK/b-restored.img" "$WORK/b-data.bin"
