//! Snapshot records that cannot be read. A backup token can commit a
//! record shaped like a sealed one that does not open (a server without
//! the key can check only that its id is the hash of its bytes); such a
//! record must be reported and skipped — never fatal to listing, restore,
//! backup or forget — flagged by `check`, and removable by its id.

use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use crate::server::Served;
use crate::util::*;

const PASS: &str = "records test passphrase";

/// Runs the binary with the passphrase on the repository (or `-r`
/// overridden by `args`, for a client of the server).
fn run(env: &Env, args: &[&str]) -> Output {
    env.command()
        .args(args)
        .env("IMGSTORE_PASSWORD", PASS)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn ok(env: &Env, args: &[&str]) -> (String, String) {
    let o = run(env, args);
    let (out, err) = (
        String::from_utf8(o.stdout).unwrap(),
        String::from_utf8(o.stderr).unwrap(),
    );
    assert!(o.status.success(), "imgstore {args:?}: {out}{err}");
    assert!(!err.contains("panicked"), "{err}");
    (out, err)
}

/// Asserts `err` warns, on one line, about the unreadable record `id`.
fn warns_about(err: &str, id: &str) {
    let lines: Vec<&str> = err.lines().filter(|l| l.contains(id)).collect();
    assert_eq!(lines.len(), 1, "one warning line for {id}: {err:?}");
    assert!(
        lines[0].contains("warning")
            && lines[0].contains("cannot be read")
            && lines[0].contains("imgstore forget"),
        "{err:?}"
    );
}

/// `curl` with a bearer token; returns the answer's body, which must be
/// JSON.
fn curl_json(token: &str, url: &str, extra: &[&str]) -> serde_json::Value {
    let o = Command::new("curl")
        .args(["-sk", "--max-time", "60", "-H"])
        .arg(format!("Authorization: Bearer {}", token.trim()))
        .args(extra)
        .arg(url)
        .output()
        .unwrap();
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "curl {url}: {e}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

/// Commits through the server, with the web namespace's backup token, a
/// 46-byte snapshot record shaped like a sealed one (magic, kind `S`, no
/// page, a nonce and a tag) that no key opens. Returns its id.
fn plant_junk(env: &Env, addr: &str) -> String {
    let token = fs::read_to_string(env.path("web-backup.token")).unwrap();
    let base = format!("https://{addr}");
    let reply = curl_json(
        &token,
        &format!("{base}/v1/sessions"),
        &[
            "-H",
            "content-type: application/json",
            "--data",
            r#"{"image":"web-x"}"#,
        ],
    );
    let session = reply["session"]
        .as_str()
        .unwrap_or_else(|| panic!("no session: {reply}"))
        .to_string();
    let mut junk = vec![
        imgstore_format::sealed::SEALED_RECORD_MAGIC,
        b'S',
        0,
        0,
        0,
        0,
    ];
    junk.extend(seeded(
        imgstore_format::sealed::SEAL_NONCE + imgstore_format::sealed::SEAL_TAG,
        46,
    ));
    assert_eq!(junk.len(), 46);
    let body = env.path("junk-commit.bin");
    fs::write(&body, imgstore_protocol::encode_commit(&junk, None, &[])).unwrap();
    let reply = curl_json(
        &token,
        &format!("{base}/v1/commit"),
        &[
            "-H",
            &format!("imgstore-session: {session}"),
            "-H",
            "content-type: application/octet-stream",
            "--data-binary",
            &format!("@{}", body.display()),
        ],
    );
    let id = imgstore_format::Id::hash(&junk).to_hex();
    assert_eq!(reply["id"].as_str(), Some(id.as_str()), "commit: {reply}");
    id
}

fn backup_json(env: &Env, img: &Path, extra: &[&str]) -> (serde_json::Value, String) {
    let mut args = vec![
        "backup",
        img.to_str().unwrap(),
        "--name",
        "web-disk",
        "--json",
    ];
    args.extend_from_slice(extra);
    let (out, err) = ok(env, &args);
    (serde_json::from_str(&out).unwrap(), err)
}

/// One junk record planted through the server in an encrypted repository:
/// through the server and on the repository's directory, `snapshots`
/// lists the good ones and warns, restore and backup work, retention skips
/// it, `check` reports it, and `forget ID` removes it.
#[test]
fn one_junk_snapshot_record_is_reported_and_skipped_never_fatal() {
    if !have("mkfs.ext4") || !have("curl") {
        eprintln!("SKIP: needs e2fsprogs and curl");
        return;
    }
    let env = Env::new();
    ok(&env, &["init", "--encryption"]);
    fs::create_dir_all(env.repo().join("server")).unwrap();
    fs::write(
        env.repo().join("server/config.toml"),
        "[namespaces]\nweb = [\"web-*\"]\n",
    )
    .unwrap();
    for (name, role) in [("admin", "admin"), ("web-backup", "backup")] {
        let out = env.path(&format!("{name}.token"));
        let mut args = vec![
            "token",
            "add",
            name,
            "--role",
            role,
            "--output",
            out.to_str().unwrap(),
        ];
        if role == "backup" {
            args.extend(["--namespace", "web"]);
        }
        ok(&env, &args);
    }

    // Two real images, backed up on the repository's host.
    let mut imgs = Vec::new();
    for seed in [1u64, 2] {
        let tree = env.path(&format!("tree{seed}"));
        populate(&tree, seed);
        let img = env.path(&format!("disk{seed}.img"));
        mkfs_ext4(&img, &tree, 24);
        imgs.push(img);
    }
    let (first, _) = backup_json(&env, &imgs[0], &[]);
    let (second, _) = backup_json(&env, &imgs[1], &[]);
    let id2 = second["id"].as_str().unwrap().to_string();
    assert_eq!(second["parent"], first["id"]);

    // The junk, the way a backup token can plant it.
    let mut server = Served::start(&env, "127.0.0.1:0");
    let (addr, fp) = (server.addr.clone(), server.fp.clone());
    let junk = plant_junk(&env, &addr);
    let short = &junk[..8];

    // Through the server: the listings of the admin and of the namespace
    // the junk went into, and a backup choosing its parent.
    let url = format!("imgstores://{addr}/");
    let client = |token: &str, args: &[&str]| {
        let mut all = vec!["-r", url.as_str(), "--token-file"];
        let t = env.path(&format!("{token}.token"));
        let t = t.to_str().unwrap().to_string();
        all.push(&t);
        all.extend_from_slice(args);
        let o = Command::new(BIN)
            .args(&all)
            .env("IMGSTORE_STATE_DIR", env.state_dir())
            .env("IMGSTORE_CACHE_DIR", env.path("cache"))
            .env("IMGSTORE_PASSWORD", PASS)
            .env("IMGSTORE_SERVER_FINGERPRINT", &fp)
            .env_remove("IMGSTORE_TOKEN")
            .env_remove("IMGSTORE_REPO")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let (out, err) = (
            String::from_utf8(o.stdout).unwrap(),
            String::from_utf8(o.stderr).unwrap(),
        );
        assert!(
            o.status.success(),
            "imgstore {args:?} via server: {out}{err}"
        );
        (out, err)
    };
    let (out, err) = client("admin", &["snapshots", "--json"]);
    warns_about(&err, &junk);
    let listed: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.len(), 3, "{out}");
    let (out, err) = client("web-backup", &["snapshots", "--json"]);
    warns_about(&err, &junk);
    let listed: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.len(), 1, "the namespace sees only its junk: {out}");
    let (out, err) = client(
        "admin",
        &[
            "backup",
            imgs[1].to_str().unwrap(),
            "--name",
            "web-disk",
            "--json",
        ],
    );
    warns_about(&err, &junk);
    let third: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(third["parent"].as_str(), Some(id2.as_str()));
    let id3 = third["id"].as_str().unwrap().to_string();
    server.kill9();

    // On the repository's directory: the listing shows the good ones and
    // warns about the junk, once.
    let (out, err) = ok(&env, &["snapshots"]);
    warns_about(&err, &junk);
    assert!(out.contains("3 snapshots"), "{out}");
    assert!(!out.contains(short), "{out}");
    let (out, _) = ok(&env, &["snapshots", "--json", "--name", "web-disk"]);
    let listed: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.len(), 4, "{out}");
    assert_eq!(listed[0]["id"].as_str(), Some(junk.as_str()));
    assert!(listed[0]["unreadable"].is_string(), "{out}");
    assert!(listed[1..]
        .iter()
        .all(|v| v["name"] == "web-disk" && v.get("unreadable").is_none()));
    assert_eq!(listed[3]["id"].as_str(), Some(id3.as_str()), "newest last");

    // check reports it (exit 5, damage), naming it.
    let o = run(&env, &["check"]);
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert_eq!(o.status.code(), Some(5), "{out}{err}");
    assert!(out.contains(&junk), "{out}");

    // Restore by name and latest, and by the junk's id (an error that says
    // what it is).
    let back = env.path("back.img");
    let (_, err) = ok(
        &env,
        &[
            "restore",
            "latest",
            "--name",
            "web-disk",
            back.to_str().unwrap(),
        ],
    );
    warns_about(&err, &junk);
    assert_same(&back, &imgs[1]);
    let o = run(
        &env,
        &["restore", short, env.path("x.img").to_str().unwrap()],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(5), "{err}");
    assert!(
        err.contains("cannot be read") && err.contains(&junk),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    // A choice that fails says that records were skipped, in its one line.
    let o = run(
        &env,
        &[
            "restore",
            "latest",
            "--name",
            "web-none",
            env.path("x.img").to_str().unwrap(),
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(6), "{err}");
    assert!(err.contains("1 snapshot record cannot be read"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");

    // A new backup of the same image chooses its parent among the readable.
    let (fourth, err) = backup_json(&env, &imgs[0], &[]);
    warns_about(&err, &junk);
    assert_eq!(fourth["parent"].as_str(), Some(id3.as_str()));
    let id4 = fourth["id"].as_str().unwrap().to_string();

    // Retention: neither fails nor chooses the junk; it is listed as kept.
    let (out, err) = ok(
        &env,
        &["forget", "--keep-last", "1", "--name", "web-disk", "--json"],
    );
    warns_about(&err, &junk);
    let plan: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let j = plan
        .iter()
        .find(|d| d["id"].as_str() == Some(junk.as_str()))
        .unwrap_or_else(|| panic!("junk not in {out}"));
    assert_eq!(j["keep"], true);
    assert_eq!(j["reasons"], serde_json::json!(["unreadable"]));
    let removed: Vec<&serde_json::Value> = plan.iter().filter(|d| d["keep"] == false).collect();
    assert_eq!(removed.len(), 3, "{out}");
    let (out, _) = ok(&env, &["snapshots", "--json"]);
    let listed: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.len(), 2, "{out}");
    assert_eq!(listed[1]["id"].as_str(), Some(id4.as_str()));

    // forget ID removes it; then nothing warns and check is clean.
    let (out, err) = ok(&env, &["forget", short]);
    assert!(!err.contains("warning"), "{err}");
    assert!(out.contains("1 snapshot removed"), "{out}");
    let (out, err) = ok(&env, &["snapshots"]);
    assert!(err.is_empty(), "{err}");
    assert!(out.contains("1 snapshot"), "{out}");
    ok(&env, &["check"]);
    let (_, err) = ok(
        &env,
        &[
            "restore",
            "latest",
            "--name",
            "web-disk",
            back.to_str().unwrap(),
            "--force",
        ],
    );
    assert!(err.is_empty() || !err.contains("warning"), "{err}");
    assert_same(&back, &imgs[0]);
}
