#!/usr/bin/env bash
# README workflow 2a end to end against a running QEMU driven over QMP
# (a fleecing overlay for a point-in-time view, dirty bitmaps, an NBD
# export of the view):
#
#   scripts/qmp-workflow.sh BIN [SRC_DIR]
#
# Needs qemu-system-x86_64, qemu-img, mkfs.ext4, nbdinfo (libnbd-bin),
# python3. No KVM needed (TCG), no guest OS, no network: the "guest"
# writes are qemu-io commands through the monitor.
#
#   1. a 1 GiB qcow2 holding an ext4 made from SRC_DIR (default
#      /usr/share/doc), QEMU running on it (node disk0);
#   2. full backup: the view and bitmap bk-1 in one transaction,
#      `--checkpoint bk-1`; the guest writes during it (bk-1 gets them);
#   3. about 5% of the disk is written; QEMU is stopped ("stop") and the
#      disk copied to raw: the state the next backup must restore;
#   4. incremental backup: the README's commands (bk-2 added, bk-1
#      frozen, the view, bk-1 exported); the guest writes during it;
#      bytes_read must be bk-1's dirty bytes, the digest a full read's,
#      the restore the raw copy of step 3;
#   5. QEMU is restarted (the persistent bitmap bk-2 survives it), and an
#      incremental backup bk-2 -> bk-3 reads the writes made during step
#      4; QEMU quits, and the restore must equal `qemu-img convert -O raw`.
# Everything is made under a temporary directory and removed at the end.
# Exits non-zero on any mismatch.
set -euo pipefail
BIN=$(realpath "${1:?usage: $0 BIN [SRC_DIR]}")
SRC_DIR=${2:-/usr/share/doc}
for tool in qemu-system-x86_64 qemu-img mkfs.ext4 nbdinfo python3 cmp; do
  command -v "$tool" >/dev/null || { echo "$0: $tool is not installed" >&2; exit 1; }
done
WORK=$(mktemp -d /var/tmp/imgstore-qmp.XXXXXX)
IMG=$WORK/web01.qcow2
FLEECE=$WORK/web01-fleece.qcow2
QMP=$WORK/qmp.sock
NBD=$WORK/web01-nbd.sock
URI="nbd+unix:///web01?socket=$NBD"
export IMGSTORE_REPO=$WORK/repo

cleanup() {
  set +e
  [ -f "$WORK/qemu.pid" ] && kill "$(cat "$WORK/qemu.pid")" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

json() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
fail() { echo "FAIL: $*" >&2; exit 1; }
# QMP commands, one JSON each; fails on an error reply.
qmp() {
  python3 - "$QMP" "$@" <<'EOF'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw")
def reply():
    while True:
        m = json.loads(f.readline())
        if "event" not in m:
            return m
reply()
for c in ['{"execute": "qmp_capabilities"}'] + sys.argv[2:]:
    f.write(c + "\n"); f.flush()
    r = reply()
    if "error" in r:
        sys.exit(f"QMP {c}: {r['error']['desc']}")
EOF
}
hmp() {
  qmp "{\"execute\": \"human-monitor-command\", \"arguments\": {\"command-line\": $(python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$1")}}"
}
guest_write() {  # PATTERN OFFSET LENGTH
  hmp "qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend \"write -P $1 $2 $3\""
}
dirty_bytes() {
  nbdinfo --map="qemu:dirty-bitmap:$1" "$URI" | awk '$3 == 1 { s += $2 } END { print s + 0 }'
}
start_qemu() {
  rm -f "$QMP"
  qemu-system-x86_64 -accel tcg -m 128 -nodefaults -display none -daemonize \
    -pidfile "$WORK/qemu.pid" -qmp "unix:$QMP,server=on,wait=off" \
    -blockdev "{\"driver\": \"qcow2\", \"node-name\": \"disk0\", \"file\": {\"driver\": \"file\", \"filename\": \"$IMG\"}}" \
    -device virtio-blk-pci,drive=disk0,id=virtio-disk0
  qmp "{\"execute\": \"nbd-server-start\", \"arguments\": {\"addr\": {\"type\": \"unix\", \"data\": {\"path\": \"$NBD\"}}}}"
}
quit_qemu() {
  local pid; pid=$(cat "$WORK/qemu.pid")
  qmp '{"execute": "quit"}' || true
  while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  rm -f "$WORK/qemu.pid"
}
# The README's commands: READ is the bitmap to read (empty on the first
# backup), NEXT the one that records the writes from now on.
view_up() {  # READ NEXT
  local add="{\"type\": \"block-dirty-bitmap-add\", \"data\": {\"node\": \"disk0\", \"name\": \"$2\", \"persistent\": true}}"
  local disable="" bitmaps=""
  if [ -n "$1" ]; then
    disable=", {\"type\": \"block-dirty-bitmap-disable\", \"data\": {\"node\": \"disk0\", \"name\": \"$1\"}}"
    bitmaps=", \"bitmaps\": [\"$1\"]"
  fi
  qemu-img create -q -f qcow2 "$FLEECE" 1G
  qmp "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": \"qcow2\", \"node-name\": \"fleece\", \"file\": {\"driver\": \"file\", \"filename\": \"$FLEECE\"}, \"backing\": \"disk0\"}}" \
    "{\"execute\": \"transaction\", \"arguments\": {\"actions\": [$add$disable, {\"type\": \"blockdev-backup\", \"data\": {\"job-id\": \"fleece\", \"device\": \"disk0\", \"target\": \"fleece\", \"sync\": \"none\"}}]}}" \
    "{\"execute\": \"block-export-add\", \"arguments\": {\"type\": \"nbd\", \"id\": \"bk\", \"node-name\": \"fleece\", \"name\": \"web01\", \"writable\": false$bitmaps}}"
}
view_down() {  # READ
  qmp '{"execute": "block-export-del", "arguments": {"id": "bk"}}' \
    '{"execute": "block-job-cancel", "arguments": {"device": "fleece"}}' \
    '{"execute": "blockdev-del", "arguments": {"node-name": "fleece"}}'
  [ -z "$1" ] || qmp "{\"execute\": \"block-dirty-bitmap-remove\", \"arguments\": {\"node\": \"disk0\", \"name\": \"$1\"}}"
  rm "$FLEECE"
}

echo "== disk: 1 GiB qcow2, ext4 made from $SRC_DIR; QEMU (TCG, no OS)"
truncate -s 1G "$WORK/seed.raw"
mkfs.ext4 -q -F -d "$SRC_DIR" "$WORK/seed.raw"
qemu-img convert -O qcow2 "$WORK/seed.raw" "$IMG"
rm "$WORK/seed.raw"
start_qemu
"$BIN" -q init

echo "== 1. full backup (bitmap bk-1), the guest writing during it"
view_up "" bk-1
guest_write 0x7e 200M 4M
"$BIN" backup "$URI" --name web01 --checkpoint bk-1 --json > "$WORK/b1.json"
view_down ""
READ1=$(json '["bytes_read"]' < "$WORK/b1.json")
echo "   bytes_read $READ1 (the allocated data of a 1 GiB disk)"

echo "== 2. the guest writes about 5% of the disk"
for w in "0x11 1M 4M" "0x22 100M 10M" "0x33 500M 12M" "0x44 900M 20M"; do
  guest_write $w
done
hmp stop                                 # QEMU flushes the image when it stops
qemu-img convert -U -O raw "$IMG" "$WORK/expect2.raw"

echo "== 3. incremental backup (bk-1 -> bk-2), the guest writing during it"
view_up bk-1 bk-2
hmp cont
guest_write 0x7a 100M 2M
guest_write 0x7b 600M 3M
DIRTY2=$(dirty_bytes bk-1)
"$BIN" backup "$URI" --name web01 --bitmap bk-1 --checkpoint bk-2 --json > "$WORK/b2.json"
"$BIN" backup "$URI" --name web01-full --json > "$WORK/full2.json"
view_down bk-1
READ2=$(json '["bytes_read"]' < "$WORK/b2.json")
echo "   bytes_read $READ2, dirty in bitmap bk-1: $DIRTY2"
[ "$READ2" = "$DIRTY2" ] || fail "the incremental backup read $READ2 bytes, the bitmap has $DIRTY2 dirty"
D2=$(json '["digest"]' < "$WORK/b2.json"); DF=$(json '["digest"]' < "$WORK/full2.json")
echo "   digest incremental $D2"
echo "   digest full read   $DF"
[ "$D2" = "$DF" ] || fail "the incremental snapshot's digest differs from a full read of the same view"
"$BIN" -q restore "$(json '["id"]' < "$WORK/b2.json")" "$WORK/restore2.raw"
cmp "$WORK/restore2.raw" "$WORK/expect2.raw" || fail "the restore differs from the disk at the transaction"
echo "   restore == the disk at the transaction (cmp)"
rm "$WORK/restore2.raw" "$WORK/expect2.raw"

echo "== 4. QEMU restarted; incremental backup (bk-2 -> bk-3)"
quit_qemu
start_qemu
view_up bk-2 bk-3
DIRTY3=$(dirty_bytes bk-2)
"$BIN" backup "$URI" --name web01 --bitmap bk-2 --checkpoint bk-3 --json > "$WORK/b3.json"
view_down bk-2
quit_qemu
READ3=$(json '["bytes_read"]' < "$WORK/b3.json")
echo "   bytes_read $READ3, dirty in bitmap bk-2: $DIRTY3"
[ "$READ3" = "$DIRTY3" ] || fail "the incremental backup read $READ3 bytes, the bitmap has $DIRTY3 dirty"
qemu-img convert -O raw "$IMG" "$WORK/expect3.raw"
"$BIN" -q restore "$(json '["id"]' < "$WORK/b3.json")" "$WORK/restore3.raw"
cmp "$WORK/restore3.raw" "$WORK/expect3.raw" || fail "the restore differs from the stopped disk"
echo "   restore == qemu-img convert -O raw of the stopped disk (cmp)"
echo "OK: full read $READ1 bytes, incrementals $READ2 and $READ3 bytes"
