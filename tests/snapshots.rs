//! `snapshots` listing and selection by name, `latest` and `--at`.

use std::fs;

use crate::util::*;

#[test]
fn listing_selection_and_tags() {
    let env = Env::new();
    env.init();
    let a = env.path("a.img");
    let b = env.path("b.img");
    fs::write(&a, seeded(300_000, 1)).unwrap();
    fs::write(&b, seeded(200_000, 2)).unwrap();
    let ra = env.backup(&a, &["--tag", "daily", "--tag", "keep"]);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    fs::write(&a, seeded(300_000, 3)).unwrap();
    let ra2 = env.backup(&a, &[]);
    let rb = env.backup(&b, &["--name", "other"]);

    let table = env.ok(&["snapshots"]);
    assert!(table.contains(&ra["id"].as_str().unwrap()[..8]), "{table}");
    assert!(table.contains("daily,keep"), "{table}");
    assert!(table.contains("3 snapshots"), "{table}");
    let json: serde_json::Value =
        serde_json::from_str(&env.ok(&["snapshots", "--json", "--name", "a.img"])).unwrap();
    let arr = json.as_array().unwrap();
    assert_eq!(arr.len(), 2);
    assert_eq!(arr[0]["id"], ra["id"]);
    assert_eq!(arr[0]["id"].as_str().unwrap().len(), 64);

    // `latest` needs --name when several images are stored.
    env.fails(
        &["restore", "latest", env.path("x").to_str().unwrap()],
        "--name",
    );
    let out = env.path("latest.img");
    env.ok(&[
        "restore",
        "latest",
        "--name",
        "a.img",
        out.to_str().unwrap(),
    ]);
    assert_eq!(fs::read(&out).unwrap(), seeded(300_000, 3));
    // --at picks the newest at or before the time: the first snapshot of a.img.
    let t0 = ra["time"].as_str().unwrap();
    let at = env.path("at.img");
    env.ok(&[
        "restore",
        "--at",
        t0,
        "--name",
        "a.img",
        at.to_str().unwrap(),
    ]);
    assert_eq!(fs::read(&at).unwrap(), seeded(300_000, 1));
    env.fails(
        &[
            "restore",
            "--at",
            "2001-01-01",
            "--name",
            "a.img",
            env.path("y").to_str().unwrap(),
        ],
        "no snapshot",
    );
    let _ = (ra2, rb);
}
