# Helpers the benchmark scripts source (needs WORK set).

# drop: write back and drop the page cache (as root; a no-op otherwise).
drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }

# timed CMD...: runs CMD with a cold page cache; prints its wall seconds,
# keeps its output in $WORK/last; stops the script if it fails.
timed() {
    drop
    local t0 t1
    t0=$(date +%s.%N)
    "$@" > "$WORK/last" 2> "$WORK/err" || { echo "failed: $*"; cat "$WORK/err"; exit 1; }
    t1=$(date +%s.%N)
    echo "$t1 - $t0" | bc
}
