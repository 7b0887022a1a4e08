//! The HTTP endpoints: one per `Repository` call plus sessions, health and
//! metrics. Paths and bodies are `imgstore-protocol`'s; this module checks
//! who may call what and hands the work to the store on blocking threads.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use imgstore_format::sealed::{is_sealed_record, record_children, RecordKind};
use imgstore_format::{FrameCodec, Id, ObjectKind, Snapshot};
use imgstore_protocol as proto;
use imgstore_protocol::{limits, paths, ErrorBody, Role};
use imgstore_repo::{ChunkFault, RepoError, Repository};
use imgstore_store::Scope;

use crate::metrics::Metrics;
use crate::{App, Caller, Session};

type Shared = Arc<App>;

/// An error answer: status and the protocol's error body.
pub(crate) struct ApiError(StatusCode, ErrorBody);

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError(
            status,
            ErrorBody {
                code: code.into(),
                message: message.into(),
                kind: None,
                id: None,
            },
        )
    }
    pub(crate) fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "malformed", message)
    }
    /// An answer of `what` that would pass its limit.
    fn answer_too_large(what: &str) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the {what} asked for pass the answer limit: ask for fewer at once"),
        )
    }
    fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
    fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
    fn with_object(mut self, kind: Option<ObjectKind>, id: &Id) -> ApiError {
        self.1.kind = kind.map(|k| proto::kind_letter(k).to_string());
        self.1.id = Some(id.to_hex());
        self
    }
}

impl From<proto::Malformed> for ApiError {
    fn from(e: proto::Malformed) -> Self {
        ApiError::bad(e.to_string())
    }
}

impl From<RepoError> for ApiError {
    fn from(e: RepoError) -> Self {
        let msg = e.to_string();
        match &e {
            RepoError::Missing { kind, id } => {
                ApiError::new(StatusCode::NOT_FOUND, "missing", msg).with_object(Some(*kind), id)
            }
            RepoError::NoSnapshot { id } => {
                ApiError::new(StatusCode::NOT_FOUND, "no_snapshot", msg).with_object(None, id)
            }
            RepoError::Protected { id } => {
                ApiError::new(StatusCode::CONFLICT, "protected", msg).with_object(None, id)
            }
            RepoError::Corrupt { kind, id, .. } => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "corrupt", msg)
                    .with_object(Some(*kind), id)
            }
            RepoError::CorruptSnapshot { id, .. } => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "corrupt", msg)
                    .with_object(None, id)
            }
            RepoError::Invalid(_) => ApiError::new(StatusCode::BAD_REQUEST, "invalid", msg),
            RepoError::NoSpace { .. } => {
                ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "no_space", msg)
            }
            _ => ApiError::internal(msg),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

type ApiResult<T = Response> = Result<T, ApiError>;

fn binary(body: Vec<u8>) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
        body,
    )
        .into_response()
}

/// A bulk answer, sent in pieces while it holds its read slot: the slot is
/// given back once the last piece is taken (or the answer dropped), not
/// when the answer is built. HTTP/2 asks for the next piece only when the
/// client's window has room, so a client that stops reading keeps one
/// answer and one slot (`max_reads` bounds them), not an answer that
/// grows the server's memory past its bound; the connection watchdog ends
/// it after `body_idle_timeout` without progress.
fn bulk(body: Vec<u8>, slot: ReadSlot) -> Response {
    bulk_as("application/octet-stream", body, slot)
}

/// [`bulk`], of media type `content_type`.
fn bulk_as(content_type: &'static str, body: Vec<u8>, slot: ReadSlot) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, content_type)],
        axum::body::Body::new(Pieces {
            data: Bytes::from(body),
            _slot: slot,
        }),
    )
        .into_response()
}

/// Size of the pieces a bulk answer is sent in.
const PIECE: usize = 64 << 10;

struct Pieces {
    data: Bytes,
    _slot: ReadSlot,
}

impl http_body::Body for Pieces {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if self.data.is_empty() {
            return std::task::Poll::Ready(None);
        }
        let n = self.data.len().min(PIECE);
        let piece = self.data.split_to(n);
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(piece))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.data.len() as u64)
    }
}

/// Runs store work on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("request task failed: {e}")))?
}

pub(crate) fn caller(app: &App, headers: &HeaderMap) -> ApiResult<Caller> {
    let auth = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(token) = auth else {
        Metrics::add(&app.metrics.denied, 1);
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "no token given: set IMGSTORE_TOKEN or pass --token-file",
        ));
    };
    app.authenticate(token).ok_or_else(|| {
        Metrics::add(&app.metrics.denied, 1);
        tracing::warn!("request with an unknown token refused");
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the server does not accept this token: ask its operator for one (`imgstore token add`)",
        )
    })
}

pub(crate) fn require(c: &Caller, roles: &[Role], what: &str) -> ApiResult<()> {
    if roles.contains(&c.role) {
        Ok(())
    } else {
        tracing::warn!(token = %c.token, role = c.role.as_str(), what, "operation refused for role");
        Err(ApiError::forbidden(format!(
            "token {:?} has role {} and may not {what}",
            c.token,
            c.role.as_str()
        )))
    }
}

/// For each object key: may this caller learn of it? Admins see
/// everything; others what is marked for one of their namespaces.
fn visible(app: &App, c: &Caller, keys: &[[u8; 33]]) -> ApiResult<Vec<bool>> {
    let mut out = vec![c.is_admin(); keys.len()];
    if c.is_admin() {
        return Ok(out);
    }
    for ns in &c.namespaces {
        for (o, m) in out.iter_mut().zip(app.store.ns_marked(ns, keys)?) {
            *o |= m;
        }
    }
    Ok(out)
}

/// The items whose objects (`key` of each) this caller may see.
fn only_visible<T>(
    app: &App,
    c: &Caller,
    items: Vec<T>,
    key: impl Fn(&T) -> [u8; 33],
) -> ApiResult<Vec<T>> {
    let keys: Vec<[u8; 33]> = items.iter().map(key).collect();
    let vis = visible(app, c, &keys)?;
    Ok(items
        .into_iter()
        .zip(vis)
        .filter(|(_, v)| *v)
        .map(|(t, _)| t)
        .collect())
}

/// A session id as sent: 16 hex digits, not zero.
fn session_id(hex: &str) -> Option<u64> {
    (hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| u64::from_str_radix(hex, 16).ok())
        .flatten()
        .filter(|id| *id != 0)
}

/// Opens session `chosen` (a random one when `None`) for `c`'s backup of
/// `image` in `namespace`, or joins it when that token already opened it
/// for that image (a client's first calls and its `POST /v1/sessions`
/// race: whichever comes first opens it). Bounded per token and in all.
fn enter_session(
    app: &App,
    c: &Caller,
    image: &str,
    namespace: &Option<String>,
    chosen: Option<u64>,
) -> ApiResult<u64> {
    let id = match chosen {
        Some(id) => id,
        None => {
            let mut raw = [0u8; 8];
            getrandom::fill(&mut raw)
                .map_err(|e| ApiError::internal(format!("no randomness: {e}")))?;
            u64::from_le_bytes(raw)
        }
    };
    let mut sessions = app.sessions.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(s) = sessions.get_mut(&id) {
        if s.token == c.token && s.image == image {
            s.last = Instant::now();
            return Ok(id);
        }
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "session_taken",
            format!("session {id:016x} is taken: choose another id"),
        ));
    }
    let mine = sessions.values().filter(|s| s.token == c.token).count();
    if mine >= app.limits.sessions_per_token || sessions.len() >= app.limits.sessions {
        tracing::warn!(token = %c.token, open = mine, "session refused: too many open");
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_sessions",
            format!(
                "token {:?} has {mine} backup sessions open (limit {}, {} in all): finish or close some, or wait for them to expire",
                c.token, app.limits.sessions_per_token, app.limits.sessions
            ),
        ));
    }
    sessions.insert(
        id,
        Session {
            token: c.token.clone(),
            image: image.to_string(),
            namespace: namespace.clone(),
            last: Instant::now(),
            uploads_ok: 0,
        },
    );
    Ok(id)
}

/// The namespace a backup of `image` by `c` goes to, when `c` may write
/// it (the checks of `POST /v1/sessions`).
fn image_namespace(app: &App, c: &Caller, image: &str) -> ApiResult<Option<String>> {
    require(c, &[Role::Backup, Role::Admin], "write backups")?;
    if !valid_image(image) {
        return Err(ApiError::bad(format!(
            "{image:?} is not a valid image name"
        )));
    }
    let namespace = app.config.namespace_of(image).map(str::to_string);
    if !c.is_admin()
        && !namespace
            .as_ref()
            .is_some_and(|ns| c.namespaces.contains(ns))
    {
        tracing::warn!(token = %c.token, image = %image, "backup of an image outside the token's namespaces refused");
        return Err(ApiError::forbidden(format!(
            "image {:?} is not in the namespaces of token {:?} ({}): back up under a name they cover",
            image,
            c.token,
            if c.namespaces.is_empty() { "none".to_string() } else { c.namespaces.join(", ") }
        )));
    }
    Ok(namespace)
}

pub(crate) fn session(app: &App, c: &Caller, headers: &HeaderMap) -> ApiResult<Scope> {
    let id = headers
        .get(proto::SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| u64::from_str_radix(v, 16).ok())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "no_session",
                "this call needs a backup session (POST /v1/sessions)",
            )
        })?;
    // A client-chosen session its first calls open, if its opening has
    // not come yet (`imgstore-image`).
    let image = headers
        .get(proto::IMAGE_HEADER)
        .and_then(|v| v.to_str().ok());
    let unknown = !app
        .sessions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains_key(&id);
    if let (true, Some(image)) = (unknown, image) {
        let ns = image_namespace(app, c, image)?;
        if id == 0 {
            return Err(ApiError::bad("session id 0"));
        }
        enter_session(app, c, image, &ns, Some(id))?;
    }
    let mut s = app.sessions.lock().unwrap_or_else(|p| p.into_inner());
    match s.get_mut(&id) {
        Some(sess) if sess.token == c.token => {
            sess.last = Instant::now();
            Ok(Scope {
                session: id,
                namespace: sess.namespace.clone(),
                global: c.is_admin() || app.config.trust_clients,
            })
        }
        _ => Err(ApiError::new(
            StatusCode::GONE,
            "no_session",
            format!("session {id:016x} is unknown or expired: start the backup again"),
        )),
    }
}

fn ids_body(body: &[u8]) -> ApiResult<Vec<Id>> {
    Ok(proto::decode_ids(body, limits::IDS_PER_CALL)?)
}

pub(crate) fn router(app: Shared) -> Router {
    let small = DefaultBodyLimit::max(crate::guard::small_body_limit());
    Router::new()
        .route(paths::HEALTH, get(health))
        .route(paths::METRICS, get(metrics))
        .route(paths::HELLO, get(hello))
        .route(paths::SNAPSHOTS, get(snapshots))
        .route(paths::PAGES, post(pages))
        .route(paths::REGIONS, post(regions))
        .route(paths::CHUNKS_GET, post(chunks_get))
        .route(paths::CHUNKS_KNOWN, post(chunks_known))
        .route(paths::REGIONS_KNOWN, post(regions_known))
        .route(paths::REFS, post(refs))
        .route(paths::TOTALS, get(totals))
        .route(
            paths::REGION,
            put(put_region).layer(DefaultBodyLimit::max(limits::PUT_REGION_BYTES)),
        )
        .route(
            paths::COMMIT,
            post(commit).layer(DefaultBodyLimit::max(limits::COMMIT_BYTES)),
        )
        .route(paths::ZERO_CVS_GET, post(zero_cvs))
        .route(
            paths::ZERO_CVS,
            post(put_zero_cvs).layer(DefaultBodyLimit::max(limits::ZERO_CVS * 40 + 16)),
        )
        .route(paths::PARENTS, get(parents))
        .route(paths::WITNESSES, get(witnesses))
        .route(paths::REPLACE, post(replace))
        .route(paths::FORGET, post(forget))
        .route(paths::PROTECT, post(protect))
        .route(paths::PROTECTED, get(protected))
        .route(paths::GC, post(gc))
        .route(paths::DAMAGE, get(damage).post(mark_damage))
        .route(paths::DAMAGE_CLEAR, post(clear_damage))
        .route(paths::SCAN, post(scan))
        .route(paths::SESSIONS, post(open_session))
        .route(paths::SESSION, delete(close_session))
        .layer(small)
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            crate::guard::guard,
        ))
        .layer(axum::middleware::from_fn_with_state(app.clone(), log))
        .with_state(app)
}

/// One structured log line per request; counters.
async fn log(
    State(app): State<Shared>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let len_in = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .unwrap_or(0);
    let resp = next.run(req).await;
    let status = resp.status();
    let len_out = axum::body::HttpBody::size_hint(resp.body())
        .exact()
        .unwrap_or(0);
    Metrics::add(&app.metrics.requests, 1);
    Metrics::add(&app.metrics.bytes_in, len_in);
    Metrics::add(&app.metrics.bytes_out, len_out);
    if status.is_client_error() || status.is_server_error() {
        Metrics::add(&app.metrics.errors, 1);
    }
    tracing::info!(
        %method,
        path = %path,
        status = status.as_u16(),
        bytes_in = len_in,
        bytes_out = len_out,
        ms = started.elapsed().as_millis() as u64,
        "request"
    );
    resp
}

async fn health() -> Response {
    Json(serde_json::json!({"status": "ok", "protocol": proto::VERSION})).into_response()
}

async fn metrics(State(app): State<Shared>, headers: HeaderMap) -> ApiResult {
    let c = caller(&app, &headers)?;
    require(&c, &[Role::Admin], "read metrics")?;
    let sessions = app.sessions.lock().unwrap_or_else(|p| p.into_inner()).len();
    Ok(app
        .metrics
        .render(sessions, app.store.pinned())
        .into_response())
}

async fn hello(State(app): State<Shared>, headers: HeaderMap) -> ApiResult {
    let c = caller(&app, &headers)?;
    Ok(Json(proto::Hello {
        protocol: proto::VERSION,
        server: format!("imgstore {}", env!("CARGO_PKG_VERSION")),
        config: app.store.config().clone(),
        role: c.role,
        uploads: Some(app.upload_share() as u32),
        commit_ends_session: true,
        paged_snapshots: true,
        awaits_uploads: true,
        client_session_ids: true,
        token: c.token,
        namespaces: c.namespaces,
    })
    .into_response())
}

/// The whole listing, or with `?after=[HEX]` one page of it (the records
/// after snapshot id HEX, from the first without one).
async fn snapshots(
    State(app): State<Shared>,
    headers: HeaderMap,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> ApiResult {
    let c = caller(&app, &headers)?;
    let after = match query.as_deref().map(|q| q.strip_prefix("after=")) {
        None => None,
        Some(Some("")) => Some(None),
        Some(Some(hex)) => Some(Some(proto::parse_id(hex)?)),
        Some(None) => return Err(ApiError::bad("the only query is after=[snapshot id]")),
    };
    let slot = read_slot(&app, &c).await?;
    blocking(move || {
        let body = match after {
            None => proto::encode_snapshots(&seen(&app, &c)?),
            Some(after) => {
                let (more, page) = seen_page(&app, &c, after)?;
                proto::encode_snapshot_page(more, &page)
            }
        };
        Ok(bulk(body, slot))
    })
    .await
}

async fn records(app: Shared, headers: HeaderMap, body: Bytes, kind: ObjectKind) -> ApiResult {
    let c = caller(&app, &headers)?;
    let ids = ids_body(&body)?;
    // A backup reading its parent's pages will name their regions without
    // sending them: pin those for its session.
    let scope = match kind {
        ObjectKind::Page if headers.contains_key(proto::SESSION_HEADER) => {
            Some(session(&app, &c, &headers)?)
        }
        _ => None,
    };
    let read = read_slot(&app, &c).await?;
    blocking(move || {
        let keys: Vec<[u8; 33]> = ids.iter().map(|id| kind.key(id)).collect();
        if let Some(i) = visible(&app, &c, &keys)?.iter().position(|v| !v) {
            return Err(RepoError::Missing { kind, id: ids[i] }.into());
        }
        let mut recs = Vec::with_capacity(ids.len());
        let mut total = 0usize;
        for batch in ids.chunks(64) {
            for r in app.store.raw_records(kind, batch)? {
                total += r.len() + 4;
                if total > limits::FRAMES_REPLY_BYTES {
                    return Err(ApiError::answer_too_large("records"));
                }
                recs.push(r);
            }
        }
        if let Some(s) = scope {
            let mut pins = HashSet::new();
            page_regions(&recs, &mut pins);
            app.store.pin(s.session, pins);
        }
        Ok(bulk(proto::encode_records(&recs), read))
    })
    .await
}

async fn pages(State(app): State<Shared>, headers: HeaderMap, body: Bytes) -> ApiResult {
    records(app, headers, body, ObjectKind::Page).await
}

async fn regions(State(app): State<Shared>, headers: HeaderMap, body: Bytes) -> ApiResult {
    records(app, headers, body, ObjectKind::Region).await
}

async fn chunks_get(State(app): State<Shared>, headers: HeaderMap, body: Bytes) -> ApiResult {
    let c = caller(&app, &headers)?;
    let ids = ids_body(&body)?;
    let slot = read_slot(&app, &c).await?;
    blocking(move || {
        let keys: Vec<[u8; 33]> = ids.iter().map(|id| ObjectKind::Chunk.key(id)).collect();
        let vis = visible(&app, &c, &keys)?;
        // The answer's size is known before anything is read: each stored
        // chunk's reference entry holds its stored length. An answer past
        // its limit (the same large chunk named thousands of times, say) is
        // refused without reading a byte of it.
        let wanted: Vec<Id> = ids
            .iter()
            .zip(&vis)
            .filter(|(_, v)| **v)
            .map(|(id, _)| *id)
            .collect();
        let size: usize = app
            .store
            .ref_counts(ObjectKind::Chunk, &wanted)?
            .iter()
            .map(|rc| rc.map_or(64, |rc| rc.stored_len as usize + 8))
            .sum::<usize>()
            + (ids.len() - wanted.len()) * 8;
        if size > limits::FRAMES_REPLY_BYTES {
            return Err(ApiError::answer_too_large("frames"));
        }
        let mut read = app.store.chunk_frames(&wanted)?.into_iter();
        let mut frames = Vec::with_capacity(ids.len());
        let mut total = 0usize;
        for v in &vis {
            let f = if *v {
                read.next().unwrap_or(Err(ChunkFault::Missing))
            } else {
                Err(ChunkFault::Missing)
            };
            // A stored length that lied (damage) cannot pass the limit.
            total += f.as_ref().map_or(64, |b| b.len() + 8);
            if total > limits::FRAMES_REPLY_BYTES {
                return Err(ApiError::answer_too_large("frames"));
            }
            frames.push(f);
        }
        Ok(bulk(proto::encode_frames(&frames), slot))
    })
    .await
}

/// A slot among the bulk answers built or being sent at once
/// (`max_reads`), of which one token holds all but one (at least one): a
/// client on a slow link, whose answers hold their slots while they cross
/// it, leaves the others a slot to read with.
pub(crate) struct ReadSlot {
    _own: tokio::sync::OwnedSemaphorePermit,
    _all: tokio::sync::OwnedSemaphorePermit,
}

async fn read_slot(app: &Shared, c: &Caller) -> ApiResult<ReadSlot> {
    let mine = app.token_share(&c.token, crate::Share::Reads);
    let wait = async {
        let own = mine.acquire_owned().await.ok()?;
        let all = app.reads.clone().acquire_owned().await.ok()?;
        Some(ReadSlot {
            _own: own,
            _all: all,
        })
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), wait)
        .await
        .ok()
        .flatten()
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "the server is at its limit of bulk reads (max_reads, of which one token may hold all but one): retry later",
            )
        })
}

async fn chunks_known(State(app): State<Shared>, headers: HeaderMap, body: Bytes) -> ApiResult {
    let c = caller(&app, &headers)?;
    require(&c, &[Role::Backup, Role::Admin], "write backups")?;
    let scope = session(&app, &c, &headers)?;
    let ids = ids_body(&body)?;
    blocking(move || {
        let known = app.store.session_chunks_known(&scope, &ids)?;
        Ok(binary(proto::encode_known(&known)))
    })
    .await
}

/// A session that replaced a lost one asks which regions it may still
/// name (those it uploaded before, its parent's): the present ones are
/// pinned for it, the others it sends again.
async fn regions_known(State(app): State<Shared>, headers: HeaderMap, body: Bytes) -> ApiResult {
    let c = caller(&app, &headers)?;
    require(&c, &[Role::Backup, Role::Admin], "write backups")?;
    let scope = session(&app, &c, &headers)?;
    let ids = ids_body(&body)?;
    blocking(move || {
        let known = app.store.session_regions_known(&scope, &ids)?;
        Ok(binary(proto::encode_known(&known)))
    })
    .await
}

async fn refs(
    State(app): State<Shared>,
    Path(kind): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let c = caller(&app, &headers)?;
    let kind = proto::parse_kind(&kind)?;
    let ids = ids_body(&body)?;
    blocking(move || {
        let keys: Vec<[u8; 33]> = ids.iter().map(|id| kind.key(id)).collect();
        let vis = visible(&app, &c, &keys)?;
        let rcs = app.store.ref_counts(kind, &ids)?;
        // A count is repository-wide: how many other snapshots and
        // namespaces use an object. Others than admins learn only that an
        // object of theirs is present (count 1) and its sizes.
        let admin = c.is_admin();
        let out: Vec<Option<Vec<u8>>> = rcs
            .into_iter()
            .zip(vis)
            .map(|(rc, v)| {
                rc.filter(|_| v).map(|mut rc| {
                    if !admin {
                        rc.count = rc.count.min(1);
                    }
                    rc.encode().to_vec()
                })
            })
            .collect();
        Ok(binary(proto::encode_refs(&out)))
    })
    .await
}

async fn totals(State(app): State<Shared>, headers: HeaderMap) -> ApiResult {
    let c = caller(&app, &headers)?;
    require(&c, &[Role::Admin], "read repository totals")?;
    blocking(move || {
        let t = app.store.totals()?;
        Ok(Json(proto::WireTotals {
            objects: t.objects,
            orphans: t.orphans,
            storage_bytes: app.store.storage_bytes().unwrap_or(0),
        })
        .into_response())
    })
    .await
}

async fn put_region(
    State(app): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let c = caller(&app, &headers)?;
    require(&c, &[Role::Backup, Role::Admin], "write backups")?;
    let scope = session(&app, &c, &headers)?;
    let id = proto::parse_id(&id)?;
    blocking(move || {
        let (recipe, frames) = proto::decode_put_region(&body)?;
        if Id::hash(recipe) != id {
            return Err(ApiError::bad(format!(
                "region {id}: the recipe does not hash to its id"
            )));
        }
        let encrypted = app.store.config().encryption.is_some();
        let lens = recipe_shape(&app, &scope, &id, recipe, encrypted)?;
        let mut map: HashMap<Id, (Vec<u8>, u32)> = HashMap::with_capacity(frames.len());
        let mut raw = Vec::new();
        let mut inflated = 0u64;
        for f in frames {
            let Some(len) = lens.get(&f.id) else {
                return Err(ApiError::bad(format!(
                    "region {id}: chunk {} is not in its recipe",
                    f.id
                )));
            };
            if map.contains_key(&f.id) {
                return Err(ApiError::bad(format!(
                    "region {id}: chunk {} is sent twice",
                    f.id
                )));
            }
            if let Some(len) = len {
                // The recipe says how long the chunk is: the frame must
                // agree before anything is decompressed, and all frames of
                // a request together inflate to at most one region.
                if f.raw_len != *len {
                    return Err(ApiError::bad(format!(
                        "region {id}: chunk {} is {} bytes in its recipe, {} in its frame",
                        f.id, len, f.raw_len
                    )));
                }
                inflated += u64::from(f.raw_len);
                if inflated > region_bound(&app) {
                    return Err(ApiError::bad(format!(
                        "region {id}: its frames hold more than one region of data"
                    )));
                }
                // The chunk must be what its id says, whatever the client
                // claims: no one can store wrong bytes under an id others
                // reuse.
                FrameCodec::with_thread(|codec| codec.decode(f.frame, &mut raw))
                    .map_err(|e| ApiError::bad(format!("region {id}: chunk {}: {e}", f.id)))?;
                if raw.len() != f.raw_len as usize || Id::hash(&raw) != f.id {
                    return Err(ApiError::bad(format!(
                        "region {id}: chunk {}: its content does not hash to its id",
                        f.id
                    )));
                }
            } else if !imgstore_format::sealed::is_sealed_chunk(f.frame) {
                return Err(ApiError::bad(format!(
                    "region {id}: chunk {} is not a sealed frame, and this repository is encrypted",
                    f.id
                )));
            }
            map.insert(f.id, (f.frame.to_vec(), f.raw_len));
        }
        // A chunk named but not sent must be one this namespace stored:
        // otherwise whether another namespace holds it would show in the
        // answer (stored or "missing"), and naming it would grant access.
        if let (Some(ns), false) = (&scope.namespace, scope.global) {
            let unsent: Vec<Id> = lens
                .keys()
                .filter(|c| !map.contains_key(c))
                .copied()
                .collect();
            let keys: Vec<[u8; 33]> = unsent.iter().map(|c| ObjectKind::Chunk.key(c)).collect();
            for (c, mine) in unsent.iter().zip(app.store.ns_marked(ns, &keys)?) {
                if !mine {
                    return Err(RepoError::Missing {
                        kind: ObjectKind::Chunk,
                        id: *c,
                    }
                    .into());
                }
            }
        }
        // Outside the caller's namespace nothing may show through: the
        // answer is what a private repository would say (every frame sent
        // is new, the region is new unless this namespace had it), whatever
        // other namespaces stored.
        let private = match (&scope.namespace, scope.global) {
            (Some(ns), false) => Some(!app.store.ns_marked(ns, &[ObjectKind::Region.key(&id)])?[0]),
            _ => None,
        };
        let sent_bytes: u64 = map.values().map(|(f, _)| f.len() as u64).sum();
        let sent = map.len() as u64;
        let stored = app.store.put_region_in(Some(&scope), &id, recipe, &map)?;
        let out = match private {
            Some(region_new) => imgstore_repo::PutOutcome {
                region_new,
                new_chunks: sent,
                new_bytes: sent_bytes + if region_new { recipe.len() as u64 } else { 0 },
            },
            None => stored,
        };
        Metrics::add(&app.metrics.chunks_new, stored.new_chunks);
        Metrics::add(&app.metrics.chunk_bytes_new, stored.new_bytes);
        Metrics::add(&app.metrics.regions_put, 1);
        app.upload_stored(scope.session);
        Ok(Json(out).into_response())
    })
    .await
}

/// The most data one region may hold: the repository's region size, or a
/// copied snapshot's up to 64 MiB (what an upload's body limit carries).
fn region_bound(app: &App) -> u64 {
    u64::from(app.store.config().region_size).max(64 << 20)
}

/// The chunks a region recipe names, each with its length when the server
/// can check the chunk (a plain repository) or `None` (an encrypted one,
/// whose frames only the key opens). The recipe's shape must be the
/// repository's: a plain repository takes no sealed records (their
/// frames would go unchecked), an encrypted one no plain records.
///
/// In an encrypted repository a namespaced session's chunk ids must carry
/// its namespace's tag (`imgstore_format::sealed::namespace_tag`): the
/// server cannot check a sealed frame, so it keeps each namespace writing
/// only where no other namespace's ids point.
fn recipe_shape(
    app: &App,
    scope: &Scope,
    id: &Id,
    recipe: &[u8],
    encrypted: bool,
) -> ApiResult<HashMap<Id, Option<u32>>> {
    let mut lens = HashMap::new();
    if encrypted {
        if !is_sealed_record(recipe) {
            return Err(ApiError::bad(format!(
                "region {id}: this repository is encrypted and takes only sealed recipes"
            )));
        }
        let tagged = match (&scope.namespace, scope.global) {
            (Some(ns), false) => Some(ns.as_str()),
            _ => None,
        };
        let children = record_children(RecordKind::Region, recipe)
            .map_err(|e| ApiError::bad(format!("region {id}: {e}")))?;
        too_many_chunks(id, children.len())?;
        for c in children {
            if let Some(ns) = tagged {
                if !imgstore_format::sealed::has_namespace_tag(&c, ns) {
                    return Err(ApiError::bad(format!(
                        "region {id}: chunk {c} does not carry namespace {ns:?}'s tag, which every chunk id written from a namespace of an encrypted repository must (an older client: upgrade it; a copy of snapshots made outside the namespace: copy with an admin token)"
                    )));
                }
            }
            lens.insert(c, None);
        }
        return Ok(lens);
    }
    if is_sealed_record(recipe) {
        return Err(ApiError::bad(format!(
            "region {id}: this repository is not encrypted and takes no sealed recipes"
        )));
    }
    let region = imgstore_format::Region::decode(recipe)
        .map_err(|e| ApiError::bad(format!("region {id}: {e}")))?;
    too_many_chunks(id, region.entries.len())?;
    let mut total = 0u64;
    for e in &region.entries {
        total += u64::from(e.len);
        if let Some(c) = e.chunk {
            match lens.insert(c, Some(e.len)) {
                Some(Some(l)) if l != e.len => {
                    return Err(ApiError::bad(format!(
                        "region {id}: chunk {c} has two lengths in its recipe"
                    )))
                }
                _ => {}
            }
        }
    }
    if total > region_bound(app) {
        return Err(ApiError::bad(format!(
            "region {id}: its recipe covers more than one region"
        )));
    }
    Ok(lens)
}

/// A recipe names at most as many chunks as a region can hold at the
/// smallest chunk size (64 MiB of 1 KiB chunks): one naming 453,438
/// stored chunks held the store's write lock for 14 s while counting
/// their references, every other tenant's upload waiting.
fn too_many_chunks(id: &Id, n: usize) -> ApiResult<()> {
    if n > limits::FRAMES_PER_REGION {
        return Err(ApiError::bad(format!(
            "region {id}: its recipe names {n} chunks ({} allowed)",
            limits::FRAMES_PER_REGION
        )));
    }
    Ok(())
}

async fn commit(State(app): State<Shared>, headers: HeaderMap, body: Bytes) -> ApiResult {
    let c = caller(&app, &headers)?;
    require(&c, &[Role::Backup, Role::Admin], "write backups")?;
    let scope = session(&app, &c, &headers)?;
    let image = {
        let s = app.sessions.lock().unwrap_or_else(|p| p.into_inner());
        s.get(&scope.session)
            .map(|s| s.image.clone())
            .unwrap_or_default()
    };
    blocking(move || {
        let (record, parent, raw_pages) = proto::decode_commit(&body)?;
        let encrypted = app.store.config().encryption.is_some();
        check_commit(&app, &image, record, &raw_pages, encrypted)?;
        let pages: Vec<Vec<u8>> = raw_pages.iter().map(|p| p.to_vec()).collect();
        // What a private repository would answer: the bytes of the pages
        // sent that this namespace did not hold, whatever others stored.
        let private_added = match (&scope.namespace, scope.global) {
            (Some(ns), false) => {
                namespace_owns(&app, ns, record, &pages)?;
                let mut by_id: HashMap<Id, u64> = HashMap::new();
                for p in &pages {
                    by_id.insert(Id::hash(p), p.len() as u64);
                }
                let ids: Vec<Id> = by_id.keys().copied().collect();
                let keys: Vec<[u8; 33]> = ids.iter().map(|p| ObjectKind::Page.key(p)).collect();
                let marked = app.store.ns_marked(ns, &keys)?;
                Some(
                    ids.iter()
                        .zip(marked)
                        .filter(|(_, m)| !m)
                        .map(|(p, _)| by_id[p])
                        .sum::<u64>(),
                )
            }
            _ => None,
        };
        if let Some(p) = &parent {
            // The parent is display-only, but must be a snapshot this
            // caller sees (no linking into another namespace's history).
            let visible_parent = seen_ids(&app, &c)?.contains(p);
            if !visible_parent {
                return Err(ApiError::bad(format!(
                    "parent {p} is not a snapshot you can see"
                )));
            }
        }
        let attest = imgstore_store::Attestation {
            image: image.clone(),
            committed_ns: now_ns(),
        };
        let (id, added) =
            app.store
                .commit_in(Some(&scope), record, &pages, parent.as_ref(), Some(&attest))?;
        let added = private_added.unwrap_or(added);
        // The commit ends the session: the snapshot now holds what it
        // pinned. A commit sent again after a lost answer finds the
        // session gone, and the client repeats it in a new one (a no-op).
        app.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&scope.session);
        app.store.end_session(scope.session);
        Metrics::add(&app.metrics.commits, 1);
        tracing::info!(token = %c.token, image = %image, snapshot = %id, "snapshot committed");
        Ok(Json(proto::Committed {
            id: id.to_hex(),
            added_bytes: added,
        })
        .into_response())
    })
    .await
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// A snapshot record within [`limits::SNAPSHOT_RECORD_BYTES`].
fn check_record_size(record: &[u8]) -> ApiResult<()> {
    if record.len() > limits::SNAPSHOT_RECORD_BYTES {
        return Err(ApiError::bad(format!(
            "the snapshot record is {} bytes, over the limit of {} (long tags or names?)",
            record.len(),
            limits::SNAPSHOT_RECORD_BYTES
        )));
    }
    Ok(())
}

/// The records of a commit have the repository's shape, and a plain
/// snapshot record names the session's image and a time not in the
/// future of the server's clock (a future-dated snapshot would outlive
/// the real ones under `forget --keep-within` and `--keep-last`). A sealed
/// record hides both: the server records its own witness beside it
/// ([`imgstore_store::Attestation`]), which clients check after opening.
fn check_commit(
    app: &App,
    image: &str,
    record: &[u8],
    pages: &[&[u8]],
    encrypted: bool,
) -> ApiResult<()> {
    check_record_size(record)?;
    if encrypted {
        if !is_sealed_record(record) || pages.iter().any(|p| !is_sealed_record(p)) {
            return Err(ApiError::bad(
                "this repository is encrypted and takes only sealed records",
            ));
        }
        record_children(RecordKind::Snapshot, record)
            .map_err(|e| ApiError::bad(format!("snapshot record: {e}")))?;
        for p in pages {
            let regions = record_children(RecordKind::Page, p)
                .map_err(|e| ApiError::bad(format!("index page: {e}")))?;
            // A plain page's decoder allows no more; a sealed one named
            // half a million regions in 16 MiB, which pinning multiplied.
            if regions.len() > imgstore_format::PAGE_REGIONS {
                return Err(ApiError::bad(format!(
                    "index page: {} regions ({} allowed)",
                    regions.len(),
                    imgstore_format::PAGE_REGIONS
                )));
            }
        }
        return Ok(());
    }
    if is_sealed_record(record) || pages.iter().any(|p| is_sealed_record(p)) {
        return Err(ApiError::bad(
            "this repository is not encrypted and takes no sealed records",
        ));
    }
    let snap =
        Snapshot::decode(record).map_err(|e| ApiError::bad(format!("snapshot record: {e}")))?;
    if snap.name != image {
        return Err(ApiError::bad(format!(
            "the session is for image {image:?}, the snapshot names {:?}",
            snap.name
        )));
    }
    let skew = app.limits.clock_skew.as_nanos() as i64;
    if snap.time_ns > now_ns().saturating_add(skew) {
        return Err(ApiError::bad(format!(
            "the snapshot is dated in the future of the server's clock (more than {} ahead): fix the client's clock",
            humantime::format_duration(app.limits.clock_skew)
        )));
    }
    for p in pages {
        imgstore_format::Page::decode(p).map_err(|e| ApiError::bad(format!("index page: {e}")))?;
    }
    Ok(())
}

/// A namespaced writer names only what its namespace holds or sends now:
/// pages it does not send must be marked for it, and so must the regions
/// of the pages it sends. Otherwise the commit would tell it whether other
/// namespaces hold them, and mark them readable for it.
fn namespace_owns(app: &App, ns: &str, record: &[u8], pages: &[Vec<u8>]) -> ApiResult<()> {
    let sent: HashSet<Id> = pages.iter().map(|p| Id::hash(p)).collect();
    let named = record_children(RecordKind::Snapshot, record)
        .map_err(|e| ApiError::bad(format!("snapshot record: {e}")))?;
    let pages_named: Vec<[u8; 33]> = named
        .iter()
        .filter(|p| !sent.contains(p))
        .map(|p| ObjectKind::Page.key(p))
        .collect();
    all_marked(app, ns, pages_named)?;
    // The regions of the pages sent, a few pages at a time: a commit of
    // 4,090 pages naming a million regions each used to collect and look
    // up all 4.2 million keys at once (2.3 GiB for one request).
    for group in pages.chunks(OWNED_PAGES_AT_ONCE) {
        let mut need = Vec::new();
        for p in group {
            let regions = record_children(RecordKind::Page, p)
                .map_err(|e| ApiError::bad(format!("index page: {e}")))?;
            need.extend(regions.iter().map(|r| ObjectKind::Region.key(r)));
        }
        all_marked(app, ns, need)?;
    }
    Ok(())
}

/// Pages whose regions [`namespace_owns`] looks up at once: 64 pages of at
/// most `PAGE_REGIONS` regions, some 2 MiB of keys.
const OWNED_PAGES_AT_ONCE: usize = 64;

/// Every key of `keys` is marked for namespace `ns`; else the first that
/// is not, as missing.
fn all_marked(app: &App, ns: &str, mut keys: Vec<[u8; 33]>) -> ApiResult<()> {
    keys.sort_unstable();
    keys.dedup();
    for (k, mine) in keys.iter().zip(app.store.ns_marked(ns, &keys)?) {
        if !mine {
            let (kind, id) = ObjectKind::parse_key(k).expect("33-byte key");
            return Err(RepoError::Missing { kind, id }.into());
        }
    }
    Ok(())
}

#[derive(serde::Deserialize)]
struct ZeroAsk {
    region_size: u32,
    start: u64,
    count: u64,
}

async fn zero_cvs(
    State(app): State<Shared>,
    headers: HeaderMap,
    Json(ask): Json<ZeroAsk>,
) -> ApiResult {
    let c = caller(&app, &headers)?;
    if ask.count as usize > limits::ZERO_CVS {
        return Err(ApiError::bad(format!(
            "{} values asked, the limit is {}",
            ask.count,
            limits::ZERO_CVS
        )));
    }
    // Region sizes are powers of two of at least 1 MiB (FORMAT.md).
    if !ask.region_size.is_power_of_two() || ask.region_size < 1 << 20 {
        return Err(ApiError::bad(format!(
            "region size {} is not a power of two of at least 1 MiB",
            ask.region_size
        )));
    }
    // Indices past the largest image a snapshot can describe name nothing.
    let regions_max = (1u64 << 60) / u64::from(ask.region_size);
    if ask
        .start
        .checked_add(ask.count)
        .is_none_or(|end| end > regions_max)
    {
        return Err(ApiError::bad(format!(
            "regions {}+{} are past the largest image ({regions_max} regions)",
            ask.start, ask.count
        )));
    }
    let read = read_slot(&app, &c).await?;
    blocking(move || {
        let cvs = app
            .store
            .zero_cvs_range(ask.region_size, ask.start, ask.count)?;
        Ok(bulk(proto::encode_zero_cvs(&cvs), read))
    })
    .await
}

async fn put_zero_cvs(State(app): State<Shared>, headers: HeaderMap, body: Bytes) -> ApiResult {
    let c = caller(&app, &headers)?;
    require(&c, &[Role::Backup, Role::Admin], "write backups")?;
    let (size, cvs) = proto::decode_put_zero_cvs(&body)?;
    // A wrong value would make other hosts' backups record wrong digests:
    // only values from trusted writers are kept (others' are dropped; their
    // first backups hash their holes, as without the cache).
    if !(c.is_admin() || app.config.trust_clients) {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    blocking(move || {
        app.store.put_zero_cvs(size, &cvs)?;
        Ok(StatusCode::NO_CONTENT.into_response())
    })
    .await
}

/// Ids of the snapshots this caller sees.
fn seen_ids(app: &App, c: &Caller) -> ApiResult<HashSet<Id>> {
    let mut out = HashSet::new();
    each_seen(app, c, None, |id, _| {
        out.insert(id);
        Ok(true)
    })?;
    Ok(out)
}

/// The snapshot records this caller may see after `after`, up to a page's
/// bytes (at least one); and whether more follow.
fn seen_page(app: &App, c: &Caller, after: Option<Id>) -> ApiResult<(bool, proto::Listed)> {
    let mut out = Vec::new();
    let mut total = 0usize;
    let mut more = false;
    each_seen(app, c, after.as_ref(), |id, v| {
        if !out.is_empty() && total + v.len() + 36 > limits::SNAPSHOT_PAGE_BYTES {
            more = true;
            return Ok(false);
        }
        total += v.len() + 36;
        out.push((id, v.to_vec()));
        Ok(true)
    })?;
    Ok((more, out))
}

/// The snapshot records this caller may see, with an answer bounded as
/// any bulk answer.
fn seen(app: &App, c: &Caller) -> ApiResult<Vec<(Id, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut total = 0usize;
    each_seen(app, c, None, |id, v| {
        total += v.len() + 36;
        if total > limits::FRAMES_REPLY_BYTES {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!(
                    "the snapshots this token sees pass the answer limit ({} MiB): ask for them in pages (?after=)",
                    limits::FRAMES_REPLY_BYTES >> 20
                ),
            ));
        }
        out.push((id, v.to_vec()));
        Ok(true)
    })?;
    Ok(out)
}

/// Calls `f` for each snapshot record this caller may see, one record in
/// memory at a time: plain ones by their image name, sealed ones (whose
/// names the server cannot read) by the namespace their session committed
/// them under.
fn each_seen(
    app: &App,
    c: &Caller,
    after: Option<&Id>,
    mut f: impl FnMut(Id, &[u8]) -> ApiResult<bool>,
) -> ApiResult<()> {
    let mut failed: Option<ApiError> = None;
    let after = after.map(|a| a.as_bytes().as_slice());
    app.store.each_snapshot_record(after, |k, v| {
        let Some(id) = Id::from_slice(k) else {
            return Ok(true);
        };
        let shown = if c.is_admin() {
            true
        } else if is_sealed_record(v) {
            let key = imgstore_store::snapshot_ns_key(&id);
            let mut any = false;
            for ns in &c.namespaces {
                any |= app.store.ns_marked(ns, &[key])?[0];
            }
            any
        } else {
            Snapshot::decode(v).is_ok_and(|s| c.sees(&app.config, &s.name))
        };
        if !shown {
            return Ok(true);
        }
        match f(id, v) {
            Ok(go_on) => Ok(go_on),
            Err(e) => {
                failed = Some(e);
                Ok(false)
            }
        }
    })?;
    failed.map_or(Ok(()), Err)
}

/// The server's commit witnesses of the snapshots this caller sees.
async fn witnesses(State(app): State<Shared>, headers: HeaderMap) -> ApiResult {
    let c = caller(&app, &headers)?;
    // Reads every snapshot record: a bulk read.
    let _read = read_slot(&app, &c).await?;
    blocking(move || {
        let seen = seen_ids(&app, &c)?;
        let list: Vec<proto::Witness> = app
            .store
            .attestations()?
            .into_iter()
            .filter(|(id, _)| seen.contains(id))
            .map(|(id, a)| proto::Witness {
                id,
                image: a.image,
                committed_ns: a.committed_ns,
            })
            .collect();
        Ok(binary(proto::encode_witnesses(&list)))
    })
    .await
}

async fn parents(State(app): State<Shared>, headers: HeaderMap) -> ApiResult {
    let c = caller(&app, &headers)?;
    // Reads every snapshot record: a bulk read.
    let _read = read_slot(&app, &c).await?;
    blocking(move || {
        let seen = seen_ids(&app, &c)?;
        let pairs: Vec<(Id, Id)> = app
            .store
            .parents()?
            .into_iter()
            .filter(|(s, _)| seen.contains(s))
            .collect();
        Ok(binary(proto::encode_pairs(&pairs)))
    })
    .await
}

async fn replace(
    State(app): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let c = caller(&app, &headers)?;
    require(&c, &[Role::Admin], "change snapshots")?;
    let old = proto::parse_id(&id)?;
    check_record_size(&body)?;
    blocking(move || {
        let new = app.store.replace_snapshot(&old, &body)?;
        Ok(Json(proto::Committed {
            id: new.to_hex(),
            added_bytes: 0,
        })
        .into_response())
    })
    .await
}

async fn forget(State(app): State<Shared>, headers: HeaderMap, body: Bytes) -> ApiResult {
    let c = caller(&app, &headers)?;
    require(&c, &[Role::Admin], "forget snapshots")?;
    let ids = ids_body(&body)?;
    blocking(move || {
        let out = app.store.forget(&ids)?;
        tracing::info!(token = %c.token, snapshots = out.snapshots, "snapshots forgotten");
        Ok(Json(out).into_response())
    })
    .await
}

async fn protect(
    State(app): State<Shared>,
    headers: HeaderMap,
    Json(req): Json<proto::ProtectRequest>,
) -> ApiResult {
    let c = caller(&app, &headers)?;
    require(&c, &[Role::Admin], "protect or unprotect snapshots")?;
    let id = proto::parse_id(&req.id)?;
    blocking(move || {
        app.store.set_protected(&id, req.protected)?;
        Ok(StatusCode::NO_CONTENT.into_response())
    })
    .await
}

async fn protected(State(app): State<Shared>, headers: HeaderMap) -> ApiResult {
    let c = caller(&app, &headers)?;
    // Reads every snapshot record: a bulk read.
    let _read = read_slot(&app, &c).await?;
    blocking(move || {
        let seen = seen_ids(&app, &c)?;
        let ids: Vec<Id> = app
            .store
            .protected()?
            .into_iter()
            .filter(|id| seen.contains(id))
            .collect();
        Ok(binary(proto::encode_ids(&ids)))
    })
    .await
}

async fn gc(
    State(app): State<Shared>,
    headers: HeaderMap,
    Json(req): Json<proto::GcRequest>,
) -> ApiResult {
    let c = caller(&app, &headers)?;
    require(&c, &[Role::Admin], "collect garbage")?;
    blocking(move || {
        let out = app.store.gc(req.dry_run)?;
        Metrics::add(&app.metrics.gc_runs, 1);
        tracing::info!(token = %c.token, dry_run = req.dry_run, chunks = out.removed.chunks, "gc finished");
        Ok(Json(out).into_response())
    })
    .await
}

async fn damage(State(app): State<Shared>, headers: HeaderMap) -> ApiResult {
    let c = caller(&app, &headers)?;
    // Every mark is read: a bulk read, bounded as one.
    let slot = read_slot(&app, &c).await?;
    blocking(move || {
        let marks = only_visible(&app, &c, app.store.damage_marks()?, |m| m.kind.key(&m.id))?;
        let mut total = 0usize;
        let mut out: Vec<proto::WireMark> = Vec::with_capacity(marks.len());
        for m in &marks {
            let w = proto::WireMark::from(m);
            total += w.why.len() + w.id.len() + 32;
            if total > limits::FRAMES_REPLY_BYTES {
                return Err(ApiError::answer_too_large("damage marks"));
            }
            out.push(w);
        }
        let body = serde_json::to_vec(&out)
            .map_err(|e| ApiError::internal(format!("damage marks: {e}")))?;
        Ok(bulk_as("application/json", body, slot))
    })
    .await
}

async fn mark_damage(
    State(app): State<Shared>,
    headers: HeaderMap,
    Json(marks): Json<Vec<proto::WireMark>>,
) -> ApiResult {
    let c = caller(&app, &headers)?;
    require(&c, &[Role::Restore, Role::Admin], "record damage")?;
    let mut marks = marks
        .iter()
        .map(|m| m.parse())
        .collect::<Result<Vec<_>, _>>()?;
    // Each object is checked once (a body naming one chunk ten thousand
    // times cost a second of CPU), as a bulk read: in a read slot.
    marks.sort_by_key(|m| m.kind.key(&m.id));
    marks.dedup_by_key(|m| m.kind.key(&m.id));
    let _read = read_slot(&app, &c).await?;
    blocking(move || {
        let marks = only_visible(&app, &c, marks, |m| m.kind.key(&m.id))?;
        // A mark lets the next upload of the object replace it: the server
        // records only marks it can confirm, unless an admin sends them.
        let marks = if c.is_admin() {
            marks
        } else {
            confirmed_damage(&app, marks)?
        };
        app.store.mark_damaged(&marks)?;
        Ok(StatusCode::NO_CONTENT.into_response())
    })
    .await
}

/// The marks whose objects the server itself finds damaged: a record
/// that no longer hashes to its id (or is gone), a plain chunk that does
/// not decode to its id. An encrypted chunk only the key opens: its marks
/// are kept (they report what a client found), but a non-admin upload
/// never replaces its bytes (`imgstore_store`'s healing rule).
fn confirmed_damage(
    app: &App,
    marks: Vec<imgstore_repo::DamageMark>,
) -> ApiResult<Vec<imgstore_repo::DamageMark>> {
    let encrypted = app.store.config().encryption.is_some();
    let mut out = Vec::new();
    let mut raw = Vec::new();
    for m in marks {
        let damaged = match m.kind {
            ObjectKind::Chunk => match app.store.chunk_frames(&[m.id])?.pop() {
                Some(Ok(_)) if encrypted => true,
                Some(Ok(frame)) => {
                    FrameCodec::with_thread(|codec| codec.decode(&frame, &mut raw)).is_err()
                        || Id::hash(&raw) != m.id
                }
                _ => true,
            },
            kind => match app.store.raw_records(kind, &[m.id]) {
                Ok(r) => r.first().is_none_or(|r| Id::hash(r) != m.id),
                Err(_) => true,
            },
        };
        if damaged {
            out.push(m);
        } else {
            tracing::warn!(kind = ?m.kind, id = %m.id, "damage mark refused: the object is intact here");
        }
    }
    Ok(out)
}

async fn clear_damage(
    State(app): State<Shared>,
    headers: HeaderMap,
    Json(objs): Json<Vec<proto::WireObject>>,
) -> ApiResult {
    let c = caller(&app, &headers)?;
    require(&c, &[Role::Restore, Role::Admin], "clear damage marks")?;
    let objs = objs
        .iter()
        .map(|o| Ok((proto::parse_kind(&o.kind)?, proto::parse_id(&o.id)?)))
        .collect::<Result<Vec<_>, proto::Malformed>>()?;
    blocking(move || {
        let objs = only_visible(&app, &c, objs, |(k, id)| k.key(id))?;
        app.store.clear_damaged(&objs)?;
        Ok(StatusCode::NO_CONTENT.into_response())
    })
    .await
}

async fn scan(
    State(app): State<Shared>,
    headers: HeaderMap,
    Json(req): Json<proto::ScanRequest>,
) -> ApiResult {
    let c = caller(&app, &headers)?;
    require(&c, &[Role::Admin], "scan the repository (check)")?;
    let after = match &req.after {
        Some(h) => Some(hex_decode(h).ok_or_else(|| ApiError::bad("`after` is not hex"))?),
        None => None,
    };
    blocking(move || {
        let what = match req.what {
            proto::ScanWhat::Snapshots => "snapshots",
            proto::ScanWhat::Recipes => "recipes",
            proto::ScanWhat::Refs => "refs",
            proto::ScanWhat::Orphans => "orphans",
        };
        let (entries, more) = app.store.scan_page(
            what,
            after.as_deref(),
            limits::SCAN_ENTRIES,
            limits::SCAN_BYTES,
        )?;
        Ok(binary(proto::encode_scan(more, &entries)))
    })
    .await
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || s.len() > 512 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Image names as the CLI accepts them: 1–128 of `[A-Za-z0-9._+-]`, not
/// starting with `.`, `+` or `-`.
fn valid_image(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'+' | b'-'))
}

async fn open_session(
    State(app): State<Shared>,
    headers: HeaderMap,
    Json(req): Json<proto::SessionRequest>,
) -> ApiResult {
    let c = caller(&app, &headers)?;
    let namespace = image_namespace(&app, &c, &req.image)?;
    if req.pin_pages.len() > limits::PIN_PAGES {
        return Err(ApiError::bad(format!(
            "{} pages to pin: at most {} (read the others within the session)",
            req.pin_pages.len(),
            limits::PIN_PAGES
        )));
    }
    let pin_pages = req
        .pin_pages
        .iter()
        .map(|h| Id::from_hex(h).map_err(|_| ApiError::bad("pin_pages: not a page id")))
        .collect::<ApiResult<Vec<Id>>>()?;
    // Reading the pages to pin is a bulk read like `/v1/pages`: it takes
    // a read slot, before the session exists (a busy answer leaves none).
    let _read = match pin_pages.is_empty() {
        true => None,
        false => Some(read_slot(&app, &c).await?),
    };
    let chosen = match &req.id {
        Some(h) => Some(session_id(h).ok_or_else(|| ApiError::bad("id: not 16 hex digits"))?),
        None => None,
    };
    let id = enter_session(&app, &c, &req.image, &namespace, chosen)?;
    if !pin_pages.is_empty() {
        let (a, caller) = (app.clone(), c.clone());
        let pinned = blocking(move || {
            pin_regions_of(&a, &caller, id, &pin_pages)?;
            Ok(StatusCode::NO_CONTENT.into_response())
        })
        .await;
        if let Err(e) = pinned {
            // No session is left behind a failed opening.
            app.sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            app.store.end_session(id);
            return Err(e);
        }
    }
    tracing::info!(token = %c.token, image = %req.image, session = %format!("{id:016x}"), "session opened");
    Ok(Json(proto::SessionReply {
        session: format!("{id:016x}"),
        namespace,
        idle_timeout_secs: app.idle.as_secs(),
    })
    .into_response())
}

/// Pins, for `session`, the regions named by those of `pages` the caller
/// can see and the store holds (a parent forgotten meanwhile is skipped:
/// the backup's commit then finds what is missing, as it would have).
fn pin_regions_of(app: &App, c: &Caller, session: u64, pages: &[Id]) -> ApiResult<()> {
    // Each page once: a page named 1,024 times was read, and its regions
    // collected, 1,024 times.
    let mut pages = pages.to_vec();
    pages.sort_unstable();
    pages.dedup();
    let keys: Vec<[u8; 33]> = pages.iter().map(|id| ObjectKind::Page.key(id)).collect();
    let shown: Vec<Id> = pages
        .iter()
        .zip(visible(app, c, &keys)?)
        .filter(|(_, v)| *v)
        .map(|(id, _)| *id)
        .collect();
    let mut pins = HashSet::new();
    for batch in shown.chunks(64) {
        let recs = match app.store.raw_records(ObjectKind::Page, batch) {
            Ok(recs) => recs,
            // One is gone: the others, one by one.
            Err(imgstore_store::StoreError::Missing { .. }) => {
                let mut recs = Vec::new();
                for id in batch {
                    match app
                        .store
                        .raw_records(ObjectKind::Page, std::slice::from_ref(id))
                    {
                        Ok(r) => recs.extend(r),
                        Err(imgstore_store::StoreError::Missing { .. }) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                recs
            }
            Err(e) => return Err(e.into()),
        };
        page_regions(&recs, &mut pins);
    }
    app.store.pin(session, pins);
    Ok(())
}

/// The keys of the regions the index page records `recs` name (a backup
/// that read them will name those regions without sending them), added
/// to `pins` (each once, however many pages name it).
fn page_regions(recs: &[Vec<u8>], pins: &mut HashSet<[u8; 33]>) {
    for rec in recs {
        if let Ok(regions) = record_children(RecordKind::Page, rec) {
            pins.extend(regions.iter().map(|r| ObjectKind::Region.key(r)));
        }
    }
}

async fn close_session(
    State(app): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let c = caller(&app, &headers)?;
    let id = u64::from_str_radix(&id, 16).map_err(|_| ApiError::bad("session id is not hex"))?;
    let mut s = app.sessions.lock().unwrap_or_else(|p| p.into_inner());
    if s.get(&id).is_some_and(|s| s.token == c.token) {
        s.remove(&id);
        drop(s);
        app.store.end_session(id);
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}
