# Helpers the benchmark scripts source (needs WORK set).

# drop: write back and drop the page cache (as root; a no-op otherwise).
drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }

# evict PATH...: writes back and drops the page cache of these files (and
# of every file under these directories) only, so that a process running
# beside them (a server standing for another machine) keeps its own.
evict() {
    sync
    python3 - "$@" <<'PY'
import os, sys
for top in sys.argv[1:]:
    for root, _, files in (os.walk(top) if os.path.isdir(top) else [("", [], [top])]):
        for f in files:
            p = os.path.join(root, f)
            try:
                fd = os.open(p, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
PY
}

# timed CMD...: runs CMD with a cold page cache; prints its wall seconds,
# keeps its output in $WORK/last; stops the script if it fails. With
# COLD_PATHS set (paths, space-separated), only those are made cold
# (`evict`) instead of the whole page cache.
timed() {
    if [ -n "${COLD_PATHS:-}" ]; then
        # shellcheck disable=SC2086
        evict $COLD_PATHS
    else
        drop
    fi
    local t0 t1
    t0=$(date +%s.%N)
    "$@" > "$WORK/last" 2> "$WORK/err" || { echo "failed: $*"; cat "$WORK/err"; exit 1; }
    t1=$(date +%s.%N)
    echo "$t1 - $t0" | bc
}
