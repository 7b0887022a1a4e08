//! Bucket-backed repositories against a real S3-compatible store: Garage
//! processes on loopback (one node, and a three-node cluster with
//! replication factor 3), driven by the real binary — round trips of every
//! command, rebuilding from the bucket alone, gc and repacking in the
//! bucket, an HTTP proxy that injects 503s, 500s, stalls and cut
//! connections, and nodes killed mid-backup and mid-restore.
//!
//! Garage comes from `cargo install --locked garage --version 2.5.0`
//! (`.ci/run` installs it into /var/tmp/garage when missing); `GARAGE_BIN`
//! names another binary. These tests fail, never skip, without it.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::util::*;

pub(crate) const ACCESS_KEY: &str = "GK0123456789abcdef01234567";
pub(crate) const SECRET_KEY: &str =
    "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const RPC_SECRET: &str = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";
pub(crate) const BUCKET: &str = "imgstore-test";

fn garage_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("GARAGE_BIN") {
        return PathBuf::from(p);
    }
    for p in ["/var/tmp/garage/bin/garage", "/usr/local/bin/garage"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!(
        "Garage is not installed: run `cargo install --locked garage --version 2.5.0 --root /var/tmp/garage` \
(.ci/run does) or set GARAGE_BIN"
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One Garage node.
pub(crate) struct Node {
    child: Option<Child>,
    config: PathBuf,
    pub(crate) s3: u16,
    rpc: u16,
    log: PathBuf,
}

impl Node {
    fn write_config(dir: &Path, replication: u32) -> (PathBuf, u16, u16) {
        fs::create_dir_all(dir).unwrap();
        let (s3, rpc) = (free_port(), free_port());
        let config = dir.join("garage.toml");
        fs::write(
            &config,
            format!(
                "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\n\
replication_factor = {replication}\ncompression_level = \"none\"\n\
rpc_bind_addr = \"127.0.0.1:{rpc}\"\nrpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{RPC_SECRET}\"\n\
[s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{s3}\"\nroot_domain = \".s3.garage.localhost\"\n",
                d = dir.display()
            ),
        )
        .unwrap();
        (config, s3, rpc)
    }

    fn spawn(config: &Path, s3: u16, rpc: u16, single: bool) -> Node {
        let log = config.with_file_name("garage.log");
        let mut c = Command::new(garage_bin());
        c.arg("-c").arg(config).arg("server");
        if single {
            c.args(["--single-node", "--default-bucket"])
                .env("GARAGE_DEFAULT_ACCESS_KEY", ACCESS_KEY)
                .env("GARAGE_DEFAULT_SECRET_KEY", SECRET_KEY)
                .env("GARAGE_DEFAULT_BUCKET", BUCKET);
        }
        let child = c
            .env("RUST_LOG", "garage=warn")
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let node = Node {
            child: Some(child),
            config: config.to_path_buf(),
            s3,
            rpc,
            log,
        };
        node.wait_listening();
        node
    }

    fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", self.s3)).is_err() {
            assert!(
                Instant::now() < deadline,
                "Garage did not listen: {}",
                fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn cli(&self, args: &[&str]) -> String {
        let o = Command::new(garage_bin())
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "garage {args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).to_string()
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub(crate) fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A single Garage node with the test bucket and key.
pub(crate) fn garage(env: &Env) -> Node {
    let (config, s3, rpc) = Node::write_config(&env.path("garage"), 1);
    let node = Node::spawn(&config, s3, rpc, true);
    // The default bucket exists once the single-node layout is applied.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = Command::new(garage_bin())
            .arg("-c")
            .arg(&node.config)
            .args(["bucket", "info", BUCKET])
            .output()
            .unwrap();
        if o.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Garage never made the bucket: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    node
}

/// Objects and bytes in the test bucket, as Garage counts them.
fn bucket_objects(node: &Node) -> u64 {
    let out = node.cli(&["bucket", "info", BUCKET]);
    out.lines()
        .find_map(|l| {
            let l = l.trim();
            l.strip_prefix("Objects:").map(|v| {
                v.split_whitespace()
                    .next()
                    .unwrap_or("0")
                    .parse()
                    .unwrap_or(0)
            })
        })
        .unwrap_or_else(|| panic!("no object count in: {out}"))
}

/// Bytes in the test bucket, as Garage counts them ("Size: 12.3 MiB (...)").
fn bucket_bytes(node: &Node) -> f64 {
    let out = node.cli(&["bucket", "info", BUCKET]);
    let line = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Size:").map(str::trim))
        .unwrap_or_else(|| panic!("no size in: {out}"));
    let mut w = line.split_whitespace();
    let n: f64 = w.next().unwrap().parse().unwrap();
    let unit = match w.next().unwrap() {
        "B" => 1.0,
        "kB" | "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KiB" => 1024.0,
        "MiB" => 1048576.0,
        "GiB" => 1073741824.0,
        u => panic!("unit {u} in {line}"),
    };
    n * unit
}

/// imgstore with the bucket's credentials and endpoint in its environment.
pub(crate) fn s3_command(env: &Env, repo: &Path, endpoint: &str) -> Command {
    let mut c = Command::new(BIN);
    c.arg("-r")
        .arg(repo)
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_REGION", "garage")
        .env_remove("AWS_PROFILE")
        .env_remove("IMGSTORE_REPO")
        .env("HOME", env.path("home"));
    c
}

fn run(c: &mut Command, args: &[&str]) -> Output {
    c.args(args).stdin(Stdio::null()).output().unwrap()
}

pub(crate) fn ok(env: &Env, repo: &Path, endpoint: &str, args: &[&str]) -> String {
    let o = run(&mut s3_command(env, repo, endpoint), args);
    assert!(
        o.status.success(),
        "imgstore {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s.lines().last().unwrap_or("null")).unwrap()
}

fn backup(env: &Env, repo: &Path, ep: &str, img: &Path, name: &str) -> serde_json::Value {
    json(&ok(
        env,
        repo,
        ep,
        &["backup", img.to_str().unwrap(), "--name", name, "--json"],
    ))
}

fn ids(env: &Env, repo: &Path, ep: &str) -> Vec<String> {
    let v: Vec<serde_json::Value> =
        serde_json::from_str(&ok(env, repo, ep, &["snapshots", "--json"])).unwrap();
    let mut ids: Vec<String> = v
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

/// Packs of 1 MiB and no cache: small images make many packs, and every
/// read goes to the bucket.
const SMALL_PACKS: &[&str] = &["--pack-size", "1M", "--cache-size", "0"];

/// A single Garage node and a fault-injecting proxy in front of it (no
/// faults until told).
fn garage_behind_proxy(env: &Env) -> (Node, FaultProxy) {
    let node = garage(env);
    let proxy = FaultProxy::start(node.s3, 0);
    (node, proxy)
}

/// Garage behind the proxy, a repository with small packs under `prefix`,
/// and one backup (named "d") of `len` seeded bytes: the node, the proxy,
/// its endpoint, the repository and the image.
fn proxied_with_a_backup(
    env: &Env,
    prefix: &str,
    len: usize,
    seed: u64,
) -> (Node, FaultProxy, String, PathBuf, PathBuf) {
    let (node, proxy) = garage_behind_proxy(env);
    let (ep, repo) = (proxy.endpoint(), env.repo());
    init_in(env, &repo, &ep, prefix, SMALL_PACKS);
    let img = env.path("d.img");
    fs::write(&img, seeded(len, seed)).unwrap();
    backup(env, &repo, &ep, &img, "d");
    (node, proxy, ep, repo, img)
}

/// Restores the snapshot `selector` names into a scratch file and asserts
/// it equals `expect`, byte for byte.
fn restores_exact(env: &Env, repo: &Path, ep: &str, selector: &[&str], expect: &Path) {
    let out = env.path("restored.img");
    let _ = fs::remove_file(&out);
    let mut args = vec!["restore"];
    args.extend_from_slice(selector);
    args.push(out.to_str().unwrap());
    ok(env, repo, ep, &args);
    assert_same(&out, expect);
}

/// `init --storage s3://BUCKET/PREFIX` with more arguments.
fn init_in(env: &Env, repo: &Path, ep: &str, prefix: &str, extra: &[&str]) {
    let url = format!("s3://{BUCKET}/{prefix}");
    let mut args = vec!["init", "--storage", url.as_str()];
    args.extend_from_slice(extra);
    ok(env, repo, ep, &args);
}

/// Every command on an encrypted bucket-backed repository of ext4
/// generations and an ISO: byte-exact, with the data only in the bucket,
/// and no plaintext in it.
#[test]
fn a_bucket_backed_repository_round_trips_every_command() {
    let env = Env::new();
    let node = garage(&env);
    let ep = node.endpoint();
    let repo = env.repo();
    let pw = env.path("pw");
    fs::write(&pw, "correct horse battery").unwrap();
    let pwf = pw.to_str().unwrap().to_string();
    let run_ok = |args: &[&str]| {
        let mut a = vec!["--password-file", pwf.as_str()];
        a.extend_from_slice(args);
        ok(&env, &repo, &ep, &a)
    };
    run_ok(&[
        "init",
        "--encryption",
        "--storage",
        &format!("s3://{BUCKET}/site-a"),
        "--pack-size",
        "2M",
    ]);
    // A second init on the same prefix is refused, naming the way out.
    let other = env.path("other");
    let o = run(
        &mut s3_command(&env, &other, &ep),
        &[
            "--password-file",
            &pwf,
            "init",
            "--encryption",
            "--storage",
            &format!("s3://{BUCKET}/site-a"),
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("already holds a repository"),
        "{err}"
    );
    assert!(!other.exists(), "a refused init leaves nothing behind");

    let gens = ext4_generations(&env);
    let marker = b"IMGSTORE-MARKER-7c1f1d0e";
    let mut ids = Vec::new();
    for g in &gens {
        let r = backup_pw(&env, &repo, &ep, &pwf, g, "vm-disk");
        assert!(r["bucket"]["puts"].as_u64().unwrap() > 0, "{r}");
        ids.push(r["id"].as_str().unwrap().to_string());
    }
    // An ISO holding the marker, from stdin.
    let iso_tree = env.path("isotree");
    populate(&iso_tree, 9);
    fs::write(iso_tree.join("marker.txt"), marker.repeat(4096)).unwrap();
    let iso = env.path("cd.iso");
    mkiso(&iso, &iso_tree);
    let o = s3_command(&env, &repo, &ep)
        .args([
            "--password-file",
            &pwf,
            "backup",
            "-",
            "--name",
            "cd",
            "--json",
        ])
        .stdin(fs::File::open(&iso).unwrap())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // The chunk data is in the bucket, not in the local directory.
    let local = du(&repo);
    let image_bytes: u64 = gens.iter().map(|g| allocated(g)).sum();
    assert!(
        local < image_bytes / 2,
        "local directory holds {local} bytes for {image_bytes} of images"
    );
    assert!(bucket_objects(&node) >= 3);

    // Restores with a cold cache (cache removed): file, stdout, delta.
    fs::remove_dir_all(repo.join("cache")).ok();
    let out = env.path("out.img");
    run_ok(&["restore", &ids[0], out.to_str().unwrap()]);
    assert_same(&out, &gens[0]);
    let r = json(&run_ok(&[
        "restore",
        &ids[2],
        out.to_str().unwrap(),
        "--force",
        "--json",
    ]));
    assert!(r["bucket"]["gets"].as_u64().unwrap() > 0, "{r}");
    assert_same(&out, &gens[2]);
    let o = run(
        &mut s3_command(&env, &repo, &ep),
        &[
            "--password-file",
            &pwf,
            "restore",
            "latest",
            "--name",
            "cd",
            "-",
        ],
    );
    assert!(o.status.success());
    assert_eq!(o.stdout, fs::read(&iso).unwrap());
    let delta = env.path("delta.img");
    fs::copy(&gens[1], &delta).unwrap();
    run_ok(&["restore", &ids[2], "--delta", delta.to_str().unwrap()]);
    assert_same(&delta, &gens[2]);
    run_ok(&["verify", "--all"]);
    run_ok(&["check", "--read-data"]);
    // The bucket's host side, without the key: every sealed object's
    // ciphertext against its pack's entry hashes.
    let o = run(
        &mut s3_command(&env, &repo, &ep),
        &["check", "--without-key", "--read-data", "--json"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        json(&String::from_utf8_lossy(&o.stdout))["chunks_read"]
            .as_u64()
            .unwrap()
            > 100
    );

    // NBD and FUSE read from the bucket, with the real clients.
    let with_pw = || {
        let mut c = s3_command(&env, &repo, &ep);
        c.args(["--password-file", &pwf]);
        c
    };
    nbd_round_trip(with_pw(), env.dir.path(), &ids[1], &gens[1]);
    fuse_round_trip(with_pw(), env.dir.path(), &ids[2], &gens[2]);

    // Retention and gc in the bucket; what stays restores exact.
    run_ok(&["protect", &ids[1]]);
    run_ok(&["forget", &ids[0], "--prune"]);
    run_ok(&["check", "--read-data"]);
    let out1 = env.path("out1.img");
    run_ok(&["restore", &ids[1], out1.to_str().unwrap()]);
    assert_same(&out1, &gens[1]);

    // A key slot added here is in the bucket's config: a rebuild on
    // another machine opens the repository with the new passphrase.
    let o = s3_command(&env, &repo, &ep)
        .args(["--password-file", &pwf, "key", "add"])
        .env("IMGSTORE_NEW_PASSWORD", "a second passphrase")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let elsewhere = env.path("elsewhere");
    ok(
        &env,
        &elsewhere,
        &ep,
        &["recover", &format!("s3://{BUCKET}/site-a")],
    );
    let o = s3_command(&env, &elsewhere, &ep)
        .args(["restore", &ids[1], env.path("again.img").to_str().unwrap()])
        .env("IMGSTORE_PASSWORD", "a second passphrase")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_same(&env.path("again.img"), &gens[1]);
    // The first directory is stale now: it still reads, but it may not
    // write (its gc would delete what the new index writes).
    let o = run(
        &mut s3_command(&env, &repo, &ep),
        &["--password-file", &pwf, "gc"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(7), "{err}");
    assert!(err.contains("stale") && err.contains("recover"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    // Nor back up. Its owner check goes while the image is read and is
    // waited for before the first upload: refused all the same, and
    // nothing of it reaches the bucket (6 MiB of new data: packs of 2 MiB
    // fill, and would go, before the commit).
    let fresh = env.path("fresh.img");
    fs::write(&fresh, seeded(6 << 20, 27)).unwrap();
    let objects = bucket_objects(&node);
    let o = run(
        &mut s3_command(&env, &repo, &ep),
        &[
            "--password-file",
            &pwf,
            "backup",
            fresh.to_str().unwrap(),
            "--name",
            "stale",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(7), "{err}");
    assert!(err.contains("stale") && err.contains("recover"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert_eq!(bucket_objects(&node), objects, "a stale backup wrote");
    run_ok(&["snapshots"]);

    // No plaintext anywhere: neither in the local directory nor in
    // Garage's data (stored uncompressed, so a plaintext block would show).
    // Not the marker, and not the first 32 bytes of any 4 KiB block of
    // an image that is not one repeated byte.
    let image = fs::read(&gens[2]).unwrap();
    let mut blocks = std::collections::HashSet::new();
    for b in image.chunks(4096) {
        let head = &b[..32.min(b.len())];
        if head.len() == 32 && head.iter().any(|x| *x != head[0]) {
            blocks.insert(head);
        }
    }
    assert!(blocks.len() > 100, "the image has data blocks");
    let garage_data = env.path("garage/data");
    for dir in [repo.as_path(), garage_data.as_path()] {
        for f in files_under(dir) {
            let b = fs::read(&f).unwrap();
            assert!(
                !b.windows(marker.len()).any(|w| w == marker),
                "{} holds the plaintext marker",
                f.display()
            );
            if let Some(w) = b.windows(32).find(|w| blocks.contains(w)) {
                panic!(
                    "{} holds a block of the image in clear: {:02x?}",
                    f.display(),
                    &w[..8]
                );
            }
        }
    }
}

fn backup_pw(
    env: &Env,
    repo: &Path,
    ep: &str,
    pwf: &str,
    img: &Path,
    name: &str,
) -> serde_json::Value {
    json(&ok(
        env,
        repo,
        ep,
        &[
            "--password-file",
            pwf,
            "backup",
            img.to_str().unwrap(),
            "--name",
            name,
            "--json",
        ],
    ))
}

pub(crate) fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

fn du(dir: &Path) -> u64 {
    files_under(dir).iter().map(|f| allocated(f)).sum()
}

/// The machine is gone: a new directory rebuilt from the bucket alone
/// lists the same snapshots (protection and parents too), restores them
/// byte-exact, passes `check --read-data`, and takes the next backup
/// incrementally.
#[test]
fn the_bucket_alone_rebuilds_the_repository() {
    let env = Env::new();
    let node = garage(&env);
    let ep = node.endpoint();
    let repo = env.repo();
    let url = format!("s3://{BUCKET}/rebuild");
    ok(
        &env,
        &repo,
        &ep,
        &["init", "--storage", &url, "--pack-size", "1M"],
    );
    let gens = ext4_generations(&env);
    let mut snap = Vec::new();
    for g in &gens[..2] {
        snap.push(
            backup(&env, &repo, &ep, g, "vm")["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    ok(&env, &repo, &ep, &["protect", &snap[0]]);
    let before = ids(&env, &repo, &ep);
    fs::remove_dir_all(&repo).unwrap();

    let fresh = env.path("fresh");
    let r = json(&ok(&env, &fresh, &ep, &["recover", &url, "--json"]));
    assert_eq!(r["snapshots"], 2, "{r}");
    assert_eq!(r["missing"], 0, "{r}");
    assert_eq!(ids(&env, &fresh, &ep), before);
    let list: Vec<serde_json::Value> =
        serde_json::from_str(&ok(&env, &fresh, &ep, &["snapshots", "--json"])).unwrap();
    let s0 = list.iter().find(|s| s["id"] == snap[0].as_str()).unwrap();
    assert_eq!(s0["protected"], true, "{s0}");
    let s1 = list.iter().find(|s| s["id"] == snap[1].as_str()).unwrap();
    assert_eq!(s1["parent"], snap[0].as_str(), "{s1}");
    ok(&env, &fresh, &ep, &["check", "--read-data"]);
    for (id, g) in snap.iter().zip(&gens) {
        restores_exact(&env, &fresh, &ep, &[id], g);
    }
    // The next backup reuses what the bucket holds.
    let r = backup(&env, &fresh, &ep, &gens[2], "vm");
    assert!(
        r["bytes_reused"].as_u64().unwrap() > 0,
        "the rebuilt index was not used as a parent: {r}"
    );
    ok(&env, &fresh, &ep, &["check", "--read-data"]);
    // A directory that exists is refused; a prefix with no repository too.
    let o = run(&mut s3_command(&env, &fresh, &ep), &["recover", &url]);
    assert!(!o.status.success());
    let o = run(
        &mut s3_command(&env, &env.path("x"), &ep),
        &["recover", &format!("s3://{BUCKET}/nothing-here")],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("no config object"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

/// gc in the bucket: forgotten data goes (whole packs deleted, mixed ones
/// repacked), what stays restores exact, and packs a killed backup
/// uploaded but never committed are found and removed.
#[test]
fn gc_in_the_bucket_deletes_repacks_and_removes_uncommitted_packs() {
    let env = Env::new();
    let node = garage(&env);
    let ep = node.endpoint();
    let repo = env.repo();
    init_in(&env, &repo, &ep, "gc", SMALL_PACKS);
    let a = env.path("a.img");
    let b = env.path("b.img");
    fs::write(&a, seeded(12 << 20, 1)).unwrap();
    // b shares its first half with a: packs of a become mixed.
    fs::write(&b, [seeded(6 << 20, 1), seeded(6 << 20, 2)].concat()).unwrap();
    let ia = backup(&env, &repo, &ep, &a, "a")["id"]
        .as_str()
        .unwrap()
        .to_string();
    backup(&env, &repo, &ep, &b, "b");
    let full = bucket_objects(&node);
    let before = bucket_bytes(&node);
    ok(&env, &repo, &ep, &["forget", &ia, "--prune"]);
    let after = bucket_bytes(&node);
    // a's second half (6 MiB) is garbage; what b shares with a stays.
    assert!(
        after < before - 4.0 * 1048576.0 && after > 11.0 * 1048576.0,
        "gc in the bucket: {before} -> {after} bytes"
    );
    assert!(bucket_objects(&node) < full, "no pack was deleted");
    let st = json(&ok(&env, &repo, &ep, &["stats", "--json"]));
    let (pb, live) = (
        st["pack_bytes"].as_u64().unwrap(),
        st["pack_live_bytes"].as_u64().unwrap(),
    );
    assert!(
        live <= pb && live as f64 >= pb as f64 * 0.75 - 65536.0,
        "after gc at most a quarter of the packs is garbage: {st}"
    );
    assert!(
        (pb as f64 - after).abs() < 1048576.0,
        "the index's pack bytes ({pb}) match the bucket's ({after})"
    );
    ok(&env, &repo, &ep, &["check", "--read-data"]);
    restores_exact(&env, &repo, &ep, &["latest", "--name", "b"], &b);

    // A backup killed after uploading packs: gc finds and removes them.
    let c = env.path("c.img");
    fs::write(&c, seeded(64 << 20, 3)).unwrap();
    let settled = bucket_objects(&node);
    let mut k = s3_command(&env, &repo, &ep)
        .args(["backup", c.to_str().unwrap(), "--name", "c"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while bucket_objects(&node) < settled + 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = k.kill();
    let _ = k.wait();
    assert!(
        bucket_objects(&node) >= settled + 3,
        "the backup uploaded no pack before it was killed"
    );
    let list = ok(&env, &repo, &ep, &["snapshots", "--json"]);
    assert!(
        !list.contains("\"c\""),
        "a killed backup left a snapshot: {list}"
    );
    ok(&env, &repo, &ep, &["gc"]);
    assert_eq!(
        bucket_objects(&node),
        settled,
        "uncommitted packs are left in the bucket"
    );
    ok(&env, &repo, &ep, &["check", "--read-data"]);
    // The next backup of the same image sends its data again, and restores.
    backup(&env, &repo, &ep, &c, "c");
    restores_exact(&env, &repo, &ep, &["latest", "--name", "c"], &c);
}

/// A reader opened before a gc that repacks the packs it reads (a `serve`
/// left running across the nightly prune) finds the chunks' new packs,
/// and says a snapshot forgotten meanwhile is gone, not damaged.
#[test]
fn an_export_outlives_a_gc_that_repacks_what_it_reads() {
    if !have("nbdcopy") {
        eprintln!("SKIP: nbdcopy (libnbd-bin) not installed");
        return;
    }
    let env = Env::new();
    let node = garage(&env);
    let ep = node.endpoint();
    let repo = env.repo();
    init_in(&env, &repo, &ep, "outlive", SMALL_PACKS);
    // `mixed` interleaves the kept image's 1 MiB pieces with random ones
    // and is backed up first: the kept image's chunks sit in packs that
    // are half garbage once `mixed` is forgotten, so gc repacks them.
    let kept = texty(12 << 20, 951);
    let mixed = interleaved_with_garbage(&kept, 1 << 20, 960);
    let (kept_img, mixed_img) = (env.path("kept.img"), env.path("mixed.img"));
    fs::write(&kept_img, &kept).unwrap();
    fs::write(&mixed_img, &mixed).unwrap();
    let mixed_id = backup(&env, &repo, &ep, &mixed_img, "mixed")["id"]
        .as_str()
        .unwrap()
        .to_string();
    let kept_id = backup(&env, &repo, &ep, &kept_img, "kept")["id"]
        .as_str()
        .unwrap()
        .to_string();

    let log = env.path("serve.log");
    let sock = env.path("nbd.sock");
    let server = s3_command(&env, &repo, &ep)
        .args(["serve", "--all", "--socket"])
        .arg(&sock)
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let server = Kill(server);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "server never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = bucket_objects(&node);
    let prune = ok(
        &env,
        &repo,
        &ep,
        &["forget", &mixed_id, "--prune", "--json"],
    );
    assert!(
        bucket_objects(&node) < before,
        "gc deleted no pack: the test proves nothing ({prune})"
    );

    let uri = |id: &str| format!("nbd+unix:///{id}?socket={}", sock.display());
    let copy = env.path("kept-copy.img");
    let o = Command::new("nbdcopy")
        .arg(uri(&kept_id))
        .arg(&copy)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_same(&copy, &kept_img);
    let o = Command::new("nbdcopy")
        .arg(uri(&mixed_id))
        .arg(env.path("mixed-copy.img"))
        .output()
        .unwrap();
    assert!(!o.status.success(), "a collected snapshot copied cleanly");
    drop(server);
    let said = fs::read_to_string(&log).unwrap();
    assert!(
        said.contains("was forgotten and its data deleted by a gc"),
        "{said}"
    );
    assert!(!said.contains("check --read-data"), "{said}");
}

/// A bucket that answers with altered bytes, or says a pack is gone:
/// `check --read-data` finds it and names the damaged snapshot; a restore
/// fails with one line and never writes wrong bytes as the image.
#[test]
fn an_altered_or_missing_pack_is_found_and_never_served() {
    let env = Env::new();
    let (_garage, proxy, ep, repo, img) = proxied_with_a_backup(&env, "tamper", 6 << 20, 9);
    ok(&env, &repo, &ep, &["check", "--read-data"]);
    // The keyless pass (what a host without the key runs) reads every
    // pack against its name and each entry against its trailer hash.
    let v = json(&ok(
        &env,
        &repo,
        &ep,
        &["check", "--without-key", "--read-data", "--json"],
    ));
    assert!(v["chunks_read"].as_u64().unwrap() > 40, "{v}");
    assert!(v["bytes_read"].as_u64().unwrap() >= 6 << 20, "{v}");
    for mode in [MODE_FLIP, MODE_GONE] {
        proxy.mode.store(mode, SeqCst);
        let out = env.path("out.img");
        let _ = fs::remove_file(&out);
        let o = run(
            &mut s3_command(&env, &repo, &ep),
            &["restore", "latest", "--name", "d", out.to_str().unwrap()],
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success(),
            "mode {mode}: a restore over a bad pack succeeded"
        );
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(
            !out.exists() || fs::read(&out).unwrap() != fs::read(&img).unwrap(),
            "mode {mode}"
        );
        let o = run(
            &mut s3_command(&env, &repo, &ep),
            &["check", "--read-data", "--json"],
        );
        assert!(!o.status.success(), "mode {mode}: check found nothing");
        let report = String::from_utf8_lossy(&o.stdout);
        assert!(
            report.contains("damaged_snapshots"),
            "mode {mode}: {report} {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let v = json(&report);
        assert_eq!(
            v["damaged_snapshots"].as_array().map(|a| a.len()),
            Some(1),
            "mode {mode}: {v}"
        );
        let o = run(
            &mut s3_command(&env, &repo, &ep),
            &["check", "--without-key", "--read-data", "--json"],
        );
        let report = String::from_utf8_lossy(&o.stdout);
        assert_eq!(o.status.code(), Some(5), "mode {mode}: {report}");
        let v = json(&report);
        assert!(
            v["problems"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["what"].as_str().unwrap().starts_with("pack ")),
            "mode {mode}: the keyless read names no pack: {v}"
        );
    }
    // The bucket answers truly again: the damage marks are lifted by the
    // next check, and everything restores.
    proxy.mode.store(MODE_FAULTS, SeqCst);
    restores_exact(&env, &repo, &ep, &["latest", "--name", "d"], &img);
}

/// A commit sends its snapshot object with its last pack. When that pack
/// fails, the object is taken back and no snapshot is made; when taking it
/// back fails too (the process could as well have died), a rebuild from
/// the bucket leaves it out (it names a commit pack that is not there, and
/// data that is not either) and gc deletes it.
#[test]
fn a_snapshot_object_whose_commit_did_not_finish_is_taken_back_or_left_out() {
    let env = Env::new();
    let (node, proxy) = garage_behind_proxy(&env);
    let (ep, repo) = (proxy.endpoint(), env.repo());
    // Default pack size: 1 MiB of new data waits for the commit's pack.
    init_in(&env, &repo, &ep, "unfinished", &[]);
    let first = env.path("first.img");
    fs::write(&first, seeded(1 << 20, 41)).unwrap();
    backup(&env, &repo, &ep, &first, "d");
    let objects = bucket_objects(&node);
    let second = env.path("second.img");
    fs::write(&second, seeded(1 << 20, 42)).unwrap();
    let backup_fails = |mode: u64| {
        proxy.mode.store(mode, SeqCst);
        let o = run(
            &mut s3_command(&env, &repo, &ep),
            &["backup", second.to_str().unwrap(), "--name", "d"],
        );
        proxy.mode.store(MODE_FAULTS, SeqCst);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(!o.status.success(), "mode {mode}: the backup succeeded");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert_eq!(ids(&env, &repo, &ep).len(), 1, "mode {mode}: {err}");
    };
    backup_fails(MODE_NO_PACKS);
    assert_eq!(
        bucket_objects(&node),
        objects,
        "the object was not taken back"
    );
    backup_fails(MODE_NO_PACKS_NO_DELETES);
    assert_eq!(
        bucket_objects(&node),
        objects + 1,
        "the object of the unfinished commit is not in the bucket"
    );
    // A rebuild from the bucket alone leaves it out and says so.
    let elsewhere = env.path("elsewhere");
    let v = json(&ok(
        &env,
        &elsewhere,
        &ep,
        &["recover", &format!("s3://{BUCKET}/unfinished"), "--json"],
    ));
    assert_eq!(v["unfinished"], 1, "{v}");
    assert_eq!(v["snapshots"], 1, "{v}");
    assert_eq!(v["missing"], 0, "{v}");
    restores_exact(&env, &elsewhere, &ep, &["latest", "--name", "d"], &first);
    // gc there deletes it.
    ok(&env, &elsewhere, &ep, &["gc"]);
    assert_eq!(bucket_objects(&node), objects, "gc left the stray object");
    ok(&env, &elsewhere, &ep, &["check", "--read-data"]);
    // And the backup goes through once the bucket takes packs again.
    backup(&env, &elsewhere, &ep, &second, "d");
    restores_exact(&env, &elsewhere, &ep, &["latest", "--name", "d"], &second);
}

/// A pack is not held back for its commit when the link is idle: the
/// first 8 MiB region of a 12 MiB backup (pack target 32 MiB, no upload
/// yet to measure the link by) goes to the bucket as soon as it is stored,
/// so the backup ends with two packs where it waited for one before —
/// and restores exact.
#[test]
fn new_data_crosses_to_the_bucket_before_the_commit() {
    let env = Env::new();
    let node = garage(&env);
    let (ep, repo) = (node.endpoint(), env.repo());
    init_in(&env, &repo, &ep, "early", &["--cache-size", "0"]);
    let before = bucket_objects(&node);
    let img = env.path("d.img");
    fs::write(&img, seeded(12 << 20, 21)).unwrap();
    backup(&env, &repo, &ep, &img, "d");
    // The packs, and one snapshot object.
    let added = bucket_objects(&node) - before;
    assert!(
        added >= 3,
        "{added} objects: the data waited for the commit"
    );
    restores_exact(&env, &repo, &ep, &["latest", "--name", "d"], &img);
}

/// A bucket that answers a small object (the owner object every writer
/// reads first) with more bytes than it may hold — announced, or sent
/// without a length — is refused with one line naming the object, before
/// the answer is buffered: nothing a bucket sends makes the client
/// allocate without bound.
#[test]
fn an_oversized_bucket_answer_is_refused_before_it_is_read() {
    let env = Env::new();
    let (_garage, proxy, ep, repo, img) = proxied_with_a_backup(&env, "oversized", 2 << 20, 5);
    for mode in [MODE_HUGE, MODE_ENDLESS] {
        proxy.mode.store(mode, SeqCst);
        let o = run(
            &mut s3_command(&env, &repo, &ep),
            &["backup", img.to_str().unwrap(), "--name", "e"],
        );
        let err = String::from_utf8_lossy(&o.stderr);
        eprintln!("mode {mode}: {err}");
        assert!(!o.status.success(), "mode {mode}: the backup went on");
        assert_eq!(err.trim_end().lines().count(), 1, "mode {mode}: {err}");
        assert!(err.contains("owner"), "mode {mode}: {err}");
        if mode == MODE_HUGE {
            assert!(
                err.contains("5368709120 bytes, more than the 1048576 expected"),
                "mode {mode}: {err}"
            );
        }
        assert!(!err.contains("panicked"), "mode {mode}: {err}");
    }
    proxy.mode.store(MODE_FAULTS, SeqCst);
    backup(&env, &repo, &ep, &img, "e");
    assert_eq!(ids(&env, &repo, &ep).len(), 2);
}

/// A fault-injecting HTTP proxy in front of Garage: answers some requests
/// itself with 503 SlowDown or 500, stalls some, cuts some connections
/// before or in the middle of the answer, and forwards the rest.
struct FaultProxy {
    port: u16,
    /// [`MODE_FAULTS`], [`MODE_FLIP`] or [`MODE_GONE`].
    mode: Arc<AtomicU64>,
    /// Per mille of requests faulted (0 stops the faults).
    rate: Arc<AtomicU64>,
    faults: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
}

impl FaultProxy {
    fn start(upstream: u16, rate: u64) -> FaultProxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let rate = Arc::new(AtomicU64::new(rate));
        let faults = Arc::new(AtomicU64::new(0));
        let mode = Arc::new(AtomicU64::new(MODE_FAULTS));
        let requests = Arc::new(AtomicU64::new(0));
        let (r, f, m, q) = (rate.clone(), faults.clone(), mode.clone(), requests.clone());
        std::thread::spawn(move || {
            let mut seed = 0x9e3779b97f4a7c15u64;
            for (n, c) in l.incoming().take(50_000).enumerate() {
                let Ok(c) = c else { continue };
                q.fetch_add(1, SeqCst);
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let roll = seed % 1000;
                let (r, f, m) = (r.clone(), f.clone(), m.clone());
                std::thread::spawn(move || {
                    let _ = serve_one(c, upstream, roll, n as u64, &r, &f, m.load(SeqCst));
                });
            }
        });
        FaultProxy {
            port,
            mode,
            rate,
            faults,
            requests,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// Faults at the proxy's rate.
const MODE_FAULTS: u64 = 0;
/// Every GET of a pack answered with one byte of its body flipped.
const MODE_FLIP: u64 = 1;
/// Every GET of a pack answered 404 NoSuchKey.
const MODE_GONE: u64 = 2;
/// Every GET of the owner object answered as 5 GiB long.
const MODE_HUGE: u64 = 3;
/// Every GET of the owner object answered with a chunked body of 4 MiB
/// (no length announced).
const MODE_ENDLESS: u64 = 4;
/// Every PUT of a pack refused (403 AccessDenied); other requests pass.
const MODE_NO_PACKS: u64 = 5;
/// As [`MODE_NO_PACKS`], and every delete refused too.
const MODE_NO_PACKS_NO_DELETES: u64 = 6;

/// One request on one connection (the proxy answers `Connection: close`).
fn serve_one(
    mut c: TcpStream,
    upstream: u16,
    roll: u64,
    n: u64,
    rate: &AtomicU64,
    faults: &AtomicU64,
    mode: u64,
) -> std::io::Result<()> {
    c.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if c.read(&mut byte)? == 0 || head.len() > 64 << 10 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).to_string();
    let len: usize = text
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len.min(512 << 20)];
    c.read_exact(&mut body)?;
    let path = text.split_whitespace().nth(1).unwrap_or("");
    let pack_get =
        text.starts_with("GET ") && path.split('?').next().unwrap_or("").contains("/packs/");
    let owner_get =
        text.starts_with("GET ") && path.split('?').next().unwrap_or("").ends_with("/owner");
    if mode == MODE_HUGE && owner_get {
        c.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 5368709120\r\nConnection: close\r\n\r\n")?;
        return c.write_all(&[7u8; 64 << 10]);
    }
    if mode == MODE_ENDLESS && owner_get {
        c.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")?;
        let piece = [7u8; 64 << 10];
        for _ in 0..64 {
            c.write_all(format!("{:x}\r\n", piece.len()).as_bytes())?;
            c.write_all(&piece)?;
            c.write_all(b"\r\n")?;
        }
        return c.write_all(b"0\r\n\r\n");
    }
    let pack_put =
        text.starts_with("PUT ") && path.split('?').next().unwrap_or("").contains("/packs/");
    let delete = text.starts_with("DELETE ")
        || (text.starts_with("POST ")
            && path
                .split('?')
                .nth(1)
                .is_some_and(|q| q.starts_with("delete")));
    if (mode == MODE_NO_PACKS && pack_put)
        || (mode == MODE_NO_PACKS_NO_DELETES && (pack_put || delete))
    {
        let b = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>AccessDenied</Code><Message>injected</Message></Error>";
        let a = format!(
            "HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
            b.len()
        );
        return c.write_all(a.as_bytes());
    }
    if mode == MODE_GONE && pack_get {
        let b = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>NoSuchKey</Code><Message>gone</Message></Error>";
        let a = format!(
            "HTTP/1.1 404 Not Found\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
            b.len()
        );
        return c.write_all(a.as_bytes());
    }
    let rate = if mode == MODE_FAULTS {
        rate.load(SeqCst)
    } else {
        0
    };
    // Every sixth request is faulted too, so even a short run meets faults.
    let roll = if rate > 0 && n % 6 == 5 { 0 } else { roll };
    if roll < rate {
        faults.fetch_add(1, SeqCst);
        let kind = (roll + n) % 5;
        let answer = |code: &str, s3: &str| {
            let b = format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{s3}</Code><Message>injected</Message></Error>"
            );
            format!(
                "HTTP/1.1 {code}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
                b.len()
            )
        };
        match kind {
            0 | 1 => c.write_all(answer("503 Slow Down", "SlowDown").as_bytes())?,
            2 => c.write_all(answer("500 Internal Server Error", "InternalError").as_bytes())?,
            // Longer than the client's timeout (2 s in the test): a
            // timeout, retried.
            3 => std::thread::sleep(Duration::from_secs(3)),
            _ => {}
        }
        if kind != 4 {
            return Ok(());
        }
        // 4: forward, then cut the answer in the middle.
    }
    let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
    let mut fixed = String::new();
    for l in text.split("\r\n").filter(|l| !l.is_empty()) {
        if !l.to_ascii_lowercase().starts_with("connection:") {
            fixed.push_str(l);
            fixed.push_str("\r\n");
        }
    }
    fixed.push_str("Connection: close\r\n\r\n");
    up.write_all(fixed.as_bytes())?;
    up.write_all(&body)?;
    up.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut answer = Vec::new();
    up.read_to_end(&mut answer)?;
    if roll < rate {
        answer.truncate(answer.len() / 2);
    }
    if mode == MODE_FLIP && pack_get {
        // Flip a byte in the body (bodies with a Content-Length only).
        if let Some(h) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&answer[..h]).to_ascii_lowercase();
            let body_len = answer.len() - h - 4;
            if head.contains("content-length") && body_len > 0 {
                let at = h + 4 + body_len / 2;
                answer[at] ^= 0x5a;
            }
        }
    }
    c.write_all(&answer)?;
    Ok(())
}

/// Backups and restores through the faulty proxy finish exact or fail
/// with one line and no partial snapshot; once the faults stop, gc and
/// check leave a clean repository.
#[test]
fn faults_between_imgstore_and_the_bucket_are_retried_or_refused_clearly() {
    let env = Env::new();
    let (_garage, proxy) = garage_behind_proxy(&env);
    let (ep, repo) = (proxy.endpoint(), env.repo());
    // Init without faults, then everything with them.
    init_in(&env, &repo, &ep, "faults", SMALL_PACKS);
    proxy.rate.store(150, SeqCst);
    let mut gens = ext4_generations(&env);
    // And incompressible data: many packs, many requests.
    let noise = env.path("noise.img");
    fs::write(&noise, seeded(24 << 20, 77)).unwrap();
    gens.push(noise);
    let mut done = Vec::new();
    for (i, g) in gens.iter().enumerate() {
        let o = run(
            s3_command(&env, &repo, &ep).env("IMGSTORE_BUCKET_TIMEOUT", "2"),
            &["backup", g.to_str().unwrap(), "--name", "f", "--json"],
        );
        if o.status.success() {
            done.push((
                json(&String::from_utf8_lossy(&o.stdout))["id"]
                    .as_str()
                    .unwrap()
                    .to_string(),
                i,
            ));
        } else {
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(err.trim_end().lines().count(), 1, "{err}");
            assert!(!err.contains("panicked"), "{err}");
            eprintln!("backup {i} failed: {err}");
        }
    }
    assert!(
        proxy.faults.load(SeqCst) > 0,
        "no fault was injected in {} requests",
        proxy.requests.load(SeqCst)
    );
    assert!(
        !done.is_empty(),
        "no backup got through 15% faults with retries"
    );
    let listed = ids(&env, &repo, &ep);
    assert_eq!(listed.len(), done.len(), "a failed backup left a snapshot");
    for (id, i) in &done {
        let out = env.path("out.img");
        let _ = fs::remove_file(&out);
        let o = run(
            s3_command(&env, &repo, &ep).env("IMGSTORE_BUCKET_TIMEOUT", "2"),
            &["restore", id, out.to_str().unwrap()],
        );
        if o.status.success() {
            assert_same(&out, &gens[*i]);
        } else {
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        }
    }
    // Retries exhausted: with every request failing, a backup fails
    // clearly and commits nothing.
    proxy.rate.store(1000, SeqCst);
    let o = run(
        s3_command(&env, &repo, &ep)
            .env("IMGSTORE_BUCKET_RETRIES", "2")
            .env("IMGSTORE_BUCKET_TIMEOUT", "5"),
        &["backup", gens[0].to_str().unwrap(), "--name", "never"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "a backup through a dead bucket succeeded"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    proxy.rate.store(0, SeqCst);
    assert_eq!(ids(&env, &repo, &ep).len(), done.len());
    ok(&env, &repo, &ep, &["gc"]);
    ok(&env, &repo, &ep, &["check", "--read-data"]);
    for (id, i) in &done {
        restores_exact(&env, &repo, &ep, &[id], &gens[*i]);
    }
}

/// Three Garage nodes on loopback with replication factor 3, the bucket
/// and key made through Garage's own CLI.
fn cluster(env: &Env) -> Vec<Node> {
    let mut nodes = Vec::new();
    for i in 0..3 {
        let (config, s3, rpc) = Node::write_config(&env.path(&format!("garage{i}")), 3);
        nodes.push(Node::spawn(&config, s3, rpc, false));
    }
    let id = |n: &Node| n.cli(&["node", "id", "-q"]).trim().to_string();
    for n in &nodes[1..] {
        let full = id(n);
        assert!(full.ends_with(&format!("@127.0.0.1:{}", n.rpc)), "{full}");
        nodes[0].cli(&["node", "connect", &full]);
    }
    for (i, n) in nodes.iter().enumerate() {
        let short = id(n)[..16].to_string();
        nodes[0].cli(&[
            "layout",
            "assign",
            "-z",
            &format!("dc{i}"),
            "-c",
            "1G",
            &short,
        ]);
    }
    nodes[0].cli(&["layout", "apply", "--version", "1"]);
    nodes[0].cli(&[
        "key", "import", "--yes", ACCESS_KEY, SECRET_KEY, "-n", "imgstore",
    ]);
    nodes[0].cli(&["bucket", "create", BUCKET]);
    nodes[0].cli(&[
        "bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", ACCESS_KEY,
    ]);
    nodes
}

/// Beyond one machine: a node of a three-node cluster killed during a
/// backup, another during a restore; both finish byte-exact, and the
/// repository checks clean once the cluster is whole again.
#[test]
fn a_three_node_cluster_loses_a_node_during_backup_and_restore() {
    let env = Env::new();
    let mut nodes = cluster(&env);
    let ep = nodes[0].endpoint();
    let repo = env.repo();
    init_in(&env, &repo, &ep, "cluster", SMALL_PACKS);
    let img = env.path("big.img");
    fs::write(
        &img,
        [seeded(64 << 20, 5), vec![0u8; 8 << 20], texty(48 << 20, 6)].concat(),
    )
    .unwrap();

    // Node 3 dies while the backup uploads.
    let backup = s3_command(&env, &repo, &ep)
        .args(["backup", img.to_str().unwrap(), "--name", "big", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let o = kill_during(backup, &mut nodes[2], Duration::from_millis(300));
    let id = json(&String::from_utf8_lossy(&o.stdout))["id"]
        .as_str()
        .unwrap()
        .to_string();

    // Node 3 comes back; node 2 dies during a restore.
    let (c3, s3, r3) = (nodes[2].config.clone(), nodes[2].s3, nodes[2].rpc);
    nodes[2] = Node::spawn(&c3, s3, r3, false);
    let out = env.path("out.img");
    let restore = s3_command(&env, &repo, &ep)
        .args(["restore", &id, out.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    kill_during(restore, &mut nodes[1], Duration::from_millis(150));
    assert_same(&out, &img);
    let (c2, s2, r2) = (nodes[1].config.clone(), nodes[1].s3, nodes[1].rpc);
    nodes[1] = Node::spawn(&c2, s2, r2, false);
    ok(&env, &repo, &ep, &["check", "--read-data"]);
}

/// Kills `node` `after` the start of `k` (asserting `k` still runs then),
/// waits for `k` and asserts it succeeded.
fn kill_during(mut k: Child, node: &mut Node, after: Duration) -> Output {
    std::thread::sleep(after);
    assert!(
        k.try_wait().unwrap().is_none(),
        "the command ended before the node was killed"
    );
    node.kill9();
    let o = wait_output(k, Duration::from_secs(300));
    assert!(
        o.status.success(),
        "with a node down: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// Waits for a child (bounded), killing it at the deadline.
fn wait_output(mut k: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    while k.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = k.kill();
    k.wait_with_output().unwrap()
}

/// "Keep a copy": a fast local repository whose snapshots are copied into a
/// bucket-backed one after each backup; a second copy sends nothing new,
/// and the copies restore byte-exact from the bucket.
#[test]
fn a_local_repository_is_copied_into_a_bucket() {
    let env = Env::new();
    let node = garage(&env);
    let ep = node.endpoint();
    env.init();
    let gens = ext4_generations(&env);
    for g in &gens {
        env.backup(g, &["--name", "vm"]);
    }
    let offsite = env.path("offsite");
    ok(
        &env,
        &offsite,
        &ep,
        &["init", "--storage", &format!("s3://{BUCKET}/copy")],
    );
    let from = env.repo();
    let copied = |out: &str| -> usize {
        let v: Vec<serde_json::Value> = serde_json::from_str(out.trim()).unwrap();
        v.iter().filter(|s| s["copied"] == true).count()
    };
    let first = ok(
        &env,
        &offsite,
        &ep,
        &["copy", "--from", from.to_str().unwrap(), "--json"],
    );
    assert_eq!(copied(&first), 3, "{first}");
    let again = ok(
        &env,
        &offsite,
        &ep,
        &["copy", "--from", from.to_str().unwrap(), "--json"],
    );
    assert_eq!(copied(&again), 0, "{again}");
    assert_eq!(ids(&env, &offsite, &ep), {
        let v: Vec<serde_json::Value> =
            serde_json::from_str(&env.ok(&["snapshots", "--json"])).unwrap();
        let mut ids: Vec<String> = v
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    });
    fs::remove_dir_all(offsite.join("cache")).ok();
    restores_exact(&env, &offsite, &ep, &["latest", "--name", "vm"], &gens[2]);
    ok(&env, &offsite, &ep, &["check", "--read-data"]);
}

/// A server whose repository keeps its data in a bucket: hosts back up
/// and restore through the server, the packs land in the bucket.
#[test]
fn a_server_serves_a_bucket_backed_repository() {
    use std::io::BufRead;
    let env = Env::new();
    let node = garage(&env);
    let ep = node.endpoint();
    let repo = env.repo();
    ok(
        &env,
        &repo,
        &ep,
        &["init", "--storage", &format!("s3://{BUCKET}/served")],
    );
    let token = env.path("admin.token");
    ok(
        &env,
        &repo,
        &ep,
        &[
            "token",
            "add",
            "ops",
            "--role",
            "admin",
            "--output",
            token.to_str().unwrap(),
        ],
    );
    let before = bucket_objects(&node);
    let mut server = s3_command(&env, &repo, &ep)
        .args(["server", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let w: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(w.first(), Some(&"listening"), "{line}");
    let client = |args: &[&str]| {
        let o = Command::new(BIN)
            .arg("-r")
            .arg(format!("imgstores://{}/", w[2]))
            .arg("--token-file")
            .arg(&token)
            .env("IMGSTORE_SERVER_FINGERPRINT", w[4])
            .env("IMGSTORE_STATE_DIR", env.state_dir())
            .env("IMGSTORE_CACHE_DIR", env.path("cache"))
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    };
    let gens = ext4_generations(&env);
    for g in &gens {
        client(&["backup", g.to_str().unwrap(), "--name", "web"]);
    }
    assert!(
        bucket_objects(&node) >= before + 4,
        "no pack reached the bucket"
    );
    let out = env.path("out.img");
    client(&["restore", "latest", "--name", "web", out.to_str().unwrap()]);
    assert_same(&out, &gens[2]);
    client(&["check", "--read-data"]);
    // A `recover` elsewhere takes the bucket: the running server's gc is
    // refused from then on, before it deletes anything.
    let objects = bucket_objects(&node);
    ok(
        &env,
        &env.path("taken"),
        &ep,
        &["recover", &format!("s3://{BUCKET}/served")],
    );
    let o = Command::new(BIN)
        .arg("-r")
        .arg(format!("imgstores://{}/", w[2]))
        .arg("--token-file")
        .arg(&token)
        .env("IMGSTORE_SERVER_FINGERPRINT", w[4])
        .env("IMGSTORE_STATE_DIR", env.state_dir())
        .env("IMGSTORE_CACHE_DIR", env.path("cache"))
        .args(["gc"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a stale server ran gc");
    assert!(err.contains("stale"), "{err}");
    assert_eq!(
        bucket_objects(&node),
        objects,
        "the refused gc deleted nothing (recover only rewrote the owner object)"
    );
    let _ = server.kill();
    let _ = server.wait();
    // What the server stored is a complete bucket-backed repository.
    ok(&env, &env.path("taken"), &ep, &["check", "--read-data"]);
}
