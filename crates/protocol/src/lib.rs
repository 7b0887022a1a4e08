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

/// Every path of this version, in one place for the server's router and the
/// client (`docs/PROTOCOL.md`, "Endpoints"). Parametrised routes have their
/// pattern (the router's syntax) and a function building a concrete path.
pub mod paths {
    use imgstore_format::Id;

    macro_rules! v1 {
        ($p:literal) => {
            concat!("/v1", $p)
        };
    }

    pub const HEALTH: &str = v1!("/health");
    /// Prometheus text; outside the versioned prefix, where scrapers look.
    pub const METRICS: &str = "/metrics";
    pub const HELLO: &str = v1!("/hello");
    pub const SNAPSHOTS: &str = v1!("/snapshots");
    pub const PAGES: &str = v1!("/pages");
    pub const REGIONS: &str = v1!("/regions");
    pub const CHUNKS_GET: &str = v1!("/chunks/get");
    pub const CHUNKS_KNOWN: &str = v1!("/chunks/known");
    /// Which regions a session that replaced a lost one may still name.
    pub const REGIONS_KNOWN: &str = v1!("/regions/known");
    pub const TOTALS: &str = v1!("/totals");
    pub const COMMIT: &str = v1!("/commit");
    pub const ZERO_CVS_GET: &str = v1!("/zero-cvs/get");
    pub const ZERO_CVS: &str = v1!("/zero-cvs");
    pub const PARENTS: &str = v1!("/parents");
    pub const WITNESSES: &str = v1!("/witnesses");
    pub const FORGET: &str = v1!("/forget");
    pub const PROTECT: &str = v1!("/protect");
    pub const PROTECTED: &str = v1!("/protected");
    pub const GC: &str = v1!("/gc");
    pub const DAMAGE: &str = v1!("/damage");
    pub const DAMAGE_CLEAR: &str = v1!("/damage/clear");
    pub const SCAN: &str = v1!("/scan");
    pub const SESSIONS: &str = v1!("/sessions");

    /// `PUT` of one region upload.
    pub const REGION: &str = v1!("/regions/{id}");
    /// Prefix of [`REGION`] paths.
    pub const REGION_PREFIX: &str = v1!("/regions/");
    pub fn region(id: &Id) -> String {
        format!("{REGION_PREFIX}{}", id.to_hex())
    }

    pub const REFS: &str = v1!("/refs/{kind}");
    pub fn refs(kind_letter: &str) -> String {
        format!("{}/refs/{kind_letter}", crate::PREFIX)
    }

    pub const SESSION: &str = v1!("/sessions/{id}");
    pub fn session(id: &str) -> String {
        format!("{SESSIONS}/{id}")
    }

    pub const REPLACE: &str = v1!("/snapshots/{id}/replace");
    pub fn replace(id: &Id) -> String {
        format!("{SNAPSHOTS}/{}/replace", id.to_hex())
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn every_path_is_of_this_version_and_built_paths_match_their_routes() {
            use super::*;
            for p in [
                HEALTH,
                HELLO,
                SNAPSHOTS,
                PAGES,
                REGIONS,
                CHUNKS_GET,
                CHUNKS_KNOWN,
                REGIONS_KNOWN,
                TOTALS,
                COMMIT,
                ZERO_CVS_GET,
                ZERO_CVS,
                PARENTS,
                WITNESSES,
                FORGET,
                PROTECT,
                PROTECTED,
                GC,
                DAMAGE,
                DAMAGE_CLEAR,
                SCAN,
                SESSIONS,
                REGION,
                REFS,
                SESSION,
                REPLACE,
            ] {
                assert!(
                    p.starts_with(crate::PREFIX) && p[crate::PREFIX.len()..].starts_with('/'),
                    "{p}"
                );
            }
            let id = Id([0xab; 32]);
            assert_eq!(region(&id), REGION.replace("{id}", &id.to_hex()));
            assert_eq!(refs("C"), REFS.replace("{kind}", "C"));
            assert_eq!(session("00ff"), SESSION.replace("{id}", "00ff"));
            assert_eq!(replace(&id), REPLACE.replace("{id}", &id.to_hex()));
        }
    }
}

/// Default TCP port of `imgstore server`.
pub const DEFAULT_PORT: u16 = 8420;

/// Header naming the write session a request belongs to.
pub const SESSION_HEADER: &str = "imgstore-session";

/// Header of a commit sent before the answers to its session's region
/// uploads: how many successful uploads the session should have when it
/// is taken. The server waits (bounded) until it has that many before it
/// checks the commit, so the client saves the round trip of waiting for
/// the last upload's answer (docs/PROTOCOL.md, "Sessions").
pub const AWAITS_HEADER: &str = "imgstore-awaits";

/// Header of a call in a session whose id the client chose
/// ([`SessionRequest::id`]) and whose opening it has not seen answered:
/// the image the session is for. A server that does not know the session
/// opens it for that image (as `POST /v1/sessions` would) instead of
/// answering 410.
pub const IMAGE_HEADER: &str = "imgstore-image";

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
    /// One snapshot record, as committed: every listing reads them all
    /// (to filter them per caller), so one that a token could make as
    /// large as any record (`RECORD_BYTES`) cost every tenant's listing.
    /// 1 MiB holds the pages of a 64 TiB image at the default region size.
    pub const SNAPSHOT_RECORD_BYTES: usize = 1 << 20;
    /// One page of the snapshot listing (at least one record).
    pub const SNAPSHOT_PAGE_BYTES: usize = 32 << 20;
    /// Answer of a `chunks/get`, `pages`, `regions` or a listing.
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
    /// A damage mark's reason: every mark is kept and listed to every
    /// reader of its object (a restore token filled the list with 1 MB
    /// reasons).
    pub const DAMAGE_WHY_BYTES: usize = 1024;
    /// Pages a session may pin as it opens (`SessionRequest::pin_pages`):
    /// a parent of up to 2 TiB at the default region size. A larger
    /// parent's pages are read within the session instead.
    pub const PIN_PAGES: usize = 1024;
}

/// A body or answer that breaks the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {what}: {why}")]
pub struct Malformed {
    pub what: &'static str,
    pub why: String,
}
