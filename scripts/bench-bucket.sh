#!/usr/bin/env bash
# A bucket-backed repository (a local single-node Garage on loopback)
# against a local repository, on the shared workload: backup and restore
# times, requests per GiB, pack size, and local cache size against hit rate.
#
#   scripts/bench-bucket.sh BIN [IMAGE_DIR] [WORK_DIR]
#
# GARAGE_BIN names Garage (default /var/tmp/garage/bin/garage, installed by
# scripts/install-garage.sh). Page cache dropped before each timed step.
# Garage shares the 2 cores with imgstore, as a local MinIO would.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$(realpath "${1:?BIN}")
IMG=${2:-/var/tmp/imgstore-bench/images}
WORK=${3:-/var/tmp/imgstore-bench/bucket}
GARAGE=${GARAGE_BIN:-/var/tmp/garage/bin/garage}
if [ ! -f "$IMG/disk-3.img" ]; then
    bash ../shared/workload/make-images.sh "$IMG" 2G >/dev/null
fi
rm -rf "$WORK"; mkdir -p "$WORK/garage"
cat > "$WORK/garage/garage.toml" <<TOML
metadata_dir = "$WORK/garage/meta"
data_dir = "$WORK/garage/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:3961"
rpc_secret = "0000000000000000000000000000000000000000000000000000000000000001"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:3960"
root_domain = ".s3.garage.localhost"
TOML
export AWS_ACCESS_KEY_ID=GK00000000000000000000bench
export AWS_SECRET_ACCESS_KEY=0000000000000000000000000000000000000000000000000000000000000002
export AWS_ENDPOINT_URL=http://127.0.0.1:3960 AWS_REGION=garage
GARAGE_DEFAULT_ACCESS_KEY=$AWS_ACCESS_KEY_ID GARAGE_DEFAULT_SECRET_KEY=$AWS_SECRET_ACCESS_KEY \
GARAGE_DEFAULT_BUCKET=bench RUST_LOG=garage=warn \
    "$GARAGE" -c "$WORK/garage/garage.toml" server --single-node --default-bucket \
    > "$WORK/garage/log" 2>&1 &
GPID=$!
trap 'kill $GPID 2>/dev/null || true' EXIT
for _ in $(seq 100); do "$GARAGE" -c "$WORK/garage/garage.toml" bucket info bench >/dev/null 2>&1 && break; sleep 0.2; done

. scripts/bench-lib.sh
field() { python3 -c 'import json,sys
v=json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
for k in sys.argv[2].split("."): v=v[k]
print(v)' "$WORK/last" "$1"; }

echo "## local repository"
L="$WORK/local"; "$BIN" -r "$L" init -q
printf 'generation\tbackup_s\n'
for g in 0 1 2 3; do
    t=$(timed "$BIN" -r "$L" --no-progress backup "$IMG/disk-$g.img" --name disk --json)
    printf 'disk-%s\t%.2f\n' "$g" "$t"
done
tl=$(timed "$BIN" -r "$L" --no-progress restore latest --name disk "$WORK/l.img")
printf 'restore disk-3\t%.2f\n' "$tl"
rm -f "$WORK/l.img"

# SPECS: pack size:cache size pairs to measure.
for spec in ${SPECS:-16M:1G 32M:1G 64M:1G 32M:0 32M:256M}; do
    pack=${spec%%:*}; cache=${spec##*:}
    R="$WORK/b-$pack-$cache"
    echo "## bucket, pack size $pack, cache $cache"
    "$BIN" -r "$R" init -q --storage "s3://bench/p$pack-c$cache" --pack-size "$pack" --cache-size "$cache"
    printf 'generation\tbackup_s\tPUTs\tnew_bytes\tPUTs_per_GiB_new\n'
    for g in 0 1 2 3; do
        t=$(timed "$BIN" -r "$R" --no-progress backup "$IMG/disk-$g.img" --name disk --json)
        puts=$(field bucket.puts); nb=$(field new_bytes)
        printf 'disk-%s\t%.2f\t%s\t%s\t%.1f\n' "$g" "$t" "$puts" "$nb" \
            "$(echo "$puts / ($nb / 1073741824)" | bc -l)"
    done
    t=$(timed "$BIN" -r "$R" --no-progress restore latest --name disk "$WORK/r.img" --json)
    gets=$(field bucket.gets); down=$(field bucket.bytes_down); data=$(field data_bytes)
    hits=$(field bucket.cache_hits); miss=$(field bucket.cache_misses)
    printf 'restore disk-3\t%.2f s\tGETs %s\tdown %s\tdata %s\tGETs/GiB %.1f\tcache hit rate %.3f\n' \
        "$t" "$gets" "$down" "$data" "$(echo "$gets / ($data / 1073741824)" | bc -l)" \
        "$(echo "$hits / ($hits + $miss + 0.000001)" | bc -l)"
    cmp "$WORK/r.img" "$IMG/disk-3.img"
    rm -f "$WORK/r.img"
done
rm -f "$WORK/c.img"
tc=$(timed cp --sparse=always "$IMG/disk-3.img" "$WORK/c.img")
printf 'cp --sparse=always disk-3\t%.2f\n' "$tc"
rm -f "$WORK/c.img"
