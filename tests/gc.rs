//! `forget`, `gc`, `protect` and `stats` on real images: space comes back,
//! what remains restores exactly, crashes at any point lose nothing.

use std::fs;
use std::process::{Command, Stdio};

use crate::util::*;

fn du(p: &std::path::Path) -> u64 {
    let o = Command::new("du").arg("-sb").arg(p).output().unwrap();
    String::from_utf8(o.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn snapshot_ids(env: &Env) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(&env.ok(&["snapshots", "--json"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect()
}

/// Four generations of an image whose data is mostly replaced each time.
fn churning_generations(env: &Env) -> Vec<std::path::PathBuf> {
    let mut gens = Vec::new();
    for g in 0..4u64 {
        let mut data = seeded(12 << 20, 1000 + 2 * g);
        data.extend(texty(6 << 20, 2000 + 2 * g));
        data.extend(vec![0u8; 6 << 20]);
        data.extend(seeded(2 << 20, 7)); // shared by every generation
        let p = env.path(&format!("gen{g}.img"));
        fs::write(&p, &data).unwrap();
        gens.push(p);
    }
    gens
}

#[test]
fn forget_keep_last_prune_gives_space_back() {
    let env = Env::new();
    env.init();
    let gens = churning_generations(&env);
    for g in &gens {
        env.backup(g, &["--name", "disk"]);
    }
    let full = du(&env.repo());
    let out: Vec<serde_json::Value> = env
        .ok(&["forget", "--keep-last", "1", "--prune", "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let decisions = out[0].as_array().unwrap();
    assert_eq!(decisions.iter().filter(|d| d["keep"] == true).count(), 1);
    assert_eq!(decisions.iter().filter(|d| d["keep"] == false).count(), 3);
    let gc = &out[1];
    assert!(gc["chunks_removed"].as_u64().unwrap() > 100, "{gc}");
    assert_eq!(snapshot_ids(&env).len(), 1);
    let r = env.path("last.img");
    env.ok(&["restore", "latest", r.to_str().unwrap()]);
    assert_same(&gens[3], &r);
    // Within 1.25x of a fresh repository holding only that snapshot.
    let fresh = Env::new();
    fresh.init();
    fresh.backup(&gens[3], &["--name", "disk"]);
    let (after, alone) = (du(&env.repo()), du(&fresh.repo()));
    assert!(
        after * 100 <= alone * 125,
        "after gc {after} bytes, fresh {alone}, before {full}"
    );
    assert!(after * 2 < full, "gc freed too little: {full} -> {after}");
    let stats: serde_json::Value = serde_json::from_str(&env.ok(&["stats", "--json"])).unwrap();
    assert_eq!(stats["orphans"], 0);
    assert_eq!(stats["snapshots"], 1);
}

#[test]
fn protect_dry_run_and_explicit_forget() {
    let env = Env::new();
    env.init();
    let gens = churning_generations(&env);
    for g in &gens[..3] {
        env.backup(g, &["--name", "disk", "--tag", "t"]);
    }
    let ids = snapshot_ids(&env);
    env.ok(&["protect", &ids[0][..8]]);
    env.fails(&["forget", &ids[0]], "is protected");
    // A dry run changes nothing and says why each kept one is kept.
    let dry = env.ok(&["forget", "--keep-last", "1", "--dry-run"]);
    assert!(dry.contains("protected"), "{dry}");
    assert!(dry.contains("1 snapshot would be removed"), "{dry}");
    assert_eq!(snapshot_ids(&env).len(), 3);
    let gc_dry: serde_json::Value =
        serde_json::from_str(&env.ok(&["gc", "--dry-run", "--json"])).unwrap();
    assert_eq!(gc_dry["chunks_removed"], 0);
    env.ok(&["forget", &ids[1]]);
    let gc_dry: serde_json::Value =
        serde_json::from_str(&env.ok(&["gc", "--dry-run", "--json"])).unwrap();
    let would = gc_dry["chunks_removed"].as_u64().unwrap();
    assert!(would > 0);
    let gc: serde_json::Value = serde_json::from_str(&env.ok(&["gc", "--json"])).unwrap();
    assert_eq!(
        gc["chunks_removed"].as_u64().unwrap(),
        would,
        "dry run and real run agree"
    );
    env.ok(&["unprotect", &ids[0]]);
    env.ok(&[
        "forget",
        "--keep-tag",
        "nope",
        "--keep-last",
        "1",
        "--prune",
    ]);
    let left = snapshot_ids(&env);
    assert_eq!(left, vec![ids[2].clone()]);
    let r = env.path("r.img");
    env.ok(&["restore", &left[0], r.to_str().unwrap()]);
    assert_same(&gens[2], &r);
    env.fails(&["forget"], "nothing to forget");
    env.fails(&["forget", &left[0], "--keep-last", "1"], "not both");
}

#[test]
fn kill_during_forget_and_gc_loses_nothing() {
    let env = Env::new();
    env.init();
    let gens = churning_generations(&env);
    for g in &gens {
        env.backup(g, &["--name", "disk"]);
    }
    let all = snapshot_ids(&env);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..10 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let ids = snapshot_ids(&env);
        let args: Vec<String> = if round % 3 == 2 || ids.len() <= 1 {
            vec!["gc".into()]
        } else {
            vec![
                "forget".into(),
                ids[(seed as usize) % (ids.len() - 1)].clone(),
                "--prune".into(),
            ]
        };
        let mut child = env
            .command()
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(seed % 120));
        let _ = child.kill();
        let _ = child.wait();
        // Every remaining snapshot restores exactly.
        for id in snapshot_ids(&env) {
            let g = all.iter().position(|a| *a == id).unwrap();
            let out = env.path("check.img");
            let _ = fs::remove_file(&out);
            env.ok(&["restore", &id, out.to_str().unwrap()]);
            assert_same(&gens[g], &out);
        }
    }
    // Running gc again finishes the job.
    env.ok(&["gc"]);
    let stats: serde_json::Value = serde_json::from_str(&env.ok(&["stats", "--json"])).unwrap();
    assert_eq!(stats["orphans"], 0, "{stats}");
}
