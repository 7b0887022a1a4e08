//! The client against a server it should not trust: one that answers for
//! a plain repository when the client holds a key, or for another
//! repository than the one the client recorded at the URL (the
//! known-repositories record, trust on first use) — refused before
//! anything is sent, with exit 8 and one line saying what to do; and
//! `imgstore://` (plain HTTP on loopback) working at all.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::server::Served;
use crate::util::*;

/// Exit code of a server repository that is not the one expected.
const UNTRUSTED: i32 = 8;

/// A running `imgstore server` (killed on drop) and its certificate's
/// fingerprint, if it serves TLS.
struct Server {
    served: Served,
    addr: String,
    fp: Option<String>,
}

impl Server {
    /// Serves `env`'s repository on `listen` with `extra` flags.
    fn start(env: &Env, listen: &str, extra: &[&str]) -> Server {
        let served = Served::start_with(env, listen, extra);
        Server {
            addr: served.addr.clone(),
            fp: (!served.fp.is_empty()).then(|| served.fp.clone()),
            served,
        }
    }

    fn stop(mut self) {
        self.served.kill9();
    }
}

/// An admin token for `env`'s repository, in a file.
fn admin_token(env: &Env) -> PathBuf {
    fs::create_dir_all(env.repo().join("server")).unwrap();
    let out = env.path("admin.token");
    env.ok(&[
        "token",
        "add",
        "ops",
        "--role",
        "admin",
        "--output",
        out.to_str().unwrap(),
    ]);
    out
}

/// Makes `to`'s server answer with `from`'s certificate and tokens: the
/// client's pinned fingerprint and token work against either.
fn same_identity(from: &Env, to: &Env) {
    let tls = to.repo().join("server/tls");
    fs::create_dir_all(&tls).unwrap();
    for f in ["cert.pem", "key.pem"] {
        fs::copy(from.repo().join("server/tls").join(f), tls.join(f)).unwrap();
    }
    fs::copy(
        from.repo().join("server/tokens.json"),
        to.repo().join("server/tokens.json"),
    )
    .unwrap();
}

/// The imgstore binary as a client of `url`, recording what it sees in
/// `state`, with no secret from the environment.
fn client(url: &str, fp: Option<&str>, token: &Path, state: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.arg("-r")
        .arg(url)
        .arg("--token-file")
        .arg(token)
        .env("IMGSTORE_STATE_DIR", state)
        .env("IMGSTORE_CACHE_DIR", state.join("cache"))
        .env_remove("IMGSTORE_TOKEN")
        .env_remove("IMGSTORE_REPO")
        .env_remove("IMGSTORE_PASSWORD")
        .env_remove("IMGSTORE_KEY_FILE")
        .env_remove("IMGSTORE_PASSWORD_FILE")
        .env_remove("IMGSTORE_PASSWORD_COMMAND")
        .stdin(Stdio::null());
    match fp {
        Some(f) => c.env("IMGSTORE_SERVER_FINGERPRINT", f),
        None => c.env_remove("IMGSTORE_SERVER_FINGERPRINT"),
    };
    c
}

fn run(mut c: Command, args: &[&str]) -> Output {
    c.args(args).output().unwrap()
}

fn ok(c: Command, args: &[&str]) -> String {
    let o = run(c, args);
    assert!(
        o.status.success(),
        "imgstore {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// Fails with exit 8 and one line holding every needle; returns it.
fn refused(c: Command, args: &[&str], needles: &[&str]) -> String {
    let o = run(c, args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(UNTRUSTED), "imgstore {args:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err:?}");
    assert!(err.starts_with("imgstore: error: "), "{err}");
    for n in needles {
        assert!(err.contains(n), "imgstore {args:?}: {n:?} not in {err:?}");
    }
    assert!(!err.contains("panicked"), "{err}");
    err
}

fn repo_id(env: &Env) -> String {
    let v: serde_json::Value =
        serde_json::from_slice(&fs::read(env.repo().join("imgstore.json")).unwrap()).unwrap();
    v["id"].as_str().unwrap().to_string()
}

/// What the record in `state` says of `url`.
fn recorded(state: &Path, url: &str) -> Option<serde_json::Value> {
    let bytes = fs::read(state.join("known-repos.json")).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    v["repositories"].get(url).cloned()
}

/// The repository (its server stopped) holds no snapshot and no data;
/// `secret`: the flags that open it.
fn received_nothing(env: &Env, secret: &[&str]) {
    let snaps: Vec<serde_json::Value> =
        serde_json::from_str(&env.ok(&[secret, &["snapshots", "--json"]].concat())).unwrap();
    assert!(snaps.is_empty(), "{snaps:?}");
    let stats: serde_json::Value =
        serde_json::from_str(&env.ok(&[secret, &["stats", "--json"]].concat())).unwrap();
    for field in ["chunks", "regions", "pages", "orphans"] {
        assert_eq!(stats[field], 0, "{field}: {stats}");
    }
}

fn key_file(env: &Env) -> PathBuf {
    let k = env.path("repo.key");
    fs::write(&k, format!("{}\n", "5a".repeat(32))).unwrap();
    k
}

fn encrypted_init(env: &Env, key: &Path) {
    env.ok(&["--key-file", key.to_str().unwrap(), "init", "--encryption"]);
}

/// The server of an encrypted repository is replaced, at the same address
/// and with the same certificate and token, by one serving a plain
/// repository: the client holding the key refuses it (exit 8, before a
/// session opens or a chunk is sent), and so does a client with no key,
/// from the record.
#[test]
fn a_server_that_turns_plain_is_refused_before_anything_is_sent() {
    let enc = Env::new();
    let key = key_file(&enc);
    encrypted_init(&enc, &key);
    let token = admin_token(&enc);
    let state = enc.state_dir();
    let s = Server::start(&enc, "127.0.0.1:0", &[]);
    let (addr, fp) = (s.addr.clone(), s.fp.clone().unwrap());
    let url = format!("imgstores://{addr}/");
    let img = enc.path("secret.img");
    let marker = b"PLAINTEXT-MUST-NOT-LEAVE-f3a1";
    fs::write(&img, [marker.repeat(40_000), seeded(3 << 20, 91)].concat()).unwrap();
    let k = key.to_str().unwrap();
    let backup = [
        "--key-file",
        k,
        "backup",
        img.to_str().unwrap(),
        "--name",
        "vm",
    ];
    ok(client(&url, Some(&fp), &token, &state), &backup);
    let seen = recorded(&state, &url).expect("first contact recorded");
    assert_eq!(seen["id"], repo_id(&enc).as_str());
    assert_eq!(seen["encrypted"], true);
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(state.join("known-repos.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    s.stop();

    let plain = Env::new();
    plain.init();
    admin_token(&plain);
    same_identity(&enc, &plain);
    let s = Server::start(&plain, &addr, &[]);
    assert_eq!(s.fp.as_deref(), Some(fp.as_str()), "the same certificate");
    let refuse = |args: &[&str], needles: &[&str]| {
        refused(client(&url, Some(&fp), &token, &state), args, needles)
    };
    // With the key: what the record says (it was encrypted) and what to do.
    refuse(
        &backup,
        &[
            &url,
            "plain",
            "encrypted",
            "--trust-new-repository",
            "known-repos.json",
        ],
    );
    // Without any key or passphrase (a prompt would follow for an
    // encrypted repository): refused from the record alone.
    refuse(
        &["backup", img.to_str().unwrap(), "--name", "vm"],
        &[&url, "plain"],
    );
    refuse(&["snapshots"], &[&url]);
    // Accepting the change does not make a key holder send plaintext.
    refuse(
        &[&["--trust-new-repository"][..], &backup[..]].concat(),
        &[&url, "plain", "--key-file"],
    );
    s.stop();
    received_nothing(&plain, &[]);
    // The record still names the encrypted repository.
    assert_eq!(
        recorded(&state, &url).unwrap()["id"],
        repo_id(&enc).as_str()
    );
}

/// A client given a key or passphrase, meeting a plain repository it has
/// never seen, refuses it (whichever way the secret is given) and records
/// nothing; without a secret it backs up there, and the repository is
/// recorded as plain.
#[test]
fn a_client_with_a_key_refuses_a_plain_repository_at_first_contact() {
    let env = Env::new();
    env.init();
    let token = admin_token(&env);
    let state = env.state_dir();
    let s = Server::start(&env, "127.0.0.1:0", &[]);
    let (addr, fp) = (s.addr.clone(), s.fp.clone().unwrap());
    let url = format!("imgstores://{addr}/");
    let img = env.path("a.img");
    fs::write(&img, seeded(2 << 20, 7)).unwrap();
    let key = key_file(&env);
    let pass = env.path("pass");
    fs::write(&pass, "hunter2\n").unwrap();
    let backup = ["backup", img.to_str().unwrap(), "--name", "vm"];
    for (secret, name) in [
        (vec!["--key-file", key.to_str().unwrap()], "--key-file"),
        (
            vec!["--password-file", pass.to_str().unwrap()],
            "--password-file",
        ),
        (
            vec!["--password-command", "echo hunter2"],
            "--password-command",
        ),
    ] {
        refused(
            client(&url, Some(&fp), &token, &state),
            &[&secret[..], &backup[..]].concat(),
            &[&url, "plain", name],
        );
    }
    let mut c = client(&url, Some(&fp), &token, &state);
    c.env("IMGSTORE_PASSWORD", "hunter2");
    refused(c, &backup, &[&url, "plain", "IMGSTORE_PASSWORD"]);
    // The other spelling of the URL is the same server.
    let mut c = client(&format!("imgstores://{addr}"), Some(&fp), &token, &state);
    c.env("IMGSTORE_KEY_FILE", &key);
    refused(c, &backup, &[&url, "plain"]);
    assert_eq!(
        recorded(&state, &url),
        None,
        "a refused server is not recorded"
    );
    s.stop();
    received_nothing(&env, &[]);

    let s = Server::start(&env, &addr, &[]);
    ok(client(&url, Some(&fp), &token, &state), &backup);
    let seen = recorded(&state, &url).unwrap();
    assert_eq!(seen["id"], repo_id(&env).as_str());
    assert_eq!(seen["encrypted"], false);
    // A key still makes the client refuse it.
    refused(
        client(&url, Some(&fp), &token, &state),
        &[&["--key-file", key.to_str().unwrap()][..], &backup[..]].concat(),
        &[&url, "plain"],
    );
    s.stop();
}

/// A server answering (with the pinned certificate and a valid token) for
/// another repository than the one recorded at its URL — plain or
/// encrypted, even one the client's key opens — is refused, read or
/// write, and sent nothing; `--trust-new-repository` accepts the change
/// once and records it.
#[test]
fn a_server_answering_for_another_repository_is_refused_until_trusted() {
    for encrypted in [false, true] {
        let first = Env::new();
        let key = key_file(&first);
        let k = key.to_str().unwrap().to_string();
        let init = |env: &Env| {
            if encrypted {
                encrypted_init(env, &key)
            } else {
                env.init()
            }
        };
        init(&first);
        let token = admin_token(&first);
        let state = first.state_dir();
        let s = Server::start(&first, "127.0.0.1:0", &[]);
        let (addr, fp) = (s.addr.clone(), s.fp.clone().unwrap());
        let url = format!("imgstores://{addr}/");
        let img = first.path("a.img");
        fs::write(&img, seeded(2 << 20, 13)).unwrap();
        let mut args: Vec<&str> = if encrypted {
            vec!["--key-file", &k]
        } else {
            vec![]
        };
        args.extend(["backup", img.to_str().unwrap(), "--name", "vm"]);
        let c = || client(&url, Some(&fp), &token, &state);
        ok(c(), &args);
        s.stop();

        let second = Env::new();
        init(&second);
        admin_token(&second);
        same_identity(&first, &second);
        let (a, b) = (repo_id(&first), repo_id(&second));
        assert_ne!(a, b);
        let s = Server::start(&second, &addr, &[]);
        let err = refused(
            c(),
            &args,
            &[&url, &a, &b, "--trust-new-repository", "known-repos.json"],
        );
        assert!(
            err.contains("another") || err.contains("now answers"),
            "{err}"
        );
        let mut list: Vec<&str> = args[..args.len() - 4].to_vec();
        list.push("snapshots");
        refused(c(), &list, &[&url, &a, &b]);
        s.stop();
        received_nothing(&second, &args[..args.len() - 4]);

        let s = Server::start(&second, &addr, &[]);
        let o = run(c(), &[&["--trust-new-repository"][..], &args[..]].concat());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(&b),
            "the change is said: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(recorded(&state, &url).unwrap()["id"], b.as_str());
        // From now on the new repository is the known one.
        ok(c(), &args);
        s.stop();
        let snaps: Vec<serde_json::Value> =
            serde_json::from_str(&second.ok(&["--key-file", &k, "snapshots", "--json"])).unwrap();
        assert_eq!(snaps.len(), 2, "encrypted: {encrypted}");
    }
}

/// `imgstore://` (plain HTTP, for a server run with `--insecure-no-tls`
/// on loopback): a backup and a byte-exact restore through it. The client
/// once panicked before connecting ("No provider set").
#[test]
fn plain_http_on_loopback_round_trips_through_an_imgstore_url() {
    let env = Env::new();
    env.init();
    let token = admin_token(&env);
    let s = Server::start(&env, "127.0.0.1:0", &["--insecure-no-tls"]);
    assert_eq!(s.fp, None, "no certificate without TLS");
    let url = format!("imgstore://{}/", s.addr);
    let state = env.state_dir();
    let img = env.path("disk.img");
    fs::write(
        &img,
        [seeded(3 << 20, 5), vec![0; 1 << 20], seeded(1 << 20, 6)].concat(),
    )
    .unwrap();
    let report: serde_json::Value = serde_json::from_str(&ok(
        client(&url, None, &token, &state),
        &["backup", img.to_str().unwrap(), "--json"],
    ))
    .unwrap();
    let id = report["id"].as_str().unwrap().to_string();
    let out = env.path("back.img");
    ok(
        client(&url, None, &token, &state),
        &["restore", &id, out.to_str().unwrap()],
    );
    assert_same(&out, &img);
    let snaps: Vec<serde_json::Value> = serde_json::from_str(&ok(
        client(&url, None, &token, &state),
        &["snapshots", "--json"],
    ))
    .unwrap();
    assert_eq!(snaps.len(), 1);
    assert_eq!(recorded(&state, &url).unwrap()["encrypted"], false);
    s.stop();
}
