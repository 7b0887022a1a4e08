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
    /// claim, to [`Claims::settle`] once its upload has been answered, and
    /// the chunks it claimed.
    pub(crate) fn take(&self, frames: &mut Frames) -> (Arc<Claim>, Vec<Id>) {
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
        (mine, claimed)
    }

    /// Records how this upload ended. A failed upload's chunks are
    /// released: the next upload that needs one sends it.
    pub(crate) fn settle(&self, mine: Arc<Claim>, claimed: Vec<Id>, stored: bool) {
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
                    if t.by_chunk.get(id).is_some_and(|c| Arc::ptr_eq(c, &mine)) {
                        t.by_chunk.remove(id);
                    }
                }
            }
        }
        *mine.stored.lock().unwrap_or_else(|p| p.into_inner()) = Some(stored);
        mine.settled.notify_all();
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

    #[test]
    fn a_chunk_is_sent_by_its_first_claimer_or_again_if_it_failed() {
        let c = Claims::default();
        let mut a = frames(&[1, 2, 3]);
        let (ca, ia) = c.take(&mut a);
        assert_eq!(a.len(), 3);
        assert_eq!(ia.len(), 3);
        // B shares 2 and 3 with A, which is still in flight: B waits.
        let c = Arc::new(c);
        let c2 = c.clone();
        let b = std::thread::spawn(move || {
            let mut b = frames(&[2, 3, 4]);
            let (cb, ib) = c2.take(&mut b);
            c2.settle(cb, ib, true);
            b
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!b.is_finished(), "B went on before A was answered");
        c.settle(ca, ia, true);
        let b = b.join().unwrap();
        let mut left: Vec<Id> = b.keys().copied().collect();
        left.sort();
        assert_eq!(left, vec![Id::hash(&[4])]);
        // D's claimer failed: D sends the chunk itself, and claims it.
        let mut d0 = frames(&[9]);
        let (cd0, id0) = c.take(&mut d0);
        let c3 = c.clone();
        let d = std::thread::spawn(move || {
            let mut d = frames(&[9]);
            let (cd, idd) = c3.take(&mut d);
            (d, cd, idd)
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        c.settle(cd0, id0, false);
        let (d, cd, idd) = d.join().unwrap();
        assert_eq!(d.len(), 1, "the failed claimer's chunk was left out");
        assert!(idd.is_empty(), "claimed by the failed upload when D looked");
        c.settle(cd, idd, true);
        // A chunk nobody holds now is claimed afresh.
        let mut e = frames(&[9]);
        let (_, ie) = c.take(&mut e);
        assert_eq!((e.len(), ie.len()), (1, 1));
    }

    #[test]
    fn a_small_shared_frame_is_sent_again_rather_than_waited_for() {
        let c = Claims::default();
        let small = |b: u8| -> Frames { [(Id::hash(&[b]), (vec![b; 4096], 4096))].into() };
        let mut a = small(1);
        let (_ca, _) = c.take(&mut a);
        // A is still in flight: B does not wait, and keeps the frame.
        let mut b = small(1);
        let (_, ib) = c.take(&mut b);
        assert_eq!((b.len(), ib.len()), (1, 0));
    }

    #[test]
    fn finished_claims_are_kept_for_the_last_uploads_only() {
        let c = Claims::default();
        for i in 0..=KEEP_FINISHED as u8 {
            let mut f = frames(&[i]);
            let (m, ids) = c.take(&mut f);
            c.settle(m, ids, true);
        }
        // The first upload's chunk was forgotten, the last one's is known.
        let mut first = frames(&[0]);
        c.take(&mut first);
        assert_eq!(first.len(), 1);
        let mut last = frames(&[KEEP_FINISHED as u8]);
        c.take(&mut last);
        assert!(last.is_empty());
        let t = c.table.lock().unwrap();
        assert!(
            t.by_chunk.len() <= KEEP_FINISHED + 2,
            "{}",
            t.by_chunk.len()
        );
    }
}
