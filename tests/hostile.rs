//! Hostile clients against a real `imgstore server` (issue #25): every
//! attack is a raw HTTPS request sent with curl (or a raw TLS socket from
//! Python), not our client, by a caller holding an ordinary token. Each
//! test names the item of the issue it covers; each failed on the server
//! before the fix. Bodies are built with the protocol's own encoders (the
//! attacker knows the protocol); the requests themselves are hand-made.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

use imgstore_format::{Id, Page, RecipeEntry, Region, Snapshot};
use imgstore_protocol as proto;

use crate::server::{setup, Client, Served};
use crate::util::*;

/// Raw requests to one server, through curl.
struct Raw {
    base: String,
    dir: PathBuf,
    n: AtomicU64,
}

impl Raw {
    fn new(env: &Env, s: &Served) -> Raw {
        let dir = env.path("raw");
        fs::create_dir_all(&dir).unwrap();
        Raw {
            base: format!("https://{}", s.addr),
            dir,
            n: AtomicU64::new(0),
        }
    }

    /// Sends one request; returns the status (0: no answer) and the body.
    fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&[u8]>,
        headers: &[String],
    ) -> (u16, Vec<u8>) {
        self.call_within(60, method, path, token, body, headers)
    }

    /// [`Raw::call`], waiting at most `secs` for the answer.
    fn call_within(
        &self,
        secs: u32,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&[u8]>,
        headers: &[String],
    ) -> (u16, Vec<u8>) {
        let i = self.n.fetch_add(1, SeqCst);
        let out = self.dir.join(format!("out{i}"));
        let mut c = Command::new("curl");
        c.args([
            "-sk",
            "--max-time",
            &secs.to_string(),
            "-H",
            "Expect:",
            "-X",
            method,
        ])
        .arg("-o")
        .arg(&out)
        .args(["-w", "%{http_code}"]);
        if let Some(t) = token {
            c.arg("-H")
                .arg(format!("Authorization: Bearer {}", t.trim()));
        }
        for h in headers {
            c.arg("-H").arg(h);
        }
        if let Some(b) = body {
            let p = self.dir.join(format!("in{i}"));
            fs::write(&p, b).unwrap();
            c.arg("--data-binary").arg(format!("@{}", p.display()));
            if b.first() == Some(&b'{') || b.first() == Some(&b'[') {
                c.args(["-H", "content-type: application/json"]);
            }
        }
        let o = c.arg(format!("{}{path}", self.base)).output().unwrap();
        let code = String::from_utf8_lossy(&o.stdout).parse().unwrap_or(0);
        (code, fs::read(&out).unwrap_or_default())
    }

    /// Opens a backup session for `image`; returns its header.
    fn session(&self, token: &str, image: &str) -> String {
        let (code, body) = self.call(
            "POST",
            "/v1/sessions",
            Some(token),
            Some(format!("{{\"image\":\"{image}\"}}").as_bytes()),
            &[],
        );
        assert_eq!(code, 200, "session: {}", String::from_utf8_lossy(&body));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        format!("imgstore-session: {}", v["session"].as_str().unwrap())
    }

    fn health(&self) -> u16 {
        self.call("GET", "/v1/health", None, None, &[]).0
    }

    fn put_region(
        &self,
        token: &str,
        sess: &str,
        recipe: &[u8],
        frames: &[(Id, u32, Vec<u8>)],
    ) -> (u16, String) {
        let body = proto::encode_put_region(
            recipe,
            frames.iter().map(|(id, raw_len, f)| proto::NewFrame {
                id: *id,
                raw_len: *raw_len,
                frame: f,
            }),
        );
        let (code, b) = self.call(
            "PUT",
            &format!("/v1/regions/{}", Id::hash(recipe).to_hex()),
            Some(token),
            Some(&body),
            &[sess.to_string()],
        );
        (code, String::from_utf8_lossy(&b).to_string())
    }

    fn commit(&self, token: &str, sess: &str, record: &[u8], pages: &[Vec<u8>]) -> (u16, String) {
        let body = proto::encode_commit(record, None, pages);
        let (code, b) = self.call(
            "POST",
            "/v1/commit",
            Some(token),
            Some(&body),
            &[sess.to_string()],
        );
        (code, String::from_utf8_lossy(&b).to_string())
    }

    /// The snapshot records a token sees.
    fn snapshots(&self, token: &str) -> Vec<(Id, Vec<u8>)> {
        let (code, b) = self.call("GET", "/v1/snapshots", Some(token), None, &[]);
        assert_eq!(code, 200);
        proto::decode_snapshots(&b).unwrap()
    }

    fn damage_marks(&self, token: &str) -> Vec<serde_json::Value> {
        let (code, b) = self.call("GET", "/v1/damage", Some(token), None, &[]);
        assert_eq!(code, 200);
        serde_json::from_slice(&b).unwrap()
    }
}

fn token(env: &Env, name: &str) -> String {
    fs::read_to_string(env.path(&format!("{name}.token")))
        .unwrap()
        .trim()
        .to_string()
}

/// A plain chunk frame of `data` (stored raw: codec byte 0, u32 length).
fn raw_frame(data: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8];
    f.extend_from_slice(&(data.len() as u32).to_le_bytes());
    f.extend_from_slice(data);
    f
}

/// A recipe of one region made of the given chunks.
fn recipe(chunks: &[(Id, u32)]) -> Vec<u8> {
    Region {
        entries: chunks
            .iter()
            .map(|(id, len)| RecipeEntry {
                len: *len,
                chunk: Some(*id),
            })
            .collect(),
    }
    .encode()
}

/// A record shaped like a sealed recipe naming `ids` (it opens with no key).
fn fake_sealed(kind: u8, ids: &[Id]) -> Vec<u8> {
    let mut r = vec![0xE2, kind];
    r.extend_from_slice(&(ids.len() as u32).to_le_bytes());
    for id in ids {
        r.extend_from_slice(id.as_bytes());
    }
    r.extend_from_slice(&[0x5a; 40]);
    r
}

/// A small file that is one chunk (shorter than the smallest chunk): its
/// chunk id is the BLAKE3 of the file, computable by anyone who has it.
fn one_chunk_file(env: &Env, name: &str, seed: u64) -> (PathBuf, Vec<u8>, Id) {
    let data = seeded(12_000, seed);
    let p = env.path(name);
    fs::write(&p, &data).unwrap();
    let id = Id::hash(&data);
    (p, data, id)
}

fn vm_hwm(s: &Served) -> u64 {
    let status = fs::read_to_string(format!("/proc/{}/status", s.child.id())).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap()
        << 10
}

fn restores_exact(c: &Client, env: &Env, name: &str, expect: &Path) {
    let out = env.path(&format!("{name}.restored"));
    let _ = fs::remove_file(&out);
    c.ok(&["restore", "latest", "--name", name, out.to_str().unwrap()]);
    assert_same(&out, expect);
}

fn need_curl() -> bool {
    if !have("curl") {
        eprintln!("SKIP: needs curl");
        return false;
    }
    true
}

/// `python3` running `script` after a prelude that gives it the server's
/// `host` and `port` (the script's own arguments follow at `sys.argv[3]`)
/// and `tls(timeout, alpn)`: a raw TLS connection to the server that checks
/// no certificate (the attacker needs none), HTTP/1.1 by default.
fn python_tls(script: &str, s: &Served, args: &[&str]) -> Command {
    const PRELUDE: &str = r#"
import socket, ssl, sys, time
host, port = sys.argv[1], int(sys.argv[2])
def tls(timeout, alpn="http/1.1"):
    ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
    if alpn: ctx.set_alpn_protocols([alpn])
    return ctx.wrap_socket(socket.create_connection((host, port), timeout=timeout), server_hostname="x")
"#;
    let (host, port) = s.addr.rsplit_once(':').unwrap();
    let mut c = Command::new("python3");
    c.args(["-c", &format!("{PRELUDE}{script}"), host, port])
        .args(args);
    c
}

/// Items 1 and 3 (plain): a backup token plants bytes under the chunk id
/// of data it expects another namespace to back up, with a recipe shaped
/// like a sealed one (whose frames the server used not to check) and with
/// a plain recipe and a wrong frame. Both are refused, and the victim's
/// later backup restores exact.
#[test]
fn a_backup_token_cannot_plant_wrong_bytes_under_another_hosts_chunk_ids() {
    if !need_curl() {
        return;
    }
    let env = Env::new();
    let s = setup(&env);
    let raw = Raw::new(&env, &s);
    let web = token(&env, "web-backup");
    let (victim, data, x) = one_chunk_file(&env, "os.img", 11);
    let sess = raw.session(&web, "web-evil");
    let garbage = seeded(data.len(), 99);
    // A fake-sealed recipe naming X, with any bytes as X's frame.
    let (code, msg) = raw.put_region(
        &web,
        &sess,
        &fake_sealed(b'R', &[x]),
        &[(x, data.len() as u32, raw_frame(&garbage))],
    );
    assert_eq!(code, 400, "fake-sealed recipe accepted: {msg}");
    assert!(msg.contains("no sealed"), "{msg}");
    // A plain recipe with a frame that is not X's content.
    let (code, msg) = raw.put_region(
        &web,
        &sess,
        &recipe(&[(x, data.len() as u32)]),
        &[(x, data.len() as u32, raw_frame(&garbage))],
    );
    assert_eq!(code, 400, "{msg}");
    // The same frame sent twice, and a length the recipe contradicts.
    let good = raw_frame(&seeded(12_000, 12));
    let y = Id::hash(&seeded(12_000, 12));
    let (code, msg) = raw.put_region(
        &web,
        &sess,
        &recipe(&[(y, 12_000)]),
        &[(y, 11_000, good.clone())],
    );
    assert_eq!(code, 400, "{msg}");
    // The victim backs up; its data restores exact and checks clean.
    let db = Client::new(&env, &s, "db-backup");
    db.backup(&victim, &["--name", "db-1"]);
    let admin = Client::new(&env, &s, "admin");
    restores_exact(&admin, &env, "db-1", &victim);
    admin.ok(&["check", "--read-data"]);
    s.assert_no_panic();
}

/// Item 11: the same frame a thousand times in one upload (each used to be
/// decompressed and hashed) is refused before any is decompressed.
#[test]
fn duplicate_frames_are_refused_before_decompression() {
    if !need_curl() {
        return;
    }
    let env = Env::new();
    let s = setup(&env);
    let raw = Raw::new(&env, &s);
    let web = token(&env, "web-backup");
    let sess = raw.session(&web, "web-bomb");
    // 16 KiB of zeros compresses to a few bytes: the cheapest bomb.
    let zeros = vec![0u8; 16_384];
    let mut c = zstd::bulk::Compressor::new(19).unwrap();
    let frame = imgstore_format::encode_chunk(&zeros, &mut c);
    let z = Id::hash(&zeros);
    let frames: Vec<(Id, u32, Vec<u8>)> = (0..1000).map(|_| (z, 16_384, frame.clone())).collect();
    let (code, msg) = raw.put_region(&web, &sess, &recipe(&[(z, 16_384)]), &frames);
    assert_eq!(code, 400, "{msg}");
    assert!(msg.contains("sent twice"), "{msg}");
    // Sent once, the same upload is accepted.
    let (code, msg) = raw.put_region(&web, &sess, &recipe(&[(z, 16_384)]), &frames[..1]);
    assert_eq!(code, 200, "{msg}");
    s.assert_no_panic();
}

/// Item 4: a namespace learns nothing of another's objects. Naming another
/// namespace's chunk in a recipe, or its page in a commit, answers exactly
/// as for an id no one stored, and grants no read; reference counts shown
/// to others than admins say only "present".
#[test]
fn namespaces_are_no_oracle_and_grant_nothing_by_naming() {
    if !need_curl() {
        return;
    }
    let env = Env::new();
    let s = setup(&env);
    let raw = Raw::new(&env, &s);
    let (dbfile, data, x) = one_chunk_file(&env, "db.img", 21);
    let db = Client::new(&env, &s, "db-backup");
    db.backup(&dbfile, &["--name", "db-1"]);
    let web = token(&env, "web-backup");
    let web_r = token(&env, "web-restore");
    let admin = token(&env, "admin");
    let sess = raw.session(&web, "web-x");
    let nobody = Id::hash(b"stored by no one");
    let len = data.len() as u32;
    let (code_x, msg_x) = raw.put_region(&web, &sess, &recipe(&[(x, len)]), &[]);
    let (code_n, msg_n) = raw.put_region(&web, &sess, &recipe(&[(nobody, len)]), &[]);
    assert_eq!(code_x, 404, "another namespace's chunk: {msg_x}");
    assert_eq!(code_n, 404, "{msg_n}");
    assert_eq!(
        msg_x.replace(&x.to_hex(), "ID"),
        msg_n.replace(&nobody.to_hex(), "ID"),
        "the answers differ only by the id"
    );
    // Nothing became readable by naming it.
    let (code, body) = raw.call(
        "POST",
        "/v1/chunks/get",
        Some(&web_r),
        Some(&proto::encode_ids(&[x])),
        &[],
    );
    assert_eq!(code, 200);
    assert!(
        proto::decode_frames(&body, 1).unwrap()[0].is_err(),
        "db's chunk readable by web"
    );
    // Committing a snapshot that names db's index page.
    let (_, db_rec) = raw.snapshots(&admin).into_iter().next().unwrap();
    let db_snap = Snapshot::decode(&db_rec).unwrap();
    let mut fake = db_snap.clone();
    fake.name = "web-x".into();
    let (code, msg) = raw.commit(&web, &sess, &fake.encode(), &[]);
    assert_eq!(code, 404, "commit naming db's page: {msg}");
    // And a page of its own naming db's region.
    let (code, body) = raw.call(
        "POST",
        "/v1/pages",
        Some(&admin),
        Some(&proto::encode_ids(&db_snap.pages)),
        &[],
    );
    assert_eq!(code, 200);
    let db_page = Page::decode(&proto::decode_records(&body, 1).unwrap()[0]).unwrap();
    let page = db_page.encode();
    let mut fake = db_snap.clone();
    fake.name = "web-x".into();
    fake.pages = vec![Id::hash(&page)];
    let (code, msg) = raw.commit(&web, &sess, &fake.encode(), &[page]);
    assert_eq!(code, 404, "commit naming db's region: {msg}");
    assert!(raw.snapshots(&web_r).is_empty(), "web sees no snapshot");
    // Reference counts: web backs up the same file twice; its restore
    // token sees the page as present (count 1), the admin sees 2.
    let (wfile, _, _) = one_chunk_file(&env, "web.img", 31);
    let wc = Client::new(&env, &s, "web-backup");
    wc.backup(&wfile, &["--name", "web-1"]);
    wc.backup(&wfile, &["--name", "web-2"]);
    let (_, rec) = raw.snapshots(&web_r).into_iter().next().unwrap();
    let pid = Snapshot::decode(&rec).unwrap().pages[0];
    let count = |tok: &str| {
        let (code, b) = raw.call(
            "POST",
            "/v1/refs/P",
            Some(tok),
            Some(&proto::encode_ids(&[pid])),
            &[],
        );
        assert_eq!(code, 200);
        let r = proto::decode_refs(&b, 1).unwrap().remove(0).unwrap();
        imgstore_format::RefCount::decode(&r).unwrap().count
    };
    assert_eq!(count(&admin), 2);
    assert_eq!(
        count(&web_r),
        1,
        "a repository-wide count shown to a namespace"
    );
    s.assert_no_panic();
}

/// Item 2: damage marks from a restore token are recorded only where the
/// server finds the object damaged itself: marks on intact objects (its
/// own, or another namespace's it cannot see) leave nothing pending, so no
/// upload after a restart can rewrite them.
#[test]
fn damage_marks_cannot_make_the_server_replace_intact_data() {
    if !need_curl() {
        return;
    }
    let env = Env::new();
    let mut s = setup(&env);
    let (dbfile, _, x) = one_chunk_file(&env, "db.img", 41);
    let (wfile, _, w) = one_chunk_file(&env, "web.img", 42);
    Client::new(&env, &s, "db-backup").backup(&dbfile, &["--name", "db-1"]);
    Client::new(&env, &s, "web-backup").backup(&wfile, &["--name", "web-1"]);
    let raw = Raw::new(&env, &s);
    let web_r = token(&env, "web-restore");
    let admin = token(&env, "admin");
    let marks = serde_json::json!([
        {"kind": "C", "id": x.to_hex(), "why": "forged"},
        {"kind": "C", "id": w.to_hex(), "why": "forged"},
    ]);
    let (code, b) = raw.call(
        "POST",
        "/v1/damage",
        Some(&web_r),
        Some(marks.to_string().as_bytes()),
        &[],
    );
    assert_eq!(code, 204, "{}", String::from_utf8_lossy(&b));
    assert!(raw.damage_marks(&admin).is_empty(), "forged marks recorded");
    // One intact chunk named 2000 times is checked once, not 2000 times
    // (each check reads, decompresses and hashes it).
    let refused = |s: &Served| {
        fs::read_to_string(&s.log)
            .unwrap()
            .matches("damage mark refused")
            .count()
    };
    let before = refused(&s);
    let many: Vec<_> = (0..2000)
        .map(|_| serde_json::json!({"kind": "C", "id": w.to_hex(), "why": "forged"}))
        .collect();
    let (code, b) = raw.call(
        "POST",
        "/v1/damage",
        Some(&web_r),
        Some(serde_json::Value::from(many).to_string().as_bytes()),
        &[],
    );
    assert_eq!(code, 204, "{}", String::from_utf8_lossy(&b));
    assert_eq!(
        refused(&s) - before,
        1,
        "one chunk named 2000 times was checked more than once"
    );
    // A reason is bounded (marks are kept and listed to every reader).
    let long = serde_json::json!([{"kind": "C", "id": w.to_hex(), "why": "x".repeat(2000)}]);
    let (code, b) = raw.call(
        "POST",
        "/v1/damage",
        Some(&web_r),
        Some(long.to_string().as_bytes()),
        &[],
    );
    assert_eq!(code, 400, "{}", String::from_utf8_lossy(&b));
    assert!(String::from_utf8_lossy(&b).contains("over the limit"));
    // After a restart (marks pending), an upload of other bytes under the
    // ids changes nothing.
    s.kill9();
    let s = Served::start(&env, &s.addr);
    let raw = Raw::new(&env, &s);
    let web = token(&env, "web-backup");
    let sess = raw.session(&web, "web-heal");
    let (code, _) = raw.put_region(
        &web,
        &sess,
        &fake_sealed(b'R', &[w]),
        &[(w, 12_000, raw_frame(&seeded(12_000, 5)))],
    );
    assert_eq!(code, 400);
    let admin_c = Client::new(&env, &s, "admin");
    restores_exact(&admin_c, &env, "db-1", &dbfile);
    restores_exact(&admin_c, &env, "web-1", &wfile);
    admin_c.ok(&["check", "--read-data"]);
    s.assert_no_panic();
}

/// Item 6 (and the name check of item 3 for plain records): a backup token
/// re-commits its own snapshot dated a year ahead, or under another
/// namespace's image name: both refused; the same record re-tagged at its
/// own time is accepted (the checks refuse only what they should).
#[test]
fn snapshot_records_are_checked_for_time_and_name() {
    if !need_curl() {
        return;
    }
    let env = Env::new();
    let s = setup(&env);
    let raw = Raw::new(&env, &s);
    let (wfile, _, _) = one_chunk_file(&env, "web.img", 51);
    Client::new(&env, &s, "web-backup").backup(&wfile, &["--name", "web-1"]);
    let web = token(&env, "web-backup");
    let (_, rec) = raw.snapshots(&web).into_iter().next().unwrap();
    let snap = Snapshot::decode(&rec).unwrap();
    let sess = raw.session(&web, "web-1");
    let mut future = snap.clone();
    future.time_ns += 365 * 86_400 * 1_000_000_000;
    let (code, msg) = raw.commit(&web, &sess, &future.encode(), &[]);
    assert_eq!(code, 400, "{msg}");
    assert!(msg.contains("future"), "{msg}");
    let mut other = snap.clone();
    other.name = "db-1".into();
    let (code, msg) = raw.commit(&web, &sess, &other.encode(), &[]);
    assert_eq!(code, 400, "{msg}");
    // A sealed-shaped record in a plain repository.
    let (code, msg) = raw.commit(&web, &sess, &fake_sealed(b'S', &snap.pages), &[]);
    assert_eq!(code, 400, "{msg}");
    // A record swollen with tags (every tenant's listing reads every
    // record): 14 MiB used to be taken.
    let mut swollen = snap.clone();
    swollen.tags = vec!["t".repeat(65_000); 20];
    let (code, msg) = raw.commit(&web, &sess, &swollen.encode(), &[]);
    assert_eq!(code, 400, "{msg}");
    assert!(msg.contains("over the limit"), "{msg}");
    let mut retag = snap.clone();
    retag.tags = vec!["again".into()];
    let (code, msg) = raw.commit(&web, &sess, &retag.encode(), &[]);
    assert_eq!(code, 200, "{msg}");
    let all = raw.snapshots(&web);
    assert_eq!(all.len(), 2);
    // The listing in pages (how a client reads one past an answer's
    // limit): from the start, then after a given snapshot.
    let page = |after: &str| {
        let (code, b) = raw.call(
            "GET",
            &format!("/v1/snapshots?after={after}"),
            Some(&web),
            None,
            &[],
        );
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(&b));
        proto::decode_snapshot_page(&b).unwrap()
    };
    assert_eq!(page(""), (false, all.clone()));
    assert_eq!(page(&all[0].0.to_hex()), (false, all[1..].to_vec()));
    assert_eq!(page(&all[1].0.to_hex()), (false, vec![]));
    let (code, _) = raw.call("GET", "/v1/snapshots?before=x", Some(&web), None, &[]);
    assert_eq!(code, 400);
    s.assert_no_panic();
}

/// A namespaced commit of pages naming a million regions it does not own
/// used to collect and look up every region key at once: 2.3 GiB of
/// server memory for one 255 MiB commit. They are looked up a few pages at
/// a time; the commit is refused as before.
#[test]
fn a_commit_naming_a_million_regions_is_checked_a_few_pages_at_a_time() {
    if !need_curl() {
        return;
    }
    let env = Env::new();
    let s = setup(&env);
    let raw = Raw::new(&env, &s);
    let (wfile, _, _) = one_chunk_file(&env, "web.img", 71);
    Client::new(&env, &s, "web-backup").backup(&wfile, &["--name", "web-1"]);
    let web = token(&env, "web-backup");
    let (_, rec) = raw.snapshots(&web).into_iter().next().unwrap();
    let mut snap = Snapshot::decode(&rec).unwrap();
    // 1,000 pages of 1,024 regions no one stored: a 64 MiB commit.
    let pages: Vec<Vec<u8>> = (0..1000u32)
        .map(|p| {
            let regions: Vec<Id> = (0..1024u32)
                .map(|r| Id::hash(&[p.to_le_bytes(), r.to_le_bytes()].concat()))
                .collect();
            Page {
                cvs: vec![[0; 32]; regions.len()],
                regions,
            }
            .encode()
        })
        .collect();
    let body: u64 = pages.iter().map(|p| p.len() as u64).sum();
    snap.pages = pages.iter().map(|p| Id::hash(p)).collect();
    snap.size = 1000 * 1024 * u64::from(snap.region_size);
    let sess = raw.session(&web, "web-1");
    let before = vm_hwm(&s);
    let (code, msg) = raw.commit(&web, &sess, &snap.encode(), &pages);
    assert_eq!(code, 404, "{msg}");
    let grown = vm_hwm(&s).saturating_sub(before);
    assert!(
        grown < 4 * body,
        "peak memory grew by {grown} bytes for a commit of {body}"
    );
    s.assert_no_panic();
}

/// A recipe naming 453,438 tiny stored chunks held the store's write lock
/// for 14 s while their references were counted. A recipe names at most as
/// many chunks as a region holds at the smallest chunk size.
#[test]
fn a_recipe_names_no_more_chunks_than_a_region_can_hold() {
    if !need_curl() {
        return;
    }
    let env = Env::new();
    let s = setup(&env);
    let raw = Raw::new(&env, &s);
    let web = token(&env, "web-backup");
    let sess = raw.session(&web, "web-1");
    let many: Vec<(Id, u32)> = (0..=proto::limits::FRAMES_PER_REGION as u32)
        .map(|i| (Id::hash(&i.to_le_bytes()), 1))
        .collect();
    let (code, msg) = raw.put_region(&web, &sess, &recipe(&many), &[]);
    assert_eq!(code, 400, "{msg}");
    assert!(msg.contains("65537 chunks (65536 allowed)"), "{msg}");
    s.assert_no_panic();
}

/// Item 7: one request used to abort the server (an allocation of
/// start + count values).
#[test]
fn zero_value_requests_past_any_image_are_refused() {
    if !need_curl() {
        return;
    }
    let env = Env::new();
    let s = setup(&env);
    let raw = Raw::new(&env, &s);
    let web = token(&env, "web-restore");
    for body in [
        r#"{"region_size":8388608,"start":1125899906842624,"count":1}"#,
        r#"{"region_size":8388608,"start":18446744073709551615,"count":1}"#,
        r#"{"region_size":1,"start":0,"count":1048576}"#,
    ] {
        let (code, b) = raw.call(
            "POST",
            "/v1/zero-cvs/get",
            Some(&web),
            Some(body.as_bytes()),
            &[],
        );
        assert_eq!(code, 400, "{body}: {}", String::from_utf8_lossy(&b));
    }
    let (code, _) = raw.call(
        "POST",
        "/v1/zero-cvs/get",
        Some(&web),
        Some(br#"{"region_size":8388608,"start":0,"count":4}"#),
        &[],
    );
    assert_eq!(code, 200);
    assert_eq!(raw.health(), 200);
    s.assert_no_panic();
}

/// Item 8: bodies without a valid token are never read: three senders of
/// 150 MiB each get 401 at once and the server's peak memory barely moves.
/// A token holder's body past the route's limit is refused from its
/// declared length, before it is read.
#[test]
fn bodies_are_not_read_before_authentication() {
    if !need_curl() {
        return;
    }
    let env = Env::new();
    let s = setup(&env);
    let raw = Raw::new(&env, &s);
    assert_eq!(raw.health(), 200);
    let before = vm_hwm(&s);
    let big = env.path("big.bin");
    fs::File::create(&big).unwrap().set_len(150 << 20).unwrap();
    let senders: Vec<Child> = (0..3)
        .map(|_| {
            Command::new("curl")
                .args([
                    "-sk",
                    "--max-time",
                    "60",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "-H",
                    "Expect:",
                ])
                .arg("--data-binary")
                .arg(format!("@{}", big.display()))
                .arg(format!("{}/v1/commit", raw.base))
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in senders {
        let o = c.wait_with_output().unwrap();
        let code = String::from_utf8_lossy(&o.stdout).to_string();
        // 401, or the connection closed before curl finished sending.
        assert!(
            code == "401" || code == "000",
            "unauthenticated body: {code}"
        );
    }
    let grown = vm_hwm(&s).saturating_sub(before);
    assert!(grown < 64 << 20, "peak memory grew by {grown} bytes");
    // Declared past the limit, with a valid token: 413 from the header.
    let admin = token(&env, "admin");
    let (code, _) = raw.call(
        "PUT",
        &format!("/v1/regions/{}", "00".repeat(32)),
        Some(&admin),
        None,
        &["Content-Length: 90000000".into()],
    );
    assert!(code == 413 || code == 0, "{code}");
    assert_eq!(raw.health(), 200);
    s.assert_no_panic();
}

/// Starts the server with extra config lines (after the namespaces).
fn setup_with(env: &Env, extra: &str) -> Served {
    let s = setup(env);
    drop(s);
    let cfg = env.repo().join("server/config.toml");
    let text = fs::read_to_string(&cfg).unwrap();
    fs::write(&cfg, format!("{extra}\n{text}")).unwrap();
    Served::start(env, "127.0.0.1:0")
}

/// Item 9: connections that complete TLS and then say nothing used to hold
/// every connection slot for as long as they stayed open. They are closed
/// after the idle timeout, and the server answers again.
#[test]
fn silent_connections_are_closed_and_cannot_starve_the_server() {
    if !need_curl() || !have("python3") {
        return;
    }
    let env = Env::new();
    let s = setup_with(
        &env,
        "max_connections = 6\nidle_connection_timeout = \"2s\"",
    );
    let raw = Raw::new(&env, &s);
    // Six TLS connections that never send a request; the script reports
    // how many the server closed, waiting at most 20 s.
    let script = r#"
conns = []
for _ in range(6):
    s = tls(5, alpn=None)
    conns.append(s)
print("open", flush=True)
closed = 0
deadline = time.time() + 20
for s in conns:
    s.settimeout(max(0.1, deadline - time.time()))
    try:
        if s.recv(1) == b"": closed += 1
    except ssl.SSLError: closed += 1
    except ConnectionError: closed += 1
    except socket.timeout: pass
print("closed", closed, flush=True)
time.sleep(30)
"#;
    let mut holder = python_tls(script, &s, &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let mut lines = std::io::BufReader::new(holder.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "open");
    let closed = lines.next().unwrap().unwrap();
    // The holder still has its sockets (it sleeps): the server let go.
    assert_eq!(closed, "closed 6", "silent connections kept open");
    let started = Instant::now();
    let mut code = 0;
    while started.elapsed() < Duration::from_secs(10) {
        code = raw.health();
        if code == 200 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(code, 200, "the server stayed unreachable");
    s.assert_no_panic();
}

/// Item 10: asking for the same large chunk thousands of times (a 128 KiB
/// request) used to build the whole answer before refusing it. The answer
/// is refused as soon as it passes its limit, and peak memory stays far
/// below what was asked for.
#[test]
fn bulk_answers_are_bounded_before_they_are_built() {
    if !need_curl() {
        return;
    }
    let env = Env::new();
    let s = setup(&env);
    let raw = Raw::new(&env, &s);
    let (chunk, len) = largest_web_chunk(&env, &s, &raw, 61);
    let web_r = token(&env, "web-restore");
    let asked = u64::from(len) * 4096;
    assert!(
        asked > 512 << 20,
        "largest chunk {len} too small for the test"
    );
    let before = vm_hwm(&s);
    let ids = vec![chunk; 4096];
    let (code, _) = raw.call(
        "POST",
        "/v1/chunks/get",
        Some(&web_r),
        Some(&proto::encode_ids(&ids)),
        &[],
    );
    assert_eq!(code, 413);
    let grown = vm_hwm(&s).saturating_sub(before);
    assert!(
        grown < asked / 2,
        "peak memory grew by {grown} bytes for an answer of {asked} refused"
    );
    assert_eq!(raw.health(), 200);
    s.assert_no_panic();
}

/// Raw HTTP/2 for `python_tls` scripts, by hand (no h2 package): frames,
/// HPACK literals, `h2_open(window)` (TLS with ALPN h2, the preface and
/// SETTINGS_INITIAL_WINDOW_SIZE = `window`), `h2_get(s, sid, path)` (a
/// GET without a token) and `h2_post(s, sid, path, token, length)` (a
/// POST's HEADERS declaring `length` body bytes).
const H2: &str = r#"
import struct
def frame(t, f, sid, p): return struct.pack(">I", len(p))[1:] + bytes([t, f]) + struct.pack(">I", sid) + p
def n7(n):
    if n < 127: return bytes([n])
    out = [127]; n -= 127
    while n >= 128: out.append((n & 127) | 128); n >>= 7
    return bytes(out + [n])
def lit(k, v): k = k.encode(); v = v.encode(); return b"\x00" + n7(len(k)) + k + n7(len(v)) + v
def h2_open(window):
    s = tls(30, alpn="h2")
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, struct.pack(">HI", 4, window)))
    return s
def h2_get(s, sid, path):
    h = lit(":method", "GET") + lit(":scheme", "https") + lit(":path", path) + lit(":authority", "x")
    s.sendall(frame(1, 5, sid, h))
def h2_post(s, sid, path, token, length):
    h = lit(":method", "POST") + lit(":scheme", "https") + lit(":path", path) + lit(":authority", "x")
    h += lit("authorization", "Bearer " + token) + lit("content-length", str(length))
    s.sendall(frame(1, 4, sid, h))
"#;

/// Without any token, 4 source addresses × 128 connections that finished
/// TLS and the HTTP/2 preface held every connection slot for the idle
/// minute. A connection now has 10 s for its first request (a health
/// check, which needs no token, is none), and one whose request has no
/// valid token is closed after the answer.
#[test]
fn connections_without_a_valid_token_are_let_go_soon() {
    if !have("python3") {
        return;
    }
    let env = Env::new();
    // The idle timeout is the default minute: the first-request limit and
    // the refusal are what close these connections.
    let s = setup(&env);
    let script = format!(
        "{H2}{}",
        r#"
conns = {"silent": h2_open(window=65535), "forged": h2_open(window=65535), "pinger": h2_open(window=65535)}
h2_post(conns["forged"], 1, "/v1/sessions", "forged-token", 2)
conns["forged"].sendall(frame(0, 1, 1, b"{}"))
for c in conns.values(): c.settimeout(0.2)
closed = set()
t0 = time.time()
sid = 1
next_ping = 0
# A health check every 3 s on "pinger"; at most 25 s in all.
while time.time() - t0 < 25 and len(closed) < len(conns):
    if time.time() >= next_ping and "pinger" not in closed:
        try: h2_get(conns["pinger"], sid, "/v1/health")
        except (ConnectionError, ssl.SSLError): closed.add("pinger")
        sid += 2; next_ping = time.time() + 3
    for name, c in conns.items():
        if name in closed: continue
        try:
            if c.recv(65536) == b"": closed.add(name)
        except (ConnectionError, ssl.SSLError): closed.add(name)
        except socket.timeout: pass
for name in conns: print(name, "closed" if name in closed else "open", flush=True)
"#
    );
    let out = python_tls(&script, &s, &[]).output().unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.contains("forged closed"), "{out}");
    assert!(out.contains("silent closed"), "{out}");
    assert!(out.contains("pinger closed"), "{out}");
    s.assert_no_panic();
}

/// Two tokens opened 2 × 256 streams, each declaring a 1 MiB body
/// and sending a byte every few seconds: the server took the declared megabyte
/// for each before reading, so the two held all body memory and every
/// other client's POST waited 30 s for a 503. A body now takes memory as
/// its bytes arrive: the same streams hold a KiB each, and a backup
/// opens its session at once.
#[test]
fn bodies_that_declare_much_and_send_little_hold_little() {
    if !need_curl() || !have("python3") {
        return;
    }
    let env = Env::new();
    let s = setup_with(&env, "max_body_memory_mib = 16");
    let raw = Raw::new(&env, &s);
    // Per token 64 streams of 1 MiB declared: four times its share (8 MiB).
    let script = format!(
        "{H2}{}",
        r#"
conns = []
for token in sys.argv[3:5]:
    s = h2_open(window=65535)
    for i in range(64):
        h2_post(s, 1 + 2 * i, "/v1/chunks/get", token, 1 << 20)
        s.sendall(frame(0, 0, 1 + 2 * i, b"x"))
    conns.append(s)
print("held", flush=True)
# A byte per stream every 5 s: under body_idle_timeout, for at most 60 s.
for _ in range(12):
    time.sleep(5)
    for s in conns:
        for i in range(64):
            s.sendall(frame(0, 0, 1 + 2 * i, b"x"))
"#
    );
    let web_r = token(&env, "web-restore");
    let db_b = token(&env, "db-backup");
    let mut holder = python_tls(&script, &s, &[&web_r, &db_b])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let mut lines = std::io::BufReader::new(holder.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "held");
    std::thread::sleep(Duration::from_millis(500));
    let web = token(&env, "web-backup");
    // Before, 503 "busy" after the 30 s queue wait.
    let (code, b) = raw.call(
        "POST",
        "/v1/sessions",
        Some(&web),
        Some(br#"{"image":"web-1"}"#),
        &[],
    );
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&b));
    s.assert_no_panic();
}

/// Backs up 4 MiB of web's data and writes a `chunks/get` body naming its
/// largest chunk often enough for an answer of about `bytes`; returns the
/// body's file, the chunk and the answer's size.
fn large_ask(env: &Env, s: &Served, raw: &Raw, bytes: usize) -> (PathBuf, Id, u64) {
    let (chunk, len) = largest_web_chunk(env, s, raw, 62);
    let k = (bytes / len as usize).max(1);
    let ask = env.path("ask.bin");
    fs::write(&ask, proto::encode_ids(&vec![chunk; k])).unwrap();
    (ask, chunk, k as u64 * u64::from(len))
}

/// Backs up 4 MiB of web's data (from `seed`) and finds its largest chunk
/// through raw requests: the chunk and its length.
fn largest_web_chunk(env: &Env, s: &Served, raw: &Raw, seed: u64) -> (Id, u32) {
    let img = env.path("web.img");
    fs::write(&img, seeded(4 << 20, seed)).unwrap();
    Client::new(env, s, "web-backup").backup(&img, &["--name", "web-1"]);
    let web_r = token(env, "web-restore");
    let (_, rec) = raw.snapshots(&web_r).into_iter().next().unwrap();
    let pages = Snapshot::decode(&rec).unwrap().pages;
    let (_, b) = raw.call(
        "POST",
        "/v1/pages",
        Some(&web_r),
        Some(&proto::encode_ids(&pages)),
        &[],
    );
    let page = Page::decode(&proto::decode_records(&b, 1).unwrap()[0]).unwrap();
    let regions: Vec<Id> = page
        .regions
        .iter()
        .copied()
        .filter(|r| *r != Id::ZERO)
        .collect();
    let (_, b) = raw.call(
        "POST",
        "/v1/regions",
        Some(&web_r),
        Some(&proto::encode_ids(&regions)),
        &[],
    );
    let largest = proto::decode_records(&b, regions.len())
        .unwrap()
        .iter()
        .flat_map(|r| Region::decode(r).unwrap().entries)
        .filter(|e| e.chunk.is_some())
        .max_by_key(|e| e.len)
        .unwrap();
    (largest.chunk.unwrap(), largest.len)
}

/// A client that opens its window a piece at a time, under
/// `body_idle_timeout`, made one answer last a day (a 256 MiB answer at
/// 3 KiB/s), holding its read slot. An answer now has `body_timeout` in
/// all, as a request body has.
#[test]
fn an_answer_read_a_trickle_at_a_time_is_cut_off_at_the_body_timeout() {
    if !need_curl() || !have("python3") {
        return;
    }
    let env = Env::new();
    let s = setup_with(&env, "body_idle_timeout = \"20s\"\nbody_timeout = \"3s\"");
    let raw = Raw::new(&env, &s);
    let (ask, _, _) = large_ask(&env, &s, &raw, 8 << 20);
    let script = format!(
        "{H2}{}",
        r#"
body = open(sys.argv[3], "rb").read(); token = sys.argv[4]
s = h2_open(window=0)
h2_post(s, 1, "/v1/chunks/get", token, len(body))
for off in range(0, len(body), 16384):
    s.sendall(frame(0, 1 if off + 16384 >= len(body) else 0, 1, body[off:off + 16384]))
t0 = time.time()
closed = False
s.settimeout(0.5)
next_update = 0
while time.time() - t0 < 25:
    if time.time() >= next_update:
        # 16 KiB more for the stream each second: progress, slowly.
        try:
            s.sendall(frame(8, 0, 0, struct.pack(">I", 16384)) + frame(8, 0, 1, struct.pack(">I", 16384)))
        except (ConnectionError, ssl.SSLError): closed = True; break
        next_update = time.time() + 1
    try:
        if s.recv(65536) == b"": closed = True; break
    except (ConnectionError, ssl.SSLError): closed = True; break
    except socket.timeout: pass
print("closed" if closed else "open", flush=True)
"#
    );
    let web_r = token(&env, "web-restore");
    let out = python_tls(&script, &s, &[ask.to_str().unwrap(), &web_r])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.trim(),
        "closed",
        "an answer read a trickle at a time outlived body_timeout"
    );
    s.assert_no_panic();
}

/// An answer the client does not read (its HTTP/2 window kept shut) used
/// to give back its read slot once built and stay in memory for as long
/// as the client liked: a read token held 255 MiB per 43 KB request. It
/// now keeps its read slot until it is sent, so unread answers are
/// bounded by `max_reads`, and the connection is dropped after
/// `body_idle_timeout` without progress, giving the slot back. One token
/// holds all read slots but one, so another token reads meanwhile.
#[test]
fn an_answer_left_unread_holds_its_read_slot_and_is_cut_off() {
    if !need_curl() || !have("python3") {
        return;
    }
    let env = Env::new();
    let s = setup_with(&env, "max_reads = 2\nbody_idle_timeout = \"12s\"");
    let raw = Raw::new(&env, &s);
    let web_r = token(&env, "web-restore");
    // Four answers of about 40 MiB each, on one connection.
    let (ask, chunk, answer) = large_ask(&env, &s, &raw, 40 << 20);
    let before = vm_hwm(&s);
    // Raw HTTP/2: the preface with SETTINGS_INITIAL_WINDOW_SIZE = 0, four
    // POSTs (HPACK literals), then no WINDOW_UPDATE, ever. Reports when
    // the server closed the connection (at most 30 s).
    let script = format!(
        "{H2}{}",
        r#"
body = open(sys.argv[3], "rb").read(); token = sys.argv[4]
s = h2_open(window=0)
for i in range(4):
    sid = 1 + 2 * i
    h2_post(s, sid, "/v1/chunks/get", token, len(body))
    for off in range(0, len(body), 16384):
        s.sendall(frame(0, 1 if off + 16384 >= len(body) else 0, sid, body[off:off + 16384]))
print("sent", flush=True)
t0 = time.time()
closed = False
while time.time() - t0 < 30:
    try:
        if s.recv(65536) == b"": closed = True; break
    except (ConnectionError, ssl.SSLError): closed = True; break
    except socket.timeout: pass
print("closed" if closed else "open", flush=True)
"#
    );
    let mut holder = python_tls(&script, &s, &[ask.to_str().unwrap(), &web_r])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let mut lines = std::io::BufReader::new(holder.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "sent");
    // While web's answers wait unread (for 12 s), the admin's read has the
    // other slot: answered, not left waiting for web's to be cut off.
    std::thread::sleep(Duration::from_millis(500));
    let admin = token(&env, "admin");
    let (code, _) = raw.call_within(
        6,
        "POST",
        "/v1/chunks/get",
        Some(&admin),
        Some(&proto::encode_ids(&[chunk])),
        &[],
    );
    assert_eq!(code, 200, "another token found no read slot free");
    let end = lines.next().unwrap().unwrap();
    let _ = holder.wait();
    assert_eq!(
        end, "closed",
        "a connection with an unread answer was kept open"
    );
    let grown = vm_hwm(&s).saturating_sub(before);
    assert!(
        grown < 2 * answer,
        "peak memory grew by {grown} bytes with four unread answers of {answer} bytes"
    );
    // The read slot is back: an ordinary read is answered.
    let (code, _) = raw.call(
        "POST",
        "/v1/chunks/get",
        Some(&web_r),
        Some(&proto::encode_ids(&[chunk])),
        &[],
    );
    assert_eq!(code, 200);
    s.assert_no_panic();
}

/// Item 12: sessions per token are bounded (each pins objects against gc).
#[test]
fn sessions_per_token_are_bounded() {
    if !need_curl() {
        return;
    }
    let env = Env::new();
    let s = setup_with(&env, "max_sessions_per_token = 4");
    let raw = Raw::new(&env, &s);
    let web = token(&env, "web-backup");
    for i in 0..4 {
        raw.session(&web, &format!("web-{i}"));
    }
    let (code, b) = raw.call(
        "POST",
        "/v1/sessions",
        Some(&web),
        Some(br#"{"image":"web-9"}"#),
        &[],
    );
    assert_eq!(code, 429, "{}", String::from_utf8_lossy(&b));
    // Another token is not affected.
    raw.session(&token(&env, "db-backup"), "db-1");
    s.assert_no_panic();
}

/// A session a call opens by naming it (a client-chosen id with
/// `imgstore-image`) passes every check of `POST /v1/sessions` and counts
/// against the same bound; another token cannot take it or its id.
#[test]
fn sessions_opened_by_their_first_call_are_checked_as_any() {
    if !need_curl() {
        return;
    }
    let env = Env::new();
    let s = setup_with(&env, "max_sessions_per_token = 2");
    let raw = Raw::new(&env, &s);
    let (web, db) = (token(&env, "web-backup"), token(&env, "db-backup"));
    let restore = token(&env, "web-restore");
    let known = |tok: &str, id: &str, image: &str| {
        raw.call(
            "POST",
            "/v1/chunks/known",
            Some(tok),
            Some(&[0u8; 4]),
            &[
                format!("imgstore-session: {id}"),
                format!("imgstore-image: {image}"),
            ],
        )
    };
    // `POST /v1/sessions` for `image` with the id `id`.
    let open = |tok: &str, image: &str, id: &str| {
        let body = format!(r#"{{"image":"{image}","id":"{id}"}}"#);
        raw.call(
            "POST",
            "/v1/sessions",
            Some(tok),
            Some(body.as_bytes()),
            &[],
        )
    };
    // A restore token, and an image outside the token's namespaces, are
    // refused as an opening would be.
    let (code, b) = known(&restore, "00000000000000a1", "web-disk");
    assert_eq!(code, 403, "{}", String::from_utf8_lossy(&b));
    let (code, b) = known(&web, "00000000000000a2", "db-disk");
    assert_eq!(code, 403, "{}", String::from_utf8_lossy(&b));
    // Opened by its first call; the opening with the same id joins it.
    let (code, b) = known(&web, "00000000000000a3", "web-disk");
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&b));
    let (code, b) = open(&web, "web-disk", "00000000000000a3");
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&b));
    assert!(String::from_utf8_lossy(&b).contains("00000000000000a3"));
    // Another token cannot take it: its calls find no session of its
    // own (410, as for any other token's session), its opening is refused.
    let (code, b) = known(&db, "00000000000000a3", "db-disk");
    assert_eq!(code, 410, "{}", String::from_utf8_lossy(&b));
    let (code, b) = open(&db, "db-disk", "00000000000000a3");
    assert_eq!(code, 409, "{}", String::from_utf8_lossy(&b));
    // Nor the same token's opening for another image; a zero or
    // malformed id is refused.
    let (code, _) = open(&web, "web-other", "00000000000000a3");
    assert_eq!(code, 409);
    for bad in ["0000000000000000", "xyz", "00000000000000a3ff"] {
        let (code, b) = open(&web, "web-disk", bad);
        assert_eq!(code, 400, "{bad}: {}", String::from_utf8_lossy(&b));
    }
    // The bound holds: one more opened by a call, then 429.
    let (code, _) = known(&web, "00000000000000a4", "web-disk");
    assert_eq!(code, 200);
    let (code, b) = known(&web, "00000000000000a5", "web-disk");
    assert_eq!(code, 429, "{}", String::from_utf8_lossy(&b));
    s.assert_no_panic();
}

/// A session may pin, as it opens, the regions of index pages its token
/// can see, and no others (a page of another namespace is skipped with the
/// same answer, so pinning is no oracle); the count is bounded before
/// anything is read.
#[test]
fn sessions_pin_only_pages_their_token_sees() {
    if !need_curl() {
        return;
    }
    let env = Env::new();
    let s = setup(&env);
    let raw = Raw::new(&env, &s);
    let (dbfile, _, _) = one_chunk_file(&env, "db.img", 31);
    Client::new(&env, &s, "db-backup").backup(&dbfile, &["--name", "db-1"]);
    let (webfile, _, _) = one_chunk_file(&env, "web.img", 32);
    Client::new(&env, &s, "web-backup").backup(&webfile, &["--name", "web-1"]);
    let admin = token(&env, "admin");
    let (code, body) = raw.call("GET", "/v1/snapshots", Some(&admin), None, &[]);
    assert_eq!(code, 200);
    let page_of = |name: &str| -> Id {
        proto::decode_snapshots(&body)
            .unwrap()
            .into_iter()
            .map(|(_, rec)| Snapshot::decode(&rec).unwrap())
            .find(|s| s.name == name)
            .unwrap()
            .pages[0]
    };
    let (db_page, web_page) = (page_of("db-1"), page_of("web-1"));
    let web = token(&env, "web-backup");
    let open = |pages: &[String]| {
        let body = serde_json::json!({"image": "web-2", "pin_pages": pages}).to_string();
        raw.call(
            "POST",
            "/v1/sessions",
            Some(&web),
            Some(body.as_bytes()),
            &[],
        )
    };
    let pinned = || crate::faults::metric(&env, &s, "pinned_objects");
    assert_eq!(pinned(), 0);
    let (code, b) = open(&[db_page.to_hex()]);
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(pinned(), 0, "another namespace's page pinned");
    let (code, b) = open(&[web_page.to_hex()]);
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(pinned(), 1, "the region of its own parent's page");
    // Bounded, and checked, before anything is read or opened.
    let many: Vec<String> = (0..1025u32)
        .map(|i| Id::hash(&i.to_le_bytes()).to_hex())
        .collect();
    let (code, b) = open(&many);
    assert_eq!(code, 400);
    assert!(String::from_utf8_lossy(&b).contains("at most 1024"));
    let (code, _) = open(&["not hex".to_string()]);
    assert_eq!(code, 400);
    assert_eq!(crate::faults::metric(&env, &s, "sessions_active"), 2);
    s.assert_no_panic();
}

/// The protocol fuzz test: every endpoint fed random and mutated bodies by
/// every role (bounded: a fixed number per endpoint). The server answers
/// each with a 4xx (never a 5xx but 503 or 507), stays up, never panics,
/// and its peak memory stays under the documented bound.
#[test]
fn every_endpoint_survives_random_and_mutated_bodies() {
    if !need_curl() {
        return;
    }
    let env = Env::new();
    let s = setup(&env);
    let raw = Raw::new(&env, &s);
    let (wfile, _, _) = one_chunk_file(&env, "web.img", 71);
    Client::new(&env, &s, "web-backup").backup(&wfile, &["--name", "web-1"]);
    let admin = token(&env, "admin");
    let web = token(&env, "web-backup");
    let web_r = token(&env, "web-restore");
    let sess = raw.session(&web, "web-1");
    let (_, rec) = raw.snapshots(&admin).into_iter().next().unwrap();
    let snap = Snapshot::decode(&rec).unwrap();
    // Valid bodies to mutate.
    let ids = proto::encode_ids(&snap.pages);
    let commit = proto::encode_commit(&rec, None, &[]);
    let region = proto::encode_put_region(&recipe(&[(Id::hash(b"x"), 1)]), std::iter::empty());
    let endpoints: Vec<(&str, String, Vec<u8>)> = vec![
        ("POST", "/v1/pages".into(), ids.clone()),
        ("POST", "/v1/regions".into(), ids.clone()),
        ("POST", "/v1/chunks/get".into(), ids.clone()),
        ("POST", "/v1/chunks/known".into(), ids.clone()),
        ("POST", "/v1/refs/C".into(), ids.clone()),
        ("POST", "/v1/forget".into(), ids.clone()),
        (
            "PUT",
            format!("/v1/regions/{}", Id::hash(b"r").to_hex()),
            region,
        ),
        ("POST", "/v1/commit".into(), commit),
        (
            "POST",
            "/v1/zero-cvs/get".into(),
            br#"{"region_size":8388608,"start":0,"count":4}"#.to_vec(),
        ),
        (
            "POST",
            "/v1/zero-cvs".into(),
            vec![0, 0, 128, 0, 1, 0, 0, 0],
        ),
        (
            "POST",
            "/v1/sessions".into(),
            br#"{"image":"web-2"}"#.to_vec(),
        ),
        (
            "POST",
            "/v1/damage".into(),
            br#"[{"kind":"C","id":"00","why":"x"}]"#.to_vec(),
        ),
        (
            "POST",
            "/v1/damage/clear".into(),
            br#"[{"kind":"C","id":"00"}]"#.to_vec(),
        ),
        (
            "POST",
            "/v1/protect".into(),
            br#"{"id":"00","protected":true}"#.to_vec(),
        ),
        (
            "POST",
            "/v1/scan".into(),
            br#"{"what":"refs","after":"zz"}"#.to_vec(),
        ),
        ("POST", "/v1/gc".into(), br#"{"dry_run":"yes"}"#.to_vec()),
        (
            "POST",
            format!("/v1/snapshots/{}/replace", Id::hash(b"s").to_hex()),
            rec.clone(),
        ),
    ];
    let mut seed = 1u64;
    for (method, path, valid) in &endpoints {
        for round in 0..8u64 {
            seed += 1;
            let body = match round % 4 {
                // Well-formed JSON carrying extreme numbers and long strings
                // in every field a JSON route reads.
                3 if valid.first() == Some(&b'{') || valid.first() == Some(&b'[') => {
                    let n = |i: u64| match (seed + i) % 4 {
                        0 => u64::MAX.to_string(),
                        1 => (1u64 << 50).to_string(),
                        2 => "0".to_string(),
                        _ => (seed * 7919 + i).to_string(),
                    };
                    let long = "x".repeat(((seed as usize) * 997) % 70_000);
                    format!(
                        r#"{{"region_size":{},"start":{},"count":{},"image":"{long}","id":"{long}","kind":"{long}","why":"{long}","protected":true,"dry_run":true,"what":"refs","after":"{long}"}}"#,
                        n(1),
                        n(2),
                        n(3)
                    )
                    .into_bytes()
                }
                3 => {
                    // A binary body whose count field is huge.
                    let mut b = valid.clone();
                    if b.len() >= 4 {
                        b[..4].copy_from_slice(&u32::MAX.to_le_bytes());
                    }
                    b
                }
                0 => seeded((seed as usize * 37) % 700, seed),
                1 => {
                    let mut b = valid.clone();
                    let noise = seeded(8, seed);
                    for (i, n) in noise.iter().enumerate() {
                        if !b.is_empty() {
                            let at = (seed as usize * 131 + i * 17) % b.len();
                            b[at] ^= n | 1;
                        }
                    }
                    b
                }
                _ => {
                    let mut b = valid.clone();
                    b.truncate(valid.len() * (seed as usize % 4) / 4);
                    b
                }
            };
            for tok in [&admin, &web, &web_r] {
                let (code, resp) = raw.call(
                    method,
                    path,
                    Some(tok),
                    Some(&body),
                    std::slice::from_ref(&sess),
                );
                assert!(
                    (400..500).contains(&code) || code == 200 || code == 204 || code == 503,
                    "{method} {path} round {round}: {code} {}",
                    String::from_utf8_lossy(&resp)
                );
            }
        }
    }
    assert_eq!(raw.health(), 200);
    // The documented bound (docs/PROTOCOL.md) with the default limits is
    // far above this; a leak or an unbounded allocation would show here.
    let peak = vm_hwm(&s);
    assert!(peak < 1 << 30, "peak RSS {peak}");
    // The repository is intact after it all.
    let admin_c = Client::new(&env, &s, "admin");
    restores_exact(&admin_c, &env, "web-1", &wfile);
    admin_c.ok(&["check", "--read-data"]);
    s.assert_no_panic();
}

/// An encrypted repository with two namespaces, a setup a server runs with
/// the passphrase unknown to it: (server, passphrase).
fn encrypted_setup(env: &Env) -> Served {
    let o = env
        .command()
        .args(["init", "--encryption"])
        .env("IMGSTORE_PASSWORD", PASS)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    crate::server::serve_config(env);
    Served::start(env, "127.0.0.1:0")
}

const PASS: &str = "shared by every host";

/// A sealed index page had only the 16 MiB record limit: one naming half a
/// million regions, then a session pinning it 1,024 times, took the server
/// to gigabytes (each copy read and its regions collected). A sealed page
/// names at most as many regions as a plain one may, and a page named
/// twice is pinned once.
#[test]
fn a_sealed_page_names_no_more_regions_than_a_plain_one() {
    if !need_curl() {
        return;
    }
    let env = Env::new();
    let s = encrypted_setup(&env);
    let raw = Raw::new(&env, &s);
    let web = token(&env, "web-backup");
    let sess = raw.session(&web, "web-1");
    let region = Id::hash(b"any region");
    let page = fake_sealed(b'P', &vec![region; imgstore_format::PAGE_REGIONS + 1]);
    let record = fake_sealed(b'S', &[Id::hash(&page)]);
    let (code, msg) = raw.commit(&web, &sess, &record, &[page]);
    assert_eq!(code, 400, "{msg}");
    assert!(msg.contains("regions (1024 allowed)"), "{msg}");
    s.assert_no_panic();
}

/// The repository's keys, as a host holding the passphrase has them.
fn keys(env: &Env) -> imgstore_crypto::Keys {
    let cfg = imgstore_format::RepoConfig::from_json(
        &fs::read(env.repo().join(imgstore_format::CONFIG_FILE)).unwrap(),
    )
    .unwrap();
    let master = imgstore_crypto::open_any(
        &cfg.encryption.unwrap().slots,
        &imgstore_crypto::Secret::Passphrase(PASS.as_bytes()),
    )
    .unwrap();
    imgstore_crypto::Keys::derive(&master)
}

fn with_pass(c: &Client, args: &[&str]) -> std::process::Output {
    c.command()
        .args(args)
        .env("IMGSTORE_PASSWORD", PASS)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn ok_pass(c: &Client, args: &[&str]) -> String {
    let o = with_pass(c, args);
    assert!(
        o.status.success(),
        "imgstore {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// Item 3 and the hostile-client scenario, encrypted: the web host is
/// compromised (its backup and restore tokens and the repository's
/// passphrase). It tries to plant bytes under the db namespace's chunk ids
/// (sealed frames the server cannot open), to make the server replace them
/// through damage marks, and to commit sealed snapshots naming db's image
/// or dated years ahead. Afterwards db's snapshot is the one an admin's
/// `restore latest --name db-1` restores, exact, and `check --read-data`
/// is clean; the forged records are reported as unreadable, not used.
#[test]
fn a_key_holder_in_one_namespace_cannot_plant_replace_or_impersonate_in_another() {
    if !need_curl() {
        return;
    }
    let env = Env::new();
    let s = encrypted_setup(&env);
    let raw = Raw::new(&env, &s);
    let img = env.path("db.img");
    fs::write(&img, seeded(3 << 20, 81)).unwrap();
    let db = Client::new(&env, &s, "db-backup");
    ok_pass(
        &db,
        &["backup", img.to_str().unwrap(), "--name", "db-1", "--json"],
    );
    let wimg = env.path("web.img");
    fs::write(&wimg, seeded(1 << 20, 82)).unwrap();
    let webc = Client::new(&env, &s, "web-backup");
    ok_pass(
        &webc,
        &[
            "backup",
            wimg.to_str().unwrap(),
            "--name",
            "web-1",
            "--json",
        ],
    );
    let admin = token(&env, "admin");
    let web = token(&env, "web-backup");
    let web_r = token(&env, "web-restore");
    let k = keys(&env);
    // db's chunk ids (the attacker, holding the key, can compute them from
    // data it expects db to hold; here they are read as an admin).
    let snaps = raw.snapshots(&admin);
    let rk = imgstore_crypto::RecordKind::Snapshot;
    let opened: Vec<(Id, Snapshot)> = snaps
        .iter()
        .map(|(id, r)| {
            (
                *id,
                Snapshot::decode(&k.open_record(rk, r).unwrap()).unwrap(),
            )
        })
        .collect();
    let (_, db_snap) = opened.iter().find(|(_, s)| s.name == "db-1").unwrap();
    let (web_id, web_snap) = opened.iter().find(|(_, s)| s.name == "web-1").unwrap();
    let (_, b) = raw.call(
        "POST",
        "/v1/pages",
        Some(&admin),
        Some(&proto::encode_ids(&db_snap.pages)),
        &[],
    );
    let page = &proto::decode_records(&b, db_snap.pages.len()).unwrap()[0];
    let regions =
        imgstore_format::sealed::record_children(imgstore_format::sealed::RecordKind::Page, page)
            .unwrap();
    let (_, b) = raw.call(
        "POST",
        "/v1/regions",
        Some(&admin),
        Some(&proto::encode_ids(&regions[..1])),
        &[],
    );
    let recipe0 = &proto::decode_records(&b, 1).unwrap()[0];
    let db_chunks = imgstore_format::sealed::record_children(
        imgstore_format::sealed::RecordKind::Region,
        recipe0,
    )
    .unwrap();
    let x = db_chunks[0];
    assert!(
        imgstore_format::sealed::has_namespace_tag(&x, "db"),
        "db's ids carry db's tag"
    );
    // 1. Plant: a sealed recipe naming x, with a frame sealed by the key
    // for x but holding other bytes. Refused: x is not web's to write.
    let sess = raw.session(&web, "web-evil");
    let mut c = zstd::bulk::Compressor::new(3).unwrap();
    let evil = imgstore_format::encode_chunk(&seeded(40_000, 83), &mut c);
    let sealed_frame = k.seal_chunk(&x, &evil).unwrap();
    let rec = k.seal_record(imgstore_format::sealed::RecordKind::Region, b"recipe", &[x]);
    let (code, msg) = raw.put_region(&web, &sess, &rec, &[(x, 40_000, sealed_frame)]);
    assert_eq!(code, 400, "planting under db's id: {msg}");
    assert!(msg.contains("tag"), "{msg}");
    // The same with the id stripped of any tag (as keyed by the key alone).
    let mut untagged = x;
    untagged.0[..8].copy_from_slice(&k.chunk_id(b"other").0[..8]);
    let rec = k.seal_record(
        imgstore_format::sealed::RecordKind::Region,
        b"recipe",
        &[untagged],
    );
    let (code, _) = raw.put_region(
        &web,
        &sess,
        &rec,
        &[(untagged, 1, k.seal_chunk(&untagged, &evil).unwrap())],
    );
    assert_eq!(code, 400);
    // 2. Replace through damage marks: db's chunk is not web's to mark.
    let marks = serde_json::json!([{"kind": "C", "id": x.to_hex(), "why": "forged"}]);
    let (code, _) = raw.call(
        "POST",
        "/v1/damage",
        Some(&web_r),
        Some(marks.to_string().as_bytes()),
        &[],
    );
    assert_eq!(code, 204);
    assert!(raw.damage_marks(&admin).is_empty());
    // 3. Impersonate: web's own snapshot re-sealed naming db-1, committed
    // through a session for web-x (the server cannot read the name), and
    // one dated a year ahead under its own name.
    let _ = web_id;
    let mut fake = web_snap.clone();
    fake.name = "db-1".into();
    fake.time_ns += 1_000_000_000;
    let sealed = k.seal_record(
        imgstore_format::sealed::RecordKind::Snapshot,
        &fake.encode(),
        &fake.pages,
    );
    let sess = raw.session(&web, "web-x");
    let (code, msg) = raw.commit(&web, &sess, &sealed, &[]);
    assert_eq!(code, 200, "the server cannot read a sealed name: {msg}");
    let forged_name = Id::hash(&sealed);
    let mut future = web_snap.clone();
    future.time_ns += 365 * 86_400 * 1_000_000_000;
    let sealed = k.seal_record(
        imgstore_format::sealed::RecordKind::Snapshot,
        &future.encode(),
        &future.pages,
    );
    let sess = raw.session(&web, "web-1");
    let (code, msg) = raw.commit(&web, &sess, &sealed, &[]);
    assert_eq!(code, 200, "{msg}");
    let forged_time = Id::hash(&sealed);
    // The admin sees db-1 once (the real one), web-1 once (the real one),
    // and is told of two unreadable records.
    let adm = Client::new(&env, &s, "admin");
    let o = with_pass(&adm, &["snapshots", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    let names: Vec<&str> = listed.iter().filter_map(|v| v["name"].as_str()).collect();
    assert_eq!(
        names.iter().filter(|n| **n == "db-1").count(),
        1,
        "{names:?}"
    );
    assert_eq!(
        names.iter().filter(|n| **n == "web-1").count(),
        1,
        "{names:?}"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("witness"),
        "forged records not reported: {err}"
    );
    let out = env.path("db.restored");
    ok_pass(
        &adm,
        &["restore", "latest", "--name", "db-1", out.to_str().unwrap()],
    );
    assert_same(&out, &img);
    // Retention of web keeps the real snapshot (the future one is not a
    // candidate), and db's history is untouched.
    ok_pass(&adm, &["forget", "--name", "web-1", "--keep-last", "1"]);
    let out = env.path("web.restored");
    ok_pass(
        &adm,
        &[
            "restore",
            "latest",
            "--name",
            "web-1",
            out.to_str().unwrap(),
        ],
    );
    assert_same(&out, &wimg);
    // The admin removes the forged records; the repository checks clean.
    ok_pass(
        &adm,
        &["forget", &forged_name.to_hex(), &forged_time.to_hex()],
    );
    ok_pass(&adm, &["check", "--read-data"]);
    s.assert_no_panic();
}

/// The hostile-client scenario, plain repository: the web host is
/// compromised (its backup and restore tokens) and tries, one after the
/// other, everything above against the db namespace, while db backs up
/// three generations of a real ext4 disk. Afterwards every db snapshot
/// restores exact and `check --read-data` is clean.
#[test]
fn a_compromised_host_leaves_another_namespace_intact_plain() {
    if !need_curl() {
        return;
    }
    let env = Env::new();
    let s = setup(&env);
    let raw = Raw::new(&env, &s);
    let gens = ext4_generations(&env);
    let db = Client::new(&env, &s, "db-backup");
    let admin_c = Client::new(&env, &s, "admin");
    let web = token(&env, "web-backup");
    let web_r = token(&env, "web-restore");
    let admin = token(&env, "admin");
    let db_chunks = |raw: &Raw| -> Vec<(Id, u32)> {
        let snaps = raw.snapshots(&admin);
        let mut out = Vec::new();
        for (_, rec) in snaps {
            let snap = Snapshot::decode(&rec).unwrap();
            if snap.name != "db-disk" {
                continue;
            }
            let (_, b) = raw.call(
                "POST",
                "/v1/pages",
                Some(&admin),
                Some(&proto::encode_ids(&snap.pages)),
                &[],
            );
            for p in proto::decode_records(&b, snap.pages.len()).unwrap() {
                let regions: Vec<Id> = Page::decode(&p)
                    .unwrap()
                    .regions
                    .into_iter()
                    .filter(|r| *r != Id::ZERO)
                    .take(8)
                    .collect();
                let (_, b) = raw.call(
                    "POST",
                    "/v1/regions",
                    Some(&admin),
                    Some(&proto::encode_ids(&regions)),
                    &[],
                );
                for r in proto::decode_records(&b, regions.len()).unwrap() {
                    out.extend(
                        Region::decode(&r)
                            .unwrap()
                            .entries
                            .into_iter()
                            .filter_map(|e| Some((e.chunk?, e.len))),
                    );
                }
            }
        }
        out.truncate(16);
        out
    };
    let mut restored = Vec::new();
    for (g, img) in gens.iter().enumerate() {
        let id = crate::server::id_of(&db.backup(img, &["--name", "db-disk"]));
        restored.push((id, img.clone()));
        let chunks = db_chunks(&raw);
        assert!(!chunks.is_empty());
        let sess = raw.session(&web, &format!("web-evil{g}"));
        for (x, len) in &chunks {
            let junk = raw_frame(&seeded(*len as usize, u64::from(*len)));
            // Plant, fake-sealed and plain.
            assert_eq!(
                raw.put_region(
                    &web,
                    &sess,
                    &fake_sealed(b'R', &[*x]),
                    &[(*x, *len, junk.clone())]
                )
                .0,
                400
            );
            assert_eq!(
                raw.put_region(&web, &sess, &recipe(&[(*x, *len)]), &[(*x, *len, junk)])
                    .0,
                400
            );
            // Name without sending.
            assert_eq!(
                raw.put_region(&web, &sess, &recipe(&[(*x, *len)]), &[]).0,
                404
            );
        }
        // Damage marks on db's chunks, then a restart would make them pending.
        let marks: Vec<serde_json::Value> = chunks
            .iter()
            .map(|(x, _)| serde_json::json!({"kind": "C", "id": x.to_hex(), "why": "forged"}))
            .collect();
        let (code, _) = raw.call(
            "POST",
            "/v1/damage",
            Some(&web_r),
            Some(serde_json::Value::from(marks).to_string().as_bytes()),
            &[],
        );
        assert_eq!(code, 204);
        assert!(raw.damage_marks(&admin).is_empty());
        // Impersonate db's image, date into the future, junk records.
        let (_, rec) = raw.snapshots(&admin).into_iter().next().unwrap();
        let mut snap = Snapshot::decode(&rec).unwrap();
        snap.name = "db-disk".into();
        assert_eq!(raw.commit(&web, &sess, &snap.encode(), &[]).0, 400);
        snap.name = format!("web-evil{g}");
        snap.time_ns += 3 * 365 * 86_400 * 1_000_000_000;
        assert_eq!(raw.commit(&web, &sess, &snap.encode(), &[]).0, 400);
        assert_eq!(raw.commit(&web, &sess, &fake_sealed(b'S', &[]), &[]).0, 400);
        // Crash attempt.
        let (code, _) = raw.call(
            "POST",
            "/v1/zero-cvs/get",
            Some(&web),
            Some(br#"{"region_size":8388608,"start":1125899906842624,"count":1}"#),
            &[],
        );
        assert_eq!(code, 400);
    }
    assert!(
        raw.snapshots(&web_r).is_empty(),
        "nothing was committed for web"
    );
    for (id, img) in &restored {
        let out = env.path("restored.img");
        let _ = fs::remove_file(&out);
        admin_c.ok(&["restore", id, out.to_str().unwrap()]);
        assert_same(&out, img);
    }
    admin_c.ok(&["check", "--read-data"]);
    s.assert_no_panic();
}

/// Item 8, the other half: a body that trickles in (slowloris) is cut off
/// by the body idle timeout instead of holding its memory share and its
/// upload slot for ever; the server answers others meanwhile.
#[test]
fn a_body_that_stops_arriving_is_cut_off() {
    if !need_curl() || !have("python3") {
        return;
    }
    let env = Env::new();
    let s = setup_with(&env, "body_idle_timeout = \"1s\"\nmax_uploads = 1");
    let raw = Raw::new(&env, &s);
    let admin = token(&env, "admin");
    let sess = raw.session(&admin, "web-slow");
    // HTTP/1.1 over TLS: headers of a 1 MB commit, 10 bytes of it, then
    // silence. The script prints the status line the server sends, if
    // any, within 15 s.
    let script = r#"
tok, sess = sys.argv[3], sys.argv[4]
s = tls(15)
s.sendall(("POST /v1/commit HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n%s\r\nContent-Length: 1000000\r\n\r\n" % (tok, sess)).encode() + b"0123456789")
start = time.time()
try:
    line = s.recv(64).split(b"\r\n")[0].decode()
except Exception as e:
    line = "error " + type(e).__name__
print(line, round(time.time() - start, 1), flush=True)
"#;
    let o = python_tls(script, &s, &[&admin, &sess]).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        out.starts_with("HTTP/1.1 408"),
        "stalled body: {out:?} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let secs: f64 = out.split_whitespace().last().unwrap().parse().unwrap();
    assert!(secs < 10.0, "cut off after {secs} s");
    // The upload slot it held is free again: another commit gets an answer
    // (400 for its junk body), not 503 busy.
    let (code, _) = raw.call(
        "POST",
        "/v1/commit",
        Some(&admin),
        Some(b"junk"),
        std::slice::from_ref(&sess),
    );
    assert_eq!(code, 400);
    s.assert_no_panic();
}

/// Red-team finding, session 10: the commit answer must not tell a
/// namespace whether another stores the same page (it said `added_bytes:
/// 0` when db held it).
#[test]
fn the_commit_answer_says_nothing_of_other_namespaces() {
    if !need_curl() || !have("python3") {
        return;
    }
    let env = Env::new();
    let s = setup(&env);
    let raw = Raw::new(&env, &s);
    let (dbfile, data, x) = one_chunk_file(&env, "db.img", 91);
    Client::new(&env, &s, "db-backup").backup(&dbfile, &["--name", "db-1"]);
    let admin = token(&env, "admin");
    let web = token(&env, "web-backup");
    let (_, rec) = raw.snapshots(&admin).into_iter().next().unwrap();
    let db_snap = Snapshot::decode(&rec).unwrap();
    let (_, b) = raw.call(
        "POST",
        "/v1/pages",
        Some(&admin),
        Some(&proto::encode_ids(&db_snap.pages)),
        &[],
    );
    let page = proto::decode_records(&b, 1).unwrap().remove(0);
    // web holds the same data: it uploads the region (sending the frame),
    // then commits a snapshot whose page is byte for byte db's.
    let sess = raw.session(&web, "web-same");
    let (code, msg) = raw.put_region(
        &web,
        &sess,
        &recipe(&[(x, data.len() as u32)]),
        &[(x, data.len() as u32, raw_frame(&data))],
    );
    assert_eq!(code, 200, "{msg}");
    let mut snap = db_snap.clone();
    snap.name = "web-same".into();
    let (code, msg) = raw.commit(&web, &sess, &snap.encode(), std::slice::from_ref(&page));
    assert_eq!(code, 200, "{msg}");
    let added = serde_json::from_str::<serde_json::Value>(&msg).unwrap()["added_bytes"]
        .as_u64()
        .unwrap();
    assert_eq!(
        added,
        page.len() as u64,
        "the answer shows that another namespace holds the page"
    );
    s.assert_no_panic();
}

/// Red-team finding: upload slots went to whoever asked first, a restore
/// token included, and one host trickling bodies could hold all of them.
/// Now only a writer with a live session waits for a slot, and one token
/// holds at most half: with two slots, web holding its share with a body
/// that barely arrives, db's backup completes.
#[test]
fn one_token_cannot_hold_every_upload_slot() {
    if !need_curl() || !have("python3") {
        return;
    }
    let env = Env::new();
    let s = setup_with(&env, "max_uploads = 2");
    let raw = Raw::new(&env, &s);
    let web = token(&env, "web-backup");
    let web_r = token(&env, "web-restore");
    // A restore token is refused at once, before waiting for a slot.
    let (code, _) = raw.call(
        "PUT",
        &format!("/v1/regions/{}", "00".repeat(32)),
        Some(&web_r),
        Some(b"x"),
        &[],
    );
    assert_eq!(code, 403);
    let sess = raw.session(&web, "web-slow");
    // Two uploads that send one byte every 5 s for 40 s.
    let script = r#"
tok, sess = sys.argv[3], sys.argv[4]
socks = []
for _ in range(2):
    s = tls(60)
    s.sendall(("PUT /v1/regions/%s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n%s\r\nContent-Length: 80000000\r\n\r\n" % ("00" * 32, tok, sess)).encode())
    socks.append(s)
print("holding", flush=True)
end = time.time() + 40
while time.time() < end:
    for s in socks:
        try: s.sendall(b"a")
        except Exception: pass
    time.sleep(5)
"#;
    let mut holder = python_tls(script, &s, &[&web, &sess])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let mut lines = std::io::BufReader::new(holder.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "holding");
    std::thread::sleep(Duration::from_secs(1));
    let img = env.path("db.img");
    fs::write(&img, seeded(3 << 20, 92)).unwrap();
    let db = Client::new(&env, &s, "db-backup");
    let o = db.run(&[
        "backup",
        img.to_str().unwrap(),
        "--name",
        "db-1",
        "--retry-for",
        "20s",
    ]);
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(
        o.status.success(),
        "db's backup was starved: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    restores_exact(&Client::new(&env, &s, "admin"), &env, "db-1", &img);
    s.assert_no_panic();
}
