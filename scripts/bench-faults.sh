#!/usr/bin/env bash
# How a backup through `imgstore server` rides out faults (#27), on the
# shared workload's disk-0 (2 GiB image, about 290 MB to send):
#
#   scripts/bench-faults.sh BIN [IMAGE_DIR] [WORK_DIR] [RATE]
#
# 1. reference: a full backup of disk-0 into a fresh served repository
#    through imgstore-shaper capped at RATE (default 10M = 10 MiB/s):
#    bytes the server received (its /metrics counter) and time;
# 2. interrupted: the same into a fresh served repository through the
#    same cap, the client killed (-9) once the link carried 80% of the
#    reference's bytes; then the backup run again (no cap): bytes
#    received and time of that run;
# 3. restart: the same through the cap, the server killed (-9) once the
#    link carried 50% of the reference's bytes and restarted 1 s later,
#    once without and once with a gc right after the restart: the
#    backup's total time, and bytes the restarted server received.
# Every snapshot is restored and compared, and checked with --read-data.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:?BIN}
IMG=${2:-/var/tmp/imgstore-bench/images}
WORK=${3:-/var/tmp/imgstore-bench/faults}
RATE=${4:-10M}
SHAPER="$(dirname "$BIN")/imgstore-shaper"
[ -x "$SHAPER" ] || { echo "no $SHAPER: cargo build --release -p imgstore-shaper"; exit 1; }
rm -rf "$WORK"; mkdir -p "$WORK"
. scripts/bench-lib.sh
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done' EXIT

# serve REPO [ADDR]: starts the server of REPO (a fresh one when not
# initialised yet); sets SRV (pid) and ADDR.
serve() {
    local repo=$1 listen=${2:-127.0.0.1:0}
    if [ ! -f "$repo/imgstore.json" ]; then
        "$BIN" -r "$repo" init -q
        "$BIN" -r "$repo" token add bench --role admin --output "$repo.token" 2>/dev/null
    fi
    export IMGSTORE_TOKEN_FILE="$repo.token"
    rm -f "$WORK/server.out"
    "$BIN" -r "$repo" server --listen "$listen" > "$WORK/server.out" 2>> "$WORK/server.log" &
    SRV=$!
    PIDS+=("$SRV")
    for _ in $(seq 100); do [ -s "$WORK/server.out" ] && break; sleep 0.1; done
    ADDR=$(awk '{print $3}' "$WORK/server.out")
    export IMGSTORE_SERVER_FINGERPRINT=$(awk '{print $5}' "$WORK/server.out")
}
received() {
    curl -sk -H "Authorization: Bearer $(cat "$IMGSTORE_TOKEN_FILE")" "https://$ADDR/metrics" |
        awk '/^imgstore_received_bytes_total/ {print $2}'
}
# shape: starts imgstore-shaper towards ADDR capped at RATE; sets SHP, LINK.
shape() {
    rm -f "$WORK/shaper.out" "$WORK/stats.tsv"
    "$SHAPER" --upstream "$ADDR" --rate "$RATE" --stats "$WORK/stats.tsv" > "$WORK/shaper.out" &
    SHP=$!
    PIDS+=("$SHP")
    for _ in $(seq 100); do [ -s "$WORK/shaper.out" ] && break; sleep 0.1; done
    LINK=$(awk '{print $2}' "$WORK/shaper.out")
}
# carried N: waits (at most 10 minutes) until the link carried N bytes up.
carried() {
    for _ in $(seq 3000); do
        [ "$(tail -n1 "$WORK/stats.tsv" 2>/dev/null | cut -f2)" -ge "$1" ] 2>/dev/null && return 0
        sleep 0.2
    done
    echo "the link never carried $1 bytes"; exit 1
}
export IMGSTORE_STATE_DIR="$WORK/state"
backup() { "$BIN" -r "imgstores://$1/" --no-progress --retry-for 60s backup "$IMG/disk-0.img" --name disk --json; }
verify() {
    "$BIN" -r "imgstores://$ADDR/" -q restore latest --name disk "$WORK/out.img" --force
    cmp "$WORK/out.img" "$IMG/disk-0.img"
    "$BIN" -r "imgstores://$ADDR/" --no-progress check --read-data > /dev/null
}

# 1. reference, through the same cap
serve "$WORK/ref"
shape
before=$(received)
t=$(timed backup "$LINK")
FULL=$(( $(received) - before ))
kill -9 "$SHP"
verify
printf 'reference: full backup of disk-0 through the %s cap sends %s bytes in %.2f s\n' "$RATE" "$FULL" "$t"
kill -9 "$SRV"

# 2. interrupted at 80%, run again
serve "$WORK/cut"
shape
drop
backup "$LINK" > /dev/null 2>&1 &
CLI=$!
carried $(( FULL * 8 / 10 ))
kill -9 "$CLI"; wait "$CLI" 2>/dev/null || true
kill -9 "$SHP"
cut_at=$(tail -n1 "$WORK/stats.tsv" | cut -f2)
before=$(received)
t=$(timed backup "$ADDR")
again=$(( $(received) - before ))
verify
printf 'interrupted: killed after %s bytes (%.0f%%); run again: %s bytes (%.1f%% of a full upload) in %.2f s\n' \
    "$cut_at" "$(echo "$cut_at * 100 / $FULL" | bc -l)" "$again" "$(echo "$again * 100 / $FULL" | bc -l)" "$t"
kill -9 "$SRV"

# 3. server killed at 50% and restarted, without and with a gc
for gc in 0 1; do
    serve "$WORK/restart-$gc"
    shape
    drop
    t0=$(date +%s.%N)
    backup "$LINK" > "$WORK/last" 2> "$WORK/err" &
    CLI=$!
    carried $(( FULL / 2 ))
    kill -9 "$SRV"; wait "$SRV" 2>/dev/null || true
    sleep 1
    serve "$WORK/restart-$gc" "$ADDR"
    [ "$gc" = 1 ] && "$BIN" -r "imgstores://$ADDR/" -q gc
    wait "$CLI" || { echo "the backup failed across the restart:"; cat "$WORK/err"; exit 1; }
    t1=$(date +%s.%N)
    after=$(received)
    kill -9 "$SHP"
    verify
    printf 'restart at 50%%%s: backup done in %.2f s; the restarted server received %s bytes (%.1f%% of a full upload)\n' \
        "$( [ "$gc" = 1 ] && echo ' + gc' )" "$(echo "$t1 - $t0" | bc)" "$after" "$(echo "$after * 100 / $FULL" | bc -l)"
    kill -9 "$SRV"
done
