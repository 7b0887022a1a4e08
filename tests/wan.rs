//! A server reached over an emulated WAN link (`imgstore-shaper`: latency
//! as a timestamped queue, throughput caps, byte logs at the link), #27:
//! backups and restores through a 50 ms RTT link are exact (with the
//! pipelining and batching that keep such a link busy), and
//! `--limit-upload` / `--limit-download` hold at the link.
//!
//! Speed is measured in docs/BENCHMARKS.md (scripts/bench-wan.sh), never
//! asserted here; the one bound asserted is the rate limit's.

use std::fs;
use std::time::Duration;

use imgstore_shaper::{Dir, Link, Shaper};

use crate::server::{setup, url_via, Client};
use crate::util::*;

/// Seconds since the epoch of a log line's `2026-12-05T01:55:32.375725Z`.
fn log_secs(ts: &str) -> f64 {
    let (date, time) = ts.trim_end_matches('Z').split_once('T').unwrap();
    let d: Vec<i64> = date.split('-').map(|x| x.parse().unwrap()).collect();
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y, m) = if d[1] <= 2 {
        (d[0] - 1, d[1] + 9)
    } else {
        (d[0], d[1] - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d[2] - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let t: Vec<f64> = time.split(':').map(|x| x.parse().unwrap()).collect();
    days as f64 * 86_400.0 + t[0] * 3600.0 + t[1] * 60.0 + t[2]
}

/// An image of `mib` MiB: incompressible data, zeros, text.
fn image(mib: usize, seed: u64) -> Vec<u8> {
    let q = (mib << 20) / 4;
    [seeded(2 * q, seed), vec![0u8; q], texty(q, seed + 1)].concat()
}

#[test]
fn backups_and_restores_through_a_50ms_link_are_exact() {
    let env = Env::new();
    let s = setup(&env);
    let link = Shaper::start(&s.addr, Link::rtt(Duration::from_millis(50))).unwrap();
    let admin = Client::new(&env, &s, "admin").via(url_via(&link));
    let img = env.path("wan.img");
    let first = image(24, 61);
    fs::write(&img, &first).unwrap();
    let b1 = admin.backup(&img, &["--name", "wan"]);
    // A second generation: one region changed, one appended; the rest is
    // taken from the parent (its chunk and zero counts from the parent's
    // totals, less those of the regions that changed).
    let mut second = first.clone();
    second[9 << 20..(9 << 20) + 4096].copy_from_slice(&seeded(4096, 62));
    second.extend(seeded(3 << 20, 63));
    fs::write(&img, &second).unwrap();
    let b2 = admin.backup(&img, &["--name", "wan"]);
    assert_eq!(b2["parent"], b1["id"], "{b2}");
    assert!(b2["bytes_reused"].as_u64().unwrap() >= 16 << 20, "{b2}");
    // The same counts as a backup that reads every region.
    let full = admin.backup(&img, &["--name", "wan-full", "--no-parent"]);
    for k in ["chunks", "zero_bytes"] {
        assert_eq!(b2[k], full[k], "{k}: {b2} vs {full}");
    }
    for (id, want) in [(&b1["id"], &first), (&b2["id"], &second)] {
        let out = env.path(&format!("out-{}.img", &id.as_str().unwrap()[..8]));
        admin.ok(&["restore", id.as_str().unwrap(), out.to_str().unwrap()]);
        assert!(fs::read(&out).unwrap() == *want, "restore of {id} differs");
    }
    // A stream restore too (its own batching of recipes).
    let o = admin
        .command()
        .args(["restore", b2["id"].as_str().unwrap(), "-"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.stdout == second, "stream restore differs");
    assert!(
        link.bytes(Dir::Up) > 12 << 20,
        "the backups went through the link: {} bytes",
        link.bytes(Dir::Up)
    );
    // Fixed round trips per command: a commit ends its session on the
    // server, so no backup closes one, and none is left open.
    let log = fs::read_to_string(&s.log).unwrap();
    let requests: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "request")
        .collect();
    let closes = requests.iter().filter(|v| v["method"] == "DELETE").count();
    assert_eq!(closes, 0, "sessions closed after their commit");
    // The first backup's commit went with its last uploads, not a round
    // trip after their answers: it reached the server before the last
    // upload had been answered plus half the round trip (one sent after
    // the answers comes a whole round trip later), and the server took it
    // once the uploads were in (the backup restores exact, above).
    let first_commit = requests
        .iter()
        .position(|v| v["path"] == "/v1/commit")
        .expect("a commit");
    let span = |v: &serde_json::Value| {
        let end = log_secs(v["timestamp"].as_str().unwrap());
        (end - v["ms"].as_f64().unwrap() / 1000.0, end)
    };
    // When a commit reached the server, and when it was taken, after the
    // last of `uploads` was answered.
    let after_uploads = |uploads: &[serde_json::Value], commit: &serde_json::Value| {
        let last = uploads
            .iter()
            .filter(|v| v["method"] == "PUT")
            .map(|v| span(v).1)
            .fold(f64::MIN, f64::max);
        let (start, end) = span(commit);
        (start - last, end - last)
    };
    let (came, taken) = after_uploads(&requests[..first_commit], &requests[first_commit]);
    assert!(
        came < 0.025,
        "the commit came {came:.3} s after the last upload's answer"
    );
    assert!(taken >= 0.0, "the commit was taken before its uploads");
    let commit_end = span(&requests[first_commit]).1;
    // The second backup started from the client's cache, its session id
    // chosen by the client: its first `chunks/known` went with the
    // session's opening, not a round trip after its answer.
    assert_eq!(b2["started_from_cache"], true, "{b2}");
    let opened = requests
        .iter()
        .filter(|v| v["path"] == "/v1/sessions")
        .map(span)
        .nth(1)
        .expect("the second backup's session");
    let first_known = requests
        .iter()
        .filter(|v| v["path"] == "/v1/chunks/known")
        .map(|v| span(v).0)
        .filter(|t| *t > commit_end)
        .fold(f64::MAX, f64::min);
    assert!(
        first_known < opened.0 + 0.025,
        "the second backup's first chunks/known came {:.3} s after its session's opening",
        first_known - opened.0
    );
    // Nor did its commit wait for a lookup: the parent's regions it did not
    // take were counted while it read, and its index page names regions it
    // stored new (so it is new: no `refs` call). The commit went with its
    // last upload, as the first's did, a round trip earlier than after
    // lookups sent once everything was read; its counts are exact (above).
    let second_commit = requests
        .iter()
        .enumerate()
        .filter(|(_, v)| v["path"] == "/v1/commit")
        .nth(1)
        .map(|(i, _)| i)
        .expect("the second backup's commit");
    let between = &requests[first_commit + 1..second_commit];
    let refs: Vec<&str> = between
        .iter()
        .filter_map(|v| v["path"].as_str())
        .filter(|p| p.starts_with("/v1/refs"))
        .collect();
    assert!(
        refs.is_empty(),
        "the second backup looked its pages up: {refs:?}"
    );
    let (came, _) = after_uploads(between, &requests[second_commit]);
    let commit_start = span(&requests[second_commit]).0;
    assert!(
        came < 0.025,
        "the second backup's commit came {came:.3} s after its last upload's answer: {}",
        requests[first_commit + 1..=second_commit]
            .iter()
            .map(|v| format!(
                "{:.3}-{:.3} {} {}",
                span(v).0 - commit_start,
                span(v).1 - commit_start,
                v["method"],
                v["path"]
            ))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(crate::faults::metric(&env, &s, "sessions_active"), 0);
    let direct = Client::new(&env, &s, "admin");
    direct.ok(&["check", "--read-data"]);
    s.assert_no_panic();
}

/// Regions in flight together that share chunks send them once: each
/// region is told the shared chunks are missing (their first upload has
/// not landed when the others ask), the first upload to carry them claims
/// them, and the others wait for its answer and leave them out. Twelve
/// regions holding the same 4 MiB of random data (then zeros) put about
/// 4 MiB on the link, not 4 MiB per region in flight — and restore exact.
#[test]
fn chunks_shared_by_regions_in_flight_cross_the_link_once() {
    let env = Env::new();
    let s = setup(&env);
    let link = Shaper::start(&s.addr, Link::rtt(Duration::from_millis(50))).unwrap();
    let admin = Client::new(&env, &s, "admin").via(url_via(&link));
    let shared = seeded(4 << 20, 81);
    let mut data = Vec::new();
    for _ in 0..12 {
        data.extend_from_slice(&shared);
        data.extend(std::iter::repeat_n(0u8, 4 << 20));
    }
    let img = env.path("shared.img");
    fs::write(&img, &data).unwrap();
    let before = link.elapsed();
    let b = admin.backup(&img, &["--name", "shared"]);
    let up = link.traffic(Dir::Up).since(before).total();
    assert!(
        up < 6 << 20,
        "{up} bytes up for 4 MiB of distinct data in 12 regions: shared chunks were sent more than once ({b})"
    );
    let out = env.path("out.img");
    admin.ok(&[
        "restore",
        "latest",
        "--name",
        "shared",
        out.to_str().unwrap(),
    ]);
    assert_same(&out, &img);
    s.assert_no_panic();
}

#[test]
fn an_upload_limit_holds_over_every_second_at_the_link() {
    let env = Env::new();
    let s = setup(&env);
    let link = Shaper::start(&s.addr, Link::rtt(Duration::from_millis(10))).unwrap();
    let admin = Client::new(&env, &s, "admin").via(url_via(&link));
    let img = env.path("limited.img");
    // 14 MiB that do not compress: about 3.5 s at 4 MiB/s.
    let data = seeded(14 << 20, 71);
    fs::write(&img, &data).unwrap();
    let rate: u64 = 4 << 20;
    let before = link.elapsed();
    admin.ok(&[
        "--limit-upload",
        "4M",
        "backup",
        img.to_str().unwrap(),
        "--name",
        "limited",
        "-q",
    ]);
    let up = link.traffic(Dir::Up).since(before);
    assert!(up.total() > 14 << 20, "{} bytes up", up.total());
    let peak = up.peak(Duration::from_secs(1));
    assert!(
        peak <= rate + rate / 10,
        "{peak} bytes crossed the link in one second under --limit-upload 4M ({rate} B/s)"
    );

    // Restores exact under a download limit, at no more than the rate on
    // average at the link, once the client's window (a quarter second of
    // the rate, which the server may send before the first paced read) is
    // left out.
    let out = env.path("out.img");
    let before = link.elapsed();
    admin.ok(&[
        "--limit-download",
        "8M",
        "restore",
        "latest",
        "--name",
        "limited",
        out.to_str().unwrap(),
    ]);
    assert_same(&out, &img);
    let down = link.traffic(Dir::Down).since(before);
    let (a, b) = down.span().unwrap();
    let window = (8u64 << 20) / 4;
    let mean = down.total().saturating_sub(window) as f64 / (b - a).as_secs_f64();
    assert!(
        mean <= (8 << 20) as f64 * 1.1,
        "{mean:.0} B/s on average under --limit-download 8M"
    );
    s.assert_no_panic();
}

#[test]
fn a_rate_without_a_unit_or_below_the_minimum_is_refused() {
    let env = Env::new();
    let s = setup(&env);
    let admin = Client::new(&env, &s, "admin");
    for (args, needle) in [
        (["--limit-upload", "50"], "give a unit"),
        (["--limit-download", "fast"], "not a positive rate"),
        (["--limit-upload", "5kbit"], "below the smallest limit"),
        (["--limit-upload", "5parsecs"], "unknown unit"),
    ] {
        let mut a = args.to_vec();
        a.push("snapshots");
        admin.fails(&a, 2, needle);
    }
}

/// A bucket-backed repository whose bucket (Garage) is behind a 30 ms RTT
/// link: a backup and a restore with the pack cache off (every read goes
/// to the bucket) are exact, and `--limit-upload` holds at the link there
/// too (the paced transport: a pack PUT is handed over a piece at a time).
/// A repository in a fresh Garage bucket (under `prefix`, its pack cache
/// off, `init_args` added) reached through a link of `rtt`: the Garage
/// node (kept alive), the link, its endpoint and the repository's path.
fn bucket_behind(
    env: &Env,
    rtt: Duration,
    prefix: &str,
    init_args: &[&str],
) -> (crate::bucket::Node, Shaper, String, std::path::PathBuf) {
    use crate::bucket::{garage, ok, BUCKET};
    let node = garage(env);
    let link = Shaper::start(("127.0.0.1", node.s3), Link::rtt(rtt)).unwrap();
    let ep = format!("http://{}", link.addr());
    let repo = env.repo();
    let url = format!("s3://{BUCKET}/{prefix}");
    let mut args = vec!["init", "--storage", &url, "--cache-size", "0"];
    args.extend_from_slice(init_args);
    ok(env, &repo, &ep, &args);
    (node, link, ep, repo)
}

/// Over a slow link a bucket backup's early packs follow each other: while
/// the first waits for its answer (a round trip after its last byte), the
/// next region's data leaves in a second one instead of waiting in the
/// open pack. Three 8 MiB regions that do not compress (pack target 32
/// MiB) through a 600 ms link: the second region's pack crosses within the
/// same round trip as the first's. One early pack at a time held it back
/// until the first was answered, 600 ms later.
#[test]
fn a_bucket_backup_sends_its_next_early_pack_while_the_first_awaits_its_answer() {
    use crate::bucket::ok;
    let env = Env::new();
    let rtt = Duration::from_millis(600);
    let (_node, link, ep, repo) = bucket_behind(&env, rtt, "early-packs", &[]);
    let img = env.path("early.img");
    fs::write(&img, seeded(24 << 20, 91)).unwrap();
    let before = link.elapsed();
    ok(
        &env,
        &repo,
        &ep,
        &["backup", img.to_str().unwrap(), "--name", "e", "-q"],
    );
    let up = link.traffic(Dir::Up).since(before);
    // From the first pack's start: the first MiB of upload past the small
    // requests that open the backup.
    let mut sum = 0;
    let start =
        up.0.iter()
            .find(|e| {
                sum += e.1;
                sum > 1 << 20
            })
            .map(|e| e.0)
            .expect("the backup uploaded");
    let within: u64 =
        up.0.iter()
            .filter(|e| e.0 >= start && e.0 < start + rtt / 2)
            .map(|e| e.1)
            .sum();
    assert!(
        within > 15 << 20,
        "{within} bytes crossed in the half round trip after the first pack began: the second pack waited for the first's answer"
    );
    // And the commit (its own pack and the snapshot object naming the
    // packs still in flight) went with them, not a round trip after their
    // answers: from the first pack on, the upload never pauses for half a
    // round trip.
    let mut at: Vec<Duration> = up.0.iter().map(|e| e.0).filter(|t| *t >= start).collect();
    at.sort();
    let pauses: Vec<(Duration, Duration)> = at
        .windows(2)
        .filter(|w| w[1] - w[0] > rtt / 2)
        .map(|w| (w[0] - start, w[1] - w[0]))
        .collect();
    assert!(
        pauses.is_empty(),
        "the upload paused (after, for) {pauses:?}: the commit waited for the early packs' answers"
    );
    let out = env.path("early-out.img");
    ok(
        &env,
        &repo,
        &ep,
        &["restore", "latest", "--name", "e", out.to_str().unwrap()],
    );
    assert_same(&out, &img);
}

#[test]
fn a_bucket_behind_a_slow_link_is_exact_and_its_upload_limit_holds() {
    use crate::bucket::ok;
    let env = Env::new();
    let (_node, link, ep, repo) = bucket_behind(
        &env,
        Duration::from_millis(30),
        "wan",
        &["--pack-size", "2M"],
    );
    let img = env.path("bucket-wan.img");
    let data = image(12, 81);
    fs::write(&img, &data).unwrap();
    let rate: u64 = 3 << 20;
    let before = link.elapsed();
    ok(
        &env,
        &repo,
        &ep,
        &[
            "--limit-upload",
            "3M",
            "backup",
            img.to_str().unwrap(),
            "--name",
            "bw",
            "-q",
        ],
    );
    let up = link.traffic(Dir::Up).since(before);
    assert!(up.total() > 6 << 20, "{} bytes up", up.total());
    let peak = up.peak(Duration::from_secs(1));
    assert!(
        peak <= rate + rate / 10,
        "{peak} bytes reached the bucket in one second under --limit-upload 3M ({rate} B/s)"
    );
    let out = env.path("bucket-out.img");
    let down_before = link.bytes(Dir::Down);
    ok(
        &env,
        &repo,
        &ep,
        &["restore", "latest", "--name", "bw", out.to_str().unwrap()],
    );
    assert_same(&out, &img);
    assert!(
        link.bytes(Dir::Down) - down_before > 6 << 20,
        "the restore read the bucket through the link"
    );
}
