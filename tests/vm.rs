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
