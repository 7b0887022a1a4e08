//! `imgstore server`: real server processes on loopback TLS, driven by the
//! real binary as client — round trips of every command, roles and
//! namespaces, concurrent writers with gc, kill -9, a faulty network
//! (the `imgstore-shaper` link: latency, throughput caps, cuts), and
//! hostile requests.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use imgstore_shaper::{Link, Shaper};

use crate::util::*;

pub(crate) const CONFIG: &str = "[namespaces]\nweb = [\"web-*\"]\ndb = [\"db-*\"]\n";

/// A running `imgstore server`; killed (SIGKILL) on drop.
pub(crate) struct Served {
    pub(crate) child: Child,
    pub(crate) addr: String,
    pub(crate) fp: String,
    pub(crate) log: PathBuf,
}

impl Served {
    /// Starts the server of `env`'s repository on `listen` (port 0: any).
    pub(crate) fn start(env: &Env, listen: &str) -> Served {
        Served::start_with(env, listen, &[])
    }

    /// [`Served::start`] with `extra` flags; `fp` is empty for plain HTTP.
    pub(crate) fn start_with(env: &Env, listen: &str, extra: &[&str]) -> Served {
        let log = env.path(&format!("server-{}.log", listen.replace([':', '.'], "_")));
        let mut child = env
            .command()
            .args(["server", "--listen", listen])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let words: Vec<&str> = line.split_whitespace().collect();
        assert!(
            words.len() >= 3 && words[0] == "listening",
            "server did not start: {line:?} {}",
            fs::read_to_string(&log).unwrap_or_default()
        );
        Served {
            child,
            addr: words[2].to_string(),
            fp: words.get(4).map_or(String::new(), |f| f.to_string()),
            log,
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("imgstores://{}/", self.addr)
    }

    pub(crate) fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub(crate) fn assert_no_panic(&self) {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        assert!(!log.contains("panicked"), "server log: {log}");
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A repository with the namespace config and one token per role.
pub(crate) fn setup(env: &Env) -> Served {
    env.init();
    serve_config(env);
    Served::start(env, "127.0.0.1:0")
}

/// The namespace config and one token per role (`NAME.token` files) for
/// `env`'s repository, initialised already (plain or encrypted).
pub(crate) fn serve_config(env: &Env) {
    fs::create_dir_all(env.repo().join("server")).unwrap();
    fs::write(env.repo().join("server/config.toml"), CONFIG).unwrap();
    for (name, role, ns) in [
        ("admin", "admin", None),
        ("web-backup", "backup", Some("web")),
        ("web-restore", "restore", Some("web")),
        ("db-backup", "backup", Some("db")),
    ] {
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
        if let Some(ns) = ns {
            args.extend(["--namespace", ns]);
        }
        env.ok(&args);
    }
}

/// The imgstore binary as a client of `url` with token `token`.
pub(crate) struct Client {
    pub(crate) url: String,
    pub(crate) fp: String,
    pub(crate) token: PathBuf,
}

impl Client {
    pub(crate) fn new(env: &Env, s: &Served, token: &str) -> Client {
        Client {
            url: s.url(),
            fp: s.fp.clone(),
            token: env.path(&format!("{token}.token")),
        }
    }

    pub(crate) fn via(&self, url: String) -> Client {
        Client {
            url,
            fp: self.fp.clone(),
            token: self.token.clone(),
        }
    }

    pub(crate) fn command(&self) -> Command {
        let mut c = Command::new(BIN);
        c.arg("-r")
            .arg(&self.url)
            .arg("--token-file")
            .arg(&self.token)
            .env("IMGSTORE_SERVER_FINGERPRINT", &self.fp)
            // The test's own known-repositories record (`Env::state_dir`:
            // the token lives in the test's directory).
            .env(
                "IMGSTORE_STATE_DIR",
                self.token.parent().unwrap().join("state"),
            )
            // And its own client cache.
            .env(
                "IMGSTORE_CACHE_DIR",
                self.token.parent().unwrap().join("cache"),
            )
            .env_remove("IMGSTORE_TOKEN")
            .env_remove("IMGSTORE_REPO");
        c
    }

    pub(crate) fn run(&self, args: &[&str]) -> Output {
        self.command()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    pub(crate) fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "imgstore {args:?} against {} failed: {}{}",
            self.url,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    /// Fails with exit `code` and a one-line error containing `needle`.
    pub(crate) fn fails(&self, args: &[&str], code: i32, needle: &str) {
        let o = self.run(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(code), "imgstore {args:?}: {err}");
        assert!(
            err.contains(needle),
            "imgstore {args:?}: {needle:?} not in {err:?}"
        );
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err:?}");
    }

    pub(crate) fn backup(&self, path: &Path, extra: &[&str]) -> serde_json::Value {
        let mut args = vec!["backup", path.to_str().unwrap(), "--json"];
        args.extend_from_slice(extra);
        serde_json::from_str(&self.ok(&args)).unwrap()
    }

    pub(crate) fn snapshots(&self) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.ok(&["snapshots", "--json"])).unwrap()
    }
}

pub(crate) fn id_of(report: &serde_json::Value) -> String {
    report["id"].as_str().unwrap().to_string()
}

#[test]
fn every_command_round_trips_through_the_server() {
    if !have("mkfs.ext4") || !have("xorriso") {
        eprintln!("SKIP: needs e2fsprogs and xorriso");
        return;
    }
    let env = Env::new();
    let s = setup(&env);
    let admin = Client::new(&env, &s, "admin");
    let gens = ext4_generations(&env);
    let mut ids = Vec::new();
    for g in &gens {
        let r = admin.backup(g, &["--name", "web-disk"]);
        ids.push(id_of(&r));
    }
    let r1 = admin.ok(&["snapshots", "--json", "--name", "web-disk"]);
    let list: Vec<serde_json::Value> = serde_json::from_str(&r1).unwrap();
    assert_eq!(list.len(), 3);
    // Incremental: generation 2 reused regions of generation 1.
    let stats2: serde_json::Value =
        serde_json::from_str(&admin.ok(&["stats", &ids[2], "--json"])).unwrap();
    assert!(stats2.is_object());

    // An ISO from stdin.
    let iso_tree = env.path("isotree");
    populate(&iso_tree, 9);
    let iso = env.path("cd.iso");
    mkiso(&iso, &iso_tree);
    let o = admin
        .command()
        .args(["backup", "-", "--name", "web-cd", "--json"])
        .stdin(fs::File::open(&iso).unwrap())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // Restores: file, by id, stdout, delta onto the previous generation.
    let out = env.path("out.img");
    admin.ok(&[
        "restore",
        "latest",
        "--name",
        "web-disk",
        out.to_str().unwrap(),
    ]);
    assert_same(&out, &gens[2]);
    let out0 = env.path("out0.img");
    admin.ok(&["restore", &ids[0], out0.to_str().unwrap()]);
    assert_same(&out0, &gens[0]);
    let o = admin.run(&["restore", "latest", "--name", "web-cd", "-"]);
    assert!(o.status.success());
    assert_eq!(o.stdout, fs::read(&iso).unwrap());
    let delta = env.path("delta.img");
    fs::copy(&gens[1], &delta).unwrap();
    admin.ok(&["restore", &ids[2], "--delta", delta.to_str().unwrap()]);
    assert_same(&delta, &gens[2]);

    // diff (1: they differ), usable as --changed input for a backup whose
    // digest must equal the full backup's.
    let o = admin.run(&["diff", &ids[1], &ids[2]]);
    assert_eq!(o.status.code(), Some(1));
    let ranges = env.path("ranges.txt");
    fs::write(&ranges, &o.stdout).unwrap();
    let changed = admin.backup(
        &gens[2],
        &[
            "--name",
            "web-disk",
            "--base",
            &ids[1],
            "--changed",
            ranges.to_str().unwrap(),
        ],
    );
    let full = admin.ok(&["snapshots", "--json", "--name", "web-disk"]);
    let full: Vec<serde_json::Value> = serde_json::from_str(&full).unwrap();
    let digest_of = |id: &str| {
        full.iter()
            .find(|s| s["id"] == id)
            .map(|s| s["digest"].clone())
            .unwrap()
    };
    assert_eq!(digest_of(&id_of(&changed)), digest_of(&ids[2]));

    admin.ok(&["verify", "--all"]);
    admin.ok(&["check", "--read-data"]);

    // Tags, protection, retention, gc.
    admin.ok(&["tag", &ids[0], "--add", "keep-me"]);
    let tagged = admin.snapshots();
    let old0 = tagged
        .iter()
        .find(|s| s["tags"].as_array().is_some_and(|t| !t.is_empty()))
        .map(|s| s["id"].as_str().unwrap().to_string())
        .unwrap();
    admin.ok(&["protect", &old0]);
    admin.fails(&["forget", &old0], 1, "protected");
    admin.ok(&["unprotect", &old0]);
    let before = admin.snapshots().len();
    admin.ok(&["forget", &old0, "--prune"]);
    assert_eq!(admin.snapshots().len(), before - 1);
    admin.ok(&["gc"]);
    admin.ok(&["check", "--read-data"]);
    let out1 = env.path("out1.img");
    admin.ok(&["restore", &ids[1], out1.to_str().unwrap()]);
    assert_same(&out1, &gens[1]);

    // NBD and FUSE of a remote snapshot, with the real clients.
    nbd_round_trip(admin.command(), env.dir.path(), &ids[2], &gens[2]);
    fuse_round_trip(admin.command(), env.dir.path(), &ids[2], &gens[2]);
    // A server's repository is created on the server.
    admin.fails(&["init"], 2, "created on the server");
    s.assert_no_panic();
}

#[test]
fn roles_and_namespaces_bound_what_a_token_can_do_and_learn() {
    let env = Env::new();
    let s = setup(&env);
    let web = Client::new(&env, &s, "web-backup");
    let web_ro = Client::new(&env, &s, "web-restore");
    let db = Client::new(&env, &s, "db-backup");
    let admin = Client::new(&env, &s, "admin");
    let img = env.path("web-1.img");
    fs::write(&img, seeded(6 << 20, 77)).unwrap();
    let r = web.backup(&img, &[]);
    let id = id_of(&r);

    // A restore token cannot back up, even an unchanged image with a
    // parent it sees (its session, opened while the parent's index is
    // read, is refused, and the backup stops with that reason).
    web_ro.fails(
        &["backup", img.to_str().unwrap()],
        7,
        "may not write backups",
    );
    assert_eq!(admin.snapshots().len(), 1);
    // Append-only: no forget, gc, protect, retag, and nothing changes.
    web.fails(&["forget", &id], 7, "may not forget");
    web.fails(&["gc"], 7, "may not collect garbage");
    web.fails(&["protect", &id], 7, "may not protect");
    web.fails(&["tag", &id, "--add", "x"], 7, "may not change snapshots");
    assert_eq!(admin.snapshots().len(), 1);
    // Only its own namespace's image names.
    let other = env.path("db-1.img");
    fs::copy(&img, &other).unwrap();
    web.fails(
        &["backup", other.to_str().unwrap()],
        7,
        "not in the namespaces",
    );

    // Another namespace sees nothing of web's snapshots...
    assert!(db.snapshots().is_empty());
    db.fails(
        &["restore", &id, env.path("x.img").to_str().unwrap()],
        6,
        "",
    );
    // ...and learns nothing from uploading the same data: it is told
    // every chunk is new and sends them all, while the repository stores
    // them once.
    let before: serde_json::Value = serde_json::from_str(&admin.ok(&["stats", "--json"])).unwrap();
    let r2 = db.backup(&other, &[]);
    assert_eq!(
        r2["new_chunks"], r2["chunks"],
        "db was told what web stored: {r2}"
    );
    let after: serde_json::Value = serde_json::from_str(&admin.ok(&["stats", "--json"])).unwrap();
    assert_eq!(before["unique_chunk_bytes"], after["unique_chunk_bytes"]);
    // web's second backup of the same data deduplicates within web.
    let r3 = web.backup(&img, &["--no-parent"]);
    assert_eq!(r3["new_chunks"], 0, "{r3}");

    // A restore token reads its namespace, writes nothing.
    let out = env.path("out.img");
    web_ro.ok(&["restore", &id, out.to_str().unwrap()]);
    assert_same(&out, &img);
    web_ro.fails(
        &["backup", img.to_str().unwrap()],
        7,
        "may not write backups",
    );

    // Credentials.
    let mut bogus = web.via(web.url.clone());
    bogus.token = env.path("bogus.token");
    fs::write(&bogus.token, "imgs_0000").unwrap();
    bogus.fails(&["snapshots"], 7, "does not accept this token");
    let mut wrong_fp = web.via(web.url.clone());
    wrong_fp.fp = format!("SHA256:{}", "ab".repeat(32));
    wrong_fp.fails(&["snapshots"], 7, "fingerprint");
    env.ok(&["token", "remove", "web-restore"]);
    web_ro.fails(&["snapshots"], 7, "does not accept this token");
    s.assert_no_panic();
}

/// Four hosts back up at once while an admin runs gc and verify in a loop.
#[test]
fn four_clients_back_up_at_once_while_gc_and_verify_run() {
    let env = Env::new();
    let s = setup(&env);
    let admin = Client::new(&env, &s, "admin");
    // Garbage for gc to chew on while the backups run.
    let junk = env.path("web-junk.img");
    fs::write(&junk, seeded(8 << 20, 1)).unwrap();
    let j = admin.backup(&junk, &[]);
    admin.ok(&["forget", &id_of(&j)]);

    let imgs: Vec<PathBuf> = (0..4)
        .map(|i| {
            let p = env.path(&format!("web-host{i}.img"));
            // Half shared with the others, half its own.
            let mut data = seeded(6 << 20, 500);
            data.extend(seeded(6 << 20, 600 + i));
            fs::write(&p, data).unwrap();
            p
        })
        .collect();
    for round in 0..2 {
        if round == 1 {
            for (i, p) in imgs.iter().enumerate() {
                let mut data = fs::read(p).unwrap();
                let at = (i + 1) << 20;
                data[at..at + 300_000].copy_from_slice(&seeded(300_000, 900 + i as u64));
                fs::write(p, data).unwrap();
            }
        }
        let done = Arc::new(AtomicBool::new(false));
        let maint = {
            let done = done.clone();
            let admin = admin.via(admin.url.clone());
            std::thread::spawn(move || {
                let mut runs = 0;
                while !done.load(SeqCst) && runs < 200 {
                    admin.ok(&["gc"]);
                    if !admin.snapshots().is_empty() {
                        admin.ok(&["verify", "--all"]);
                    }
                    runs += 1;
                }
                runs
            })
        };
        let kids: Vec<Child> = imgs
            .iter()
            .map(|p| {
                Client::new(&env, &s, "web-backup")
                    .command()
                    .args(["backup", p.to_str().unwrap(), "-q"])
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for k in kids {
            let o = k.wait_with_output().unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
        done.store(true, SeqCst);
        assert!(maint.join().unwrap() >= 1);
    }
    admin.ok(&["gc"]);
    for p in &imgs {
        let out = env.path("out.img");
        let name = p.file_name().unwrap().to_str().unwrap();
        admin.ok(&[
            "restore",
            "latest",
            "--name",
            name,
            "--force",
            out.to_str().unwrap(),
        ]);
        assert_same(&out, p);
    }
    assert_eq!(admin.snapshots().len(), 8);
    admin.ok(&["check", "--read-data"]);
    s.assert_no_panic();
}

/// kill -9 of the server during concurrent backups and gc, several times:
/// every snapshot it lists afterwards restores exact, and check is clean.
#[test]
fn kill_9_of_the_server_loses_no_committed_snapshot() {
    let env = Env::new();
    let mut s = setup(&env);
    let addr = s.addr.clone();
    let admin = Client::new(&env, &s, "admin");
    let mut sources: std::collections::HashMap<String, Vec<u8>> = Default::default();
    let delays = seeded(64, 4242);
    for round in 0..5u64 {
        let mut kids = Vec::new();
        for h in 0..3u64 {
            let name = format!("web-r{round}h{h}.img");
            let data = [seeded(5 << 20, 7000 + h), seeded(5 << 20, 100 * round + h)].concat();
            let p = env.path(&name);
            fs::write(&p, &data).unwrap();
            sources.insert(name, data);
            kids.push(
                admin
                    .command()
                    .args(["--retry-for", "1s", "backup", p.to_str().unwrap(), "-q"])
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            );
        }
        let gc = admin
            .command()
            .args(["--retry-for", "1s", "gc", "-q"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        kids.push(gc);
        std::thread::sleep(Duration::from_millis(
            50 + u64::from(delays[round as usize]) * 4,
        ));
        s.kill9();
        for mut k in kids {
            let _ = k.wait();
        }
        s = Served::start(&env, &addr);
        assert_eq!(s.fp, admin.fp, "the certificate survives restarts");
        for snap in admin.snapshots() {
            let name = snap["name"].as_str().unwrap();
            let out = env.path("out.img");
            admin.ok(&[
                "restore",
                snap["id"].as_str().unwrap(),
                "--force",
                out.to_str().unwrap(),
            ]);
            assert!(
                fs::read(&out).unwrap() == sources[name],
                "{name} restored wrong"
            );
        }
        admin.ok(&["check"]);
    }
    admin.ok(&["gc"]);
    admin.ok(&["check", "--read-data"]);
    s.assert_no_panic();
}

/// The URL of a server reached through `shaper` (an emulated WAN link).
pub(crate) fn url_via(shaper: &imgstore_shaper::Shaper) -> String {
    format!("imgstores://{}/", shaper.addr())
}

#[test]
fn a_bad_network_is_survived_or_refused_clearly() {
    let env = Env::new();
    let s = setup(&env);
    let proxy = Shaper::start(&s.addr, Link::rtt(Duration::from_millis(40))).unwrap();
    let admin = Client::new(&env, &s, "admin").via(url_via(&proxy));
    let img = env.path("web-net.img");
    let data = [seeded(12 << 20, 31), vec![0u8; 4 << 20], texty(8 << 20, 32)].concat();
    fs::write(&img, &data).unwrap();

    // A backup whose link is cut twice for 2 s completes, resuming.
    let mut k = admin
        .command()
        .args([
            "--retry-for",
            "60s",
            "backup",
            img.to_str().unwrap(),
            "--json",
            "-q",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    proxy.cut_for(Duration::from_secs(2));
    std::thread::sleep(Duration::from_millis(2600));
    proxy.cut_for(Duration::from_secs(2));
    let o = {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            if k.try_wait().unwrap().is_some() || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = k.kill();
        k.wait_with_output().unwrap()
    };
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = env.path("out.img");
    admin.ok(&[
        "restore",
        "latest",
        "--name",
        "web-net.img",
        out.to_str().unwrap(),
    ]);
    assert_same(&out, &img);

    // Restores cut at several points: exact, or a clear failure.
    for (i, at) in [150u64, 500, 900].iter().enumerate() {
        let out = env.path(&format!("cut{i}.img"));
        let retry = if i == 2 { "1s" } else { "60s" };
        let k = admin
            .command()
            .args([
                "--retry-for",
                retry,
                "restore",
                "latest",
                "--name",
                "web-net.img",
                out.to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(*at));
        proxy.cut_for(Duration::from_secs(3));
        let o = k.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        match o.status.code() {
            Some(0) => assert_same(&out, &img),
            Some(7) => assert_eq!(err.trim_end().lines().count(), 1, "{err}"),
            c => panic!("restore cut at {at} ms: exit {c:?}: {err}"),
        }
        if i < 2 {
            assert_eq!(
                o.status.code(),
                Some(0),
                "a 3 s cut within a 60 s retry window must not fail: {err}"
            );
        }
        std::thread::sleep(Duration::from_millis(3200));
    }
    let direct = Client::new(&env, &s, "admin");
    direct.ok(&["gc"]);
    direct.ok(&["check", "--read-data"]);
    assert_eq!(direct.snapshots().len(), 1, "no partial snapshot");
    s.assert_no_panic();
}

/// curl against the server: an error for every malformed or hostile
/// request, never a panic; the server serves normally afterwards.
#[test]
fn hostile_requests_get_errors_not_panics() {
    if !have("curl") {
        eprintln!("SKIP: needs curl");
        return;
    }
    let env = Env::new();
    let s = setup(&env);
    let admin_token = fs::read_to_string(env.path("admin.token")).unwrap();
    let web_token = fs::read_to_string(env.path("web-backup.token")).unwrap();
    let base = format!("https://{}", s.addr);
    let curl = |method: &str,
                path: &str,
                token: Option<&str>,
                body: Option<&Path>,
                extra: &[&str]|
     -> u16 {
        let mut c = Command::new("curl");
        c.args([
            "-sk",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "60",
            "-X",
            method,
        ]);
        if let Some(t) = token {
            c.arg("-H")
                .arg(format!("Authorization: Bearer {}", t.trim()));
        }
        if let Some(b) = body {
            c.arg("--data-binary").arg(format!("@{}", b.display()));
        }
        c.args(extra).arg(format!("{base}{path}"));
        let o = c.output().unwrap();
        String::from_utf8_lossy(&o.stdout).parse().unwrap_or(0)
    };
    let body = |name: &str, bytes: &[u8]| {
        let p = env.path(name);
        fs::write(&p, bytes).unwrap();
        p
    };
    let admin = Some(admin_token.as_str());
    assert_eq!(curl("GET", "/v1/health", None, None, &[]), 200);
    assert_eq!(curl("GET", "/v1/snapshots", None, None, &[]), 401);
    assert_eq!(
        curl("GET", "/v1/snapshots", Some("imgs_nope"), None, &[]),
        401
    );
    assert_eq!(curl("GET", "/v2/snapshots", admin, None, &[]), 404);
    // A count of 2^32-1 ids in a 12-byte body.
    let huge = body("huge", &[0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(curl("POST", "/v1/chunks/get", admin, Some(&huge), &[]), 400);
    assert_eq!(curl("POST", "/v1/pages", admin, Some(&huge), &[]), 400);
    // Session calls without a session; a session for another namespace.
    assert_eq!(
        curl("POST", "/v1/chunks/known", admin, Some(&huge), &[]),
        400
    );
    let sess = body("sess.json", br#"{"image":"db-x"}"#);
    assert_eq!(
        curl(
            "POST",
            "/v1/sessions",
            Some(&web_token),
            Some(&sess),
            &["-H", "content-type: application/json"]
        ),
        403
    );
    let bad_json = body("bad.json", b"{\"image\": 7");
    let code = curl(
        "POST",
        "/v1/sessions",
        admin,
        Some(&bad_json),
        &["-H", "content-type: application/json"],
    );
    assert!(code == 400 || code == 422, "bad JSON: {code}");
    // A body past the region limit is refused before it is held.
    let big = env.path("big");
    fs::File::create(&big).unwrap().set_len(81 << 20).unwrap();
    let code = curl(
        "PUT",
        &format!("/v1/regions/{}", "00".repeat(32)),
        admin,
        Some(&big),
        &[],
    );
    // 413, or the connection closed by the server before curl finished
    // sending (curl then reports 000).
    assert!(code == 413 || code == 0, "oversized body: {code}");
    // A region whose recipe does not hash to the id in the path, and one
    // whose frame does not hash to its chunk id.
    let mut admin_cmd = Command::new("curl");
    let o = admin_cmd
        .args([
            "-sk",
            "-H",
            &format!("Authorization: Bearer {}", admin_token.trim()),
            "-H",
            "content-type: application/json",
            "--data",
            r#"{"image":"web-x"}"#,
        ])
        .arg(format!("{base}/v1/sessions"))
        .output()
        .unwrap();
    let reply: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let session = reply["session"].as_str().unwrap().to_string();
    let sess_hdr = format!("imgstore-session: {session}");
    let chunk = seeded(5000, 3);
    let cid = imgstore_format::Id::hash(&chunk);
    let region = imgstore_format::Region {
        entries: vec![imgstore_format::RecipeEntry {
            len: 5000,
            chunk: Some(cid),
        }],
    };
    let recipe = region.encode();
    let rid = imgstore_format::Id::hash(&recipe).to_hex();
    let wrong_frame = imgstore_format::FrameCodec::with_thread(|c| c.encode(&seeded(5000, 4), 3));
    let put = imgstore_protocol::encode_put_region(
        &recipe,
        [imgstore_protocol::NewFrame {
            id: cid,
            raw_len: 5000,
            frame: &wrong_frame,
        }]
        .into_iter(),
    );
    let put = body("put", &put);
    assert_eq!(
        curl(
            "PUT",
            &format!("/v1/regions/{}", "11".repeat(32)),
            admin,
            Some(&put),
            &["-H", &sess_hdr]
        ),
        400
    );
    assert_eq!(
        curl(
            "PUT",
            &format!("/v1/regions/{rid}"),
            admin,
            Some(&put),
            &["-H", &sess_hdr]
        ),
        400
    );
    // Random bytes at every binary endpoint.
    for (i, path) in [
        "/v1/chunks/known",
        "/v1/commit",
        "/v1/forget",
        "/v1/refs/C",
        "/v1/zero-cvs",
    ]
    .iter()
    .enumerate()
    {
        let junk = body(&format!("junk{i}"), &seeded(777, 50 + i as u64));
        let code = curl("POST", path, admin, Some(&junk), &["-H", &sess_hdr]);
        assert!((400..500).contains(&code), "{path}: {code}");
    }
    assert_eq!(curl("GET", "/v1/health", None, None, &[]), 200);
    // Still serving, and nothing was committed.
    let client = Client::new(&env, &s, "admin");
    assert!(client.snapshots().is_empty());
    client.ok(&["check"]);
    let img = env.path("web-after.img");
    fs::write(&img, seeded(1 << 20, 5)).unwrap();
    client.backup(&img, &[]);
    // Plain HTTP only on loopback.
    let o = env.run(&["server", "--insecure-no-tls", "--listen", "0.0.0.0:0"]);
    assert_eq!(o.status.code(), Some(2));
    s.assert_no_panic();
}

/// `copy`: a local repository replicated to the server and back, sending
/// only what the destination lacks; damage is never copied.
#[test]
fn copy_replicates_snapshots_between_a_local_repository_and_the_server() {
    let env = Env::new();
    let s = setup(&env);
    let local = Env::new();
    local.init();
    let img = local.path("web-vm.img");
    let mut data = [seeded(16 << 20, 3), vec![0u8; 4 << 20], texty(4 << 20, 4)].concat();
    fs::write(&img, &data).unwrap();
    let g0 = id_of(&local.backup(&img, &[]));
    data[5 << 20..(5 << 20) + 200_000].copy_from_slice(&seeded(200_000, 9));
    fs::write(&img, &data).unwrap();
    let g1 = id_of(&local.backup(&img, &[]));

    // Local → server, with a backup token of the image's namespace.
    let web = Client::new(&env, &s, "web-backup");
    let local_repo = local.repo();
    let copy = |c: &Client, extra: &[&str]| -> Vec<serde_json::Value> {
        let mut args = vec!["copy", "--from", local_repo.to_str().unwrap(), "--json"];
        args.extend_from_slice(extra);
        serde_json::from_str(&c.ok(&args)).unwrap()
    };
    let first = copy(&web, &[&g0]);
    assert_eq!(first[0]["copied"], true);
    let all = copy(&web, &[]);
    assert_eq!(all.len(), 2);
    assert_eq!(all[0]["copied"], false, "g0 is there already: {all:?}");
    assert_eq!(all[1]["id"], g1.as_str());
    // Only the changed region's new chunks cross: a fraction of the image.
    let sent = all[1]["chunk_bytes_sent"].as_u64().unwrap();
    assert!(sent > 0 && sent < 2 << 20, "{all:?}");
    assert_eq!(all[1]["regions_sent"], 1, "{all:?}");
    let again = copy(&web, &[]);
    assert!(again.iter().all(|v| v["copied"] == false));
    let out = env.path("from-server.img");
    web.ok(&["restore", &g1, out.to_str().unwrap()]);
    assert_same(&out, &img);
    let listed = web.snapshots();
    let g1_row = listed.iter().find(|v| v["id"] == g1.as_str()).unwrap();
    assert_eq!(g1_row["parent"], g0.as_str(), "the parent link is copied");

    // Server → a fresh local repository, with the source's own credentials.
    let back = Env::new();
    back.init();
    let o = back
        .command()
        .args(["copy", "--from", &s.url(), "--name", "web-vm.img"])
        .arg("--from-token-file")
        .arg(env.path("web-restore.token"))
        .env("IMGSTORE_FROM_SERVER_FINGERPRINT", &s.fp)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out2 = back.path("back.img");
    back.ok(&["restore", &g0, out2.to_str().unwrap()]);
    let want0: Vec<u8> = [seeded(16 << 20, 3), vec![0u8; 4 << 20], texty(4 << 20, 4)].concat();
    assert!(fs::read(&out2).unwrap() == want0);
    back.ok(&["check", "--read-data"]);

    // A damaged chunk in the source: the copy fails naming it, and the
    // destination gets no snapshot.
    let dmg = Env::new();
    dmg.init();
    let img2 = dmg.path("web-dmg.img");
    fs::write(&img2, seeded(12 << 20, 55)).unwrap();
    let gid = id_of(&dmg.backup(&img2, &[]));
    let blob = fs::read_dir(dmg.repo().join("db"))
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
        b[0] ^= 0x20;
        f.write_all_at(&b, len / 2).unwrap();
    }
    let o = web.run(&["copy", "--from", dmg.repo().to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(5), "{err}");
    assert!(err.contains("damaged") && err.contains(&gid[..8]), "{err}");
    assert!(web.snapshots().iter().all(|v| v["id"] != gid.as_str()));
    s.assert_no_panic();
}

/// An encrypted repository served: the client seals, the server stores
/// and counts what it cannot read, and a namespace still sees only its
/// own (sealed) snapshots.
#[test]
fn an_encrypted_repository_through_the_server_holds_no_plaintext() {
    let env = Env::new();
    let o = env
        .command()
        .args(["init", "--encryption"])
        .env("IMGSTORE_PASSWORD", "server-side secret")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serve_config(&env);
    let mut s = Served::start(&env, "127.0.0.1:0");
    let web = Client::new(&env, &s, "web-backup");
    let img = env.path("web-secret.img");
    let marker = b"SERVER-MUST-NOT-SEE-THIS-9d2e";
    let data = [marker.repeat(50_000), seeded(8 << 20, 44)].concat();
    fs::write(&img, &data).unwrap();
    let with_pass = |c: &Client, args: &[&str]| {
        c.command()
            .args(args)
            .env("IMGSTORE_PASSWORD", "server-side secret")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let o = with_pass(&web, &["backup", img.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let id = serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let out = env.path("back.img");
    let o = with_pass(&web, &["restore", &id, out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_same(&out, &img);
    // Without the passphrase the client cannot even list.
    let o = web.run(&["snapshots"]);
    assert_eq!(o.status.code(), Some(2));
    // Another namespace does not see the sealed snapshot.
    let db = Client::new(&env, &s, "db-backup");
    let o = with_pass(&db, &["snapshots", "--json"]);
    assert!(o.status.success());
    assert_eq!(
        serde_json::from_slice::<Vec<serde_json::Value>>(&o.stdout)
            .unwrap()
            .len(),
        0
    );
    // Nothing the server wrote holds the marker.
    fn scan(dir: &Path, marker: &[u8]) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                scan(&p, marker);
            } else if let Ok(b) = fs::read(&p) {
                assert!(
                    !b.windows(marker.len()).any(|w| w == marker),
                    "{} holds plaintext",
                    p.display()
                );
            }
        }
    }
    s.kill9();
    scan(&env.repo(), marker);
}

/// A backup to a server starts from the client's cache of it (the hello,
/// the last snapshot it committed of the image and that snapshot's index
/// pages) instead of waiting for the server's answers; it commits only
/// once the server's answers agree, and starts again from them when they
/// do not: another host backed the image up since, or the cached pages do
/// not open under their ids.
#[test]
fn a_backup_starts_from_the_client_cache_and_again_when_the_server_disagrees() {
    if !have("mkfs.ext4") {
        eprintln!("SKIP: needs e2fsprogs");
        return;
    }
    let env = Env::new();
    let s = setup(&env);
    let host_a = Client::new(&env, &s, "web-backup");
    let gens = ext4_generations(&env);
    let name = ["--name", "web-disk"];
    // No cache yet: from the server's answers.
    let r0 = host_a.backup(&gens[0], &name);
    assert_eq!(r0["started_from_cache"], false, "{r0}");
    // From the cache: its parent is the snapshot the cache kept.
    let r1 = host_a.backup(&gens[1], &name);
    assert_eq!(r1["started_from_cache"], true, "{r1}");
    assert_eq!(r1["parent"], r0["id"]);

    // Another host (a cache of its own) backs the same image up.
    let host_b = |args: &[&str]| -> serde_json::Value {
        let o = host_a
            .command()
            .env("IMGSTORE_CACHE_DIR", env.path("cache-b"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let rb = host_b(&[
        "backup",
        gens[2].to_str().unwrap(),
        "--json",
        "--name",
        "web-disk",
    ]);
    assert_eq!(rb["parent"], r1["id"]);
    // Host A's cache says r1 is the latest: the server's listing says rb.
    // Nothing is committed from the cache; the backup starts again.
    let o = host_a.run(&[
        "-v",
        "backup",
        gens[1].to_str().unwrap(),
        "--json",
        "--name",
        "web-disk",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r2: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r2["started_from_cache"], false, "{r2}");
    assert_eq!(r2["parent"], rb["id"], "{r2}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("out of date"), "{err}");
    assert_eq!(
        host_a.snapshots().len(),
        4,
        "one snapshot per backup, none from the outdated start"
    );

    // Damaged cached pages are not used: read from the server instead.
    let cache = env.path("cache").join("servers");
    let dir = fs::read_dir(&cache)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let entry = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("image-")
        })
        .expect("a cached snapshot");
    let mut bytes = fs::read(&entry).unwrap();
    let n = bytes.len();
    for b in &mut bytes[n - 64..] {
        *b ^= 0x5a;
    }
    fs::write(&entry, &bytes).unwrap();
    let r3 = host_a.backup(&gens[2], &name);
    assert_eq!(r3["started_from_cache"], true, "{r3}");
    assert_eq!(r3["parent"], r2["id"]);

    for (r, g) in [
        (&r0, &gens[0]),
        (&r1, &gens[1]),
        (&r2, &gens[1]),
        (&r3, &gens[2]),
    ] {
        let out = env.path("out.img");
        let _ = fs::remove_file(&out);
        host_a.ok(&["restore", r["id"].as_str().unwrap(), out.to_str().unwrap()]);
        assert_same(&out, g);
    }
    Client::new(&env, &s, "admin").ok(&["check", "--read-data"]);
    s.assert_no_panic();
}
