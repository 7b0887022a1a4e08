//! Which chunks a backup's uploads are carrying, so that a chunk two
//! regions in flight both need is sent once.
//!
//! # Why
//!
//! Over a link, a backup asks the repository which chunks of a changed
//! region it lacks (`chunks_known`) and uploads the region with the frames
//! of those. Regions in flight together can share a chunk; each is told it
//! is missing, so each would send it: 3–5% of the workload's bytes on the
//! link, more the longer the round trip.
//! Here the first upload to carry a chunk claims it; a later upload that
//! was also told it is missing waits for the claimer's answer and then
//! leaves the frame out (the repository has it, pinned for the backup's
//! session), or sends it itself if the claimer failed. Waiting costs that
//! upload a round trip at least, so it waits only for [`WORTH_WAITING`]
//! bytes or more; smaller shared frames are sent again (waiting for every
//! shared frame made the workload's incremental backups at 150 ms slower
//! by 0.1–0.5 s each, the last uploads waiting on each other before the
//! commit). Claims are made by uploads already running, so no upload waits
//! for one that cannot finish.
//!
//! On the workload's four backups through a 200 Mbit/s link this sent
//! 352–356 MB instead of 366–370 MB at 150 ms, and 354 MB instead of
//! 364 MB at 0 ms (`docs/BENCHMARKS.md`).
//!
//! The claims of finished uploads are kept for the last
//! [`KEEP_FINISHED`] uploads only: a region's `chunks_known` answer and its
//! upload are a few uploads apart, and a backup of a terabyte must not
//! hold an entry per chunk.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};

use imgstore_format::Id;
use imgstore_repo::Frames;

/// Bytes of frames another upload carries below which an upload sends
/// them too rather than wait for that upload's answer.
pub(crate) const WORTH_WAITING: usize = 1 << 20;

/// Finished uploads whose chunks are still recognised as sent.
pub(crate) const KEEP_FINISHED: usize = 64;

/// One upload's claim: settled with whether its upload stored its frames.
#[derive(Default)]
pub(crate) struct Claim {
    stored: Mutex<Option<bool>>,
    settled: Condvar,
}

impl Claim {
    /// Waits for the claimer's answer: whether it stored its frames.
    fn wait(&self) -> bool {
        let mut s = self.stored.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(ok) = *s {
                return ok;
            }
            s = self.settled.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }
}

#[derive(Default)]
struct Table {
    by_chunk: HashMap<Id, Arc<Claim>>,
    /// Finished claims, oldest first, with the chunks they hold.
    finished: VecDeque<(Arc<Claim>, Vec<Id>)>,
}

/// The chunks this backup's uploads carry (see the module docs).
#[derive(Default)]
pub(crate) struct Claims {
    table: Mutex<Table>,
}

impl Claims {
    /// Takes out of `frames` the chunks another upload carries: claims the
    /// others for this upload, waits for the other claimers, and puts back
    /// the frames whose claimer failed to store them. Returns this upload's
    /// claim, to [`Held::settle`] once its upload has been answered (one
    /// dropped unsettled counts as failed, so nobody waits for ever).
    pub(crate) fn take(self: &Arc<Self>, frames: &mut Frames) -> Held {
        let mine = Arc::new(Claim::default());
        let mut claimed = Vec::new();
        let mut others = Vec::new();
        {
            let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
            for id in frames.keys() {
                match t.by_chunk.get(id) {
                    Some(c) => others.push((*id, c.clone())),
                    None => {
                        t.by_chunk.insert(*id, mine.clone());
                        claimed.push(*id);
                    }
                }
            }
        }
        // Waiting costs this upload a round trip at least; sending a few
        // small frames twice costs less.
        let shared: usize = others
            .iter()
            .map(|(id, _)| frames.get(id).map_or(0, |f| f.0.len()))
            .sum();
        if shared >= WORTH_WAITING {
            for (id, claim) in others {
                if claim.wait() {
                    frames.remove(&id);
                }
            }
        }
        Held {
            claims: self.clone(),
            mine,
            claimed,
            stored: false,
        }
    }

    /// Records how an upload ended. A failed upload's chunks are
    /// released: the next upload that needs one sends it.
    fn settle(&self, mine: &Arc<Claim>, claimed: Vec<Id>, stored: bool) {
        {
            let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
            if stored {
                t.finished.push_back((mine.clone(), claimed));
                while t.finished.len() > KEEP_FINISHED {
                    let (old, ids) = t.finished.pop_front().expect("not empty");
                    for id in ids {
                        if t.by_chunk.get(&id).is_some_and(|c| Arc::ptr_eq(c, &old)) {
                            t.by_chunk.remove(&id);
                        }
                    }
                }
            } else {
                for id in &claimed {
                    if t.by_chunk.get(id).is_some_and(|c| Arc::ptr_eq(c, mine)) {
                        t.by_chunk.remove(id);
                    }
                }
            }
        }
        *mine.stored.lock().unwrap_or_else(|p| p.into_inner()) = Some(stored);
        mine.settled.notify_all();
    }
}

/// An upload's claim until its answer is recorded.
pub(crate) struct Held {
    claims: Arc<Claims>,
    mine: Arc<Claim>,
    claimed: Vec<Id>,
    /// What the answer said; false until [`Held::settle`], so a claim
    /// dropped unanswered counts as failed.
    stored: bool,
}

impl Held {
    /// The chunks this upload claimed.
    #[cfg(test)]
    fn claimed(&self) -> usize {
        self.claimed.len()
    }

    /// Records whether the upload stored its frames (when dropped).
    pub(crate) fn settle(mut self, stored: bool) {
        self.stored = stored;
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.claims
            .settle(&self.mine, std::mem::take(&mut self.claimed), self.stored);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames of ids `ids`, each large enough to be worth waiting for.
    fn frames(ids: &[u8]) -> Frames {
        ids.iter()
            .map(|&b| {
                (
                    Id::hash(&[b]),
                    (vec![b; WORTH_WAITING], WORTH_WAITING as u32),
                )
            })
            .collect()
    }

    /// Waits until `t` has run 50 ms without finishing.
    fn still_waiting<T>(t: &std::thread::ScopedJoinHandle<'_, T>) -> bool {
        std::thread::sleep(std::time::Duration::from_millis(50));
        !t.is_finished()
    }

    #[test]
    fn a_chunk_is_sent_by_its_first_claimer_or_again_if_it_failed() {
        let c = Arc::new(Claims::default());
        std::thread::scope(|s| {
            let mut a = frames(&[1, 2, 3]);
            let ha = c.take(&mut a);
            assert_eq!((a.len(), ha.claimed()), (3, 3));
            // B shares 2 and 3 with A, which is still in flight: B waits.
            let b = s.spawn(|| {
                let mut b = frames(&[2, 3, 4]);
                let hb = c.take(&mut b);
                hb.settle(true);
                b
            });
            assert!(still_waiting(&b), "B went on before A was answered");
            ha.settle(true);
            let b = b.join().unwrap();
            assert_eq!(b.keys().copied().collect::<Vec<_>>(), vec![Id::hash(&[4])]);
        });
        std::thread::scope(|s| {
            // D's claimer failed: D sends the chunk itself.
            let mut d0 = frames(&[9]);
            let h0 = c.take(&mut d0);
            let d = s.spawn(|| {
                let mut d = frames(&[9]);
                let hd = c.take(&mut d);
                let claimed = hd.claimed();
                hd.settle(true);
                (d, claimed)
            });
            assert!(still_waiting(&d));
            h0.settle(false);
            let (d, claimed) = d.join().unwrap();
            assert_eq!(d.len(), 1, "the failed claimer's chunk was left out");
            assert_eq!(claimed, 0, "claimed by the failed upload when D looked");
        });
        // A chunk nobody holds now is claimed afresh.
        let mut e = frames(&[9]);
        let he = c.take(&mut e);
        assert_eq!((e.len(), he.claimed()), (1, 1));
    }

    #[test]
    fn a_claim_dropped_unanswered_counts_as_failed() {
        let c = Arc::new(Claims::default());
        std::thread::scope(|s| {
            let mut a = frames(&[5]);
            let ha = c.take(&mut a);
            let b = s.spawn(|| {
                let mut b = frames(&[5]);
                let _hb = c.take(&mut b);
                b
            });
            assert!(still_waiting(&b));
            // The upload that claimed it ended without an answer (a
            // panic unwinding, say): the waiter sends the chunk itself.
            drop(ha);
            assert_eq!(b.join().unwrap().len(), 1);
        });
    }

    #[test]
    fn a_small_shared_frame_is_sent_again_rather_than_waited_for() {
        let c = Arc::new(Claims::default());
        let small = |b: u8| -> Frames { [(Id::hash(&[b]), (vec![b; 4096], 4096))].into() };
        let mut a = small(1);
        let _ha = c.take(&mut a);
        // A is still in flight: B does not wait, and keeps the frame.
        let mut b = small(1);
        let hb = c.take(&mut b);
        assert_eq!((b.len(), hb.claimed()), (1, 0));
    }

    #[test]
    fn finished_claims_are_kept_for_the_last_uploads_only() {
        let c = Arc::new(Claims::default());
        for i in 0..=KEEP_FINISHED as u8 {
            let mut f = frames(&[i]);
            c.take(&mut f).settle(true);
        }
        // The first upload's chunk was forgotten, the last one's is known.
        let mut first = frames(&[0]);
        let h = c.take(&mut first);
        assert_eq!(first.len(), 1);
        h.settle(true);
        let mut last = frames(&[KEEP_FINISHED as u8]);
        let h = c.take(&mut last);
        assert!(last.is_empty());
        drop(h);
        let t = c.table.lock().unwrap();
        assert!(
            t.by_chunk.len() <= KEEP_FINISHED + 2,
            "{}",
            t.by_chunk.len()
        );
    }
}
