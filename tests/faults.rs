//! Faults of real servers and networks (#27), through the real binary and
//! real `imgstore server` processes on loopback TLS, with the
//! `imgstore-shaper` link between them where the link must misbehave or be
//! slow enough to stop a backup part way: a server that is not up yet; a
//! server killed (-9) and restarted under backups in flight, with a gc in
//! between; backups cut at 80% of their upload (the client killed, or the
//! link down for longer than `--retry-for`) and run again; the upload of a
//! backup that never comes back reclaimed by gc; a link that goes silent.

use std::fs;
use std::path::Path;
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use imgstore_shaper::{Dir, Link, Shaper};

use crate::server::{serve_config, setup, url_via, Client, Served, CONFIG};
use crate::util::*;

/// Waits for `child` at most `limit` (killing it past that); its output
/// and how long it took.
fn finish(mut child: Child, limit: Duration) -> (Output, Duration) {
    let started = Instant::now();
    while started.elapsed() < limit {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let took = started.elapsed();
    (child.wait_with_output().unwrap(), took)
}

/// Polls `cond` every 20 ms for at most `limit`; whether it came true.
fn until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    while started.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

fn succeeded(o: &Output, what: &str) -> serde_json::Value {
    assert!(
        o.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(out.lines().last().unwrap_or("null")).unwrap()
}

/// A backup of `img` as a child process (JSON report on stdout).
fn spawn_backup(c: &Client, img: &Path, extra: &[&str]) -> Child {
    c.command()
        .args(extra)
        .args(["backup", img.to_str().unwrap(), "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Restores the latest snapshot of `name` and compares it with `want`.
fn restores_exact(c: &Client, env: &Env, name: &str, want: &Path) {
    let out = env.path(&format!("{name}.restored"));
    c.ok(&[
        "restore",
        "latest",
        "--name",
        name,
        "--force",
        out.to_str().unwrap(),
    ]);
    assert_same(&out, want);
}

/// A counter of the server's `/metrics` (admin token), read with curl.
pub(crate) fn metric(env: &Env, s: &Served, name: &str) -> u64 {
    let token = fs::read_to_string(env.path("admin.token")).unwrap();
    let o = std::process::Command::new("curl")
        .args(["-sk", "--max-time", "30", "-H"])
        .arg(format!("Authorization: Bearer {}", token.trim()))
        .arg(format!("https://{}/metrics", s.addr))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("imgstore_{name} ")))
        .unwrap_or_else(|| panic!("no {name} in the metrics: {text}"))
        .trim()
        .parse()
        .unwrap()
}

/// Images named in the "session opened" lines of a server's log.
fn sessions_opened(s: &Served) -> Vec<String> {
    fs::read_to_string(&s.log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "session opened")
        .map(|v| v["image"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Region uploads a server has stored (answered 200), from its log.
fn regions_stored(s: &Served) -> usize {
    fs::read_to_string(&s.log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| {
            v["message"] == "request"
                && v["method"] == "PUT"
                && v["status"] == 200
                && v["path"]
                    .as_str()
                    .is_some_and(|p| p.starts_with("/v1/regions/"))
        })
        .count()
}

/// The README promises that requests are retried while the server cannot
/// be reached: the first one too. With nothing listening, the client gives
/// up after about `--retry-for` (exit 7, one line); a backup started before
/// its server comes up waits for it and succeeds; a server that is up but
/// not the one pinned is refused at once, not waited for.
#[test]
fn a_server_that_is_not_up_yet_is_waited_for() {
    let env = Env::new();
    let mut s = setup(&env);
    let addr = s.addr.clone();
    let admin = Client::new(&env, &s, "admin");
    admin.ok(&["snapshots"]);
    s.kill9();

    let started = Instant::now();
    let o = admin.run(&["--retry-for", "3s", "snapshots"]);
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(7), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("cannot reach") && err.contains("tried"),
        "{err}"
    );
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_secs(60),
        "gave up after {took:?}, not after about --retry-for 3s"
    );

    let img = env.path("web-early.img");
    fs::write(&img, [seeded(16 << 20, 61), texty(8 << 20, 62)].concat()).unwrap();
    let mut k = spawn_backup(&admin, &img, &["--retry-for", "90s"]);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        k.try_wait().unwrap().is_none(),
        "the backup gave up before its server came up"
    );
    let s = Served::start(&env, &addr);
    let (o, _) = finish(k, Duration::from_secs(120));
    succeeded(&o, "a backup started before its server");
    restores_exact(&admin, &env, "web-early.img", &img);

    let mut wrong = Client::new(&env, &s, "admin");
    wrong.fp = format!("SHA256:{}", "ab".repeat(32));
    let started = Instant::now();
    wrong.fails(&["--retry-for", "60s", "snapshots"], 7, "fingerprint");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "a refused certificate was retried for {:?}",
        started.elapsed()
    );
    s.assert_no_panic();
}

/// Two hosts back up (each against its parent) through a slow link; the
/// server is killed (-9) part way, restarted, and gc runs before the
/// clients come back, so nothing pins what their lost sessions uploaded:
/// gc takes it, and the crash took what was not flushed. Both backups open
/// new sessions, send again what the server lacks, and finish; a backup
/// from stdin, which cannot be read twice, fails clearly instead and
/// succeeds when run again. Every restore is exact, `check --read-data`
/// clean.
#[test]
fn a_server_restart_does_not_fail_the_backups_in_flight() {
    let env = Env::new();
    let mut s = setup(&env);
    let addr = s.addr.clone();
    let admin = Client::new(&env, &s, "admin");
    let web = Client::new(&env, &s, "web-backup");
    let db = Client::new(&env, &s, "db-backup");
    let web_img = env.path("web-host.img");
    let db_img = env.path("db-host.img");
    let stream_img = env.path("web-stream.img");
    for (i, (c, img)) in [(&web, &web_img), (&db, &db_img)].into_iter().enumerate() {
        let i = i as u64;
        let mut data = [seeded(40 << 20, 71 + 2 * i), texty(8 << 20, 81 + 2 * i)].concat();
        fs::write(img, &data).unwrap();
        c.backup(img, &[]);
        // The next generation: every other 8 MiB region rewritten, and
        // one more at the end.
        for r in (0..6).step_by(2) {
            data[r << 23..(r + 1) << 23].copy_from_slice(&seeded(8 << 20, 91 + 10 * i + r as u64));
        }
        data.extend(seeded(8 << 20, 111 + 2 * i));
        fs::write(img, &data).unwrap();
    }
    fs::write(&stream_img, seeded(32 << 20, 121)).unwrap();

    // 6 MiB/s up, shared: 96 MiB of new data to send.
    let link = Shaper::start(&addr, Link::default().rate(6 << 20)).unwrap();
    let retry = ["--retry-for", "60s"];
    let stored_before = regions_stored(&s);
    let kids = [
        spawn_backup(&web.via(url_via(&link)), &web_img, &retry),
        spawn_backup(&db.via(url_via(&link)), &db_img, &retry),
    ];
    let stream = web
        .via(url_via(&link))
        .command()
        .args(retry)
        .args(["backup", "-", "--name", "web-stream", "--json"])
        .stdin(fs::File::open(&stream_img).unwrap())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Killed once about half the regions are stored.
    assert!(
        until(Duration::from_secs(90), || regions_stored(&s)
            >= stored_before + 6),
        "the backups did not get going: {} regions stored",
        regions_stored(&s) - stored_before
    );
    s.kill9();
    std::thread::sleep(Duration::from_millis(500));
    s = Served::start(&env, &addr);
    admin.ok(&["gc"]);

    for (k, (c, img)) in kids.into_iter().zip([(&web, &web_img), (&db, &db_img)]) {
        let (o, _) = finish(k, Duration::from_secs(240));
        succeeded(&o, "a backup across a server restart");
        let name = img.file_name().unwrap().to_str().unwrap();
        restores_exact(c, &env, name, img);
    }
    let (o, _) = finish(stream, Duration::from_secs(240));
    let err = String::from_utf8_lossy(&o.stderr);
    eprintln!(
        "the stream backup across the restart: {:?} {err}",
        o.status.code()
    );
    match o.status.code() {
        Some(0) => {}
        Some(1) => {
            assert!(err.contains("a stream cannot be read twice"), "{err}");
            assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
            let again = web
                .command()
                .args(["backup", "-", "--name", "web-stream"])
                .stdin(fs::File::open(&stream_img).unwrap())
                .output()
                .unwrap();
            assert!(
                again.status.success(),
                "{}",
                String::from_utf8_lossy(&again.stderr)
            );
        }
        c => panic!("the stream backup: exit {c:?}: {err}"),
    }
    restores_exact(&web, &env, "web-stream", &stream_img);
    // Both hosts were in flight at the kill: each came back in a new
    // session on the restarted server.
    let opened = sessions_opened(&s);
    for name in ["web-host.img", "db-host.img"] {
        assert!(
            opened.iter().any(|o| o == name),
            "{name} opened no session after the restart: {opened:?}"
        );
    }
    admin.ok(&["check", "--read-data"]);
    admin.ok(&["gc"]);
    admin.ok(&["check", "--read-data"]);
    assert_eq!(admin.snapshots().len(), 5);
    s.assert_no_panic();
}

/// Starts a backup of `img` through a link capped at an eighth of its size
/// a second (8 MiB/s at least, so the cut comes after about 6 s) and stops it
/// once 80% of `img`'s size has crossed: with `kill`, by kill -9 of the
/// client, else by cutting the link for longer than its `--retry-for`.
/// Returns the bytes the link carried to the server.
fn cut_at_80_percent(s: &Served, c: &Client, img: &Path, kill: bool) -> u64 {
    let size = fs::metadata(img).unwrap().len();
    let link = Shaper::start(&s.addr, Link::default().rate((size / 8).max(8 << 20))).unwrap();
    let mut k = spawn_backup(&c.via(url_via(&link)), img, &["--retry-for", "2s"]);
    let pid = k.id();
    let at_80 = until(Duration::from_secs(60), || {
        link.bytes(Dir::Up) >= size * 8 / 10 || k.try_wait().unwrap().is_some()
    });
    if !at_80 || k.try_wait().unwrap().is_some() {
        let (o, _) = finish(k, Duration::from_secs(10));
        panic!(
            "the backup did not get to 80%: {} bytes sent; {:?} {}",
            link.bytes(Dir::Up),
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
    }
    if kill {
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
    } else {
        link.cut_for(Duration::from_secs(60));
    }
    let (o, _) = finish(k, Duration::from_secs(60));
    let err = String::from_utf8_lossy(&o.stderr);
    if kill {
        assert_eq!(o.status.code(), None, "not killed: {err}");
    } else {
        assert_eq!(o.status.code(), Some(7), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    }
    link.bytes(Dir::Up)
}

/// A backup cut at 80% of its upload, by kill -9 of the client or by a
/// link down for longer than `--retry-for`, and run again, sends only what
/// the server does not have yet: measured by the server's received-bytes
/// counter. Restores exact.
#[test]
fn an_interrupted_backup_run_again_sends_only_what_the_server_lacks() {
    if !have("curl") {
        eprintln!("SKIP: needs curl");
        return;
    }
    let env = Env::new();
    let s = setup(&env);
    let web = Client::new(&env, &s, "web-backup");
    for (i, kill) in [true, false].into_iter().enumerate() {
        let img = env.path(&format!("web-cut{i}.img"));
        // 32 regions: many more than a client keeps in flight (twice the
        // token's upload share, 8 here), so the cut falls among them.
        fs::write(&img, seeded(256 << 20, 301 + 2 * i as u64)).unwrap();
        let size = fs::metadata(&img).unwrap().len();
        let first = cut_at_80_percent(&s, &web, &img, kill);
        // Run again through a link without a cap, to count its bytes too.
        let link = Shaper::start(&s.addr, Link::default()).unwrap();
        let before = metric(&env, &s, "received_bytes_total");
        web.via(url_via(&link)).backup(&img, &[]);
        let received = metric(&env, &s, "received_bytes_total") - before;
        let sent = link.bytes(Dir::Up);
        eprintln!(
            "{}: {first} bytes sent before the cut; the second run sent {sent} bytes, the server received {received} bytes of request bodies ({:.1}% of the {size}-byte image)",
            if kill { "client killed" } else { "link down" },
            received as f64 * 100.0 / size as f64
        );
        // What the server stored before the cut is not sent again: the
        // second run carries the rest (a fifth of the image) and the
        // regions in flight at the cut (at most 8 of 32, interleaved on
        // one connection: a quarter), not a whole upload.
        assert!(
            received < size * 3 / 5 && sent < size * 3 / 5,
            "the run after the cut sent {sent} bytes ({received} received) of a {size}-byte image"
        );
        let name = img.file_name().unwrap().to_str().unwrap();
        restores_exact(&web, &env, name, &img);
    }
    Client::new(&env, &s, "admin").ok(&["check", "--read-data"]);
    s.assert_no_panic();
}

/// What a backup uploaded before it was killed stays while its session
/// lives (gc honours its pins), and once the session expires with no
/// backup ever committing it, gc reclaims every byte of it.
#[test]
fn an_upload_never_committed_is_reclaimed_by_gc() {
    if !have("curl") {
        eprintln!("SKIP: needs curl");
        return;
    }
    let env = Env::new();
    env.init();
    serve_config(&env);
    fs::write(
        env.repo().join("server/config.toml"),
        format!("session_idle_timeout = \"4s\"\n{CONFIG}"),
    )
    .unwrap();
    let s = Served::start(&env, "127.0.0.1:0");
    let admin = Client::new(&env, &s, "admin");
    let web = Client::new(&env, &s, "web-backup");
    let img = env.path("web-lost.img");
    // 32 regions, more than the 8 uploads a client keeps in flight: at
    // 80% of the bytes sent, some regions are whole on the server (with
    // 4, all could still be in flight, and nothing stored to hold).
    fs::write(&img, seeded(256 << 20, 400)).unwrap();
    cut_at_80_percent(&s, &web, &img, true);
    let stats =
        || -> serde_json::Value { serde_json::from_str(&admin.ok(&["stats", "--json"])).unwrap() };
    admin.ok(&["gc"]);
    let held = stats();
    assert_eq!(held["snapshots"], 0);
    assert!(
        held["chunks"].as_u64().unwrap() > 0,
        "the live session's uploads were collected: {held}"
    );
    assert!(
        until(Duration::from_secs(60), || metric(
            &env,
            &s,
            "sessions_active"
        ) == 0),
        "the killed backup's session never expired"
    );
    admin.ok(&["gc"]);
    let after = stats();
    assert_eq!(
        (&after["chunks"], &after["regions"], &after["orphans"]),
        (&0.into(), &0.into(), &0.into()),
        "{after}"
    );
    admin.ok(&["check", "--read-data"]);
    s.assert_no_panic();
}

/// The link freezes mid-backup: no byte crosses either way and no FIN or
/// RST arrives, as when the server's machine loses power or a NAT drops
/// the connection. The client notices the silent connection (HTTP/2
/// pings), reconnects (the link lets new connections through) and
/// finishes, well before a whole-request timeout would have fired.
#[test]
fn a_connection_that_goes_silent_is_noticed_and_the_backup_completes() {
    let env = Env::new();
    let s = setup(&env);
    let web = Client::new(&env, &s, "web-backup");
    let img = env.path("web-silent.img");
    fs::write(&img, [seeded(32 << 20, 500), texty(8 << 20, 501)].concat()).unwrap();
    let link = Shaper::start(&s.addr, Link::default().rate(8 << 20)).unwrap();
    let mut k = spawn_backup(&web.via(url_via(&link)), &img, &[]);
    assert!(
        until(Duration::from_secs(60), || link.bytes(Dir::Up) >= 12 << 20),
        "the backup did not get going"
    );
    let connections = link.connections();
    link.freeze();
    let frozen_at = Instant::now();
    // Noticed when the client opens a new connection.
    let noticed = until(Duration::from_secs(120), || {
        link.connections() > connections || k.try_wait().unwrap().is_some()
    });
    let noticed_after = frozen_at.elapsed();
    let (o, _) = finish(k, Duration::from_secs(120));
    let took = frozen_at.elapsed();
    eprintln!(
        "frozen mid-backup: a new connection {noticed_after:?} after the freeze, finished after {took:?}"
    );
    succeeded(&o, "a backup whose connection went silent");
    assert!(
        noticed && link.connections() > connections,
        "no new connection after the freeze"
    );
    assert!(
        took < Duration::from_secs(120),
        "the silent connection was noticed only after {took:?}"
    );
    restores_exact(&web, &env, "web-silent.img", &img);
    s.assert_no_panic();
}
