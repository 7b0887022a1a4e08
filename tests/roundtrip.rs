//! Property test through the library on a real RocksDB: random images under
//! random mutations (insert, delete, overwrite, zero runs), each generation
//! backed up into one repository, every generation restored byte-exact.

use std::fs;
use std::path::Path;

use imgstore_engine::{BackupOptions, NoProgress, Source, Target};
use imgstore_store::{Mode, Store};
use proptest::prelude::*;

use crate::util::{scratch, seeded};

#[derive(Clone, Debug)]
enum Op {
    Insert(u32, u32),
    Delete(u32, u32),
    Overwrite(u32, u32),
    Zero(u32, u32),
}

fn op() -> impl Strategy<Value = Op> {
    let len = 1u32..3_000_000;
    prop_oneof![
        (any::<u32>(), len.clone()).prop_map(|(p, l)| Op::Insert(p, l)),
        (any::<u32>(), len.clone()).prop_map(|(p, l)| Op::Delete(p, l)),
        (any::<u32>(), 1u32..200_000).prop_map(|(p, l)| Op::Overwrite(p, l)),
        (any::<u32>(), len).prop_map(|(p, l)| Op::Zero(p, l)),
    ]
}

fn apply(img: &mut Vec<u8>, op: &Op, seed: u64) {
    let at = |p: u32, len: usize| if len == 0 { 0 } else { p as usize % (len + 1) };
    match *op {
        Op::Insert(p, l) => {
            let pos = at(p, img.len());
            let bytes = seeded(l as usize, seed);
            img.splice(pos..pos, bytes);
        }
        Op::Delete(p, l) => {
            let pos = at(p, img.len());
            let end = (pos + l as usize).min(img.len());
            img.drain(pos..end);
        }
        Op::Overwrite(p, l) => {
            let pos = at(p, img.len());
            let end = (pos + l as usize).min(img.len());
            img[pos..end].copy_from_slice(&seeded(end - pos, seed)[..]);
        }
        Op::Zero(p, l) => {
            let pos = at(p, img.len());
            let end = (pos + l as usize).min(img.len());
            img[pos..end].fill(0);
        }
    }
}

/// Writes `img` to `path` with its all-zero 4 KiB blocks left as holes.
fn write_sparse(path: &Path, img: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = fs::File::create(path).unwrap();
    f.set_len(img.len() as u64).unwrap();
    for (i, block) in img.chunks(4096).enumerate() {
        if block.iter().any(|&b| b != 0) {
            f.write_all_at(block, (i * 4096) as u64).unwrap();
        }
    }
}

pub fn test_store(dir: &Path, avg: u32) -> Store {
    let p = imgstore_chunker::Params::with_avg(avg).unwrap();
    Store::init(&dir.join("repo"), imgstore_engine::new_repo_config(p, 3)).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10, ..ProptestConfig::default() })]
    #[test]
    fn random_mutations_round_trip(
        seed in any::<u64>(),
        size in 0usize..(18 << 20),
        ops in proptest::collection::vec(op(), 1..6),
        avg_shift in 0u32..3,
    ) {
        let dir = tempfile::Builder::new().prefix("imgstore-prop").tempdir_in(scratch()).unwrap();
        let store = test_store(dir.path(), 16384 << (2 * avg_shift));
        let mut img = seeded(size, seed);
        if size > 4 << 20 {
            img[(1 << 20)..(3 << 20)].fill(0);
        }
        // The second 8 MiB region starts as a hole (files are written
        // sparse), so all-hole regions meet parents that have them too.
        if size > 8 << 20 {
            img[(8 << 20)..size.min(16 << 20)].fill(0);
        }
        let mut gens: Vec<(imgstore_format::Id, imgstore_format::Snapshot, std::path::PathBuf)> = Vec::new();
        for (g, o) in std::iter::once(None).chain(ops.iter().map(Some)).enumerate() {
            if let Some(o) = o {
                apply(&mut img, o, seed.wrapping_add(g as u64));
            }
            let path = dir.path().join(format!("g{g}.img"));
            write_sparse(&path, &img);
            // Alternate file sources (hole-aware) and streams.
            let source = if g % 2 == 0 {
                // Half of the file sources read with O_DIRECT.
                Source::open(&path).unwrap().with_direct_io(g % 4 == 0)
            } else {
                Source::from_reader(Path::new("-"), Box::new(fs::File::open(&path).unwrap()))
            };
            // Every other generation takes unchanged regions from the one
            // before: the snapshot must equal a backup that chunks them all.
            let parent = gens.last().filter(|_| (seed >> (g + 8)) & 1 == 1).map(|(id, snap, _)| (*id, snap.clone()));
            let opts = BackupOptions { name: "prop".into(), parent: parent.clone(), ..Default::default() };
            let r = imgstore_engine::backup(&store, source, &opts, &NoProgress).unwrap();
            prop_assert_eq!(r.snapshot.size, img.len() as u64);
            prop_assert_eq!(r.snapshot.digest, *blake3::hash(&img).as_bytes());
            if parent.is_some() {
                let plain = BackupOptions { name: "prop-full".into(), ..Default::default() };
                let f = imgstore_engine::backup(&store, Source::open(&path).unwrap(), &plain, &NoProgress).unwrap();
                prop_assert_eq!(&f.snapshot.pages, &r.snapshot.pages);
                prop_assert_eq!(f.snapshot.stats.chunks, r.snapshot.stats.chunks);
                prop_assert_eq!(f.snapshot.stats.zero_bytes, r.snapshot.stats.zero_bytes);
                prop_assert_eq!(f.bytes_reused, 0);
                store.forget(&[f.id]).unwrap();
            }
            gens.push((r.id, r.snapshot, path));
        }
        for (i, (id, snap, path)) in gens.iter().enumerate() {
            let out = dir.path().join(format!("out{i}.img"));
            imgstore_engine::restore(&store, id, snap, Target::File { path: out.clone() }, &NoProgress).unwrap();
            prop_assert!(fs::read(&out).unwrap() == fs::read(path).unwrap(), "generation {} differs", i);
        }
        // Forget a random subset, collect garbage, and everything left still
        // restores exactly; forgetting everything leaves no chunk behind.
        let forget: Vec<_> = gens.iter().enumerate().filter(|(i, _)| (seed >> i) & 1 == 1).map(|(_, g)| g.0).collect();
        store.forget(&forget).unwrap();
        store.sweep(false, &|_| {}).unwrap();
        store.reclaim().unwrap();
        for (i, (id, snap, path)) in gens.iter().enumerate().filter(|(_, g)| !forget.contains(&g.0)) {
            let out = dir.path().join(format!("after{i}.img"));
            imgstore_engine::restore(&store, id, snap, Target::File { path: out.clone() }, &NoProgress).unwrap();
            prop_assert!(fs::read(&out).unwrap() == fs::read(path).unwrap(), "generation {} differs after gc", i);
        }
        let t = store.totals().unwrap();
        prop_assert_eq!(t.orphans, 0);
        let rest: Vec<_> = gens.iter().map(|g| g.0).filter(|id| !forget.contains(id)).collect();
        store.forget(&rest).unwrap();
        store.sweep(false, &|_| {}).unwrap();
        let t = store.totals().unwrap();
        prop_assert_eq!((t.objects.chunks, t.objects.regions, t.objects.pages, t.orphans), (0, 0, 0, 0));
        drop(store);
        // Everything committed is readable by a read-only open.
        let ro = Store::open(&dir.path().join("repo"), Mode::ReadOnly).unwrap();
        prop_assert_eq!(imgstore_repo::Repository::snapshots(&ro).unwrap().len(), 0);
        let t = ro.totals().unwrap();
        prop_assert_eq!(t.orphans, 0);
    }
}
