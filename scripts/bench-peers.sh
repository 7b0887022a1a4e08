#!/usr/bin/env bash
# Side-by-side comparison of imgstore with borg, restic and casync on the
# same disk images, in one run, on this machine.
#
#   scripts/bench-peers.sh [IMAGE_DIR] [WORK_DIR]
#
# IMAGE_DIR holds disk-0.img .. disk-3.img and disk.iso, disk-b.iso (as made
# by ../shared/workload/make-images.sh; built there when missing, needs
# root). Installs the peers from Debian packages when missing. Backs up the
# four generations in turn, then the two ISOs, into one repository per tool;
# restores the last generation; prints one Markdown table (time, peak RSS,
# repository bytes) and the ratios imgstore is judged by.
set -euo pipefail
cd "$(dirname "$0")/.."
IMG=${1:-/var/tmp/imgstore-bench/images}
WORK=${2:-/var/tmp/imgstore-bench/work}
ONLY=${ONLY:-imgstore borg restic casync}
if [ ! -f "$IMG/disk-3.img" ]; then
    bash ../shared/workload/make-images.sh "$IMG" 2G >/dev/null
fi
need=()
for p in borg:borgbackup restic:restic casync:casync /usr/bin/time:time fio:fio; do
    command -v "${p%%:*}" >/dev/null 2>&1 || need+=("${p##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
scripts/setup.sh
cargo build --release --quiet
BIN="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys;print(json.load(sys.stdin)["target_directory"])')/release/imgstore"
rm -rf "$WORK"; mkdir -p "$WORK"
GENS="disk-0.img disk-1.img disk-2.img disk-3.img"
ISOS="disk.iso disk-b.iso"
RESULTS="$WORK/results.tsv"; : > "$RESULTS"

# run TOOL STEP CMD...: time and peak RSS of one command.
run() {
    local tool=$1 step=$2; shift 2
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
    local t0 t1 rss
    t0=$(date +%s.%N)
    /usr/bin/time -f '%M' -o "$WORK/rss" "$@" > "$WORK/out" 2> "$WORK/err" || { echo "$tool $step failed:"; cat "$WORK/err"; exit 1; }
    t1=$(date +%s.%N)
    rss=$(tail -n1 "$WORK/rss")
    printf '%s\t%s\t%.2f\t%s\n' "$tool" "$step" "$(echo "$t1 - $t0" | bc)" "$rss" >> "$RESULTS"
}
repo_bytes() { du -sb "$1" | cut -f1; }

export BORG_PASSPHRASE="" BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
export RESTIC_PASSWORD=bench

for tool in $ONLY; do
    R="$WORK/$tool-repo"
    case $tool in
    imgstore)
        "$BIN" -r "$R" init 2>/dev/null
        for g in $GENS; do run imgstore "backup $g" "$BIN" -r "$R" backup "$IMG/$g" --name disk; done
        echo -e "imgstore\trepo after gens\t$(repo_bytes "$R")" >> "$WORK/sizes.tsv"
        for i in $ISOS; do run imgstore "backup $i" "$BIN" -r "$R" backup "$IMG/$i" --name iso; done
        run imgstore "restore disk-3" "$BIN" -r "$R" restore latest --name disk "$WORK/r-imgstore.img"
        cmp "$IMG/disk-3.img" "$WORK/r-imgstore.img"; rm -f "$WORK/r-imgstore.img"
        ;;
    borg)
        borg init -e none "$R"
        for g in $GENS; do run borg "backup $g" borg create --compression zstd,3 "$R::$g" "$IMG/$g"; done
        echo -e "borg\trepo after gens\t$(repo_bytes "$R")" >> "$WORK/sizes.tsv"
        for i in $ISOS; do run borg "backup $i" borg create --compression zstd,3 "$R::$i" "$IMG/$i"; done
        mkdir -p "$WORK/borg-out"
        run borg "restore disk-3" sh -c "cd '$WORK/borg-out' && borg extract --sparse '$R::disk-3.img'"
        cmp "$IMG/disk-3.img" "$WORK/borg-out/${IMG#/}/disk-3.img"; rm -rf "$WORK/borg-out"
        ;;
    restic)
        restic init -r "$R" -q
        for g in $GENS; do run restic "backup $g" restic -r "$R" -q backup --host bench "$IMG/$g"; done
        echo -e "restic\trepo after gens\t$(repo_bytes "$R")" >> "$WORK/sizes.tsv"
        for i in $ISOS; do run restic "backup $i" restic -r "$R" -q backup --host bench "$IMG/$i"; done
        run restic "restore disk-3" restic -r "$R" -q restore latest --path "$IMG/disk-3.img" --target "$WORK/restic-out"
        cmp "$IMG/disk-3.img" "$WORK/restic-out/$IMG/disk-3.img"; rm -rf "$WORK/restic-out"
        ;;
    casync)
        mkdir -p "$R"
        for g in $GENS; do run casync "backup $g" casync make --store="$R/store" "$R/$g.caibx" "$IMG/$g"; done
        echo -e "casync\trepo after gens\t$(repo_bytes "$R")" >> "$WORK/sizes.tsv"
        for i in $ISOS; do run casync "backup $i" casync make --store="$R/store" "$R/$i.caibx" "$IMG/$i"; done
        run casync "restore disk-3" casync extract --store="$R/store" "$R/disk-3.img.caibx" "$WORK/r-casync.img"
        cmp "$IMG/disk-3.img" "$WORK/r-casync.img"; rm -f "$WORK/r-casync.img"
        ;;
    esac
    echo -e "$tool\trepo after all\t$(repo_bytes "$R")" >> "$WORK/sizes.tsv"
done
sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
t0=$(date +%s.%N); cp --sparse=always "$IMG/disk-3.img" "$WORK/cp.img"; t1=$(date +%s.%N); rm -f "$WORK/cp.img"
CP=$(echo "$t1 - $t0" | bc)
# The floor for any tool that reads every byte: the disk's direct-read time
# for the four generations (holes cost no I/O). `dd` keeps one 8 MiB
# request in flight, `fio` four (this disk has read up to 1.5x faster with
# four); per generation the faster of the two counts as the floor.
DD=0; FIO=0; FLOOR=0
for g in $GENS; do
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
    t0=$(date +%s.%N); dd if="$IMG/$g" of=/dev/null bs=8M iflag=direct status=none; t1=$(date +%s.%N)
    DD=$(echo "$DD + $t1 - $t0" | bc)
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
    ms=$(fio --name=floor --filename="$IMG/$g" --readonly --rw=read --bs=8M --iodepth=4 \
        --ioengine=libaio --direct=1 --output-format=json |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["jobs"][0]["read"]["runtime"])')
    FIO=$(echo "$FIO + $ms / 1000" | bc -l)
    FLOOR=$(echo "$FLOOR + $( (echo "$t1 - $t0"; echo "$ms / 1000") | bc -l | sort -g | head -n1)" | bc -l)
done

python3 - "$RESULTS" "$WORK/sizes.tsv" "$CP" "$FLOOR" "$DD" "$FIO" <<'PY'
import sys, collections, platform, os
rows=[l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
sizes=[l.rstrip("\n").split("\t") for l in open(sys.argv[2])]
cp=float(sys.argv[3]); floor=float(sys.argv[4]); dd=float(sys.argv[5]); fio=float(sys.argv[6])
t=collections.defaultdict(dict); rss=collections.defaultdict(int)
for tool,step,sec,kb in rows:
    t[tool][step]=float(sec); rss[tool]=max(rss[tool],int(kb))
sz=collections.defaultdict(dict)
for tool,what,b in sizes: sz[tool][what]=int(b)
tools=list(t)
gens=[s for s in next(iter(t.values())) if s.startswith("backup disk-") and s.endswith(".img")]
print(f"Machine: {os.cpu_count()} cores, {platform.machine()}, {platform.release()}\n")
print("| tool | " + " | ".join(gens) + " | backup 4 gens | ISOs | restore last | repo after gens | repo after all | peak RSS |")
print("|---|" + "---|"*(len(gens)+6))
tot={}
for tool in tools:
    g=sum(t[tool][s] for s in gens); tot[tool]=g
    isos=sum(v for s,v in t[tool].items() if s.endswith(".iso"))
    print(f"| {tool} | " + " | ".join(f"{t[tool][s]:.2f} s" for s in gens) +
          f" | {g:.2f} s | {isos:.2f} s | {t[tool]['restore disk-3']:.2f} s | {sz[tool].get('repo after gens',0)/1e6:.0f} MB | {sz[tool].get('repo after all',0)/1e6:.0f} MB | {rss[tool]/1024:.0f} MiB |")
print(f"\n`cp --sparse=always` of the last image: {cp:.2f} s; reading the 4 generations cold with direct I/O: {fio:.2f} s (`fio`, 4 × 8 MiB in flight), {dd:.2f} s (`dd bs=8M`, one at a time); floor (the faster per generation) {floor:.2f} s\n")
if "imgstore" in t:
    i=t["imgstore"]
    peers=[x for x in tools if x!="imgstore"]
    if "borg" in t: print(f"- backup of the 4 generations, borg / imgstore: {tot['borg']/tot['imgstore']:.1f}x (target >= 5x); borg / disk read floor: {tot['borg']/floor:.1f}x")
    print(f"- backup of the 4 generations / disk read floor: {tot['imgstore']/floor:.2f}x")
    if peers:
        best=min(peers,key=lambda x:t[x]['restore disk-3'])
        print(f"- restore, fastest peer ({best}) / imgstore: {t[best]['restore disk-3']/i['restore disk-3']:.1f}x (target >= 5x)")
        small=min(peers,key=lambda x:sz[x].get('repo after gens',1e18))
        print(f"- repository after the 4 generations, imgstore / smallest peer ({small}): {sz['imgstore']['repo after gens']/sz[small]['repo after gens']:.2f} (target <= 1)")
    print(f"- restore, imgstore / cp --sparse=always: {i['restore disk-3']/cp:.2f}x (target <= 2x)")
PY
