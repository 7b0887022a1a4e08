//! The wire format between `imgstore` clients and `imgstore server`.
//!
//! Everything that crosses the network is defined here and nowhere else,
//! documented byte by byte in `docs/PROTOCOL.md`: the version, the paths,
//! the binary bodies of the bulk calls, the JSON bodies of the small ones,
//! the error body, and the limits every count and length is checked against
//! *before* anything is allocated for it.
//!
//! # Why this shape
//!
//! HTTP/2 over TLS carries it (hyper/axum on the server, reqwest on the
//! client): many requests in flight on one connection, flow control, and
//! standard tools. The bulk bodies (ids, records, chunk frames) are
//! length-prefixed binary because they are already `imgstore-format`
//! encodings — wrapping them in JSON or protobuf would only copy them. The
//! small answers (totals, outcomes) are JSON, readable with curl.
//!
//! Decoders never panic and never trust a length: each is fuzzed by the
//! property tests below with arbitrary bytes.

mod body;
mod messages;

pub use body::{Dec, Enc};
pub use messages::*;

/// The protocol version, in every path (`/v1/...`). A server answers an
/// unknown version with 404 and the client names the versions it speaks.
pub const VERSION: u32 = 1;

/// Path prefix of this version.
pub const PREFIX: &str = "/v1";

/// Default TCP port of `imgstore server`.
pub const DEFAULT_PORT: u16 = 8420;

/// Header naming the write session a request belongs to.
pub const SESSION_HEADER: &str = "imgstore-session";

/// Limits: a request or answer past one is refused before allocation.
pub mod limits {
    /// Ids in one `chunks/known`, `chunks/get`, `pages`, `regions` or `refs` call.
    pub const IDS_PER_CALL: usize = 4096;
    /// Body of a `PUT regions/{id}`: the recipe plus up to a region's frames
    /// (8 MiB of raw data compresses to at most a little more than 8 MiB;
    /// regions may be up to 64 MiB).
    pub const PUT_REGION_BYTES: usize = 80 << 20;
    /// Frames in one `put_region`.
    pub const FRAMES_PER_REGION: usize = 65_536;
    /// One chunk frame (largest chunk 16 MiB, plus a header and zstd overhead).
    pub const FRAME_BYTES: usize = (16 << 20) + 4096;
    /// Body of a commit: the snapshot record and its pages.
    pub const COMMIT_BYTES: usize = 256 << 20;
    /// Pages in one commit.
    pub const PAGES_PER_COMMIT: usize = 1 << 20;
    /// One stored record (page, region recipe, snapshot record).
    pub const RECORD_BYTES: usize = 16 << 20;
    /// Answer of a `chunks/get`.
    pub const FRAMES_REPLY_BYTES: usize = 256 << 20;
    /// Snapshots listed in one answer.
    pub const SNAPSHOTS: usize = 1_000_000;
    /// Entries and bytes in one page of a scan (`check` walks the store).
    pub const SCAN_ENTRIES: usize = 65_536;
    pub const SCAN_BYTES: usize = 32 << 20;
    /// Zero chaining values asked or given in one call.
    pub const ZERO_CVS: usize = 1 << 20;
    /// Any JSON body.
    pub const JSON_BYTES: usize = 1 << 20;
}

/// A body or answer that breaks the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {what}: {why}")]
pub struct Malformed {
    pub what: &'static str,
    pub why: String,
}
