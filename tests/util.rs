//! Helpers: run the binary, build images, compare files.

#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub const BIN: &str = env!("CARGO_BIN_EXE_imgstore");

/// A scratch directory with a repository path inside.
pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Env {
        Env {
            dir: tempfile::Builder::new()
                .prefix("imgstore-test")
                .tempdir_in(scratch())
                .unwrap(),
        }
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    pub fn repo(&self) -> PathBuf {
        self.path("repo")
    }
    /// The imgstore binary with `-r repo` set, for tests that spawn it or
    /// set its stdio themselves.
    pub fn command(&self) -> Command {
        let mut c = Command::new(BIN);
        c.arg("-r")
            .arg(self.repo())
            .env("IMGSTORE_STATE_DIR", self.state_dir())
            .env("IMGSTORE_CACHE_DIR", self.path("cache"));
        c
    }
    /// Where clients of this test record the server repositories they
    /// have seen (`known-repos.json`): never the user's own record, and
    /// never another test's (whose server may have had the same port).
    pub fn state_dir(&self) -> PathBuf {
        self.path("state")
    }
    /// Runs imgstore with `-r repo` and `args`.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run imgstore")
    }
    /// Runs and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "imgstore {args:?} failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }
    /// Runs and asserts a one-line error containing `needle`; returns stderr.
    pub fn fails(&self, args: &[&str], needle: &str) -> String {
        let o = self.run(args);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(
            !o.status.success(),
            "imgstore {args:?} should fail; stderr: {err}"
        );
        assert!(
            err.contains(needle),
            "imgstore {args:?}: expected {needle:?} in {err:?}"
        );
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "error must be one line: {err:?}"
        );
        assert!(!err.contains("panicked"), "{err}");
        err
    }
    pub fn init(&self) {
        self.ok(&["init"]);
    }
    /// Backs up `path` with extra args; returns the JSON report.
    pub fn backup(&self, path: &Path, extra: &[&str]) -> serde_json::Value {
        let mut args = vec!["backup", path.to_str().unwrap(), "--json"];
        args.extend_from_slice(extra);
        serde_json::from_str(&self.ok(&args)).unwrap()
    }
}

/// Where test scratch space lives (a real disk file system, so sparse files
/// and SEEK_DATA behave as in production). `IMGSTORE_TEST_DIR` overrides.
pub fn scratch() -> PathBuf {
    std::env::var_os("IMGSTORE_TEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}

/// Deterministic pseudo-random bytes (xorshift64*, the chunker's golden
/// generator); an even seed is made odd (0 would give only zeros).
pub fn seeded(len: usize, s: u64) -> Vec<u8> {
    imgstore_chunker::testing::seeded(len, s | 1)
}

/// Text-like compressible bytes.
pub fn texty(len: usize, seed: u64) -> Vec<u8> {
    let words = [
        "disk",
        "image",
        "block",
        "sector",
        "inode",
        "extent",
        "journal",
        "superblock",
        "\n",
    ];
    let r = seeded(len / 4 + 8, seed);
    let mut out = Vec::with_capacity(len + 16);
    let mut i = 0;
    while out.len() < len {
        out.extend_from_slice(words[r[i % r.len()] as usize % words.len()].as_bytes());
        out.push(b' ');
        i += 1;
    }
    out.truncate(len);
    out
}

/// Fills `dir` with a small tree of files: binaries, text, a large file.
pub fn populate(dir: &Path, seed: u64) {
    fs::create_dir_all(dir.join("bin")).unwrap();
    fs::create_dir_all(dir.join("doc")).unwrap();
    for i in 0..12u64 {
        fs::write(
            dir.join("bin").join(format!("prog{i}")),
            seeded(40_000 + (i as usize) * 9_000, seed + i),
        )
        .unwrap();
        fs::write(
            dir.join("doc").join(format!("page{i}.txt")),
            texty(30_000 + (i as usize) * 5_000, seed * 7 + i),
        )
        .unwrap();
    }
    fs::write(dir.join("large.bin"), seeded(3 << 20, seed ^ 0xdead)).unwrap();
}

pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn sh(cmd: &mut Command) {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `mkfs.ext4 -d DIR` into a sparse image of `size_mb` MiB.
pub fn mkfs_ext4(img: &Path, dir: &Path, size_mb: u64) {
    let _ = fs::remove_file(img);
    sh(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "root_owner=0:0", "-d"])
        .arg(dir)
        .arg(img)
        .arg(format!("{size_mb}M")));
}

/// Changes an ext4 image in place, as a running VM would: writes `files`
/// (host path → name in the root directory) and removes `remove`.
pub fn debugfs_edit(img: &Path, files: &[(&Path, &str)], remove: &[&str]) {
    let mut script = String::new();
    for (src, name) in files {
        script.push_str(&format!("write {} {}\n", src.display(), name));
    }
    for r in remove {
        script.push_str(&format!("rm {r}\n"));
    }
    let cmds = img.with_extension("debugfs");
    fs::write(&cmds, script).unwrap();
    sh(Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&cmds)
        .arg(img));
}

/// Generation `g` of an ext4 image changed in place: writes `new{g}.bin`
/// (`bin_len` random bytes) and `{text}{g}.txt` (`bin_len / 3` bytes of
/// text), removes `remove`, and returns a copy of the image as `gen{g}.img`.
pub fn next_generation(
    env: &Env,
    img: &Path,
    g: u64,
    bin_len: usize,
    seed: u64,
    text: &str,
    remove: &str,
) -> PathBuf {
    let f = env.path(&format!("new{g}.bin"));
    fs::write(&f, seeded(bin_len, seed + g)).unwrap();
    let t = env.path(&format!("{text}{g}.txt"));
    fs::write(&t, texty(bin_len / 3, seed + 100 + g)).unwrap();
    debugfs_edit(
        img,
        &[
            (&f, &format!("new{g}.bin")),
            (&t, &format!("{text}{g}.txt")),
        ],
        &[remove],
    );
    let copy = env.path(&format!("gen{g}.img"));
    fs::copy(img, &copy).unwrap();
    copy
}

/// An ISO 9660 image of `dir`.
pub fn mkiso(iso: &Path, dir: &Path) {
    sh(Command::new("xorriso")
        .args(["-as", "mkisofs", "-quiet", "-r", "-V", "TEST", "-o"])
        .arg(iso)
        .arg(dir));
}

/// Asserts two files are byte-identical (comparing in 1 MiB pieces).
pub fn assert_same(a: &Path, b: &Path) {
    let (x, y) = (fs::read(a).unwrap(), fs::read(b).unwrap());
    assert_eq!(
        x.len(),
        y.len(),
        "{} and {} differ in size",
        a.display(),
        b.display()
    );
    if let Some(pos) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!("{} and {} differ at byte {pos}", a.display(), b.display());
    }
}

/// Bytes actually allocated on disk for a file.
pub fn allocated(p: &Path) -> u64 {
    fs::metadata(p).unwrap().blocks() * 512
}

/// An ext4 image of a populated tree and two later generations.
pub fn ext4_generations(env: &Env) -> Vec<PathBuf> {
    let tree = env.path("tree");
    populate(&tree, 5);
    let img = env.path("disk.img");
    mkfs_ext4(&img, &tree, 48);
    let gen0 = env.path("gen0.img");
    fs::copy(&img, &gen0).unwrap();
    let gen1 = next_generation(env, &img, 1, 700_000, 40, "notes", "bin/prog3");
    let gen2 = next_generation(env, &img, 2, 500_000, 41, "log", "doc/page2.txt");
    vec![gen0, gen1, gen2]
}

/// Serves `snapshot` over NBD with `cmd` (imgstore with its repository
/// and credentials set) on a socket in `dir`, copies the export with the
/// real `nbdcopy`, and asserts the copy equals `expect`. Skipped when
/// nbdcopy is absent.
pub fn nbd_round_trip(mut cmd: std::process::Command, dir: &Path, snapshot: &str, expect: &Path) {
    if !have("nbdcopy") {
        return;
    }
    let sock = dir.join("nbd.sock");
    let mut nbd = cmd
        .args(["serve", snapshot, "--socket", sock.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !sock.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let copy = dir.join("nbd-copy.img");
    let st = Command::new("nbdcopy")
        .arg(format!("nbd+unix:///?socket={}", sock.display()))
        .arg(&copy)
        .status()
        .unwrap();
    let _ = nbd.kill();
    let _ = nbd.wait();
    assert!(st.success(), "nbdcopy failed");
    assert_same(&copy, expect);
}

/// Mounts `snapshot` with `cmd` under `dir/mnt`, reads its image file
/// through the kernel's FUSE client, unmounts, and asserts it equals
/// `expect`. Skipped when FUSE is not available.
pub fn fuse_round_trip(mut cmd: std::process::Command, dir: &Path, snapshot: &str, expect: &Path) {
    if !Path::new("/dev/fuse").exists() || !have("fusermount3") {
        return;
    }
    let mnt = dir.join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let mut m = cmd
        .args(["mount", mnt.to_str().unwrap(), snapshot])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !mnt.join("by-id").is_dir() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let file = fs::read_dir(mnt.join("by-id"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let same = fs::read(&file).unwrap() == fs::read(expect).unwrap();
    let _ = Command::new("fusermount3").arg("-u").arg(&mnt).status();
    let _ = m.kill();
    let _ = m.wait();
    assert!(
        same,
        "the FUSE file of snapshot {snapshot} differs from the image"
    );
}

/// `kept` cut into `piece`-byte pieces, each followed by as many random
/// bytes: backed up before `kept`, its chunks share blob files (or packs)
/// with `kept`'s, and forgetting it leaves those half garbage, so gc
/// rewrites (or repacks) them.
pub fn interleaved_with_garbage(kept: &[u8], piece: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 * kept.len());
    for (k, p) in kept.chunks(piece).enumerate() {
        out.extend_from_slice(p);
        out.extend(seeded(piece, seed + k as u64));
    }
    out
}
