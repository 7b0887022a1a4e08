//! `backup` and `restore` of real ext4 and ISO images, several generations.

use std::fs;
use std::io::Write;
use std::process::{Command, Stdio};

use crate::util::*;

fn restore_and_compare(env: &Env, id: &str, source: &std::path::Path, out: &str) {
    let target = env.path(out);
    env.ok(&["restore", id, target.to_str().unwrap()]);
    assert_same(source, &target);
}

#[test]
fn ext4_generations_deduplicate_and_restore_exactly_and_sparse() {
    if !have("mkfs.ext4") || !have("debugfs") {
        eprintln!("SKIP: e2fsprogs (mkfs.ext4, debugfs) not installed");
        return;
    }
    let env = Env::new();
    env.init();
    let tree = env.path("tree");
    populate(&tree, 1);
    let img = env.path("disk.img");
    mkfs_ext4(&img, &tree, 96);

    let mut gens = Vec::new();
    // Generation 0: the file system as made.
    let g0 = env.path("gen0.img");
    fs::copy(&img, &g0).unwrap();
    let r0 = env.backup(&img, &["--name", "vm"]);
    gens.push((r0["id"].as_str().unwrap().to_string(), g0));
    // Generations 1 and 2: files written and removed in place.
    for g in 1..3u64 {
        let copy = next_generation(&env, &img, g, 600_000, 100, "log", &format!("bin/prog{g}"));
        let r = env.backup(&img, &["--name", "vm", "--tag", &format!("g{g}")]);
        // An in-place change of ~1 MiB adds a small fraction of what is allocated.
        let allocated_bytes = allocated(&img);
        let added = r["new_bytes"].as_u64().unwrap();
        assert!(
            added * 4 < allocated_bytes,
            "generation {g} added {added} bytes of {allocated_bytes} allocated"
        );
        assert!(r["new_chunks"].as_u64().unwrap() < r["chunks"].as_u64().unwrap() / 3);
        gens.push((r["id"].as_str().unwrap().to_string(), copy));
    }
    // Re-backup of an unchanged image adds (almost) nothing: only an index page.
    let again = env.backup(&img, &["--name", "vm"]);
    assert_eq!(again["new_chunks"].as_u64().unwrap(), 0);
    assert!(again["new_bytes"].as_u64().unwrap() < 64 * 1024, "{again}");

    for (i, (id, src)) in gens.iter().enumerate() {
        let out = format!("restored{i}.img");
        restore_and_compare(&env, id, src, &out);
        let restored = env.path(&out);
        // Zeros come back as holes: far less allocated than the image size.
        let size = fs::metadata(&restored).unwrap().len();
        assert!(
            allocated(&restored) < size / 2,
            "restored image is not sparse: {} of {size}",
            allocated(&restored)
        );
        // The recorded digest is plain BLAKE3 of the image (what b3sum prints).
        let json: serde_json::Value =
            serde_json::from_str(&env.ok(&["snapshots", "--json"])).unwrap();
        let snap = json
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id.as_str())
            .unwrap();
        assert_eq!(
            snap["digest"].as_str().unwrap(),
            blake3::hash(&fs::read(src).unwrap()).to_hex().as_str()
        );
    }
}

#[test]
fn iso_images_deduplicate_across_images() {
    if !have("xorriso") {
        eprintln!("SKIP: xorriso not installed");
        return;
    }
    let env = Env::new();
    env.init();
    let tree = env.path("tree");
    populate(&tree, 5);
    let a = env.path("a.iso");
    mkiso(&a, &tree);
    fs::write(tree.join("REVISION"), texty(5000, 9)).unwrap();
    fs::remove_file(tree.join("doc/page3.txt")).unwrap();
    let b = env.path("b.iso");
    mkiso(&b, &tree);
    let ra = env.backup(&a, &[]);
    assert_eq!(ra["name"], "a.iso");
    let rb = env.backup(&b, &[]);
    let size_b = fs::metadata(&b).unwrap().len();
    // A different image with mostly the same files shares most chunks.
    assert!(
        rb["new_bytes"].as_u64().unwrap() < size_b / 3,
        "second ISO added {} of {size_b}",
        rb["new_bytes"]
    );
    restore_and_compare(&env, ra["id"].as_str().unwrap(), &a, "a.out");
    restore_and_compare(&env, &rb["short_id"].as_str().unwrap()[..8], &b, "b.out");
}

#[test]
fn stdin_backup_and_stdout_restore() {
    let env = Env::new();
    env.init();
    let mut data = seeded(5 << 20, 3);
    data[(1 << 20)..(3 << 20)].fill(0);
    let mut child = env
        .command()
        .args(["backup", "-", "--name", "stream", "--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&data).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["size"].as_u64().unwrap(), data.len() as u64);
    assert_eq!(r["zero_bytes"].as_u64().unwrap(), 2 << 20);
    let o = env
        .command()
        .args(["restore", "latest", "-"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.stdout == data, "stdout restore differs");
}

#[test]
fn restore_to_block_device_writes_real_zeros() {
    let env = Env::new();
    env.init();
    let mut data = seeded(3 << 20, 21);
    data[(1 << 20)..(2 << 20)].fill(0);
    let img = env.path("small.img");
    fs::write(&img, &data).unwrap();
    let id = env.backup(&img, &[])["id"].as_str().unwrap().to_string();
    // A loop device over a file full of 0xff: the restore must overwrite the
    // zero range with real zeros, not skip it.
    let backing = env.path("dev.bin");
    fs::write(&backing, vec![0xffu8; 4 << 20]).unwrap();
    let lo = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&backing)
        .output();
    let dev = match lo {
        Ok(o) if o.status.success() => String::from_utf8(o.stdout).unwrap().trim().to_string(),
        _ => {
            eprintln!("SKIP: no loop devices here (needs root and the loop module)");
            return;
        }
    };
    // Without --force a device is not touched.
    let refused = env.run(&["restore", &id, &dev]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("pass --force"));
    assert!(fs::read(&backing).unwrap().iter().all(|&b| b == 0xff));
    let res = env.run(&["restore", &id, &dev, "--force"]);
    // The device itself is a backup source too (read positionally, whole size).
    let from_dev = env.run(&["backup", &dev, "--name", "loopdev", "--json"]);
    // A device smaller than the image is refused.
    let small = env.path("small-dev.bin");
    fs::write(&small, vec![0u8; 1 << 20]).unwrap();
    let lo2 = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&small)
        .output()
        .unwrap();
    let dev2 = String::from_utf8(lo2.stdout).unwrap().trim().to_string();
    let res2 = env.run(&["restore", &id, &dev2, "--force"]);
    let _ = Command::new("losetup").args(["-d", &dev, &dev2]).status();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let dev_bytes = fs::read(&backing).unwrap();
    assert!(
        dev_bytes[..data.len()] == data[..],
        "device content differs from the image"
    );
    assert!(
        dev_bytes[data.len()..].iter().all(|&b| b == 0xff),
        "bytes past the image were touched"
    );
    assert!(!res2.status.success());
    assert!(String::from_utf8_lossy(&res2.stderr).contains("smaller than"));
    assert!(
        from_dev.status.success(),
        "{}",
        String::from_utf8_lossy(&from_dev.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&from_dev.stdout).unwrap();
    assert_eq!(r["size"].as_u64().unwrap(), 4 << 20);
    let dev_copy = env.path("dev-copy.img");
    fs::write(&dev_copy, &dev_bytes).unwrap();
    restore_and_compare(
        &env,
        r["id"].as_str().unwrap(),
        &dev_copy,
        "dev-restored.img",
    );
}

#[test]
fn empty_image_round_trips() {
    let env = Env::new();
    env.init();
    let img = env.path("empty.img");
    fs::write(&img, b"").unwrap();
    // Empty is usually a failed pipeline: refused unless asked for.
    env.fails(&["backup", img.to_str().unwrap()], "--allow-empty");
    assert!(env.ok(&["snapshots"]).contains("0 snapshots"));
    let r = env.backup(&img, &["--allow-empty"]);
    assert_eq!(r["size"], 0);
    assert_eq!(
        r["digest"].as_str().unwrap(),
        blake3::hash(b"").to_hex().as_str()
    );
    restore_and_compare(&env, r["id"].as_str().unwrap(), &img, "empty.out");
}
