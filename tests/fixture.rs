//! Old repositories stay readable: `tests/fixtures/format2` is a small
//! repository written by the format-2 build (commit 4919c36, before the
//! storage seam), checked in. Every later build must open it, list it,
//! restore both snapshots byte-exact, check it with `--read-data`, verify
//! it, and keep backing up into it. A format change that breaks any of
//! that fails here.
//!
//! The images are regenerated from seeds (`fixture_image`), so the test
//! knows every byte the snapshots must restore to.

use std::path::{Path, PathBuf};

use crate::util::{assert_same, seeded, texty, Env, BIN};

/// The snapshot ids the fixture holds (content addresses of their records:
/// a change in the snapshot encoding changes them).
const GEN1: &str = include_str!("fixtures/format2.gen1");
const GEN2: &str = include_str!("fixtures/format2.gen2");

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format2")
}

/// Generation `g` (1 or 2) of the fixture's image: 512 KiB random, 1 MiB of
/// zeros, 512 KiB of text, a 12,345-byte random tail; generation 2 has 64
/// KiB rewritten at 256 KiB.
fn fixture_image(g: u64) -> Vec<u8> {
    let mut v = seeded(512 << 10, 41);
    v.extend(std::iter::repeat_n(0u8, 1 << 20));
    v.extend(texty(512 << 10, 42));
    v.extend(seeded(12_345, 43));
    if g == 2 {
        v[256 << 10..320 << 10].copy_from_slice(&seeded(64 << 10, 44));
    }
    v
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).unwrap();
        }
    }
}

#[test]
fn format2_repository_opens_restores_and_checks() {
    let env = Env::new();
    copy_dir(&fixture_dir(), &env.repo());
    let (gen1, gen2) = (GEN1.trim(), GEN2.trim());

    let list: serde_json::Value = serde_json::from_str(&env.ok(&["snapshots", "--json"])).unwrap();
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![gen1, gen2], "snapshot ids are content addresses");
    assert_eq!(list[0]["name"], "fixture.img");

    for (id, g) in [(gen1, 1), (gen2, 2)] {
        let want = env.path(&format!("want{g}.img"));
        std::fs::write(&want, fixture_image(g)).unwrap();
        let got = env.path(&format!("got{g}.img"));
        env.ok(&["restore", id, got.to_str().unwrap()]);
        assert_same(&want, &got);
        let digest = blake3::hash(&fixture_image(g)).to_hex().to_string();
        assert_eq!(list[g as usize - 1]["digest"], digest.as_str());
    }
    env.ok(&["check", "--read-data"]);
    env.ok(&["verify", "--all"]);
    // diff works from the old recipes: it covers the rewritten 64 KiB (at
    // chunk granularity) and nothing far from it.
    let out = env.run(&["diff", gen1, gen2]);
    assert_eq!(out.status.code(), Some(1), "they differ, as diff(1) says");
    let diff = String::from_utf8(out.stdout).unwrap();
    let ranges: Vec<(u64, u64)> = diff
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let mut f = l.split_whitespace().map(|x| x.parse::<u64>().unwrap());
            (f.next().unwrap(), f.next().unwrap())
        })
        .collect();
    assert_eq!(ranges.len(), 1, "{diff}");
    let (o, l) = ranges[0];
    assert!(
        o <= 256 << 10 && o + l >= 320 << 10 && l < 256 << 10,
        "{diff}"
    );

    // The protection recorded by the old build still holds.
    env.fails(&["forget", &gen1[..12]], "protected");
    // A new build keeps writing into it: a third generation deduplicates
    // against the old snapshots.
    let mut g3 = fixture_image(2);
    g3[1 << 20..(1 << 20) + 4096].fill(7);
    let img = env.path("fixture.img");
    std::fs::write(&img, &g3).unwrap();
    let r = env.backup(&img, &[]);
    assert!(r["new_chunks"].as_u64().unwrap() <= 2, "{r}");
    assert_eq!(r["parent"].as_str().unwrap(), gen2);
    env.ok(&["check", "--read-data"]);
}

/// Writes the fixture (run once, by hand, with the build that defines the
/// format): `IMGSTORE_FIXTURE_BIN=/path/to/old/imgstore cargo test --release
/// --test tests fixture::make -- --ignored`.
#[test]
#[ignore = "writes tests/fixtures/format2; run by hand when a format is frozen"]
fn make() {
    let bin = std::env::var("IMGSTORE_FIXTURE_BIN").unwrap_or_else(|_| BIN.to_string());
    let dir = fixture_dir();
    let _ = std::fs::remove_dir_all(&dir);
    let env = Env::new();
    let run = |args: &[&str]| {
        let o = std::process::Command::new(&bin)
            .arg("-r")
            .arg(&dir)
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    };
    run(&["init", "--chunk-size", "16K"]);
    let img = env.path("fixture.img");
    let mut ids = Vec::new();
    for g in [1, 2] {
        std::fs::write(&img, fixture_image(g)).unwrap();
        ids.push(run(&["backup", img.to_str().unwrap()]).trim().to_string());
    }
    run(&["protect", &ids[0]]);
    let _ = std::fs::remove_file(dir.join("lock"));
    // RocksDB's info logs are not part of the repository.
    for e in std::fs::read_dir(dir.join("db")).unwrap() {
        let e = e.unwrap();
        if e.file_name().to_string_lossy().starts_with("LOG") {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
    std::fs::write(dir.with_extension("gen1"), format!("{}\n", ids[0])).unwrap();
    std::fs::write(dir.with_extension("gen2"), format!("{}\n", ids[1])).unwrap();
}
