//! A repository served by `imgstore server`, as a [`Repository`].
//!
//! The engine runs unchanged against it: each trait call becomes one or a
//! few HTTPS requests (batched to the protocol's limits), so a backup
//! chunks, hashes and compresses here and sends only the chunks the server
//! lacks for this client's namespace.
//!
//! # Why these choices
//!
//! * **reqwest (blocking) on hyper and rustls**: the trait is synchronous
//!   and called from rayon workers; reqwest's blocking client multiplexes
//!   their requests over HTTP/2 connections on its own runtime.
//! * **Pinning**: a self-hosted server usually has a self-signed
//!   certificate, so the client pins its SHA-256 fingerprint (or trusts a
//!   CA file); there is no fallback to "accept anything".
//! * **Retries**: idempotent calls (everything is content-addressed) are
//!   retried with exponential backoff on connection failures and 502/503/
//!   504, within a bounded time — the first contact too, so a client that
//!   starts while its server restarts waits for it; only a TLS handshake
//!   that refuses the server (a certificate that is not the pinned one)
//!   fails at once. A commit whose answer was lost is sent again once
//!   (the server treats a repeated commit as a no-op), and a 503 `busy`
//!   from the server's gate, which answers before reading the body, is
//!   retried for every call.
//! * **Dead connections**: a server that lost power, or a NAT that dropped
//!   the connection, sends no FIN or RST. HTTP/2 pings (every
//!   [`KEEPALIVE_INTERVAL`], answered within [`KEEPALIVE_TIMEOUT`], also on
//!   idle pooled connections) notice a connection that went silent within
//!   seconds, whatever the size of the request in flight, and TCP
//!   keepalive and `TCP_USER_TIMEOUT` do the same below plain HTTP; the
//!   request then fails as any transport fault and is retried on a new
//!   connection.
//! * **Sessions that outlive the server's memory**: a backup's session
//!   lives in the server's memory, so a server restart (or a session idle
//!   past its timeout) forgets it. A call answered "no such session" opens
//!   a new session for the same image and is sent again in it; before the
//!   commit, [`Repository::regions_to_resend`] asks which regions uploaded
//!   in the lost session are still there (`docs/GC.md`).

pub mod cache;
pub mod known;
mod tls;

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use imgstore_limit::{Limits, Paced, Rate};

use imgstore_format::{Id, ObjectKind, RefCount, RepoConfig, Snapshot};
use imgstore_protocol as proto;
use imgstore_protocol::{limits, ErrorBody};
use imgstore_repo::{
    ChunkRead, DamageMark, ForgetOutcome, Frames, GcOutcome, PutOutcome, RepoError, Repository,
    Result, Totals,
};

pub use proto::Role;

/// How to reach and trust a server.
#[derive(Clone, Debug)]
pub struct RemoteOptions {
    /// `imgstores://HOST[:PORT]/` (TLS) or `imgstore://HOST[:PORT]/` (plain
    /// HTTP, for a server run with `--insecure-no-tls` on loopback).
    pub url: String,
    /// The bearer token (from `IMGSTORE_TOKEN` or `--token-file`).
    pub token: String,
    /// The server certificate's SHA-256 fingerprint to pin.
    pub fingerprint: Option<String>,
    /// A PEM file of CA certificates to trust instead.
    pub ca_file: Option<std::path::PathBuf>,
    /// How long to keep retrying a failing request.
    pub retry_for: Duration,
    /// Upload and download rate limits (`--limit-upload`/`--limit-download`).
    pub limits: Limits,
    /// Ask for the snapshot listing together with the hello: a command
    /// that will list (a backup looks for its parent, a restore for its
    /// snapshot) saves a round trip. The answer is only decoded after the
    /// hello has been checked, and dropped by any change to the listing.
    pub prefetch_listing: bool,
    /// Open a backup session for this image together with the hello: the
    /// backup's first `chunks/known` need not wait a round trip for it
    /// ([`RemoteRepo::begin_session_ahead`] takes it; its parent's pages,
    /// read within it, are pinned as they are read).
    pub session_for: Option<String>,
}

/// Is `location` a server URL (rather than a local path)?
pub fn is_remote(location: &str) -> bool {
    location.starts_with("imgstores://") || location.starts_with("imgstore://")
}

/// The HTTP base URL of a server location, or why it is not one.
pub fn base_url(location: &str) -> std::result::Result<(String, bool), String> {
    let (tls, rest) = if let Some(r) = location.strip_prefix("imgstores://") {
        (true, r)
    } else if let Some(r) = location.strip_prefix("imgstore://") {
        (false, r)
    } else {
        return Err(format!("{location} is not an imgstores:// URL"));
    };
    let host = rest.trim_end_matches('/');
    if host.is_empty() || host.contains('/') || host.contains('@') || host.contains('?') {
        return Err(format!(
            "{location}: expected imgstores://HOST[:PORT]/ (one repository per server)"
        ));
    }
    let has_port = match host.rfind(':') {
        Some(i) => !host.ends_with(']') && host[i + 1..].chars().all(|c| c.is_ascii_digit()),
        None => false,
    };
    let host = if has_port {
        host.to_string()
    } else {
        format!("{host}:{}", proto::DEFAULT_PORT)
    };
    Ok((
        format!("{}://{host}", if tls { "https" } else { "http" }),
        tls,
    ))
}

/// The spelling of a server location its identity is recorded under
/// ([`known::KnownRepos`]): scheme, lower-case host, explicit port, one
/// slash — `imgstores://Backup.example/` and `imgstores://backup.example:8420`
/// are one server.
pub fn canonical_url(location: &str) -> std::result::Result<String, String> {
    let (base, tls) = base_url(location)?;
    let host = base
        .split_once("://")
        .map(|(_, h)| h)
        .unwrap_or(&base)
        .to_ascii_lowercase();
    Ok(format!(
        "{}://{host}/",
        if tls { "imgstores" } else { "imgstore" }
    ))
}

/// A repository on an `imgstore server`.
pub struct RemoteRepo {
    conn: Arc<Conn>,
    hello: proto::Hello,
    /// The hello as the server sent it (or, started from the client's
    /// cache, as the cache kept it: the server's is checked against it).
    hello_bytes: Vec<u8>,
    /// What the last successful commit stored: the snapshot's id, its
    /// record and its pages, for the client's cache.
    last_commit: Mutex<Option<Committed>>,
    codec: imgstore_repo::Codec,
    /// The codec of the current backup session's namespace, if it tags.
    /// Region uploads in flight: at most twice the token's upload share
    /// ([`proto::Hello::uploads`]), so that while the server reads one
    /// share the next is on its way. The others wait at the server's gate
    /// with their bodies in the connection's window; the server's stream
    /// window (an eighth of its connection window) keeps them from filling
    /// it and starving the uploads being read.
    uploads: Arc<Slots>,
    /// Region uploads sent whose answers have not been read yet (a server
    /// that takes commits ahead of them: [`proto::Hello::awaits_uploads`]).
    pending: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

/// What a commit stored: the snapshot's id, its record, its pages (as
/// stored, in the record's order).
pub type Committed = (Id, Vec<u8>, Vec<Vec<u8>>);

/// Raw answers to `GET /v1/snapshots` and `GET /v1/witnesses`, and
/// when they came.
#[derive(Default)]
struct Prefetched {
    snapshots: Option<Vec<u8>>,
    witnesses: Option<Vec<u8>>,
    at: Option<Instant>,
}

/// How long a listing fetched with the hello stands in for a new one: a
/// command lists within milliseconds of connecting; a handle kept open
/// longer lists afresh, as if it had not fetched ahead.
const PREFETCH_FRESH: Duration = Duration::from_secs(2);

/// A counting semaphore: at most `max` holders at once.
struct Slots {
    held: Mutex<usize>,
    freed: std::sync::Condvar,
    max: usize,
}

impl Slots {
    fn new(max: usize) -> Slots {
        Slots {
            held: Mutex::new(0),
            freed: std::sync::Condvar::new(),
            max: max.max(1),
        }
    }

    /// Waits for a slot; it is given back when the guard drops.
    fn take(&self) -> SlotGuard<'_> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        while *held >= self.max {
            held = self.freed.wait(held).unwrap_or_else(|p| p.into_inner());
        }
        *held += 1;
        SlotGuard(self)
    }
}

struct SlotGuard<'a>(&'a Slots);

/// A slot held by a thread of its own.
struct OwnedSlot(Arc<Slots>);

impl OwnedSlot {
    fn take(slots: &Arc<Slots>) -> OwnedSlot {
        std::mem::forget(slots.take());
        OwnedSlot(slots.clone())
    }
}

impl Drop for OwnedSlot {
    fn drop(&mut self) {
        drop(SlotGuard(&self.0));
    }
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        *self.0.held.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        self.0.freed.notify_one();
    }
}

/// Receive window of one HTTP/2 stream: a region's `chunks/get` answer
/// (its compressed frames, a few MiB) arrives without waiting for a window
/// update.
const STREAM_WINDOW: u32 = 16 << 20;
/// Receive window of the connection: bytes the server may have in flight
/// to this client at once. 64 MiB covers 3.4 Gbit/s at 150 ms RTT.
const CONNECTION_WINDOW: u32 = 64 << 20;

/// Calls to keep in flight beyond one per core for a link of round-trip
/// time `rtt`: one per 10 ms, at most 32. A backup worker spends about
/// 50 ms of CPU on a changed 8 MiB region and one round trip
/// (`chunks/known`) waiting, its upload going on behind it
/// ([`Repository::uploads_in_flight`]); a restore worker one round trip
/// (`chunks/get`). So at 150 ms RTT, 15 more restore workers keep two
/// cores busy; a backup, whose workers only wait for `chunks/known`, takes
/// half as many. Each worker holds one region (8 MiB) and its frames,
/// which bounds the memory this costs: about 32 × 16 MiB at most.
fn in_flight_for(rtt: Duration) -> usize {
    ((rtt.as_micros() + 5_000) / 10_000).min(32) as usize
}

/// The connection: where, with which token, in which session.
pub struct Conn {
    location: String,
    base: String,
    client: reqwest::blocking::Client,
    /// Region uploads and commits go on a connection of their own: uploads
    /// waiting at the server's gate hold data in their connection's
    /// window, which must not stall the small calls (`chunks/known`) the
    /// workers wait on.
    upload_client: reqwest::blocking::Client,
    token: String,
    session: Mutex<Option<Session>>,
    /// Held while a lost session is replaced: the workers that find it
    /// lost at once open one new session, not one each.
    renewing: Mutex<()>,
    /// Sessions opened to replace lost ones, since the connection opened.
    renewals: AtomicU64,
    /// `renewals` when the regions a commit names were last known to be
    /// held for the current session (at its start, or by
    /// [`Repository::regions_to_resend`]).
    checked: AtomicU64,
    retry_for: Duration,
    /// The quickest small request seen: the link's round-trip time.
    rtt: Mutex<Option<Duration>>,
    limits: Limits,
    /// The listing asked for with the hello
    /// ([`RemoteOptions::prefetch_listing`]), each part taken by its first
    /// use, both dropped by a commit, a replacement or a forget.
    prefetched: Mutex<Prefetched>,
    /// The server lists snapshots in pages (its hello says so).
    paged_listing: std::sync::atomic::AtomicBool,
    /// The codec of the current backup session's namespace, if it tags.
    ns_codec: std::sync::RwLock<Option<imgstore_repo::Codec>>,
    /// A session being opened in the background
    /// ([`RemoteRepo::begin_session_ahead`]): the calls that need it wait.
    opening: Mutex<Option<std::thread::JoinHandle<Result<()>>>>,
    /// Why the last session opened in the background could not be.
    open_failed: Mutex<Option<RepoError>>,
    /// A connection started from the client's cache
    /// ([`RemoteRepo::connect_ahead`]): where its check stands.
    ahead: Mutex<Ahead>,
    ahead_changed: std::sync::Condvar,
    /// The round-trip time the cache kept, until one is measured.
    rtt_hint: Option<Duration>,
    /// A session opened with the hello ([`RemoteOptions::session_for`]),
    /// not yet taken by a backup.
    early_session: Mutex<Option<Session>>,
    /// Index pages from the client's cache, by id: used when they open
    /// under their ids, instead of asking the server.
    page_cache: Mutex<std::collections::HashMap<Id, Vec<u8>>>,
    /// Region uploads sent in the current session.
    session_uploads: AtomicU64,
    /// The first failure of an upload whose answer came after its call
    /// returned: the next upload, or the commit, reports it.
    upload_failed: Mutex<Option<RepoError>>,
    /// Regions whose upload, answered after its call returned, named a
    /// chunk the server no longer had (after a restart): the commit fails
    /// `missing`, and [`Repository::regions_to_resend`] names them.
    lost_uploads: Mutex<Vec<Id>>,
}

/// Where a connection started from the client's cache stands. The backup
/// runs meanwhile; nothing commits until it is [`Ahead::Confirmed`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ahead {
    /// Not started from the cache: nothing to check.
    Off,
    /// The server's hello and listing are on their way.
    Fetching,
    /// The server sent the same hello; its listing awaits the caller's
    /// check ([`RemoteRepo::confirm_ahead`]).
    Fetched,
    Confirmed,
    /// The server's answers differ from the cache (why): every later
    /// call fails with [`RepoError::Outdated`].
    Stale(String),
}

/// The backup session calls are made in.
#[derive(Clone, Debug)]
struct Session {
    id: String,
    image: String,
    namespace: Option<String>,
    /// Its commit ended it on the server ([`proto::Hello::commit_ends_session`]).
    ended: bool,
    /// Its id was chosen here and its opening not answered yet: calls in
    /// it name the image too (`imgstore-image`, the server opens it for
    /// the first that comes) and do not wait for the opening.
    provisional: bool,
}

/// How often an HTTP/2 connection with nothing received lately is pinged.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a ping may go unanswered before the connection counts as dead
/// (its requests fail, and are retried on a new one).
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Below HTTP: how long sent data may stay unacknowledged, and when an
/// idle connection's peer is first probed (then every 5 s, 3 times).
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);
const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(15);

impl std::ops::Deref for RemoteRepo {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        &self.conn
    }
}

enum Body {
    None,
    /// Bytes (cloned per attempt without copying).
    Bytes(bytes::Bytes),
    Json(serde_json::Value),
    /// A commit sent ahead of the answers to `awaits` uploads of session
    /// `session` (the header goes only with that session: sent again in a
    /// new one, it awaits nothing).
    Ahead {
        bytes: bytes::Bytes,
        session: String,
        awaits: u64,
    },
}

impl RemoteRepo {
    /// Connects, checks the protocol version and the token.
    pub fn connect(opts: RemoteOptions) -> Result<RemoteRepo> {
        RemoteRepo::open(opts, None)
    }

    /// Connects from the client's cache: the repository is the one `cached`
    /// describes, at once, while the real hello (and the listing, when
    /// asked for) are fetched in the background. Over a link that is the
    /// first round trip saved: a backup starts reading, hashing and asking
    /// before the server has answered anything.
    ///
    /// The server's hello must be byte for byte the cached one, and the
    /// caller checks the listing (for a backup: that it picks the same
    /// parent) and says so with [`RemoteRepo::confirm_ahead`] or
    /// [`RemoteRepo::refuse_ahead`]. Until it is confirmed nothing commits
    /// (a commit waits); once either differs, every call that writes fails
    /// with [`RepoError::Outdated`], and the caller starts again with
    /// [`RemoteRepo::connect`].
    pub fn connect_ahead(
        opts: RemoteOptions,
        cached: &imgstore_format::cache::CachedHello,
    ) -> Result<RemoteRepo> {
        RemoteRepo::open(opts, Some(cached))
    }

    fn open(
        opts: RemoteOptions,
        cached: Option<&imgstore_format::cache::CachedHello>,
    ) -> Result<RemoteRepo> {
        let (base, use_tls) = base_url(&opts.url).map_err(RepoError::Invalid)?;
        // The TLS config is always given, with its provider (ring): reqwest
        // built without one would look for a process-wide default, and
        // panic ("No provider set") when there is none — it did for
        // `imgstore://`. Plain HTTP gets a config that trusts nothing, and
        // no redirect is followed (the protocol has none), so an answer
        // cannot send the client elsewhere.
        let config = if use_tls {
            tls::client_config(&opts)
        } else {
            tls::plain_config()
        }
        .map_err(|detail| RepoError::Unreachable {
            url: opts.url.clone(),
            detail,
        })?;
        // Under a download limit the windows shrink to a quarter second of
        // the rate: the server cannot run further ahead of the paced reads
        // than that (and a quarter second still covers the round trip of
        // any link under 250 ms at the full rate).
        let (stream_window, connection_window) = match &opts.limits.download {
            Some(rate) => {
                let w =
                    (rate.bytes_per_second() / 4).clamp(64 << 10, CONNECTION_WINDOW as u64) as u32;
                (w.min(STREAM_WINDOW), w)
            }
            None => (STREAM_WINDOW, CONNECTION_WINDOW),
        };
        let builder = || {
            // Dead-connection detection is configured on the async builder
            // the blocking one wraps (the blocking builder does not expose it).
            let alive = reqwest::Client::builder()
                .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                .http2_keep_alive_timeout(KEEPALIVE_TIMEOUT)
                .http2_keep_alive_while_idle(true)
                .tcp_keepalive(TCP_KEEPALIVE_IDLE)
                .tcp_keepalive_interval(Duration::from_secs(5))
                .tcp_keepalive_retries(3)
                .tcp_user_timeout(TCP_USER_TIMEOUT);
            reqwest::blocking::ClientBuilder::from(alive)
                // One connection for every request (the server speaks
                // HTTP/2): the hello and the listing sent together share
                // it, instead of opening one each.
                .http2_prior_knowledge()
                .connect_timeout(Duration::from_secs(10))
                .timeout(Duration::from_secs(600))
                .pool_idle_timeout(Duration::from_secs(60))
                // HTTP/2 flow control: how much the server may send before this
                // client has read it. hyper's defaults (2 MiB a stream, 5 MiB a
                // connection) cap a restore at 5 MiB per round trip (33 MB/s at
                // 150 ms RTT) and cost a chunks/get answer larger than 2 MiB an
                // extra round trip. The answers are read as they arrive, so
                // the windows bound memory only while the reader is slower
                // than the link.
                .http2_initial_stream_window_size(stream_window)
                .http2_initial_connection_window_size(connection_window)
                .redirect(reqwest::redirect::Policy::none())
                .user_agent(concat!("imgstore/", env!("CARGO_PKG_VERSION")))
                .use_preconfigured_tls(config.clone())
        };
        let build = || {
            builder().build().map_err(|e| RepoError::Unreachable {
                url: opts.url.clone(),
                detail: e.to_string(),
            })
        };
        let conn = Conn {
            location: opts.url.clone(),
            base,
            client: build()?,
            upload_client: build()?,
            token: opts.token.trim().to_string(),
            session: Mutex::new(None),
            renewing: Mutex::new(()),
            renewals: AtomicU64::new(0),
            checked: AtomicU64::new(0),
            retry_for: opts.retry_for,
            rtt: Mutex::new(None),
            limits: opts.limits.clone(),
            prefetched: Mutex::new(Prefetched::default()),
            paged_listing: false.into(),
            ns_codec: Default::default(),
            opening: Mutex::new(None),
            open_failed: Mutex::new(None),
            ahead: Mutex::new(if cached.is_some() {
                Ahead::Fetching
            } else {
                Ahead::Off
            }),
            ahead_changed: std::sync::Condvar::new(),
            rtt_hint: cached.map(|c| Duration::from_micros(c.rtt_us)),
            page_cache: Default::default(),
            early_session: Mutex::new(None),
            session_uploads: AtomicU64::new(0),
            upload_failed: Mutex::new(None),
            lost_uploads: Mutex::new(Vec::new()),
        };
        if let Some(cached) = cached {
            let conn = Arc::new(conn);
            let hello = RemoteRepo::from_hello(&conn, cached.hello.clone())?;
            let (c, want, listing) = (conn.clone(), cached.hello.clone(), opts.prefetch_listing);
            std::thread::spawn(move || c.fetch_ahead(&want, listing));
            return Ok(hello);
        }
        // The hello and the listing (`Conn::hello_and_listing`), and the
        // backup's session at the same time when asked for.
        let (body, prefetched) = std::thread::scope(|s| {
            if let Some(image) = &opts.session_for {
                s.spawn(|| {
                    if let Ok(session) = conn.open_session(image, &[]) {
                        *conn.early_session.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some(session);
                    }
                });
            }
            conn.hello_and_listing(opts.prefetch_listing)
        });
        let body = body?;
        *conn.prefetched.lock().unwrap_or_else(|p| p.into_inner()) = prefetched;
        RemoteRepo::from_hello(&Arc::new(conn), body)
    }

    /// The repository the hello `body` describes, on `conn`.
    fn from_hello(conn: &Arc<Conn>, body: Vec<u8>) -> Result<RemoteRepo> {
        let hello: proto::Hello = conn.json(&body)?;
        conn.paged_listing.store(hello.paged_snapshots, SeqCst);
        if hello.protocol != proto::VERSION {
            return Err(RepoError::Remote {
                url: conn.location.clone(),
                detail: format!(
                    "the server speaks protocol {}, this imgstore {}: use matching versions",
                    hello.protocol,
                    proto::VERSION
                ),
            });
        }
        let uploads = Arc::new(Slots::new(2 * hello.uploads.unwrap_or(4) as usize));
        Ok(RemoteRepo {
            conn: conn.clone(),
            hello,
            hello_bytes: body,
            last_commit: Mutex::new(None),
            codec: imgstore_repo::Codec::Plain,
            uploads,
            pending: Mutex::new(Vec::new()),
        })
    }

    /// The round-trip time: the quickest small request seen (listing the
    /// snapshots, which every command that backs up or reads does first),
    /// or one `/v1/health` request when there was none yet.
    pub fn rtt(&self) -> Duration {
        let seen = *self.conn.rtt.lock().unwrap_or_else(|p| p.into_inner());
        seen.or(self.conn.rtt_hint).unwrap_or_else(|| {
            let t = Instant::now();
            self.conn.timed(|| self.conn.ping());
            t.elapsed()
        })
    }

    /// Uses `codec` (the keys of an encrypted repository): the client seals
    /// and opens; the server only ever sees sealed bytes.
    pub fn with_codec(mut self, codec: imgstore_repo::Codec) -> RemoteRepo {
        self.codec = codec;
        self
    }

    /// The role and namespaces of this client's token.
    pub fn role(&self) -> (Role, &[String]) {
        (self.hello.role, &self.hello.namespaces)
    }

    /// Started from the cache: the caller found the server's listing to
    /// agree with it (for a backup: the same parent). Commits may go on.
    pub fn confirm_ahead(&self) {
        self.conn
            .set_ahead(|a| (*a == Ahead::Fetched).then_some(Ahead::Confirmed));
    }

    /// Started from the cache: the caller found the server's listing to
    /// differ from it (`why`). Every later write fails.
    pub fn refuse_ahead(&self, why: &str) {
        self.conn.set_ahead(|a| match a {
            Ahead::Off | Ahead::Stale(_) => None,
            _ => Some(Ahead::Stale(why.to_string())),
        });
    }

    /// Why the cache this connection started from is out of date, once
    /// found so.
    pub fn outdated(&self) -> Option<String> {
        match &*self.conn.ahead.lock().unwrap_or_else(|p| p.into_inner()) {
            Ahead::Stale(why) => Some(why.clone()),
            _ => None,
        }
    }

    /// Whether this connection started from the client's cache.
    pub fn started_ahead(&self) -> bool {
        *self.conn.ahead.lock().unwrap_or_else(|p| p.into_inner()) != Ahead::Off
    }

    /// The hello to keep in the client's cache, with the round-trip time
    /// measured (or the one kept), once the server's hello is known to be
    /// this one.
    pub fn hello_to_cache(&self) -> Option<imgstore_format::cache::CachedHello> {
        let ahead = self
            .conn
            .ahead
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if !matches!(ahead, Ahead::Off | Ahead::Fetched | Ahead::Confirmed) {
            return None;
        }
        let rtt =
            (*self.conn.rtt.lock().unwrap_or_else(|p| p.into_inner())).or(self.conn.rtt_hint)?;
        Some(imgstore_format::cache::CachedHello {
            rtt_us: rtt.as_micros() as u64,
            hello: self.hello_bytes.clone(),
        })
    }

    /// Index pages from the client's cache: read from here instead of the
    /// server when they open under their ids (the server is asked for any
    /// that does not).
    pub fn use_cached_pages(&self, pages: Vec<(Id, Vec<u8>)>) {
        self.conn
            .page_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(pages);
    }

    /// What the last successful commit stored: the snapshot's id, its
    /// record and its pages as stored (in the record's order).
    pub fn take_last_commit(&self) -> Option<Committed> {
        self.last_commit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Opens the write session a backup of `image` runs in: the server pins
    /// what the backup relies on until it commits.
    pub fn begin_session(&self, image: &str) -> Result<()> {
        self.end_session();
        let session = self.open_session(image, &[])?;
        self.conn.install(session, &self.codec);
        Ok(())
    }

    /// Opens the session as [`RemoteRepo::begin_session`] does, in the
    /// background, the server pinning the regions of `pin_pages` (the
    /// parent's index pages) for it as it opens; and opens the upload
    /// connection meanwhile. Over a link that is a round trip saved: the
    /// backup reads its parent's pages (outside the session: they are
    /// pinned already) while the session opens. The calls that need the
    /// session wait for it, and [`Repository::ready`] reports a session
    /// that could not be opened.
    pub fn begin_session_ahead(&self, image: &str, pin_pages: &[Id]) {
        self.end_session();
        // Opened with the hello: the parent's pages, read within it, are
        // pinned as they are read.
        if let Some(s) = self.take_early_session() {
            if s.image == image {
                self.conn.install(s, &self.codec);
                self.warm_uploads();
                return;
            }
            self.conn
                .early_session
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .replace(s);
        }
        let pins: Vec<Id> = if pin_pages.len() <= limits::PIN_PAGES {
            pin_pages.to_vec()
        } else {
            // Too many to pin at the opening: read within the session.
            Vec::new()
        };
        let (conn, codec, image) = (self.conn.clone(), self.codec.clone(), image.to_string());
        let wait = pins.len() < pin_pages.len();
        // A server that takes client-chosen ids: the session is named now,
        // and the first `chunks/known` goes without waiting for the opening
        // (a plain repository's: an encrypted namespace's chunk ids wait for
        // its tag, which the opening's answer says).
        let chosen = (self.hello.client_session_ids
            && !self.codec.is_sealed()
            && image.bytes().all(|b| b.is_ascii_graphic()))
        .then(|| {
            let mut raw = [0u8; 8];
            getrandom::fill(&mut raw).ok()?;
            Some(format!("{:016x}", u64::from_le_bytes(raw).max(1)))
        })
        .flatten();
        if let Some(id) = &chosen {
            self.conn.install(
                Session {
                    id: id.clone(),
                    image: image.clone(),
                    namespace: None,
                    ended: false,
                    provisional: true,
                },
                &self.codec,
            );
        }
        let handle = std::thread::spawn(move || {
            let session = conn.open_session_as(&image, &pins, chosen.as_deref())?;
            conn.confirm(session, &codec);
            Ok(())
        });
        *self
            .conn
            .open_failed
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
        *self.conn.opening.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        self.warm_uploads();
        if wait {
            let _ = self.conn.settle();
        }
    }

    /// The upload connection's TLS handshake and HTTP/2 windows, before
    /// the first region needs them (its answer is not waited for). A
    /// hello, not a health check: the server gives a connection that never
    /// showed a token 10 s, and the first region may come later.
    fn warm_uploads(&self) {
        let (client, url, token) = (
            self.conn.upload_client.clone(),
            format!("{}{}", self.conn.base, proto::paths::HELLO),
            self.conn.token.clone(),
        );
        std::thread::spawn(move || {
            if let Ok(r) = client.get(url).bearer_auth(&token).send() {
                let _ = read_bounded(r, None);
            }
        });
    }

    /// Ends the session (its uncommitted uploads become garbage for gc).
    pub fn end_session(&self) {
        let _ = self.conn.settle();
        let s = self
            .session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        // A commit that ended it on the server left nothing to close.
        if let Some(s) = s.filter(|s| !s.ended) {
            self.close_session(&s);
        }
    }

    /// `DELETE /v1/sessions/{id}`, its outcome ignored (an unclosed
    /// session idles out).
    fn close_session(&self, s: &Session) {
        let _ = self.call(
            reqwest::Method::DELETE,
            &proto::paths::session(&s.id),
            Body::None,
            false,
        );
    }

    /// The session opened with the hello, if no backup took it yet.
    fn take_early_session(&self) -> Option<Session> {
        self.conn
            .early_session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// The session's commit succeeded: a server that ends the session
    /// with it needs no `DELETE`.
    /// (A later call in it finds it gone and goes on in a new one.)
    fn committed(&self) {
        if self.hello.commit_ends_session {
            if let Some(s) = self
                .session
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_mut()
            {
                s.ended = true;
            }
        }
    }

    /// A region upload; with `later`, answered on a thread of its own
    /// (see [`Repository::put_region_settled`]).
    fn put_region_as(
        &self,
        id: &Id,
        encoded: &[u8],
        frames: &Frames,
        settled: Box<dyn FnOnce(bool) + Send>,
        later: bool,
    ) -> Result<PutOutcome> {
        let body = proto::encode_put_region(
            encoded,
            frames.iter().map(|(cid, (frame, raw))| proto::NewFrame {
                id: *cid,
                raw_len: *raw,
                frame,
            }),
        );
        let refused = self.check_ahead(false).err().or_else(|| {
            self.upload_failed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .map(RepoError::again)
        });
        if let Some(e) = refused {
            settled(false);
            return Err(e);
        }
        if !later {
            let _slot = self.uploads.take();
            let out = self.put_region_call(&proto::paths::region(id), body.into());
            settled(out.is_ok());
            return out;
        }
        // The server takes a commit ahead of its uploads' answers: this
        // call returns once the upload is on its way (a slot bounds how
        // many are), and its answer is read on a thread of its own. What
        // it reports is what was sent (the server's own counts differ
        // only when another backup stored the same chunks meanwhile).
        let predicted = PutOutcome {
            region_new: true,
            new_chunks: frames.len() as u64,
            new_bytes: frames.values().map(|(f, _)| f.len() as u64).sum::<u64>()
                + encoded.len() as u64,
        };
        let slot = OwnedSlot::take(&self.uploads);
        self.session_uploads.fetch_add(1, SeqCst);
        let (conn, path, body, region) = (
            self.conn.clone(),
            proto::paths::region(id),
            bytes::Bytes::from(body),
            *id,
        );
        let handle = std::thread::spawn(move || {
            let out = conn.put_region_call(&path, body);
            drop(slot);
            settled(out.is_ok());
            if let Err(RepoError::Missing {
                kind: ObjectKind::Chunk,
                ..
            }) = out
            {
                let mut lost = conn.lost_uploads.lock().unwrap_or_else(|p| p.into_inner());
                lost.push(region);
            } else if let Err(e) = out {
                let mut first = conn.upload_failed.lock().unwrap_or_else(|p| p.into_inner());
                if first.is_none() {
                    *first = Some(e);
                }
            }
        });
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.retain(|h| !h.is_finished());
        pending.push(handle);
        Ok(predicted)
    }

    /// The failure of an upload answered after its call returned, once
    /// (a lost chunk is not one: [`Repository::regions_to_resend`] names
    /// its region).
    fn upload_failure(&self) -> Result<()> {
        match self
            .upload_failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Waits for the answers of the uploads still on their way.
    fn join_uploads(&self) {
        let handles = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        for h in handles {
            let _ = h.join();
        }
    }

    /// Sessions opened so far to replace ones the server lost.
    pub fn sessions_renewed(&self) -> u64 {
        self.renewals.load(SeqCst)
    }
}

impl Conn {
    /// The opening of the current session was answered: `session` is what
    /// it says (the same id when the client chose it: the calls made in
    /// it meanwhile count).
    fn confirm(&self, session: Session, codec: &imgstore_repo::Codec) {
        {
            let mut current = self.session.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = current
                .as_mut()
                .filter(|c| c.provisional && c.id == session.id)
            {
                c.namespace = session.namespace;
                c.provisional = false;
                return;
            }
        }
        self.install(session, codec);
    }

    /// Makes `session` the current one.
    fn install(&self, session: Session, codec: &imgstore_repo::Codec) {
        // In a namespace of an encrypted repository the backup's chunk ids
        // carry the namespace's tag: the server accepts no others from it.
        *self.ns_codec.write().unwrap_or_else(|p| p.into_inner()) = session
            .namespace
            .as_deref()
            .filter(|_| codec.is_sealed())
            .map(|ns| codec.in_namespace(ns));
        self.checked.store(self.renewals.load(SeqCst), SeqCst);
        self.session_uploads.store(0, SeqCst);
        *self.session.lock().unwrap_or_else(|p| p.into_inner()) = Some(session);
    }

    /// Waits for a session being opened in the background; its error, if
    /// it could not be opened (to every caller after, too).
    fn settle(&self) -> Result<()> {
        // Held until the session is installed: a caller that comes while
        // another waits must wait too, not find nothing pending and go on
        // without the session.
        let mut opening = self.opening.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = opening.take() {
            let out = h.join().unwrap_or_else(|_| {
                Err(self.broken("the thread opening the session panicked".into()))
            });
            if let Err(e) = &out {
                *self.open_failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.again());
            }
            return out;
        }
        match &*self.open_failed.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e.again()),
            None => Ok(()),
        }
    }

    fn json<T: serde::de::DeserializeOwned>(&self, body: &[u8]) -> Result<T> {
        serde_json::from_slice(body).map_err(|e| self.broken(format!("unexpected answer: {e}")))
    }

    /// A request body, paced by the upload limit when there is one.
    fn outgoing(&self, bytes: bytes::Bytes) -> reqwest::blocking::Body {
        match &self.limits.upload {
            Some(rate) => {
                let len = bytes.len() as u64;
                reqwest::blocking::Body::sized(
                    Paced::new(std::io::Cursor::new(bytes), rate.clone()),
                    len,
                )
            }
            None => bytes.into(),
        }
    }

    /// Runs `f`, a small request, and keeps its time as the round-trip
    /// time when it is the quickest yet.
    fn timed<T>(&self, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let out = f();
        let took = t.elapsed();
        let mut rtt = self.rtt.lock().unwrap_or_else(|p| p.into_inner());
        if rtt.is_none_or(|r| took < r) {
            *rtt = Some(took);
        }
        out
    }

    /// `GET /v1/health` (no token, no body), its answer ignored.
    fn ping(&self) {
        if let Ok(r) = self
            .client
            .get(format!("{}{}", self.base, proto::paths::HEALTH))
            .send()
        {
            let _ = read_bounded(r, None);
        }
    }

    fn broken(&self, detail: String) -> RepoError {
        RepoError::Remote {
            url: self.location.clone(),
            detail,
        }
    }

    fn malformed(&self, e: proto::Malformed) -> RepoError {
        self.broken(e.to_string())
    }

    /// Opens a session for a backup of `image` (not yet the current one).
    fn open_session(&self, image: &str, pin_pages: &[Id]) -> Result<Session> {
        self.open_session_as(image, pin_pages, None)
    }

    /// [`Conn::open_session`] with the id `chosen` by this client.
    fn open_session_as(
        &self,
        image: &str,
        pin_pages: &[Id],
        chosen: Option<&str>,
    ) -> Result<Session> {
        let body = self.timed(|| {
            self.call(
                reqwest::Method::POST,
                proto::paths::SESSIONS,
                Body::Json(
                    serde_json::to_value(proto::SessionRequest {
                        image: image.into(),
                        pin_pages: pin_pages.iter().map(Id::to_hex).collect(),
                        id: chosen.map(str::to_string),
                    })
                    .expect("json"),
                ),
                true,
            )
        })?;
        let reply: proto::SessionReply = self.json(&body)?;
        Ok(Session {
            ended: false,
            id: reply.session,
            image: image.into(),
            namespace: reply.namespace,
            provisional: false,
        })
    }

    /// Replaces session `lost`, which the server no longer knows, by a new
    /// one for the same image (unless another thread already did).
    fn renew_session(&self, lost: &str) -> Result<()> {
        let _one = self.renewing.lock().unwrap_or_else(|p| p.into_inner());
        let old = match &*self.session.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(s) if s.id == lost => s.clone(),
            // Replaced meanwhile, or ended: the caller sends its request
            // again with whatever is current.
            _ => return Ok(()),
        };
        let new = self.open_session(&old.image, &[])?;
        if new.namespace != old.namespace {
            // The chunk ids sent so far carry the old namespace's tag.
            return Err(self.broken(format!(
                "the server lost backup session {lost} and now files image {:?} under namespace {:?}, not {:?}: start the backup again",
                old.image, new.namespace, old.namespace
            )));
        }
        *self.session.lock().unwrap_or_else(|p| p.into_inner()) = Some(new);
        self.session_uploads.store(0, SeqCst);
        self.renewals.fetch_add(1, SeqCst);
        Ok(())
    }

    /// One request with retries. `idempotent` calls are retried on
    /// transport failures and 429/502/503/504 until `retry_for` has passed;
    /// a call the server answers "no such session" for is sent again in a
    /// new session for the same image (see the crate docs).
    fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Body,
        idempotent: bool,
    ) -> Result<Vec<u8>> {
        self.call_on(&self.client, method, path, body, idempotent)
    }

    /// [`Conn::call`] on the upload connection.
    fn upload(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Body,
        idempotent: bool,
    ) -> Result<Vec<u8>> {
        self.call_on(&self.upload_client, method, path, body, idempotent)
    }

    /// [`Conn::call`] on `client`'s connection.
    fn call_on(
        &self,
        client: &reqwest::blocking::Client,
        method: reqwest::Method,
        path: &str,
        body: Body,
        idempotent: bool,
    ) -> Result<Vec<u8>> {
        // A call the server answers only within a session waits for one
        // being opened in the background.
        let in_session = path == proto::paths::CHUNKS_KNOWN
            || path == proto::paths::REGIONS_KNOWN
            || path == proto::paths::COMMIT
            || (method == reqwest::Method::PUT && path.starts_with(proto::paths::REGION_PREFIX));
        // A session whose id this client chose need not be waited for.
        let provisional = self
            .session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|s| s.provisional);
        if in_session && !provisional {
            self.settle()?;
        }
        let started = Instant::now();
        let mut delay = Duration::from_millis(100);
        let mut attempt = 0u32;
        let mut renewed = 0u32;
        // Bounded in time by `retry_for`, and in count: the backoff reaches
        // 5 s after 6 attempts, so this many are never reached in time.
        let max_attempts = 64 + (self.retry_for.as_secs() / 4).min(1 << 20) as u32;
        loop {
            attempt += 1;
            let mut req = client
                .request(method.clone(), format!("{}{path}", self.base))
                .bearer_auth(&self.token);
            // Opening a session is the one call that never runs in one; a
            // session whose opening is unanswered is named only by the
            // calls that need it (others, such as the parent's pages,
            // pinned by `pin_pages`, go without it: a token that may not
            // write gets the opening's refusal, not theirs).
            let (sent, image) = match path {
                proto::paths::SESSIONS => (None, None),
                _ if !in_session && provisional => (None, None),
                _ => self
                    .session
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_ref()
                    .map_or((None, None), |s| {
                        (Some(s.id.clone()), s.provisional.then(|| s.image.clone()))
                    }),
            };
            if let Some(s) = &sent {
                req = req.header(proto::SESSION_HEADER, s.as_str());
            }
            if let Some(image) = &image {
                req = req.header(proto::IMAGE_HEADER, image.as_str());
            }
            req = match &body {
                Body::None => req,
                Body::Bytes(b) => req
                    .header("content-type", "application/octet-stream")
                    .body(self.outgoing(b.clone())),
                Body::Json(v) => req
                    .header("content-type", "application/json")
                    .body(self.outgoing(serde_json::to_vec(v).expect("json").into())),
                Body::Ahead {
                    bytes,
                    session,
                    awaits,
                } => {
                    let req = if sent.as_deref() == Some(session.as_str()) {
                        req.header(proto::AWAITS_HEADER, awaits.to_string())
                    } else {
                        req
                    };
                    req.header("content-type", "application/octet-stream")
                        .body(self.outgoing(bytes.clone()))
                }
            };
            // A 503 `busy` comes from the server's gate, before the body is
            // read: nothing was done, so even a commit may be sent again.
            let mut untouched = false;
            let failure = match req.send() {
                Ok(resp) => {
                    let status = resp.status();
                    match read_bounded(resp, self.limits.download.as_ref()) {
                        Ok(bytes) if status.is_success() => return Ok(bytes),
                        Ok(bytes) => {
                            let code = serde_json::from_slice::<ErrorBody>(&bytes)
                                .map(|e| e.code)
                                .unwrap_or_default();
                            // The server no longer knows the session (it
                            // restarted, or the session idled out): nothing
                            // was done, and the call goes on in a new one.
                            if let (410, "no_session", Some(lost)) =
                                (status.as_u16(), code.as_str(), &sent)
                            {
                                if renewed < MAX_RENEWALS {
                                    renewed += 1;
                                    self.renew_session(lost)?;
                                    continue;
                                }
                            }
                            let transient = matches!(status.as_u16(), 502..=504 | 429);
                            untouched = status.as_u16() == 503 && code == "busy";
                            let err = self.error_from(status.as_u16(), &bytes);
                            if !transient {
                                return Err(err);
                            }
                            err
                        }
                        Err(e) => self.unreachable(chain(&e)),
                    }
                }
                // A TLS handshake that refused the server will refuse it
                // again: no waiting.
                Err(e) if handshake_refused(&e) => return Err(self.unreachable(chain(&e))),
                Err(e) => self.unreachable(chain(&e)),
            };
            let elapsed = started.elapsed();
            if !(idempotent || untouched) || elapsed >= self.retry_for || attempt >= max_attempts {
                return Err(match failure {
                    RepoError::Unreachable { url, detail } if attempt > 1 => {
                        RepoError::Unreachable {
                            url,
                            detail: format!(
                                "{detail} (tried {attempt} times in {:.1} s)",
                                elapsed.as_secs_f64()
                            ),
                        }
                    }
                    other => other,
                });
            }
            // Jitter from the clock's low bits: clients that lost the same
            // server do not come back in lockstep. The last wait ends when
            // `retry_for` does, for one more try.
            let jitter = Duration::from_millis(u64::from(elapsed.subsec_nanos() % 100));
            std::thread::sleep((delay + jitter).min(self.retry_for - elapsed));
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    fn unreachable(&self, detail: String) -> RepoError {
        RepoError::Unreachable {
            url: self.location.clone(),
            detail,
        }
    }

    fn error_from(&self, status: u16, body: &[u8]) -> RepoError {
        let url = self.location.clone();
        let Ok(e) = serde_json::from_slice::<ErrorBody>(body) else {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            return RepoError::Remote {
                url,
                detail: format!("HTTP {status}: {}", text.trim()),
            };
        };
        let id = e.id.as_deref().and_then(|h| Id::from_hex(h).ok());
        let kind = e.kind.as_deref().and_then(|k| proto::parse_kind(k).ok());
        match (e.code.as_str(), kind, id) {
            ("missing", Some(kind), Some(id)) => RepoError::Missing { kind, id },
            ("no_snapshot", _, Some(id)) => RepoError::NoSnapshot { id },
            ("protected", _, Some(id)) => RepoError::Protected { id },
            ("corrupt", Some(kind), Some(id)) => RepoError::Corrupt {
                kind,
                id,
                source: imgstore_format::FormatError::Invalid {
                    what: "stored object",
                    why: e.message,
                },
            },
            ("corrupt", None, Some(id)) => RepoError::CorruptSnapshot {
                id,
                source: imgstore_format::FormatError::Invalid {
                    what: "snapshot record",
                    why: e.message,
                },
            },
            ("invalid", _, _) => RepoError::Invalid(e.message),
            ("unauthorized" | "forbidden", _, _) => RepoError::Denied {
                url,
                detail: e.message,
            },
            ("no_space", _, _) => RepoError::NoSpace {
                path: url.into(),
                detail: e.message,
            },
            _ => RepoError::Remote {
                url,
                detail: e.message,
            },
        }
    }

    /// A multi-get: `ids` asked `per_call` at a time (one POST of an id
    /// list each, in order), each answer turned by `decode` into one item
    /// per id it asked for.
    fn get_many<T>(
        &self,
        path: &str,
        ids: &[Id],
        per_call: usize,
        decode: impl Fn(&[u8], usize) -> Result<Vec<T>>,
    ) -> Result<Vec<T>> {
        let mut out = Vec::with_capacity(ids.len());
        for batch in ids.chunks(per_call) {
            let body = self.call(
                reqwest::Method::POST,
                path,
                Body::Bytes(proto::encode_ids(batch).into()),
                true,
            )?;
            out.extend(decode(&body, batch.len())?);
        }
        Ok(out)
    }

    fn records(&self, kind: ObjectKind, ids: &[Id]) -> Result<Vec<Vec<u8>>> {
        let path = match kind {
            ObjectKind::Page => proto::paths::PAGES,
            _ => proto::paths::REGIONS,
        };
        // Nothing asked, nothing sent: no round trip to time either (an
        // empty call once kept ~0 as the round-trip time, which shrank
        // every pipeline sized by it).
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        // Small calls (an index page is 16 KiB): one gives the round trip
        // when the listing came with the hello.
        self.timed(|| {
            self.get_many(path, ids, 256, |body, n| {
                proto::decode_records(body, n).map_err(|e| self.malformed(e))
            })
        })
    }

    fn scan(&self, what: proto::ScanWhat, f: &mut dyn FnMut(&[u8], &[u8])) -> Result<()> {
        let mut after: Option<String> = None;
        for _ in 0..u32::MAX {
            let req = proto::ScanRequest {
                what,
                after: after.clone(),
            };
            let body = self.call(
                reqwest::Method::POST,
                proto::paths::SCAN,
                Body::Json(serde_json::to_value(req).expect("json")),
                true,
            )?;
            let (more, entries) = proto::decode_scan(&body).map_err(|e| self.malformed(e))?;
            for (k, v) in &entries {
                f(k, v);
            }
            match (more, entries.last()) {
                (true, Some((k, _))) => {
                    after = Some(k.iter().map(|b| format!("{b:02x}")).collect())
                }
                _ => return Ok(()),
            }
        }
        Ok(())
    }

    fn snapshot_list(&self) -> Result<Vec<(Id, Vec<u8>)>> {
        let early = self.prefetch().snapshots.take();
        if let Some(b) = early {
            return proto::decode_snapshots(&b).map_err(|e| self.malformed(e));
        }
        if !self.paged_listing.load(SeqCst) {
            let body = self.timed(|| {
                self.call(
                    reqwest::Method::GET,
                    proto::paths::SNAPSHOTS,
                    Body::None,
                    true,
                )
            })?;
            return proto::decode_snapshots(&body).map_err(|e| self.malformed(e));
        }
        // In pages: a listing past one answer's limit (a host that
        // committed hundreds of 1 MiB records) is still read whole.
        let mut out: Vec<(Id, Vec<u8>)> = Vec::new();
        let mut bytes = 0u64;
        loop {
            let after = out.last().map(|(id, _)| id.to_hex()).unwrap_or_default();
            let path = format!("{}?after={after}", proto::paths::SNAPSHOTS);
            let body = self.timed(|| self.call(reqwest::Method::GET, &path, Body::None, true))?;
            let (more, page) = proto::decode_snapshot_page(&body).map_err(|e| self.malformed(e))?;
            if more && page.is_empty() {
                return Err(
                    self.broken("an empty page of the snapshot listing said more follow".into())
                );
            }
            add_page(&mut out, &mut bytes, page).map_err(|e| self.broken(e))?;
            if !more {
                return Ok(out);
            }
        }
    }

    fn prefetch(&self) -> std::sync::MutexGuard<'_, Prefetched> {
        // Started from the cache: the listing is on its way.
        {
            let mut a = self.ahead.lock().unwrap_or_else(|p| p.into_inner());
            while *a == Ahead::Fetching {
                a = self
                    .ahead_changed
                    .wait(a)
                    .unwrap_or_else(|p| p.into_inner());
            }
        }
        let mut p = self.prefetched.lock().unwrap_or_else(|p| p.into_inner());
        if p.at.is_some_and(|t| t.elapsed() > PREFETCH_FRESH) {
            *p = Prefetched::default();
        }
        p
    }

    /// Started from the cache ([`RemoteRepo::connect_ahead`]): fetches the
    /// server's hello (and listing) and compares the hello with `want`.
    fn fetch_ahead(&self, want: &[u8], listing: bool) {
        let (hello, prefetched) = self.hello_and_listing(listing);
        let next = match hello {
            Ok(body) if body == want => {
                *self.prefetched.lock().unwrap_or_else(|p| p.into_inner()) = prefetched;
                Ahead::Fetched
            }
            Ok(_) => Ahead::Stale("the server's hello is not the one cached".into()),
            Err(e) => Ahead::Stale(format!("its hello failed: {e}")),
        };
        self.set_ahead(|a| (*a == Ahead::Fetching).then_some(next));
    }

    /// `GET /v1/hello`, retried like any read (a server that is not up yet
    /// is waited for), and with `listing` the snapshot listing and the
    /// witnesses at the same time (they send nothing but the token, which
    /// the hello sends too): their answers are kept undecoded until the
    /// hello has been checked. A listing that failed is simply not there.
    fn hello_and_listing(&self, listing: bool) -> (Result<Vec<u8>>, Prefetched) {
        let get = |path| self.call(reqwest::Method::GET, path, Body::None, true);
        std::thread::scope(|s| {
            let l = listing.then(|| {
                (
                    s.spawn(|| get(proto::paths::SNAPSHOTS).ok()),
                    s.spawn(|| get(proto::paths::WITNESSES).ok()),
                )
            });
            let hello = get(proto::paths::HELLO);
            let prefetched = match l {
                Some((snapshots, witnesses)) => Prefetched {
                    snapshots: snapshots.join().unwrap_or(None),
                    witnesses: witnesses.join().unwrap_or(None),
                    at: Some(Instant::now()),
                },
                None => Prefetched::default(),
            };
            (hello, prefetched)
        })
    }

    /// `PUT /v1/regions/{id}` with `body` on the upload connection, and its
    /// answer.
    fn put_region_call(&self, path: &str, body: bytes::Bytes) -> Result<PutOutcome> {
        self.upload(reqwest::Method::PUT, path, Body::Bytes(body), true)
            .and_then(|reply| self.json::<PutOutcome>(&reply))
    }

    /// Moves the check on to what `f` says (nothing when it says `None`).
    fn set_ahead(&self, f: impl FnOnce(&Ahead) -> Option<Ahead>) {
        let mut a = self.ahead.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(next) = f(&a) {
            *a = next;
            self.ahead_changed.notify_all();
        }
    }

    /// Fails with [`RepoError::Outdated`] once the cache this connection
    /// started from was found out of date; with `until_confirmed`, first
    /// waits until it is confirmed or found so (bounded: a check that
    /// never comes counts as a failed one).
    fn check_ahead(&self, until_confirmed: bool) -> Result<()> {
        let deadline = Instant::now() + self.retry_for + Duration::from_secs(120);
        let mut a = self.ahead.lock().unwrap_or_else(|p| p.into_inner());
        while until_confirmed && matches!(*a, Ahead::Fetching | Ahead::Fetched) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                *a = Ahead::Stale("the cached parent was never checked".into());
                break;
            }
            a = self
                .ahead_changed
                .wait_timeout(a, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        match &*a {
            Ahead::Stale(why) => Err(RepoError::Outdated {
                url: self.location.clone(),
                detail: why.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// The listing changes: what was fetched ahead is stale.
    fn listing_changes(&self) {
        *self.prefetch() = Prefetched::default();
    }
}

/// Largest answer the client accepts: a server (or whatever answers in
/// its place) cannot make it allocate more.
const ANSWER_LIMIT: u64 = limits::FRAMES_REPLY_BYTES as u64 + (1 << 20);

/// Reads an answer's body, at most [`ANSWER_LIMIT`] bytes, paced by the
/// download limit when there is one (the server is then held back by the
/// connection's flow control).
fn read_bounded(
    resp: reqwest::blocking::Response,
    limit: Option<&Arc<Rate>>,
) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    if resp.content_length().is_some_and(|n| n > ANSWER_LIMIT) {
        return Err(std::io::Error::other(
            "the answer passes the protocol's size limit",
        ));
    }
    let mut out = Vec::new();
    match limit {
        Some(rate) => Paced::new(resp, rate.clone())
            .take(ANSWER_LIMIT + 1)
            .read_to_end(&mut out)?,
        None => resp.take(ANSWER_LIMIT + 1).read_to_end(&mut out)?,
    };
    if out.len() as u64 > ANSWER_LIMIT {
        return Err(std::io::Error::other(
            "the answer passes the protocol's size limit",
        ));
    }
    Ok(out)
}

/// Appends one page of the snapshot listing to `out`: pages move forward
/// through the ids, and the whole listing is bounded as answers are, so a
/// server cannot keep the client reading pages for ever.
fn add_page(
    out: &mut proto::Listed,
    bytes: &mut u64,
    page: proto::Listed,
) -> std::result::Result<(), String> {
    let mut last = out.last().map(|(id, _)| *id);
    for (id, _) in &page {
        if last.is_some_and(|l| *id <= l) {
            return Err(format!(
                "the snapshot listing went back to {id}: its pages must follow each other"
            ));
        }
        last = Some(*id);
    }
    *bytes += page.iter().map(|(_, r)| r.len() as u64 + 36).sum::<u64>();
    if out.len() + page.len() > limits::SNAPSHOTS || *bytes > LISTING_LIMIT {
        return Err(format!(
            "the snapshot listing passes {} snapshots or {} GiB",
            limits::SNAPSHOTS,
            LISTING_LIMIT >> 30
        ));
    }
    out.extend(page);
    Ok(())
}

/// The most a paged snapshot listing may hold in all: four whole-listing
/// answers (a server past it is refused, not read into memory for ever).
const LISTING_LIMIT: u64 = 4 * ANSWER_LIMIT;

/// How many times one call may find its session lost and replace it.
const MAX_RENEWALS: u32 = 4;

/// Whether a request failed in a TLS handshake that refused the server
/// (a certificate that is not the pinned one, an alert): waiting does not
/// change that. A connection refused, reset or cut mid-handshake is an I/O
/// error instead, and is retried.
fn handshake_refused(e: &reqwest::Error) -> bool {
    fn rustls_in(mut cur: Option<&(dyn std::error::Error + 'static)>) -> bool {
        // Bounded: error chains are short, and each step goes deeper.
        for _ in 0..32 {
            let Some(c) = cur else { return false };
            if c.is::<rustls::Error>() {
                return true;
            }
            // An I/O error's `source` skips the error it wraps (and the
            // connector wraps rustls's I/O error in another).
            cur = match c.downcast_ref::<std::io::Error>() {
                Some(io) => io
                    .get_ref()
                    .map(|inner| inner as &(dyn std::error::Error + 'static)),
                None => c.source(),
            };
        }
        false
    }
    e.is_connect() && rustls_in(Some(e))
}

/// An error with its causes, on one line (reqwest hides the interesting
/// part — refused, reset, certificate — in the source chain).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

impl Drop for RemoteRepo {
    fn drop(&mut self) {
        self.end_session();
        // A session opened with the hello that no backup took counts
        // against the token's sessions until it idles out: closed too.
        if let Some(s) = self.take_early_session() {
            self.close_session(&s);
        }
    }
}

impl Repository for RemoteRepo {
    fn config(&self) -> &RepoConfig {
        &self.hello.config
    }

    fn location(&self) -> String {
        self.location.clone()
    }

    fn codec(&self) -> &imgstore_repo::Codec {
        &self.codec
    }

    fn chunk_id(&self, plaintext: &[u8]) -> Id {
        // The namespace's tag is known once the session is: the first
        // chunks of an encrypted repository wait for it (a plain one's ids
        // carry no tag).
        if self.codec.is_sealed()
            && self
                .opening
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some()
        {
            let _ = self.settle();
        }
        match &*self.ns_codec.read().unwrap_or_else(|p| p.into_inner()) {
            Some(c) => c.chunk_id(plaintext),
            None => self.codec.chunk_id(plaintext),
        }
    }

    fn raw_records(&self, kind: ObjectKind, ids: &[Id]) -> Result<Vec<Vec<u8>>> {
        if kind == ObjectKind::Page {
            let cache = self.page_cache.lock().unwrap_or_else(|p| p.into_inner());
            let rk = imgstore_format::sealed::RecordKind::Page;
            let cached: Option<Vec<Vec<u8>>> = ids
                .iter()
                .map(|id| {
                    let b = cache.get(id)?;
                    self.codec.open_record(rk, id, b).ok()?;
                    Some(b.clone())
                })
                .collect();
            if let Some(pages) = cached {
                return Ok(pages);
            }
        }
        self.records(kind, ids)
    }

    // The snapshot list a token may see (the scan behind the default
    // `snapshots` is an admin's).
    fn snapshots(&self) -> Result<Vec<(Id, Snapshot)>> {
        self.snapshot_list()?
            .into_iter()
            .map(|(id, rec)| {
                let enc = self.codec.open_record(
                    imgstore_format::sealed::RecordKind::Snapshot,
                    &id,
                    &rec,
                )?;
                let s = Snapshot::decode(&enc)
                    .map_err(|source| RepoError::CorruptSnapshot { id, source })?;
                Ok((id, s))
            })
            .collect()
    }

    fn in_flight(&self) -> usize {
        in_flight_for(self.rtt())
    }

    fn ready(&self) -> Result<()> {
        self.settle()
    }

    fn uploads_in_flight(&self) -> usize {
        self.uploads.max
    }

    /// Each upload's frames cross the link.
    fn dedups_uploads_in_flight(&self) -> bool {
        false
    }

    // The witnesses and the records at once: one round trip, not two.
    fn list_snapshots(&self) -> Result<imgstore_repo::SnapshotList> {
        let (witnesses, records) = std::thread::scope(|s| {
            let w = s.spawn(|| self.witnesses());
            let r = self.snapshot_records();
            (w.join().expect("witnesses thread panicked"), r)
        });
        imgstore_repo::snapshot_list(&self.codec, &witnesses?, records?)
    }

    fn chunk_frames(&self, ids: &[Id]) -> Result<Vec<ChunkRead>> {
        self.get_many(proto::paths::CHUNKS_GET, ids, 512, |body, n| {
            proto::decode_frames(body, n).map_err(|e| self.malformed(e))
        })
    }

    fn ref_counts(&self, kind: ObjectKind, ids: &[Id]) -> Result<Vec<Option<RefCount>>> {
        let path = proto::paths::refs(proto::kind_letter(kind));
        self.get_many(&path, ids, limits::IDS_PER_CALL, |body, n| {
            proto::decode_refs(body, n)
                .map_err(|e| self.malformed(e))?
                .into_iter()
                .map(|r| {
                    r.map(|v| {
                        RefCount::decode(&v)
                            .map_err(|e| self.broken(format!("reference entry: {e}")))
                    })
                    .transpose()
                })
                .collect()
        })
    }

    fn totals(&self) -> Result<Totals> {
        let body = self.call(reqwest::Method::GET, proto::paths::TOTALS, Body::None, true)?;
        let t: proto::WireTotals = self.json(&body)?;
        Ok(Totals {
            objects: t.objects,
            orphans: t.orphans,
        })
    }

    fn storage_bytes(&self) -> Option<u64> {
        let body = self
            .call(reqwest::Method::GET, proto::paths::TOTALS, Body::None, true)
            .ok()?;
        self.json::<proto::WireTotals>(&body)
            .ok()
            .map(|t| t.storage_bytes)
    }

    fn chunks_known(&self, ids: &[Id]) -> Result<Vec<bool>> {
        self.check_ahead(false)?;
        self.get_many(
            proto::paths::CHUNKS_KNOWN,
            ids,
            limits::IDS_PER_CALL,
            |body, n| proto::decode_known(body, n).map_err(|e| self.malformed(e)),
        )
    }

    // Answered before it returns: a caller may read the region next.
    fn put_region(&self, id: &Id, encoded: &[u8], frames: &Frames) -> Result<PutOutcome> {
        self.put_region_as(id, encoded, frames, Box::new(|_| {}), false)
    }

    // A backup's uploads: answered later where the server takes the commit
    // ahead of the answers.
    fn put_region_settled(
        &self,
        id: &Id,
        encoded: &[u8],
        frames: &Frames,
        settled: Box<dyn FnOnce(bool) + Send>,
    ) -> Result<PutOutcome> {
        self.put_region_as(id, encoded, frames, settled, self.hello.awaits_uploads)
    }

    fn commit(&self, record: &[u8], pages: &[Vec<u8>], parent: Option<&Id>) -> Result<(Id, u64)> {
        // Started from the cache: only once the server agreed with it.
        self.check_ahead(true)?;
        self.listing_changes();
        let id = Id::hash(record);
        let body = bytes::Bytes::from(proto::encode_commit(record, parent, pages));
        let keep = || {
            if pages.len() > imgstore_format::cache::MAX_PAGES {
                return;
            }
            *self.last_commit.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((id, record.to_vec(), pages.to_vec()));
        };
        // Uploads whose answers are still on their way: the commit goes
        // now, saying how many the session should hold, unless the session
        // was replaced meanwhile (then their answers are waited for first,
        // and the engine asks what the server lost).
        let ahead = self.hello.awaits_uploads
            && self.checked.load(SeqCst) == self.renewals.load(SeqCst)
            && !self
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty();
        let session = self
            .session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|s| s.id.clone());
        if let (true, Some(session)) = (ahead, session) {
            let sent = Body::Ahead {
                bytes: body.clone(),
                session,
                awaits: self.session_uploads.load(SeqCst),
            };
            let out = std::thread::scope(|s| {
                let commit = s.spawn(|| {
                    self.upload(reqwest::Method::POST, proto::paths::COMMIT, sent, false)
                });
                self.join_uploads();
                commit.join().unwrap_or_else(|_| {
                    Err(self.broken("the thread sending the commit panicked".into()))
                })
            });
            match out {
                Ok(reply) => {
                    self.committed();
                    let c: proto::Committed = self.json(&reply)?;
                    keep();
                    return Ok((id, c.added_bytes));
                }
                // An upload failed: that is the error (a region it did not
                // store is why the commit failed too).
                Err(e) => {
                    self.upload_failure()?;
                    if !matches!(e, RepoError::Unreachable { .. }) {
                        return Err(e);
                    }
                    // The answer was lost: sent again below (a no-op if
                    // it landed).
                }
            }
        }
        self.join_uploads();
        self.upload_failure()?;
        match self.upload(
            reqwest::Method::POST,
            proto::paths::COMMIT,
            Body::Bytes(body.clone()),
            false,
        ) {
            Ok(reply) => {
                self.committed();
                let c: proto::Committed = self.json(&reply)?;
                keep();
                Ok((id, c.added_bytes))
            }
            Err(RepoError::Unreachable { .. }) => {
                // The answer was lost: did the commit land? (The server
                // treats a repeated commit as a no-op, so retrying is safe.)
                let reply = self.upload(
                    reqwest::Method::POST,
                    proto::paths::COMMIT,
                    Body::Bytes(body),
                    true,
                )?;
                self.committed();
                let c: proto::Committed = self.json(&reply)?;
                keep();
                Ok((id, c.added_bytes))
            }
            Err(e) => Err(e),
        }
    }

    // Only once the session was replaced: until then it pinned every region
    // it uploaded or read from its parent's pages, and the server that
    // pinned them has not restarted. A renewal during the lookup makes its
    // earlier answers (and pins) stale: asked again, a bounded few times.
    fn regions_to_resend(&self, ids: &[Id]) -> Result<Vec<Id>> {
        // The uploads still on their way are in by the time this asks.
        if self.checked.load(SeqCst) != self.renewals.load(SeqCst) {
            self.join_uploads();
        }
        // Uploads answered after their calls returned that named a chunk
        // the server no longer had: sent again, as the engine does with
        // one answered at once.
        let lost: Vec<Id> =
            std::mem::take(&mut *self.lost_uploads.lock().unwrap_or_else(|p| p.into_inner()));
        let mut lost: Vec<Id> = lost.into_iter().filter(|id| ids.contains(id)).collect();
        for _ in 0..MAX_RENEWALS {
            let epoch = self.renewals.load(SeqCst);
            if self.checked.load(SeqCst) == epoch {
                return Ok(lost);
            }
            let known = self.get_many(
                proto::paths::REGIONS_KNOWN,
                ids,
                limits::IDS_PER_CALL,
                |body, n| proto::decode_known(body, n).map_err(|e| self.malformed(e)),
            )?;
            if self.renewals.load(SeqCst) == epoch {
                self.checked.store(epoch, SeqCst);
                lost.extend(ids.iter().zip(known).filter(|(_, k)| !k).map(|(id, _)| *id));
                lost.sort_unstable();
                lost.dedup();
                return Ok(lost);
            }
        }
        Err(self.broken(format!(
            "the server lost this backup's session {MAX_RENEWALS} times while it was asked which regions it holds: start the backup again"
        )))
    }

    fn zero_cvs(&self, region_size: u32, count: u64) -> Result<Vec<Option<[u8; 32]>>> {
        let mut out = Vec::with_capacity(count.min(1 << 24) as usize);
        let mut start = 0u64;
        while start < count {
            let n = (count - start).min(limits::ZERO_CVS as u64);
            let ask = serde_json::json!({"region_size": region_size, "start": start, "count": n});
            let body = self.call(
                reqwest::Method::POST,
                proto::paths::ZERO_CVS_GET,
                Body::Json(ask),
                true,
            )?;
            out.extend(proto::decode_zero_cvs(&body, n as usize).map_err(|e| self.malformed(e))?);
            start += n;
        }
        Ok(out)
    }

    fn put_zero_cvs(&self, region_size: u32, cvs: &[(u64, [u8; 32])]) -> Result<()> {
        for batch in cvs.chunks(limits::ZERO_CVS) {
            self.call(
                reqwest::Method::POST,
                proto::paths::ZERO_CVS,
                Body::Bytes(proto::encode_put_zero_cvs(region_size, batch).into()),
                true,
            )?;
        }
        Ok(())
    }

    fn parents(&self) -> Result<Vec<(Id, Id)>> {
        let body = self.call(
            reqwest::Method::GET,
            proto::paths::PARENTS,
            Body::None,
            true,
        )?;
        proto::decode_pairs(&body).map_err(|e| self.malformed(e))
    }

    fn replace_snapshot(&self, old: &Id, new: &[u8]) -> Result<Id> {
        self.listing_changes();
        let body = self.call(
            reqwest::Method::POST,
            &proto::paths::replace(old),
            Body::Bytes(bytes::Bytes::copy_from_slice(new)),
            true,
        )?;
        let c: proto::Committed = self.json(&body)?;
        Id::from_hex(&c.id).map_err(|e| self.broken(e.0))
    }

    fn forget(&self, ids: &[Id]) -> Result<ForgetOutcome> {
        self.listing_changes();
        let body = self.call(
            reqwest::Method::POST,
            proto::paths::FORGET,
            Body::Bytes(proto::encode_ids(ids).into()),
            false,
        )?;
        self.json::<ForgetOutcome>(&body)
    }

    fn set_protected(&self, id: &Id, protected: bool) -> Result<()> {
        let req = proto::ProtectRequest {
            id: id.to_hex(),
            protected,
        };
        self.call(
            reqwest::Method::POST,
            proto::paths::PROTECT,
            Body::Json(serde_json::to_value(req).expect("json")),
            true,
        )?;
        Ok(())
    }

    fn protected(&self) -> Result<Vec<Id>> {
        let body = self.call(
            reqwest::Method::GET,
            proto::paths::PROTECTED,
            Body::None,
            true,
        )?;
        proto::decode_ids(&body, limits::SNAPSHOTS).map_err(|e| self.malformed(e))
    }

    fn gc(&self, dry_run: bool) -> Result<GcOutcome> {
        let body = self.call(
            reqwest::Method::POST,
            proto::paths::GC,
            Body::Json(serde_json::json!({ "dry_run": dry_run })),
            true,
        )?;
        self.json::<GcOutcome>(&body)
    }

    fn damage_marks(&self) -> Result<Vec<DamageMark>> {
        let body = self.call(reqwest::Method::GET, proto::paths::DAMAGE, Body::None, true)?;
        let marks: Vec<proto::WireMark> = self.json(&body)?;
        marks
            .iter()
            .map(|m| m.parse().map_err(|e| self.malformed(e)))
            .collect()
    }

    fn mark_damaged(&self, marks: &[DamageMark]) -> Result<()> {
        let wire: Vec<proto::WireMark> = marks.iter().map(proto::WireMark::from).collect();
        self.call(
            reqwest::Method::POST,
            proto::paths::DAMAGE,
            Body::Json(serde_json::to_value(wire).expect("json")),
            true,
        )?;
        Ok(())
    }

    fn clear_damaged(&self, objects: &[(ObjectKind, Id)]) -> Result<()> {
        let wire: Vec<proto::WireObject> = objects
            .iter()
            .map(|(k, id)| proto::WireObject {
                kind: proto::kind_letter(*k).into(),
                id: id.to_hex(),
            })
            .collect();
        self.call(
            reqwest::Method::POST,
            proto::paths::DAMAGE_CLEAR,
            Body::Json(serde_json::to_value(wire).expect("json")),
            true,
        )?;
        Ok(())
    }

    fn damage_pending(&self) -> usize {
        0
    }

    // The records this token may see (all of them for an admin, damaged
    // ones included): what `check` and `copy` read.
    fn witnesses(&self) -> Result<std::collections::HashMap<Id, imgstore_repo::Witness>> {
        let early = self.prefetch().witnesses.take();
        let body = match early {
            Some(b) => b,
            None => self.call(
                reqwest::Method::GET,
                proto::paths::WITNESSES,
                Body::None,
                true,
            )?,
        };
        Ok(proto::decode_witnesses(&body)
            .map_err(|e| self.malformed(e))?
            .into_iter()
            .map(|w| {
                (
                    w.id,
                    imgstore_repo::Witness {
                        image: w.image,
                        committed_ns: w.committed_ns,
                    },
                )
            })
            .collect())
    }

    fn snapshot_records(&self) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        Ok(self
            .snapshot_list()?
            .into_iter()
            .map(|(id, rec)| (id.as_bytes().to_vec(), rec))
            .collect())
    }

    fn scan_recipes(&self, f: &mut dyn FnMut(&[u8], &[u8])) -> Result<()> {
        self.scan(proto::ScanWhat::Recipes, f)
    }

    fn scan_refs(&self, f: &mut dyn FnMut(&[u8], &[u8])) -> Result<()> {
        self.scan(proto::ScanWhat::Refs, f)
    }

    fn scan_orphans(&self, f: &mut dyn FnMut(&[u8])) -> Result<()> {
        self.scan(proto::ScanWhat::Orphans, &mut |k, _| f(k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            base_url("imgstores://h/").unwrap(),
            ("https://h:8420".into(), true)
        );
        assert_eq!(
            base_url("imgstores://h:9000").unwrap(),
            ("https://h:9000".into(), true)
        );
        assert_eq!(
            base_url("imgstore://127.0.0.1:1/").unwrap(),
            ("http://127.0.0.1:1".into(), false)
        );
        assert_eq!(
            base_url("imgstores://[::1]").unwrap(),
            ("https://[::1]:8420".into(), true)
        );
        assert!(base_url("imgstores://h/extra/path").is_err());
        assert!(base_url("imgstores://user@h/").is_err());
        assert!(base_url("/local/path").is_err());
        assert!(is_remote("imgstores://x") && !is_remote("./imgstores"));
    }

    #[test]
    fn canonical_urls() {
        for spelling in [
            "imgstores://Backup.Example/",
            "imgstores://backup.example",
            "imgstores://backup.example:8420/",
        ] {
            assert_eq!(
                canonical_url(spelling).unwrap(),
                "imgstores://backup.example:8420/"
            );
        }
        assert_eq!(
            canonical_url("imgstore://127.0.0.1:9/").unwrap(),
            "imgstore://127.0.0.1:9/"
        );
        assert_eq!(
            canonical_url("imgstores://[::1]").unwrap(),
            "imgstores://[::1]:8420/"
        );
        assert!(canonical_url("/local").is_err());
    }

    /// `imgstore://` once panicked building its client ("No provider
    /// set"): no process-wide rustls provider is installed here.
    #[test]
    fn a_plain_http_client_builds_without_a_process_wide_provider() {
        let r = RemoteRepo::connect(RemoteOptions {
            url: "imgstore://127.0.0.1:1/".into(),
            token: "t".into(),
            fingerprint: None,
            ca_file: None,
            retry_for: Duration::ZERO,
            limits: Limits::default(),
            prefetch_listing: true,
            session_for: None,
        });
        assert!(matches!(r, Err(RepoError::Unreachable { .. })));
    }
}

#[cfg(test)]
mod listing_pages {
    use super::*;

    fn page(ids: &[u8], len: usize) -> proto::Listed {
        ids.iter()
            .map(|b| (Id::from_slice(&[*b; 32]).unwrap(), vec![0; len]))
            .collect()
    }

    #[test]
    fn pages_must_move_forward() {
        let (mut out, mut bytes) = (Vec::new(), 0);
        add_page(&mut out, &mut bytes, page(&[1, 2], 1)).unwrap();
        add_page(&mut out, &mut bytes, page(&[3], 1)).unwrap();
        assert_eq!(out.len(), 3);
        assert!(add_page(&mut out, &mut bytes, page(&[3], 1)).is_err());
        assert!(add_page(&mut out, &mut bytes, page(&[5, 4], 1)).is_err());
    }

    #[test]
    fn a_listing_that_never_ends_is_refused() {
        let (mut out, mut bytes) = (Vec::new(), 0);
        let big = (LISTING_LIMIT / 4) as usize;
        let mut refused = false;
        for i in 0..8u8 {
            if add_page(&mut out, &mut bytes, page(&[i], big)).is_err() {
                refused = true;
                break;
            }
            // What was taken is dropped: the test holds one page at a time.
            out.last_mut().unwrap().1 = Vec::new();
        }
        assert!(refused, "{} GiB of pages taken", bytes >> 30);
    }
}
