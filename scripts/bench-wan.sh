#!/usr/bin/env bash
# Issue #27's table: a repository reached through an emulated WAN link
# (imgstore-shaper: one-way latency as a timestamped queue, optional
# throughput cap), on the shared workload.
#
#   scripts/bench-wan.sh "BIN..." SHAPER [IMAGE_DIR] [WORK_DIR]
#
# BIN is the imgstore binary, or several (quoted, space-separated: say a
# before and an after binary), measured one after the other on each link
# so that a busy machine's noise falls on both; SHAPER is the
# imgstore-shaper binary (`cargo build --release -p imgstore-shaper`). For
# each link in LINKS
# (default "0ms 50ms 150ms 0ms@200mbit 50ms@200mbit 150ms@200mbit": RTT,
# and a cap on both directions), a fresh repository:
#   backup  the four generations disk-0 .. disk-3 (seconds, summed),
#   restore the last (seconds),
# with the bytes the link carried up during the backups and down during the
# restore (TLS included, counted by the shaper), and with a cap, the link's
# floor (bytes ÷ rate) and the ratio to it. TARGET=server (default) serves
# the repository with `imgstore server`; TARGET=bucket keeps it in a local
# Garage behind the link (the index local, the pack cache off so that the
# restore reads the bucket). Before each step the client's side is made
# cold: the images, the imgstore binary, its state and cache directories,
# and a bucket-backed repository's local index (`evict`: their pages only).
# The server (or Garage) stands for another machine, a long-running
# process whose code and hot data stay in memory: dropping the whole page
# cache measured its page faults instead (the first request of each backup
# took 0.25–0.43 s in the server), not the link. COLD=all drops the whole
# page cache before each step, as before.
#
# The server's request log is analysed per link into $WORK/requests-LINK.txt
# (requests per path, bytes per request, time in the handler, requests in
# flight), scripts/wan-requests.py.
set -euo pipefail
cd "$(dirname "$0")/.."
BINS=()
for b in ${1:?BIN}; do BINS+=("$(realpath "$b")"); done
SHAPER=$(realpath "${2:?SHAPER}")
IMG=${3:-/var/tmp/imgstore-bench/images}
WORK=${4:-/var/tmp/imgstore-bench/wan}
LINKS=${LINKS:-0ms 50ms 150ms 0ms@200mbit 50ms@200mbit 150ms@200mbit}
TARGET=${TARGET:-server}
GARAGE=${GARAGE_BIN:-/var/tmp/garage/bin/garage}
mkdir -p "$WORK"
. scripts/bench-lib.sh
# Each fresh repository gets a fresh known-repositories record: a port
# reused by a later server would otherwise look like a replaced repository
# (exit 8).
export XDG_STATE_HOME="$WORK/state"
# And a fresh client cache (a server on a reused port is another
# repository; the cache would only be found out of date).
export XDG_CACHE_HOME="$WORK/cache"

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# wait_line FILE: waits (up to 10 s) until FILE has a line.
wait_line() { for _ in $(seq 100); do [ -s "$1" ] && return; sleep 0.1; done; echo "no output in $1"; exit 1; }

# rate_bytes 200mbit -> bytes per second.
rate_bytes() {
    python3 -c 'import re,sys
m=re.fullmatch(r"([0-9.]+)(mbit|gbit|kbit|[kmg]?)", sys.argv[1].lower())
n,u=float(m[1]),m[2]
print(int(n*{"":1,"k":1024,"m":1<<20,"g":1<<30,"kbit":125,"mbit":125e3,"gbit":125e6}[u]))' "$1"
}

# shaper_bytes COL: bytes forwarded so far (2 up, 3 down), after the
# shaper's next one-second line.
shaper_bytes() { sleep 1.1; tail -1 "$WORK/shaper.tsv" | cut -f"$1"; }

if [ "$TARGET" = bucket ]; then
    rm -rf "$WORK/garage"; mkdir -p "$WORK/garage"
    cat > "$WORK/garage/garage.toml" <<TOML
metadata_dir = "$WORK/garage/meta"
data_dir = "$WORK/garage/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:3981"
rpc_secret = "0000000000000000000000000000000000000000000000000000000000000001"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:3980"
root_domain = ".s3.garage.localhost"
TOML
    export AWS_ACCESS_KEY_ID=GK00000000000000000000bench
    export AWS_SECRET_ACCESS_KEY=0000000000000000000000000000000000000000000000000000000000000002
    GARAGE_DEFAULT_ACCESS_KEY=$AWS_ACCESS_KEY_ID GARAGE_DEFAULT_SECRET_KEY=$AWS_SECRET_ACCESS_KEY \
    GARAGE_DEFAULT_BUCKET=bench RUST_LOG=garage=warn \
        "$GARAGE" -c "$WORK/garage/garage.toml" server --single-node --default-bucket \
        > "$WORK/garage/log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 100); do "$GARAGE" -c "$WORK/garage/garage.toml" bucket info bench >/dev/null 2>&1 && break; sleep 0.2; done
fi

printf 'binary\ttarget\tlink\tbackup_s\tup_bytes\tbackup_floor_s\tbackup/floor\trestore_s\tdown_bytes\trestore_floor_s\trestore/floor\tfirst_s\tfirst_up_bytes\tfirst/floor\n'
round=0
for link in $LINKS; do
  for BIN in "${BINS[@]}"; do
    # A link may be listed twice (a second run): each run its own prefix.
    round=$((round + 1))
    name=$(basename "$BIN")
    rtt=${link%%@*}
    rate=; [ "$link" != "$rtt" ] && rate=${link#*@}
    tag=$name-${link//@/-}-$round
    R="$WORK/repo"; rm -rf "$R" "$WORK/shaper.tsv" "$WORK/out.img" "$WORK/admin.token" "$XDG_STATE_HOME" "$XDG_CACHE_HOME"
    shaper_args=(--rtt "$rtt" --stats "$WORK/shaper.tsv")
    [ -n "$rate" ] && shaper_args+=(--rate "$rate")
    if [ "$TARGET" = server ]; then
        "$BIN" -r "$R" init -q
        "$BIN" -r "$R" token add bench --role admin --output "$WORK/admin.token" 2>/dev/null
        rm -f "$WORK/server.out"
        "$BIN" -r "$R" server --listen 127.0.0.1:0 --log-format json > "$WORK/server.out" 2> "$WORK/server-$tag.log" &
        SRV=$!; PIDS+=($SRV)
        wait_line "$WORK/server.out"
        upstream=$(awk '{print $3}' "$WORK/server.out")
        export IMGSTORE_SERVER_FINGERPRINT=$(awk '{print $5}' "$WORK/server.out")
        export IMGSTORE_TOKEN_FILE="$WORK/admin.token"
    else
        upstream=127.0.0.1:3980
    fi
    rm -f "$WORK/shaper.out"
    "$SHAPER" --upstream "$upstream" "${shaper_args[@]}" > "$WORK/shaper.out" &
    SH=$!; PIDS+=($SH)
    wait_line "$WORK/shaper.out"
    via=$(awk '{print $2}' "$WORK/shaper.out")
    if [ "$TARGET" = server ]; then
        repo="imgstores://$via/"
    else
        repo="$R"
        "$BIN" -r "$R" init -q --storage "s3://bench/$tag-$$" --endpoint "http://$via" --region garage --cache-size 0
    fi
    if [ "${COLD:-client}" = all ]; then
        unset COLD_PATHS
    else
        COLD_PATHS="$IMG $BIN $XDG_STATE_HOME $XDG_CACHE_HOME"
        [ "$TARGET" = bucket ] && COLD_PATHS="$COLD_PATHS $R"
        export COLD_PATHS
    fi
    up0=$(shaper_bytes 2)
    tb=0
    for g in 0 1 2 3; do
        t=$(timed "$BIN" -r "$repo" --no-progress backup "$IMG/disk-$g.img" --name disk --json)
        tb=$(echo "$tb + $t" | bc)
        # The first backup alone: the one bound by the link (the others
        # read and hash 2 GiB to send a few MB).
        if [ "$g" = 0 ]; then t0=$t; up_first=$(( $(shaper_bytes 2) - up0 )); fi
    done
    up=$(( $(shaper_bytes 2) - up0 ))
    down0=$(shaper_bytes 3)
    tr=$(timed "$BIN" -r "$repo" --no-progress restore latest --name disk "$WORK/out.img")
    down=$(( $(shaper_bytes 3) - down0 ))
    cmp "$WORK/out.img" "$IMG/disk-3.img"
    rm -f "$WORK/out.img"
    if [ -n "$rate" ]; then
        r=$(rate_bytes "$rate")
        fb=$(echo "$up / $r" | bc -l); fr=$(echo "$down / $r" | bc -l)
        f0=$(echo "$up_first / $r" | bc -l)
        printf '%s\t%s\t%s\t%.1f\t%s\t%.1f\t%.2f\t%.1f\t%s\t%.1f\t%.2f\t%.1f\t%s\t%.2f\n' "$name" "$TARGET" "$link" "$tb" "$up" "$fb" \
            "$(echo "$tb / $fb" | bc -l)" "$tr" "$down" "$fr" "$(echo "$tr / $fr" | bc -l)" \
            "$t0" "$up_first" "$(echo "$t0 / $f0" | bc -l)"
    else
        printf '%s\t%s\t%s\t%.1f\t%s\t-\t-\t%.1f\t%s\t-\t-\t%.1f\t%s\t-\n' "$name" "$TARGET" "$link" "$tb" "$up" "$tr" "$down" "$t0" "$up_first"
    fi
    kill "$SH" 2>/dev/null || true
    if [ "$TARGET" = server ]; then
        kill "$SRV" 2>/dev/null || true
        wait "$SRV" 2>/dev/null || true
        python3 scripts/wan-requests.py "$WORK/server-$tag.log" > "$WORK/requests-$tag.txt"
    fi
    wait "$SH" 2>/dev/null || true
  done
done
