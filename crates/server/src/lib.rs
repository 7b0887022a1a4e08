//! `imgstore server`: one repository served to many hosts at once.
//!
//! # Why a server process
//!
//! A RocksDB repository has one writer. Instead of a lock that makes hosts
//! take turns, the server is that writer, and concurrency lives inside it:
//! any number of backup sessions upload at once (the store serialises only
//! the short reference-count updates), restores and `check` read alongside,
//! and gc runs between batches while backups are in flight — safely,
//! because the server knows every live session and what each relies on
//! (see `imgstore_store::Scope` and `docs/GC.md`).
//!
//! The client does the expensive work (reading the image, FastCDC, BLAKE3,
//! zstd) and sends only chunks the server does not have for its namespace:
//! deduplication happens before upload.
//!
//! # Security by default
//!
//! TLS (rustls) is on unless the operator asks for plain HTTP on a loopback
//! address; every request but `/v1/health` carries a bearer token, stored
//! here only as a hash; a token's role and namespaces bound what it can
//! read, write and learn (`docs/SECURITY.md`). Every body is size-limited
//! before it is read, every count inside it before allocation
//! (`imgstore-protocol`), and bulk requests are limited in number — their
//! answers hold their slot until sent, so a client that stops reading
//! holds one slot, not a growing heap (the connection loop below drops
//! it after `body_idle_timeout`).
//!
//! The library never prints: it logs through `tracing` (the binary chooses
//! the format) and returns typed errors.

pub mod access;
mod api;
mod guard;
mod metrics;
pub mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use imgstore_store::Store;

pub use access::{Caller, ServerConfig, TokenEntry, TokenFile};

/// Errors of setting up or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("{}: {why}", path.display())]
    Config { path: PathBuf, why: String },
    #[error("{0}")]
    Invalid(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
}

/// A backup in progress.
pub(crate) struct Session {
    pub token: String,
    pub image: String,
    pub namespace: Option<String>,
    pub last: Instant,
    /// Region uploads stored in it: what a commit sent ahead of their
    /// answers waits for (`imgstore-awaits`).
    pub uploads_ok: u64,
}

/// Everything a request handler needs.
pub struct App {
    pub(crate) store: Store,
    pub(crate) config: ServerConfig,
    tokens_path: PathBuf,
    tokens: RwLock<(Option<SystemTime>, HashMap<String, TokenEntry>)>,
    pub(crate) sessions: Mutex<HashMap<u64, Session>>,
    /// Woken whenever a session stores a region upload.
    uploads_done: tokio::sync::Notify,
    pub(crate) idle: Duration,
    pub(crate) uploads: Arc<tokio::sync::Semaphore>,
    /// Bulk answers (chunks/get, pages, regions) being built.
    pub(crate) reads: Arc<tokio::sync::Semaphore>,
    /// Request-body memory, in KiB, shared by every request.
    pub(crate) body_budget: Arc<tokio::sync::Semaphore>,
    pub(crate) limits: Limits,
    /// Per token: its share of upload slots and of body memory (KiB).
    shares: Mutex<HashMap<(String, Share), Arc<tokio::sync::Semaphore>>>,
    pub(crate) metrics: metrics::Metrics,
}

/// What one token may hold only part of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Share {
    /// Half the upload slots (at least one).
    Uploads,
    /// Half the body memory.
    Memory,
    /// All read slots but one (at least one).
    Reads,
}

/// The configured bounds, parsed once.
#[derive(Clone, Debug)]
pub(crate) struct Limits {
    pub idle_connection: Duration,
    pub body_total: Duration,
    pub body_idle: Duration,
    pub body_memory_kib: usize,
    pub sessions_per_token: usize,
    pub sessions: usize,
    pub clock_skew: Duration,
    pub connections: usize,
    pub connections_per_ip: usize,
    /// HTTP/2 receive window of a connection, and of one stream in it.
    pub h2_connection_window: u32,
    pub h2_stream_window: u32,
}

fn duration(
    field: &str,
    value: &Option<String>,
    default: Duration,
) -> Result<Duration, ServerError> {
    match value {
        Some(s) => humantime::parse_duration(s)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                ServerError::Invalid(format!(
                    "{field} {s:?} is not a positive duration (e.g. 30s, 15m)"
                ))
            }),
        None => Ok(default),
    }
}

impl Limits {
    fn from_config(c: &ServerConfig) -> Result<Limits, ServerError> {
        let window = c.http2_window_mib.unwrap_or(32);
        if !(1..=1024).contains(&window) {
            return Err(ServerError::Invalid(format!(
                "http2_window_mib {window} is outside 1..=1024"
            )));
        }
        let window = window as u32;
        let mib = c.max_body_memory_mib.unwrap_or(1024);
        if !(16..=1 << 20).contains(&mib) {
            return Err(ServerError::Invalid(format!(
                "max_body_memory_mib {mib} is outside 16..=1048576"
            )));
        }
        Ok(Limits {
            idle_connection: duration(
                "idle_connection_timeout",
                &c.idle_connection_timeout,
                Duration::from_secs(60),
            )?,
            body_total: duration("body_timeout", &c.body_timeout, Duration::from_secs(600))?,
            body_idle: duration(
                "body_idle_timeout",
                &c.body_idle_timeout,
                Duration::from_secs(30),
            )?,
            body_memory_kib: mib << 10,
            sessions_per_token: c.max_sessions_per_token.unwrap_or(16).max(1),
            sessions: c.max_sessions.unwrap_or(1024).max(1),
            clock_skew: duration(
                "max_clock_skew",
                &c.max_clock_skew,
                Duration::from_secs(600),
            )?,
            connections: c.max_connections.unwrap_or(512).max(1),
            connections_per_ip: c.max_connections_per_ip.unwrap_or(128).max(1),
            h2_connection_window: window << 20,
            h2_stream_window: (window << 20) / 8,
        })
    }
}

impl App {
    pub fn new(store: Store, config: ServerConfig) -> Result<Arc<App>, ServerError> {
        let tokens_path = config
            .tokens
            .clone()
            .unwrap_or_else(|| default_tokens_path(store.dir()));
        let idle = match &config.session_idle_timeout {
            Some(s) => humantime::parse_duration(s).map_err(|_| {
                ServerError::Invalid(format!(
                    "session_idle_timeout {s:?} is not a duration (e.g. 15m)"
                ))
            })?,
            None => Duration::from_secs(15 * 60),
        };
        let uploads = config.max_uploads.unwrap_or(8).max(1);
        let reads = config.max_reads.unwrap_or(4).max(1);
        let limits = Limits::from_config(&config)?;
        let app = App {
            store,
            tokens_path,
            tokens: RwLock::new((None, HashMap::new())),
            sessions: Mutex::new(HashMap::new()),
            uploads_done: tokio::sync::Notify::new(),
            idle,
            uploads: Arc::new(tokio::sync::Semaphore::new(uploads)),
            reads: Arc::new(tokio::sync::Semaphore::new(reads)),
            body_budget: Arc::new(tokio::sync::Semaphore::new(limits.body_memory_kib)),
            limits,
            shares: Mutex::new(HashMap::new()),
            config,
            metrics: metrics::Metrics::default(),
        };
        app.reload_tokens()?;
        Ok(Arc::new(app))
    }

    /// Marks the data of every snapshot whose image belongs to a namespace
    /// but whose objects are not marked for it (written before the server
    /// served the repository, by an admin, or before the namespace was
    /// configured), so the namespace's tokens can read and deduplicate
    /// against it. Cheap when nothing is to do: one lookup per snapshot.
    pub fn adopt_unmarked(&self) -> Result<u64, imgstore_repo::RepoError> {
        use imgstore_format::ObjectKind;
        let mut n = 0;
        for (_, v) in self.store.snapshot_records()? {
            // A sealed record's name is unreadable here: sealed snapshots
            // are marked by the session that commits them.
            let Ok(s) = imgstore_format::Snapshot::decode(&v) else {
                continue;
            };
            let Some(ns) = self.config.namespace_of(&s.name) else {
                continue;
            };
            let Some(first) = s.pages.first() else {
                continue;
            };
            if !self.store.ns_marked(ns, &[ObjectKind::Page.key(first)])?[0] {
                n += self.store.adopt(ns, &s.pages)?;
            }
        }
        Ok(n)
    }

    /// Token `token`'s share of `what` (created at first use; a token
    /// file holds few tokens, so the map stays small).
    /// Upload slots one token may hold at once: half of `max_uploads`.
    pub(crate) fn upload_share(&self) -> usize {
        self.config.max_uploads.unwrap_or(8).max(2) / 2
    }

    pub(crate) fn token_share(&self, token: &str, what: Share) -> Arc<tokio::sync::Semaphore> {
        let mut m = self.shares.lock().unwrap_or_else(|p| p.into_inner());
        m.entry((token.to_string(), what))
            .or_insert_with(|| {
                Arc::new(tokio::sync::Semaphore::new(match what {
                    Share::Uploads => self.upload_share(),
                    Share::Memory => self.limits.body_memory_kib / 2,
                    Share::Reads => self.config.max_reads.unwrap_or(4).saturating_sub(1).max(1),
                }))
            })
            .clone()
    }

    /// Rereads the token file if it changed (tokens added or removed while
    /// the server runs take effect at the next request).
    pub(crate) fn reload_tokens(&self) -> Result<(), ServerError> {
        let mtime = std::fs::metadata(&self.tokens_path)
            .and_then(|m| m.modified())
            .ok();
        if self.tokens.read().unwrap_or_else(|p| p.into_inner()).0 == mtime && mtime.is_some() {
            return Ok(());
        }
        let file = TokenFile::load(&self.tokens_path)?;
        let map = file
            .tokens
            .into_iter()
            .map(|t| (t.hash.clone(), t))
            .collect();
        *self.tokens.write().unwrap_or_else(|p| p.into_inner()) = (mtime, map);
        Ok(())
    }

    /// The caller a bearer token stands for.
    pub(crate) fn authenticate(&self, token: &str) -> Option<Caller> {
        if let Err(e) = self.reload_tokens() {
            tracing::error!(error = %e, "token file unreadable; keeping the tokens loaded before");
        }
        let hash = access::token_hash(token);
        let tokens = self.tokens.read().unwrap_or_else(|p| p.into_inner());
        tokens.1.get(&hash).map(|t| Caller {
            token: t.name.clone(),
            role: t.role,
            namespaces: t.namespaces.clone(),
        })
    }

    /// Counts a region upload stored in `session`.
    pub(crate) fn upload_stored(&self, session: u64) {
        if let Some(s) = self
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&session)
        {
            s.uploads_ok += 1;
        }
        self.uploads_done.notify_waiters();
    }

    /// Waits until `session` has stored `n` region uploads, it is gone, or
    /// `limit` has passed: a commit sent ahead of its uploads' answers is
    /// checked once they are in (or, past the limit, as it is: a region
    /// still missing then fails it, and nothing is stored).
    pub(crate) async fn await_uploads(&self, session: u64, n: u64, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let woken = self.uploads_done.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let have = self
                .sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&session)
                .map(|s| s.uploads_ok);
            if have.is_none_or(|have| have >= n) {
                return;
            }
            if tokio::time::timeout_at(deadline, woken).await.is_err() {
                return;
            }
        }
    }

    /// Drops sessions idle for longer than the timeout, with their pins.
    pub(crate) fn expire_sessions(&self) {
        let mut s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let idle = self.idle;
        let expired: Vec<u64> = s
            .iter()
            .filter(|(_, v)| v.last.elapsed() > idle)
            .map(|(k, _)| *k)
            .collect();
        for id in expired {
            if let Some(v) = s.remove(&id) {
                tracing::info!(session = %format!("{id:016x}"), token = %v.token, image = %v.image, "session expired");
            }
            self.store.end_session(id);
        }
    }
}

/// Where the token file lives by default.
pub fn default_tokens_path(repo: &Path) -> PathBuf {
    repo.join("server").join("tokens.json")
}

/// Where the generated certificate lives by default.
pub fn default_tls_dir(repo: &Path) -> PathBuf {
    repo.join("server").join("tls")
}

/// Serves `app` on `listener` until `shutdown` completes. With `tls`, every
/// connection is TLS (HTTP/2 or HTTP/1.1 by ALPN).
pub async fn serve(
    app: Arc<App>,
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::service::TowerToHyperService;

    let router = api::router(app.clone());
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let conns = Arc::new(tokio::sync::Semaphore::new(app.limits.connections));
    {
        let app = app.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                let app = app.clone();
                let _ = tokio::task::spawn_blocking(move || app.expire_sessions()).await;
            }
        });
    }
    let per_ip: Arc<Mutex<HashMap<std::net::IpAddr, usize>>> = Arc::default();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer): (tokio::net::TcpStream, SocketAddr) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "connection refused: max_connections reached");
            drop(tcp);
            continue;
        };
        let Some(ip_slot) = IpSlot::take(&per_ip, source(peer.ip()), app.limits.connections_per_ip)
        else {
            tracing::warn!(%peer, "connection refused: max_connections_per_ip reached");
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let router = router.clone();
        let idle = app.limits.idle_connection;
        let (stall, answer_max) = (app.limits.body_idle, app.limits.body_total);
        let (conn_window, stream_window) =
            (app.limits.h2_connection_window, app.limits.h2_stream_window);
        tokio::spawn(async move {
            let _permit = permit;
            let _ip_slot = ip_slot;
            let activity = Arc::new(Activity::new());
            let service = {
                let activity = activity.clone();
                tower::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    use tower::ServiceExt;
                    // A health check (no token) is no request here: it
                    // neither gives a connection the idle minute nor keeps it.
                    let counts = req.uri().path() != imgstore_protocol::paths::HEALTH;
                    let busy = Busy::start(&activity, counts);
                    let router = router.clone();
                    async move {
                        // Busy until the answer's body is sent (or dropped):
                        // a client reading a large answer slowly is not idle.
                        let resp = router.oneshot(req).await;
                        if resp
                            .as_ref()
                            .is_ok_and(|r| r.status() == hyper::StatusCode::UNAUTHORIZED)
                        {
                            // No valid token: the connection ends after
                            // this answer (HTTP/2 GOAWAY).
                            busy.0.refused.notify_one();
                        }
                        resp.map(|r| r.map(|inner| Tracked::new(inner, busy)))
                    }
                })
            };
            let service = TowerToHyperService::new(service);
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30));
            builder
                .http2()
                .timer(hyper_util::rt::TokioTimer::new())
                .keep_alive_interval(Some(Duration::from_secs(30)))
                .keep_alive_timeout(Duration::from_secs(20))
                .max_header_list_size(64 << 10)
                .max_concurrent_streams(256)
                .initial_connection_window_size(conn_window)
                .initial_stream_window_size(stream_window);
            let io: Box<dyn Io> = match acceptor {
                Some(acc) => {
                    match tokio::time::timeout(Duration::from_secs(10), acc.accept(tcp)).await {
                        Ok(Ok(s)) => Box::new(s),
                        Ok(Err(e)) => {
                            tracing::info!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::info!(%peer, "TLS handshake timed out");
                            return;
                        }
                    }
                }
                None => Box::new(tcp),
            };
            // Served until it ends, or until it has had no request in
            // flight for `idle`: then shut down gracefully (HTTP/2 GOAWAY,
            // or the HTTP/1 connection closed), and dropped if that takes
            // over 10 s. A connection with an answer the client has taken
            // nothing of for `stall` (`body_idle_timeout`: its flow-control
            // window kept shut) is dropped at once, with what it holds:
            // the answer's memory and its read slot.
            let conn = builder.serve_connection(TokioIo::new(io), service);
            tokio::pin!(conn);
            let tick = (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
            let result = loop {
                tokio::select! {
                    r = conn.as_mut() => break r,
                    _ = activity.refused.notified() => {
                        // A second for the answer to leave, not the ten a
                        // client is given to finish its streams.
                        tracing::debug!(%peer, "connection closed: a request without a valid token");
                        conn.as_mut().graceful_shutdown();
                        break tokio::time::timeout(Duration::from_secs(1), conn.as_mut())
                            .await
                            .unwrap_or(Ok(()));
                    }
                    _ = tokio::time::sleep(tick.min(stall / 2).min(FIRST_REQUEST / 4)) => {
                        let (stalled, oldest) = activity.answers_waiting();
                        if stalled >= stall || oldest >= answer_max {
                            tracing::warn!(%peer, "connection dropped: an answer was not read for body_idle_timeout, or not in body_timeout");
                            break Ok(());
                        }
                        let silent = activity.requests.load(std::sync::atomic::Ordering::SeqCst) == 0;
                        if silent && activity.opened.elapsed() >= idle.min(FIRST_REQUEST) {
                            // Nothing was ever asked (health checks aside):
                            // nothing to finish.
                            tracing::debug!(%peer, "connection closed: no request");
                            break Ok(());
                        }
                        if activity.idle_for() >= idle {
                            tracing::debug!(%peer, "idle connection closed");
                            conn.as_mut().graceful_shutdown();
                            break tokio::time::timeout(Duration::from_secs(10), conn.as_mut())
                                .await
                                .unwrap_or(Ok(()));
                        }
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

/// Requests in flight on one connection, and when the last one ended;
/// the answers being sent, and when each last moved.
struct Activity {
    inflight: std::sync::atomic::AtomicUsize,
    last: Mutex<Instant>,
    /// Answers being sent: when each began, and when it last moved.
    answers: Mutex<HashMap<u64, (Instant, Instant)>>,
    next_answer: std::sync::atomic::AtomicU64,
    opened: Instant,
    /// Requests so far (health checks aside).
    requests: std::sync::atomic::AtomicU64,
    /// Told when a request came without a valid token.
    refused: tokio::sync::Notify,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            inflight: 0.into(),
            last: Mutex::new(Instant::now()),
            answers: Mutex::default(),
            next_answer: 0.into(),
            opened: Instant::now(),
            requests: 0.into(),
            refused: tokio::sync::Notify::new(),
        }
    }

    fn answers(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (Instant, Instant)>> {
        self.answers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The longest any answer has waited for the client to take its next
    /// piece, and the age of the oldest answer being sent (zeros with
    /// none): a client that takes a piece now and then still has
    /// `body_timeout` for the whole answer, as for a request body.
    fn answers_waiting(&self) -> (Duration, Duration) {
        self.answers()
            .values()
            .fold((Duration::ZERO, Duration::ZERO), |(s, o), (began, last)| {
                (s.max(last.elapsed()), o.max(began.elapsed()))
            })
    }

    /// How long the connection has had nothing in flight (zero while busy).
    fn idle_for(&self) -> Duration {
        if self.inflight.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            return Duration::ZERO;
        }
        self.last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }
}

/// One request in flight; ends (even when the client goes away and the
/// request's future is dropped) when dropped.
struct Busy(Arc<Activity>);

impl Busy {
    fn start(a: &Arc<Activity>, counts: bool) -> Busy {
        if counts {
            a.requests.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        a.inflight.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Busy(a.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.0
            .inflight
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// An answer's body that keeps its connection busy while it lives, and
/// tells the connection when the client last took a piece of it.
struct Tracked<B> {
    inner: B,
    id: u64,
    busy: Busy,
}

impl<B> Tracked<B> {
    fn new(inner: B, busy: Busy) -> Tracked<B> {
        let id = busy
            .0
            .next_answer
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let now = Instant::now();
        busy.0.answers().insert(id, (now, now));
        Tracked { inner, id, busy }
    }
}

impl<B> Drop for Tracked<B> {
    fn drop(&mut self) {
        self.busy.0.answers().remove(&self.id);
    }
}

impl<B: http_body::Body + Unpin> http_body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let out = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if out.is_ready() {
            // HTTP/2 asks for a piece only when the client's window has
            // room for it: the client is reading.
            let id = self.id;
            if let Some((_, last)) = self.busy.0.answers().get_mut(&id) {
                *last = Instant::now();
            }
        }
        out
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Whose connection slots a peer's take: its IPv4 address, or its IPv6
/// /64 (a host is given a /64; counting its addresses one by one would let
/// it take every slot).
fn source(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => std::net::IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                std::net::IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

/// Until its first request, a connection may stay silent this long (then
/// `idle_connection_timeout`): one that never authenticates holds a slot
/// for seconds, not a minute.
const FIRST_REQUEST: Duration = Duration::from_secs(10);

/// A connection slot of one IP address, given back when dropped.
struct IpSlot {
    map: Arc<Mutex<HashMap<std::net::IpAddr, usize>>>,
    ip: std::net::IpAddr,
}

impl IpSlot {
    fn take(
        map: &Arc<Mutex<HashMap<std::net::IpAddr, usize>>>,
        ip: std::net::IpAddr,
        max: usize,
    ) -> Option<IpSlot> {
        let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            map: map.clone(),
            ip,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// A connection's byte stream: TLS or, on loopback only, plain TCP.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

#[cfg(test)]
mod source_tests {
    use super::source;
    use std::net::IpAddr;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_ipv6_host_counts_as_its_64() {
        assert_eq!(source(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            source(ip("2001:db8:1:2:ffff:1:2:3")),
            source(ip("2001:db8:1:2::9"))
        );
        assert_ne!(source(ip("2001:db8:1:3::1")), source(ip("2001:db8:1:2::1")));
    }

    #[test]
    fn ipv4_addresses_count_one_by_one_mapped_or_not() {
        assert_eq!(source(ip("192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(source(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_ne!(source(ip("192.0.2.7")), source(ip("192.0.2.8")));
    }
}
