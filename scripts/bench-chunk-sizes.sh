#!/usr/bin/env bash
# Chunk-size trade-off on the shared workload: for each average chunk size,
# a fresh repository takes the four disk generations and the two ISOs, then
# the last generation is restored. Prints one Markdown table: backup and
# restore time, repository bytes, unique chunk bytes, metadata (recipes +
# index pages) and what it extrapolates to per TiB of unique data.
#
#   scripts/bench-chunk-sizes.sh [IMAGE_DIR] [WORK_DIR] [SIZES...]
set -euo pipefail
cd "$(dirname "$0")/.."
IMG=${1:-/var/tmp/imgstore-bench/images}
WORK=${2:-/var/tmp/imgstore-bench/chunks}
shift 2 2>/dev/null || true
SIZES=${*:-32K 64K 256K 1M}
[ -f "$IMG/disk-3.img" ] || bash ../shared/workload/make-images.sh "$IMG" 2G >/dev/null
scripts/setup.sh
cargo build --release --quiet
BIN="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys;print(json.load(sys.stdin)["target_directory"])')/release/imgstore"
drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }
echo "| average chunk | backup 4 gens + 2 ISOs | restore disk-3 | repository | unique chunk bytes | dedup ratio | metadata | metadata per TiB unique |"
echo "|---|---|---|---|---|---|---|---|"
for s in $SIZES; do
    R="$WORK/repo-$s"; rm -rf "$R"; mkdir -p "$WORK"
    "$BIN" -r "$R" init --chunk-size "$s" 2>/dev/null
    t=0
    for f in disk-0.img disk-1.img disk-2.img disk-3.img disk.iso disk-b.iso; do
        drop
        case $f in disk-*.img) n=disk;; *) n=$f;; esac
        secs=$("$BIN" -r "$R" --no-progress backup "$IMG/$f" --name "$n" --json | python3 -c 'import json,sys;print(json.load(sys.stdin)["seconds"])')
        t=$(python3 -c "print($t + $secs)")
    done
    drop; rm -f "$WORK/out.img"
    rt=$("$BIN" -r "$R" --no-progress restore latest --name disk "$WORK/out.img" --json | python3 -c 'import json,sys;print(json.load(sys.stdin)["seconds"])')
    cmp "$WORK/out.img" "$IMG/disk-3.img"; rm -f "$WORK/out.img"
    read -r uniq disk ratio recipe < <("$BIN" -r "$R" stats --json | python3 -c '
import json,sys
s=json.load(sys.stdin)
print(s["unique_chunk_bytes"], s["repository_disk_bytes"], s["dedup_ratio"], s["recipe_bytes"])')
    python3 - "$s" "$t" "$rt" "$disk" "$uniq" "$ratio" "$recipe" <<'PY'
import sys
s,t,rt,disk,uniq,ratio,recipe=sys.argv[1],float(sys.argv[2]),float(sys.argv[3]),int(sys.argv[4]),int(sys.argv[5]),float(sys.argv[6]),int(sys.argv[7])
mib=lambda b: f"{b/2**20:.1f} MiB"
print(f"| {s} | {t:.2f} s | {rt:.2f} s | {mib(disk)} | {mib(uniq)} | {ratio:.2f} | {mib(recipe)} | {recipe/uniq*2**40/2**30:.2f} GiB |")
PY
done
