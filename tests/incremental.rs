//! Changed-block backups (`--base --changed`), `diff`, and delta restores,
//! on real ext4 generations and on images changed at known offsets.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::util::*;

/// `diff` output and ranges; its exit status is checked like `diff(1)`'s:
/// 0 when nothing differs, 1 when something does.
fn diff_ranges(env: &Env, a: &str, b: &str) -> (Vec<(u64, u64)>, String) {
    let run = |args: &[&str]| {
        let o = env.run(args);
        let out = String::from_utf8(o.stdout).unwrap();
        (
            o.status.code(),
            out,
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let (code, json, err) = run(&["diff", a, b, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {err}"));
    let ranges: Vec<(u64, u64)> = v["ranges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["offset"].as_u64().unwrap(), r["length"].as_u64().unwrap()))
        .collect();
    let want = if ranges.is_empty() { 0 } else { 1 };
    assert_eq!(code, Some(want), "diff exit status: {err}");
    assert!(err.is_empty(), "{err}");
    let (code, text, _) = run(&["diff", a, b]);
    assert_eq!(code, Some(want));
    (ranges, text)
}

fn digest_of(env: &Env, id: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(&env.ok(&["snapshots", "--json"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Three ext4 generations changed in place by debugfs; returns copies of each.
fn ext4_generations(env: &Env) -> Option<Vec<PathBuf>> {
    if !have("mkfs.ext4") || !have("debugfs") {
        eprintln!("SKIP: e2fsprogs (mkfs.ext4, debugfs) not installed");
        return None;
    }
    let tree = env.path("tree");
    populate(&tree, 3);
    let img = env.path("disk.img");
    mkfs_ext4(&img, &tree, 64);
    let mut gens = vec![env.path("gen0.img")];
    fs::copy(&img, &gens[0]).unwrap();
    for g in 1..3u64 {
        gens.push(next_generation(
            env,
            &img,
            g,
            900_000,
            300,
            "notes",
            &format!("doc/page{g}.txt"),
        ));
    }
    Some(gens)
}

/// A repository holding the ext4 generations as snapshots of `vm`:
/// (env, image copies, snapshot ids); None where e2fsprogs is missing.
fn ext4_repo() -> Option<(Env, Vec<PathBuf>, Vec<String>)> {
    let env = Env::new();
    env.init();
    let gens = ext4_generations(&env)?;
    let ids = gens
        .iter()
        .map(|g| {
            env.backup(g, &["--name", "vm"])["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    Some((env, gens, ids))
}

#[test]
fn changed_block_backup_from_diff_equals_a_full_backup_and_reads_only_the_changes() {
    let Some((env, gens, ids)) = ext4_repo() else {
        return;
    };
    for g in 1..gens.len() {
        let (ranges, text) = diff_ranges(&env, &ids[g - 1], &ids[g]);
        let changed: u64 = ranges.iter().map(|r| r.1).sum();
        let size = fs::metadata(&gens[g]).unwrap().len();
        assert!(
            changed > 0 && changed < size / 4,
            "generation {g}: {changed} of {size}"
        );
        // The text form is a change list.
        let list = env.path(&format!("changes{g}.txt"));
        fs::write(&list, text).unwrap();
        let r = env.backup(
            &gens[g],
            &[
                "--name",
                "vm",
                "--base",
                &ids[g - 1],
                "--changed",
                list.to_str().unwrap(),
            ],
        );
        // Only the listed bytes were read from the source...
        assert_eq!(r["bytes_read"].as_u64().unwrap(), changed, "{r}");
        // ...and the result is the full backup's, chunk for chunk: no new
        // chunk, no new region, no new index page, the same digest.
        assert_eq!(r["new_bytes"], 0, "{r}");
        assert_eq!(r["digest"].as_str().unwrap(), digest_of(&env, &ids[g]));
        let id = r["id"].as_str().unwrap();
        let (again, _) = diff_ranges(&env, &ids[g], id);
        assert!(again.is_empty(), "{again:?}");
        let out = env.path(&format!("out{g}.img"));
        env.ok(&["restore", id, out.to_str().unwrap()]);
        assert_same(&gens[g], &out);
    }
}

#[test]
fn dirty_range_list_backup_rechunks_exactly_and_a_lying_list_is_caught() {
    let env = Env::new();
    env.init();
    let img = env.path("vm.img");
    let mut data = texty(10 << 20, 501);
    data.extend(vec![0u8; 9 << 20]);
    data.extend(seeded(11 << 20, 502));
    data.extend(texty(3 << 20, 503));
    fs::write(&img, &data).unwrap();
    let base = env.backup(&img, &["--name", "vm"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Change the image in place at known offsets, as a VM would, and keep
    // the dirty list a hypervisor's bitmap would give (64 KiB granules).
    let f = fs::OpenOptions::new().write(true).open(&img).unwrap();
    let mut dirty = Vec::new();
    for (i, off) in [
        100_000u64,
        5 << 20,
        (12 << 20) + 4096,
        21 << 20,
        (33 << 20) - 70_000,
    ]
    .into_iter()
    .enumerate()
    {
        let patch = seeded(20_000 + i * 30_000, 600 + i as u64);
        f.write_all_at(&patch, off).unwrap();
        let start = off / 65536 * 65536;
        let end = (off + patch.len() as u64).div_ceil(65536) * 65536;
        dirty.push((start, end.min(data.len() as u64) - start));
    }
    // The image also grows by 3 MiB (past the base's end: read implicitly).
    f.write_all_at(&texty(3 << 20, 509), data.len() as u64)
        .unwrap();
    drop(f);
    let list = env.path("dirty.txt");
    let text: String = dirty.iter().map(|(o, l)| format!("{o} {l}\n")).collect();
    fs::write(&list, format!("# dirty bitmap\n{text}")).unwrap();
    let listed: u64 = dirty.iter().map(|r| r.1).sum::<u64>() + (3 << 20);
    let r = env.backup(
        &img,
        &[
            "--name",
            "vm",
            "--base",
            &base,
            "--changed",
            list.to_str().unwrap(),
        ],
    );
    assert_eq!(r["bytes_read"].as_u64().unwrap(), listed, "{r}");
    assert!(r["new_bytes"].as_u64().unwrap() > 0);
    let id = r["id"].as_str().unwrap().to_string();
    // A full re-read of the same image finds every chunk, region and page
    // already there: the changed-block backup cut exactly the same chunks.
    let full = env.backup(&img, &["--name", "vm"]);
    assert_eq!(full["new_bytes"], 0, "{full}");
    assert_eq!(full["digest"], r["digest"]);
    assert_eq!(full["chunks"], r["chunks"]);
    assert_eq!(full["zero_bytes"], r["zero_bytes"]);
    let out = env.path("out.img");
    env.ok(&["restore", &id, out.to_str().unwrap()]);
    assert_same(&img, &out);

    // A list that omits a change: --verify-unchanged 100% catches it.
    let f = fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(b"unlisted change", 25 << 20).unwrap();
    drop(f);
    let before = env.ok(&["snapshots"]);
    let err = env.fails(
        &[
            "backup",
            img.to_str().unwrap(),
            "--name",
            "vm",
            "--base",
            &id,
            "--changed",
            list.to_str().unwrap(),
            "--verify-unchanged",
            "100%",
        ],
        "says are unchanged",
    );
    assert!(err.contains("no snapshot was written"), "{err}");
    assert_eq!(env.ok(&["snapshots"]), before);
    // Bad lists and sources are one-line errors.
    for (content, error) in [
        ("12 abc\n".to_string(), "line 1: expected `OFFSET LENGTH`"),
        (format!("{} 10\n", 1u64 << 40), "ends beyond"),
    ] {
        fs::write(&list, content).unwrap();
        let args = [
            "backup",
            img.to_str().unwrap(),
            "--base",
            &id,
            "--changed",
            list.to_str().unwrap(),
        ];
        env.fails(&args, error);
    }
    let o = env
        .command()
        .args([
            "backup",
            "-",
            "--name",
            "vm",
            "--base",
            &id,
            "--changed",
            "/dev/null",
        ])
        .stdin(fs::File::open(&img).unwrap())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("is a stream"), "{err}");
}

fn delta(env: &Env, id: &str, target: &Path) -> serde_json::Value {
    serde_json::from_str(&env.ok(&["restore", id, target.to_str().unwrap(), "--delta", "--json"]))
        .unwrap()
}

#[test]
fn delta_restore_writes_only_what_differs_and_a_rerun_completes_a_broken_target() {
    let Some((env, gens, ids)) = ext4_repo() else {
        return;
    };
    let target = env.path("target.img");
    // Forward (gen 1 → 2) and backward (gen 2 → 0): only differing chunks written.
    fs::copy(&gens[1], &target).unwrap();
    for (from, to) in [(1usize, 2usize), (2, 0)] {
        let (ranges, _) = diff_ranges(&env, &ids[from], &ids[to]);
        let differ: u64 = ranges.iter().map(|r| r.1).sum();
        let r = delta(&env, &ids[to], &target);
        let written = r["written_bytes"].as_u64().unwrap() + r["zeroed_bytes"].as_u64().unwrap();
        assert!(
            written > 0 && written <= differ,
            "{from}→{to}: wrote {written}, diff {differ}: {r}"
        );
        assert!(r["read_bytes"].as_u64().unwrap() <= fs::metadata(&gens[to]).unwrap().len());
        assert_same(&gens[to], &target);
        // Nothing left to do: a second run writes nothing.
        let r = delta(&env, &ids[to], &target);
        assert_eq!(r["written_bytes"], 0, "{r}");
        assert_eq!(r["zeroed_bytes"], 0, "{r}");
    }
    // A sparse target: its holes are known zeros and are not read.
    let sparse = env.path("sparse.img");
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(&gens[0])
        .arg(&sparse)
        .status()
        .unwrap();
    assert!(st.success());
    let r = delta(&env, &ids[1], &sparse);
    let read = r["read_bytes"].as_u64().unwrap();
    assert!(
        read <= allocated(&sparse) + (1 << 20),
        "read {read} of a sparse target: {r}"
    );
    assert!(read < fs::metadata(&sparse).unwrap().len() / 2, "{r}");
    assert_same(&gens[1], &sparse);
    // A target broken by garbage, a wrong size, and zeros where data was
    // (as a crash midway could leave it): one run makes it exact.
    let f = fs::OpenOptions::new().write(true).open(&target).unwrap();
    f.write_all_at(&seeded(3 << 20, 700), 7 << 20).unwrap();
    f.write_all_at(&vec![0u8; 1 << 20], 1 << 20).unwrap();
    f.set_len((64 << 20) + 12345).unwrap();
    drop(f);
    delta(&env, &ids[2], &target);
    assert_same(&gens[2], &target);
    // kill -9 during a delta restore, then a rerun: exact.
    fs::copy(&gens[0], &target).unwrap();
    let mut child = env
        .command()
        .args(["restore", &ids[2], target.to_str().unwrap(), "--delta"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(60));
    let _ = child.kill();
    let _ = child.wait();
    delta(&env, &ids[2], &target);
    assert_same(&gens[2], &target);
    // Refused: a target that does not exist, and stdout.
    env.fails(
        &[
            "restore",
            &ids[0],
            env.path("nope.img").to_str().unwrap(),
            "--delta",
        ],
        "--delta writes onto an existing file",
    );
    env.fails(&["restore", &ids[0], "-", "--delta"], "not stdout");
}

#[test]
fn delta_restore_onto_a_block_device_writes_only_changed_chunks() {
    let env = Env::new();
    env.init();
    let mut old = texty(6 << 20, 801);
    old.extend(seeded(4 << 20, 802));
    old.extend(vec![0u8; 2 << 20]);
    let mut new = old.clone();
    new[(2 << 20)..(2 << 20) + 50_000].copy_from_slice(&seeded(50_000, 803));
    new[(7 << 20)..(8 << 20)].fill(0); // data became zeros
    new[(10 << 20) + 4096..(10 << 20) + 40_000].copy_from_slice(&seeded(35_904, 804)); // zeros became data
    let (old_img, new_img) = (env.path("old.img"), env.path("new.img"));
    fs::write(&old_img, &old).unwrap();
    fs::write(&new_img, &new).unwrap();
    env.backup(&old_img, &["--name", "d"]);
    let id = env.backup(&new_img, &["--name", "d"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    // The device holds the old version followed by bytes that must stay untouched.
    let backing = env.path("dev.bin");
    let mut dev_content = old.clone();
    dev_content.extend(vec![0xeeu8; 1 << 20]);
    fs::write(&backing, &dev_content).unwrap();
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
    // A device is overwritten only with --force.
    let refused = env.run(&["restore", &id, &dev, "--delta"]);
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("pass --force"),
        "{refused:?}"
    );
    let o = env.run(&["restore", &id, &dev, "--delta", "--force", "--json"]);
    let _ = Command::new("losetup").args(["-d", &dev]).status();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let written = r["written_bytes"].as_u64().unwrap();
    let zeroed = r["zeroed_bytes"].as_u64().unwrap();
    // Rewritten: the chunks around the two data changes (chunks are at most
    // 256 KiB), and exactly the 1 MiB that became zeros.
    assert!(written > 50_000 && written < 1 << 20, "{r}");
    assert_eq!(zeroed, 1 << 20, "{r}");
    let got = fs::read(&backing).unwrap();
    assert!(got[..new.len()] == new[..], "device differs from the image");
    assert!(
        got[new.len()..].iter().all(|&b| b == 0xee),
        "bytes past the image were touched"
    );
}

#[test]
fn a_backup_takes_regions_equal_to_its_parent_without_chunking_them_and_stores_the_same_snapshot() {
    let env = Env::new();
    env.init();
    let Some(gens) = ext4_generations(&env) else {
        return;
    };
    let first = env.backup(&gens[0], &["--name", "vm"]);
    assert_eq!(first["bytes_reused"], 0, "no parent yet: {first}");
    assert!(first["parent"].is_null());
    // The default parent is the latest snapshot of the same name.
    let second = env.backup(&gens[1], &["--name", "vm", "--direct-io"]);
    assert_eq!(second["parent"], first["id"]);
    let reused = second["bytes_reused"].as_u64().unwrap();
    let size = second["size"].as_u64().unwrap();
    assert!(
        reused > 0 && reused < size,
        "a generation changed in a few places reuses most but not all regions: {second}"
    );
    // The same image without a parent: every region chunked, and exactly
    // the same snapshot content (same regions, same digest, no new bytes).
    let full = env.backup(&gens[1], &["--name", "vm", "--no-parent"]);
    assert_eq!(full["bytes_reused"], 0);
    assert!(full["parent"].is_null());
    assert_eq!(full["new_bytes"], 0, "{full}");
    assert_eq!(full["chunks"], second["chunks"]);
    assert_eq!(full["zero_bytes"], second["zero_bytes"]);
    assert_eq!(
        digest_of(&env, second["id"].as_str().unwrap()),
        digest_of(&env, full["id"].as_str().unwrap())
    );
    let (ranges, _) = diff_ranges(
        &env,
        second["id"].as_str().unwrap(),
        full["id"].as_str().unwrap(),
    );
    assert!(
        ranges.is_empty(),
        "parent reuse changed the recipe: {ranges:?}"
    );
    // An explicit parent of another disk shares nothing at most offsets but
    // is still correct; the unchanged image then reuses everything.
    let again = env.backup(
        &gens[1],
        &["--name", "vm", "--parent", first["id"].as_str().unwrap()],
    );
    assert_eq!(again["parent"], first["id"]);
    let same = env.backup(&gens[1], &["--name", "vm"]);
    assert_eq!(same["bytes_reused"].as_u64().unwrap(), size);
    assert_eq!(same["new_bytes"].as_u64().unwrap(), 0);
    for (snap, img) in [(&second, &gens[1]), (&same, &gens[1]), (&again, &gens[1])] {
        let out = env.path("out.img");
        let _ = fs::remove_file(&out);
        env.ok(&[
            "restore",
            snap["id"].as_str().unwrap(),
            out.to_str().unwrap(),
        ]);
        assert_same(img, &out);
    }
    // A parent that does not exist is an error naming the option.
    env.fails(
        &[
            "backup",
            gens[2].to_str().unwrap(),
            "--name",
            "vm",
            "--parent",
            "0123abcd",
        ],
        "--parent",
    );
}

#[test]
fn holes_the_parent_also_had_keep_their_chaining_values_and_the_digest_stays_blake3_of_the_image() {
    // A sparse 40 MiB disk: data in regions 0 and 3, regions 1, 2 and 4
    // wholly holes. With a parent, an all-hole region takes the parent's
    // recorded chaining value instead of hashing 8 MiB of zeros; the
    // snapshot must be the one a backup without parent makes, and its
    // digest BLAKE3 of the image.
    const MIB: u64 = 1 << 20;
    let env = Env::new();
    env.init();
    let img = env.path("sparse.img");
    let f = fs::File::create(&img).unwrap();
    f.set_len(40 * MIB).unwrap();
    f.write_all_at(&seeded(4 * MIB as usize, 1), 0).unwrap();
    f.write_all_at(&texty(6 * MIB as usize, 2), 24 * MIB)
        .unwrap();
    drop(f);
    let first = env.backup(&img, &["--name", "sparse"]);
    assert_eq!(first["bytes_read"].as_u64().unwrap(), 10 * MIB, "{first}");
    // Change region 3 only; the holes stay.
    let f = fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&seeded(64 << 10, 3), 25 * MIB).unwrap();
    drop(f);
    let second = env.backup(&img, &["--name", "sparse"]);
    assert_eq!(second["parent"], first["id"]);
    assert_eq!(
        second["bytes_reused"].as_u64().unwrap(),
        8 * MIB,
        "{second}"
    );
    let full = env.backup(&img, &["--name", "sparse", "--no-parent"]);
    let b3 = blake3::hash(&fs::read(&img).unwrap()).to_hex().to_string();
    for s in [&second, &full] {
        assert_eq!(digest_of(&env, s["id"].as_str().unwrap()), b3, "{s}");
    }
    assert_eq!(second["zero_bytes"], full["zero_bytes"]);
    assert_eq!(second["chunks"], full["chunks"]);
    let (ranges, _) = diff_ranges(
        &env,
        second["id"].as_str().unwrap(),
        full["id"].as_str().unwrap(),
    );
    assert!(ranges.is_empty(), "{ranges:?}");
    let out = env.path("out.img");
    env.ok(&[
        "restore",
        second["id"].as_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert_same(&img, &out);
    assert!(allocated(&out) < 12 * MIB, "holes stay holes");
}
