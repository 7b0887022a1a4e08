//! `--limit-upload` / `--limit-download`: one process's traffic to a
//! repository server or a bucket paced to a rate, to leave room on the
//! link for everything else.
//!
//! A [`Rate`] is a virtual clock: each piece of traffic reserves its slot
//! on the link (`bytes ÷ rate` long, after the slots reserved before it)
//! and waits until its slot starts. Every request and answer of the
//! process shares one `Rate` per direction, so the total stays under the
//! limit however many are in flight. Pieces are at most [`Rate::piece`]
//! bytes (1/50 s of the rate, 1 KiB to 64 KiB), so over any one-second
//! window the traffic passes the rate by at most one piece per stream in
//! flight and 20 ms of credit (a sender woken late catches up on that
//! much, no more) — so a burst after a pause is paced like any other
//! traffic.
//!
//! Where the pacing applies is up to the client: an upload's body is
//! handed to the connection no faster than its `Rate` allows, and an
//! answer's body is read no faster than the download `Rate`, so the
//! sender is held back by the transport's flow control.
//!
//! No crate: the rate limiters on crates.io (governor, leaky-bucket) count
//! cells or tokens, not a blocking reader's bytes, and their bursts are
//! sized in those; the virtual clock with a fixed 20 ms credit is a dozen
//! lines.

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How much of an idle link a late sender may catch up on.
const CREDIT: Duration = Duration::from_millis(20);

/// A rate limit on one direction of traffic: bytes per second.
#[derive(Debug)]
pub struct Rate {
    bytes_per_second: u64,
    /// When the link is next free.
    free: Mutex<Instant>,
}

impl Rate {
    /// A limit of `bytes_per_second` (at least 1).
    pub fn new(bytes_per_second: u64) -> Arc<Rate> {
        Arc::new(Rate {
            bytes_per_second: bytes_per_second.max(1),
            free: Mutex::new(Instant::now()),
        })
    }

    /// The limit, in bytes per second.
    pub fn bytes_per_second(&self) -> u64 {
        self.bytes_per_second
    }

    /// The largest piece to reserve at once: 1/50 s of the rate, within
    /// 1 KiB ..= 64 KiB.
    pub fn piece(&self) -> usize {
        ((self.bytes_per_second / 50) as usize).clamp(1 << 10, 64 << 10)
    }

    /// Reserves `n` bytes of the link; returns how long to wait before
    /// sending them.
    pub fn reserve(&self, n: usize) -> Duration {
        let now = Instant::now();
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        // A sender that is late (scheduled late on a busy machine, or
        // between requests) catches up on at most CREDIT of the link, so
        // late wake-ups do not leave the rate unused, and a pause does not
        // build up a burst.
        let start = (*free).max(now.checked_sub(CREDIT).unwrap_or(now));
        *free = start + Duration::from_secs_f64(n as f64 / self.bytes_per_second as f64);
        start - now
    }

    /// Reserves `n` bytes and sleeps until they may go.
    pub fn wait(&self, n: usize) {
        let d = self.reserve(n);
        if !d.is_zero() {
            std::thread::sleep(d);
        }
    }
}

/// The limits of one process: either direction may be unlimited.
#[derive(Clone, Debug, Default)]
pub struct Limits {
    /// Traffic to the repository (request bodies: uploads).
    pub upload: Option<Arc<Rate>>,
    /// Traffic from the repository (answer bodies: restores).
    pub download: Option<Arc<Rate>>,
}

impl Limits {
    /// Limits of these rates (bytes per second; None: unlimited).
    pub fn new(upload: Option<u64>, download: Option<u64>) -> Limits {
        Limits {
            upload: upload.map(Rate::new),
            download: download.map(Rate::new),
        }
    }

    /// Whether neither direction is limited.
    pub fn is_none(&self) -> bool {
        self.upload.is_none() && self.download.is_none()
    }
}

/// A reader paced by a [`Rate`]: each read returns at most one piece,
/// after waiting for its slot (an upload body: the connection gets the
/// bytes no faster than the rate).
pub struct Paced<R> {
    inner: R,
    rate: Arc<Rate>,
}

impl<R: Read> Paced<R> {
    pub fn new(inner: R, rate: Arc<Rate>) -> Paced<R> {
        Paced { inner, rate }
    }
}

impl<R: Read> Read for Paced<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let max = buf.len().min(self.rate.piece());
        let n = self.inner.read(&mut buf[..max])?;
        self.rate.wait(n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_follow_one_another_at_the_rate() {
        let r = Rate::new(1000);
        assert!(r.reserve(500) < Duration::from_millis(5));
        let second = r.reserve(500);
        assert!(second > Duration::from_millis(480) && second <= Duration::from_millis(500));
        let third = r.reserve(1);
        assert!(third > Duration::from_millis(980), "{third:?}");
    }

    #[test]
    fn a_paced_reader_gives_everything_at_the_rate() {
        let rate = Rate::new(200 << 10);
        let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let t = Instant::now();
        let mut out = Vec::new();
        Paced::new(&data[..], rate.clone())
            .read_to_end(&mut out)
            .unwrap();
        assert!(out == data);
        // 100,000 bytes at 204,800 B/s: the last piece starts after ~0.45 s.
        assert!(
            t.elapsed() >= Duration::from_millis(400),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(rate.piece(), 4096);
    }

    #[test]
    fn pieces_stay_within_bounds() {
        assert_eq!(Rate::new(1).piece(), 1 << 10);
        assert_eq!(Rate::new(1 << 30).piece(), 64 << 10);
    }
}
