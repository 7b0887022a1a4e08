//! Criterion benchmarks of each pipeline stage and of backup/restore end to
//! end, on seeded input, reported as throughput.
//!
//!   cargo bench --bench pipeline                       # run
//!   cargo bench --bench pipeline -- --save-baseline a  # save a baseline
//!   cargo bench --bench pipeline -- --baseline a       # compare with it
//!
//! Peers (borg, restic, casync) are compared by `scripts/bench-peers.sh`,
//! not here.

use std::collections::HashMap;
use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use imgstore_chunker::testing::seeded;
use imgstore_chunker::{Chunker, Params};
use imgstore_engine::{BackupOptions, NoProgress, Source, Target};
use imgstore_format::{Id, RecipeEntry, Region};
use imgstore_store::Store;

/// Half random, half repetitive text: compresses about 2:1 like a system disk.
fn disk_like(len: usize, seed: u64) -> Vec<u8> {
    let mut v = seeded(len, seed);
    let text =
        b"Lorem ipsum dolor sit amet, consectetur adipiscing elit; /usr/lib/x86_64-linux-gnu ";
    for (i, b) in v.iter_mut().enumerate() {
        if (i / 65536) % 2 == 1 {
            *b = text[i % text.len()];
        }
    }
    v
}

fn store(dir: &Path) -> Store {
    Store::init(
        &dir.join("repo"),
        imgstore_engine::new_repo_config(Params::DEFAULT, 3),
    )
    .unwrap()
}

fn stages(c: &mut Criterion) {
    let data = disk_like(32 << 20, 1);
    let mut g = c.benchmark_group("stages");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.sample_size(10);
    let chunker = Chunker::new(Params::DEFAULT).unwrap();
    let mut out = Vec::new();
    g.bench_function("chunk_fastcdc_zero_scan", |b| {
        b.iter(|| chunker.split(black_box(&data), &mut out))
    });
    g.bench_function("blake3_chunk_ids", |b| {
        chunker.split(&data, &mut out);
        b.iter(|| {
            out.iter()
                .map(|e| Id::hash(&data[e.offset..e.offset + e.len]))
                .fold(0u8, |acc, id| acc ^ id.as_bytes()[0])
        })
    });
    g.bench_function("zstd3_compress_chunks", |b| {
        let mut z = zstd::bulk::Compressor::new(3).unwrap();
        chunker.split(&data, &mut out);
        b.iter(|| {
            out.iter()
                .map(|e| {
                    imgstore_format::encode_chunk(&data[e.offset..e.offset + e.len], &mut z).len()
                })
                .sum::<usize>()
        })
    });
    let zeros = vec![0u8; 32 << 20];
    g.bench_function("zero_scan_hole", |b| {
        b.iter(|| chunker.split(black_box(&zeros), &mut out))
    });
    g.finish();
}

fn store_ops(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let data = disk_like(8 << 20, 2);
    let chunker = Chunker::new(Params::DEFAULT).unwrap();
    let mut ext = Vec::new();
    chunker.split(&data, &mut ext);
    let mut z = zstd::bulk::Compressor::new(3).unwrap();
    let mut g = c.benchmark_group("store");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.sample_size(10);
    let mut n = 0u64;
    g.bench_function("put_region_new_chunks", |b| {
        b.iter_batched(
            || {
                n += 1;
                // Fresh content every iteration so every chunk is new.
                let salt = n.to_le_bytes();
                let mut frames = HashMap::new();
                let mut entries = Vec::new();
                for e in &ext {
                    let mut bytes = data[e.offset..e.offset + e.len].to_vec();
                    bytes[..8].copy_from_slice(&salt);
                    let id = Id::hash(&bytes);
                    frames.insert(
                        id,
                        (
                            imgstore_format::encode_chunk(&bytes, &mut z),
                            bytes.len() as u32,
                        ),
                    );
                    entries.push(RecipeEntry {
                        len: e.len as u32,
                        chunk: Some(id),
                    });
                }
                let region = Region { entries };
                let enc = region.encode();
                (Id::hash(&enc), region, enc, frames)
            },
            |(id, _region, enc, frames)| s.put_region(&id, &enc, &frames).unwrap(),
            BatchSize::LargeInput,
        )
    });
    let ids: Vec<Id> = {
        let r = imgstore_repo::Repository::snapshots(&s).unwrap();
        drop(r);
        let mut frames = HashMap::new();
        let mut entries = Vec::new();
        for e in &ext {
            let bytes = &data[e.offset..e.offset + e.len];
            let id = Id::hash(bytes);
            frames.insert(
                id,
                (
                    imgstore_format::encode_chunk(bytes, &mut z),
                    bytes.len() as u32,
                ),
            );
            entries.push(RecipeEntry {
                len: e.len as u32,
                chunk: Some(id),
            });
        }
        let region = Region { entries };
        let enc = region.encode();
        s.put_region(&Id::hash(&enc), &enc, &frames).unwrap();
        region.entries.iter().filter_map(|e| e.chunk).collect()
    };
    g.bench_function("get_chunk_frames", |b| {
        b.iter(|| s.chunk_frames(&ids).unwrap().len())
    });
    g.bench_function("chunks_known", |b| {
        b.iter(|| s.chunks_known(&ids).unwrap().len())
    });
    g.finish();
}

fn end_to_end(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let mut data = disk_like(64 << 20, 3);
    data[(16 << 20)..(40 << 20)].fill(0);
    let img = dir.path().join("img");
    std::fs::write(&img, &data).unwrap();
    let mut g = c.benchmark_group("end_to_end");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.sample_size(10);
    let opts = BackupOptions {
        name: "bench".into(),
        ..Default::default()
    };
    let first =
        imgstore_engine::backup(&s, Source::open(&img).unwrap(), &opts, &NoProgress).unwrap();
    g.bench_function("backup_known_image", |b| {
        b.iter(|| {
            imgstore_engine::backup(&s, Source::open(&img).unwrap(), &opts, &NoProgress).unwrap()
        })
    });
    // The nightly case: the image's previous snapshot is the parent, so
    // unchanged regions are hashed once and not chunked.
    let with_parent = BackupOptions {
        name: "bench".into(),
        parent: Some((first.id, first.snapshot.clone())),
        ..Default::default()
    };
    g.bench_function("backup_known_image_with_parent", |b| {
        b.iter(|| {
            imgstore_engine::backup(&s, Source::open(&img).unwrap(), &with_parent, &NoProgress)
                .unwrap()
        })
    });
    let out = dir.path().join("out");
    g.bench_function("restore_sparse_file", |b| {
        b.iter(|| {
            let _ = std::fs::remove_file(&out);
            imgstore_engine::restore(
                &s,
                &first.id,
                &first.snapshot,
                Target::File { path: out.clone() },
                &NoProgress,
            )
            .unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, stages, store_ops, end_to_end);
criterion_main!(benches);
