//! The bucket's HTTP transport under `--limit-upload` / `--limit-download`
//! (`imgstore-limit`): request bodies handed to the connection a piece at
//! a time, each when its slot on the link comes, and answer bodies read
//! the same way, so the bucket is held back by TCP's flow control.
//!
//! opendal's own reqwest transport sends a request body in one go, so it
//! cannot pace a 32 MiB pack PUT; this one does the same work (method,
//! URL, headers, body; status, headers, body stream with its declared
//! length) with a paced body. It is used only when a limit is set: without
//! one, the bucket keeps opendal's transport.

use std::future::Future;

use futures::{StreamExt, TryStreamExt};
use imgstore_limit::{Limits, Rate};
use opendal::raw::{parse_content_encoding, parse_content_length};
use opendal::{Buffer, Error, ErrorKind, HttpBody, HttpTransport};

/// A stream boxed with `Sync`, as [`HttpBody`] wants it.
type SyncStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = opendal::Result<Buffer>> + Send + Sync + 'static>>;

trait SyncBoxed {
    fn sync_boxed(self) -> SyncStream;
}

impl<S> SyncBoxed for S
where
    S: futures::Stream<Item = opendal::Result<Buffer>> + Send + Sync + 'static,
{
    fn sync_boxed(self) -> SyncStream {
        Box::pin(self)
    }
}

/// A reqwest client whose bodies are paced by `limits`.
pub(crate) struct PacedTransport {
    client: reqwest::Client,
    limits: Limits,
}

impl PacedTransport {
    pub(crate) fn new(limits: Limits) -> Result<PacedTransport, reqwest::Error> {
        Ok(PacedTransport {
            client: reqwest::Client::builder().build()?,
            limits,
        })
    }
}

/// `bytes` as a stream of pieces, each let go when `rate` allows.
fn paced_pieces(
    bytes: bytes::Bytes,
    rate: std::sync::Arc<Rate>,
) -> impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + 'static {
    let piece = rate.piece();
    futures::stream::unfold(0usize, move |at| {
        let (bytes, rate) = (bytes.clone(), rate.clone());
        async move {
            if at >= bytes.len() {
                return None;
            }
            let end = (at + piece).min(bytes.len());
            tokio::time::sleep(rate.reserve(end - at)).await;
            Some((Ok(bytes.slice(at..end)), end))
        }
    })
}

fn failed(what: &'static str, uri: &http::Uri, e: reqwest::Error) -> Error {
    // As opendal's transport: a failure to send or to read is temporary
    // (its retry layer tries again).
    let temporary = e.is_request() || e.is_body() || e.is_decode() || e.is_connect();
    Error::new(ErrorKind::Unexpected, what)
        .with_operation("imgstore-bucket::fetch")
        .with_context("url", uri.to_string())
        .with_temporary(temporary)
        .set_source(e.without_url())
}

impl HttpTransport for PacedTransport {
    fn fetch(
        &self,
        req: http::Request<Buffer>,
    ) -> impl Future<Output = opendal::Result<http::Response<HttpBody>>> + Send {
        let client = self.client.clone();
        let limits = self.limits.clone();
        async move {
            let uri = req.uri().clone();
            let is_head = req.method() == http::Method::HEAD;
            let (parts, body) = req.into_parts();
            let url = reqwest::Url::parse(&uri.to_string()).map_err(|e| {
                Error::new(ErrorKind::Unexpected, "request url is invalid")
                    .with_context("url", uri.to_string())
                    .set_source(e)
            })?;
            let mut rb = client
                .request(parts.method, url)
                .headers(parts.headers)
                .version(parts.version);
            if !body.is_empty() {
                let bytes = body.to_bytes();
                rb = match &limits.upload {
                    Some(rate) => rb.body(reqwest::Body::wrap_stream(paced_pieces(
                        bytes,
                        rate.clone(),
                    ))),
                    None => rb.body(bytes),
                };
            }
            let mut resp = rb
                .send()
                .await
                .map_err(|e| failed("send http request", &uri, e))?;
            let length = if is_head || parse_content_encoding(resp.headers())?.is_some() {
                None
            } else {
                parse_content_length(resp.headers())?
            };
            let mut out = http::Response::builder()
                .status(resp.status())
                .version(resp.version())
                .extension(uri.clone());
            std::mem::swap(
                out.headers_mut().expect("a fresh builder"),
                resp.headers_mut(),
            );
            let read_uri = uri.clone();
            let stream = resp
                .bytes_stream()
                .map_err(move |e| failed("read data from http response", &read_uri, e));
            let body = match limits.download {
                Some(rate) => HttpBody::new(
                    stream
                        .then(move |piece| {
                            let rate = rate.clone();
                            async move {
                                if let Ok(p) = &piece {
                                    tokio::time::sleep(rate.reserve(p.len())).await;
                                }
                                piece.map(Buffer::from)
                            }
                        })
                        .sync_boxed(),
                    length,
                ),
                None => HttpBody::new(stream.map_ok(Buffer::from).sync_boxed(), length),
            };
            Ok(out.body(body).expect("a response from parts that parsed"))
        }
    }
}
