//! Old repositories stay readable: one fixture repository per format this
//! build reads (`imgstore_format::FormatVersion`), checked in under
//! `tests/fixtures/` (its README says how each was made).
//!
//! `tests/fixtures/format2` is a small repository written by the format-2
//! build (commit 4919c36, before the storage seam). Every later build must
//! open it, list it, restore both snapshots byte-exact, check it with
//! `--read-data`, verify it, and keep backing up into it. A format change
//! that breaks any of that fails here. `format3` (encrypted, with a
//! test-only key file) and `format4` (the objects of a bucket-backed
//! repository's bucket, uploaded into Garage and `recover`ed) are held to
//! the same, with the restored images' BLAKE3 digests as constants.
//!
//! The images are regenerated from seeds (`fixture_image`, `small_image`),
//! so the test knows every byte the snapshots must restore to.

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

// Formats 3 and 4: one small image in two generations, snapshot ids and
// image digests held as constants, so the tests fail when either changes.

/// Generation `g` (1 or 2) of the format-3 and format-4 fixtures' image:
/// 128 KiB random, 512 KiB of zeros, 128 KiB of text, a 5,000-byte random
/// tail; generation 2 has 16 KiB rewritten at 64 KiB.
fn small_image(g: u64) -> Vec<u8> {
    let mut v = seeded(128 << 10, 51);
    v.extend(std::iter::repeat_n(0u8, 512 << 10));
    v.extend(texty(128 << 10, 52));
    v.extend(seeded(5_000, 53));
    if g == 2 {
        v[64 << 10..80 << 10].copy_from_slice(&seeded(16 << 10, 54));
    }
    v
}

/// BLAKE3 of `small_image(1)` and `small_image(2)`: what every restore of
/// the format-3 and format-4 fixtures must hash to.
const SMALL_DIGESTS: [&str; 2] = [
    "8315368ac55e98b9cd2dd3761bed026cf3eb7cf9ee6e213460faa7aad5b5e16a",
    "5760a8f9ad53550b54ef804d548c8022f8198a9c91e3a6f7e3bf41ecf2c6337c",
];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn blake3_file(p: &Path) -> String {
    blake3::hash(&std::fs::read(p).unwrap())
        .to_hex()
        .to_string()
}

/// Restores both generations with `restore` (given the snapshot id and the
/// output path) and holds them to [`SMALL_DIGESTS`]; holds the listing's
/// ids to `ids` and its digests to the same constants.
fn small_snapshots_restore(
    env: &Env,
    list: &serde_json::Value,
    ids: [&str; 2],
    restore: impl Fn(&str, &Path),
) {
    for g in [1u64, 2] {
        assert_eq!(
            blake3::hash(&small_image(g)).to_hex().as_str(),
            SMALL_DIGESTS[g as usize - 1],
            "the seeded generator still makes the fixture's image"
        );
    }
    let listed: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    let mut want = ids.to_vec();
    let mut got = listed.clone();
    want.sort();
    got.sort();
    assert_eq!(got, want, "snapshot ids are content addresses");
    for (g, id) in ids.iter().enumerate() {
        let s = list
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == *id)
            .unwrap();
        assert_eq!(s["name"], "fixture.img");
        assert_eq!(s["digest"], SMALL_DIGESTS[g], "{s}");
        let out = env.path(&format!("restored{g}.img"));
        let _ = std::fs::remove_file(&out);
        restore(id, &out);
        assert_eq!(blake3_file(&out), SMALL_DIGESTS[g], "generation {}", g + 1);
    }
}

fn read_id(name: &str) -> String {
    std::fs::read_to_string(fixtures().join(name))
        .unwrap()
        .trim()
        .to_string()
}

fn config_version(dir: &Path) -> imgstore_format::FormatVersion {
    let bytes = std::fs::read(dir.join(imgstore_format::CONFIG_FILE)).unwrap();
    imgstore_format::RepoConfig::from_json(&bytes)
        .unwrap()
        .version
}

/// `tests/fixtures/format3`: an encrypted local repository opened with the
/// committed test-only key file `format3.key`, listed, restored exact,
/// checked with `--read-data`, verified, and written to again; without the
/// key it does not open.
#[test]
fn format3_encrypted_repository_opens_restores_and_checks() {
    use imgstore_format::FormatVersion;
    let env = Env::new();
    copy_dir(&fixtures().join("format3"), &env.repo());
    assert_eq!(config_version(&env.repo()), FormatVersion::V3);
    let key = fixtures().join("format3.key");
    let key = key.to_str().unwrap();
    let with_key = |args: &[&str]| -> String {
        let mut a = vec!["--key-file", key];
        a.extend_from_slice(args);
        let o = env
            .command()
            .args(&a)
            .env_remove("IMGSTORE_PASSWORD")
            .env_remove("IMGSTORE_KEY_FILE")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "imgstore {a:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    };
    let o = env
        .command()
        .args(["snapshots"])
        .env_remove("IMGSTORE_PASSWORD")
        .env_remove("IMGSTORE_KEY_FILE")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!o.status.success(), "an encrypted repository needs its key");

    let (gen1, gen2) = (read_id("format3.gen1"), read_id("format3.gen2"));
    let list: serde_json::Value =
        serde_json::from_str(&with_key(&["snapshots", "--json"])).unwrap();
    small_snapshots_restore(&env, &list, [&gen1, &gen2], |id, out| {
        with_key(&["restore", id, out.to_str().unwrap()]);
    });
    with_key(&["check", "--read-data"]);
    with_key(&["verify", "--all"]);
    let mut g3 = small_image(2);
    g3[600 << 10..(600 << 10) + 4096].fill(7);
    let img = env.path("fixture.img");
    std::fs::write(&img, &g3).unwrap();
    let r: serde_json::Value = serde_json::from_str(
        with_key(&["backup", img.to_str().unwrap(), "--json"])
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    assert!(r["new_chunks"].as_u64().unwrap() <= 2, "{r}");
    assert_eq!(r["parent"].as_str().unwrap(), gen2);
    with_key(&["check", "--read-data"]);
}

/// Where the format-4 fixture lives in the test bucket.
const FORMAT4_PREFIX: &str = "format4";

/// `tests/fixtures/format4`: the objects of a bucket-backed repository's
/// bucket, one file each. They are uploaded into a fresh Garage node, the
/// repository is rebuilt from them with `recover`, listed, restored exact
/// and checked with `--read-data`, and written to again.
#[test]
fn format4_bucket_repository_recovers_restores_and_checks() {
    use crate::bucket::{garage, ok, BUCKET};
    use imgstore_format::FormatVersion;
    let env = Env::new();
    let node = garage(&env);
    let ep = node.endpoint();
    bucket_copy_in_child(&ep, &fixtures().join("format4"), true);
    let repo = env.repo();
    let url = format!("s3://{BUCKET}/{FORMAT4_PREFIX}");
    let r: serde_json::Value = serde_json::from_str(
        ok(&env, &repo, &ep, &["recover", &url, "--json"])
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(r["snapshots"], 2, "{r}");
    assert_eq!(r["missing"], 0, "{r}");
    assert_eq!(config_version(&repo), FormatVersion::V4);

    let (gen1, gen2) = (read_id("format4.gen1"), read_id("format4.gen2"));
    let list: serde_json::Value =
        serde_json::from_str(&ok(&env, &repo, &ep, &["snapshots", "--json"])).unwrap();
    let s1 = list
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == gen1.as_str())
        .unwrap();
    assert_eq!(s1["protected"], true, "{s1}");
    small_snapshots_restore(&env, &list, [&gen1, &gen2], |id, out| {
        ok(&env, &repo, &ep, &["restore", id, out.to_str().unwrap()]);
    });
    ok(&env, &repo, &ep, &["check", "--read-data"]);
    let mut g3 = small_image(2);
    g3[600 << 10..(600 << 10) + 4096].fill(7);
    let img = env.path("fixture.img");
    std::fs::write(&img, &g3).unwrap();
    let r: serde_json::Value = serde_json::from_str(
        ok(
            &env,
            &repo,
            &ep,
            &["backup", img.to_str().unwrap(), "--json"],
        )
        .lines()
        .last()
        .unwrap(),
    )
    .unwrap();
    assert!(r["new_chunks"].as_u64().unwrap() <= 2, "{r}");
    assert_eq!(r["parent"].as_str().unwrap(), gen2);
    ok(&env, &repo, &ep, &["check", "--read-data"]);
    drop(node);
}

/// Copies the objects under `FORMAT4_PREFIX` between the bucket at
/// `endpoint` and `dir` (one file per object, at its path) in a child
/// process: the bucket client takes its credentials from the environment,
/// which a test may not change in its own (shared) process.
fn bucket_copy_in_child(endpoint: &str, dir: &Path, to_bucket: bool) {
    use crate::bucket::{ACCESS_KEY, SECRET_KEY};
    let o = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "fixture::bucket_copy", "--ignored"])
        .args(["--test-threads", "1", "--nocapture"])
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_SESSION_TOKEN")
        .env("FIXTURE_COPY_ENDPOINT", endpoint)
        .env("FIXTURE_COPY_DIR", dir)
        .env("FIXTURE_COPY_TO", if to_bucket { "bucket" } else { "dir" })
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && out.contains("1 passed"),
        "bucket copy: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The child half of [`bucket_copy_in_child`] (does nothing when run
/// otherwise).
#[test]
#[ignore = "run by the format-4 fixture tests in a child process"]
fn bucket_copy() {
    use imgstore_bucket::{Bucket, BucketSpec, Tuning};
    use imgstore_format::pack;
    let (Ok(ep), Ok(dir), Ok(to)) = (
        std::env::var("FIXTURE_COPY_ENDPOINT"),
        std::env::var("FIXTURE_COPY_DIR"),
        std::env::var("FIXTURE_COPY_TO"),
    ) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let spec = BucketSpec {
        bucket: crate::bucket::BUCKET.into(),
        prefix: FORMAT4_PREFIX.into(),
        endpoint: Some(ep),
        region: "garage".into(),
    };
    let b = Bucket::connect(&spec, Tuning::default()).unwrap();
    if to == "bucket" {
        for f in crate::bucket::files_under(&dir) {
            let rel = f.strip_prefix(&dir).unwrap().to_str().unwrap().to_string();
            b.put(&rel, std::fs::read(&f).unwrap()).unwrap();
        }
    } else {
        let mut objects = vec![pack::CONFIG_OBJECT.to_string(), pack::OWNER_OBJECT.into()];
        for d in [pack::PACKS_DIR, pack::SNAPSHOTS_DIR] {
            objects.extend(b.list(d).unwrap().into_iter().map(|(p, _)| p));
        }
        for p in objects {
            let dst = dir.join(&p);
            std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
            std::fs::write(&dst, b.get(&p, u64::MAX).unwrap()).unwrap();
        }
    }
}

/// Writes `tests/fixtures/format3` (and `format3.key`, `.gen1`, `.gen2`)
/// with the current build: run by hand when a format is frozen, `cargo
/// test --release --test tests fixture::make_format3 -- --ignored`.
#[test]
#[ignore = "writes tests/fixtures/format3; run by hand when a format is frozen"]
fn make_format3() {
    let dir = fixtures().join("format3");
    let key = fixtures().join("format3.key");
    let _ = std::fs::remove_dir_all(&dir);
    // A test-only key file (fixed text, committed): not a secret.
    std::fs::write(
        &key,
        "imgstore-fixture-format3-test-only-key-0123456789abcdef\n",
    )
    .unwrap();
    let env = Env::new();
    let run = |args: &[&str]| {
        let o = std::process::Command::new(BIN)
            .arg("-r")
            .arg(&dir)
            .arg("--key-file")
            .arg(&key)
            .args(args)
            .env_remove("IMGSTORE_PASSWORD")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    };
    run(&["init", "--encryption", "--chunk-size", "16K"]);
    let img = env.path("fixture.img");
    let mut ids = Vec::new();
    for g in [1, 2] {
        std::fs::write(&img, small_image(g)).unwrap();
        ids.push(run(&["backup", img.to_str().unwrap()]).trim().to_string());
    }
    run(&["protect", &ids[0]]);
    tidy_repository(&dir);
    std::fs::write(dir.with_extension("gen1"), format!("{}\n", ids[0])).unwrap();
    std::fs::write(dir.with_extension("gen2"), format!("{}\n", ids[1])).unwrap();
}

/// Writes `tests/fixtures/format4` (the bucket's objects) and its `.gen1`,
/// `.gen2` with the current build and a Garage node: `cargo test --release
/// --test tests fixture::make_format4 -- --ignored`.
#[test]
#[ignore = "writes tests/fixtures/format4; run by hand when a format is frozen"]
fn make_format4() {
    use crate::bucket::{garage, ok, BUCKET};
    let dir = fixtures().join("format4");
    let _ = std::fs::remove_dir_all(&dir);
    let env = Env::new();
    let node = garage(&env);
    let ep = node.endpoint();
    let repo = env.repo();
    let url = format!("s3://{BUCKET}/{FORMAT4_PREFIX}");
    ok(
        &env,
        &repo,
        &ep,
        &[
            "init",
            "--storage",
            &url,
            "--chunk-size",
            "16K",
            "--pack-size",
            "1M",
            "--cache-size",
            "0",
        ],
    );
    let img = env.path("fixture.img");
    let mut ids = Vec::new();
    for g in [1, 2] {
        std::fs::write(&img, small_image(g)).unwrap();
        ids.push(
            ok(&env, &repo, &ep, &["backup", img.to_str().unwrap()])
                .trim()
                .to_string(),
        );
    }
    ok(&env, &repo, &ep, &["protect", &ids[0]]);
    bucket_copy_in_child(&ep, &dir, false);
    std::fs::write(dir.with_extension("gen1"), format!("{}\n", ids[0])).unwrap();
    std::fs::write(dir.with_extension("gen2"), format!("{}\n", ids[1])).unwrap();
    drop(node);
}

/// Drops what is not part of a repository: the lock file and RocksDB's
/// info logs.
fn tidy_repository(dir: &Path) {
    let _ = std::fs::remove_file(dir.join("lock"));
    for e in std::fs::read_dir(dir.join("db")).unwrap() {
        let e = e.unwrap();
        if e.file_name().to_string_lossy().starts_with("LOG") {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
}
