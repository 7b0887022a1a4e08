#!/usr/bin/env bash
# Changed-block backups from a managed qcow2 dirty bitmap (#28):
#
#   scripts/bench-bitmap.sh BIN [WORK_DIR] [RUNS] [EXTENTS]
#
# A 20 GiB qcow2 holding 4 GiB of random data (64 extents of 64 MiB,
# spread over the disk) is backed up once with `--bitmap bench` (a full
# read; the bitmap is added). Then RUNS times (default 3): EXTENTS extents
# of 10 MiB of new random data, inside the data, are rewritten with
# qemu-io (default 41: 410 MiB, 2% of the disk; 8 is 2% of the data), and
# the same state is backed up
#   - full:  a full re-read (`--parent` the previous snapshot: equal regions
#            are not chunked, but every byte is read and hashed),
#   - dirty: the dirty extents alone read by qemu-io (the floor),
#   - bitmap: `--bitmap bench` (only the dirty extents read; the rest
#            from the parent),
#   - store: the new bytes alone (the extents' data as one raw file),
#            backed up into a fresh repository: what storing them costs
#            whatever reads them, so store/full is the lowest ratio any
#            incremental backup of this change could reach.
# Both backups must give the same digest. Prints each run and the medians.
# COLD=1 drops the page cache before each timed step (needs root): a
# nightly job finds the image on disk, not in memory.
# Footprint: about 4 GiB image + 4.5 GiB repository; WORK_DIR is removed
# at the end.
set -euo pipefail
BIN=${1:?BIN}
WORK=${2:-/var/tmp/imgstore-bench-bitmap}
RUNS=${3:-3}
EXTENTS=${4:-41}
GIB=$((1 << 30)); MIB=$((1 << 20))
rm -rf "$WORK"; mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT
IMG=$WORK/vm.qcow2; REPO=$WORK/repo; RAW=$WORK/seed.raw
now() { date +%s.%N; }
cold() { if [ "${COLD:-0}" = 1 ]; then sync; echo 3 > /proc/sys/vm/drop_caches; fi; }
json() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }

echo "making a 20 GiB qcow2 with 4 GiB of random data ..."
truncate -s $((20 * GIB)) "$RAW"
for i in $(seq 0 63); do
  # 64 MiB at every 320 MiB
  openssl rand $((64 * MIB)) | dd of="$RAW" bs=4M seek=$((i * 80)) conv=notrunc status=none
done
qemu-img convert -O qcow2 "$RAW" "$IMG"; rm -f "$RAW"
"$BIN" -q -r "$REPO" init
t0=$(now); "$BIN" -q -r "$REPO" backup "$IMG" --name vm --bitmap bench >/dev/null; t1=$(now)
printf 'first backup (full read, bitmap added): %.2f s\n' "$(echo "$t1 - $t0" | bc)"

PIECE=$WORK/piece
printf '%-4s %10s %10s %10s %10s %12s %12s %12s\n' run full_s dirty_s bitmap_s store_s bitmap/full bitmap/dirty store/full
FULLS=(); DIRTYS=(); BITS=(); STORES=()
for r in $(seq 1 "$RUNS"); do
  # 41 extents of 10 MiB of fresh random data inside the data extents.
  CMDS=(); READS=()
  for j in $(seq 0 $((EXTENTS - 1))); do
    off=$(( (j % 64) * 320 * MIB + ((j * 7 + r * 13) % 54) * MIB ))
    openssl rand -out "$PIECE.$j" $((10 * MIB))
    CMDS+=(-c "write -s $PIECE.$j $off 10M"); READS+=(-c "read -q $off 10M")
  done
  qemu-io -f qcow2 "${CMDS[@]}" "$IMG" >/dev/null
  for j in $(seq 0 $((EXTENTS - 1))); do cat "$PIECE.$j"; done > "$WORK/new.raw"; rm -f "$PIECE".*
  prev=$("$BIN" -r "$REPO" snapshots --name vm --json | json "[-1]['id']")
  cold; t0=$(now)
  full=$("$BIN" -q -r "$REPO" backup "$IMG" --name reread --parent "$prev" --json)
  t1=$(now); cold; s1=$(now)
  qemu-io -f qcow2 -r "${READS[@]}" "$IMG" >/dev/null
  t2=$(now); cold; s2=$(now)
  inc=$("$BIN" -q -r "$REPO" backup "$IMG" --name vm --bitmap bench --json)
  t3=$(now)
  rm -rf "$WORK/floor"; "$BIN" -q -r "$WORK/floor" init; cold; s3=$(now)
  "$BIN" -q -r "$WORK/floor" backup "$WORK/new.raw" --name new >/dev/null
  t4=$(now); rm -rf "$WORK/floor" "$WORK/new.raw"
  [ "$(echo "$full" | json "['digest']")" = "$(echo "$inc" | json "['digest']")" ] \
    || { echo "digests differ"; exit 1; }
  [ "$(echo "$inc" | json "['bitmap']['read']")" != None ] || { echo "not incremental"; exit 1; }
  f=$(echo "$t1 - $t0" | bc); d=$(echo "$t2 - $s1" | bc); b=$(echo "$t3 - $s2" | bc); st=$(echo "$t4 - $s3" | bc)
  FULLS+=("$f"); DIRTYS+=("$d"); BITS+=("$b"); STORES+=("$st")
  printf '%-4s %10.2f %10.2f %10.2f %10.2f %12.3f %12.2f %12.3f   (read: full %s, bitmap %s bytes)\n' "$r" "$f" "$d" "$b" "$st" \
    "$(echo "$b / $f" | bc -l)" "$(echo "$b / $d" | bc -l)" "$(echo "$st / $f" | bc -l)" \
    "$(echo "$full" | json "['bytes_read']")" "$(echo "$inc" | json "['bytes_read']")"
done
med() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
f=$(med "${FULLS[@]}"); d=$(med "${DIRTYS[@]}"); b=$(med "${BITS[@]}"); st=$(med "${STORES[@]}")
printf 'median %8.2f %10.2f %10.2f %10.2f %12.3f %12.2f %12.3f\n' "$f" "$d" "$b" "$st" "$(echo "$b / $f" | bc -l)" "$(echo "$b / $d" | bc -l)" "$(echo "$st / $f" | bc -l)"
