//! `check`, `verify`, healing, and the failures a backup tool must survive:
//! flipped bytes anywhere in the repository, kill -9 at random points, a
//! full disk, a source that shrinks mid-backup, foreign ownership.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::util::*;

/// Runs `check ARGS --json`; returns (exit success, report or Null if the
/// repository could not be read at all, stderr).
fn check(env: &Env, args: &[&str]) -> (bool, serde_json::Value, String) {
    let mut a = vec!["check", "--json"];
    a.extend_from_slice(args);
    let o = env.run(&a);
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!stderr.contains("panicked"), "{stderr}");
    let v = serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null);
    (o.status.success(), v, stderr)
}

/// Blob files of the repository, oldest first.
fn blob_files(repo: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(repo.join("db"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "blob"))
        .collect();
    v.sort();
    v
}

fn flip(path: &Path, offset: u64, mask: u8) {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= mask;
    f.write_all_at(&b, offset).unwrap();
}

fn snapshot_count(env: &Env) -> usize {
    let v: serde_json::Value = serde_json::from_str(&env.ok(&["snapshots", "--json"])).unwrap();
    v.as_array().unwrap().len()
}

#[test]
fn flipped_chunk_is_found_refused_mapped_and_healed_by_the_next_backup() {
    let env = Env::new();
    env.init();
    let a = env.path("a.img");
    fs::write(&a, seeded(24 << 20, 71)).unwrap();
    let b = env.path("b.img");
    let mut bd = texty(6 << 20, 72);
    bd.extend(vec![0u8; 2 << 20]);
    fs::write(&b, &bd).unwrap();
    let id_a = env.backup(&a, &[])["id"].as_str().unwrap().to_string();
    let id_b = env.backup(&b, &[])["id"].as_str().unwrap().to_string();
    let (ok, v, _) = check(&env, &["--read-data"]);
    assert!(ok && v["clean"] == true, "{v}");

    // a.img's chunks were flushed into the first blob file by its commit.
    let blob = &blob_files(&env.repo())[0];
    let len = fs::metadata(blob).unwrap().len();
    flip(blob, len / 2, 0x40);

    let (ok, v, err) = check(&env, &["--read-data"]);
    assert!(!ok, "check must fail on a flipped chunk: {v}");
    assert!(err.contains("1 of 2 snapshots damaged"), "{err}");
    let damaged = v["damaged_snapshots"].as_array().unwrap();
    assert_eq!(damaged.len(), 1, "{v}");
    assert_eq!(damaged[0]["id"], id_a.as_str());
    let range = &damaged[0]["ranges"][0];
    let (off, rlen) = (
        range["offset"].as_u64().unwrap(),
        range["length"].as_u64().unwrap(),
    );
    assert!(rlen > 0 && off + rlen <= 24 << 20, "{range}");
    let problems = v["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{v}");
    assert_eq!(problems[0]["kind"], "chunk");
    let chunk = problems[0]["id"].as_str().unwrap().to_string();

    // Restore refuses, naming snapshot, byte offset and chunk; leaves no file.
    let out = env.path("a-out.img");
    let err = env.fails(&["restore", &id_a, out.to_str().unwrap()], "is damaged");
    assert!(
        err.contains(&chunk) && err.contains(&format!("at byte {off}")),
        "{err}"
    );
    assert!(err.contains(&id_a[..8]), "{err}");
    assert!(!out.exists());
    assert!(fs::read_dir(env.dir.path()).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains("partial")));
    let err = env.fails(&["verify", &id_a], "is damaged");
    assert!(err.contains(&chunk), "{err}");
    // The unaffected snapshot still restores exactly.
    let out_b = env.path("b-out.img");
    env.ok(&["restore", &id_b, out_b.to_str().unwrap()]);
    assert_same(&b, &out_b);
    // The damage is remembered: even a structure-only check reports it.
    let (ok, v, _) = check(&env, &[]);
    assert!(
        !ok && v["problems"][0]["what"]
            .as_str()
            .unwrap()
            .contains("marked damaged"),
        "{v}"
    );

    // Backing up the same data again rewrites the damaged chunk.
    let r = env.backup(&a, &[]);
    assert_eq!(r["repaired_objects"], 1, "{r}");
    let (ok, v, _) = check(&env, &["--read-data"]);
    assert!(ok && v["clean"] == true, "after repair: {v}");
    let _ = fs::remove_file(&out);
    env.ok(&["restore", &id_a, out.to_str().unwrap()]);
    assert_same(&a, &out);
    env.ok(&["verify", "--all"]);
}

/// Flips random bytes in random repository files (one flip per copy of the
/// repository): whatever is hit, no command panics, a restore is either
/// byte-exact or an error, and a clean `check --read-data` guarantees every
/// snapshot restores exactly.
#[test]
fn random_corruption_is_detected_or_harmless_never_wrong_data() {
    let env = Env::new();
    env.init();
    let mut images = Vec::new();
    for (i, data) in [
        [texty(3 << 20, 81), seeded(3 << 20, 82)].concat(),
        [seeded(2 << 20, 83), vec![0; 1 << 20], texty(2 << 20, 84)].concat(),
    ]
    .iter()
    .enumerate()
    {
        let p = env.path(&format!("img{i}.img"));
        fs::write(&p, data).unwrap();
        let id = env.backup(&p, &[])["id"].as_str().unwrap().to_string();
        images.push((id, p));
    }
    let repo = env.repo();
    let mut files: Vec<PathBuf> = fs::read_dir(repo.join("db"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().to_string();
            fs::metadata(p).unwrap().len() > 0
                && !(n.starts_with("LOG") || n.starts_with("OPTIONS") || n == "LOCK")
        })
        .collect();
    files.push(repo.join("imgstore.json"));
    files.sort();
    let rng = seeded(4096, 85);
    let trials = 48;
    let (mut detected, mut harmless) = (0, 0);
    let mut by_type: std::collections::BTreeMap<String, (u32, u32)> = Default::default();
    for t in 0..trials {
        let r = |k: usize| {
            u64::from_le_bytes(
                rng[(t * 3 + k) * 8..(t * 3 + k) * 8 + 8]
                    .try_into()
                    .unwrap(),
            )
        };
        let file = &files[(r(0) % files.len() as u64) as usize];
        let copy = env.path(&format!("trial{t}"));
        let st = Command::new("cp")
            .arg("-a")
            .arg(&repo)
            .arg(&copy)
            .status()
            .unwrap();
        assert!(st.success());
        let target = copy.join(file.strip_prefix(&repo).unwrap());
        let len = fs::metadata(&target).unwrap().len();
        flip(&target, r(1) % len, 1 << (r(2) % 8));
        let trial = Env {
            dir: tempfile::Builder::new().tempdir_in(env.dir.path()).unwrap(),
        };
        fs::rename(&copy, trial.repo()).unwrap();
        let (clean, _, _) = check(&trial, &["--read-data"]);
        let mut all_restored = true;
        for (id, src) in &images {
            let out = trial.path("out.img");
            let _ = fs::remove_file(&out);
            let o = trial.run(&["restore", id, out.to_str().unwrap()]);
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                !err.contains("panicked") && matches!(o.status.code(), Some(0 | 1 | 3 | 5)),
                "flip in {}: {:?} {err}",
                file.display(),
                o.status
            );
            if o.status.success() {
                assert_same(src, &out);
            } else {
                assert_eq!(err.trim_end().lines().count(), 1, "{err}");
                all_restored = false;
            }
        }
        assert!(
            !clean || all_restored,
            "check was clean but a restore failed after flipping {}",
            file.display()
        );
        let kind = file
            .extension()
            .map(|e| e.to_string_lossy().to_string())
            .unwrap_or_else(|| {
                file.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .split('-')
                    .next()
                    .unwrap()
                    .to_string()
            });
        let e = by_type.entry(kind).or_default();
        e.0 += 1;
        if clean {
            harmless += 1;
        } else {
            detected += 1;
            e.1 += 1;
        }
    }
    eprintln!(
        "corruption trials: {trials}, detected by check: {detected}, harmless (check clean, every restore exact): {harmless}; by file (flips, detected): {by_type:?}"
    );
    assert!(detected > 0);
}

#[test]
fn kill_9_at_random_points_loses_nothing_and_gc_leaves_a_clean_repository() {
    let env = Env::new();
    env.init();
    let base = env.path("base.img");
    fs::write(&base, seeded(3 << 20, 90)).unwrap();
    env.backup(&base, &[]);
    let big = env.path("big.img");
    let mut data = texty(24 << 20, 91);
    data.extend(seeded(24 << 20, 92));
    fs::write(&big, &data).unwrap();
    drop(data);
    let delays = seeded(64, 93);
    let (mut killed, mut finished) = (0, 0);
    for i in 0..14 {
        let delay = u16::from_le_bytes([delays[2 * i], delays[2 * i + 1]]) as u64 % 900;
        let before = snapshot_count(&env);
        let mut child = env
            .command()
            .args(["backup", big.to_str().unwrap(), "--tag", &format!("run{i}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay));
        let _ = child.kill();
        if child.wait().unwrap().success() {
            finished += 1;
            assert_eq!(snapshot_count(&env), before + 1);
        } else {
            killed += 1;
            // Killed before its commit: no snapshot. Killed between the
            // commit and exit: the whole snapshot, which must verify.
            let after = snapshot_count(&env);
            assert!(
                after == before || after == before + 1,
                "kill at {delay} ms: {before} -> {after} snapshots"
            );
        }
        env.ok(&["verify", "--all"]);
    }
    eprintln!("kill -9 runs: {killed} killed mid-backup, {finished} completed first");
    assert!(killed > 0);
    let id = env.backup(&big, &[])["id"].as_str().unwrap().to_string();
    env.ok(&["gc"]);
    let (ok, v, _) = check(&env, &["--read-data"]);
    assert!(ok, "{v}");
    assert_eq!(v["orphans"], 0, "{v}");
    env.ok(&["verify", "--all"]);
    let out = env.path("out.img");
    env.ok(&["restore", &id, out.to_str().unwrap()]);
    assert_same(&big, &out);
}

/// Unmounts on drop.
struct Mount(PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn disk_full_during_backup_is_a_clear_error_and_gc_reclaims_the_partial_work() {
    let env = Env::new();
    let mnt = env.path("small-fs");
    fs::create_dir(&mnt).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=40M", "tmpfs"])
        .arg(&mnt)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIP disk_full: cannot mount a 40 MiB tmpfs here (needs root)");
        return;
    }
    let _guard = Mount(mnt.clone());
    let repo = mnt.join("repo");
    let run = |args: &[&str]| {
        Command::new(BIN)
            .arg("-r")
            .arg(&repo)
            .args(args)
            .output()
            .unwrap()
    };
    assert!(run(&["init"]).status.success());
    let small = env.path("small.img");
    fs::write(&small, seeded(6 << 20, 95)).unwrap();
    assert!(run(&["backup", small.to_str().unwrap()]).status.success());
    let big = env.path("big.img");
    fs::write(&big, seeded(64 << 20, 96)).unwrap();
    let o = run(&["backup", big.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("no space left") && err.contains("earlier snapshots are intact"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let used = |p: &Path| {
        let o = Command::new("df")
            .arg("--output=used")
            .arg("-B1")
            .arg(p)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .nth(1)
            .unwrap()
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    let full = used(&mnt);
    // The repository opens, lists and restores what it had.
    let o = run(&["snapshots", "--json"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    let out = env.path("small-out.img");
    assert!(run(&["restore", "latest", out.to_str().unwrap()])
        .status
        .success());
    assert_same(&small, &out);
    // gc gives the partial work back; the repository checks clean and works.
    let o = run(&["gc"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let after = used(&mnt);
    assert!(
        after + (8 << 20) < full,
        "gc reclaimed too little: {full} -> {after}"
    );
    let o = run(&["check", "--read-data"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let medium = env.path("medium.img");
    fs::write(&medium, texty(8 << 20, 97)).unwrap();
    assert!(run(&["backup", medium.to_str().unwrap()]).status.success());
    let out = env.path("medium-out.img");
    assert!(run(&[
        "restore",
        "latest",
        "--name",
        "medium.img",
        out.to_str().unwrap()
    ])
    .status
    .success());
    assert_same(&medium, &out);
}

#[test]
fn source_that_shrinks_mid_backup_fails_with_the_offset_and_commits_nothing() {
    let env = Env::new();
    env.init();
    let src = env.path("shrinking.img");
    {
        use std::io::Write;
        let block = seeded(1 << 20, 98);
        let mut f = fs::File::create(&src).unwrap();
        for i in 0..192u32 {
            let mut b = block.clone();
            b[..4].copy_from_slice(&i.to_le_bytes());
            f.write_all(&b).unwrap();
        }
    }
    let child = env
        .command()
        .args(["backup", src.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    // Wait until it has read 16 MiB, freeze it, shrink the file, resume it.
    let rchar = || {
        fs::read_to_string(format!("/proc/{pid}/io"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("rchar: ").map(|n| n.parse::<u64>().unwrap()))
            })
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while rchar() < 16 << 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "backup never read 16 MiB"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    let read_so_far = rchar();
    fs::OpenOptions::new()
        .write(true)
        .open(&src)
        .unwrap()
        .set_len(100 << 20)
        .unwrap();
    assert!(Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap()
        .success());
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "the backup must fail (it had read {read_so_far} bytes)"
    );
    assert!(
        err.contains("changed size") && err.contains("noticed at byte"),
        "{err}"
    );
    assert!(err.contains("no snapshot was written"), "{err}");
    assert_eq!(snapshot_count(&env), 0);
    let (ok, v, _) = check(&env, &[]);
    assert!(ok, "{v}");
}

#[test]
fn repository_is_private_and_foreign_ownership_is_a_clear_error() {
    let env = Env::new();
    env.init();
    let img = env.path("a.img");
    fs::write(&img, texty(3 << 20, 99)).unwrap();
    env.backup(&img, &[]);
    let mut stack = vec![env.repo()];
    let mut seen = 0;
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = fs::metadata(&p).unwrap();
            assert_eq!(
                m.permissions().mode() & 0o077,
                0,
                "{} is readable by others",
                p.display()
            );
            seen += 1;
            if m.is_dir() {
                stack.push(p);
            }
        }
    }
    assert!(seen > 10);
    assert_eq!(
        fs::metadata(env.repo()).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let root = Command::new("id").arg("-u").output().unwrap();
    if String::from_utf8_lossy(&root.stdout).trim() != "0" || !have("runuser") {
        eprintln!("SKIP ownership part: needs root and runuser");
        return;
    }
    // Another user: refused with the owner named.
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let o = Command::new("runuser")
        .args(["-u", "nobody", "--", BIN, "-r"])
        .arg(env.repo())
        .arg("snapshots")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("belongs to uid 0") && err.contains("run it as the owner"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    // Root writing into a user's repository would lock the user out: refused.
    let st = Command::new("chown")
        .args(["-R", "65534"])
        .arg(env.repo())
        .status()
        .unwrap();
    assert!(st.success());
    let err = env.fails(&["backup", img.to_str().unwrap()], "belongs to uid 65534");
    assert!(err.contains("runs as uid 0"), "{err}");
    assert!(
        env.ok(&["snapshots"]).contains("1 snapshot\n"),
        "reading stays allowed"
    );
}
