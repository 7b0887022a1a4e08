//! An S3-compatible bucket, as the local store needs it: whole-object
//! PUTs (multipart above 512 MiB), ranged GETs in parallel, listing and
//! batch deletes — blocking calls on a private async runtime, so the store
//! and the engine stay synchronous.
//!
//! # Why opendal, and what this crate adds
//!
//! opendal signs requests (SigV4, credentials from the environment or the
//! AWS profile files — never from imgstore's own config), speaks multipart,
//! and its retry layer retries what S3 calls temporary (503 SlowDown, 500s,
//! timeouts, reset connections) with exponential backoff and jitter. This
//! crate adds only what imgstore needs on top:
//!
//! * every read is bounded (`max` bytes) before it is buffered, so a bucket
//!   answer can never make the process allocate without limit;
//! * request and byte counts ([`Stats`]), for `--json` output and the
//!   benchmarks' "requests per GiB";
//! * typed errors that name the bucket, the object and what to do.
//!
//! Nothing here knows what a pack or a chunk is (`imgstore-format` does).

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use imgstore_limit::Limits;
use opendal::layers::{ConcurrentLimitLayer, RetryLayer, TimeoutLayer};
use opendal::{ErrorKind, HttpTransporter, Operator};

mod paced;

/// The process's `--limit-upload` / `--limit-download`, which every bucket
/// it connects to afterwards shares (and shares with any server
/// repository it reaches, when the caller gives those the same
/// [`Limits`]).
static LIMITS: std::sync::OnceLock<Limits> = std::sync::OnceLock::new();

/// Sets the rate limits of every bucket this process connects to from now
/// on; the first call wins.
pub fn set_limits(limits: Limits) {
    let _ = LIMITS.set(limits);
}

/// Largest object written with one PUT (S3 allows 5 GiB; a pack is at
/// most 256 MiB and one entry): a multipart upload costs two more requests and buys parallelism
/// a backup already has (several packs in flight).
pub const SINGLE_PUT_MAX: u64 = 512 << 20;
/// Largest answer whose time still samples the round trip.
const SMALL_ANSWER: u64 = 64 << 10;
/// Part size of a multipart upload.
pub const PART_SIZE: u64 = 16 << 20;

/// Where a bucket is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BucketSpec {
    pub bucket: String,
    /// Folder inside the bucket ("" for the top).
    pub prefix: String,
    /// Service URL; None uses AWS's endpoint for the region.
    pub endpoint: Option<String>,
    pub region: String,
}

impl BucketSpec {
    /// Parses `s3://BUCKET[/PREFIX]`.
    pub fn parse(
        url: &str,
        endpoint: Option<String>,
        region: String,
    ) -> Result<BucketSpec, BucketError> {
        let rest = url.strip_prefix("s3://").ok_or_else(|| BucketError::Spec {
            why: format!("{url:?} is not an s3://BUCKET/PREFIX address"),
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_matches('/').to_string();
        let valid = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
        if bucket.len() < 3 || bucket.len() > 63 || !bucket.chars().all(valid) {
            return Err(BucketError::Spec {
                why: format!("{bucket:?} is not a valid bucket name (3-63 of a-z, 0-9, '-', '.')"),
            });
        }
        if prefix.split('/').any(|p| p == ".." || p == ".") {
            return Err(BucketError::Spec {
                why: format!("prefix {prefix:?} may not hold '.' or '..'"),
            });
        }
        Ok(BucketSpec {
            bucket: bucket.into(),
            prefix,
            endpoint,
            region,
        })
    }

    /// `s3://BUCKET/PREFIX`.
    pub fn url(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

/// How hard to try.
#[derive(Clone, Copy, Debug)]
pub struct Tuning {
    /// Retries of a temporary failure (after the first attempt).
    pub retries: usize,
    /// Longest wait between retries.
    pub max_backoff: Duration,
    /// Time limit of one request's non-I/O part, and of each I/O step.
    pub timeout: Duration,
    /// Requests in flight at once.
    pub concurrency: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            retries: 8,
            max_backoff: Duration::from_secs(20),
            timeout: Duration::from_secs(60),
            concurrency: 16,
        }
    }
}

/// Requests made and bytes moved since the bucket was opened.
#[derive(Debug, Default)]
pub struct Stats {
    pub puts: AtomicU64,
    pub gets: AtomicU64,
    pub lists: AtomicU64,
    pub deletes: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
}

/// A snapshot of [`Stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub puts: u64,
    pub gets: u64,
    pub lists: u64,
    pub deletes: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

/// A failure talking to the bucket; every variant names the object.
#[derive(Debug, thiserror::Error)]
pub enum BucketError {
    #[error("bad bucket address: {why}")]
    Spec { why: String },
    #[error("{url}: object {path} does not exist")]
    NotFound { url: String, path: String },
    #[error("{url}: access denied to {path} ({detail}): check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and the bucket policy")]
    Denied {
        url: String,
        path: String,
        detail: String,
    },
    #[error("{url}: {op} {path} failed after retries: {detail}")]
    Unavailable {
        url: String,
        op: &'static str,
        path: String,
        detail: String,
    },
    #[error("{url}: object {path} is {len} bytes, more than the {max} expected: the bucket holds something imgstore did not write")]
    TooLarge {
        url: String,
        path: String,
        len: u64,
        max: u64,
    },
    #[error("{url}: {op} {path}: {detail}")]
    Other {
        url: String,
        op: &'static str,
        path: String,
        detail: String,
    },
}

/// A bucket (or a folder in one).
pub struct Bucket {
    op: Operator,
    rt: tokio::runtime::Runtime,
    url: String,
    tuning: Tuning,
    stats: Arc<Stats>,
    /// Small requests timed so far, and the quickest of them: the
    /// round-trip time ([`Bucket::rtt`]).
    samples: std::sync::Mutex<(u32, Option<Duration>)>,
}

/// A whole-object GET under way ([`Bucket::get_ahead`]).
pub struct Ahead {
    path: String,
    max: u64,
    #[allow(clippy::type_complexity)]
    task: tokio::task::JoinHandle<(Result<Result<Vec<u8>, u64>, opendal::Error>, Duration)>,
}

impl std::fmt::Debug for Ahead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ahead").field("path", &self.path).finish()
    }
}

/// Reads `path` whole, or `Err(len)` once it is known to pass `max` bytes
/// (from its length header, or from what arrived: whatever the header said).
async fn read_bounded(
    op: &Operator,
    path: &str,
    max: u64,
) -> Result<Result<Vec<u8>, u64>, opendal::Error> {
    let mut stream = op.reader(path).await?.into_bytes_stream(..).await?;
    let len = stream.metadata().await?.content_length();
    if len > max {
        return Ok(Err(len));
    }
    let mut out = Vec::with_capacity(len as usize);
    while let Some(piece) = stream.next().await {
        let piece = piece.map_err(|e| {
            opendal::Error::new(ErrorKind::Unexpected, e.to_string()).set_temporary()
        })?;
        if (out.len() + piece.len()) as u64 > max {
            return Ok(Err((out.len() + piece.len()) as u64));
        }
        out.extend_from_slice(&piece);
    }
    Ok(Ok(out))
}

impl Bucket {
    /// Connects (lazily: the first request reaches the service).
    /// Credentials: `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`
    /// (`AWS_SESSION_TOKEN`), or the profile `AWS_PROFILE` in
    /// `~/.aws/credentials` and `~/.aws/config`.
    pub fn connect(spec: &BucketSpec, tuning: Tuning) -> Result<Bucket, BucketError> {
        // One process-wide TLS provider (ring, as the server and client use).
        let _ = rustls::crypto::ring::default_provider().install_default();
        opendal_http_transport_reqwest::install_default();
        let url = spec.url();
        let mut b = opendal::services::S3::default()
            .bucket(&spec.bucket)
            .root(&format!("/{}", spec.prefix))
            .region(&spec.region)
            .disable_ec2_metadata();
        if let Some(e) = &spec.endpoint {
            b = b.endpoint(e);
        }
        let err = |e: opendal::Error| BucketError::Spec {
            why: format!("{url}: {e}"),
        };
        let op = Operator::new(b)
            .map_err(err)?
            .layer(
                TimeoutLayer::new()
                    .with_timeout(tuning.timeout)
                    .with_io_timeout(tuning.timeout),
            )
            .layer(
                RetryLayer::new()
                    .with_max_times(tuning.retries)
                    .with_min_delay(Duration::from_millis(100))
                    .with_max_delay(tuning.max_backoff)
                    .with_jitter(),
            )
            .layer(ConcurrentLimitLayer::new(tuning.concurrency));
        // Under a rate limit, requests go through the paced transport.
        let op = match LIMITS.get().filter(|l| !l.is_none()) {
            Some(limits) => {
                let transport =
                    paced::PacedTransport::new(limits.clone()).map_err(|e| BucketError::Spec {
                        why: format!("{url}: cannot build the HTTP client: {e}"),
                    })?;
                let ctx = op
                    .base_context()
                    .with_http_transport(HttpTransporter::new(transport));
                op.with_context(ctx)
            }
            None => op,
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("imgstore-bucket")
            .enable_all()
            .build()
            .map_err(|e| BucketError::Spec {
                why: format!("cannot start the I/O runtime: {e}"),
            })?;
        Ok(Bucket {
            op,
            rt,
            url,
            tuning,
            stats: Arc::default(),
            samples: std::sync::Mutex::new((0, None)),
        })
    }

    /// `s3://BUCKET/PREFIX`, for messages.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The round-trip time to the bucket, for sizing how many requests to
    /// keep in flight: the quickest of the small requests made so far
    /// (the owner object every writer reads, the config), once there are
    /// two — the first may have paid for the connection — with HEAD
    /// requests (of an object that need not exist) only to make up the
    /// two.
    pub fn rtt(&self) -> Duration {
        loop {
            let (n, min) = *self.samples.lock().unwrap_or_else(|p| p.into_inner());
            match min {
                Some(m) if n >= 2 => return m,
                _ => {}
            }
            let t = std::time::Instant::now();
            let out = self.rt.block_on(self.op.stat("config"));
            let took = t.elapsed();
            match out {
                Ok(_) => self.sampled(took, 0),
                Err(e) if e.kind() == ErrorKind::NotFound => self.sampled(took, 0),
                // Unreachable: as long as the request took (retries
                // included), as before.
                Err(_) => return took,
            }
        }
    }

    /// The quickest small request seen so far, if any: [`Bucket::rtt`]
    /// without a request of its own.
    pub fn rtt_seen(&self) -> Option<Duration> {
        self.samples.lock().unwrap_or_else(|p| p.into_inner()).1
    }

    /// Request and byte counts so far.
    pub fn counts(&self) -> Counts {
        let s = &self.stats;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counts {
            puts: l(&s.puts),
            gets: l(&s.gets),
            lists: l(&s.lists),
            deletes: l(&s.deletes),
            bytes_up: l(&s.bytes_up),
            bytes_down: l(&s.bytes_down),
        }
    }

    fn fail(&self, op: &'static str, path: &str, e: opendal::Error) -> BucketError {
        let (url, path) = (self.url.clone(), path.to_string());
        // The message opendal gives carries the service's answer; it holds
        // no credentials (opendal redacts them in its debug output).
        let detail = e.to_string().lines().next().unwrap_or_default().to_string();
        match e.kind() {
            ErrorKind::NotFound => BucketError::NotFound { url, path },
            ErrorKind::PermissionDenied => BucketError::Denied { url, path, detail },
            _ if e.is_temporary() || e.is_persistent() => BucketError::Unavailable {
                url,
                op,
                path,
                detail,
            },
            _ => BucketError::Other {
                url,
                op,
                path,
                detail,
            },
        }
    }

    /// Writes a whole object: one PUT up to [`SINGLE_PUT_MAX`], multipart
    /// (16 MiB parts, 4 in flight) above. Counted as the requests made:
    /// a multipart upload is its parts plus its create and complete calls.
    pub fn put(&self, path: &str, data: Vec<u8>) -> Result<(), BucketError> {
        let len = data.len() as u64;
        let requests = if len > SINGLE_PUT_MAX {
            len.div_ceil(PART_SIZE) + 2
        } else {
            1
        };
        self.rt
            .block_on(async {
                if len > SINGLE_PUT_MAX {
                    self.op
                        .write_with(path, data)
                        .chunk(PART_SIZE as usize)
                        .concurrent(4)
                        .await
                } else {
                    self.op.write(path, data).await
                }
            })
            .map_err(|e| self.fail("PUT", path, e))?;
        self.stats.puts.fetch_add(requests, Ordering::Relaxed);
        self.stats.bytes_up.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    /// Reads a whole object of at most `max` bytes (larger is an error).
    /// One request: a GET whose answer's length is checked before its body
    /// is read (and the body is cut off at `max` bytes whatever the header
    /// said), so nothing larger is ever buffered and no HEAD is spent first
    /// (a round trip each time a command opens a bucket over a slow link).
    pub fn get(&self, path: &str, max: u64) -> Result<Vec<u8>, BucketError> {
        let ahead = self.get_ahead(path, max);
        self.wait(ahead)
    }

    /// Starts [`Bucket::get`] on the bucket's runtime and returns at once:
    /// the caller goes on with its own work and takes the answer with
    /// [`Bucket::wait`] when it needs it, so the round trip overlaps that
    /// work instead of preceding it. Dropped unwaited, the request is
    /// abandoned.
    pub fn get_ahead(&self, path: &str, max: u64) -> Ahead {
        self.stats.gets.fetch_add(1, Ordering::Relaxed);
        let op = self.op.clone();
        let owned = path.to_string();
        let task = self.rt.spawn(async move {
            let t = std::time::Instant::now();
            let got = read_bounded(&op, &owned, max).await;
            (got, t.elapsed())
        });
        Ahead {
            path: path.to_string(),
            max,
            task,
        }
    }

    /// The answer of a [`Bucket::get_ahead`], as [`Bucket::get`] gives it.
    pub fn wait(&self, ahead: Ahead) -> Result<Vec<u8>, BucketError> {
        let Ahead { path, max, task } = ahead;
        let (got, took) = self.rt.block_on(task).map_err(|e| BucketError::Other {
            url: self.url.clone(),
            op: "GET",
            path: path.clone(),
            detail: format!("the request's task ended without an answer: {e}"),
        })?;
        let out = match got {
            Ok(Ok(out)) => out,
            Ok(Err(len)) => {
                return Err(BucketError::TooLarge {
                    url: self.url.clone(),
                    path,
                    len,
                    max,
                })
            }
            Err(e) => return Err(self.fail("GET", &path, e)),
        };
        let len = out.len() as u64;
        self.sampled(took, len);
        self.stats.bytes_down.fetch_add(len, Ordering::Relaxed);
        Ok(out)
    }

    /// The size of an object, None when absent.
    pub fn size(&self, path: &str) -> Result<Option<u64>, BucketError> {
        self.stats.gets.fetch_add(1, Ordering::Relaxed);
        let t = std::time::Instant::now();
        match self.rt.block_on(self.op.stat(path)) {
            Ok(m) => {
                self.sampled(t.elapsed(), 0);
                Ok(Some(m.content_length()))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                self.sampled(t.elapsed(), 0);
                Ok(None)
            }
            Err(e) => Err(self.fail("HEAD", path, e)),
        }
    }

    /// Keeps the time a small request took (`len` bytes answered) as a
    /// sample of the round-trip time.
    fn sampled(&self, took: Duration, len: u64) {
        if len > SMALL_ANSWER {
            return;
        }
        let mut s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        s.0 += 1;
        if s.1.is_none_or(|m| took < m) {
            s.1 = Some(took);
        }
    }

    /// Reads byte ranges of objects, several requests in flight; each
    /// answer must be exactly its range's length (a shorter object is an
    /// error naming it, never short data).
    pub fn get_ranges(&self, reqs: &[(String, Range<u64>)]) -> Vec<Result<Vec<u8>, BucketError>> {
        let whole: Vec<Vec<Range<usize>>> = reqs
            .iter()
            .map(|(_, r)| {
                let whole = 0..r.end.saturating_sub(r.start) as usize;
                std::iter::once(whole).collect()
            })
            .collect();
        self.get_parts(reqs, &whole)
            .into_iter()
            .map(|r| r.map(|mut v| v.pop().unwrap_or_default()))
            .collect()
    }

    /// [`Bucket::get_ranges`], each answer cut into `parts` (ranges within
    /// the answer) straight from the transport's buffers, without first
    /// joining them: a restore holds each frame once, not twice.
    pub fn get_parts(
        &self,
        reqs: &[(String, Range<u64>)],
        parts: &[Vec<Range<usize>>],
    ) -> Vec<Result<Vec<Vec<u8>>, BucketError>> {
        let conc = self.tuning.concurrency.max(1);
        self.rt.block_on(async {
            futures::stream::iter(reqs.iter().zip(parts).map(|((path, r), parts)| async move {
                let want = r.end.saturating_sub(r.start);
                if r.end <= r.start {
                    return Ok(parts.iter().map(|_| Vec::new()).collect());
                }
                self.stats.gets.fetch_add(1, Ordering::Relaxed);
                let buf = self
                    .op
                    .read_with(path)
                    .range(r.clone())
                    .await
                    .map_err(|e| self.fail("GET", path, e))?;
                if buf.len() as u64 != want || parts.iter().any(|p| p.end > buf.len()) {
                    return Err(BucketError::Other {
                        url: self.url.clone(),
                        op: "GET",
                        path: path.clone(),
                        detail: format!(
                            "asked for bytes {}..{}, got {} bytes: the object is shorter than the index says",
                            r.start,
                            r.end,
                            buf.len()
                        ),
                    });
                }
                self.stats.bytes_down.fetch_add(want, Ordering::Relaxed);
                Ok(parts.iter().map(|p| buf.slice(p.clone()).to_vec()).collect())
            }))
            .buffered(conc)
            .collect()
            .await
        })
    }

    /// Every object under `dir` (recursively) with its size: `(path, len)`,
    /// paths relative to the prefix.
    pub fn list(&self, dir: &str) -> Result<Vec<(String, u64)>, BucketError> {
        self.rt.block_on(async {
            let mut lister = self
                .op
                .lister_with(dir)
                .recursive(true)
                .await
                .map_err(|e| self.fail("LIST", dir, e))?;
            let mut out = Vec::new();
            let mut n = 0u64;
            while let Some(entry) = lister.next().await {
                let entry = entry.map_err(|e| self.fail("LIST", dir, e))?;
                n += 1;
                if entry.metadata().is_dir() {
                    continue;
                }
                let len = entry.metadata().content_length();
                out.push((entry.path().trim_start_matches('/').to_string(), len));
            }
            // ListObjectsV2 answers 1,000 keys per request.
            self.stats
                .lists
                .fetch_add(n.div_ceil(1000).max(1), Ordering::Relaxed);
            Ok(out)
        })
    }

    /// Deletes objects (absent ones are not an error).
    pub fn delete(&self, paths: &[String]) -> Result<(), BucketError> {
        if paths.is_empty() {
            return Ok(());
        }
        self.rt
            .block_on(self.op.delete_iter(paths.iter().map(|p| p.as_str())))
            .map_err(|e| self.fail("DELETE", &paths[0], e))?;
        self.stats
            .deletes
            .fetch_add(paths.len().div_ceil(1000) as u64, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_or_are_refused_with_a_reason() {
        let s = BucketSpec::parse("s3://my-bucket/a/b/", None, "garage".into()).unwrap();
        assert_eq!((s.bucket.as_str(), s.prefix.as_str()), ("my-bucket", "a/b"));
        assert_eq!(s.url(), "s3://my-bucket/a/b");
        let s = BucketSpec::parse("s3://bkt", None, "r".into()).unwrap();
        assert_eq!(s.prefix, "");
        for bad in [
            "http://x/y",
            "s3://UPPER/x",
            "s3://a/x",
            "s3://ok-bucket/../x",
        ] {
            let e = BucketSpec::parse(bad, None, "r".into()).unwrap_err();
            assert!(matches!(e, BucketError::Spec { .. }), "{bad}: {e}");
        }
    }
}
