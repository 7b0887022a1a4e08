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
use imgstore_protocol::{limits, ErrorBody, Role};
use imgstore_repo::{ChunkFault, RepoError, Repository};
use imgstore_store::Scope;

use crate::metrics::Metrics;
use crate::{App, Caller, Session};

type Shared = Arc<App>;

/// An error answer: status and the protocol's error body.
pub(crate) struct ApiError(StatusCode, ErrorBody);

impl ApiError {
    fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
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
    fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "malformed", message)
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

/// Runs store work on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("request task failed: {e}")))?
}

fn caller(app: &App, headers: &HeaderMap) -> ApiResult<Caller> {
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

fn require(c: &Caller, roles: &[Role], what: &str) -> ApiResult<()> {
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

fn session(app: &App, c: &Caller, headers: &HeaderMap) -> ApiResult<Scope> {
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
    let small = DefaultBodyLimit::max(limits::JSON_BYTES.max(limits::IDS_PER_CALL * 32 + 64));
    Router::new()
        .route("/v1/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/hello", get(hello))
        .route("/v1/snapshots", get(snapshots))
        .route("/v1/pages", post(pages))
        .route("/v1/regions", post(regions))
        .route("/v1/chunks/get", post(chunks_get))
        .route("/v1/chunks/known", post(chunks_known))
        .route("/v1/refs/{kind}", post(refs))
        .route("/v1/totals", get(totals))
        .route(
            "/v1/regions/{id}",
            put(put_region).layer(DefaultBodyLimit::max(limits::PUT_REGION_BYTES)),
        )
        .route(
            "/v1/commit",
            post(commit).layer(DefaultBodyLimit::max(limits::COMMIT_BYTES)),
        )
        .route("/v1/zero-cvs/get", post(zero_cvs))
        .route(
            "/v1/zero-cvs",
            post(put_zero_cvs).layer(DefaultBodyLimit::max(limits::ZERO_CVS * 40 + 16)),
        )
        .route("/v1/parents", get(parents))
        .route("/v1/snapshots/{id}/replace", post(replace))
        .route("/v1/forget", post(forget))
        .route("/v1/protect", post(protect))
        .route("/v1/protected", get(protected))
        .route("/v1/gc", post(gc))
        .route("/v1/damage", get(damage).post(mark_damage))
        .route("/v1/damage/clear", post(clear_damage))
        .route("/v1/scan", post(scan))
        .route("/v1/sessions", post(open_session))
        .route("/v1/sessions/{id}", delete(close_session))
        .layer(small)
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
        token: c.token,
        namespaces: c.namespaces,
    })
    .into_response())
}

async fn snapshots(State(app): State<Shared>, headers: HeaderMap) -> ApiResult {
    let c = caller(&app, &headers)?;
    blocking(move || Ok(binary(proto::encode_snapshots(&seen(&app, &c)?)))).await
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
    blocking(move || {
        let keys: Vec<[u8; 33]> = ids.iter().map(|id| kind.key(id)).collect();
        if let Some(i) = visible(&app, &c, &keys)?.iter().position(|v| !v) {
            return Err(RepoError::Missing { kind, id: ids[i] }.into());
        }
        let recs = app.store.raw_records(kind, &ids)?;
        if let Some(s) = scope {
            let mut pins = Vec::new();
            for r in &recs {
                if let Ok(regions) = record_children(RecordKind::Page, r) {
                    pins.extend(regions.iter().map(|r| ObjectKind::Region.key(r)));
                }
            }
            app.store.pin(s.session, pins);
        }
        Ok(binary(proto::encode_records(&recs)))
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
    blocking(move || {
        let keys: Vec<[u8; 33]> = ids.iter().map(|id| ObjectKind::Chunk.key(id)).collect();
        let vis = visible(&app, &c, &keys)?;
        let mut frames = app.store.chunk_frames(&ids)?;
        for (f, v) in frames.iter_mut().zip(vis) {
            if !v {
                *f = Err(ChunkFault::Missing);
            }
        }
        let body = proto::encode_frames(&frames);
        if body.len() > limits::FRAMES_REPLY_BYTES {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                "the frames asked for pass the answer limit: ask for fewer at once",
            ));
        }
        Ok(binary(body))
    })
    .await
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
        let out: Vec<Option<Vec<u8>>> = rcs
            .into_iter()
            .zip(vis)
            .map(|(rc, v)| rc.filter(|_| v).map(|rc| rc.encode().to_vec()))
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
            objects: t.objects.into(),
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
    let gate = app.clone();
    let _permit = gate
        .uploads
        .acquire()
        .await
        .map_err(|_| ApiError::internal("server shutting down"))?;
    blocking(move || {
        let (recipe, frames) = proto::decode_put_region(&body)?;
        if Id::hash(recipe) != id {
            return Err(ApiError::bad(format!(
                "region {id}: the recipe does not hash to its id"
            )));
        }
        let named: HashSet<Id> = record_children(RecordKind::Region, recipe)
            .map_err(|e| ApiError::bad(format!("region {id}: {e}")))?
            .into_iter()
            .collect();
        // An encrypted repository's frames are sealed: only the client can
        // check them (the AEAD binds each to its id).
        let sealed = is_sealed_record(recipe);
        let mut map = HashMap::with_capacity(frames.len());
        let mut raw = Vec::new();
        for f in frames {
            if !named.contains(&f.id) {
                return Err(ApiError::bad(format!(
                    "region {id}: chunk {} is not in its recipe",
                    f.id
                )));
            }
            if !sealed {
                // The chunk must be what its id says: a buggy or hostile
                // client cannot store wrong bytes under an id others reuse.
                raw.clear();
                FrameCodec::with_thread(|codec| codec.decode(f.frame, &mut raw))
                    .map_err(|e| ApiError::bad(format!("chunk {}: {e}", f.id)))?;
                if raw.len() != f.raw_len as usize || Id::hash(&raw) != f.id {
                    return Err(ApiError::bad(format!(
                        "chunk {}: its content does not hash to its id",
                        f.id
                    )));
                }
            }
            map.insert(f.id, (f.frame.to_vec(), f.raw_len));
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
        Ok(Json(proto::WirePut::from(out)).into_response())
    })
    .await
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
    let gate = app.clone();
    let _permit = gate
        .uploads
        .acquire()
        .await
        .map_err(|_| ApiError::internal("server shutting down"))?;
    blocking(move || {
        let (record, parent, raw_pages) = proto::decode_commit(&body)?;
        // A plain record names its image: it must be the session's. A
        // sealed one hides it; its session's namespace still bounds it.
        if !is_sealed_record(record) {
            let snap = Snapshot::decode(record)
                .map_err(|e| ApiError::bad(format!("snapshot record: {e}")))?;
            if snap.name != image {
                return Err(ApiError::bad(format!(
                    "the session is for image {image:?}, the snapshot names {:?}",
                    snap.name
                )));
            }
        }
        let pages: Vec<Vec<u8>> = raw_pages.iter().map(|p| p.to_vec()).collect();
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
        let (id, added) = app
            .store
            .commit_in(Some(&scope), record, &pages, parent.as_ref())?;
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
    caller(&app, &headers)?;
    if ask.count as usize > limits::ZERO_CVS {
        return Err(ApiError::bad(format!(
            "{} values asked, the limit is {}",
            ask.count,
            limits::ZERO_CVS
        )));
    }
    let end = ask
        .start
        .checked_add(ask.count)
        .ok_or_else(|| ApiError::bad("start + count overflows"))?;
    blocking(move || {
        let all = app.store.zero_cvs(ask.region_size, end)?;
        Ok(binary(proto::encode_zero_cvs(&all[ask.start as usize..])))
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
    Ok(seen(app, c)?.into_iter().map(|(id, _)| id).collect())
}

/// The snapshot records this caller may see: plain ones by their image
/// name, sealed ones (whose names the server cannot read) by the namespace
/// their session committed them under.
fn seen(app: &App, c: &Caller) -> ApiResult<Vec<(Id, Vec<u8>)>> {
    let mut out = Vec::new();
    for (k, v) in app.store.snapshot_records()? {
        let Some(id) = Id::from_slice(&k) else {
            continue;
        };
        let shown = if c.is_admin() {
            true
        } else if is_sealed_record(&v) {
            let key = imgstore_store::snapshot_ns_key(&id);
            let mut any = false;
            for ns in &c.namespaces {
                any |= app.store.ns_marked(ns, &[key])?[0];
            }
            any
        } else {
            Snapshot::decode(&v).is_ok_and(|s| c.sees(&app.config, &s.name))
        };
        if shown {
            out.push((id, v));
        }
    }
    Ok(out)
}

async fn parents(State(app): State<Shared>, headers: HeaderMap) -> ApiResult {
    let c = caller(&app, &headers)?;
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
        Ok(Json(proto::WireForget::from(out)).into_response())
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
        Ok(Json(proto::WireGc::from(out)).into_response())
    })
    .await
}

async fn damage(State(app): State<Shared>, headers: HeaderMap) -> ApiResult {
    let c = caller(&app, &headers)?;
    blocking(move || {
        let marks = only_visible(&app, &c, app.store.damage_marks()?, |m| m.kind.key(&m.id))?;
        let out: Vec<proto::WireMark> = marks.iter().map(proto::WireMark::from).collect();
        Ok(Json(out).into_response())
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
    let marks = marks
        .iter()
        .map(|m| m.parse())
        .collect::<Result<Vec<_>, _>>()?;
    blocking(move || {
        let marks = only_visible(&app, &c, marks, |m| m.kind.key(&m.id))?;
        app.store.mark_damaged(&marks)?;
        Ok(StatusCode::NO_CONTENT.into_response())
    })
    .await
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
    require(&c, &[Role::Backup, Role::Admin], "write backups")?;
    if !valid_image(&req.image) {
        return Err(ApiError::bad(format!(
            "{:?} is not a valid image name",
            req.image
        )));
    }
    let namespace = app.config.namespace_of(&req.image).map(str::to_string);
    if !c.is_admin()
        && !namespace
            .as_ref()
            .is_some_and(|ns| c.namespaces.contains(ns))
    {
        tracing::warn!(token = %c.token, image = %req.image, "backup of an image outside the token's namespaces refused");
        return Err(ApiError::forbidden(format!(
            "image {:?} is not in the namespaces of token {:?} ({}): back up under a name they cover",
            req.image,
            c.token,
            if c.namespaces.is_empty() { "none".to_string() } else { c.namespaces.join(", ") }
        )));
    }
    let mut raw = [0u8; 8];
    getrandom::fill(&mut raw).map_err(|e| ApiError::internal(format!("no randomness: {e}")))?;
    let id = u64::from_le_bytes(raw);
    app.sessions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(
            id,
            Session {
                token: c.token.clone(),
                image: req.image.clone(),
                namespace: namespace.clone(),
                last: Instant::now(),
            },
        );
    tracing::info!(token = %c.token, image = %req.image, session = %format!("{id:016x}"), "session opened");
    Ok(Json(proto::SessionReply {
        session: format!("{id:016x}"),
        namespace,
        idle_timeout_secs: app.idle.as_secs(),
    })
    .into_response())
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
