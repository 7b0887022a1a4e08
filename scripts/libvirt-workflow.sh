#!/usr/bin/env bash
# README workflow 2b end to end against a real libvirt and a running QEMU
# domain (pull-mode `virsh backup-begin`, checkpoints, NBD dirty bitmaps):
#
#   scripts/libvirt-workflow.sh BIN [SRC_DIR]
#
# Needs root, a running libvirtd (or virtqemud) at qemu:///system, and
# virsh, qemu-img, mkfs.ext4, nbdinfo (libnbd-bin), python3. No KVM
# needed: the domain is type 'qemu' (TCG), boots nothing, has no network;
# the "guest" writes are qemu-io commands through the domain's monitor.
#
#   1. a 1 GiB qcow2 holding an ext4 made from SRC_DIR (default
#      /usr/share/doc); a domain is defined and started on it;
#   2. full backup: backup-begin without <incremental>, checkpoint ckpt-1,
#      `imgstore backup ... --checkpoint ckpt-1`, domjobabort;
#   3. about 5% of the disk is written; the domain is paused and the disk
#      copied to raw (the state the next backup must restore);
#   4. incremental backup: <incremental>ckpt-1</incremental> with
#      exportbitmap='ckpt-1', checkpoint ckpt-2; the domain runs again and
#      writes more during the job (the export must not show them);
#      `imgstore backup ... --bitmap ckpt-1 --checkpoint ckpt-2`:
#      bytes_read must be the bitmap's dirty bytes; its restore must equal
#      the raw copy of step 3, and its digest a full read of the export;
#      checkpoint ckpt-1 is deleted;
#   5. incremental again (ckpt-2 -> ckpt-3): reads the writes made during
#      step 4's job; the domain is stopped, and the restore must equal
#      `qemu-img convert -O raw` of the qcow2.
# Everything (domain, disk, repository, sockets) is made under a temporary
# directory and a unique domain name, and removed at the end. Exits
# non-zero on any mismatch.
set -euo pipefail
BIN=$(realpath "${1:?usage: $0 BIN [SRC_DIR]}")
SRC_DIR=${2:-/usr/share/doc}
for tool in virsh qemu-img mkfs.ext4 nbdinfo python3 cmp; do
  command -v "$tool" >/dev/null || { echo "$0: $tool is not installed" >&2; exit 1; }
done
virsh -c qemu:///system version >/dev/null

DOM=imgstore-wf-$$
WORK=$(mktemp -d /var/tmp/imgstore-libvirt.XXXXXX)
chmod 0711 "$WORK"                       # QEMU runs as another user (libvirt-qemu)
IMG=$WORK/$DOM.qcow2
# The NBD socket is made by QEMU: its directory must be writable by the
# user QEMU runs as. /var/lib/libvirt/qemu is (Debian, Fedora); /run is not.
SOCK=/var/lib/libvirt/qemu/$DOM-backup.sock
SCRATCH=$WORK/$DOM-vda.scratch
URI="nbd+unix:///vda?socket=$SOCK"
export IMGSTORE_REPO=$WORK/repo
export LIBVIRT_DEFAULT_URI=qemu:///system

cleanup() {
  set +e
  virsh domjobabort "$DOM" >/dev/null 2>&1
  virsh destroy "$DOM" >/dev/null 2>&1
  virsh undefine "$DOM" --checkpoints-metadata >/dev/null 2>&1
  rm -f "$SOCK"
  rm -rf "$WORK"
}
trap cleanup EXIT

json() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
fail() { echo "FAIL: $*" >&2; exit 1; }
# A "guest" write through the disk's device (qemu-io on its BlockBackend).
guest_write() {  # PATTERN OFFSET LENGTH
  virsh qemu-monitor-command "$DOM" --hmp \
    "qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend \"write -P $1 $2 $3\"" >/dev/null
}
# Dirty bytes of the export's bitmap NAME, as the NBD client sees them.
dirty_bytes() {
  nbdinfo --map="qemu:dirty-bitmap:$1" "$URI" | awk '$3 == 1 { s += $2 } END { print s + 0 }'
}
backup_xml() {  # INCREMENTAL (or empty)
  echo "<domainbackup mode='pull'>"
  [ -n "$1" ] && echo "  <incremental>$1</incremental>"
  echo "  <server transport='unix' socket='$SOCK'/>"
  echo "  <disks><disk name='vda' backup='yes' type='file'${1:+ exportbitmap='$1'}><scratch file='$SCRATCH'/></disk></disks>"
  echo "</domainbackup>"
}
checkpoint_xml() {  # NAME
  echo "<domaincheckpoint><name>$1</name><disks><disk name='vda' checkpoint='bitmap'/></disks></domaincheckpoint>"
}
begin() {  # INCREMENTAL CHECKPOINT
  backup_xml "$1" > "$WORK/backup.xml"
  checkpoint_xml "$2" > "$WORK/checkpoint.xml"
  virsh backup-begin "$DOM" "$WORK/backup.xml" "$WORK/checkpoint.xml" >/dev/null
}

echo "== disk: 1 GiB qcow2, ext4 made from $SRC_DIR"
truncate -s 1G "$WORK/seed.raw"
mkfs.ext4 -q -F -d "$SRC_DIR" "$WORK/seed.raw"
qemu-img convert -O qcow2 "$WORK/seed.raw" "$IMG"
rm "$WORK/seed.raw"

echo "== domain $DOM (TCG, no OS, no network)"
cat > "$WORK/domain.xml" <<XML
<domain type='qemu'>
  <name>$DOM</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$IMG'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <memballoon model='none'/>
  </devices>
</domain>
XML
virsh define "$WORK/domain.xml" >/dev/null
virsh start "$DOM" >/dev/null
"$BIN" -q init

echo "== 1. full backup (checkpoint ckpt-1)"
begin "" ckpt-1
"$BIN" backup "$URI" --name web01 --checkpoint ckpt-1 --json > "$WORK/b1.json"
virsh domjobabort "$DOM" >/dev/null
READ1=$(json '["bytes_read"]' < "$WORK/b1.json")
echo "   bytes_read $READ1 (the allocated data of a 1 GiB disk)"

echo "== 2. the guest writes about 5% of the disk"
for w in "0x11 1M 4M" "0x22 100M 10M" "0x33 300M 8M" "0x44 500M 12M" "0x55 700M 6M" "0x66 900M 9M"; do
  guest_write $w
done
for i in $(seq 0 19); do guest_write 0x$((70 + i)) $((20 + i * 37))M 64K; done
virsh suspend "$DOM" >/dev/null         # QEMU flushes the image when it stops
qemu-img convert -U -O raw "$IMG" "$WORK/expect2.raw"

echo "== 3. incremental backup (ckpt-1 -> ckpt-2), the guest writing during the job"
begin ckpt-1 ckpt-2
virsh resume "$DOM" >/dev/null
guest_write 0x7a 100M 2M                # over a block the bitmap has
guest_write 0x7b 600M 3M                # over one it has not
echo "   export's bitmaps: $(nbdinfo --list "$URI" | grep -o 'qemu:dirty-bitmap:[^ ]*' | tr '\n' ' ')"
DIRTY2=$(dirty_bytes ckpt-1)
"$BIN" backup "$URI" --name web01 --bitmap ckpt-1 --checkpoint ckpt-2 --json > "$WORK/b2.json"
"$BIN" backup "$URI" --name web01-full --json > "$WORK/full2.json"   # the same view, read whole
virsh domjobabort "$DOM" >/dev/null
READ2=$(json '["bytes_read"]' < "$WORK/b2.json")
echo "   bytes_read $READ2, dirty in bitmap ckpt-1: $DIRTY2"
[ "$READ2" = "$DIRTY2" ] || fail "the incremental backup read $READ2 bytes, the bitmap has $DIRTY2 dirty"
SNAP2=$(json '["id"]' < "$WORK/b2.json")
D2=$(json '["digest"]' < "$WORK/b2.json"); DF=$(json '["digest"]' < "$WORK/full2.json")
echo "   digest incremental $D2"
echo "   digest full read   $DF"
[ "$D2" = "$DF" ] || fail "the incremental snapshot's digest differs from a full read of the same export"
"$BIN" -q restore "$SNAP2" "$WORK/restore2.raw"
cmp "$WORK/restore2.raw" "$WORK/expect2.raw" || fail "the restore differs from the disk at backup-begin"
echo "   restore == the disk at backup-begin (cmp)"
rm "$WORK/restore2.raw" "$WORK/expect2.raw"
virsh checkpoint-delete "$DOM" ckpt-1 >/dev/null   # its bitmap is no longer needed

echo "== 4. incremental backup (ckpt-2 -> ckpt-3): the writes made during the last job"
begin ckpt-2 ckpt-3
DIRTY3=$(dirty_bytes ckpt-2)
"$BIN" backup "$URI" --name web01 --bitmap ckpt-2 --checkpoint ckpt-3 --json > "$WORK/b3.json"
virsh domjobabort "$DOM" >/dev/null
echo "   checkpoints left: $(virsh checkpoint-list "$DOM" --name | tr '\n' ' ')"
virsh destroy --graceful "$DOM" >/dev/null   # SIGTERM: QEMU closes the image cleanly
echo "   bitmaps in the qcow2: $(qemu-img info --output=json "$IMG" | python3 -c 'import json,sys; print(*[b["name"] for b in json.load(sys.stdin)["format-specific"]["data"].get("bitmaps", [])])')"
READ3=$(json '["bytes_read"]' < "$WORK/b3.json")
echo "   bytes_read $READ3, dirty in bitmap ckpt-2: $DIRTY3"
[ "$READ3" = "$DIRTY3" ] || fail "the incremental backup read $READ3 bytes, the bitmap has $DIRTY3 dirty"
qemu-img convert -O raw "$IMG" "$WORK/expect3.raw"
"$BIN" -q restore "$(json '["id"]' < "$WORK/b3.json")" "$WORK/restore3.raw"
cmp "$WORK/restore3.raw" "$WORK/expect3.raw" || fail "the restore differs from the stopped disk"
echo "   restore == qemu-img convert -O raw of the stopped disk (cmp)"
echo "OK: full read $READ1 bytes, incrementals $READ2 and $READ3 bytes"
