#!/usr/bin/env bash
# A repository server on loopback TLS against the same repository kept
# locally, on the shared workload: what a backup sends, and what the
# network path costs in time.
#
#   scripts/bench-server.sh BIN [IMAGE_DIR] [WORK_DIR]
#
# For each generation disk-0 .. disk-3 (page cache dropped before each
# step): local backup time, remote backup time, bytes the server received
# for the remote backup (its /metrics counter: every request body, ids,
# recipes, pages, frames), and bytes the generation added to the
# repository (the backup's new_bytes: new chunk frames, recipes, pages).
# Then restore of disk-3, local and remote, and cp --sparse=always.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:?BIN}
IMG=${2:-/var/tmp/imgstore-bench/images}
WORK=${3:-/var/tmp/imgstore-bench/server}
if [ ! -f "$IMG/disk-3.img" ]; then
    bash ../shared/workload/make-images.sh "$IMG" 2G >/dev/null
fi
rm -rf "$WORK"; mkdir -p "$WORK"
L="$WORK/local"; S="$WORK/served"
"$BIN" -r "$L" init -q
"$BIN" -r "$S" init -q
"$BIN" -r "$S" token add bench --role admin --output "$WORK/admin.token" 2>/dev/null
"$BIN" -r "$S" server --listen 127.0.0.1:0 --log-format text > "$WORK/server.out" 2> "$WORK/server.log" &
SRV=$!
trap 'kill $SRV 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -s "$WORK/server.out" ] && break; sleep 0.1; done
ADDR=$(awk '{print $3}' "$WORK/server.out")
export IMGSTORE_SERVER_FINGERPRINT=$(awk '{print $5}' "$WORK/server.out")
export IMGSTORE_TOKEN_FILE="$WORK/admin.token"
R="imgstores://$ADDR/"
received() {
    curl -sk -H "Authorization: Bearer $(cat "$WORK/admin.token")" "https://$ADDR/metrics" |
        awk '/^imgstore_received_bytes_total/ {print $2}'
}
. scripts/bench-lib.sh
printf 'generation\tlocal_s\tremote_s\tsent_bytes\tadded_bytes\tsent/added\n'
for g in 0 1 2 3; do
    tl=$(timed "$BIN" -r "$L" --no-progress backup "$IMG/disk-$g.img" --name disk --json)
    before=$(received)
    tr=$(timed "$BIN" -r "$R" --no-progress backup "$IMG/disk-$g.img" --name disk --json)
    after=$(received)
    added=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["new_bytes"])' "$WORK/last")
    sent=$((after - before))
    printf 'disk-%s\t%.2f\t%.2f\t%s\t%s\t%.3f\n' "$g" "$tl" "$tr" "$sent" "$added" \
        "$(echo "$sent / $added" | bc -l)"
done
rl=$(timed "$BIN" -r "$L" --no-progress restore latest --name disk "$WORK/l.img")
rr=$(timed "$BIN" -r "$R" --no-progress restore latest --name disk "$WORK/r.img")
rm -f "$WORK/c.img"
cp_s=$(timed cp --sparse=always "$IMG/disk-3.img" "$WORK/c.img")
cmp "$WORK/r.img" "$IMG/disk-3.img"
printf 'restore disk-3: local %.2f s, remote %.2f s, cp --sparse=always %.2f s\n' "$rl" "$rr" "$cp_s"
