#!/usr/bin/env bash
# restore --live (instant recovery, #29) on the shared workload, one run:
#
#   scripts/bench-live.sh BIN [IMAGE] [WORK_DIR]
#
# A repository holding IMAGE (default disk-0), page cache dropped before
# each step. Prints: a plain restore's wall time; for restore --live into a
# file, the time from the command's start to the first 4 KiB read by a
# client (qemu-io; local repository and through `imgstore server`) and to
# "TARGET now holds the snapshot" (the background copy, ending with its
# fdatasync like the plain restore's fsync), with no client, with a client
# doing random 4 KiB reads and writes (qemu-io, 64 reads + 16 writes +
# flush per round, rounds back to back), and with a client reading the
# whole disk (nbdcopy); and a client's 4 KiB read latency on blocks not yet
# restored against blocks already in TARGET (qemu-io's per-request rate).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:?BIN}
IMG=${2:-/var/tmp/imgstore-bench/images/disk-0.img}
WORK=${3:-/var/tmp/imgstore-bench/live}
rm -rf "$WORK"; mkdir -p "$WORK"
R="$WORK/repo"
export IMGSTORE_STATE_DIR="$WORK/state"
"$BIN" -r "$R" init -q
"$BIN" -r "$R" -q backup "$IMG" --name disk >/dev/null
ID=$("$BIN" -r "$R" snapshots --json --name disk | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["id"])')
SIZE=$(stat -c %s "$IMG")
SOCK="$WORK/live.sock"
URI="nbd+unix:///?socket=$SOCK"
P=; SRV=
cleanup() { for p in $P $SRV; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }
now() { date +%s.%N; }

drop
t0=$(now)
"$BIN" -r "$R" --no-progress restore "$ID" "$WORK/plain.img"
PLAIN=$(echo "$(now) - $t0" | bc)
rm -f "$WORK/plain.img"
printf '%-52s %7.2f s\n' "plain restore to a file (fsync)" "$PLAIN"

# live LABEL CLIENT [REPO_ARGS...]: one live restore into a new file.
live() {
    local label=$1 client=$2; shift 2
    rm -f "$WORK/live.img" "$SOCK"; rm -rf "$IMGSTORE_STATE_DIR"
    drop
    local t0 tf td
    t0=$(now)
    "$BIN" "$@" --no-progress restore "$ID" "$WORK/live.img" --live --socket "$SOCK" 2> "$WORK/live.log" & P=$!
    while [ ! -S "$SOCK" ]; do sleep 0.002; done
    qemu-io -f raw "$URI" -c 'read 0 4096' > /dev/null
    tf=$(echo "$(now) - $t0" | bc)
    local rounds=0
    case $client in
    none) ;;
    nbdcopy) nbdcopy "$URI" null: ;;
    randrw)
        while ! grep -q "now holds" "$WORK/live.log" && [ $rounds -lt 500 ]; do
            python3 - "$SIZE" "$rounds" > "$WORK/cmds" <<'PY'
import random, sys
size, seed = int(sys.argv[1]), int(sys.argv[2])
r = random.Random(seed)
for i in range(80):
    off = r.randrange(size // 4096) * 4096
    print("-c", ("write -P 7 " if i % 5 == 4 else "read ") + f"{off} 4096")
print("-c", "flush")
PY
            mapfile -t args < <(sed 's/^-c //' "$WORK/cmds")
            cargs=(); for a in "${args[@]}"; do cargs+=(-c "$a"); done
            qemu-io -f raw "$URI" "${cargs[@]}" > /dev/null
            rounds=$((rounds + 1))
        done ;;
    esac
    while ! grep -q "now holds" "$WORK/live.log"; do sleep 0.01; done
    td=$(echo "$(now) - $t0" | bc)
    kill -TERM $P; wait $P; P=
    printf '%-52s first byte %5.3f s  copy done %7.2f s  (%.2fx plain)%s\n' "live restore, client: $label" "$tf" "$td" \
        "$(echo "$PLAIN / $td" | bc -l)" "$([ "$client" = randrw ] && echo "  $rounds rounds" || true)"
    if [ "$client" != randrw ]; then cmp "$WORK/live.img" "$IMG"; fi
}

live none none -r "$R"
live "random 4 KiB reads+writes" randrw -r "$R"
live "nbdcopy reading the whole disk" nbdcopy -r "$R"

# Through the server (loopback TLS).
"$BIN" -r "$R" token add bench --role admin --output "$WORK/bench.token" > /dev/null
"$BIN" -r "$R" server --listen 127.0.0.1:0 > "$WORK/server.out" 2> "$WORK/server.log" & SRV=$!
while [ ! -s "$WORK/server.out" ]; do sleep 0.05; done
read -r _ _ ADDR _ FP _ < "$WORK/server.out"
export IMGSTORE_SERVER_FINGERPRINT=$FP
live "none, repository through imgstore server" none -r "imgstores://$ADDR/" --token-file "$WORK/bench.token"
unset IMGSTORE_SERVER_FINGERPRINT
kill $SRV; wait $SRV 2>/dev/null || true; SRV=

# Latency: the copy stopped after its first region (the test-only pause),
# 200 reads of 4 KiB in distinct not-yet-restored blocks; then the same
# reads again, now of blocks in TARGET (cold page cache for both).
rm -f "$WORK/live.img" "$SOCK"; rm -rf "$IMGSTORE_STATE_DIR"
drop
IMGSTORE_LIVE_TEST_PAUSE_MS=600000 "$BIN" -r "$R" --no-progress restore "$ID" "$WORK/live.img" --live --socket "$SOCK" 2> "$WORK/live.log" & P=$!
while [ ! -S "$SOCK" ]; do sleep 0.01; done
sleep 1
lat() { # lat FIRST_BLOCK: mean ms per 4 KiB read over 200 distinct 64 KiB blocks from FIRST_BLOCK on
    local cargs=()
    for i in $(seq 0 199); do cargs+=(-c "read $(( ($1 + i * 37) * 65536 )) 4096"); done
    qemu-io -f raw "$URI" "${cargs[@]}" | python3 -c '
import re, sys
ops = [float(m) for m in re.findall(r"and ([0-9.]+) ops/sec", sys.stdin.read())]
print("%.3f ms (median %.3f ms, n=%d)" % (sum(1000 / o for o in ops) / len(ops), sorted(1000 / o for o in ops)[len(ops) // 2], len(ops)))'
}
drop
printf '%-52s %s\n' "4 KiB read, block not yet restored" "$(lat 256)"
drop
printf '%-52s %s\n' "4 KiB read, block already in TARGET" "$(lat 256)"
kill -TERM $P; wait $P 2>/dev/null || true; P=
