#!/usr/bin/env bash
# Before/after: two imgstore binaries on the same workload, alternated, so a
# change can show it costs nothing (or what it gains) on this noisy machine.
#
#   scripts/bench-ab.sh BIN_A BIN_B [IMAGE_DIR] [WORK_DIR] [ROUNDS]
#
# Per round and binary: a fresh repository, backups of disk-0 .. disk-3 in
# turn (page cache dropped before each), restore of disk-3 (cold), verify of
# it (cold). Prints per step the median over the rounds for A and B and the
# ratio B/A. IMAGE_DIR is made by ../shared/workload/make-images.sh when
# missing (needs root).
#
# INIT_A / INIT_B add arguments to each side's `init`, so one binary can be
# compared with itself across repository kinds, e.g. encrypted against plain:
#   IMGSTORE_PASSWORD=bench INIT_B=--encryption scripts/bench-ab.sh BIN BIN
set -euo pipefail
cd "$(dirname "$0")/.."
A=${1:?BIN_A}; B=${2:?BIN_B}
IMG=${3:-/var/tmp/imgstore-bench/images}
WORK=${4:-/var/tmp/imgstore-bench/ab}
ROUNDS=${5:-3}
if [ ! -f "$IMG/disk-3.img" ]; then
    bash ../shared/workload/make-images.sh "$IMG" 2G >/dev/null
fi
rm -rf "$WORK"; mkdir -p "$WORK"
OUT="$WORK/times.tsv"; : > "$OUT"

step() { # step LABEL BIN-LABEL CMD...
    local label=$1 who=$2; shift 2
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
    local t0 t1
    t0=$(date +%s.%N)
    "$@" > /dev/null 2> "$WORK/err" || { echo "$who $label failed:"; cat "$WORK/err"; exit 1; }
    t1=$(date +%s.%N)
    printf '%s\t%s\t%.3f\n' "$who" "$label" "$(echo "$t1 - $t0" | bc)" >> "$OUT"
}

for r in $(seq "$ROUNDS"); do
    for who in A B; do
        bin=$A; [ "$who" = B ] && bin=$B
        R="$WORK/repo-$who"; rm -rf "$R" "$WORK/r.img"
        args=${INIT_A:-}; [ "$who" = B ] && args=${INIT_B:-}
        # shellcheck disable=SC2086 # the arguments are words on purpose
        "$bin" -r "$R" init $args >/dev/null 2>&1
        for g in 0 1 2 3; do
            step "backup disk-$g" "$who" "$bin" -r "$R" --no-progress backup "$IMG/disk-$g.img" --name disk
        done
        step "restore disk-3" "$who" "$bin" -r "$R" --no-progress restore latest --name disk "$WORK/r.img"
        cmp "$WORK/r.img" "$IMG/disk-3.img"
        step "verify disk-3" "$who" "$bin" -r "$R" --no-progress verify latest --name disk
    done
done

python3 - "$OUT" "$ROUNDS" <<'EOF'
import sys, statistics, collections
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
t = collections.defaultdict(list)
order = []
for who, label, secs in rows:
    if label not in order:
        order.append(label)
    t[(who, label)].append(float(secs))
print(f"| step | A median (s) | B median (s) | B/A | A runs | B runs |")
print("|---|---|---|---|---|---|")
for label in order:
    a, b = t[("A", label)], t[("B", label)]
    ma, mb = statistics.median(a), statistics.median(b)
    fmt = lambda v: " ".join(f"{x:.2f}" for x in v)
    print(f"| {label} | {ma:.2f} | {mb:.2f} | {mb/ma:.2f} | {fmt(a)} | {fmt(b)} |")
EOF
