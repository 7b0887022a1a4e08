//! The bodies of each call. Bulk bodies are binary ([`Enc`]/[`Dec`]);
//! small ones are JSON (the `serde` structs here).

use imgstore_format::{Id, ObjectKind, RepoConfig};
use imgstore_repo::{ChunkFault, ChunkRead, DamageMark, Tally};
use serde::{Deserialize, Serialize};

use crate::limits;
use crate::{Dec, Enc, Malformed};

// ---------- ids, records, bitmaps ----------

/// The one shape of every answer to a multi-get (records, frames,
/// reference entries, zero values): `u32 n`, then `n` items of at least
/// `min_item` bytes, one per thing asked for, in order. `n` must be
/// `expected` (at most `limit`); `item` reads one; the body must end there.
/// `noun` and `asked` name them in the error (`"3 frames for 4 ids"`).
fn decode_answers<'a, T>(
    body: &'a [u8],
    what: &'static str,
    (noun, asked): (&str, &str),
    expected: usize,
    (limit, min_item): (usize, usize),
    mut item: impl FnMut(&mut Dec<'a>) -> Result<T, Malformed>,
) -> Result<Vec<T>, Malformed> {
    let mut d = Dec::new(body, what);
    let n = d.count(limit, min_item)?;
    if n != expected {
        return Err(d.err(format!("{n} {noun} for {expected} {asked}")));
    }
    let out = (0..n)
        .map(|_| item(&mut d))
        .collect::<Result<Vec<_>, _>>()?;
    d.end()?;
    Ok(out)
}

/// `u32 n`, then `n` ids of 32 bytes.
pub fn encode_ids(ids: &[Id]) -> Vec<u8> {
    let mut e = Enc::with_capacity(4 + ids.len() * 32);
    e.u32(ids.len() as u32);
    for id in ids {
        e.id(id);
    }
    e.finish()
}

pub fn decode_ids(body: &[u8], limit: usize) -> Result<Vec<Id>, Malformed> {
    let mut d = Dec::new(body, "id list");
    let n = d.count(limit, 32)?;
    let ids = (0..n).map(|_| d.id()).collect::<Result<Vec<_>, _>>()?;
    d.end()?;
    Ok(ids)
}

/// `u32 n`, then `n` length-prefixed records.
pub fn encode_records<B: AsRef<[u8]>>(records: &[B]) -> Vec<u8> {
    let len: usize = records.iter().map(|r| r.as_ref().len() + 4).sum();
    let mut e = Enc::with_capacity(4 + len);
    e.u32(records.len() as u32);
    for r in records {
        e.bytes(r.as_ref());
    }
    e.finish()
}

/// Records answering a request for `expected` of them.
pub fn decode_records(body: &[u8], expected: usize) -> Result<Vec<Vec<u8>>, Malformed> {
    decode_answers(
        body,
        "record list",
        ("records", "ids"),
        expected,
        (limits::IDS_PER_CALL, 4),
        |d| d.bytes(limits::RECORD_BYTES).map(<[u8]>::to_vec),
    )
}

/// One byte per id: 1 stored, 0 not.
pub fn encode_known(known: &[bool]) -> Vec<u8> {
    known.iter().map(|k| *k as u8).collect()
}

pub fn decode_known(body: &[u8], expected: usize) -> Result<Vec<bool>, Malformed> {
    if body.len() != expected {
        return Err(Malformed {
            what: "chunk bitmap",
            why: format!("{} answers for {expected} ids", body.len()),
        });
    }
    body.iter()
        .map(|b| match b {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(Malformed {
                what: "chunk bitmap",
                why: format!("byte {v} is neither 0 nor 1"),
            }),
        })
        .collect()
}

// ---------- snapshots, parents ----------

/// `u32 n`, then per snapshot its id and its length-prefixed record.
pub fn encode_snapshots(list: &[(Id, Vec<u8>)]) -> Vec<u8> {
    let mut e = Enc::default();
    e.u32(list.len() as u32);
    for (id, rec) in list {
        e.id(id).bytes(rec);
    }
    e.finish()
}

pub fn decode_snapshots(body: &[u8]) -> Result<Vec<(Id, Vec<u8>)>, Malformed> {
    let mut d = Dec::new(body, "snapshot list");
    let n = d.count(limits::SNAPSHOTS, 36)?;
    let out = (0..n)
        .map(|_| Ok((d.id()?, d.bytes(limits::RECORD_BYTES)?.to_vec())))
        .collect::<Result<Vec<_>, Malformed>>()?;
    d.end()?;
    Ok(out)
}

/// `GET /v1/snapshots?after=[HEX]`: one page of the listing, `u8 more`
/// then the list as [`encode_snapshots`]; the next page starts after the
/// last id of this one.
pub fn encode_snapshot_page(more: bool, list: &[(Id, Vec<u8>)]) -> Vec<u8> {
    let mut body = vec![u8::from(more)];
    body.extend_from_slice(&encode_snapshots(list));
    body
}

/// Snapshots as listed: each id with its record as stored.
pub type Listed = Vec<(Id, Vec<u8>)>;

pub fn decode_snapshot_page(body: &[u8]) -> Result<(bool, Listed), Malformed> {
    let Some((&more, rest)) = body.split_first() else {
        return Err(Malformed {
            what: "snapshot page",
            why: "empty".into(),
        });
    };
    if more > 1 {
        return Err(Malformed {
            what: "snapshot page",
            why: format!("more flag {more}"),
        });
    }
    Ok((more == 1, decode_snapshots(rest)?))
}

/// One server witness of a commit: the snapshot, the image name of the
/// session that committed it, and the server's time of the commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Witness {
    pub id: Id,
    pub image: String,
    pub committed_ns: i64,
}

/// `GET /v1/witnesses`: `u32 n`, then `n` × (snapshot id, `u64` commit
/// time in ns as two's complement, length-prefixed image name).
pub fn encode_witnesses(list: &[Witness]) -> Vec<u8> {
    let mut e = Enc::default();
    e.u32(list.len() as u32);
    for w in list {
        e.id(&w.id)
            .u64(w.committed_ns as u64)
            .bytes(w.image.as_bytes());
    }
    e.finish()
}

pub fn decode_witnesses(body: &[u8]) -> Result<Vec<Witness>, Malformed> {
    let mut d = Dec::new(body, "witness list");
    let n = d.count(limits::SNAPSHOTS, 44)?;
    let out = (0..n)
        .map(|_| {
            let id = d.id()?;
            let committed_ns = d.u64()? as i64;
            let name = d.bytes(255)?;
            let image = String::from_utf8(name.to_vec()).map_err(|_| Malformed {
                what: "witness list",
                why: "an image name is not UTF-8".into(),
            })?;
            Ok(Witness {
                id,
                image,
                committed_ns,
            })
        })
        .collect::<Result<Vec<_>, Malformed>>()?;
    d.end()?;
    Ok(out)
}

/// `u32 n`, then `n` (snapshot id, parent id) pairs.
pub fn encode_pairs(pairs: &[(Id, Id)]) -> Vec<u8> {
    let mut e = Enc::with_capacity(4 + pairs.len() * 64);
    e.u32(pairs.len() as u32);
    for (a, b) in pairs {
        e.id(a).id(b);
    }
    e.finish()
}

pub fn decode_pairs(body: &[u8]) -> Result<Vec<(Id, Id)>, Malformed> {
    let mut d = Dec::new(body, "parent list");
    let n = d.count(limits::SNAPSHOTS, 64)?;
    let out = (0..n)
        .map(|_| Ok((d.id()?, d.id()?)))
        .collect::<Result<Vec<_>, Malformed>>()?;
    d.end()?;
    Ok(out)
}

// ---------- chunk frames ----------

const FRAME_OK: u8 = 0;
const FRAME_MISSING: u8 = 1;
const FRAME_UNREADABLE: u8 = 2;

/// `u32 n`, then per chunk a status byte (0 frame, 1 missing, 2 unreadable)
/// and a length-prefixed frame (status 0) or UTF-8 reason (status 2).
pub fn encode_frames(frames: &[ChunkRead]) -> Vec<u8> {
    let len: usize = frames
        .iter()
        .map(|f| 5 + f.as_ref().map(Vec::len).unwrap_or(64))
        .sum();
    let mut e = Enc::with_capacity(4 + len);
    e.u32(frames.len() as u32);
    for f in frames {
        match f {
            Ok(frame) => e.u8(FRAME_OK).bytes(frame),
            Err(ChunkFault::Missing) => e.u8(FRAME_MISSING),
            Err(ChunkFault::Unreadable(why)) => e.u8(FRAME_UNREADABLE).bytes(why.as_bytes()),
            // A server reads its own current view, so it never finds a
            // chunk collected under it; said as unreadable, no new tag.
            Err(f @ ChunkFault::Collected) => {
                e.u8(FRAME_UNREADABLE).bytes(f.to_string().as_bytes())
            }
        };
    }
    e.finish()
}

pub fn decode_frames(body: &[u8], expected: usize) -> Result<Vec<ChunkRead>, Malformed> {
    decode_answers(
        body,
        "chunk frames",
        ("frames", "ids"),
        expected,
        (limits::IDS_PER_CALL, 1),
        |d| {
            Ok(match d.u8()? {
                FRAME_OK => Ok(d.bytes(limits::FRAME_BYTES)?.to_vec()),
                FRAME_MISSING => Err(ChunkFault::Missing),
                FRAME_UNREADABLE => Err(ChunkFault::Unreadable(
                    String::from_utf8_lossy(d.bytes(4096)?).into_owned(),
                )),
                s => return Err(d.err(format!("unknown frame status {s}"))),
            })
        },
    )
}

/// Reference entries: `u32 n`, then per id a byte (1 present) and, when
/// present, the length-prefixed `RefCount` encoding.
pub fn encode_refs(refs: &[Option<Vec<u8>>]) -> Vec<u8> {
    let mut e = Enc::with_capacity(4 + refs.len() * 24);
    e.u32(refs.len() as u32);
    for r in refs {
        match r {
            Some(v) => e.u8(1).bytes(v),
            None => e.u8(0),
        };
    }
    e.finish()
}

pub fn decode_refs(body: &[u8], expected: usize) -> Result<Vec<Option<Vec<u8>>>, Malformed> {
    decode_answers(
        body,
        "reference list",
        ("entries", "ids"),
        expected,
        (limits::IDS_PER_CALL, 1),
        |d| match d.u8()? {
            0 => Ok(None),
            1 => Ok(Some(d.bytes(64)?.to_vec())),
            v => Err(d.err(format!("unknown presence byte {v}"))),
        },
    )
}

// ---------- writing ----------

/// A new chunk in a `put_region`: its id, raw length and stored frame.
#[derive(Clone, Copy)]
pub struct NewFrame<'a> {
    pub id: Id,
    pub raw_len: u32,
    pub frame: &'a [u8],
}

/// `PUT /v1/regions/{id}`: the length-prefixed recipe, `u32 n`, then per
/// new chunk its id, `u32` raw length and length-prefixed frame.
pub fn encode_put_region<'a>(
    recipe: &[u8],
    frames: impl ExactSizeIterator<Item = NewFrame<'a>> + Clone,
) -> Vec<u8> {
    let len: usize = frames.clone().map(|f| 40 + f.frame.len()).sum();
    let mut e = Enc::with_capacity(8 + recipe.len() + len);
    e.bytes(recipe).u32(frames.len() as u32);
    for f in frames {
        e.id(&f.id).u32(f.raw_len).bytes(f.frame);
    }
    e.finish()
}

/// The recipe and new frames of a `put_region` body.
pub fn decode_put_region(body: &[u8]) -> Result<(&[u8], Vec<NewFrame<'_>>), Malformed> {
    let mut d = Dec::new(body, "region upload");
    let recipe = d.bytes(limits::RECORD_BYTES)?;
    let n = d.count(limits::FRAMES_PER_REGION, 40)?;
    let mut frames = Vec::with_capacity(n);
    for _ in 0..n {
        let id = d.id()?;
        let raw_len = d.u32()?;
        let frame = d.bytes(limits::FRAME_BYTES)?;
        frames.push(NewFrame { id, raw_len, frame });
    }
    d.end()?;
    Ok((recipe, frames))
}

/// `POST /v1/commit`: the length-prefixed snapshot record, a byte (1 when a
/// parent id follows), the parent id, `u32 n`, then `n` length-prefixed pages.
pub fn encode_commit(snapshot: &[u8], parent: Option<&Id>, pages: &[Vec<u8>]) -> Vec<u8> {
    let len: usize = pages.iter().map(|p| p.len() + 4).sum();
    let mut e = Enc::with_capacity(48 + snapshot.len() + len);
    e.bytes(snapshot);
    match parent {
        Some(p) => e.u8(1).id(p),
        None => e.u8(0),
    };
    e.u32(pages.len() as u32);
    for p in pages {
        e.bytes(p);
    }
    e.finish()
}

/// A decoded commit body: (snapshot record, parent, pages).
pub type CommitBody<'a> = (&'a [u8], Option<Id>, Vec<&'a [u8]>);

pub fn decode_commit(body: &[u8]) -> Result<CommitBody<'_>, Malformed> {
    let mut d = Dec::new(body, "commit");
    let snapshot = d.bytes(limits::RECORD_BYTES)?;
    let parent = match d.u8()? {
        0 => None,
        1 => Some(d.id()?),
        v => return Err(d.err(format!("unknown parent flag {v}"))),
    };
    let n = d.count(limits::PAGES_PER_COMMIT, 4)?;
    let pages = (0..n)
        .map(|_| d.bytes(limits::RECORD_BYTES))
        .collect::<Result<Vec<_>, _>>()?;
    d.end()?;
    Ok((snapshot, parent, pages))
}

// ---------- zero chaining values ----------

/// Answer to a zero-value lookup: per index a byte (1 cached) and 32 bytes.
pub fn encode_zero_cvs(cvs: &[Option<[u8; 32]>]) -> Vec<u8> {
    let mut e = Enc::with_capacity(4 + cvs.len() * 33);
    e.u32(cvs.len() as u32);
    for cv in cvs {
        match cv {
            Some(v) => e.u8(1).raw(v),
            None => e.u8(0).raw(&[0; 32]),
        };
    }
    e.finish()
}

pub fn decode_zero_cvs(body: &[u8], expected: usize) -> Result<Vec<Option<[u8; 32]>>, Malformed> {
    decode_answers(
        body,
        "zero values",
        ("values", "asked"),
        expected,
        (limits::ZERO_CVS, 33),
        |d| {
            let flag = d.u8()?;
            let v: [u8; 32] = d.take(32)?.try_into().expect("32 bytes");
            match flag {
                0 => Ok(None),
                1 => Ok(Some(v)),
                f => Err(d.err(format!("unknown flag {f}"))),
            }
        },
    )
}

/// New zero values: `u32` region size, `u32 n`, then `n` × (`u64` index, 32 bytes).
pub fn encode_put_zero_cvs(region_size: u32, cvs: &[(u64, [u8; 32])]) -> Vec<u8> {
    let mut e = Enc::with_capacity(8 + cvs.len() * 40);
    e.u32(region_size).u32(cvs.len() as u32);
    for (i, v) in cvs {
        e.u64(*i).raw(v);
    }
    e.finish()
}

pub type ZeroCvs = (u32, Vec<(u64, [u8; 32])>);

pub fn decode_put_zero_cvs(body: &[u8]) -> Result<ZeroCvs, Malformed> {
    let mut d = Dec::new(body, "zero values");
    let size = d.u32()?;
    let n = d.count(limits::ZERO_CVS, 40)?;
    let out = (0..n)
        .map(|_| Ok((d.u64()?, d.take(32)?.try_into().expect("32 bytes"))))
        .collect::<Result<Vec<_>, Malformed>>()?;
    d.end()?;
    Ok((size, out))
}

// ---------- scans (check) ----------

/// One page of a scan: a byte (1: more follow), `u32 n`, then `n`
/// (length-prefixed key, length-prefixed value).
pub fn encode_scan(more: bool, entries: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut e = Enc::default();
    e.u8(more as u8).u32(entries.len() as u32);
    for (k, v) in entries {
        e.bytes(k).bytes(v);
    }
    e.finish()
}

pub type ScanPage = (bool, Vec<(Vec<u8>, Vec<u8>)>);

pub fn decode_scan(body: &[u8]) -> Result<ScanPage, Malformed> {
    let mut d = Dec::new(body, "scan page");
    let more = match d.u8()? {
        0 => false,
        1 => true,
        v => return Err(d.err(format!("unknown flag {v}"))),
    };
    let n = d.count(limits::SCAN_ENTRIES, 8)?;
    let out = (0..n)
        .map(|_| {
            Ok((
                d.bytes(256)?.to_vec(),
                d.bytes(limits::RECORD_BYTES)?.to_vec(),
            ))
        })
        .collect::<Result<Vec<_>, Malformed>>()?;
    d.end()?;
    Ok((more, out))
}

/// What a scan walks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScanWhat {
    Snapshots,
    Recipes,
    Refs,
    Orphans,
}

/// `POST /v1/scan`: continue after key `after` (hex), if given.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ScanRequest {
    pub what: ScanWhat,
    pub after: Option<String>,
}

// ---------- JSON bodies ----------
//
// The answers of `PUT regions/{id}`, `forget` and `gc` are the repository's
// own outcome types (`imgstore_repo::PutOutcome`, `ForgetOutcome`,
// `GcOutcome`, with `Tally`) serialized as they are, not copies of them;
// the tests below pin their JSON.

/// The roles a token can have (see `docs/SECURITY.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Append-only: list and read its namespaces' snapshots, write new ones.
    Backup,
    /// Read its namespaces' snapshots and data; record damage found.
    Restore,
    /// Everything, every namespace.
    Admin,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "backup" => Some(Role::Backup),
            "restore" => Some(Role::Restore),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Backup => "backup",
            Role::Restore => "restore",
            Role::Admin => "admin",
        }
    }
}

/// `GET /v1/hello`: the repository's config and what this token may do.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u32,
    pub server: String,
    pub config: RepoConfig,
    pub role: Role,
    pub token: String,
    pub namespaces: Vec<String>,
    /// Region uploads and commits this token may have in the server's
    /// hands at once (its share of `max_uploads`). A client that sends
    /// more has the others wait at the gate, their bodies filling the
    /// connection's HTTP/2 window meanwhile; so it keeps at most this many
    /// in flight. Absent from servers before it was added (then 4, the
    /// default share).
    #[serde(default)]
    pub uploads: Option<u32>,
    /// A successful commit ends its session: the client sends no
    /// `DELETE` after it. False from servers before it was added, whose
    /// sessions a client still closes.
    #[serde(default)]
    pub commit_ends_session: bool,
    /// The listing comes in pages (`GET /v1/snapshots?after=`): one
    /// that passes an answer's limit is still read whole. False from
    /// servers before it was added.
    #[serde(default)]
    pub paged_snapshots: bool,
    /// A commit may come before the answers to its session's uploads,
    /// saying how many it awaits ([`crate::AWAITS_HEADER`]). False from
    /// servers before it was added: a client then waits for every answer.
    #[serde(default)]
    pub awaits_uploads: bool,
    /// Sessions may have client-chosen ids, and calls naming one with
    /// [`crate::IMAGE_HEADER`] open it if it is not open yet. False from
    /// servers before it was added.
    #[serde(default)]
    pub client_session_ids: bool,
}

/// `POST /v1/sessions`: a write session for a backup of `image`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SessionRequest {
    pub image: String,
    /// Index pages (hex ids, at most [`crate::limits::PIN_PAGES`]) whose
    /// regions the backup will name without sending: its parent's. The
    /// server pins them for the session as it opens, so the client may
    /// read those pages at the same time, outside the session, instead of
    /// one round trip later within it. Pages the token cannot see, or that
    /// are gone, are skipped without a word.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pin_pages: Vec<String>,
    /// The session's id, chosen by the client (16 hex digits, from a good
    /// random source), so that its first calls need not wait for this
    /// answer: they name it with the image ([`crate::IMAGE_HEADER`]), and
    /// whichever comes first opens the session, the others join it.
    /// Absent: the server chooses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SessionReply {
    /// Opaque, 16 hex digits; sent back in the `imgstore-session` header.
    pub session: String,
    /// The namespace the image belongs to (None for an admin's image no
    /// namespace claims).
    pub namespace: Option<String>,
    /// Seconds of silence after which the server drops the session.
    pub idle_timeout_secs: u64,
}

/// `GET /v1/totals`.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct WireTotals {
    pub objects: Tally,
    pub orphans: u64,
    /// Bytes the repository occupies on the server's disk.
    pub storage_bytes: u64,
}

/// Answer of a commit or a snapshot replacement.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Committed {
    pub id: String,
    pub added_bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IdsJson {
    pub ids: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProtectRequest {
    pub id: String,
    pub protected: bool,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct GcRequest {
    pub dry_run: bool,
}

/// A damage mark on the wire: kind letter (`C`, `R`, `P`), hex id, reason.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WireMark {
    pub kind: String,
    pub id: String,
    pub why: String,
}

impl From<&DamageMark> for WireMark {
    /// The reason is cut to [`crate::limits::DAMAGE_WHY_BYTES`] (at a
    /// character boundary): what a client sends passes, and marks recorded
    /// before the bound are listed cut.
    fn from(m: &DamageMark) -> Self {
        let mut end = m.why.len().min(crate::limits::DAMAGE_WHY_BYTES);
        while !m.why.is_char_boundary(end) {
            end -= 1;
        }
        WireMark {
            kind: kind_letter(m.kind).to_string(),
            id: m.id.to_hex(),
            why: m.why[..end].to_string(),
        }
    }
}

impl WireMark {
    pub fn parse(&self) -> Result<DamageMark, Malformed> {
        if self.why.len() > crate::limits::DAMAGE_WHY_BYTES {
            return Err(Malformed {
                what: "damage mark",
                why: format!(
                    "its reason is {} bytes, over the limit of {}",
                    self.why.len(),
                    crate::limits::DAMAGE_WHY_BYTES
                ),
            });
        }
        Ok(DamageMark {
            kind: parse_kind(&self.kind)?,
            id: parse_id(&self.id)?,
            why: self.why.clone(),
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WireObject {
    pub kind: String,
    pub id: String,
}

pub fn kind_letter(k: ObjectKind) -> &'static str {
    match k {
        ObjectKind::Chunk => "C",
        ObjectKind::Region => "R",
        ObjectKind::Page => "P",
    }
}

pub fn parse_kind(s: &str) -> Result<ObjectKind, Malformed> {
    match s {
        "C" | "chunk" => Ok(ObjectKind::Chunk),
        "R" | "region" => Ok(ObjectKind::Region),
        "P" | "page" => Ok(ObjectKind::Page),
        _ => Err(Malformed {
            what: "object kind",
            why: format!("{s:?} is not C, R or P"),
        }),
    }
}

pub fn parse_id(s: &str) -> Result<Id, Malformed> {
    Id::from_hex(s).map_err(|e| Malformed {
        what: "object id",
        why: e.0,
    })
}

/// The body of every error answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Machine-readable: `missing`, `no_snapshot`, `protected`, `invalid`,
    /// `malformed`, `unauthorized`, `forbidden`, `no_session`, `too_large`,
    /// `corrupt`, `no_space`, `internal`.
    pub code: String,
    /// One line for a human.
    pub message: String,
    /// For `missing`: the object kind letter; for `missing`,
    /// `no_snapshot`, `protected`: the id in hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bodies_round_trip_and_layouts_are_pinned() {
        let a = Id([1; 32]);
        let b = Id([2; 32]);
        let ids = encode_ids(&[a, b]);
        assert_eq!(&ids[..4], &[2, 0, 0, 0]);
        assert_eq!(ids.len(), 4 + 64);
        assert_eq!(decode_ids(&ids, 10).unwrap(), vec![a, b]);
        assert!(decode_ids(&ids, 1).is_err(), "limit enforced");
        assert!(decode_ids(&ids[..40], 10).is_err(), "truncated");

        let frames = vec![
            Ok(vec![9, 9]),
            Err(ChunkFault::Missing),
            Err(ChunkFault::Unreadable("x".into())),
        ];
        let enc = encode_frames(&frames);
        assert_eq!(
            enc,
            vec![3, 0, 0, 0, 0, 2, 0, 0, 0, 9, 9, 1, 2, 1, 0, 0, 0, b'x']
        );
        assert_eq!(decode_frames(&enc, 3).unwrap(), frames);
        assert!(
            decode_frames(&enc, 2).is_err(),
            "count must match the request"
        );
        // Every multi-get answer is held to the count asked for, in words
        // naming what was answered.
        let short = |e: Malformed| e.to_string();
        assert_eq!(
            short(decode_frames(&enc, 2).unwrap_err()),
            "malformed chunk frames: 3 frames for 2 ids"
        );
        assert_eq!(
            short(decode_records(&encode_records(&[b"r"]), 2).unwrap_err()),
            "malformed record list: 1 records for 2 ids"
        );
        assert_eq!(
            short(decode_refs(&encode_refs(&[None]), 0).unwrap_err()),
            "malformed reference list: 1 entries for 0 ids"
        );
        assert_eq!(
            short(decode_zero_cvs(&encode_zero_cvs(&[None]), 3).unwrap_err()),
            "malformed zero values: 1 values for 3 asked"
        );
        assert_eq!(
            decode_refs(&encode_refs(&[Some(vec![5]), None]), 2).unwrap(),
            vec![Some(vec![5]), None]
        );
        assert_eq!(
            decode_records(&encode_records(&[&b"a"[..], b"bc"]), 2).unwrap(),
            vec![b"a".to_vec(), b"bc".to_vec()]
        );

        let body = encode_put_region(
            b"rec",
            [NewFrame {
                id: a,
                raw_len: 7,
                frame: b"fr",
            }]
            .into_iter(),
        );
        let (rec, fr) = decode_put_region(&body).unwrap();
        assert_eq!(rec, b"rec");
        assert_eq!((fr[0].id, fr[0].raw_len, fr[0].frame), (a, 7, &b"fr"[..]));

        let c = encode_commit(b"snap", Some(&b), &[b"p1".to_vec(), b"p2".to_vec()]);
        let (s, p, pages) = decode_commit(&c).unwrap();
        assert_eq!(
            (s, p, pages),
            (&b"snap"[..], Some(b), vec![&b"p1"[..], &b"p2"[..]])
        );

        assert_eq!(
            decode_known(&encode_known(&[true, false]), 2).unwrap(),
            vec![true, false]
        );
        assert!(decode_known(&[2], 1).is_err());
        let z = encode_zero_cvs(&[Some([3; 32]), None]);
        assert_eq!(decode_zero_cvs(&z, 2).unwrap(), vec![Some([3; 32]), None]);
        let s = encode_scan(true, &[(b"k".to_vec(), b"v".to_vec())]);
        assert_eq!(
            decode_scan(&s).unwrap(),
            (true, vec![(b"k".to_vec(), b"v".to_vec())])
        );
    }

    /// The JSON answers docs/PROTOCOL.md gives, byte for byte: the
    /// repository's outcome types are sent as they are, so a field renamed
    /// there would change the wire.
    #[test]
    fn json_answers_are_pinned() {
        use imgstore_repo::{ForgetOutcome, GcOutcome, PutOutcome};
        let tally = Tally {
            chunks: 1,
            chunk_raw_bytes: 2,
            chunk_stored_bytes: 3,
            regions: 4,
            pages: 5,
            recipe_bytes: 6,
        };
        let tally_json = r#"{"chunks":1,"chunk_raw_bytes":2,"chunk_stored_bytes":3,"regions":4,"pages":5,"recipe_bytes":6}"#;
        fn pinned<T>(v: &T, json: &str)
        where
            T: Serialize + serde::de::DeserializeOwned + std::fmt::Debug + PartialEq,
        {
            assert_eq!(serde_json::to_string(v).unwrap(), json);
            assert_eq!(&serde_json::from_str::<T>(json).unwrap(), v);
        }
        pinned(&tally, tally_json);
        pinned(
            &PutOutcome {
                region_new: true,
                new_chunks: 7,
                new_bytes: 8,
            },
            r#"{"region_new":true,"new_chunks":7,"new_bytes":8}"#,
        );
        pinned(
            &ForgetOutcome {
                snapshots: 9,
                pages_orphaned: 10,
            },
            r#"{"snapshots":9,"pages_orphaned":10}"#,
        );
        pinned(
            &GcOutcome {
                removed: tally,
                rewrote: false,
            },
            &format!(r#"{{"removed":{tally_json},"rewrote":false}}"#),
        );
        let totals = WireTotals {
            objects: tally,
            orphans: 11,
            storage_bytes: 12,
        };
        assert_eq!(
            serde_json::to_string(&totals).unwrap(),
            format!(r#"{{"objects":{tally_json},"orphans":11,"storage_bytes":12}}"#)
        );
    }

    #[test]
    fn a_huge_count_is_refused_before_allocation() {
        // 0xffffffff items claimed in an 8-byte body.
        let body = [0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0];
        assert!(decode_ids(&body, usize::MAX).is_err());
        assert!(decode_snapshots(&body).is_err());
        assert!(decode_commit(&[0xff, 0xff, 0xff, 0x7f]).is_err());
    }

    proptest! {
        // The decoders' fuzz test: arbitrary bytes give Ok or Err, never a
        // panic or an allocation the body cannot back.
        #[test]
        fn decoders_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512), n in 0usize..8) {
            let _ = decode_ids(&body, 4096);
            let _ = decode_records(&body, n);
            let _ = decode_known(&body, n);
            let _ = decode_snapshots(&body);
            let _ = decode_snapshot_page(&body);
            let _ = decode_witnesses(&body);
            let _ = decode_pairs(&body);
            let _ = decode_frames(&body, n);
            let _ = decode_refs(&body, n);
            let _ = decode_put_region(&body);
            let _ = decode_commit(&body);
            let _ = decode_zero_cvs(&body, n);
            let _ = decode_put_zero_cvs(&body);
            let _ = decode_scan(&body);
        }
    }
}

#[cfg(test)]
mod damage_reason_tests {
    use super::*;

    #[test]
    fn a_long_reason_is_cut_when_sent_and_refused_when_received() {
        let m = DamageMark {
            kind: ObjectKind::Chunk,
            id: Id::hash(b"x"),
            why: "é".repeat(crate::limits::DAMAGE_WHY_BYTES),
        };
        let w = WireMark::from(&m);
        assert!(w.why.len() <= crate::limits::DAMAGE_WHY_BYTES);
        assert!(w.why.len() >= crate::limits::DAMAGE_WHY_BYTES - 1);
        assert!(w.parse().is_ok());
        let long = WireMark {
            why: "x".repeat(crate::limits::DAMAGE_WHY_BYTES + 1),
            ..w
        };
        assert!(long.parse().is_err());
    }
}

#[cfg(test)]
mod snapshot_page_tests {
    use super::*;

    #[test]
    fn a_page_round_trips_and_a_bad_flag_is_refused() {
        let list = vec![(Id::hash(b"a"), b"rec".to_vec())];
        for more in [false, true] {
            let body = encode_snapshot_page(more, &list);
            assert_eq!(decode_snapshot_page(&body).unwrap(), (more, list.clone()));
        }
        let mut body = encode_snapshot_page(false, &list);
        body[0] = 2;
        assert!(decode_snapshot_page(&body).is_err());
        assert!(decode_snapshot_page(&[]).is_err());
    }
}
