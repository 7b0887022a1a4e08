//! Virtual machine disks: VM image formats read through QEMU's block layer
//! (a private `qemu-storage-daemon`), NBD exports served by `qemu-nbd` and
//! `qemu-storage-daemon`, and what happens when they go wrong. Real QEMU
//! tools throughout; images hold a real ext4 made with `mkfs.ext4 -d`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::*;

fn qemu() -> bool {
    let ok = have("qemu-img") && have("qemu-storage-daemon") && have("qemu-nbd") && have("qemu-io");
    if !ok {
        eprintln!("SKIP: QEMU's tools (qemu-utils) not installed");
    }
    ok && have("mkfs.ext4")
}

fn run(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn qemu_img(args: &[&str]) -> String {
    run(Command::new("qemu-img").args(args))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The disk the guest sees, as a raw file (`qemu-img convert -O raw`).
fn guest_view(img: &Path, out: &Path) {
    qemu_img(&["convert", "-O", "raw", s(img), s(out)]);
}

fn b3(p: &Path) -> String {
    blake3::hash(&fs::read(p).unwrap()).to_hex().to_string()
}

/// Processes whose command line mentions `needle` (the test's own
/// directory): a helper left running would show here.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(needle))
                .unwrap_or(false)
        })
        .collect()
}

/// Whether process `pid` has ended (gone, or a zombie its new parent has
/// not collected yet).
fn dead(pid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let gone = match fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(st) => st
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z')),
        };
        if gone || Instant::now() > deadline {
            return gone;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (at most 10 s) until no process mentions `needle`; asserts so.
fn assert_no_helper_left(needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut left = processes_mentioning(needle);
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        left = processes_mentioning(needle);
    }
    assert!(left.is_empty(), "helper processes left running: {left:?}");
}

/// A 48 MiB ext4 image of a populated tree.
fn ext4(env: &Env) -> PathBuf {
    let tree = env.path("tree");
    populate(&tree, 28);
    let img = env.path("disk.img");
    mkfs_ext4(&img, &tree, 48);
    img
}

/// Backs up `img`, checks the digest is BLAKE3 of the guest view, restores
/// the snapshot raw and compares it with the guest view; returns the report.
fn backup_and_restore_raw(env: &Env, img: &Path, view: &Path, name: &str) -> serde_json::Value {
    let r = env.backup(img, &["--name", name]);
    assert_eq!(r["digest"].as_str().unwrap(), b3(view), "{}", img.display());
    assert_eq!(
        r["size"].as_u64().unwrap(),
        fs::metadata(view).unwrap().len()
    );
    let out = env.path(&format!("{name}.restored.raw"));
    env.ok(&["restore", r["id"].as_str().unwrap(), s(&out)]);
    assert_same(&out, view);
    r
}

/// Restores snapshot `id` into a new `fmt` image and compares it with
/// `original` (`qemu-img compare`: the guest views are identical); the
/// image is thin.
fn restore_into_format(env: &Env, id: &str, original: &Path, fmt: &str) {
    let stem = original.file_stem().unwrap().to_str().unwrap();
    let out = env.path(&format!("{stem}.restored.{fmt}"));
    let r: serde_json::Value =
        serde_json::from_str(&env.ok(&["restore", id, s(&out), "--format", fmt, "--json"]))
            .unwrap();
    assert_eq!(r["format"], fmt);
    let info: serde_json::Value =
        serde_json::from_str(&qemu_img(&["info", "--output=json", s(&out)])).unwrap();
    assert_eq!(info["format"], fmt);
    let virtual_size = info["virtual-size"].as_u64().unwrap();
    assert_eq!(virtual_size, r["size"].as_u64().unwrap());
    assert!(
        info["actual-size"].as_u64().unwrap() < virtual_size / 2,
        "{fmt} restore is not thin: {info}"
    );
    let cmp = qemu_img(&["compare", "-f", fmt, "-F", fmt, s(original), s(&out)]);
    assert!(cmp.contains("identical"), "{cmp}");
    // Nothing else left beside it (no temporary image).
    let stray: Vec<_> = fs::read_dir(env.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("imgstore-partial"))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
}

#[test]
fn vm_formats_back_up_the_guest_view_share_every_chunk_with_the_raw_disk_and_restore_into_their_format(
) {
    if !qemu() {
        return;
    }
    let env = Env::new();
    env.init();
    let raw = ext4(&env);
    let size = fs::metadata(&raw).unwrap().len();
    // The raw disk itself: today's path, no daemon.
    let r_raw = backup_and_restore_raw(&env, &raw, &raw, "raw");

    // A qcow2 chain: a compressed base, an overlay written through
    // QEMU after an internal snapshot was taken.
    let base = env.path("base.qcow2");
    qemu_img(&["convert", "-c", "-O", "qcow2", s(&raw), s(&base)]);
    let top = env.path("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        s(&base),
        "-F",
        "qcow2",
        s(&top),
    ]);
    qemu_img(&["snapshot", "-c", "before", s(&top)]);
    run(Command::new("qemu-io").args([
        "-f",
        "qcow2",
        "-c",
        "write -P 0xab 1M 192k",
        "-c",
        "write -z 8M 1M",
        s(&top),
    ]));
    assert!(qemu_img(&["snapshot", "-l", s(&top)]).contains("before"));
    let top_view = env.path("top.view");
    guest_view(&top, &top_view);
    assert_ne!(b3(&top_view), b3(&raw), "the overlay's writes are seen");
    let r = backup_and_restore_raw(&env, &top, &top_view, "top");
    // Zero and unallocated clusters are not read.
    assert!(
        r["bytes_read"].as_u64().unwrap() < size / 2,
        "read {} of {size}",
        r["bytes_read"]
    );
    assert_no_helper_left(s(env.dir.path()));

    // The compressed base alone is the raw disk: same digest, nothing new.
    let r_base = env.backup(&base, &["--name", "base"]);
    assert_eq!(r_base["digest"], r_raw["digest"]);
    assert_eq!(r_base["new_chunks"].as_u64().unwrap(), 0, "{r_base}");

    // Restored back into qcow2: the same guest view, thin.
    restore_into_format(&env, r["id"].as_str().unwrap(), &top, "qcow2");
    // --delta onto a qcow2 holding the older disk: only what differs is
    // read back and written, through QEMU, in place.
    let older = env.path("older.qcow2");
    env.ok(&[
        "restore",
        r_raw["id"].as_str().unwrap(),
        s(&older),
        "--format",
        "qcow2",
    ]);
    let d: serde_json::Value = serde_json::from_str(&env.ok(&[
        "restore",
        r["id"].as_str().unwrap(),
        s(&older),
        "--delta",
        "--json",
    ]))
    .unwrap();
    assert_eq!(d["format"], "qcow2", "{d}");
    assert!(d["written_bytes"].as_u64().unwrap() < 1 << 20, "{d}");
    assert!(d["read_bytes"].as_u64().unwrap() < size / 2, "{d}");
    let cmp = qemu_img(&["compare", s(&top), s(&older)]);
    assert!(cmp.contains("identical"), "{cmp}");
    let info = qemu_img(&["info", "--output=json", s(&older)]);
    assert!(info.contains("\"format\": \"qcow2\""), "{info}");

    // vmdk and vhdx (and vdi), made from the raw disk: the same disk, and
    // restored back into their formats.
    for fmt in ["vmdk", "vhdx", "vdi"] {
        let img = env.path(&format!("disk.{fmt}"));
        qemu_img(&["convert", "-O", fmt, s(&raw), s(&img)]);
        let r = backup_and_restore_raw(&env, &img, &raw, fmt);
        assert_eq!(r["digest"], r_raw["digest"], "{fmt}");
        assert_eq!(r["new_chunks"].as_u64().unwrap(), 0, "{fmt}: {r}");
        restore_into_format(&env, r["id"].as_str().unwrap(), &img, fmt);
    }
    // A restore into a format refuses to overwrite, and names the formats.
    let again = env.path("top.restored.qcow2");
    env.fails(
        &[
            "restore",
            r_base["id"].as_str().unwrap(),
            s(&again),
            "--format",
            "qcow2",
        ],
        "--force",
    );
    env.fails(
        &[
            "restore",
            r_base["id"].as_str().unwrap(),
            s(&env.path("x.img")),
            "--format",
            "ext4",
        ],
        "qcow2",
    );
    // --format overrides the probe: raw reads the qcow2 container itself.
    let r = env.backup(&base, &["--name", "container", "--format", "raw"]);
    assert_eq!(r["digest"].as_str().unwrap(), b3(&base));
    assert_no_helper_left(s(env.dir.path()));
}

#[test]
fn bad_vm_images_fail_in_one_line_without_a_snapshot_or_a_helper_left() {
    if !qemu() {
        return;
    }
    let env = Env::new();
    env.init();
    let raw = env.path("small.img");
    fs::write(&raw, seeded(4 << 20, 3)).unwrap();
    let good = env.path("good.qcow2");
    qemu_img(&["convert", "-O", "qcow2", s(&raw), s(&good)]);

    // A corrupt header: the qcow2 magic, then garbage.
    let bad = env.path("bad.qcow2");
    let mut bytes = fs::read(&good).unwrap();
    bytes[4..8].copy_from_slice(&[0x7f, 0x7f, 0x7f, 0x7f]);
    fs::write(&bad, bytes).unwrap();
    let err = env.fails(&["backup", s(&bad)], "bad.qcow2");
    assert!(err.contains("QEMU cannot open it"), "{err}");

    // A missing backing file.
    let base = env.path("base.qcow2");
    fs::copy(&good, &base).unwrap();
    let top = env.path("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        s(&base),
        "-F",
        "qcow2",
        s(&top),
    ]);
    fs::remove_file(&base).unwrap();
    let err = env.fails(&["backup", s(&top)], "top.qcow2");
    assert!(err.contains("backing file"), "{err}");

    // A format that is not one, and a format forced on the wrong file.
    env.fails(&["backup", s(&good), "--format", "ext4"], "--format ext4");
    env.fails(&["backup", s(&raw), "--format", "qcow2"], "small.img");

    // An image a running VM writes (a writable daemon stands in for it):
    // refused, pointing to NBD, the VM's own way out.
    let sock = env.path("busy.sock");
    let busy = start(
        Command::new("qemu-storage-daemon").args([
            "--blockdev",
            &format!(
                r#"{{"driver":"qcow2","node-name":"d","file":{{"driver":"file","filename":"{}"}}}}"#,
                good.display()
            ),
            "--nbd-server",
            &format!(r#"{{"addr":{{"type":"unix","path":"{}"}}}}"#, sock.display()),
            "--export",
            r#"{"type":"nbd","id":"e","node-name":"d","name":"vm","writable":true}"#,
        ]),
        || sock.exists(),
    );
    let err = env.fails(&["backup", s(&good)], "over NBD");
    assert!(err.contains("another process"), "{err}");
    stop(busy);

    for o in [env.run(&["backup", s(&bad)]), env.run(&["backup", s(&top)])] {
        assert_eq!(o.status.code(), Some(1));
    }
    let list = env.ok(&["snapshots", "--json"]);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&list).unwrap(),
        serde_json::json!([])
    );
    assert_no_helper_left(s(env.dir.path()));
}

/// A helper server a test started: killed and collected when dropped, so
/// a failing assertion leaves none running.
struct Helper(Child);

impl Helper {
    fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cmd` and waits (at most 30 s) until `ready` holds.
fn start(cmd: &mut Command, ready: impl Fn() -> bool) -> Helper {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready() {
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Helper(child)
}

fn stop(h: Helper) {
    drop(h);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn nbd_exports_over_a_unix_socket_and_loopback_tcp_back_up_exactly_without_reading_holes() {
    if !qemu() {
        return;
    }
    let env = Env::new();
    env.init();
    let raw = ext4(&env);
    let size = fs::metadata(&raw).unwrap().len();
    let qcow = env.path("vm.qcow2");
    qemu_img(&["convert", "-O", "qcow2", s(&raw), s(&qcow)]);

    // qemu-nbd on a Unix socket.
    let sock = env.path("qemu-nbd.sock");
    let nbd = start(
        Command::new("qemu-nbd").args([
            "-r",
            "-f",
            "qcow2",
            "-x",
            "vm-disk",
            "-k",
            s(&sock),
            s(&qcow),
        ]),
        || sock.exists(),
    );
    let uri = format!("nbd+unix:///vm-disk?socket={}", sock.display());
    let out = env.ok(&["backup", &uri, "--json"]);
    stop(nbd);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["digest"].as_str().unwrap(), b3(&raw));
    assert_eq!(
        r["name"], "vm-disk",
        "the export's name is the default name"
    );
    assert!(r["bytes_read"].as_u64().unwrap() < size / 2, "{r}");
    let restored = env.path("restored.img");
    env.ok(&["restore", r["id"].as_str().unwrap(), s(&restored)]);
    assert_same(&restored, &raw);

    // qemu-storage-daemon on loopback TCP, several connections.
    let port = free_port();
    let daemon = start(
        Command::new("qemu-storage-daemon").args([
            "--blockdev",
            &format!(
                r#"{{"driver":"qcow2","node-name":"d","read-only":true,"file":{{"driver":"file","filename":"{}","read-only":true}}}}"#,
                qcow.display()
            ),
            "--nbd-server",
            &format!(r#"{{"addr":{{"type":"inet","host":"127.0.0.1","port":"{port}"}}}}"#),
            "--export",
            r#"{"type":"nbd","id":"e","node-name":"d","name":"disk"}"#,
        ]),
        || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
    );
    let r2 = env.backup(
        Path::new(&format!("nbd://127.0.0.1:{port}/disk")),
        &["--name", "vm-disk"],
    );
    assert_eq!(r2["digest"], r["digest"]);
    assert_eq!(r2["new_chunks"].as_u64().unwrap(), 0);
    // An export that does not exist: one line naming it.
    env.fails(
        &[
            "backup",
            &format!("nbd://127.0.0.1:{port}/nope"),
            "--name",
            "x",
        ],
        "nbdinfo --list",
    );
    stop(daemon);
    // Nothing listens any more; a malformed URI.
    env.fails(
        &[
            "backup",
            &format!("nbd://127.0.0.1:{port}/disk"),
            "--name",
            "x",
        ],
        "is the server running",
    );
    env.fails(
        &["backup", "nbd+unix:///disk", "--name", "x"],
        "socket=PATH",
    );
}

/// Certificates in QEMU's x509 layout, from a fresh CA: `server/`
/// (ca-cert.pem, server-cert.pem, server-key.pem for 127.0.0.1) and
/// `client/` (ca-cert.pem, client-cert.pem, client-key.pem).
fn x509_dirs(env: &Env, name: &str) -> (PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).unwrap();
    let leaf = |sans: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(sans)
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server, client) = (
        env.path(&format!("{name}-server")),
        env.path(&format!("{name}-client")),
    );
    for (dir, role, sans) in [
        (&server, "server", vec!["127.0.0.1".to_string()]),
        (&client, "client", vec!["imgstore-client".to_string()]),
    ] {
        fs::create_dir_all(dir).unwrap();
        let (cert, key) = leaf(sans);
        fs::write(dir.join("ca-cert.pem"), ca.pem()).unwrap();
        fs::write(dir.join(format!("{role}-cert.pem")), cert).unwrap();
        fs::write(dir.join(format!("{role}-key.pem")), key).unwrap();
    }
    (server, client)
}

/// A QEMU export that requires TLS and a client certificate (QEMU's
/// `verify-peer=on`) is read over `nbds://` exactly; a plain `nbd://`
/// connection, or one trusting another CA, fails in one line.
#[test]
fn an_nbd_export_over_tls_backs_up_exactly_and_plain_or_untrusted_connections_fail() {
    if !qemu() {
        return;
    }
    let env = Env::new();
    env.init();
    let raw = ext4(&env);
    let (server, client) = x509_dirs(&env, "ours");
    let (_, stranger) = x509_dirs(&env, "theirs");
    let port = free_port();
    let daemon = start(
        Command::new("qemu-storage-daemon").args([
            "--object",
            &format!(
                r#"{{"qom-type":"tls-creds-x509","id":"tls0","dir":"{}","endpoint":"server","verify-peer":true}}"#,
                server.display()
            ),
            "--blockdev",
            &format!(
                r#"{{"driver":"raw","node-name":"d","read-only":true,"file":{{"driver":"file","filename":"{}","read-only":true}}}}"#,
                raw.display()
            ),
            "--nbd-server",
            &format!(
                r#"{{"addr":{{"type":"inet","host":"127.0.0.1","port":"{port}"}},"tls-creds":"tls0"}}"#
            ),
            "--export",
            r#"{"type":"nbd","id":"e","node-name":"d","name":"disk"}"#,
        ]),
        || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
    );
    let uri = format!(
        "nbds://127.0.0.1:{port}/disk?tls-certificates={}",
        client.display()
    );
    let r = env.backup(Path::new(&uri), &["--name", "vm-tls"]);
    assert_eq!(r["digest"].as_str().unwrap(), b3(&raw));
    assert!(
        r["bytes_read"].as_u64().unwrap() < fs::metadata(&raw).unwrap().len() / 2,
        "holes read: {r}"
    );
    env.fails(
        &[
            "backup",
            &format!("nbd://127.0.0.1:{port}/disk"),
            "--name",
            "vm-plain",
        ],
        "requires TLS",
    );
    env.fails(
        &[
            "backup",
            &format!(
                "nbds://127.0.0.1:{port}/disk?tls-certificates={}",
                stranger.display()
            ),
            "--name",
            "vm-stranger",
        ],
        "handshake with the server failed",
    );
    // A directory without the CA: named.
    env.fails(
        &[
            "backup",
            &format!(
                "nbds://127.0.0.1:{port}/disk?tls-certificates={}",
                env.path("nowhere").display()
            ),
            "--name",
            "vm-nowhere",
        ],
        "ca-cert.pem",
    );
    stop(daemon);
    let list: serde_json::Value = serde_json::from_str(&env.ok(&["snapshots", "--json"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
}

#[test]
fn an_nbd_server_that_goes_away_mid_backup_fails_the_backup_and_leaves_no_snapshot() {
    if !qemu() {
        return;
    }
    let env = Env::new();
    env.init();
    let img = env.path("random.img");
    fs::write(&img, seeded(48 << 20, 9)).unwrap();
    // Reads throttled to 8 MiB/s: the backup takes about 6 s, and the
    // server is killed after 1.
    let sock = env.path("slow.sock");
    let daemon = start(
        Command::new("qemu-storage-daemon").args([
            "--object",
            r#"{"qom-type":"throttle-group","id":"tg","limits":{"bps-read":8388608}}"#,
            "--blockdev",
            &format!(
                r#"{{"driver":"throttle","node-name":"d","throttle-group":"tg","file":{{"driver":"raw","file":{{"driver":"file","filename":"{}"}}}}}}"#,
                img.display()
            ),
            "--nbd-server",
            &format!(r#"{{"addr":{{"type":"unix","path":"{}"}}}}"#, sock.display()),
            "--export",
            r#"{"type":"nbd","id":"e","node-name":"d","name":"disk"}"#,
        ]),
        || sock.exists(),
    );
    let pid = daemon.id();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(1));
        stop(daemon);
    });
    let started = Instant::now();
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    let err = env.fails(&["backup", &uri, "--name", "vm"], "closed the connection");
    assert!(err.contains(&uri), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30));
    killer.join().unwrap();
    assert!(dead(pid));
    let list = env.ok(&["snapshots", "--json"]);
    assert_eq!(list.trim(), "[]");
}

#[test]
fn the_private_qemu_daemon_dies_with_imgstore_whatever_kills_it() {
    use std::os::unix::process::ExitStatusExt;
    if !qemu() {
        return;
    }
    let env = Env::new();
    env.init();
    let raw = env.path("big.img");
    fs::write(&raw, seeded(160 << 20, 11)).unwrap();
    let qcow = env.path("big.qcow2");
    qemu_img(&["convert", "-O", "qcow2", s(&raw), s(&qcow)]);
    fs::remove_file(&raw).unwrap();
    for signal in ["TERM", "INT", "KILL"] {
        let mut c = env
            .command()
            .args(["backup", s(&qcow), "--name", "big", "--no-parent"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // The daemon is the process naming the image (besides imgstore).
        let deadline = Instant::now() + Duration::from_secs(30);
        let daemon = loop {
            let found: Vec<u32> = processes_mentioning(s(&qcow))
                .into_iter()
                .filter(|&p| p != c.id())
                .collect();
            if let Some(&p) = found.first() {
                break p;
            }
            assert!(Instant::now() < deadline, "no daemon appeared");
            assert!(c.try_wait().unwrap().is_none(), "backup ended first");
            std::thread::sleep(Duration::from_millis(2));
        };
        run(Command::new("kill").args([&format!("-{signal}"), &c.id().to_string()]));
        let status = c.wait().unwrap();
        assert!(
            status.signal().is_some(),
            "{signal}: imgstore ended by itself: {status}"
        );
        assert_no_helper_left(s(&qcow));
        assert!(dead(daemon), "{signal}: daemon {daemon} still runs");
    }
    assert_eq!(env.ok(&["snapshots", "--json"]).trim(), "[]");
}

/// The README's changed-block workflow on an NBD source: a qcow2 with a
/// persistent dirty bitmap, written through QEMU, exported by
/// `qemu-storage-daemon` with the bitmap; the dirty extents from `nbdinfo
/// --map=qemu:dirty-bitmap:NAME` feed `--changed`. Only they are read,
/// and the snapshot equals a full read of the same disk.
#[test]
fn a_qemu_dirty_bitmap_over_nbd_drives_a_changed_block_backup_that_reads_only_what_changed() {
    if !qemu() || !have("nbdinfo") {
        return;
    }
    let env = Env::new();
    env.init();
    let raw = ext4(&env);
    let qcow = env.path("vm.qcow2");
    qemu_img(&["convert", "-O", "qcow2", s(&raw), s(&qcow)]);
    qemu_img(&["bitmap", "--add", s(&qcow), "since-backup"]);
    let base = env.backup(&qcow, &["--name", "vm"]);
    assert_eq!(base["digest"].as_str().unwrap(), b3(&raw));
    // The "guest" writes 5% of the 48 MiB disk, in three places.
    run(Command::new("qemu-io").args([
        "-f",
        "qcow2",
        "-c",
        "write -P 0x5a 3M 1M",
        "-c",
        "write -P 0x11 20M 960k",
        "-c",
        "write -P 0x77 40M 512k",
        s(&qcow),
    ]));
    let view = env.path("vm.view");
    guest_view(&qcow, &view);
    let sock = env.path("bitmap.sock");
    let daemon = start(
        Command::new("qemu-storage-daemon").args([
            "--blockdev",
            &format!(
                r#"{{"driver":"qcow2","node-name":"d","read-only":true,"file":{{"driver":"file","filename":"{}","read-only":true}}}}"#,
                qcow.display()
            ),
            "--nbd-server",
            &format!(r#"{{"addr":{{"type":"unix","path":"{}"}}}}"#, sock.display()),
            "--export",
            r#"{"type":"nbd","id":"e","node-name":"d","name":"vm","bitmaps":["since-backup"]}"#,
        ]),
        || sock.exists(),
    );
    let uri = format!("nbd+unix:///vm?socket={}", sock.display());
    let map = run(Command::new("nbdinfo").args(["--map=qemu:dirty-bitmap:since-backup", &uri]));
    let dirty: String = map
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"1")).then(|| format!("{} {}\n", f[0], f[1]))
        })
        .collect();
    let dirty_bytes: u64 = dirty
        .lines()
        .map(|l| l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap())
        .sum();
    // Exactly what was written (the writes are on the bitmap's 64 KiB grain).
    assert_eq!(dirty_bytes, (1024 + 960 + 512) << 10);
    let list = env.path("dirty.txt");
    fs::write(&list, dirty).unwrap();
    let inc = env.backup(
        Path::new(&uri),
        &["--name", "vm", "--base", "latest", "--changed", s(&list)],
    );
    let full = env.backup(Path::new(&uri), &["--name", "full", "--no-parent"]);
    stop(daemon);
    assert_eq!(inc["digest"].as_str().unwrap(), b3(&view));
    assert_eq!(inc["digest"], full["digest"]);
    assert_eq!(
        inc["bytes_read"].as_u64().unwrap(),
        dirty_bytes,
        "only the dirty extents were read"
    );
    assert!(
        full["bytes_read"].as_u64().unwrap() > 2 * dirty_bytes,
        "{full}"
    );
    let out = env.path("inc.img");
    env.ok(&["restore", inc["id"].as_str().unwrap(), s(&out)]);
    assert_same(&out, &view);
}

/// A QMP connection to a test's `qemu-storage-daemon` (one JSON object a
/// line each way; events skipped).
struct Qmp {
    r: std::io::BufReader<std::os::unix::net::UnixStream>,
    w: std::os::unix::net::UnixStream,
}

impl Qmp {
    fn connect(sock: &Path) -> Qmp {
        use std::io::BufRead;
        let s = std::os::unix::net::UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut q = Qmp {
            r: std::io::BufReader::new(s.try_clone().unwrap()),
            w: s,
        };
        let mut greeting = String::new();
        q.r.read_line(&mut greeting).unwrap();
        assert!(greeting.contains("QMP"), "{greeting}");
        q.ok("qmp_capabilities", serde_json::json!({}));
        q
    }

    fn execute(&mut self, cmd: &str, args: serde_json::Value) -> serde_json::Value {
        use std::io::{BufRead, Write};
        let msg = serde_json::json!({"execute": cmd, "arguments": args});
        self.w.write_all(format!("{msg}\n").as_bytes()).unwrap();
        for _ in 0..100 {
            let mut line = String::new();
            assert!(self.r.read_line(&mut line).unwrap() > 0, "QMP closed");
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if v.get("event").is_none() {
                return v;
            }
        }
        panic!("{cmd}: no answer");
    }

    fn ok(&mut self, cmd: &str, args: serde_json::Value) -> serde_json::Value {
        let v = self.execute(cmd, args.clone());
        assert!(v.get("return").is_some(), "{cmd} {args}: {v}");
        v["return"].clone()
    }

    /// Replaces export `id` (read-only, of node `d`) by one offering `bitmaps`.
    fn reexport(&mut self, id: &str, bitmaps: &[&str]) {
        self.ok("block-export-del", serde_json::json!({"id": id}));
        let deadline = Instant::now() + Duration::from_secs(10);
        while self
            .ok("query-block-exports", serde_json::json!({}))
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["id"] == id)
        {
            assert!(Instant::now() < deadline, "export {id} not removed");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.ok(
            "block-export-add",
            serde_json::json!({"type": "nbd", "id": id, "node-name": "d", "name": id,
                "writable": false, "bitmaps": bitmaps}),
        );
    }
}

/// Runs a backup with `--json`; returns its report and its stderr.
fn backup_noting(env: &Env, src: &str, extra: &[&str]) -> (serde_json::Value, String) {
    let mut args = vec!["backup", src, "--json"];
    args.extend_from_slice(extra);
    let o = env.run(&args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "imgstore {args:?}: {err}");
    (serde_json::from_slice(&o.stdout).unwrap(), err)
}

/// The names and flags of a qcow2 image's persistent bitmaps.
fn bitmaps_of(img: &Path) -> Vec<(String, Vec<String>)> {
    let info: serde_json::Value =
        serde_json::from_str(&qemu_img(&["info", "-U", "--output=json", s(img)])).unwrap();
    info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|b| {
                    let flags = b["flags"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|f| f.as_str().unwrap().to_string())
                        .collect();
                    (b["name"].as_str().unwrap().to_string(), flags)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A "running VM": `qemu-storage-daemon` with a QMP socket serves a qcow2
/// holding a real ext4 as a writable NBD export (the guest's writes) and
/// a read-only export for backups. The first backup records with
/// `--checkpoint` that bitmap b1 (added over QMP) tracks what follows; 5%
/// of the disk is written through the writable export; then, as libvirt
/// does, b2 is added and b1 frozen in one transaction and b1 exported:
/// `--bitmap b1 --checkpoint b2` reads about the dirty bytes only, and
/// gives the snapshot a full read of the same disk gives. A backup that
/// gives b1 again (its parent says b2 holds the changes since) reads the
/// whole disk and says why.
#[test]
fn a_running_vm_backs_up_incrementally_from_its_dirty_bitmap_over_nbd() {
    if !qemu() {
        return;
    }
    let env = Env::new();
    env.init();
    let raw = ext4(&env);
    let qcow = env.path("vm.qcow2");
    qemu_img(&["convert", "-O", "qcow2", s(&raw), s(&qcow)]);
    let (sock, qmp_sock) = (env.path("nbd.sock"), env.path("qmp.sock"));
    let _daemon = start(
        Command::new("qemu-storage-daemon").args([
            "--blockdev",
            &format!(
                r#"{{"driver":"qcow2","node-name":"d","file":{{"driver":"file","filename":"{}"}}}}"#,
                qcow.display()
            ),
            "--chardev",
            &format!("socket,id=m,path={},server=on,wait=off", qmp_sock.display()),
            "--monitor",
            "chardev=m",
            "--nbd-server",
            &format!(r#"{{"addr":{{"type":"unix","path":"{}"}}}}"#, sock.display()),
            "--export",
            r#"{"type":"nbd","id":"w","node-name":"d","name":"w","writable":true}"#,
            "--export",
            r#"{"type":"nbd","id":"r","node-name":"d","name":"r","writable":false}"#,
        ]),
        || sock.exists() && qmp_sock.exists(),
    );
    let mut qmp = Qmp::connect(&qmp_sock);
    qmp.ok(
        "block-dirty-bitmap-add",
        serde_json::json!({"node": "d", "name": "b1"}),
    );
    let uri = format!("nbd+unix:///r?socket={}", sock.display());
    let (first, _) = backup_noting(&env, &uri, &["--name", "vm", "--checkpoint", "b1"]);
    assert_eq!(first["digest"].as_str().unwrap(), b3(&raw));
    assert_eq!(first["bitmap"]["next"], "b1");
    assert_eq!(first["bitmap"]["read"], serde_json::Value::Null);
    // The guest writes 5% of the 48 MiB disk, in three places.
    let written: u64 = (1024 + 960 + 512) << 10;
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x5a 3M 1M",
        "-c",
        "write -P 0x11 20M 960k",
        "-c",
        "write -P 0x77 40M 512k",
        &format!("nbd+unix:///w?socket={}", sock.display()),
    ]));
    qmp.ok(
        "transaction",
        serde_json::json!({"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "d", "name": "b2"}},
            {"type": "block-dirty-bitmap-disable", "data": {"node": "d", "name": "b1"}},
        ]}),
    );
    qmp.reexport("r", &["b1"]);
    let view = env.path("vm.view");
    qemu_img(&["convert", "-U", "-O", "raw", s(&qcow), s(&view)]);
    let (inc, note) = backup_noting(
        &env,
        &uri,
        &["--name", "vm", "--bitmap", "b1", "--checkpoint", "b2"],
    );
    assert!(!note.contains("whole disk"), "{note}");
    let size = inc["size"].as_u64().unwrap();
    let read = inc["bytes_read"].as_u64().unwrap();
    assert!(
        read >= written && read < size / 8,
        "read {read} of {size} for {written} written"
    );
    assert_eq!(inc["parent"], first["id"]);
    assert_eq!(inc["bitmap"]["read"], "b1");
    assert_eq!(inc["bitmap"]["next"], "b2");
    let (full, _) = backup_noting(&env, &uri, &["--name", "full", "--no-parent"]);
    assert_eq!(inc["digest"], full["digest"]);
    assert_eq!(inc["digest"].as_str().unwrap(), b3(&view));
    // Same chunks, same recipe: nothing new was stored for the full read.
    assert_eq!(full["new_chunks"], 0, "{full}");
    // b1 again: its parent says b2 holds the changes since it.
    let (again, note) = backup_noting(&env, &uri, &["--name", "vm", "--bitmap", "b1"]);
    assert!(
        note.contains("--bitmap b1:")
            && note.contains("\"b2\"")
            && note.contains("reading the whole disk"),
        "{note}"
    );
    assert_eq!(again["digest"], full["digest"]);
    assert_eq!(again["bytes_read"], full["bytes_read"], "{again}");
    // --verify-unchanged keeps working with --bitmap (b2 is frozen and
    // exported as well: nothing was written since the backup it follows,
    // so its extents are empty and a share of the rest is checked).
    qmp.ok(
        "block-dirty-bitmap-disable",
        serde_json::json!({"node": "d", "name": "b2"}),
    );
    qmp.reexport("r", &["b1", "b2"]);
    let (checked, note) = backup_noting(
        &env,
        &uri,
        &[
            "--name",
            "vm",
            "--parent",
            inc["id"].as_str().unwrap(),
            "--bitmap",
            "b2",
            "--verify-unchanged",
            "10%",
        ],
    );
    assert!(!note.contains("whole disk"), "{note}");
    assert_eq!(checked["digest"], full["digest"]);
    let verified = checked["bytes_read"].as_u64().unwrap();
    assert!(verified > 0 && verified < size, "{checked}");
    let out = env.path("inc.img");
    env.ok(&["restore", inc["id"].as_str().unwrap(), s(&out)]);
    assert_same(&out, &view);
}

/// A bitmap the NBD export does not offer: one line naming it, the
/// bitmaps the export does offer (libvirt's default backup-vda where a
/// checkpoint's name was expected) and what to do, a non-zero exit, no
/// snapshot; nothing left running once the server is stopped.
#[test]
fn a_bitmap_the_nbd_export_does_not_offer_fails_in_one_line_without_a_snapshot() {
    if !qemu() {
        return;
    }
    let env = Env::new();
    env.init();
    let raw = ext4(&env);
    let qcow = env.path("vm.qcow2");
    qemu_img(&["convert", "-O", "qcow2", s(&raw), s(&qcow)]);
    qemu_img(&["bitmap", "--add", "--disable", s(&qcow), "backup-vda"]);
    let sock = env.path("nbd.sock");
    let daemon = start(
        Command::new("qemu-storage-daemon").args([
            "--blockdev",
            &format!(
                r#"{{"driver":"qcow2","node-name":"d","read-only":true,"file":{{"driver":"file","filename":"{}","read-only":true}}}}"#,
                qcow.display()
            ),
            "--nbd-server",
            &format!(r#"{{"addr":{{"type":"unix","path":"{}"}}}}"#, sock.display()),
            "--export",
            r#"{"type":"nbd","id":"e","node-name":"d","name":"vm","bitmaps":["backup-vda"]}"#,
            "--export",
            r#"{"type":"nbd","id":"p","node-name":"d","name":"plain"}"#,
        ]),
        || sock.exists(),
    );
    let uri = format!("nbd+unix:///vm?socket={}", sock.display());
    let err = env.fails(
        &["backup", &uri, "--bitmap", "ckpt-1"],
        "does not offer bitmap \"ckpt-1\"",
    );
    assert!(
        err.contains("it offers \"backup-vda\"")
            && err.contains("exportbitmap='ckpt-1'")
            && err.contains("or back up without --bitmap")
            && err.lines().count() == 1,
        "{err}"
    );
    let plain = format!("nbd+unix:///plain?socket={}", sock.display());
    let err = env.fails(
        &["backup", &plain, "--bitmap", "nightly"],
        "does not offer bitmap \"nightly\"",
    );
    assert!(err.contains("it offers none"), "{err}");
    // Bad inputs of the flags themselves.
    env.fails(&["backup", &uri, "--bitmap", ""], "a bitmap name is");
    env.fails(
        &["backup", s(&raw), "--checkpoint", "x"],
        "--checkpoint names the bitmap of an NBD export",
    );
    env.fails(&["backup", s(&raw), "--bitmap", "x"], "needs a qcow2 image");
    env.fails(
        &["backup", &uri, "--verify-unchanged", "1%"],
        "give it with --changed or --bitmap",
    );
    stop(daemon);
    assert_eq!(env.ok(&["snapshots", "--json"]).trim(), "[]");
    assert_no_helper_left(s(env.dir.path()));
}

/// `--bitmap` on a stopped qcow2: imgstore adds the bitmap on the first
/// backup (a full read), then each backup reads only what was written
/// since the last successful one, and rotates the bitmap after its commit
/// (the image holds only the new generation). A backup that fails (the
/// repository busy) leaves the old generation in place, usable.
#[test]
fn a_stopped_qcow2_managed_bitmap_reads_only_what_changed_and_rotates_after_each_commit() {
    if !qemu() || !have("flock") {
        return;
    }
    let env = Env::new();
    env.init();
    let raw = ext4(&env);
    let qcow = env.path("vm.qcow2");
    qemu_img(&["convert", "-O", "qcow2", s(&raw), s(&qcow)]);
    let view = env.path("vm.view");
    let check = |r: &serde_json::Value| {
        guest_view(&qcow, &view);
        assert_eq!(r["digest"].as_str().unwrap(), b3(&view), "{r}");
        let gens = bitmaps_of(&qcow);
        assert_eq!(gens.len(), 1, "{gens:?}");
        assert_eq!(gens[0].0, r["bitmap"]["next"].as_str().unwrap());
        assert_eq!(gens[0].1, ["auto"], "{gens:?}");
        gens[0].0.clone()
    };
    let (first, note) = backup_noting(&env, s(&qcow), &["--bitmap", "nightly"]);
    assert!(note.contains("first backup with this bitmap"), "{note}");
    let full_read = first["bytes_read"].as_u64().unwrap();
    let g1 = check(&first);
    assert!(g1.starts_with("nightly-"), "{g1}");
    let writes: [&[&str]; 2] = [
        &["write -P 0x5a 3M 1M", "write -P 0x11 20M 960k"],
        &["write -P 0x77 40M 512k", "write -P 0x21 8M 64k"],
    ];
    let mut last = first;
    let mut gen = g1;
    for (round, w) in writes.iter().enumerate() {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "qcow2"]);
        for c in w.iter() {
            cmd.args(["-c", c]);
        }
        run(cmd.arg(&qcow));
        let written: u64 = w
            .iter()
            .map(|c| {
                let len = c.rsplit(' ').next().unwrap();
                match len.strip_suffix('M') {
                    Some(m) => m.parse::<u64>().unwrap() << 20,
                    None => len.strip_suffix('k').unwrap().parse::<u64>().unwrap() << 10,
                }
            })
            .sum();
        if round == 0 {
            // A backup that fails (the repository is busy) after the
            // daemon opened the image: the generation stays, usable.
            let lock = env.repo().join("lock");
            let holder = start(
                Command::new("flock").args(["-o", s(&lock), "sleep", "60"]),
                || true,
            );
            std::thread::sleep(Duration::from_millis(300));
            let o = env.run(&["backup", s(&qcow), "--bitmap", "nightly"]);
            assert_eq!(o.status.code(), Some(4), "{o:?}");
            stop(holder);
            assert_eq!(bitmaps_of(&qcow), [(gen.clone(), vec!["auto".to_string()])]);
        }
        let (r, note) = backup_noting(&env, s(&qcow), &["--bitmap", "nightly"]);
        assert!(!note.contains("whole disk"), "{note}");
        assert_eq!(r["bytes_read"].as_u64().unwrap(), written, "{r}");
        assert!(
            written * 2 < full_read,
            "{written} written, {full_read} in a full read"
        );
        assert_eq!(r["bitmap"]["read"].as_str().unwrap(), gen);
        assert_eq!(r["parent"], last["id"]);
        let next = check(&r);
        assert_ne!(next, gen);
        gen = next;
        last = r;
    }
    let out = env.path("last.img");
    env.ok(&["restore", last["id"].as_str().unwrap(), s(&out)]);
    assert_same(&out, &view);
    assert_eq!(
        env.ok(&["snapshots", "--json"]).matches("\"id\"").count(),
        3
    );
    assert_no_helper_left(s(&qcow));
}

/// A managed bitmap that does not belong to the parent is never trusted:
/// a parent taken without a bitmap, a generation deleted, one recreated
/// under the bitmap's name, one left `in-use` by a QEMU killed with the
/// image open read-write. Each backup reads the whole disk, says why in
/// one line, gives the exact snapshot, and leaves one fresh generation.
#[test]
fn a_managed_bitmap_that_does_not_belong_to_the_parent_means_a_full_read_with_a_note() {
    if !qemu() {
        return;
    }
    let env = Env::new();
    env.init();
    let raw = ext4(&env);
    let qcow = env.path("vm.qcow2");
    qemu_img(&["convert", "-O", "qcow2", s(&raw), s(&qcow)]);
    let view = env.path("vm.view");
    let plain = env.backup(&qcow, &[]);
    let full_read = plain["bytes_read"].as_u64().unwrap();
    let mut pattern = 0x30;
    let mut write = || {
        pattern += 1;
        run(Command::new("qemu-io").args([
            "-f",
            "qcow2",
            "-c",
            &format!("write -P {pattern} 6M 256k"),
            s(&qcow),
        ]));
    };
    let full = |why: &str| {
        let (r, note) = backup_noting(&env, s(&qcow), &["--bitmap", "nightly"]);
        assert!(
            note.contains(why) && note.contains("reading the whole disk"),
            "expected {why:?}: {note}"
        );
        assert_eq!(note.trim_end().lines().count(), 1, "{note}");
        assert!(r["bytes_read"].as_u64().unwrap() * 2 > full_read, "{r}");
        assert_eq!(r["bitmap"]["read"], serde_json::Value::Null);
        guest_view(&qcow, &view);
        assert_eq!(r["digest"].as_str().unwrap(), b3(&view));
        let gens = bitmaps_of(&qcow);
        assert_eq!(
            gens.iter().filter(|g| g.0.starts_with("nightly-")).count(),
            1,
            "{gens:?}"
        );
        let g = gens.iter().find(|g| g.0 == r["bitmap"]["next"]).unwrap();
        assert_eq!(g.1, ["auto"]);
        g.0.clone()
    };
    // The parent was taken without a bitmap.
    write();
    let gen = full("was not taken with --bitmap");
    // The generation deleted (another tool cleared it).
    write();
    qemu_img(&["bitmap", "--remove", s(&qcow), &gen]);
    let gen = full("holds no bitmap");
    // Recreated under the bitmap's name (and a generation of its own).
    write();
    qemu_img(&["bitmap", "--remove", s(&qcow), &gen]);
    qemu_img(&["bitmap", "--add", s(&qcow), "nightly"]);
    qemu_img(&["bitmap", "--add", s(&qcow), "nightly-0000000000000000"]);
    let gen = full("holds no bitmap");
    // A crash: a QEMU that had the image open read-write is killed.
    write();
    let sock = env.path("crash.sock");
    let crashed = start(
        Command::new("qemu-storage-daemon").args([
            "--blockdev",
            &format!(
                r#"{{"driver":"qcow2","node-name":"d","file":{{"driver":"file","filename":"{}"}}}}"#,
                qcow.display()
            ),
            "--nbd-server",
            &format!(r#"{{"addr":{{"type":"unix","path":"{}"}}}}"#, sock.display()),
        ]),
        || sock.exists(),
    );
    let pid = crashed.id();
    run(Command::new("kill").args(["-9", &pid.to_string()]));
    stop(crashed);
    assert!(bitmaps_of(&qcow)
        .iter()
        .any(|(n, f)| *n == gen && f.iter().any(|f| f == "in-use")));
    full("marked in-use");
    assert_no_helper_left(s(&qcow));
}
