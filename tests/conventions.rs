//! Safety defaults and the conventions a sysadmin's shell expects (#17):
//! devices need --force and are refused while mounted, empty and endless
//! sources, a failing feeding command, the name grammar, exit codes,
//! quiet/verbose, snapshot metadata and filters, tags, completions and man
//! pages — each through the real binary.

use std::fs;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::*;

fn code(o: &std::process::Output) -> Option<i32> {
    o.status.code()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// A loop device over `backing`, or None where loop devices are unavailable.
fn loop_device(backing: &std::path::Path) -> Option<String> {
    let o = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(backing)
        .output()
        .ok()?;
    o.status
        .success()
        .then(|| String::from_utf8(o.stdout).unwrap().trim().to_string())
}

#[test]
fn a_mounted_device_is_never_overwritten() {
    let env = Env::new();
    env.init();
    let tree = env.path("tree");
    populate(&tree, 3);
    let img = env.path("small.img");
    mkfs_ext4(&img, &tree, 24);
    let id = env.backup(&img, &[])["id"].as_str().unwrap().to_string();

    // A device holding a file system, mounted read-only.
    let backing = env.path("dev.bin");
    let victim = env.path("victim");
    populate(&victim, 9);
    mkfs_ext4(&backing, &victim, 32);
    let before = fs::read(&backing).unwrap();
    let Some(dev) = loop_device(&backing) else {
        eprintln!("SKIP: no loop devices here (needs root and the loop module)");
        return;
    };
    let mnt = env.path("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-o", "ro"])
        .arg(&dev)
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    let attempts = [
        (vec!["restore", &id, &dev], "pass --force"),
        (vec!["restore", &id, &dev, "--delta"], "pass --force"),
        (vec!["restore", &id, &dev, "--force"], "is mounted at"),
        (
            vec!["restore", &id, &dev, "--delta", "--force"],
            "is mounted at",
        ),
    ];
    let mut results = Vec::new();
    for (args, needle) in &attempts {
        let o = env.run(args);
        results.push((args.clone(), *needle, code(&o), stderr(&o)));
    }
    if mounted {
        let _ = Command::new("umount").arg(&mnt).status();
    }
    let _ = Command::new("losetup").args(["-d", &dev]).status();
    assert!(mounted, "could not mount the test device");
    for (args, needle, code, err) in results {
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(
            err.contains(needle),
            "{args:?}: expected {needle:?} in {err}"
        );
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    }
    assert!(
        fs::read(&backing).unwrap() == before,
        "the mounted device was written"
    );
    // After unmounting, --force restores onto it.
    let Some(dev) = loop_device(&backing) else {
        return;
    };
    let o = env.run(&["restore", &id, &dev, "--force"]);
    let _ = Command::new("losetup").args(["-d", &dev]).status();
    assert!(o.status.success(), "{}", stderr(&o));
    let got = fs::read(&backing).unwrap();
    let want = fs::read(&img).unwrap();
    assert!(got[..want.len()] == want[..], "restored onto the device");
}

/// Zero extents restored onto a device are zeroed by the device itself (a
/// loop device, whose file then stays sparse), by plain and by delta
/// restores, and read back as zeros over the random bytes it held.
#[test]
fn zeros_restored_onto_a_device_are_zeroed_by_the_device() {
    let env = Env::new();
    env.init();
    let mut image = texty(8 << 20, 71);
    image.extend(vec![0u8; 40 << 20]);
    image.extend(seeded(8 << 20, 72));
    image.extend(vec![0u8; 8 << 20]);
    let img = env.path("thin.img");
    fs::write(&img, &image).unwrap();
    let id = env.backup(&img, &[])["id"].as_str().unwrap().to_string();
    let backing = env.path("dev.bin");
    fs::write(&backing, seeded(64 << 20, 73)).unwrap();
    let Some(dev) = loop_device(&backing) else {
        eprintln!("SKIP: no loop devices here (needs root and the loop module)");
        return;
    };
    let plain = env.run(&["restore", &id, &dev, "--force"]);
    let after_plain = (fs::read(&backing).unwrap(), allocated(&backing));
    // Random bytes over the zero extent again, through the device: the
    // delta restore must zero them.
    let dirty = fs::OpenOptions::new().write(true).open(&dev).and_then(|f| {
        use std::os::unix::fs::FileExt;
        f.write_all_at(&seeded(40 << 20, 74), 8 << 20)?;
        f.sync_all()
    });
    let delta = env.run(&["restore", &id, &dev, "--delta", "--force"]);
    let after_delta = (fs::read(&backing).unwrap(), allocated(&backing));
    let _ = Command::new("losetup").args(["-d", &dev]).status();
    assert!(plain.status.success(), "{}", stderr(&plain));
    assert!(after_plain.0 == image, "the device differs from the image");
    assert!(
        after_plain.1 < 24 << 20,
        "the device's zeros were written, not zeroed by it: {} bytes of its 64 MiB file allocated",
        after_plain.1
    );
    dirty.unwrap();
    assert!(delta.status.success(), "{}", stderr(&delta));
    assert!(
        after_delta.0 == image,
        "the delta restore left the device differing"
    );
    assert!(
        after_delta.1 < 24 << 20,
        "the delta restore wrote its zeros: {} bytes allocated",
        after_delta.1
    );
}

#[test]
fn empty_endless_and_blocking_sources_are_refused_quickly() {
    let env = Env::new();
    env.init();
    // An empty pipe: the classic failed `dd | imgstore backup -`.
    let o = env
        .command()
        .args(["backup", "-", "--name", "x"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(code(&o), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("--allow-empty"), "{}", stderr(&o));

    let fifo = env.path("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    for (path, needle) in [
        ("/dev/null", "character device"),
        ("/dev/zero", "character device"),
        (fifo.to_str().unwrap(), "FIFO"),
    ] {
        let started = Instant::now();
        let mut child = env
            .command()
            .args(["backup", path])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Bounded: a source that is read for ever or blocks in open fails this.
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if started.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                panic!("backup {path} did not return");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let o = child.wait_with_output().unwrap();
        assert_eq!(status.code(), Some(1), "{path}");
        assert!(stderr(&o).contains(needle), "{path}: {}", stderr(&o));
    }
    assert!(env.ok(&["snapshots"]).contains("0 snapshots"));
    // With --allow-empty an empty stream is kept on purpose.
    let o = env
        .command()
        .args(["backup", "-", "--name", "empty", "--allow-empty"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn stdin_from_command_exit_status_decides() {
    let env = Env::new();
    env.init();
    let data = env.path("data.bin");
    fs::write(&data, seeded(3 << 20, 12)).unwrap();
    let ok = env.run(&[
        "backup",
        "--stdin-from-command",
        "--name",
        "dumped",
        "--json",
        "--",
        "cat",
        data.to_str().unwrap(),
    ]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    let r: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(r["size"], 3 << 20);
    assert_eq!(r["source"], "command:cat", "arguments are not recorded");
    let out = env.path("out.bin");
    env.ok(&["restore", r["id"].as_str().unwrap(), out.to_str().unwrap()]);
    assert_same(&data, &out);

    // The command writes data, then fails: no snapshot.
    let script = format!("cat {}; exit 3", data.display());
    let bad = env.run(&[
        "backup",
        "--stdin-from-command",
        "--name",
        "dumped",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    assert_eq!(code(&bad), Some(1), "{}", stderr(&bad));
    let err = stderr(&bad);
    assert!(
        err.contains("command:sh failed") && err.contains("no snapshot"),
        "{err}"
    );
    assert!(
        !err.contains("exit 3"),
        "arguments stay out of messages: {err}"
    );
    let list: serde_json::Value =
        serde_json::from_str(&env.ok(&["snapshots", "--json", "--name", "dumped"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    // A backup that fails before reading stops the command (it would
    // otherwise run on, or block, unseen).
    let started = Instant::now();
    let early = env.run(&[
        "backup",
        "--stdin-from-command",
        "--name",
        "dumped",
        "--parent",
        "abcdef123456",
        "--",
        "sleep",
        "30",
    ]);
    assert_eq!(code(&early), Some(6), "{}", stderr(&early));
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the command was waited for"
    );
    // Without a command after `--`: a usage error.
    let none = env.run(&["backup", "--stdin-from-command", "--name", "x"]);
    assert_eq!(code(&none), Some(2), "{}", stderr(&none));
}

#[test]
fn names_and_tags_follow_the_grammar_everywhere() {
    let env = Env::new();
    env.init();
    let img = env.path("ok.img");
    fs::write(&img, seeded(200_000, 4)).unwrap();
    env.backup(&img, &["--name", "vm-root.1", "--tag", "daily"]);
    let long = "n".repeat(300);
    for bad in [
        "a/b", "..", ".", "a\nb", "a\tb", &long, "x@latest", "", "a b",
    ] {
        let o = env.run(&["backup", img.to_str().unwrap(), "--name", bad]);
        assert_eq!(code(&o), Some(2), "{bad:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("is not allowed"),
            "{bad:?}: {}",
            stderr(&o)
        );
        assert_eq!(stderr(&o).trim_end().lines().count(), 1, "{bad:?}");
        for cmd in [
            vec!["snapshots", "--name", bad],
            vec!["restore", "latest", "--name", bad, "x.img"],
            vec!["forget", "--keep-last", "1", "--name", bad],
            vec!["verify", "latest", "--name", bad],
            vec!["diff", "latest", "latest", "--name", bad],
        ] {
            let o = env.run(&cmd);
            assert_eq!(code(&o), Some(2), "{cmd:?}: {}", stderr(&o));
        }
        let o = env.run(&["backup", img.to_str().unwrap(), "--tag", bad]);
        assert_eq!(code(&o), Some(2), "tag {bad:?}: {}", stderr(&o));
    }
    // A file name that is not a valid name needs --name.
    let odd = env.path("my disk.img");
    fs::write(&odd, seeded(10_000, 1)).unwrap();
    env.fails(&["backup", odd.to_str().unwrap()], "pass --name");
    assert!(env.ok(&["snapshots"]).contains("1 snapshot\n"));
}

#[test]
fn exit_codes_are_distinct_and_documented() {
    let env = Env::new();
    // 3: no repository.
    let o = env.run(&["snapshots"]);
    assert_eq!(code(&o), Some(3), "{}", stderr(&o));
    // 2: the parser's errors, one line in the program's own style.
    for args in [
        vec!["--bogus"],
        vec!["restore"],
        vec!["init", "--compression-level", "99"],
    ] {
        let o = env.run(&args);
        assert_eq!(code(&o), Some(2), "{args:?}");
        let err = stderr(&o);
        assert!(err.starts_with("imgstore: error: "), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    }
    // The missing argument and the command's help are named.
    let o = env.run(&["restore"]);
    assert!(
        stderr(&o).contains("<SNAPSHOT>") && stderr(&o).contains("imgstore restore --help"),
        "{}",
        stderr(&o)
    );
    env.init();
    // 2 again: init over an existing repository is a usage mistake.
    assert_eq!(code(&env.run(&["init"])), Some(2));
    let img = env.path("a.img");
    fs::write(&img, seeded(600_000, 8)).unwrap();
    let id = env.backup(&img, &[])["id"].as_str().unwrap().to_string();
    // 6: snapshot not found.
    assert_eq!(code(&env.run(&["restore", "abcdef12", "x.img"])), Some(6));
    assert_eq!(
        code(&env.run(&["verify", "latest", "--name", "nope"])),
        Some(6)
    );
    // 1: anything else (a missing source).
    assert_eq!(code(&env.run(&["backup", "/nonexistent.img"])), Some(1));
    // 0 / 1 for diff, like diff(1).
    assert_eq!(code(&env.run(&["diff", &id, &id])), Some(0));
    // 5: damaged data, from check and verify.
    let blob = fs::read_dir(env.repo().join("db"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "blob"))
        .expect("a blob file");
    let mut bytes = fs::read(&blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    fs::write(&blob, bytes).unwrap();
    assert_eq!(code(&env.run(&["check", "--read-data"])), Some(5));
    assert_eq!(code(&env.run(&["verify", "--all"])), Some(5));
    let o = env.run(&["restore", &id, env.path("r.img").to_str().unwrap()]);
    assert_eq!(code(&o), Some(5), "{}", stderr(&o));
    // The README documents every code.
    let readme = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    for c in [
        "| 0 |", "| 1 |", "| 2 |", "| 3 |", "| 4 |", "| 5 |", "| 6 |", "| 7 |", "| 8 |", "| 141 |",
    ] {
        assert!(readme.contains(c), "README lacks exit code {c}");
    }
}

#[test]
fn quiet_verbose_metadata_filters_and_tags() {
    let env = Env::new();
    env.init();
    let img = env.path("vm.img");
    fs::write(&img, seeded(2 << 20, 5)).unwrap();
    let q = env.run(&["-q", "backup", img.to_str().unwrap(), "--tag", "daily"]);
    assert!(q.status.success());
    assert!(q.stderr.is_empty(), "quiet: {}", stderr(&q));
    let first = String::from_utf8(q.stdout).unwrap().trim().to_string();
    let v = env.run(&["-v", "backup", img.to_str().unwrap()]);
    assert!(
        stderr(&v).contains(&format!("parent: {}", &first[..8])),
        "{}",
        stderr(&v)
    );
    let second = String::from_utf8(v.stdout).unwrap().trim().to_string();
    env.ok(&["protect", "latest", "--name", "vm.img"]);

    let list: serde_json::Value = serde_json::from_str(&env.ok(&["snapshots", "--json"])).unwrap();
    let s = list.as_array().unwrap();
    assert_eq!(s.len(), 2);
    assert_eq!(s[0]["schema_version"], 1);
    assert_eq!(s[0]["protected"], false);
    assert_eq!(s[1]["protected"], true);
    assert_eq!(s[1]["parent"], first.as_str());
    assert_eq!(s[0]["parent"], serde_json::Value::Null);
    let host = s[0]["hostname"].as_str().unwrap().to_string();
    let table = env.ok(&["snapshots"]);
    assert!(table.contains("HOST") && table.contains("PROTECTED") && table.contains(&host));

    // Filters.
    let daily = env.ok(&["snapshots", "--tag", "daily"]);
    assert!(
        daily.contains(&first[..8]) && !daily.contains(&second[..8]),
        "{daily}"
    );
    assert!(env
        .ok(&["snapshots", "--host", "no-such-host"])
        .contains("0 snapshots"));
    assert!(env
        .ok(&["snapshots", "--host", &host])
        .contains("2 snapshots"));
    // forget --tag applies the policy only to tagged snapshots.
    let plan = env.ok(&[
        "forget",
        "--keep-last",
        "1",
        "--tag",
        "nothing",
        "--dry-run",
    ]);
    assert!(plan.contains("0 snapshots would be removed"), "{plan}");

    // Tags change the id; protection and the parent link follow.
    let out = env.ok(&["tag", &second[..8], "--add", "pre-upgrade"]);
    let retagged = out.trim().to_string();
    assert_ne!(retagged, second);
    let list: serde_json::Value =
        serde_json::from_str(&env.ok(&["snapshots", "--json", "--tag", "pre-upgrade"])).unwrap();
    let s = &list.as_array().unwrap()[0];
    assert_eq!(s["id"], retagged.as_str());
    assert_eq!(s["protected"], true);
    assert_eq!(s["parent"], first.as_str());
    env.fails(
        &["tag", &retagged[..8], "--add", "bad tag"],
        "is not allowed",
    );
    env.ok(&["unprotect", &retagged[..8]]);
    env.ok(&["check", "--read-data"]);
}

#[test]
fn restore_to_a_terminal_is_refused() {
    if !have("script") {
        eprintln!("SKIP: no script(1)");
        return;
    }
    let env = Env::new();
    env.init();
    let img = env.path("t.img");
    fs::write(&img, seeded(100_000, 3)).unwrap();
    env.backup(&img, &[]);
    // script(1) gives the command a pseudo-terminal as stdout.
    let cmd = format!(
        "{BIN} -r {} restore latest -; echo \"exit=$?\"",
        env.repo().display()
    );
    let o = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("stdout is a terminal"), "{text}");
    assert!(text.contains("exit=2"), "{text}");
}

#[test]
fn completions_and_man_pages_are_generated_and_parse() {
    let env = Env::new();
    let bash = env.ok(&["completions", "bash"]);
    assert!(
        bash.contains("imgstore") && bash.contains("restore"),
        "{bash}"
    );
    let script = env.path("imgstore.bash");
    fs::write(&script, &bash).unwrap();
    let check = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", stderr(&check));
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        assert!(!env.ok(&["completions", shell]).is_empty(), "{shell}");
    }
    assert_eq!(code(&env.run(&["completions", "tcsh-9"])), Some(2));

    let man = env.ok(&["man"]);
    assert!(
        man.contains(".TH imgstore 1"),
        "{}",
        &man[..200.min(man.len())]
    );
    let dir = env.path("man1");
    env.ok(&["man", "--dir", dir.to_str().unwrap()]);
    let pages: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for p in [
        "imgstore.1",
        "imgstore-backup.1",
        "imgstore-restore.1",
        "imgstore-tag.1",
    ] {
        assert!(pages.contains(&p.to_string()), "{p} in {pages:?}");
    }
    if have("groff") {
        for p in &pages {
            let o = Command::new("groff")
                .args(["-man", "-Tutf8", "-ww", "-z"])
                .arg(dir.join(p))
                .output()
                .unwrap();
            assert!(o.status.success(), "{p}: {}", stderr(&o));
            assert!(o.stderr.is_empty(), "{p}: groff warns: {}", stderr(&o));
        }
        let mut child = Command::new("groff")
            .args(["-man", "-Tutf8"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(man.as_bytes())
            .unwrap();
        let text = String::from_utf8_lossy(&child.wait_with_output().unwrap().stdout).to_string();
        assert!(text.contains("backup"), "{text}");
        assert!(
            text.contains("Exit status"),
            "the man page documents exit codes: {text}"
        );
    }
}

#[test]
fn small_things_users_notice() {
    let env = Env::new();
    env.init();
    let img = env.path("s.img");
    fs::write(&img, seeded(300_000, 2)).unwrap();
    let id = env.backup(&img, &[])["id"].as_str().unwrap().to_string();
    // A target that cannot be created is named, not the hidden temp file.
    let err = env.fails(
        &["restore", &id, "/proc/imgstore-out.img"],
        "/proc/imgstore-out.img",
    );
    assert!(!err.contains("imgstore-partial"), "{err}");
    // stats reads as text.
    let stats = env.ok(&["stats"]);
    assert!(
        stats.contains("Deduplication:") && stats.contains("Stored bytes:"),
        "{stats}"
    );
    // Singular where there is one.
    assert!(env.ok(&["snapshots"]).ends_with("1 snapshot\n"));
    // gc reports the size after the space is back in the file system.
    fs::write(&img, seeded(300_000, 4)).unwrap();
    env.backup(&img, &[]);
    env.ok(&["forget", &id[..12]]);
    let gc: serde_json::Value = serde_json::from_str(&env.ok(&["gc", "--json"])).unwrap();
    let du = Command::new("du")
        .args(["-s", "-B1"])
        .arg(env.repo())
        .output()
        .unwrap();
    let du: u64 = String::from_utf8_lossy(&du.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let after = gc["repository_bytes_after"].as_u64().unwrap();
    // du counts the directories' own blocks too; the files are the same.
    assert!(
        du >= after && du - after <= 64 << 10,
        "gc said {after}, du says {du}"
    );
    assert!(gc["chunks_removed"].as_u64().unwrap() > 0, "{gc}");
}
