//! `mount`: snapshots as files in a FUSE file system, read by real tools
//! (cmp, SEEK_HOLE, a read-only loop mount of the ext4 inside).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::*;

fn mounted(p: &Path) -> bool {
    fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(p.to_str().unwrap()))
}

fn wait_for(what: &str, f: impl FnMut() -> bool) {
    wait_up_to(20, what, f)
}

/// Polls `f` until it holds, failing after `secs` seconds.
fn wait_up_to(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Mounted(Child, PathBuf);
impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.1)
            .stderr(Stdio::null())
            .status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(env: &Env, mnt: &Path) -> Mounted {
    fs::create_dir_all(mnt).unwrap();
    let child = env
        .command()
        .arg("mount")
        .arg(mnt)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let m = Mounted(child, mnt.to_path_buf());
    wait_for("the mount", || mnt.join("by-id").is_dir());
    m
}

#[test]
fn mounted_snapshot_files_match_and_the_ext4_inside_mounts() {
    if !Path::new("/dev/fuse").exists() || !have("fusermount3") || !have("mkfs.ext4") {
        eprintln!("SKIP: needs /dev/fuse, fusermount3 (fuse3) and e2fsprogs");
        return;
    }
    let env = Env::new();
    env.init();
    let tree = env.path("tree");
    populate(&tree, 11);
    let img = env.path("disk.img");
    mkfs_ext4(&img, &tree, 48);
    let id = env.backup(&img, &["--name", "vm"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mnt = env.path("mnt");
    let mut m = start(&env, &mnt);

    let by_id = mnt.join("by-id").join(format!("{id}.img"));
    assert_same(&img, &by_id);
    let names: Vec<_> = fs::read_dir(mnt.join("by-name/vm"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(names.len(), 1);
    assert_same(&img, &names[0]);
    // SEEK_HOLE / SEEK_DATA report the zero extents.
    let f = fs::File::open(&by_id).unwrap();
    let size = f.metadata().unwrap().len();
    let hole = rustix::fs::seek(&f, rustix::fs::SeekFrom::Hole(0)).unwrap();
    assert!(hole < size, "no hole reported in a mostly empty ext4 image");
    let data = rustix::fs::seek(&f, rustix::fs::SeekFrom::Data(hole)).unwrap();
    assert!(data > hole && data < size);
    let src = fs::read(&img).unwrap();
    assert!(src[hole as usize..data as usize].iter().all(|&b| b == 0));
    // Writes are refused.
    assert!(fs::OpenOptions::new().write(true).open(&by_id).is_err());
    // The ext4 inside mounts read-only through a loop device and reads back.
    let inner = env.path("inner");
    fs::create_dir_all(&inner).unwrap();
    let st = Command::new("mount")
        .args(["-o", "ro,loop"])
        .arg(&by_id)
        .arg(&inner)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    if st.success() {
        let got = fs::read(inner.join("large.bin"));
        let _ = Command::new("umount").arg(&inner).status();
        assert_eq!(got.unwrap(), fs::read(tree.join("large.bin")).unwrap());
    } else {
        eprintln!("SKIP loop mount part: no loop devices here");
    }
    // fusermount3 -u ends the server cleanly (retried while the loop
    // device detaches asynchronously).
    drop(f);
    wait_for("fusermount3 -u", || {
        Command::new("fusermount3")
            .arg("-u")
            .arg(&mnt)
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    });
    let status = m.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!mounted(&mnt));

    // Ctrl-C unmounts and ends the command with success.
    let mut m2 = start_logged(&env, &mnt);
    signal(&m2, "INT");
    let status = exit_within(&mut m2, 30);
    assert!(status.success(), "{status:?}");
    assert!(!mounted(&mnt));
    assert!(log_of(&m2).contains("unmounted"), "{}", log_of(&m2));

    // SIGTERM with a file open in the tree: the tree leaves the namespace
    // at once, the open file stays readable, and the command ends once it
    // is closed.
    let mut m3 = start_logged(&env, &mnt);
    let mut open = fs::File::open(&by_id).unwrap();
    signal(&m3, "TERM");
    wait_for("the lazy unmount", || !mounted(&mnt));
    let mut back = Vec::new();
    std::io::Read::read_to_end(&mut open, &mut back).unwrap();
    assert!(
        back == src,
        "the open file read back differently after SIGTERM"
    );
    drop(open);
    let status = exit_within(&mut m3, 30);
    assert!(status.success(), "{status:?}: {}", log_of(&m3));
    assert!(log_of(&m3).contains("unmounted"), "{}", log_of(&m3));
}

/// A mount whose standard error goes to a file beside the mount point.
fn start_logged(env: &Env, mnt: &Path) -> Mounted {
    fs::create_dir_all(mnt).unwrap();
    let log = fs::File::create(mnt.with_extension("log")).unwrap();
    let child = env
        .command()
        .arg("mount")
        .arg(mnt)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let m = Mounted(child, mnt.to_path_buf());
    wait_for("the mount", || mnt.join("by-id").is_dir());
    m
}

fn log_of(m: &Mounted) -> String {
    fs::read_to_string(m.1.with_extension("log")).unwrap()
}

fn signal(m: &Mounted, name: &str) {
    assert!(Command::new("kill")
        .args([&format!("-{name}"), &m.0.id().to_string()])
        .status()
        .unwrap()
        .success());
}

/// Waits for the mount command to exit; fails after `secs` seconds.
fn exit_within(m: &mut Mounted, secs: u64) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(status) = m.0.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the mount command did not exit within {secs} s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn same_second_snapshots_get_distinct_files_and_a_full_directory_is_refused() {
    if !Path::new("/dev/fuse").exists() || !have("fusermount3") {
        eprintln!("SKIP: needs /dev/fuse and fusermount3 (fuse3)");
        return;
    }
    let env = Env::new();
    env.init();
    let img = env.path("d.img");
    let mut ids = Vec::new();
    // Backups of a tiny image take milliseconds: several land in one
    // second (the loop stops once two share a second's file name).
    let mut same_second = false;
    for seed in 0..20u64 {
        fs::write(&img, seeded(50_000, seed)).unwrap();
        let r = env.backup(&img, &["--name", "vm"]);
        ids.push(r["id"].as_str().unwrap().to_string());
        let times: Vec<String> =
            serde_json::from_str::<serde_json::Value>(&env.ok(&["snapshots", "--json"]))
                .unwrap()
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["time"].as_str().unwrap().to_string())
                .collect();
        let mut dedup = times.clone();
        dedup.dedup();
        if dedup.len() < times.len() {
            same_second = true;
            break;
        }
    }
    assert!(same_second, "no two backups in one second");

    // A non-empty mount point is refused (its files would be hidden).
    let full = env.path("full");
    fs::create_dir_all(&full).unwrap();
    fs::write(full.join("keep.txt"), b"x").unwrap();
    env.fails(&["mount", full.to_str().unwrap()], "is not empty");

    let mnt = env.path("mnt");
    let _m = start(&env, &mnt);
    let files: Vec<String> = fs::read_dir(mnt.join("by-name/vm"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files.len(), ids.len(), "one file per snapshot: {files:?}");
    for id in &ids {
        assert!(mnt.join("by-id").join(format!("{id}.img")).exists());
    }
    assert!(
        files
            .iter()
            .any(|f| ids.iter().any(|id| f.contains(&id[..8]))),
        "the same-second ones carry their short ids: {files:?}"
    );
}
