//! Encrypted repositories (format 3) through the real binary: round trips,
//! no plaintext on disk, keys and passphrases, tampering.

use std::collections::HashSet;
use std::fs;
use std::path::Path;
use std::process::{Output, Stdio};

use crate::util::*;

const PASS: &str = "correct horse battery staple";

fn run(env: &Env, pass: Option<&str>, args: &[&str]) -> Output {
    let mut c = env.command();
    c.args(args)
        .stdin(Stdio::null())
        .env_remove("IMGSTORE_PASSWORD");
    if let Some(p) = pass {
        c.env("IMGSTORE_PASSWORD", p);
    }
    c.output().unwrap()
}

fn ok(env: &Env, args: &[&str]) -> String {
    let o = run(env, Some(PASS), args);
    assert!(
        o.status.success(),
        "imgstore {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn encrypted_env() -> Env {
    let env = Env::new();
    ok(&env, &["init", "--encryption"]);
    let cfg = fs::read_to_string(env.repo().join("imgstore.json")).unwrap();
    assert!(
        cfg.contains("\"version\": 3") && cfg.contains("xchacha20poly1305-blake3"),
        "{cfg}"
    );
    assert!(!cfg.contains(PASS));
    env
}

/// Every file under `dir`, read whole.
fn all_files(dir: &Path) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(all_files(&p));
        } else if let Ok(b) = fs::read(&p) {
            out.push(b);
        }
    }
    out
}

#[test]
fn an_encrypted_repository_round_trips_and_holds_no_plaintext() {
    if !have("mkfs.ext4") {
        eprintln!("SKIP: needs e2fsprogs");
        return;
    }
    let env = encrypted_env();
    let tree = env.path("tree");
    populate(&tree, 21);
    let marker = b"IMGSTORE-SECRET-MARKER-7f3a9c";
    fs::write(tree.join("marker.txt"), marker.repeat(2000)).unwrap();
    let img = env.path("disk.img");
    mkfs_ext4(&img, &tree, 48);
    let g0 = env.path("g0.img");
    fs::copy(&img, &g0).unwrap();
    let g1 = next_generation(&env, &img, 1, 600_000, 77, "notes", "bin/prog2");
    let r0: serde_json::Value = serde_json::from_str(&ok(
        &env,
        &["backup", g0.to_str().unwrap(), "--name", "vm", "--json"],
    ))
    .unwrap();
    let r1: serde_json::Value = serde_json::from_str(&ok(
        &env,
        &["backup", g1.to_str().unwrap(), "--name", "vm", "--json"],
    ))
    .unwrap();
    let (id0, id1) = (r0["id"].as_str().unwrap(), r1["id"].as_str().unwrap());
    assert!(
        r1["new_chunks"].as_u64().unwrap() < r1["chunks"].as_u64().unwrap() / 2,
        "dedup across generations: {r1}"
    );
    // Restores, delta restore, verify, check, diff.
    let out = env.path("out.img");
    ok(&env, &["restore", id1, out.to_str().unwrap()]);
    assert_same(&out, &g1);
    let delta = env.path("delta.img");
    fs::copy(&g0, &delta).unwrap();
    ok(&env, &["restore", id1, "--delta", delta.to_str().unwrap()]);
    assert_same(&delta, &g1);
    ok(&env, &["verify", "--all"]);
    ok(&env, &["check", "--read-data"]);
    let o = run(&env, Some(PASS), &["diff", id0, id1]);
    assert_eq!(o.status.code(), Some(1));
    // The digest users see is still b3sum's.
    let snaps: Vec<serde_json::Value> =
        serde_json::from_str(&ok(&env, &["snapshots", "--json"])).unwrap();
    let digest = snaps.iter().find(|s| s["id"] == id1).unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        digest,
        blake3::hash(&fs::read(&g1).unwrap()).to_hex().to_string()
    );

    // No plaintext anywhere in the repository: not the marker, not the
    // image name, not the first 32 bytes of any 4 KiB block of the image
    // that is not a repeated byte.
    let image = fs::read(&g1).unwrap();
    let mut blocks: HashSet<&[u8]> = HashSet::new();
    for b in image.chunks(4096) {
        let head = &b[..32.min(b.len())];
        if head.len() == 32 && head.iter().any(|x| *x != head[0]) {
            blocks.insert(head);
        }
    }
    assert!(blocks.len() > 100, "the image has data blocks");
    for file in all_files(&env.repo()) {
        assert!(
            !file.windows(marker.len()).any(|w| w == marker),
            "the marker is stored in clear"
        );
        if let Some(w) = file.windows(32).find(|w| blocks.contains(w)) {
            panic!("a block of the image is stored in clear: {:02x?}", &w[..8]);
        }
    }

    // Forget and gc work on sealed records.
    ok(&env, &["forget", id0, "--prune"]);
    ok(&env, &["check", "--read-data"]);
    ok(&env, &["restore", id1, "--force", out.to_str().unwrap()]);
    assert_same(&out, &g1);
}

#[test]
fn keys_passphrases_and_wrong_secrets() {
    let env = encrypted_env();
    let img = env.path("a.img");
    fs::write(&img, seeded(3 << 20, 5)).unwrap();
    ok(&env, &["backup", img.to_str().unwrap()]);
    let before = fs::read(env.repo().join("imgstore.json")).unwrap();
    // Wrong passphrase, no passphrase: one line, exit 2, nothing changed.
    for pass in [Some("wrong"), None] {
        let o = run(&env, pass, &["snapshots"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(!err.contains(PASS));
    }
    let o = run(&env, Some("wrong"), &["backup", img.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(fs::read(env.repo().join("imgstore.json")).unwrap(), before);
    // A key file slot; it opens alone.
    let kf = env.path("recovery.key");
    ok(
        &env,
        &["key", "add", "--new-key-file", kf.to_str().unwrap()],
    );
    let list = ok(&env, &["key", "list"]);
    assert_eq!(list.lines().count(), 3, "{list}");
    let o = run(
        &env,
        None,
        &["--key-file", kf.to_str().unwrap(), "snapshots"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let missing = env.path("nope.key");
    let o = run(
        &env,
        None,
        &["--key-file", missing.to_str().unwrap(), "snapshots"],
    );
    assert_ne!(o.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr)
            .trim_end()
            .lines()
            .count(),
        1
    );
    // A new passphrase for the first slot; the old one stops working.
    let first = list
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let o = env
        .command()
        .args(["key", "passwd", &first])
        .env("IMGSTORE_PASSWORD", PASS)
        .env("IMGSTORE_NEW_PASSWORD", "new pass")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(run(&env, Some(PASS), &["snapshots"]).status.code(), Some(2));
    assert!(run(&env, Some("new pass"), &["snapshots"]).status.success());
    // Removing the key-file slot; the last slot cannot go.
    let key_slot = ok_with(&env, "new pass", &["key", "list"])
        .lines()
        .nth(2)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    ok_with(&env, "new pass", &["key", "remove", &key_slot]);
    let o = run(
        &env,
        None,
        &["--key-file", kf.to_str().unwrap(), "snapshots"],
    );
    assert_eq!(o.status.code(), Some(2), "a removed slot still opens");
    let o = run(&env, Some("new pass"), &["key", "remove", &first]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("last key slot"));
}

fn ok_with(env: &Env, pass: &str, args: &[&str]) -> String {
    let o = run(env, Some(pass), args);
    assert!(
        o.status.success(),
        "imgstore {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn tampering_with_stored_data_is_found_never_served() {
    let env = encrypted_env();
    let img = env.path("t.img");
    fs::write(&img, seeded(24 << 20, 9)).unwrap();
    let id = serde_json::from_str::<serde_json::Value>(&ok(
        &env,
        &["backup", img.to_str().unwrap(), "--json"],
    ))
    .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Without the key, the host reads every sealed chunk through RocksDB's
    // checksums: clean now, damaged once a byte is flipped below.
    let v = keyless_read_data(&env);
    assert!(v["chunks_read"].as_u64().unwrap() >= 24, "{v}");
    assert!(v["bytes_read"].as_u64().unwrap() > 24 << 20, "{v}");
    let blob = fs::read_dir(env.repo().join("db"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "blob"))
        .unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&blob)
            .unwrap();
        let len = f.metadata().unwrap().len();
        let mut b = [0u8];
        f.read_exact_at(&mut b, len / 2).unwrap();
        b[0] ^= 0x10;
        f.write_all_at(&b, len / 2).unwrap();
    }
    let out = env.path("t-out.img");
    let o = run(&env, Some(PASS), &["restore", &id, out.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(5), "{err}");
    assert!(err.contains("damaged"), "{err}");
    assert!(!out.exists());
    let o = run(&env, Some(PASS), &["check", "--read-data"]);
    assert_eq!(o.status.code(), Some(5));
    let o = run(&env, None, &["check", "--without-key", "--read-data"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(5), "{text}");
    assert!(text.contains("chunks table is damaged"), "{text}");
    // Without --read-data the damage the keyed check marked is reported too.
    let o = run(&env, None, &["check", "--without-key"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(5), "{text}");
    assert!(text.contains("marked damaged earlier"), "{text}");
}

/// gc needs no key: the host of an encrypted repository (its server, or
/// the machine holding a copy) reclaims forgotten data without ever being
/// able to read it; what stays is intact.
#[test]
fn gc_runs_without_the_key_and_keeps_what_is_live() {
    let env = encrypted_env();
    let a = env.path("a.img");
    let b = env.path("b.img");
    fs::write(&a, seeded(6 << 20, 41)).unwrap();
    fs::write(&b, seeded(6 << 20, 42)).unwrap();
    let ia: serde_json::Value =
        serde_json::from_str(&ok(&env, &["backup", a.to_str().unwrap(), "--json"])).unwrap();
    ok(&env, &["backup", b.to_str().unwrap()]);
    ok(&env, &["forget", ia["id"].as_str().unwrap()]);
    for args in [&["gc", "--dry-run", "--json"][..], &["gc", "--json"][..]] {
        let o = run(&env, None, args);
        assert!(
            o.status.success(),
            "{args:?} without the key: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert!(v["chunks_removed"].as_u64().unwrap() > 50, "{v}");
    }
    // Reading still needs the key.
    let o = run(&env, None, &["snapshots"]);
    assert_eq!(o.status.code(), Some(2));
    ok(&env, &["check", "--read-data"]);
    let out = env.path("out.img");
    ok(
        &env,
        &[
            "restore",
            "latest",
            "--name",
            "b.img",
            out.to_str().unwrap(),
        ],
    );
    assert_same(&out, &b);
}

/// `check --without-key` on the host of an encrypted repository: the
/// reference graph from the clear child ids agrees with the keyed check,
/// object for object, and reading data still needs the key.
#[test]
fn check_without_the_key_agrees_with_the_keyed_check() {
    let env = encrypted_env();
    let gens = ext4_generations(&env);
    let mut ids = Vec::new();
    for g in &gens {
        let v: serde_json::Value =
            serde_json::from_str(&ok(&env, &["backup", g.to_str().unwrap(), "--json"])).unwrap();
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    ok(&env, &["forget", &ids[0]]);
    let counts = |v: &serde_json::Value| {
        ["snapshots", "chunks", "regions", "pages", "orphans"]
            .map(|k| v[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}")))
    };
    let keyed: serde_json::Value = serde_json::from_str(&ok(&env, &["check", "--json"])).unwrap();
    let o = run(&env, None, &["check", "--without-key", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let keyless: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(counts(&keyless), counts(&keyed), "{keyless} vs {keyed}");
    assert!(
        counts(&keyless)[4] > 0,
        "the forgotten snapshot left orphans"
    );
    // Reading data without the key checks the ciphertext as stored: every
    // stored chunk, orphans included.
    let v = keyless_read_data(&env);
    assert_eq!(
        v["chunks_read"].as_u64().unwrap(),
        counts(&keyed)[1],
        "{v} vs {keyed}"
    );
    // Plaintext checks still need the key.
    let o = run(&env, None, &["check", "--read-data"]);
    assert_eq!(o.status.code(), Some(2), "reading plaintext needs the key");
}

/// `check --without-key --read-data --json`, which must succeed; its report.
fn keyless_read_data(env: &Env) -> serde_json::Value {
    let o = run(
        env,
        None,
        &["check", "--without-key", "--read-data", "--json"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}
