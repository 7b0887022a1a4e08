//! `serve`: snapshots as NBD exports, driven by real clients (nbdinfo,
//! nbdcopy, qemu-img); and the image reader's cache through the library.

use std::fs;
use std::process::{Child, Command, Stdio};

use imgstore_engine::{BackupOptions, ImageReader, NoProgress, Source};

use crate::util::*;

/// Kills the server on drop.
struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `imgstore serve ARGS` on a socket in the test directory, its
/// standard error in `serve.log` there.
fn start(env: &Env, args: &[&str]) -> (Server, String) {
    let sock = env.path("nbd.sock");
    let child = env
        .command()
        .arg("serve")
        .args(args)
        .arg("--socket")
        .arg(&sock)
        .stdout(Stdio::null())
        .stderr(fs::File::create(env.path("serve.log")).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !sock.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "server never listened"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    (Server(child), sock.display().to_string())
}

fn uri(export: &str, sock: &str) -> String {
    format!("nbd+unix:///{export}?socket={sock}")
}

#[test]
fn nbd_clients_list_map_and_copy_snapshots_byte_exact() {
    if !have("nbdinfo") || !have("nbdcopy") {
        eprintln!("SKIP: nbdinfo/nbdcopy (libnbd-bin) not installed");
        return;
    }
    let env = Env::new();
    env.init();
    // A sparse image: data, a 3 MiB hole, data, zeros written out, data.
    let img = env.path("vm.img");
    let mut data = texty(5 << 20, 901);
    data.extend(vec![0u8; 3 << 20]);
    data.extend(seeded(4 << 20, 902));
    data.extend(vec![0u8; 1 << 20]);
    data.extend(texty(1 << 20, 903));
    fs::write(&img, &data).unwrap();
    let old = env.backup(&img, &["--name", "vm"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut data2 = data.clone();
    data2[100..200].fill(7);
    let img2 = env.path("vm2.img");
    fs::write(&img2, &data2).unwrap();
    let new = env.backup(&img2, &["--name", "vm"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (_server, sock) = start(&env, &["--all"]);

    let list = Command::new("nbdinfo")
        .arg("--list")
        .arg(uri("", &sock))
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.contains(&old) && list.contains(&new) && list.contains("vm@latest"),
        "{list}"
    );

    // The map shows the zero extents as holes, from the recipes.
    let map = Command::new("nbdinfo")
        .args(["--map", "--totals"])
        .arg(uri("vm@latest", &sock))
        .output()
        .unwrap();
    assert!(
        map.status.success(),
        "{}",
        String::from_utf8_lossy(&map.stderr)
    );
    let map = String::from_utf8_lossy(&map.stdout);
    let holes: u64 = map
        .lines()
        .filter(|l| l.contains("hole"))
        .map(|l| l.split_whitespace().next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(holes, 4 << 20, "{map}");

    // nbdcopy of each export equals its source; so does qemu-img convert.
    for (export, src) in [(&new[..12], &img2), (old.as_str(), &img)] {
        let out = env.path("copy.img");
        let _ = fs::remove_file(&out);
        let o = nbdcopy(export, &sock, &out);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_same(src, &out);
        // Sparse on the way out too: the holes were not written as data.
        assert!(
            allocated(&out) < data.len() as u64 - (3 << 20),
            "copy is not sparse"
        );
    }
    if have("qemu-img") {
        let out = env.path("qemu.img");
        let o = Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(uri("vm@latest", &sock))
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_same(&img2, &out);
    }
    // An unknown export is refused.
    let o = Command::new("nbdinfo")
        .arg(uri("nosuch", &sock))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("nosuch"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn a_damaged_chunk_is_an_io_error_never_wrong_bytes() {
    if !have("nbdcopy") {
        eprintln!("SKIP: nbdcopy (libnbd-bin) not installed");
        return;
    }
    let env = Env::new();
    env.init();
    let img = env.path("r.img");
    fs::write(&img, seeded(6 << 20, 911)).unwrap();
    let id = env.backup(&img, &[])["id"].as_str().unwrap().to_string();
    let blob = fs::read_dir(env.repo().join("db"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "blob"))
        .unwrap();
    let mut b = fs::read(&blob).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0x10;
    fs::write(&blob, b).unwrap();
    let (_server, sock) = start(&env, &[&id]);
    let out = env.path("copy.img");
    let o = nbdcopy("", &sock, &out);
    assert!(
        !o.status.success(),
        "a damaged snapshot must not copy cleanly"
    );
}

#[test]
fn random_4k_reads_decompress_each_chunk_once() {
    let dir = tempfile::Builder::new().tempdir_in(scratch()).unwrap();
    let store = crate::roundtrip::test_store(dir.path(), 64 << 10);
    let data = [texty(12 << 20, 921), vec![0; 2 << 20], seeded(6 << 20, 922)].concat();
    let opts = BackupOptions {
        name: "r".into(),
        ..Default::default()
    };
    let r = imgstore_engine::backup(
        &store,
        Source::from_reader(
            std::path::Path::new("r"),
            Box::new(std::io::Cursor::new(data.clone())),
        ),
        &opts,
        &NoProgress,
    )
    .unwrap();
    let reader = ImageReader::new(&store, &r.id, &r.snapshot, 64 << 20).unwrap();
    let rnd = seeded(8 * 3000, 923);
    let mut buf = vec![0u8; 4096];
    for i in 0..3000 {
        let off = u64::from_le_bytes(rnd[i * 8..i * 8 + 8].try_into().unwrap())
            % (data.len() as u64 - 4096);
        reader.read_at(off, &mut buf).unwrap();
        assert_eq!(
            &buf[..],
            &data[off as usize..off as usize + 4096],
            "at {off}"
        );
    }
    // The cache holds every chunk of this image: each was decompressed once.
    let chunks = r.snapshot.stats.chunks;
    let n = reader.decompressed_chunks();
    assert!(
        n <= chunks && n > chunks / 2,
        "{n} decompressions for {chunks} chunks"
    );
    let before = n;
    for i in 0..3000 {
        let off = u64::from_le_bytes(rnd[i * 8..i * 8 + 8].try_into().unwrap())
            % (data.len() as u64 - 4096);
        reader.read_at(off, &mut buf).unwrap();
    }
    assert_eq!(
        reader.decompressed_chunks(),
        before,
        "repeated reads decompressed again"
    );
    // The map reports the zero run.
    let map = reader.map(0, data.len() as u64).unwrap();
    let zeros: u64 = map.iter().filter(|m| m.1).map(|m| m.0).sum();
    assert_eq!(zeros, 2 << 20, "{map:?}");
}

#[test]
fn writable_export_keeps_writes_in_an_overlay_and_backs_them_up() {
    if !have("qemu-io") || !have("nbdcopy") {
        eprintln!("SKIP: qemu-io (qemu-utils) and nbdcopy (libnbd-bin) needed");
        return;
    }
    let env = Env::new();
    env.init();
    let img = env.path("vm.img");
    let data = [
        texty(6 << 20, 931),
        vec![0u8; 2 << 20],
        seeded(4 << 20, 932),
    ]
    .concat();
    fs::write(&img, &data).unwrap();
    let id = env.backup(&img, &["--name", "vm"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let qemu_io = |sock: &str, cmds: &[&str]| {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw"]);
        for x in cmds {
            c.args(["-c", x]);
        }
        c.arg(uri("", sock)).output().unwrap()
    };
    // Read-only by default: writes are refused.
    {
        let (_server, sock) = start(&env, &[&id]);
        let o = qemu_io(&sock, &["write -P 0x11 0 4096"]);
        let out =
            String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
        assert!(!out.contains("wrote 4096/4096"), "{out}");
    }
    let sock_path = env.path("nbd.sock");
    let _ = fs::remove_file(&sock_path);
    let overlay = env.path("overlay");
    let mut expected = data.clone();
    {
        let (_server, sock) = start(&env, &[&id, "--writable", overlay.to_str().unwrap()]);
        let o = qemu_io(
            &sock,
            &[
                "write -P 0x55 1000 70000",
                "write -z 7340032 1048576",
                "write -P 0x66 9437184 4096",
            ],
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        expected[1000..71000].fill(0x55);
        expected[7 << 20..8 << 20].fill(0);
        expected[9 << 20..(9 << 20) + 4096].fill(0x66);
        let view = env.path("view.img");
        let o = nbdcopy("", &sock, &view);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(
            fs::read(&view).unwrap() == expected,
            "the export's view differs from what was written"
        );
        // One server per overlay.
        let o = env
            .command()
            .args([
                "serve",
                &id,
                "--writable",
                overlay.to_str().unwrap(),
                "--socket",
            ])
            .arg(env.path("second.sock"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("is in use by a running"),
            "{err}"
        );
    }
    // The repository was not written: the snapshot still restores the original.
    let orig = env.path("orig.img");
    env.ok(&["restore", &id, orig.to_str().unwrap()]);
    assert_same(&img, &orig);
    // A restarted server resumes the overlay.
    let _ = fs::remove_file(&sock_path);
    {
        let (_server, sock) = start(&env, &[&id, "--writable", overlay.to_str().unwrap()]);
        let view = env.path("view2.img");
        let o = nbdcopy("", &sock, &view);
        assert!(o.status.success());
        assert!(fs::read(&view).unwrap() == expected, "overlay not resumed");
    }
    // Keeping the result: a backup of the overlay reads only written blocks.
    let r: serde_json::Value = serde_json::from_str(&env.ok(&[
        "backup",
        "--from-export",
        overlay.to_str().unwrap(),
        "--tag",
        "repaired",
        "--json",
    ]))
    .unwrap();
    // Written blocks: 1000..71000 → 18 blocks, 1 MiB → 256, 4 KiB → 1.
    assert_eq!(
        r["bytes_read"].as_u64().unwrap(),
        (18 + 256 + 1) * 4096,
        "{r}"
    );
    assert_eq!(r["name"], "vm");
    let out = env.path("kept.img");
    env.ok(&["restore", r["id"].as_str().unwrap(), out.to_str().unwrap()]);
    assert!(fs::read(&out).unwrap() == expected);
    // An overlay of another snapshot is refused.
    let other = env.backup(&orig, &["--name", "other", "--tag", "x"]);
    let _ = fs::remove_file(&sock_path);
    let o = env
        .command()
        .args([
            "serve",
            "--name",
            "vm",
            "latest",
            "--writable",
            overlay.to_str().unwrap(),
            "--socket",
        ])
        .arg(&sock_path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("holds an overlay of snapshot"),
        "{err} {other}"
    );
}

/// Reads every data byte of `export` on `sock` with nbdcopy into `to`.
fn nbdcopy(export: &str, sock: &str, to: &std::path::Path) -> std::process::Output {
    Command::new("nbdcopy")
        .arg(uri(export, sock))
        .arg(to)
        .output()
        .unwrap()
}

#[test]
fn an_export_outlives_a_gc_that_rewrites_the_files_it_reads() {
    if !have("nbdcopy") {
        eprintln!("SKIP: nbdcopy (libnbd-bin) not installed");
        return;
    }
    let env = Env::new();
    env.init();
    // `mixed` interleaves the kept image's 4 MiB pieces with random ones
    // and is backed up first, so the kept image's chunks share blob files
    // with chunks that become garbage when `mixed` is forgotten: gc then
    // rewrites the kept chunks into new files and deletes the old ones.
    let kept = texty(48 << 20, 931);
    let mixed = interleaved_with_garbage(&kept, 4 << 20, 940);
    let (kept_img, mixed_img) = (env.path("kept.img"), env.path("mixed.img"));
    fs::write(&kept_img, &kept).unwrap();
    fs::write(&mixed_img, &mixed).unwrap();
    let mixed_id = env.backup(&mixed_img, &["--name", "mixed"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let kept_id = env.backup(&kept_img, &["--name", "kept"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let blobs = || -> Vec<std::path::PathBuf> {
        fs::read_dir(env.repo().join("db"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "blob"))
            .collect()
    };
    let before = blobs();

    // The server opens the repository now, and has read nothing yet.
    let (server, sock) = start(&env, &["--all"]);

    env.ok(&["forget", &mixed_id]);
    env.ok(&["gc"]);
    let after = blobs();
    let deleted = before.iter().filter(|p| !after.contains(p)).count();
    assert!(
        deleted > 0 && after.iter().any(|p| !before.contains(p)),
        "gc rewrote no blob file ({} before, {} after): the test proves nothing",
        before.len(),
        after.len()
    );

    // The kept snapshot still reads byte-exact through the old server.
    let copy = env.path("kept-copy.img");
    let o = nbdcopy(&kept_id, &sock, &copy);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_same(&copy, &kept_img);
    // The forgotten one fails, and the server says why: not damage.
    let o = nbdcopy(&mixed_id, &sock, &env.path("mixed-copy.img"));
    assert!(!o.status.success(), "a collected snapshot copied cleanly");
    drop(server);
    let said = fs::read_to_string(env.path("serve.log")).unwrap();
    assert!(
        said.contains("was forgotten and its data deleted by a gc"),
        "{said}"
    );
    assert!(!said.contains("check --read-data"), "{said}");
}

/// Ctrl-C or SIGTERM stops a writable export in order: a write its client
/// never flushed (qemu-io in writeback mode, still connected) is kept in
/// the overlay, the command exits 0 and removes its socket.
#[test]
fn a_stopped_writable_export_keeps_writes_never_flushed() {
    if !have("qemu-io") || !have("nbdcopy") {
        eprintln!("SKIP: qemu-io (qemu-utils) and nbdcopy (libnbd-bin) needed");
        return;
    }
    let env = Env::new();
    env.init();
    let img = env.path("vm.img");
    let data = seeded(8 << 20, 981);
    fs::write(&img, &data).unwrap();
    let id = env.backup(&img, &[])["id"].as_str().unwrap().to_string();
    let overlay = env.path("overlay");
    let (mut server, sock) = start(&env, &[&id, "--writable", overlay.to_str().unwrap()]);
    let said = env.path("qemu-io.out");
    let mut client = Command::new("qemu-io")
        .args(["-t", "writeback", "-f", "raw"])
        .arg(uri("", &sock))
        .stdin(Stdio::piped())
        .stdout(fs::File::create(&said).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let stdin = client.stdin.as_mut().unwrap();
        writeln!(stdin, "write -P 0xab 0 65536").unwrap();
        stdin.flush().unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !fs::read_to_string(&said)
        .unwrap()
        .contains("wrote 65536/65536")
    {
        assert!(std::time::Instant::now() < deadline, "qemu-io never wrote");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // A backup of the overlay is refused while the server can still write
    // into it.
    let o = env.run(&["backup", "--from-export", overlay.to_str().unwrap()]);
    assert!(!o.status.success(), "a live overlay was backed up");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("in use by a running"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // The client is still connected and has flushed nothing.
    assert!(Command::new("kill")
        .args(["-TERM", &server.0.id().to_string()])
        .status()
        .unwrap()
        .success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(s) = server.0.try_wait().unwrap() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "serve did not stop");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    drop(client.stdin.take());
    let _ = client.wait();
    assert!(status.success(), "{status:?}");
    assert!(!std::path::Path::new(&sock).exists(), "the socket was left");
    let log = fs::read_to_string(env.path("serve.log")).unwrap();
    assert!(log.contains("every write is kept"), "{log}");

    let (_server, sock) = start(&env, &[&id, "--writable", overlay.to_str().unwrap()]);
    let view = env.path("view.img");
    let o = nbdcopy("", &sock, &view);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut expected = data;
    expected[..65536].fill(0xab);
    assert!(
        fs::read(&view).unwrap() == expected,
        "the unflushed write was lost when serve stopped"
    );
    drop(_server);
    // Stopped, the overlay backs up, and the snapshot holds the write.
    let kept = env.ok(&[
        "backup",
        "--from-export",
        overlay.to_str().unwrap(),
        "--json",
    ]);
    let kept: serde_json::Value = serde_json::from_str(kept.lines().last().unwrap()).unwrap();
    let back = env.path("back.img");
    env.ok(&[
        "restore",
        kept["id"].as_str().unwrap(),
        back.to_str().unwrap(),
    ]);
    assert!(
        fs::read(&back).unwrap() == expected,
        "the overlay's snapshot differs"
    );
}
