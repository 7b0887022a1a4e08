//! Hashing a file's regions while the repository is still being reached.
//!
//! Over a link, a backup command spends its first round trips (TCP, TLS,
//! the hello and the snapshot list) before the engine can start: at 150 ms
//! of RTT, about 0.3 s in which the disk and the cores would idle. An
//! incremental backup spends most of its local time hashing regions to
//! compare them with the parent's, and that needs nothing from the
//! repository but its region size. So the command starts a [`PreHash`] on
//! the source as soon as it has opened it, with the region size it expects
//! (the default); [`crate::backup()`] stops it when it starts, and takes the
//! chaining values of the regions hashed so far instead of reading them
//! again: equal to the parent's, a region is taken from it without a read.
//! A region that differs is read again (from the page cache) and stored as
//! usual. With another region size, or no parent, the values are unused
//! and the cost was a few hundred milliseconds of otherwise idle time.
//!
//! Not hashed here: the first region (its value may be the image digest's
//! root, which needs its hasher, not a chaining value) and all-hole
//! regions (their values come from the parent or the zero cache).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::aligned::AlignedBuf;
use crate::digest::region_hasher;
use crate::source::{Source, SourceKind};

/// Per region: its chaining value and the bytes read to hash it.
pub(crate) type Table = Vec<Option<([u8; 32], u64)>>;

/// Regions of a file or block device hashed in the background, until
/// [`crate::backup()`] takes them (see the module documentation).
pub struct PreHash {
    region_size: usize,
    table: Arc<Mutex<Table>>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for PreHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreHash")
            .field("region_size", &self.region_size)
            .finish_non_exhaustive()
    }
}

impl PreHash {
    /// The region size of every repository made with the default chunking
    /// (`init` derives it from the largest chunk: at least 8 MiB), which a
    /// command expects before it has reached the repository.
    pub const LIKELY_REGION_SIZE: usize = 8 << 20;

    /// Starts hashing `source` (a file or block device: the same open
    /// file, through a second handle) in regions of `region_size` bytes on
    /// one thread per core, from the second region on. `None` for anything
    /// else (a stream cannot be read twice).
    pub fn start(source: &Source, region_size: usize) -> Option<PreHash> {
        let source = source.same_file()?;
        if !matches!(source.kind(), SourceKind::File | SourceKind::BlockDevice) || region_size == 0
        {
            return None;
        }
        let size = source.size()?;
        let n = size.div_ceil(region_size as u64) as usize;
        let table = Arc::new(Mutex::new(vec![None; n]));
        let stop = Arc::new(AtomicBool::new(false));
        let (t, s) = (table.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("imgstore-prehash".into())
            .spawn(move || run(&source, region_size, &t, &s))
            .ok()?;
        Some(PreHash {
            region_size,
            table,
            stop,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Regions hashed so far.
    pub fn hashed(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|r| r.is_some())
            .count()
    }

    /// Stops the hashing (within one region per thread) and returns what
    /// was hashed, when it was hashed in regions of `region_size`; empty
    /// otherwise, or when taken already.
    pub(crate) fn finish(&self, region_size: usize) -> Table {
        self.stop.store(true, Relaxed);
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
        if region_size != self.region_size {
            return Vec::new();
        }
        std::mem::take(&mut *self.table.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Drop for PreHash {
    fn drop(&mut self) {
        self.finish(self.region_size);
    }
}

fn run(source: &Source, region_size: usize, table: &Mutex<Table>, stop: &AtomicBool) {
    use blake3::hazmat::HasherExt;
    let Some(pos) = source.positional() else {
        return;
    };
    // No readahead advised here, unlike the backup's own reads: 128 MiB of
    // it queued at once delayed the command's first requests (its code
    // paged in, and on a shared machine the server's reads) by 0.4 s at
    // 150 ms RTT, more than hashing ahead saves; the kernel's own
    // sequential readahead keeps these reads fed.
    let next = AtomicU64::new(1);
    std::thread::scope(|s| {
        for _ in 0..crate::read::cores() {
            s.spawn(|| {
                // Speculative work: it must not slow what it waits for (the
                // command's handshakes, or a server on the same machine),
                // on the CPU or on the disk.
                let _ = rustix::process::setpriority_process(None, 19);
                idle_io();
                let mut buf = AlignedBuf::default();
                while !stop.load(Relaxed) {
                    let index = next.fetch_add(1, Relaxed);
                    let Ok(Some((rb, n))) = pos.read_region(index, region_size, buf) else {
                        return;
                    };
                    if !rb.all_hole {
                        let mut h = region_hasher(rb.offset);
                        h.update(&rb.data);
                        let cv = h.finalize_non_root();
                        if let Some(slot) = table
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_mut(index as usize)
                        {
                            *slot = Some((cv, n));
                        }
                    }
                    buf = rb.data;
                }
            });
        }
    });
}

/// Puts the calling thread's reads in the idle I/O class: served when no
/// other reads wait (mq-deadline and bfq honour it). Its 8 MiB reads held
/// up the small ones the command needs first: a bucket repository's cold
/// index took 0.23 s to open behind them (from its CURRENT file read to its
/// MANIFEST opened). Where the call or the class is not supported it
/// changes nothing but speed.
fn idle_io() {
    // Process 0 is the calling thread (ioprio_set(2), IOPRIO_WHO_PROCESS).
    let _ = ioprio::set_priority(
        ioprio::Target::Process(ioprio::Pid::from_raw(0)),
        ioprio::Priority::new(ioprio::Class::Idle),
    );
}

#[cfg(test)]
mod tests {
    /// The hashing threads' reads wait for everyone else's.
    #[test]
    fn speculative_reads_are_in_the_idle_class() {
        std::thread::spawn(|| {
            super::idle_io();
            let p = ioprio::get_priority(ioprio::Target::Process(ioprio::Pid::from_raw(0)))
                .expect("ioprio_get");
            assert_eq!(p.class(), Some(ioprio::Class::Idle), "{p:?}");
        })
        .join()
        .unwrap();
    }
}
