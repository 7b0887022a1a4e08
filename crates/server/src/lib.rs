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
//! (`imgstore-protocol`), and bulk requests are limited in number.
//!
//! The library never prints: it logs through `tracing` (the binary chooses
//! the format) and returns typed errors.

pub mod access;
mod api;
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
}

/// Everything a request handler needs.
pub struct App {
    pub(crate) store: Store,
    pub(crate) config: ServerConfig,
    tokens_path: PathBuf,
    tokens: RwLock<(Option<SystemTime>, HashMap<String, TokenEntry>)>,
    pub(crate) sessions: Mutex<HashMap<u64, Session>>,
    pub(crate) idle: Duration,
    pub(crate) uploads: tokio::sync::Semaphore,
    pub(crate) metrics: metrics::Metrics,
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
        let app = App {
            store,
            config,
            tokens_path,
            tokens: RwLock::new((None, HashMap::new())),
            sessions: Mutex::new(HashMap::new()),
            idle,
            uploads: tokio::sync::Semaphore::new(uploads),
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
    let conns = Arc::new(tokio::sync::Semaphore::new(
        app.config.max_connections.unwrap_or(512).max(1),
    ));
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
        let _ = tcp.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _permit = permit;
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
                .max_concurrent_streams(256);
            let result = match acceptor {
                Some(acc) => {
                    let tls = match tokio::time::timeout(Duration::from_secs(15), acc.accept(tcp))
                        .await
                    {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::info!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::info!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    builder.serve_connection(TokioIo::new(tls), service).await
                }
                None => builder.serve_connection(TokioIo::new(tcp), service).await,
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}
