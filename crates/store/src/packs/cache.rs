//! The pack cache: whole packs kept on local disk, so restores and gc
//! read them without a request.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Mutex;

use imgstore_format::pack::{Location, PackName};
use imgstore_format::Id;

/// A bounded local cache of whole packs (`cache/<pack name>`), filled as
/// packs are uploaded, evicted least recently used first.
pub(super) struct PackCache {
    dir: PathBuf,
    limit: u64,
    state: Mutex<CacheState>,
}

#[derive(Default)]
struct CacheState {
    files: HashMap<PackName, (u64, u64)>,
    total: u64,
    tick: u64,
    hits: u64,
    misses: u64,
}

impl PackCache {
    pub(super) fn open(dir: PathBuf, limit: u64) -> PackCache {
        let mut st = CacheState::default();
        if let Ok(rd) = fs::read_dir(&dir) {
            let mut found: Vec<(std::time::SystemTime, PackName, u64)> = rd
                .flatten()
                .filter_map(|e| {
                    let name = Id::from_hex(e.file_name().to_str()?).ok()?;
                    let m = e.metadata().ok()?;
                    Some((m.modified().ok()?, name, m.len()))
                })
                .collect();
            found.sort();
            for (_, name, len) in found {
                st.tick += 1;
                st.files.insert(name, (len, st.tick));
                st.total += len;
            }
        }
        PackCache {
            dir,
            limit,
            state: Mutex::new(st),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn figures(&self) -> (u64, u64, u64) {
        let s = self.lock();
        (s.hits, s.misses, s.total)
    }

    pub(super) fn miss(&self, n: u64) {
        self.lock().misses += n;
    }

    fn path(&self, name: &PackName) -> PathBuf {
        self.dir.join(name.to_hex())
    }

    /// Keeps an uploaded pack (best effort: a cache that cannot be written
    /// only costs requests).
    pub(super) fn insert(&self, name: &PackName, bytes: &[u8]) {
        let len = bytes.len() as u64;
        if len > self.limit {
            return;
        }
        if fs::create_dir_all(&self.dir).is_err() {
            return;
        }
        let tmp = self.dir.join(format!("{}.tmp", name.to_hex()));
        let ok = fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(bytes))
            .and_then(|_| fs::rename(&tmp, self.path(name)))
            .is_ok();
        if !ok {
            let _ = fs::remove_file(&tmp);
            return;
        }
        let mut s = self.lock();
        s.tick += 1;
        let tick = s.tick;
        if let Some((old, _)) = s.files.insert(*name, (len, tick)) {
            s.total -= old;
        }
        s.total += len;
        while s.total > self.limit {
            let Some((victim, (vlen, _))) = s
                .files
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(n, v)| (*n, *v))
            else {
                break;
            };
            s.files.remove(&victim);
            s.total -= vlen;
            let _ = fs::remove_file(self.path(&victim));
        }
    }

    pub(super) fn remove(&self, name: &PackName) {
        let mut s = self.lock();
        if let Some((len, _)) = s.files.remove(name) {
            s.total -= len;
            let _ = fs::remove_file(self.path(name));
        }
    }

    /// An entry's bytes from a cached pack (None: not cached).
    pub(super) fn read(&self, loc: &Location) -> Option<Vec<u8>> {
        {
            let mut s = self.lock();
            if !s.files.contains_key(&loc.pack) {
                return None;
            }
            s.tick += 1;
            let t = s.tick;
            if let Some(e) = s.files.get_mut(&loc.pack) {
                e.1 = t;
            }
        }
        let f = fs::File::open(self.path(&loc.pack)).ok()?;
        let mut buf = vec![0u8; loc.len as usize];
        if f.read_exact_at(&mut buf, loc.offset).is_err() {
            self.remove(&loc.pack);
            return None;
        }
        self.lock().hits += 1;
        Some(buf)
    }

    pub(super) fn whole(&self, name: &PackName) -> Option<Vec<u8>> {
        if !self.lock().files.contains_key(name) {
            return None;
        }
        fs::read(self.path(name)).ok()
    }
}
