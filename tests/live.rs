//! `restore --live` (instant recovery): the real binary serving over a
//! Unix socket to real NBD clients (`qemu-io`, `nbdcopy`) while its
//! background copy runs (slowed with the test-only
//! `IMGSTORE_LIVE_TEST_PAUSE_MS` so client I/O overlaps it), into a file
//! and a loop device; kill -9 at random moments then resume; a server that
//! dies mid-way. TARGET is always compared with a reference: the snapshot
//! with the same writes applied.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::server::{setup, Client, Served};
use crate::util::*;

const MIB: usize = 1 << 20;

/// A 64 MiB image (8 regions): text, a zero stretch, random data.
fn image() -> Vec<u8> {
    let mut v = texty(20 * MIB, 301);
    v.extend(vec![0u8; 12 * MIB]);
    v.extend(seeded(32 * MIB, 302));
    v
}

/// A running `restore --live`, its stderr in `log`, stdout in `status`.
struct Live {
    child: Child,
    sock: PathBuf,
    log: PathBuf,
    status: PathBuf,
}

impl Live {
    /// Starts `cmd restore SNAPSHOT TARGET --live --socket ...` and waits
    /// (bounded) for the socket.
    fn start(mut cmd: Command, dir: &Path, args: &[&str], pause_ms: u64) -> Live {
        let sock = dir.join("live.sock");
        let _ = fs::remove_file(&sock);
        let log = dir.join("live.log");
        let status = dir.join("live.status");
        let child = cmd
            .arg("restore")
            .args(args)
            .args(["--live", "--json-status", "--socket"])
            .arg(&sock)
            .env("IMGSTORE_LIVE_TEST_PAUSE_MS", pause_ms.to_string())
            .stdin(Stdio::null())
            .stdout(fs::File::create(&status).unwrap())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let live = Live {
            child,
            sock,
            log,
            status,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !live.sock.exists() {
            assert!(
                Instant::now() < deadline,
                "restore --live did not start serving: {}",
                live.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        live
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) until the log contains `needle`.
    fn wait_for(&self, needle: &str, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} within {secs} s: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then the exit code (bounded wait).
    fn stop(mut self) -> (Option<i32>, String, Vec<serde_json::Value>) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        let code = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("restore --live did not stop: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let status = fs::read_to_string(&self.status)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (code, self.log(), status)
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `qemu-io` on the export with commands `cmds`.
fn qemu_io(uri: &str, cmds: &[String]) -> Output {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", uri]);
    for x in cmds {
        c.args(["-c", x]);
    }
    c.stdin(Stdio::null()).output().unwrap()
}

fn qemu_ok(uri: &str, cmds: &[String]) -> String {
    let o = qemu_io(uri, cmds);
    let out = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && !out.contains("failed") && !out.contains("Pattern verification"),
        "qemu-io {cmds:?}: {out}"
    );
    out
}

/// Bytes `[off, off + len)` of the export, from `qemu-io read -v`'s dump;
/// Err with qemu-io's message when the read fails.
fn qemu_read(uri: &str, off: u64, len: u64) -> Result<Vec<u8>, String> {
    let o = qemu_io(uri, &[format!("read -v {off} {len}")]);
    let out = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    if out.contains("failed") {
        return Err(out);
    }
    let mut bytes = Vec::new();
    for line in out.lines() {
        let Some((addr, rest)) = line.split_once(":  ") else {
            continue;
        };
        if u64::from_str_radix(addr, 16).is_err() {
            continue;
        }
        for h in rest.split_whitespace().take(16) {
            match u8::from_str_radix(h, 16) {
                Ok(b) if h.len() == 2 => bytes.push(b),
                _ => break,
            }
        }
    }
    assert_eq!(bytes.len() as u64, len, "qemu-io dump: {out}");
    Ok(bytes)
}

/// A client write: `len` bytes of `pattern` at `off`.
#[derive(Clone, Copy, Debug)]
struct W {
    off: u64,
    len: u64,
    pattern: u8,
}

impl W {
    fn cmd(&self) -> String {
        format!("write -P {} {} {}", self.pattern, self.off, self.len)
    }
    fn apply(&self, v: &mut [u8]) {
        v[self.off as usize..(self.off + self.len) as usize].fill(self.pattern);
    }
}

/// Writes spread over the image: unaligned, crossing 64 KiB blocks, in
/// the zero stretch, at the very end.
fn writes(size: u64, seed: u64) -> Vec<W> {
    let r = seeded(64, seed);
    let mut out = vec![
        W {
            off: 100_000,
            len: 5_000,
            pattern: 0xab,
        },
        W {
            off: (21 * MIB) as u64 + 65_000,
            len: 140_000,
            pattern: 0x5c,
        },
        W {
            off: size - 4096,
            len: 4096,
            pattern: 0x11,
        },
    ];
    for i in 0..5 {
        let at = u64::from_le_bytes(r[i * 8..i * 8 + 8].try_into().unwrap()) % (size - 200_000);
        out.push(W {
            off: at,
            len: 512 + (r[40 + i] as u64) * 300,
            pattern: r[50 + i] | 1,
        });
    }
    out
}

/// Serves, reads and writes during the copy, then checks TARGET (`read_back`
/// gives its first `size` bytes) against the reference.
fn live_round_trip(
    env: &Env,
    id: &str,
    target: &str,
    force: bool,
    read_back: impl Fn() -> Vec<u8>,
) {
    let img = image();
    let size = img.len() as u64;
    let mut args = vec![id, target];
    if force {
        args.push("--force");
    }
    let live = Live::start(env.command(), env.dir.path(), &args, 400);
    let uri = live.uri();
    let mut want = img.clone();
    // Reads of blocks not restored yet (the end of the image) and a
    // whole copy through nbdcopy, while the copy is at its start.
    let tail = qemu_read(&uri, size - 8192, 4096).unwrap();
    assert!(tail == img[size as usize - 8192..size as usize - 4096]);
    let ws = writes(size, 303);
    let mut cmds: Vec<String> = ws.iter().map(W::cmd).collect();
    cmds.push("flush".into());
    for w in &ws {
        w.apply(&mut want);
    }
    for w in &ws {
        cmds.push(format!("read -P {} {} {}", w.pattern, w.off, w.len));
    }
    qemu_ok(&uri, &cmds);
    let copy = env.path("through-nbd.img");
    let st = Command::new("nbdcopy")
        .arg(&uri)
        .arg(&copy)
        .status()
        .unwrap();
    assert!(st.success(), "nbdcopy");
    assert!(
        fs::read(&copy).unwrap() == want,
        "the export as nbdcopy read it"
    );
    live.wait_for("now holds the snapshot plus", 120);
    let (code, log, status) = live.stop();
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("every write kept"), "{log}");
    let got = read_back();
    assert!(got[..want.len()] == want[..], "TARGET != snapshot + writes");
    let last = status.last().expect("a status line");
    assert_eq!(last["complete"], true);
    assert_eq!(last["final_bytes"], size);
    let written: u64 = ws.iter().map(|w| w.len).sum();
    assert_eq!(last["client_written_bytes"], written);
    // The client read blocks the copy had not reached.
    assert!(last["repo_read_bytes"].as_u64().unwrap() > 0, "{last}");
    // Complete and stopped: the state file is gone.
    let states = env.state_dir().join("live");
    assert_eq!(fs::read_dir(&states).unwrap().count(), 0, "state left");
}

#[test]
fn live_restore_into_a_file_serves_during_the_copy_and_keeps_every_write() {
    if !have("qemu-io") || !have("nbdcopy") {
        eprintln!("SKIP: qemu-io and nbdcopy are needed");
        return;
    }
    let env = Env::new();
    env.init();
    let src = env.path("src.img");
    fs::write(&src, image()).unwrap();
    let id = env.backup(&src, &[])["id"].as_str().unwrap().to_string();
    let target = env.path("target.img");
    let t = target.to_str().unwrap().to_string();
    live_round_trip(&env, &id, &t, false, || fs::read(&target).unwrap());
    // Zero extents were left as holes.
    assert!(allocated(&target) < 60 * MIB as u64, "zeros not sparse");
    // An existing file needs --force, as for any restore.
    let o = env.run(&["restore", &id, &t, "--live"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("already exists: pass --force"), "{err}");
}

#[test]
fn live_restore_onto_a_loop_device_zeroes_what_it_held() {
    if !have("qemu-io") || !have("nbdcopy") {
        eprintln!("SKIP: qemu-io and nbdcopy are needed");
        return;
    }
    let env = Env::new();
    env.init();
    let src = env.path("src.img");
    fs::write(&src, image()).unwrap();
    let id = env.backup(&src, &[])["id"].as_str().unwrap().to_string();
    let backing = env.path("dev.bin");
    fs::write(&backing, seeded(72 * MIB, 304)).unwrap();
    let o = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&backing)
        .output()
        .unwrap();
    if !o.status.success() {
        eprintln!("SKIP: no loop devices here (needs root and the loop module)");
        return;
    }
    let dev = String::from_utf8(o.stdout).unwrap().trim().to_string();
    // A device without --force is refused.
    let o = env.run(&["restore", &id, &dev, "--live"]);
    let refused = String::from_utf8_lossy(&o.stderr).to_string();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        live_round_trip(&env, &id, &dev, true, || fs::read(&backing).unwrap());
    }));
    let _ = Command::new("losetup").args(["-d", &dev]).status();
    assert!(
        refused.contains("pass --force to restore onto it"),
        "{refused}"
    );
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

/// Each byte of `got` equals `want`, except within `loose` ranges, where it
/// may equal `alt` instead (an unflushed write, kept or not).
fn check_bytes(got: &[u8], want: &[u8], alt: &[u8], loose: &[(u64, u64)]) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if g != w {
            let i64 = i as u64;
            let ok = loose.iter().any(|&(a, b)| a <= i64 && i64 < b) && *g == alt[i];
            assert!(ok, "byte {i}: {g:#x}, want {w:#x}");
        }
    }
}

#[test]
fn kill_9_at_random_moments_then_resume_loses_no_flushed_write() {
    if !have("qemu-io") {
        eprintln!("SKIP: qemu-io is needed");
        return;
    }
    let env = Env::new();
    env.init();
    let img = image();
    let size = img.len() as u64;
    let src = env.path("src.img");
    fs::write(&src, &img).unwrap();
    let id = env.backup(&src, &[])["id"].as_str().unwrap().to_string();
    let target = env.path("target.img");
    let t = target.to_str().unwrap().to_string();
    let rnd = seeded(4096, 305);
    let mut want = img.clone();
    // Bytes an unflushed (killed) write may or may not have changed, and
    // what they would be if it did.
    let mut loose: Vec<(u64, u64)> = Vec::new();
    let mut alt = img.clone();
    let mut n = 0usize;
    for round in 0..6u64 {
        let mut live = Live::start(env.command(), env.dir.path(), &[&id, &t], 150);
        let uri = live.uri();
        // The client: write + flush, one qemu-io each, on its own thread;
        // kill -9 at a random moment meanwhile.
        let ws: Vec<W> = writes(size, 400 + round).into_iter().take(4).collect();
        let client = {
            let uri = uri.clone();
            let ws = ws.clone();
            std::thread::spawn(move || {
                let mut done = Vec::new();
                for w in ws {
                    let o = qemu_io(&uri, &[w.cmd(), "flush".into()]);
                    let out = String::from_utf8_lossy(&o.stdout).to_string();
                    if !o.status.success() || out.contains("failed") {
                        break;
                    }
                    done.push(w);
                }
                done
            })
        };
        let delay = 50 + (rnd[round as usize] as u64) * 4;
        std::thread::sleep(Duration::from_millis(delay));
        live.kill9();
        let done = client.join().unwrap();
        for w in &done {
            w.apply(&mut want);
            w.apply(&mut alt);
        }
        // The write in flight when killed: its bytes may be either.
        if let Some(w) = ws.get(done.len()) {
            w.apply(&mut alt);
            loose.push((w.off, w.off + w.len));
        }
        n += done.len();
        // A restore of another snapshot into this target is refused.
        if round == 0 {
            let other = env.path("other.img");
            fs::write(&other, seeded(MIB, 306)).unwrap();
            let oid = env.backup(&other, &["--name", "other"])["id"]
                .as_str()
                .unwrap()
                .to_string();
            let o = env.run(&["restore", &oid, &t, "--live", "--force"]);
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(1), "{err}");
            assert!(
                err.contains("belongs to an unfinished live restore of snapshot"),
                "{err}"
            );
            assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        }
        // A write that overlaps a loose range makes those bytes certain again.
        loose.retain(|&(a, b)| !done.iter().any(|w| w.off <= a && b <= w.off + w.len));
    }
    assert!(n > 0, "no write completed in any round");
    // The same command completes the restore.
    let live = Live::start(env.command(), env.dir.path(), &[&id, &t], 0);
    // The socket exists a moment before the line saying what it serves
    // (its end: a line may be written in pieces).
    live.wait_for("the same command resumes", 30);
    assert!(live.log().contains("resumed"), "{}", live.log());
    live.wait_for("now holds the snapshot plus", 120);
    let (code, log, _) = live.stop();
    assert_eq!(code, Some(0), "{log}");
    check_bytes(&fs::read(&target).unwrap(), &want, &alt, &loose);
}

#[test]
fn a_server_that_dies_fails_only_missing_blocks_and_resume_completes() {
    if !have("qemu-io") {
        eprintln!("SKIP: qemu-io is needed");
        return;
    }
    let env = Env::new();
    let mut served = setup(&env);
    let admin = Client::new(&env, &served, "admin");
    let img = image();
    let size = img.len() as u64;
    let src = env.path("src.img");
    fs::write(&src, &img).unwrap();
    let id = admin.backup(&src, &["--name", "web-1"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let target = env.path("target.img");
    let t = target.to_str().unwrap().to_string();
    let addr = served.addr.clone();
    // A client read of a missing block waits --retry-for for the server.
    let mut live = Live::start(
        admin.command(),
        env.dir.path(),
        &[&id, &t, "--retry-for", "1s"],
        1500,
    );
    let uri = live.uri();
    // Block 0 is final (copied, or read now), then the server dies.
    assert!(qemu_read(&uri, 0, 4096).unwrap() == img[..4096]);
    served.kill9();
    assert!(qemu_read(&uri, 0, 4096).unwrap() == img[..4096]);
    let e = qemu_read(&uri, size - 4096, 4096).expect_err("a missing block read");
    assert!(e.contains("Input/output error"), "{e}");
    // A write into a final block still works; into a missing one it
    // fails (it needs the block's snapshot bytes).
    let w = W {
        off: 1000,
        len: 3000,
        pattern: 0x77,
    };
    qemu_ok(&uri, &[w.cmd(), "flush".into()]);
    let o = qemu_io(&uri, &[format!("write -P 0x66 {} 100", size - 50_000)]);
    let out = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(out.contains("Input/output error"), "{out}");
    live.wait_for("retrying in", 30);
    // Part one ends killed; the server comes back; the same command resumes.
    live.kill9();
    served = Served::start(&env, &addr);
    let live = Live::start(admin.command(), env.dir.path(), &[&id, &t], 0);
    live.wait_for("now holds the snapshot plus", 120);
    let (code, log, _) = live.stop();
    assert_eq!(code, Some(0), "{log}");
    let mut want = img.clone();
    w.apply(&mut want);
    assert!(fs::read(&target).unwrap() == want, "TARGET after resume");
    served.assert_no_panic();
}

#[test]
fn an_encrypted_repository_restores_live() {
    if !have("qemu-io") {
        eprintln!("SKIP: qemu-io is needed");
        return;
    }
    const PASS: &str = "live passphrase";
    let env = Env::new();
    let with_pass = || {
        let mut c = env.command();
        c.env("IMGSTORE_PASSWORD", PASS);
        c
    };
    let o = with_pass().args(["init", "--encryption"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let img = image();
    let size = img.len() as u64;
    let src = env.path("src.img");
    fs::write(&src, &img).unwrap();
    let o = with_pass()
        .args(["backup", src.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let id = v["id"].as_str().unwrap().to_string();
    let target = env.path("target.img");
    let live = Live::start(
        with_pass(),
        env.dir.path(),
        &[&id, target.to_str().unwrap()],
        300,
    );
    let uri = live.uri();
    assert!(qemu_read(&uri, size - 4096, 4096).unwrap() == img[size as usize - 4096..]);
    let w = W {
        off: 40 * MIB as u64 + 10,
        len: 70_000,
        pattern: 0x3d,
    };
    qemu_ok(&uri, &[w.cmd(), "flush".into()]);
    live.wait_for("now holds the snapshot plus", 120);
    let (code, log, _) = live.stop();
    assert_eq!(code, Some(0), "{log}");
    let mut want = img;
    w.apply(&mut want);
    assert!(
        fs::read(&target).unwrap() == want,
        "TARGET != snapshot + write"
    );
}
