//! What every request passes before its handler runs: authentication from
//! the headers alone, the route's body limit against the declared length,
//! a share of the server's body memory, and a body read under timeouts.
//!
//! # Why here, and in this order
//!
//! An extractor-based handler reads its whole body before it can look at
//! the token, so three unauthenticated connections could make the server
//! hold gigabytes. Here nothing of a body is read until the caller is
//! known, its declared length is within the route's limit, and the server
//! has memory for it: request bodies held at once never exceed
//! `max_body_memory_mib`, bulk uploads at once never exceed `max_uploads`
//! (taken *before* the body is read, so waiting uploads hold nothing), and
//! a body that trickles in (slowloris) is cut off by `body_idle_timeout`
//! and `body_timeout`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use imgstore_protocol::{limits, paths};

use crate::api::{caller, require, session, ApiError};
use crate::App;
use crate::Share;
use imgstore_protocol::Role;

/// Largest body of a route (`None`: unknown route, left to the router).
pub(crate) fn body_limit(method: &Method, path: &str) -> usize {
    if method == Method::GET || method == Method::DELETE || method == Method::HEAD {
        return 0;
    }
    if method == Method::PUT && path.starts_with(paths::REGION_PREFIX) {
        return limits::PUT_REGION_BYTES;
    }
    match path {
        paths::COMMIT => limits::COMMIT_BYTES,
        paths::ZERO_CVS => limits::ZERO_CVS * 40 + 16,
        _ => small_body_limit(),
    }
}

/// Any other body: ids, JSON.
pub(crate) fn small_body_limit() -> usize {
    limits::JSON_BYTES.max(limits::IDS_PER_CALL * 32 + 64)
}

/// Routes whose bodies are bulk uploads: bounded in number at once.
fn is_upload(method: &Method, path: &str) -> bool {
    (method == Method::PUT && path.starts_with(paths::REGION_PREFIX)) || path == paths::COMMIT
}

/// Largest refused body still read (and dropped) before the answer.
const DRAIN_MAX: usize = 64 << 10;

/// How long a request may wait for an upload slot or body memory.
const QUEUE_WAIT: Duration = Duration::from_secs(30);

fn busy(what: &str) -> Response {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "busy",
        format!("the server is at its limit of {what}: retry later"),
    )
    .into_response()
}

/// The middleware: see the module doc.
pub(crate) async fn guard(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    if path == paths::HEALTH {
        return next.run(req).await;
    }
    let who = match caller(&app, req.headers()) {
        Ok(c) => c,
        Err(e) => return close(e.into_response()),
    };
    let method = req.method().clone();
    // A body's length is told one way: both headers at once is how a
    // declared length and the bytes read are made to disagree.
    if req
        .headers()
        .contains_key(axum::http::header::TRANSFER_ENCODING)
        && req
            .headers()
            .contains_key(axum::http::header::CONTENT_LENGTH)
    {
        return close(
            ApiError::bad("Content-Length and Transfer-Encoding together: send one")
                .into_response(),
        );
    }
    let limit = body_limit(&method, &path);
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .map(|v| v.to_str().ok().and_then(|s| s.parse::<u64>().ok()));
    let declared = match declared {
        Some(None) => {
            return close(ApiError::bad("Content-Length is not a number").into_response())
        }
        Some(Some(n)) => Some(n),
        None => None,
    };
    if declared.is_some_and(|n| n > limit as u64) {
        return close(too_large(limit));
    }
    let upload_slots = if is_upload(&method, &path) {
        // Only a writer in a live session of its own may wait for a slot,
        // and one token holds at most its share of them: a restore token,
        // or one compromised host trickling bodies, cannot stall everyone's
        // backups.
        if let Err(e) = require(&who, &[Role::Backup, Role::Admin], "write backups")
            .and_then(|()| session(&app, &who, req.headers()).map(|_| ()))
        {
            // A small body is read and dropped first, so the client sees
            // the answer rather than a reset connection; a large one is not.
            if declared.is_some_and(|n| n <= DRAIN_MAX as u64) {
                let (_, body) = req.into_parts();
                let _ = read_body(body, DRAIN_MAX, None, &app.limits).await;
            }
            return close(e.into_response());
        }
        // A commit sent ahead of its uploads' answers waits for them
        // first, holding no slot: the uploads it awaits need theirs.
        if path == paths::COMMIT {
            let awaited = req
                .headers()
                .get(imgstore_protocol::AWAITS_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if let (Some(n), Ok(scope)) = (awaited, session(&app, &who, req.headers())) {
                app.await_uploads(scope.session, n, QUEUE_WAIT).await;
            }
        }
        let mine = app.token_share(&who.token, Share::Uploads);
        let Ok(Ok(own)) = tokio::time::timeout(QUEUE_WAIT, mine.acquire_owned()).await else {
            return close(busy("concurrent uploads of one token"));
        };
        match tokio::time::timeout(QUEUE_WAIT, app.uploads.clone().acquire_owned()).await {
            Ok(Ok(p)) => Some((own, p)),
            _ => return close(busy("concurrent uploads (max_uploads)")),
        }
    } else {
        None
    };
    // A body's share of memory; one token holds at most its share. An
    // upload (which holds an upload slot, in a session of its own) takes
    // what it declares before it is read, else the route's limit. Any
    // other body takes memory as its bytes arrive: a declared length costs
    // nothing until it is sent (streams that declared 1 MiB each and sent
    // a byte every 20 s used to hold the whole budget with two tokens).
    let need = declared.map_or(limit, |n| n as usize);
    let mut memory = Memory {
        share: app.token_share(&who.token, Share::Memory),
        budget: app.body_budget.clone(),
        cap: app.limits.body_memory_kib / 2,
        held: Vec::new(),
        kib: 0,
    };
    let upload = upload_slots.is_some();
    if upload {
        if let Err(r) = memory.grow(need).await {
            return close(r);
        }
    }
    let (parts, body) = req.into_parts();
    let grown = (!upload).then_some(&mut memory);
    let bytes = match read_body(body, need, grown, &app.limits).await {
        Ok(b) => b,
        Err(r) => return close(r),
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// Body memory held by one request: permits of its token's share and of
/// the server's budget, in KiB, given back when dropped.
struct Memory {
    share: Arc<tokio::sync::Semaphore>,
    budget: Arc<tokio::sync::Semaphore>,
    /// The most one request may hold (a token's share).
    cap: usize,
    held: Vec<(
        tokio::sync::OwnedSemaphorePermit,
        tokio::sync::OwnedSemaphorePermit,
    )>,
    kib: usize,
}

impl Memory {
    /// Holds enough for `bytes` (waiting at most [`QUEUE_WAIT`]).
    async fn grow(&mut self, bytes: usize) -> Result<(), Response> {
        let want = bytes.div_ceil(1024).min(self.cap);
        if want <= self.kib {
            return Ok(());
        }
        let more = (want - self.kib) as u32;
        let wait = async {
            let own = self.share.clone().acquire_many_owned(more).await.ok()?;
            let all = self.budget.clone().acquire_many_owned(more).await.ok()?;
            Some((own, all))
        };
        match tokio::time::timeout(QUEUE_WAIT, wait).await {
            Ok(Some(p)) => {
                self.held.push(p);
                self.kib = want;
                Ok(())
            }
            _ => Err(busy("request memory (max_body_memory_mib)")),
        }
    }
}

fn too_large(limit: usize) -> Response {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        format!("the body passes this call's limit of {limit} bytes"),
    )
    .into_response()
}

/// An answer after which an HTTP/1 connection is not reused (the rest of
/// an unread body is never read).
fn close(mut r: Response) -> Response {
    r.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    r
}

/// Reads at most `limit` bytes, failing when nothing arrives for the idle
/// timeout or the whole takes longer than the body timeout.
/// Memory for what is read is taken from `memory` as it arrives; without
/// one, `limit` was taken before (an upload) or is small (a refused body
/// read to be dropped).
async fn read_body(
    mut body: Body,
    limit: usize,
    mut memory: Option<&mut Memory>,
    limits: &crate::Limits,
) -> Result<Bytes, Response> {
    let deadline = Instant::now() + limits.body_total;
    let mut buf: Vec<u8> = Vec::with_capacity(if memory.is_none() { limit } else { 0 });
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = match tokio::time::timeout(left.min(limits.body_idle), body.frame()).await {
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "timeout",
                    "the request body arrived too slowly (body_timeout, body_idle_timeout)",
                )
                .into_response())
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(
                    ApiError::bad(format!("the request body broke off: {e}")).into_response()
                )
            }
            Ok(Some(Ok(f))) => f,
        };
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(too_large(limit));
            }
            if let Some(m) = memory.as_deref_mut() {
                // Grown 64 KiB at a time, and held as it is: a body costs
                // what it sent, rounded up to 64 KiB (doubling charged
                // 513 KiB as 1 MiB). A 1 MiB body is copied 16 times at
                // most, a trifle beside reading it.
                let cap = (buf.len() + data.len())
                    .next_multiple_of(64 << 10)
                    .min(limit);
                m.grow(cap.max(buf.capacity())).await?;
                buf.reserve_exact(cap.saturating_sub(buf.len()));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(Bytes::from(buf))
}
